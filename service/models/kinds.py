"""Model kinds: what each of a weights file's encoders takes, gives and computes. Pure numpy.

A weights file holds two encoders over one input space, an autoencoder and a VAE. Each is a Kind:
the layers above ask it for its outputs, their shapes, whether it draws samples, and its decoder,
and call `encode`, instead of switching on its name. Adding a kind means adding one here (and its
request and response schemas).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from service.models.encoders import Array, Batch, Model, affine, autoencode, decode, vae_encode

Seed = int | np.random.Generator  # a sampled kind's eps: from default_rng(seed), or from this generator


@dataclass(frozen=True)
class Kind:
    """One encoder of a model: its name, its outputs in order, and how to compute them."""

    name: str
    outputs: tuple[str, ...]
    sampled: bool  # draws `samples` of z per row from a seed
    # (model, x, samples, seed or the generator of eps) -> the outputs by name
    compute: Callable[[Model, Batch, int, Seed], dict[str, Array]]
    # model -> (W_d, b_d) of its decoder, or None
    decoder_of: Callable[[Model], tuple[Array | None, Array | None]]
    # (model, x) -> the code that `reconstruct` decodes: the deterministic one
    code: Callable[[Model, Batch], Array]

    def shapes(self, latent_dim: int) -> dict[str, list[int]]:
        """Each output's shape, -1 where it follows the request (rows, samples)."""
        per_row = {"codes": [-1, latent_dim], "mu": [-1, latent_dim], "log_sigma": [-1, latent_dim]}
        per_row |= {"z": [-1, -1, latent_dim], "kl": [-1]}
        return {name: per_row[name] for name in self.outputs}

    def has_decoder(self, model: Model) -> bool:
        weight, bias = self.decoder_of(model)
        return weight is not None and bias is not None

    def decode(self, model: Model, h: Batch) -> Array:
        """Bit probabilities sigmoid(h @ W_d + b_d) of codes (or z) h; ModelError without a decoder."""
        return decode(*self.decoder_of(model), h)

    def reconstruct(self, model: Model, x: Batch) -> Array:
        """The bit probabilities of each row's own deterministic code."""
        return self.decode(model, self.code(model, x))


def _autoencoder(model: Model, x: Batch, _samples: int, _seed: Seed) -> dict[str, Array]:
    return {"codes": autoencode(model, x)}


def _vae(model: Model, x: Batch, samples: int, seed: Seed) -> dict[str, Array]:
    out = vae_encode(model, x, samples, seed)
    return {"mu": out.mu, "log_sigma": out.log_sigma, "z": out.z, "kl": out.kl}


AUTOENCODER = Kind(
    name="autoencoder",
    outputs=("codes",),
    sampled=False,
    compute=_autoencoder,
    decoder_of=lambda model: (model.ae_decoder_weight, model.ae_decoder_bias),
    code=autoencode,
)
VAE = Kind(
    name="vae",
    outputs=("mu", "log_sigma", "z", "kl"),
    sampled=True,
    compute=_vae,
    decoder_of=lambda model: (model.vae_decoder_weight, model.vae_decoder_bias),
    code=lambda model, x: affine(x, model.mu_weight, model.mu_bias),  # mu: the posterior mean
)
KINDS: dict[str, Kind] = {kind.name: kind for kind in (AUTOENCODER, VAE)}
