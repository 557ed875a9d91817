"""Startup through `uvicorn service.main:app`: weights from a file, and one-line refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import safetensors.numpy

from service.models import weights
from service.models.encoders import seeded
from tests.conftest import CLEAN_EXIT, ROOT, run_app, server_env, start_server


def _refusal(**settings: str) -> str:
    result = run_app(**settings)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


def _bad_file(tmp_path: Path, name: str, **changes: np.ndarray) -> str:
    arrays = dict(seeded(0, 5, 2).arrays()) | changes
    path = tmp_path / name
    if path.suffix == ".npz":
        np.savez(path, **arrays)
    else:
        safetensors.numpy.save_file(arrays, str(path))
    return str(path)


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda tmp: str(tmp / "absent.safetensors"), "no such file"),
        (lambda tmp: str(tmp), "unknown format"),
        (lambda tmp: _bad_file(tmp, "a.npz", **{"vae.mu.bias": np.zeros(3)}), "has shape (3,), expected (2,)"),
        (lambda tmp: _bad_file(tmp, "b.safetensors", **{"vae.mu.weight": np.full((5, 2), np.nan)}), "non-finite"),
        (
            lambda tmp: _bad_file(tmp, "c.npz", **{"vae.log_sigma.weight": np.full((5, 2), 80.0)}),
            "log_sigma of latent 0 reaches 400 for the input [1, 1, 1, 1, 1]",
        ),
    ],
)
def test_bad_weights_refuse_to_start_with_one_line(tmp_path: Path, make, problem: str) -> None:  # type: ignore[no-untyped-def]
    path = make(tmp_path)
    stderr = _refusal(weights=path)
    lines = [line for line in stderr.splitlines() if f"weights file {path!r}" in line]
    assert len(lines) == 1, stderr
    assert problem in lines[0]


def test_a_missing_array_names_the_array(tmp_path: Path) -> None:
    arrays = dict(seeded(0, 5, 2).arrays())
    del arrays["autoencoder.bias"]
    np.savez(tmp_path / "m.npz", **arrays)
    assert "missing array 'autoencoder.bias'" in _refusal(weights=str(tmp_path / "m.npz"))


@pytest.mark.parametrize(
    ("settings", "words"),
    [
        ({"seed": "abc"}, "ENCODER_SEED: Input should be a valid integer"),
        ({"input_dim": "0"}, "ENCODER_INPUT_DIM: Input should be greater than or equal to 1"),
        ({"max_rows": "-3"}, "ENCODER_MAX_ROWS"),
        ({"input_dim": "1000000", "latent_dim": "1"}, "seeded weights (ENCODER_SEED=0): log_sigma of latent 0"),
    ],
)
def test_bad_settings_refuse_to_start_with_one_line(settings: dict[str, str], words: str) -> None:
    assert words in _refusal(**settings)


def test_dimensions_that_contradict_the_file_refuse(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    weights.save(seeded(0, 5, 2), path)
    assert f"weights file {str(path)!r}: input_dim is 5, but ENCODER_INPUT_DIM is 7" in _refusal(
        weights=str(path), input_dim="7"
    )


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_weights_from_a_file_are_served_with_their_fingerprint(tmp_path: Path, suffix: str) -> None:
    model = seeded(9, 8, 3)
    path = tmp_path / f"pinned{suffix}"
    weights.save(model, path)
    os.chmod(path, 0o444)
    server = start_server(weights=str(path), seed="1")  # the file wins over the seed
    try:
        info = httpx.get(f"{server.url}/v1/model").json()
        assert (info["source"], info["file"], info["seed"]) == ("file", path.name, None)
        assert (info["input_dim"], info["latent_dim"]) == (8, 3)
        assert info["fingerprint"] == model.fingerprint()
        x = [[1, 0, 1, 1, 0, 0, 1, 0]]
        codes = httpx.post(f"{server.url}/v1/autoencoder/encode", json={"inputs": x}).json()["codes"]
        expected = np.maximum(np.array(x) @ model.ae_weight + model.ae_bias, 0)
        np.testing.assert_allclose(codes, expected, rtol=1e-12)
        spec = httpx.get(f"{server.url}/openapi.json").json()
        inputs = spec["components"]["schemas"]["AutoencoderRequest"]["properties"]["inputs"]["anyOf"][0]
        assert inputs["items"]["minItems"] == inputs["items"]["maxItems"] == 8
    finally:
        assert server.stop() in CLEAN_EXIT


def test_importing_the_app_module_reads_configures_and_exits_nothing() -> None:
    """`import service.main` with broken settings: nothing happens until `app` is asked for,
    which is what `uvicorn service.main:app` does."""
    code = (
        "import logging, service.main as m\n"
        "assert 'app' not in vars(m)\n"
        "assert not logging.getLogger('service').handlers\n"
        "print('imported')\n"
        "m.app\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=server_env(seed="-1"), capture_output=True, text=True, timeout=60
    )
    assert result.stdout == "imported\n"
    assert result.returncode == 1
    line = json.loads(result.stderr)  # one JSON line, as the server's log is by default
    assert line["level"] == "error"
    assert line["message"] == "invalid settings: ENCODER_SEED: Input should be greater than or equal to 0"
