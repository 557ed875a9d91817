"""Training both models on a file of binary rows, in numpy: mini-batches, Adam, early stopping.

- Autoencoder: h = relu(x @ W + b) (the served encoder), p = sigmoid(h @ W_d + b_d), loss = binary
  cross-entropy of p against x, summed over bits, averaged over rows.
- VAE: mu, log_sigma as served, z = mu + exp(log_sigma) * eps, p = sigmoid(z @ W_d + b_d),
  loss = binary cross-entropy + KL(N(mu, sigma^2) || N(0, I)).
Gradients are written out by hand (tests check them against finite differences). The same data
and seed give the same weights bit for bit. The result is a weights file the service loads,
with decoders, and still passes its load-time overflow proof.
"""

from __future__ import annotations

import csv
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from service.models.encoders import Array, Model, ModelError, autoencode, decode, seeded, sigmoid, vae_encode

Params = dict[str, Array]


def load_data(path: Path) -> npt.NDArray[np.uint8]:
    """Rows of 0/1 values from .npy, .npz (its only array, or `x`) or CSV (a header row is skipped)."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        data = np.load(path, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            names = archive.files
            if len(names) != 1 and "x" not in names:
                raise ValueError(f"{path}: holds {', '.join(names)}; name the rows 'x'")
            data = archive["x" if "x" in names else names[0]]
    elif suffix == ".csv":
        with path.open(newline="") as file:
            rows = [row for row in csv.reader(file) if row]
        if rows and not all(cell.strip() in ("0", "1") for cell in rows[0]):
            rows = rows[1:]  # a header
        data = np.array([[cell.strip() for cell in row] for row in rows]).astype(np.float64)
    else:
        raise ValueError(f"{path}: unknown format {path.suffix!r}, expected .npy, .npz or .csv")
    data = np.asarray(data)
    if data.ndim != 2 or 0 in data.shape:
        raise ValueError(f"{path}: expected rows of 0/1 values, got an array of shape {data.shape}")
    if not np.isin(data, (0, 1)).all():
        raise ValueError(f"{path}: every value must be 0 or 1")
    return data.astype(np.uint8)


def bce(logits: Array, x: Array) -> float:
    """Binary cross-entropy of sigmoid(logits) against x, summed over bits, averaged over rows."""
    return float(np.sum(np.logaddexp(0.0, logits) - x * logits) / len(x))


def ae_loss(p: Params, x: Array) -> tuple[float, Params]:
    """The autoencoder's loss and its gradients."""
    n = len(x)
    pre = x @ p["W"] + p["b"]  # (n, d) @ (d, k) -> (n, k)
    h = np.maximum(pre, 0.0)
    logits = h @ p["W_d"] + p["b_d"]  # (n, k) @ (k, d) -> (n, d)
    dlogits = (sigmoid(logits) - x) / n
    dh = (dlogits @ p["W_d"].T) * (pre > 0)
    grads = {"W": x.T @ dh, "b": dh.sum(0), "W_d": h.T @ dlogits, "b_d": dlogits.sum(0)}
    return bce(logits, x), grads


def vae_loss(p: Params, x: Array, eps: Array) -> tuple[float, Params]:
    """The VAE's loss (reconstruction of one reparameterized sample, plus KL) and its gradients."""
    n = len(x)
    mu = x @ p["W_mu"] + p["b_mu"]  # (n, k)
    log_sigma = x @ p["W_ls"] + p["b_ls"]  # (n, k)
    sigma = np.exp(log_sigma)
    z = mu + sigma * eps  # (n, k)
    logits = z @ p["W_d"] + p["b_d"]  # (n, d)
    kl = 0.5 * np.sum(mu**2 + sigma**2 - 1.0 - 2.0 * log_sigma) / n
    dlogits = (sigmoid(logits) - x) / n
    dz = dlogits @ p["W_d"].T
    dmu = dz + mu / n
    dls = dz * sigma * eps + (sigma**2 - 1.0) / n
    grads = {
        "W_mu": x.T @ dmu,
        "b_mu": dmu.sum(0),
        "W_ls": x.T @ dls,
        "b_ls": dls.sum(0),
        "W_d": z.T @ dlogits,
        "b_d": dlogits.sum(0),
    }
    return bce(logits, x) + float(kl), grads


@dataclass
class Adam:
    """Adam with the usual defaults, over a dict of arrays, in place."""

    lr: float = 0.01
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    step: int = 0
    moments: dict[str, tuple[Array, Array]] = field(default_factory=dict)

    def update(self, params: Params, grads: Params) -> None:
        self.step += 1
        for name, grad in grads.items():
            m, v = self.moments.get(name, (np.zeros_like(grad), np.zeros_like(grad)))
            m = self.beta1 * m + (1 - self.beta1) * grad
            v = self.beta2 * v + (1 - self.beta2) * grad**2
            self.moments[name] = (m, v)
            m_hat = m / (1 - self.beta1**self.step)
            v_hat = v / (1 - self.beta2**self.step)
            params[name] -= self.lr * m_hat / (np.sqrt(v_hat) + self.eps)


@dataclass
class Fit:
    """How one model's training went."""

    train_loss: list[float] = field(default_factory=list)
    held_out_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0


def _fit(
    name: str,
    params: Params,
    loss: Callable[[Params, Array, np.random.Generator], tuple[float, Params]],
    train: Array,
    held_out: Array,
    rng: np.random.Generator,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    patience: int,
    progress: Callable[[str], None],
    after_epoch: Callable[[Params, Array], None] = lambda params, train: None,
) -> Fit:
    """Mini-batch Adam; keeps the parameters of the epoch with the best held-out loss."""
    adam, fit = Adam(lr=lr), Fit()
    best, best_params, waited = math.inf, {k: v.copy() for k, v in params.items()}, 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(train))
        total = 0.0
        for start in range(0, len(train), batch_size):
            batch = train[order[start : start + batch_size]]
            value, grads = loss(params, batch, rng)
            adam.update(params, grads)
            total += value * len(batch)
        after_epoch(params, train)
        fit.train_loss.append(total / len(train))
        fit.held_out_loss.append(loss(params, held_out, np.random.default_rng(0))[0])
        progress(
            f"{name} epoch {epoch:3d}/{epochs}: loss {fit.train_loss[-1]:.4f}, held out {fit.held_out_loss[-1]:.4f}"
        )
        if fit.held_out_loss[-1] < best - 1e-6:
            best, best_params, waited, fit.best_epoch = (
                fit.held_out_loss[-1],
                {k: v.copy() for k, v in params.items()},
                0,
                epoch,
            )
        else:
            waited += 1
            if waited >= patience:
                progress(f"{name}: no better held-out loss for {patience} epochs, stopping at epoch {fit.best_epoch}")
                break
    params.update(best_params)
    return fit


def revive_dead_units(params: Params, train: Array) -> None:
    """A ReLU unit that is 0 for (nearly) every training row gets (nearly) no gradient and stays
    dead, losing a latent dimension. A unit that fires for fewer than 5% of the rows gets its bias
    raised until it fires for the tenth of them it is closest to firing on."""
    pre = train @ params["W"] + params["b"]  # (n, k)
    dead = (pre > 0).mean(axis=0) < 0.05
    if dead.any():
        params["b"][dead] += 0.1 - np.quantile(pre[:, dead], 0.9, axis=0)


def reconstruction_accuracy(model: Model, x: Array) -> dict[str, float]:
    """Share of bits each model gets right, decoding the autoencoder's codes and the VAE's mu."""
    codes = autoencode(model, x)
    mu = vae_encode(model, x, 1, 0).mu
    ae = decode(model.ae_decoder_weight, model.ae_decoder_bias, codes) > 0.5
    vae = decode(model.vae_decoder_weight, model.vae_decoder_bias, mu) > 0.5
    return {"autoencoder": float(np.mean(ae == x)), "vae": float(np.mean(vae == x))}


def train(
    data: npt.NDArray[Any],
    *,
    latent_dim: int = 2,
    seed: int = 0,
    epochs: int = 200,
    batch_size: int = 128,
    lr: float = 0.003,
    held_out: float = 0.1,
    patience: int = 10,
    progress: Callable[[str], None] = lambda line: None,
) -> tuple[Model, dict[str, Any]]:
    """Both models fitted to rows of 0/1 values; the model and a report (losses, accuracy, KL, time).
    ValueError for options no training can honour (the command line refuses them first)."""
    for name, value, ok in [
        ("held_out", held_out, 0 < held_out < 1),
        ("epochs", epochs, epochs >= 1),
        ("batch_size", batch_size, batch_size >= 1),
        ("patience", patience, patience >= 1),
        ("latent_dim", latent_dim, latent_dim >= 1),
        ("lr", lr, 0 < lr <= 1),
    ]:
        if not ok:
            raise ValueError(f"{name} {value!r} is out of range")
    began = time.perf_counter()
    x = np.asarray(data, dtype=np.float64)
    n, d = x.shape
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    cut = n - max(1, round(n * held_out)) if n > 1 else n
    train_x, held_x = x[order[:cut]], x[order[cut:]] if cut < n else x[order[:1]]
    start = seeded(seed, d, latent_dim)  # the served encoders' own seeded start, then decoders
    scale = 1 / math.sqrt(latent_dim)
    # A positive bias starts every ReLU unit alive: with few latents a dead one loses a dimension.
    ae: Params = {"W": start.ae_weight.copy(), "b": np.ones(latent_dim)}
    ae |= {"W_d": rng.standard_normal((latent_dim, d)) * scale, "b_d": np.zeros(d)}
    vae: Params = {"W_mu": start.mu_weight.copy(), "b_mu": start.mu_bias.copy()}
    vae |= {"W_ls": start.ls_weight.copy(), "b_ls": start.ls_bias.copy()}
    vae |= {"W_d": rng.standard_normal((latent_dim, d)) * scale, "b_d": np.zeros(d)}
    fit = functools.partial(_fit, epochs=epochs, batch_size=batch_size, lr=lr, patience=patience, progress=progress)
    ae_fit = fit("autoencoder", ae, lambda p, b, _: ae_loss(p, b), train_x, held_x, rng, after_epoch=revive_dead_units)
    vae_fit = fit(
        "vae", vae, lambda p, b, r: vae_loss(p, b, r.standard_normal((len(b), latent_dim))), train_x, held_x, rng
    )
    try:
        model = Model.from_arrays(
            {
                "autoencoder.weight": ae["W"], "autoencoder.bias": ae["b"],
                "autoencoder.decoder.weight": ae["W_d"], "autoencoder.decoder.bias": ae["b_d"],
                "vae.mu.weight": vae["W_mu"], "vae.mu.bias": vae["b_mu"],
                "vae.log_sigma.weight": vae["W_ls"], "vae.log_sigma.bias": vae["b_ls"],
                "vae.decoder.weight": vae["W_d"], "vae.decoder.bias": vae["b_d"],
            }
        )  # fmt: skip
    except ModelError as exc:
        raise ModelError(f"the trained weights cannot be served: {exc}") from None
    seconds = time.perf_counter() - began
    report = {
        "rows": n,
        "input_dim": d,
        "latent_dim": latent_dim,
        "seed": seed,
        "held_out_rows": len(held_x),
        "autoencoder": {
            "loss": ae_fit.train_loss,
            "held_out_loss": ae_fit.held_out_loss,
            "best_epoch": ae_fit.best_epoch,
        },
        "vae": {"loss": vae_fit.train_loss, "held_out_loss": vae_fit.held_out_loss, "best_epoch": vae_fit.best_epoch},
        "held_out_accuracy": reconstruction_accuracy(model, held_x),
        "held_out_kl": float(np.mean(vae_encode(model, held_x, 1, 0).kl)),
        "seconds": round(seconds, 3),
        "rows_per_second": round(n * (len(ae_fit.train_loss) + len(vae_fit.train_loss)) / seconds),
        "fingerprint": model.fingerprint(),
    }
    return model, report
