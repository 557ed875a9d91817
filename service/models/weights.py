"""Weights files: .npz and .safetensors, chosen by extension, holding the arrays in model.ARRAY_NAMES."""

from __future__ import annotations

import io
from pathlib import Path
from types import ModuleType

import numpy as np

from service.models.encoders import Model, ModelError

FORMATS = (".npz", ".safetensors")


class WeightsError(Exception):
    """A weights file that cannot be served; the message names the file and the problem, on one line."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"weights file {str(path)!r}: {problem}")
        self.path = path
        self.problem = problem


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise WeightsError(
            path, f"unknown format {path.suffix or '(no extension)'!r}, expected one of {', '.join(FORMATS)}"
        )
    return suffix


def safetensors() -> ModuleType:
    """safetensors.numpy, imported on first use: a service that never meets the format does without
    it (about 1 MiB of memory)."""
    import safetensors.numpy

    return safetensors.numpy


def load(path: Path) -> Model:
    """Read and check a model; raise WeightsError naming the file and the problem."""
    suffix = _suffix(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise WeightsError(path, "no such file") from None
    except IsADirectoryError:
        raise WeightsError(path, "is a directory, not a file") from None
    except OSError as exc:
        raise WeightsError(path, f"cannot be read ({exc.strerror or exc})") from None
    if suffix == ".npz" and not data.startswith(b"PK"):  # numpy's own message speaks of pickles
        raise WeightsError(path, "not a valid .npz file (a .npz is a zip archive of arrays, and this is no zip)")
    try:
        if suffix == ".npz":
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
        else:
            arrays = safetensors().load(data)
    except Exception as exc:  # noqa: BLE001 - corrupt archives raise many kinds; each becomes one line
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(path, f"not a valid {suffix} file ({detail})") from None
    try:
        return Model.from_arrays(arrays)
    except ModelError as exc:
        raise WeightsError(path, str(exc)) from None


def save(model: Model, path: Path) -> None:
    """Write a model's arrays as float64 to a .npz or .safetensors file."""
    suffix = _suffix(path)
    arrays = {name: np.ascontiguousarray(value, dtype="<f8") for name, value in model.arrays().items()}
    if suffix == ".npz":
        with path.open("wb") as file:
            np.savez(file, allow_pickle=False, **arrays)
    else:
        safetensors().save_file(arrays, str(path))
