"""The model math: pure numpy, no HTTP.

Two encoders share one input space of binary vectors x in {0, 1}^d:

- the autoencoder bottleneck  codes = relu(x @ W + b)
- the VAE encoder             mu = x @ W_mu + b_mu,  log_sigma = x @ W_ls + b_ls,
                              z = mu + exp(log_sigma) * eps,  eps ~ N(0, I)

The network learns log sigma, so sigma = exp(log_sigma) is positive by construction;
`check_bounded` proves at load time that no binary input can overflow it.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]

# The arrays of a model, in the order the fingerprint hashes them and files list them.
ARRAY_NAMES = (
    "autoencoder.weight",
    "autoencoder.bias",
    "vae.mu.weight",
    "vae.mu.bias",
    "vae.log_sigma.weight",
    "vae.log_sigma.bias",
)

# Optional decoders, written by `encoding-service train`: all four or none, after ARRAY_NAMES.
DECODER_NAMES = (
    "autoencoder.decoder.weight",
    "autoencoder.decoder.bias",
    "vae.decoder.weight",
    "vae.decoder.bias",
)
# Codes and z sent to the decode routes must lie within +-DECODE_LIMIT, so that no logit overflows.
DECODE_LIMIT = 1e6

# exp(t) is finite in float64 for t <= LOG_MAX; the KL needs exp(2 * log_sigma) finite.
LOG_MAX = math.log(np.finfo(np.float64).max)  # 709.78...
LOG_SIGMA_MAX = LOG_MAX / 2  # 354.89...
EPS = float(np.finfo(np.float64).eps)
FLOAT_MAX = float(np.finfo(np.float64).max)


class ModelError(ValueError):
    """Weights that cannot be served: inconsistent shapes, non-finite values, possible overflow."""


@dataclass(frozen=True)
class Model:
    """All weights, float64. W matrices are (input_dim, latent_dim), biases (latent_dim,)."""

    ae_weight: Array
    ae_bias: Array
    mu_weight: Array
    mu_bias: Array
    ls_weight: Array
    ls_bias: Array
    # Decoders (latent_dim, input_dim) and (input_dim,), or None: p(x | h) = sigmoid(h @ W_d + b_d).
    ae_decoder_weight: Array | None = None
    ae_decoder_bias: Array | None = None
    vae_decoder_weight: Array | None = None
    vae_decoder_bias: Array | None = None

    @property
    def has_decoders(self) -> bool:
        return self.ae_decoder_weight is not None

    @cached_property
    def input_dim(self) -> int:
        return int(self.ae_weight.shape[0])

    @cached_property
    def latent_dim(self) -> int:
        return int(self.ae_weight.shape[1])

    def arrays(self) -> dict[str, Array]:
        """The arrays by their file names, in ARRAY_NAMES order, then DECODER_NAMES' if there are decoders."""
        values = (self.ae_weight, self.ae_bias, self.mu_weight, self.mu_bias, self.ls_weight, self.ls_bias)
        arrays = dict(zip(ARRAY_NAMES, values, strict=True))
        decoders = (self.ae_decoder_weight, self.ae_decoder_bias, self.vae_decoder_weight, self.vae_decoder_bias)
        arrays |= {name: value for name, value in zip(DECODER_NAMES, decoders, strict=True) if value is not None}
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, npt.ArrayLike]) -> Model:
        """Build and check a model from arrays named as in ARRAY_NAMES (extra names are ignored)."""
        missing = [name for name in ARRAY_NAMES if name not in arrays]
        if missing:
            raise ModelError(f"missing array {missing[0]!r} (a model needs {', '.join(ARRAY_NAMES)})")
        decoders = [name for name in DECODER_NAMES if name in arrays]
        if decoders and len(decoders) != len(DECODER_NAMES):
            absent = next(name for name in DECODER_NAMES if name not in arrays)
            raise ModelError(f"missing array {absent!r} (decoders need all of {', '.join(DECODER_NAMES)})")
        values = []
        for name in (*ARRAY_NAMES, *decoders):
            value = np.asarray(arrays[name])
            if value.dtype.kind not in "biuf":
                raise ModelError(f"array {name!r} has dtype {value.dtype}, expected a real number type")
            values.append(np.ascontiguousarray(value, dtype=np.float64))
        model = cls(*values)
        model.check()
        return model

    def check(self) -> None:
        """Raise ModelError unless the shapes agree, every value is finite and no input can overflow."""
        arrays = self.arrays()
        weight = self.ae_weight
        if weight.ndim != 2 or 0 in weight.shape:
            raise ModelError(f"array 'autoencoder.weight' has shape {weight.shape}, expected (input_dim, latent_dim)")
        d, k = weight.shape
        for name, value in arrays.items():
            if name in DECODER_NAMES:
                expected = (k, d) if name.endswith("weight") else (d,)
            else:
                expected = (d, k) if name.endswith("weight") else (k,)
            if value.shape != expected:
                raise ModelError(f"array {name!r} has shape {value.shape}, expected {expected}")
        for name, value in arrays.items():
            if not np.isfinite(value).all():
                index = tuple(int(i) for i in np.argwhere(~np.isfinite(value))[0])
                raise ModelError(f"array {name!r} holds the non-finite value {value[index]} at {list(index)}")
        check_bounded(self)

    def fingerprint(self) -> str:
        """sha256 over each array in `arrays()` order: name, NUL, shape, NUL, float64 little-endian bytes."""
        digest = hashlib.sha256()
        for name, value in self.arrays().items():
            shape = ",".join(str(n) for n in value.shape)
            digest.update(f"{name}\0{shape}\0".encode())
            digest.update(np.ascontiguousarray(value, dtype="<f8").tobytes())
        return "sha256:" + digest.hexdigest()


def seeded(seed: int, input_dim: int, latent_dim: int) -> Model:
    """The reproducible default weights: W, W_mu, W_ls ~ N(0, 1) / sqrt(d) in that order; zero biases."""
    rng = np.random.default_rng(seed)
    scale = math.sqrt(input_dim)
    ae_weight, mu_weight, ls_weight = (rng.standard_normal((input_dim, latent_dim)) / scale for _ in range(3))
    zeros = np.zeros(latent_dim)
    model = Model(ae_weight, zeros, mu_weight, zeros.copy(), ls_weight, zeros.copy())
    model.check()
    return model


def _extremes(layer: str, weight: Array, bias: Array) -> tuple[Array, Array]:
    """Smallest and largest of x @ weight + bias over all binary x, per latent, widened by the most
    that rounding can add when computing x @ weight + bias (a forward error bound)."""
    magnitude = np.abs(bias) + np.abs(weight).sum(axis=0)  # (d, k) -> (k,)
    if not np.isfinite(magnitude).all():
        latent = int(np.argmin(np.isfinite(magnitude)))
        raise ModelError(f"{layer}: |bias| plus the sum of |weights| of latent {latent} overflows float64")
    low = bias + np.minimum(weight, 0).sum(axis=0)  # (d, k) -> (k,)
    high = bias + np.maximum(weight, 0).sum(axis=0)  # (d, k) -> (k,)
    rounding = (weight.shape[0] + 2) * EPS * magnitude
    return low - rounding, high + rounding


def check_bounded(model: Model) -> None:
    """Prove that no binary input makes any output overflow float64, or raise ModelError.

    For binary x the largest value of x @ W + b in latent j is b_j + sum_i max(W_ij, 0),
    reached by x_i = 1 exactly where W_ij > 0, and the smallest is b_j + sum_i min(W_ij, 0).
    So the check covers every one of the 2^d inputs without trying them, rounding included.
    """
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing bound is inf or nan: refused below
        ls_low, ls_high = _extremes("vae.log_sigma", model.ls_weight, model.ls_bias)
        worst = int(np.argmax(ls_high))
        if not ls_high[worst] <= LOG_SIGMA_MAX:
            witness = model.ls_weight[:, worst] > 0
            reached = float(model.ls_bias[worst] + model.ls_weight[witness, worst].sum())
            where = f"for the input {_short(witness.astype(int).tolist())}"
            if reached <= LOG_SIGMA_MAX:
                where = f"with rounding, as it comes within {LOG_SIGMA_MAX - reached:.3g} of the limit"
            raise ModelError(
                f"log_sigma of latent {worst} reaches {reached:.9g} {where}, "
                f"and exp(2 * log_sigma) overflows float64 above {LOG_SIGMA_MAX:.9g}"
            )
        mu_low, mu_high = _extremes("vae.mu", model.mu_weight, model.mu_bias)
        _, ae_high = _extremes("autoencoder", model.ae_weight, model.ae_bias)
        mu_abs = np.maximum(np.abs(mu_low), np.abs(mu_high))
        ls_abs = np.maximum(np.abs(ls_low), np.abs(ls_high))
        k = model.latent_dim
        # numpy's ziggurat normal sampler cannot return |eps| above about 14, far below 64.
        bounds = {
            "autoencoder codes": float(np.max(ae_high)),
            "mu": float(np.max(mu_abs)),
            "z": float(np.max(mu_abs + 64.0 * np.exp(ls_high))) * (1 + 4 * EPS),
            "kl": float(np.sum(mu_abs**2 + np.exp(2.0 * ls_high) + 1.0 + 2.0 * ls_abs)) * (1 + (k + 4) * EPS),
        }
        for name, weight, bias in (
            ("autoencoder.decoder", model.ae_decoder_weight, model.ae_decoder_bias),
            ("vae.decoder", model.vae_decoder_weight, model.vae_decoder_bias),
        ):
            if weight is not None and bias is not None:  # logits of codes within +-DECODE_LIMIT
                bounds[f"{name} logits"] = float(np.max(np.abs(bias) + DECODE_LIMIT * np.abs(weight).sum(axis=0)))
    for output, bound in bounds.items():
        if not bound <= FLOAT_MAX:
            raise ModelError(f"{output} can overflow float64 for some binary input (bound {bound:.6g})")


def _short(bits: list[int], keep: int = 16) -> str:
    shown = ", ".join(str(b) for b in bits[:keep])
    return f"[{shown}{', ...' if len(bits) > keep else ''}]"


# Batches of 0/1 rows may come in any real dtype (uint8 when unpacked from bits); the math is float64.
Batch = npt.NDArray[Any]
ROWS_PER_BLOCK = 1024


def affine(x: Batch, weight: Array, bias: Array) -> Array:
    """x @ weight + bias in float64, a block of ROWS_PER_BLOCK rows at a time.

    A compact batch is never copied to float64 whole (10,000 x 784 would take 63 MB; a block takes
    6.4 MB), and every batch is blocked the same way, so a row's numbers never depend on how the
    batch was sent. A batch of one block is one matmul, with no slices: the loop's numbers, and
    a one-row request ~4% cheaper, measured (bench/paired.py).
    """
    n = x.shape[0]
    if n <= ROWS_PER_BLOCK:  # one block: the batch itself
        h: Array = np.matmul(x.astype(np.float64, copy=False), weight)  # (n, d) @ (d, k) -> (n, k)
        h += bias
        return h
    h = np.empty((n, weight.shape[1]))  # (n, k)
    for start in range(0, n, ROWS_PER_BLOCK):
        block = x[start : start + ROWS_PER_BLOCK].astype(np.float64, copy=False)  # (b, d)
        np.matmul(block, weight, out=h[start : start + ROWS_PER_BLOCK])  # (b, d) @ (d, k) -> (b, k)
    h += bias
    return h


def autoencode(model: Model, x: Batch) -> Array:
    """Autoencoder codes relu(x @ W + b) for a batch x of shape (n, d)."""
    h = affine(x, model.ae_weight, model.ae_bias)  # (n, k)
    return np.maximum(h, 0.0, out=h)


def sigmoid(logits: Array) -> Array:
    """1 / (1 + exp(-t)) without overflow for any finite t."""
    return np.exp(-np.logaddexp(0.0, -logits))


def decode(weight: Array | None, bias: Array | None, h: Batch) -> Array:
    """Bit probabilities sigmoid(h @ W_d + b_d) for codes or z of shape (n, k)."""
    if weight is None or bias is None:
        raise ModelError("these weights have no decoder")
    return sigmoid(affine(h, weight, bias))  # (n, k) @ (k, d) -> (n, d)


@dataclass(frozen=True)
class VaeCodes:
    mu: Array  # (n, k)
    log_sigma: Array  # (n, k)
    z: Array  # (n, samples, k)
    kl: Array  # (n,)


def vae_encode(model: Model, x: Batch, samples: int, seed: int | np.random.Generator) -> VaeCodes:
    """mu, log_sigma, z = mu + exp(log_sigma) * eps with eps from default_rng(seed), and KL to N(0, I).

    `seed` may be the generator itself: eps is drawn row after row, so rows encoded in blocks with
    one generator passed through them get the eps of the whole batch encoded at once.
    """
    n, k = x.shape[0], model.latent_dim
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    mu = affine(x, model.mu_weight, model.mu_bias)  # (n, d) @ (d, k) -> (n, k)
    log_sigma = affine(x, model.ls_weight, model.ls_bias)  # (n, d) @ (d, k) -> (n, k)
    sigma = np.exp(log_sigma)  # (n, k), > 0
    eps = rng.standard_normal((n, samples, k))  # (n, s, k)
    z = mu[:, None, :] + sigma[:, None, :] * eps  # (n, 1, k) + (n, 1, k) * (n, s, k) -> (n, s, k)
    kl = 0.5 * np.sum(mu**2 + np.exp(2.0 * log_sigma) - 1.0 - 2.0 * log_sigma, axis=1)  # (n, k) -> (n,)
    return VaeCodes(mu=mu, log_sigma=log_sigma, z=z, kl=kl)
