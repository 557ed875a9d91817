"""The inference core's computing in blocks: what a caller's deadline (gRPC's) changes. The
numbers never; when the computation ends, yes: it is given up between two blocks of rows once the
deadline has passed, and nothing of it is counted."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.inference import Core, CoreError, Limits, Problem, compute
from service.core.metrics import Metrics
from service.core.repository import Repository, served_model
from service.models.encoders import ROWS_PER_BLOCK, seeded
from service.models.kinds import AUTOENCODER, KINDS, VAE

LIMITS = Limits(max_rows=10 * ROWS_PER_BLOCK, max_samples=10, max_rows_x_samples=100 * ROWS_PER_BLOCK)


def never() -> bool:
    return False


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(0, 3 * ROWS_PER_BLOCK + 5),
    dims=st.tuples(st.integers(1, 12), st.integers(1, 4)),
    samples=st.integers(1, 3),
    seed=st.integers(0, 2**63 - 1),
    density=st.floats(0, 1),
)
def test_computing_in_blocks_gives_the_numbers_of_the_whole_batch(
    rows: int, dims: tuple[int, int], samples: int, seed: int, density: float
) -> None:
    input_dim, latent_dim = dims
    model = seeded(seed % 1000, input_dim, latent_dim)
    x = (np.random.default_rng(seed).random((rows, input_dim)) < density).astype(np.uint8)
    for kind in KINDS.values():
        whole = kind.compute(model, x, samples, seed)
        blocked = compute(kind, model, x, samples, seed, never)
        assert whole.keys() == blocked.keys()
        for name in whole:
            assert whole[name].dtype == blocked[name].dtype
            np.testing.assert_array_equal(blocked[name], whole[name], err_msg=f"{kind.name} {name}")


def make_core() -> tuple[Core, Metrics]:
    metrics = Metrics(routes=[])
    served = served_model("default", 1, seeded(0, 6, 3), LIMITS, {"source": "seed", "seed": 0}, announced=False)
    return Core(Repository(LIMITS, fixed=served), metrics, 1 << 20), metrics


class Clock:
    """A deadline that passes after `checks` looks at it."""

    def __init__(self, checks: int) -> None:
        self.checks, self.looked = checks, 0

    def __call__(self) -> bool:
        self.looked += 1
        return self.looked > self.checks


@pytest.mark.parametrize("kinds", [(AUTOENCODER,), (VAE,), (AUTOENCODER, VAE)], ids=["ae", "vae", "both"])
def test_a_batch_is_given_up_at_the_first_block_after_its_deadline_and_not_counted(kinds: tuple) -> None:
    core, metrics = make_core()
    served = core.resolve(None, None)
    x = np.ones((3 * ROWS_PER_BLOCK + 1, 6), dtype=np.uint8)  # four blocks
    clock = Clock(checks=2)
    with pytest.raises(CoreError) as caught:
        core.encode(served, kinds, x, samples=2, seed=7, expired=clock)
    assert caught.value.problem is Problem.DEADLINE
    message = f"the call's deadline passed; {2 * ROWS_PER_BLOCK} of its {x.shape[0]} rows were computed"
    assert str(caught.value) == message
    assert clock.looked == 3  # no block was computed after the deadline was seen to pass
    assert metrics.rows == {}  # nothing of a given-up batch is counted

    arrays, _ = core.encode(served, kinds, x, samples=2, seed=7, expired=never)  # the same batch in time
    assert arrays.keys() == {name for kind in kinds for name in kind.outputs}
    assert sum(metrics.rows.values()) == len(kinds) * x.shape[0]


def test_a_batch_of_one_block_is_computed_whole_whatever_the_deadline() -> None:
    core, metrics = make_core()
    served = core.resolve(None, None)
    x = np.ones((ROWS_PER_BLOCK, 6), dtype=np.uint8)
    arrays, _ = core.encode_one(served, AUTOENCODER, x, expired=lambda: True)  # the caller checks before it starts
    assert arrays["codes"].shape == (ROWS_PER_BLOCK, 3)
    assert sum(metrics.rows.values()) == ROWS_PER_BLOCK
