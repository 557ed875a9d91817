"""The command line: seeded weights files and the spec export."""

from __future__ import annotations

import json
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


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["serve", "--port", "99999"],
            "serve: argument --port: input should be less than or equal to 65535, not '99999'",
        ),
        (["serve", "--port", "-5"], "serve: argument --port: input should be greater than or equal to 0, not '-5'"),
        (["serve", "--workers", "0"], "serve: argument --workers: input should be greater than or equal to 1, not '0'"),
        (["serve", "--workers", "two"], "serve: argument --workers: input should be a valid integer"),
        (["weights", "w.npz", "--latent-dim", "-3"], "weights: argument --latent-dim: input should be greater than"),
        (["weights", "w.npz", "--seed", "-1"], "weights: argument --seed: input should be greater than or equal to 0"),
        (["train", "x.npy", "--out", "w.npz", "--held-out", "1.5"], "train: argument --held-out: must be > 0 and < 1"),
        (["train", "x.npy", "--out", "w.npz", "--held-out", "0"], "train: argument --held-out: must be > 0 and < 1"),
        (["train", "x.npy", "--out", "w.npz", "--held-out", "-0.5"], "train: argument --held-out: must be > 0"),
        (["train", "x.npy", "--out", "w.npz", "--epochs", "0"], "train: argument --epochs: must be >= 1, not '0'"),
        (["train", "x.npy", "--out", "w.npz", "--lr", "nan"], "train: argument --lr: must be > 0 and <= 1"),
        (["train", "x.npy", "--out", "w.npz", "--batch-size", "0"], "train: argument --batch-size: must be >= 1"),
        (["plot", "x.npy", "--weights", "w.npz", "--out", "p.png", "--samples", "0"], "plot: argument --samples"),
        (["weights"], "weights: the following arguments are required: out"),
        (["serve", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
@pytest.mark.parametrize("log_format", ["json", "text"])
def test_every_flag_mistake_is_one_line_and_exit_2(
    argv: list[str], said: str, log_format: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENCODER_LOG_FORMAT", log_format)
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    if argv[0] == "serve" and log_format == "json":  # what a server writes goes to its log collector
        line = json.loads(err)
        assert line["level"] == "error"
        message = line["message"]
    else:
        assert err.startswith("encoding-service: ")
        message = err.removeprefix("encoding-service: ")
    assert said in message, message
    assert "--help" in message


def test_serve_says_a_bad_setting_in_its_log_format(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ENCODER_PORT", "x")
    assert main(["serve"]) == 2
    line = json.loads(capsys.readouterr().err)
    assert line["message"].startswith("invalid settings: ENCODER_PORT: Input should be a valid integer")
    monkeypatch.setenv("ENCODER_LOG_FORMAT", "text")
    assert main(["serve"]) == 2
    assert capsys.readouterr().err.startswith("encoding-service: invalid settings: ENCODER_PORT")
