"""The command line: seeded weights files and the spec export."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main
from service.models import weights
from service.models.encoders import seeded
from tests.conftest import ROOT, server_env


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_weights_command_writes_the_seeded_model(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / f"w{suffix}"
    assert main(["weights", str(out), "--seed", "4", "--input-dim", "6", "--latent-dim", "3"]) == 0
    expected = seeded(4, 6, 3)
    assert weights.load(out).fingerprint() == expected.fingerprint()
    assert expected.fingerprint() in capsys.readouterr().out


def test_weights_command_refuses_an_unknown_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["weights", str(tmp_path / "w.pt")]) == 1
    assert "unknown format '.pt'" in capsys.readouterr().err


def test_openapi_check_passes_on_the_committed_spec_and_fails_on_drift(tmp_path: Path) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "service.cli", "openapi", *args]
        return subprocess.run(argv, cwd=ROOT, env=server_env(), capture_output=True, text=True, timeout=60)

    assert run("--check").returncode == 0
    stale = tmp_path / "openapi.json"
    stale.write_text("{}\n")
    result = run("--check", "--out", str(stale))
    assert result.returncode == 1
    assert "out of date" in result.stderr
    assert run("--out", str(stale)).returncode == 0
    assert stale.read_text() == (ROOT / "openapi/openapi.json").read_text()


def test_invalid_settings_are_one_line(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "service.cli", "weights", str(tmp_path / "w.npz")]
    result = subprocess.run(argv, cwd=ROOT, env=server_env(latent_dim="zero"), capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "ENCODER_LATENT_DIM" in result.stderr
