"""The lowest versions pyproject.toml declares do run the service: a throwaway venv of them, made
with uv (`--resolution lowest-direct`, the otel extra included), runs the server tests.

A floor that does not work is a user's broken install: pip keeps whatever older version it finds
that satisfies the range. This test fails, naming the test that broke, when a change starts using
something newer than a floor admits; raise the floor then."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pytest

from tests.conftest import ROOT

UV = Path(sys.executable).parent / "uv"
SERVER_TESTS = [
    "tests/server/test_protocol.py",
    "tests/server/test_drain.py",
    "tests/server/test_internals.py",
    "tests/web/test_http.py",
    "tests/api/test_routes.py",
    "tests/api/test_v2.py",
    "tests/test_main.py",
    "tests/web/test_proxy.py",
    "tests/server/test_faults.py",
    "tests/web/test_observe.py",
    "tests/server/test_logging.py",
    "tests/server/test_workers.py",
    "tests/api/test_docs.py",
    "tests/web/test_auth.py",
    "tests/core/test_repository.py",
    "tests/core/test_hot_swap.py",
    "tests/server/test_traces.py",  # with the otel extra's floors
    "tests/server/test_transport.py",  # gRPC on h2's floor
]
# What the server tests need besides the service, at versions the lowest runtime ones allow.
TEST_TOOLS = ["pytest", "hypothesis", "python-mimeparse", "tritonclient[http]", "pyyaml"]


def _run(argv: list[str | Path], **options: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=1200, **options)  # type: ignore[call-overload]
    assert result.returncode == 0, f"{argv}\n{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    return result


def _floors() -> dict[str, str]:
    """Each runtime dependency's declared floor, the otel extra's too: {"fastapi": "0.120", ...}."""
    floors = {}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    for requirement in project["dependencies"] + project["optional-dependencies"]["otel"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([0-9.]+)(?:,<[0-9.]+)?", requirement)
        assert match, f"declare {requirement!r} as name>=floor[,<bound]"
        floors[match[1].lower()] = match[2]
    return floors


def test_the_server_tests_pass_on_the_lowest_declared_versions() -> None:
    if not UV.exists():
        pytest.fail("uv is missing: it is a test dependency (uv sync --extra test)")
    with tempfile.TemporaryDirectory(prefix="lowest-") as directory:
        os.chmod(directory, 0o755)  # noqa: S103 - one fault test runs the server as another user
        _lowest(Path(directory))


def _lowest(tmp_path: Path) -> None:
    python = tmp_path / "lowest" / "bin" / "python"
    _run([UV, "venv", "-q", tmp_path / "lowest", "--python", sys.executable])
    _run([UV, "pip", "install", "-q", "--python", python, "--resolution", "lowest-direct", "-e", f"{ROOT}[otel]"])
    installed = {
        name.lower(): version
        for name, version in (
            line.split("==", 1)
            for line in _run([UV, "pip", "freeze", "--python", python]).stdout.splitlines()
            if "==" in line
        )
    }
    for name, floor in _floors().items():  # the floors, to the release: 0.120 is 0.120.0
        assert installed[name].split(".")[: len(floor.split("."))] == floor.split("."), (name, installed[name])
    pins = tmp_path / "pins.txt"
    pins.write_text(
        "".join(f"{name}=={version}\n" for name, version in installed.items() if name != "encoding-service")
    )
    _run([UV, "pip", "install", "-q", "--python", python, "-c", pins, *TEST_TOOLS])
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    # Deprecation warnings of old versions are not failures here; everything else still is.
    argv = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning", *SERVER_TESTS]
    _run(argv, cwd=ROOT, env=env)
