"""The project's own checks, so that the README's one test command runs them all."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

BIN = Path(sys.executable).parent


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    tool = shutil.which(argv[0], path=str(BIN)) or shutil.which(argv[0])
    assert tool, f"{argv[0]} is not installed: uv sync --extra test (README)"
    return subprocess.run([tool, *argv[1:]], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "argv",
    [
        ("ruff", "check", "."),
        ("ruff", "format", "--check", "."),
        ("mypy",),
        ("hadolint", "Dockerfile"),  # the image itself is built and run in a later suite
    ],
    ids=" ".join,
)
def test_check_passes(argv: tuple[str, ...]) -> None:
    result = _run(*argv)
    assert result.returncode == 0, result.stdout + result.stderr
