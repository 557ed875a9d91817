"""Training: gradients against finite differences, learning on clustered bits, determinism, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from service.models import weights
from service.models.encoders import Model, autoencode, vae_encode
from service.models.train import ae_loss, load_data, train, vae_loss
from tests.conftest import ROOT, server_env


def clustered(
    rows: int, width: int = 64, clusters: int = 4, flip: float = 0.05, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Prototype bit patterns with a share of bits flipped, and each row's cluster."""
    rng = np.random.default_rng(seed)
    prototypes = rng.integers(0, 2, size=(clusters, width))
    labels = rng.integers(0, clusters, size=rows)
    return (prototypes[labels] ^ (rng.random((rows, width)) < flip)).astype(np.uint8), labels


def nearest_neighbour_accuracy(points: np.ndarray, labels: np.ndarray) -> float:
    distances = ((points[:, None, :] - points[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    return float(np.mean(labels[distances.argmin(axis=1)] == labels))


def _numeric_gradient(loss, params: dict[str, np.ndarray], name: str, step: float = 1e-6) -> np.ndarray:  # type: ignore[no-untyped-def]
    gradient = np.zeros_like(params[name])
    for index in np.ndindex(params[name].shape):
        original = params[name][index]
        params[name][index] = original + step
        up = loss(params)
        params[name][index] = original - step
        down = loss(params)
        params[name][index] = original
        gradient[index] = (up - down) / (2 * step)
    return gradient


def test_autoencoder_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(1)
    x = rng.integers(0, 2, size=(7, 6)).astype(np.float64)
    params = {
        "W": rng.normal(size=(6, 3)),
        "b": rng.normal(size=3) + 0.5,
        "W_d": rng.normal(size=(3, 6)),
        "b_d": rng.normal(size=6),
    }
    _, grads = ae_loss(params, x)
    for name in params:
        numeric = _numeric_gradient(lambda p: ae_loss(p, x)[0], params, name)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-7, err_msg=name)


def test_vae_gradients_match_finite_differences() -> None:
    rng = np.random.default_rng(2)
    x = rng.integers(0, 2, size=(5, 6)).astype(np.float64)
    eps = rng.standard_normal((5, 2))
    params = {name: rng.normal(size=shape) * 0.5 for name, shape in (
        ("W_mu", (6, 2)), ("b_mu", (2,)), ("W_ls", (6, 2)), ("b_ls", (2,)), ("W_d", (2, 6)), ("b_d", (6,)),
    )}  # fmt: skip
    _, grads = vae_loss(params, x, eps)
    for name in params:
        numeric = _numeric_gradient(lambda p: vae_loss(p, x, eps)[0], params, name)
        np.testing.assert_allclose(grads[name], numeric, rtol=1e-5, atol=1e-7, err_msg=name)


def test_training_learns_clustered_bits() -> None:
    """Measured over seeds 0 to 6 on this data: held-out bit accuracy 0.895-0.928 (autoencoder) and
    0.909-0.915 (VAE; 5% of bits are flipped at random, so about 0.95 is the ceiling), and 1-NN
    cluster accuracy of 1.0 on both latent spaces. The thresholds leave room below those."""
    x, labels = clustered(2000)
    model, report = train(x, seed=0)
    assert report["held_out_accuracy"]["autoencoder"] >= 0.87
    assert report["held_out_accuracy"]["vae"] >= 0.88
    assert report["held_out_rows"] == 200
    assert report["vae"]["held_out_loss"][report["vae"]["best_epoch"] - 1] == min(report["vae"]["held_out_loss"])
    assert report["held_out_kl"] > 0
    sample, sample_labels = x[:600].astype(np.float64), labels[:600]
    assert nearest_neighbour_accuracy(autoencode(model, sample), sample_labels) >= 0.95
    assert nearest_neighbour_accuracy(vae_encode(model, sample, 1, 0).mu, sample_labels) >= 0.95
    assert model.has_decoders


def test_the_same_data_and_seed_give_the_same_weights_bit_for_bit() -> None:
    x, _ = clustered(300, width=16)
    first, _ = train(x, seed=4, epochs=5)
    again, _ = train(x, seed=4, epochs=5)
    other, _ = train(x, seed=5, epochs=5)
    for name, value in first.arrays().items():
        np.testing.assert_array_equal(value, again.arrays()[name])
    assert first.fingerprint() == again.fingerprint() != other.fingerprint()


def test_trained_weights_round_trip_with_their_decoders(tmp_path: Path) -> None:
    x, _ = clustered(200, width=12)
    model, _ = train(x, seed=0, epochs=3)
    for suffix in (".npz", ".safetensors"):
        weights.save(model, tmp_path / f"w{suffix}")
        loaded = weights.load(tmp_path / f"w{suffix}")
        assert loaded.fingerprint() == model.fingerprint()
        assert loaded.has_decoders
    arrays = dict(model.arrays())
    del arrays["vae.decoder.bias"]
    with pytest.raises(ValueError, match=r"missing array 'vae\.decoder\.bias'"):
        Model.from_arrays(arrays)


@pytest.mark.parametrize("suffix", [".npy", ".npz", ".csv"])
def test_data_files_load_and_bad_ones_are_refused(tmp_path: Path, suffix: str) -> None:
    x, _ = clustered(20, width=8)
    path = tmp_path / f"rows{suffix}"
    if suffix == ".npy":
        np.save(path, x)
    elif suffix == ".npz":
        np.savez(path, x=x)
    else:
        path.write_text(",".join(f"f{i}" for i in range(8)) + "\n" + "\n".join(",".join(map(str, row)) for row in x))
    np.testing.assert_array_equal(load_data(path), x)
    np.save(tmp_path / "bad.npy", np.array([[0, 2]]))
    with pytest.raises(ValueError, match="every value must be 0 or 1"):
        load_data(tmp_path / "bad.npy")


def test_the_cli_trains_reports_and_plots(tmp_path: Path) -> None:
    x, labels = clustered(400, width=16)
    np.save(tmp_path / "rows.npy", x)
    (tmp_path / "labels.txt").write_text("\n".join(f"c{label}" for label in labels))
    out = tmp_path / "trained.safetensors"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "service.cli", *args]
        return subprocess.run(argv, cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=300)

    trained = cli("train", str(tmp_path / "rows.npy"), "--out", str(out), "--epochs", "20", "--seed", "3")
    assert trained.returncode == 0, trained.stderr
    assert "[" in trained.stderr
    assert "autoencoder epoch" in trained.stderr
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["fingerprint"] == weights.load(out).fingerprint()
    assert report["rows_per_second"] > 0
    assert "held-out bit accuracy" in trained.stdout
    picture = tmp_path / "latent.png"
    plotted = cli(
        "plot",
        str(tmp_path / "rows.npy"),
        "--weights",
        str(out),
        "--out",
        str(picture),
        "--labels",
        str(tmp_path / "labels.txt"),
    )
    assert plotted.returncode == 0, plotted.stderr
    assert picture.read_bytes().startswith(b"\x89PNG")
    bad = cli("train", str(tmp_path / "missing.npy"), "--out", str(out))
    assert bad.returncode == 1
    assert "missing.npy" in bad.stderr
