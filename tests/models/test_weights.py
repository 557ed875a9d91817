"""Weights files: both formats round-trip, share a fingerprint, and bad files are refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from service.models import weights
from service.models.encoders import seeded


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_round_trip_keeps_every_bit(tmp_path: Path, suffix: str) -> None:
    model = seeded(5, 7, 3)
    path = tmp_path / f"w{suffix}"
    weights.save(model, path)
    loaded = weights.load(path)
    for name, value in model.arrays().items():
        np.testing.assert_array_equal(loaded.arrays()[name], value)
    assert loaded.fingerprint() == model.fingerprint()


def test_formats_share_the_fingerprint_and_float32_files_load(tmp_path: Path) -> None:
    model = seeded(1, 5, 2)
    float32 = {name: value.astype(np.float32) for name, value in model.arrays().items()}
    np.savez(tmp_path / "a.npz", **float32)
    safetensors.numpy.save_file(float32, str(tmp_path / "a.safetensors"))
    a, b = weights.load(tmp_path / "a.npz"), weights.load(tmp_path / "a.safetensors")
    assert a.fingerprint() == b.fingerprint() != model.fingerprint()
    np.testing.assert_allclose(a.ae_weight, model.ae_weight, rtol=1e-6)


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        safetensors.numpy.save_file(arrays, str(path))


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda a: a.pop("vae.mu.bias"), "missing array 'vae.mu.bias'"),
        (lambda a: a.update({"vae.mu.bias": np.zeros(4)}), "array 'vae.mu.bias' has shape (4,), expected (2,)"),
        (lambda a: a.update({"autoencoder.bias": np.array([0.0, np.inf])}), "non-finite value inf at [1]"),
        (lambda a: a.update({"vae.log_sigma.bias": np.array([400.0, 0.0])}), "exp(2 * log_sigma) overflows"),
    ],
)
def test_bad_arrays_are_refused_naming_file_and_problem(tmp_path: Path, suffix: str, edit, problem: str) -> None:  # type: ignore[no-untyped-def]
    arrays = dict(seeded(0, 5, 2).arrays())
    edit(arrays)
    path = tmp_path / f"bad{suffix}"
    _save_arrays(path, arrays)
    with pytest.raises(weights.WeightsError) as error:
        weights.load(path)
    message = str(error.value)
    assert message.startswith(f"weights file {str(path)!r}: ")
    assert problem in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("w.npz", b"not a zip", "not a valid .npz file (a .npz is a zip archive of arrays, and this is no zip)"),
        ("w.npz", b"", "not a valid .npz file (a .npz is a zip archive of arrays, and this is no zip)"),
        ("w.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage", "not a valid .safetensors file"),
        ("w.safetensors", b"", "not a valid .safetensors file"),
        ("w.pt", b"", "unknown format '.pt', expected one of .npz, .safetensors"),
        ("w", b"", "unknown format '(no extension)'"),
    ],
)
def test_unreadable_content_is_refused(tmp_path: Path, name: str, content: bytes, problem: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(weights.WeightsError, match=problem.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        weights.load(path)
    with pytest.raises(weights.WeightsError) as error:
        weights.load(path)
    assert "pickle" not in str(error.value)


def test_missing_file_directory_and_permission_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(weights.WeightsError, match="no such file"):
        weights.load(tmp_path / "absent.npz")
    (tmp_path / "dir.npz").mkdir()
    with pytest.raises(weights.WeightsError, match="is a directory"):
        weights.load(tmp_path / "dir.npz")
    path = tmp_path / "locked.npz"
    weights.save(seeded(0, 5, 2), path)

    def refuse(self: Path) -> bytes:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", refuse)  # root reads any file, so the refusal is simulated
    with pytest.raises(weights.WeightsError, match=r"cannot be read \(Permission denied\)"):
        weights.load(path)


def test_pickled_npz_is_not_unpickled(tmp_path: Path) -> None:
    arrays: dict[str, np.ndarray] = dict(seeded(0, 5, 2).arrays())
    arrays["vae.mu.bias"] = np.array([{"a": 1}, None], dtype=object)
    np.savez(tmp_path / "p.npz", **arrays)
    with pytest.raises(weights.WeightsError, match=r"not a valid \.npz file"):
        weights.load(tmp_path / "p.npz")
