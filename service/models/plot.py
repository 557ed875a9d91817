"""Both latent spaces side by side: the autoencoder's codes, and the VAE's means with samples of z."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from service.models import weights
from service.models.encoders import Array, autoencode, vae_encode
from service.models.train import load_data


def load_labels(path: Path, rows: int) -> npt.NDArray[np.str_]:
    if path.suffix == ".npy":
        labels = np.load(path, allow_pickle=False)
    else:  # text or CSV: one label a line
        labels = np.array([line.strip() for line in path.read_text().splitlines() if line.strip()])
    labels = np.asarray(labels).astype(str).ravel()
    if len(labels) != rows:
        raise ValueError(f"{path}: {len(labels)} labels for {rows} rows")
    return labels


def to_2d(points: Array, basis: Array | None = None) -> tuple[Array, Array]:
    """Points in 2-D: as they are if 2-D already, else on their first two principal axes."""
    if points.shape[1] <= 2:
        return np.pad(points, ((0, 0), (0, 2 - points.shape[1]))), np.eye(2)
    centred = points - points.mean(axis=0)
    if basis is None:
        basis = np.linalg.svd(centred, full_matrices=False)[2][:2].T  # (k, 2)
    return centred @ basis, basis


def plot(data: Path, weights_path: Path, out: Path, *, labels: Path | None, samples: int, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = load_data(data).astype(np.float64)
    model = weights.load(weights_path)
    if x.shape[1] != model.input_dim:
        raise ValueError(f"{data}: rows have {x.shape[1]} values, but the weights' input_dim is {model.input_dim}")
    names = load_labels(labels, len(x)) if labels else np.full(len(x), "rows")
    codes, _ = to_2d(autoencode(model, x))
    vae = vae_encode(model, x, samples, seed)
    mu, basis = to_2d(vae.mu)
    z, _ = to_2d(vae.z.reshape(-1, model.latent_dim), basis if model.latent_dim > 2 else None)
    axis_note = "" if model.latent_dim <= 2 else " (first two principal axes)"
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 5.5), constrained_layout=True)
    colours = plt.get_cmap("tab10")
    for index, name in enumerate(np.unique(names)):
        rows = names == name
        colour = colours(index % 10)
        left.scatter(codes[rows, 0], codes[rows, 1], s=8, alpha=0.6, color=colour, label=name)
        right.scatter(z[np.repeat(rows, samples), 0], z[np.repeat(rows, samples), 1], s=3, alpha=0.15, color=colour)
        right.scatter(mu[rows, 0], mu[rows, 1], s=10, alpha=0.9, color=colour, edgecolors="black", linewidths=0.2)
    left.set_title(f"Autoencoder codes relu(xW + b){axis_note}")
    right.set_title(f"VAE: mu (outlined) and {samples} samples of z per row{axis_note}")
    for panel in (left, right):
        panel.set_xlabel("latent 1")
        panel.set_ylabel("latent 2")
        panel.grid(alpha=0.3)
    if labels:
        left.legend(markerscale=2, fontsize=8)
    figure.suptitle(f"{len(x)} rows of {data.name}, weights {model.fingerprint()[:19]}")
    figure.savefig(out, dpi=100)
    plt.close(figure)
