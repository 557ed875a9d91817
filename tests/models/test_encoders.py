"""The math against independent formulas, the seeded recipe, and the overflow proof."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.models.encoders import (
    LOG_SIGMA_MAX,
    ROWS_PER_BLOCK,
    Model,
    ModelError,
    affine,
    autoencode,
    check_bounded,
    seeded,
    vae_encode,
)


def reference_codes(model: Model, x: list[list[int]]) -> list[list[float]]:
    """relu(x W + b), one scalar at a time with exactly rounded sums."""
    w, b = model.ae_weight, model.ae_bias
    return [[max(0.0, math.fsum(row[i] * w[i, j] for i in range(len(row))) + b[j]) for j in range(len(b))] for row in x]


def reference_vae(model: Model, x: list[list[int]], samples: int, seed: int) -> dict[str, list[object]]:
    """mu, log_sigma, z and KL by the formulas written out per scalar."""
    k = model.latent_dim
    eps = np.random.default_rng(seed).standard_normal((len(x), samples, k))
    out: dict[str, list[object]] = {"mu": [], "log_sigma": [], "z": [], "kl": []}
    for n, row in enumerate(x):
        mu = [math.fsum(row[i] * model.mu_weight[i, j] for i in range(len(row))) + model.mu_bias[j] for j in range(k)]
        ls = [math.fsum(row[i] * model.ls_weight[i, j] for i in range(len(row))) + model.ls_bias[j] for j in range(k)]
        z = [[mu[j] + math.exp(ls[j]) * eps[n, s, j] for j in range(k)] for s in range(samples)]
        kl = 0.5 * sum(mu[j] ** 2 + math.exp(2 * ls[j]) - 1 - 2 * ls[j] for j in range(k))
        out["mu"].append(mu)
        out["log_sigma"].append(ls)
        out["z"].append(z)
        out["kl"].append(kl)
    return out


def test_seeded_weights_follow_the_documented_recipe() -> None:
    seed, d, k = 7, 6, 3
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d, k)) / math.sqrt(d)
    w_mu = rng.standard_normal((d, k)) / math.sqrt(d)
    w_ls = rng.standard_normal((d, k)) / math.sqrt(d)
    model = seeded(seed, d, k)
    np.testing.assert_array_equal(model.ae_weight, w)
    np.testing.assert_array_equal(model.mu_weight, w_mu)
    np.testing.assert_array_equal(model.ls_weight, w_ls)
    for bias in (model.ae_bias, model.mu_bias, model.ls_bias):
        np.testing.assert_array_equal(bias, np.zeros(k))


def test_every_binary_input_of_the_default_model_matches_the_reference() -> None:
    model = seeded(0, 5, 2)
    x = [list(bits) for bits in itertools.product([0, 1], repeat=5)]
    codes = autoencode(model, np.array(x, dtype=np.float64))
    np.testing.assert_allclose(codes, reference_codes(model, x), rtol=1e-12, atol=1e-15)
    out = vae_encode(model, np.array(x, dtype=np.float64), samples=3, seed=42)
    expected = reference_vae(model, x, samples=3, seed=42)
    for name in ("mu", "log_sigma", "z", "kl"):
        np.testing.assert_allclose(getattr(out, name), expected[name], rtol=1e-12, atol=1e-14, err_msg=name)


def test_sampling_follows_the_documented_recipe_bit_for_bit() -> None:
    model = seeded(3, 5, 2)
    x = np.array([[0, 1, 1, 0, 1], [1, 0, 0, 1, 0]], dtype=np.float64)
    out = vae_encode(model, x, samples=4, seed=123)
    eps = np.random.default_rng(123).standard_normal((2, 4, 2))
    for i in range(2):
        for s in range(4):
            np.testing.assert_array_equal(out.z[i, s], out.mu[i] + np.exp(out.log_sigma[i]) * eps[i, s])


def test_all_zero_input_gives_finite_positive_sigma() -> None:
    # The naive log(relu(...)) parameterization gives log(0) = -inf here.
    model = seeded(0, 5, 2)
    out = vae_encode(model, np.zeros((1, 5)), samples=2, seed=0)
    np.testing.assert_array_equal(out.log_sigma, [[0.0, 0.0]])
    assert np.isfinite(out.z).all()
    assert out.kl[0] == 0.0


def test_fingerprint_depends_on_every_value_and_nothing_else() -> None:
    model = seeded(0, 5, 2)
    same = Model.from_arrays(
        {name: value.astype(np.float32).astype(np.float64) for name, value in model.arrays().items()}
    )
    assert seeded(0, 5, 2).fingerprint() == model.fingerprint()
    assert same.fingerprint() != model.fingerprint()  # float32 rounding changed the values
    arrays = model.arrays()
    arrays["vae.log_sigma.bias"] = arrays["vae.log_sigma.bias"] + np.array([0.0, 1e-12])
    assert Model.from_arrays(arrays).fingerprint() != model.fingerprint()
    assert model.fingerprint().startswith("sha256:")
    assert len(model.fingerprint()) == 7 + 64


def _with(model: Model, **changes: np.ndarray) -> dict[str, np.ndarray]:
    arrays = model.arrays()
    arrays.update({name.replace("__", "."): value for name, value in changes.items()})
    return arrays


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vae__mu__bias": np.zeros(3)}, "'vae.mu.bias' has shape (3,), expected (2,)"),
        ({"autoencoder__weight": np.zeros((5,))}, "'autoencoder.weight' has shape (5,)"),
        ({"vae__log_sigma__weight": np.zeros((4, 2))}, "'vae.log_sigma.weight' has shape (4, 2), expected (5, 2)"),
        ({"vae__mu__weight": np.full((5, 2), np.inf)}, "'vae.mu.weight' holds the non-finite value inf at [0, 0]"),
        ({"autoencoder__bias": np.array([0.0, np.nan])}, "'autoencoder.bias' holds the non-finite value nan at [1]"),
        ({"vae__mu__bias": np.array(["a", "b"])}, "'vae.mu.bias' has dtype <U1"),
    ],
)
def test_inconsistent_arrays_are_refused_by_name(change: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ModelError) as error:
        Model.from_arrays(_with(seeded(0, 5, 2), **change))
    assert message in str(error.value)


def test_missing_array_is_named() -> None:
    arrays = seeded(0, 5, 2).arrays()
    del arrays["vae.log_sigma.bias"]
    with pytest.raises(ModelError, match=r"missing array 'vae\.log_sigma\.bias'"):
        Model.from_arrays(arrays)


def test_overflow_bound_is_exact_at_the_boundary() -> None:
    """log_sigma can reach b + sum of positive weights; the check refuses exactly above LOG_SIGMA_MAX."""
    base = seeded(0, 4, 1)
    w = np.array([[100.0], [-50.0], [100.0], [0.0]])
    ok = _with(base, vae__log_sigma__weight=w, vae__log_sigma__bias=np.array([LOG_SIGMA_MAX - 200.0 - 1e-9]))
    Model.from_arrays(ok)  # the worst case is a hair below LOG_SIGMA_MAX: finite
    over = _with(base, vae__log_sigma__weight=w, vae__log_sigma__bias=np.array([LOG_SIGMA_MAX - 200.0 + 1e-9]))
    with pytest.raises(ModelError, match=r"log_sigma of latent 0 reaches .* for the input \[1, 0, 1, 0\]"):
        Model.from_arrays(over)
    # The worst input really is that large: the bound is reached, not merely an upper estimate.
    model = Model.from_arrays(ok)
    out = vae_encode(model, np.array([[1.0, 0.0, 1.0, 0.0]]), samples=1, seed=0)
    assert out.log_sigma[0, 0] == pytest.approx(LOG_SIGMA_MAX)
    assert np.isfinite(out.kl).all()
    assert np.isfinite(out.z).all()


@pytest.mark.parametrize(
    ("name", "value", "output"),
    [
        ("vae__mu__weight", 1e307, "kl can overflow float64"),  # mu is finite, mu**2 is not
        ("vae__mu__weight", 1e154, "kl can overflow float64"),
        ("vae__mu__weight", 1e308, "vae.mu: |bias| plus the sum of |weights| of latent 0 overflows"),
        ("autoencoder__weight", 1e308, "autoencoder: |bias| plus the sum of |weights| of latent 0 overflows"),
        ("vae__log_sigma__weight", -5e307, "log_sigma of latent 0 reaches 0 with rounding"),
        ("vae__log_sigma__weight", -1e308, "vae.log_sigma: |bias| plus the sum of |weights| of latent 0"),
    ],
)
def test_weights_that_could_overflow_an_output_are_refused(name: str, value: float, output: str) -> None:
    arrays = _with(seeded(0, 3, 1), **{name: np.full((3, 1), value)})
    with pytest.raises(ModelError, match=f"^{re.escape(output)}"):
        Model.from_arrays(arrays)


def test_seeded_weights_of_absurd_width_are_refused_not_served() -> None:
    # With d inputs the positive weights of N(0, 1/d) add up to about 0.4 sqrt(d).
    with pytest.raises(ModelError, match="exp\\(2 \\* log_sigma\\) overflows"):
        check_bounded(Model.from_arrays(_with(seeded(0, 4, 2), vae__log_sigma__weight=np.full((4, 2), 100.0))))


@st.composite
def bounded_models(draw: st.DrawFn) -> tuple[Model, np.ndarray]:
    """Random models that pass the load check, some right at its edge, with a batch of binary rows."""
    d = draw(st.integers(1, 8))
    k = draw(st.integers(1, 4))
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 80.0]))
    elements = st.floats(-scale, scale, allow_nan=False)
    arrays = {
        name: draw(hnp.arrays(np.float64, (d, k) if name.endswith("weight") else (k,), elements=elements))
        for name in seeded(0, d, k).arrays()
    }
    # Push the largest reachable log_sigma to within a hair of the limit in one latent.
    high = arrays["vae.log_sigma.bias"] + np.maximum(arrays["vae.log_sigma.weight"], 0).sum(axis=0)
    if draw(st.booleans()):
        arrays["vae.log_sigma.bias"][0] += LOG_SIGMA_MAX - high[0] - 1e-9
    try:
        model = Model.from_arrays(arrays)
    except ModelError:
        from hypothesis import reject

        reject()
    x = draw(hnp.arrays(np.float64, st.tuples(st.integers(1, 6), st.just(d)), elements=st.sampled_from([0.0, 1.0])))
    return model, x


@settings(max_examples=200, deadline=None)
@given(bounded_models(), st.integers(1, 4), st.integers(0, 2**63 - 1))
def test_a_model_that_loads_gives_finite_outputs_for_every_binary_input(
    case: tuple[Model, np.ndarray], samples: int, seed: int
) -> None:
    model, x = case
    codes = autoencode(model, x)
    out = vae_encode(model, x, samples, seed)
    assert codes.shape == (x.shape[0], model.latent_dim)
    assert (codes >= 0).all()
    assert out.z.shape == (x.shape[0], samples, model.latent_dim)
    for value in (codes, out.mu, out.log_sigma, out.z, out.kl, np.exp(out.log_sigma), np.exp(2 * out.log_sigma)):
        assert np.isfinite(value).all()
    assert (np.exp(out.log_sigma) > 0).all()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**63 - 1), st.integers(1, 5), st.integers(1, 3))
def test_same_seed_same_samples_and_a_prefix_of_rows_keeps_its_samples(seed: int, rows: int, samples: int) -> None:
    model = seeded(1, 5, 2)
    x = np.array([[(i >> j) & 1 for j in range(5)] for i in range(rows)], dtype=np.float64)
    first = vae_encode(model, x, samples, seed)
    again = vae_encode(model, x, samples, seed)
    np.testing.assert_array_equal(first.z, again.z)
    other = vae_encode(model, x, samples, (seed + 1) % 2**63)
    assert not np.array_equal(first.z, other.z)


def test_large_batches_go_in_blocks_with_the_same_numbers_whatever_their_dtype() -> None:
    model = seeded(2, 33, 3)
    bits = np.random.default_rng(0).integers(0, 2, size=(ROWS_PER_BLOCK * 2 + 17, 33), dtype=np.uint8)
    as_uint8 = autoencode(model, bits)
    for dtype in (np.float64, np.int64, np.bool_):
        np.testing.assert_array_equal(autoencode(model, bits.astype(dtype)), as_uint8)
    whole = np.maximum(bits.astype(np.float64) @ model.ae_weight + model.ae_bias, 0)
    np.testing.assert_allclose(as_uint8, whole, rtol=1e-12, atol=1e-14)
    out = vae_encode(model, bits, samples=1, seed=3)
    np.testing.assert_array_equal(out.mu, vae_encode(model, bits.astype(np.float64), samples=1, seed=3).mu)


@pytest.mark.parametrize("rows", [1, 2, 17, ROWS_PER_BLOCK])
def test_a_batch_of_one_block_has_the_numbers_of_the_blocked_loop(rows: int) -> None:
    """affine computes a batch of at most ROWS_PER_BLOCK rows in one call (a one-row request's path,
    ~6% cheaper than the loop's slices); its numbers are the loop's, bit for bit."""
    model = seeded(5, 33, 4)
    x = np.random.default_rng(rows).integers(0, 2, size=(rows, 33), dtype=np.uint8)
    looped = np.empty((rows, 4))
    np.matmul(x.astype(np.float64), model.ae_weight, out=looped[0:ROWS_PER_BLOCK])
    looped += model.ae_bias
    np.testing.assert_array_equal(affine(x, model.ae_weight, model.ae_bias), looped)
    np.testing.assert_array_equal(affine(x.astype(np.float64), model.ae_weight, model.ae_bias), looped)
