"""ENCODER_LOG_FORMAT: in json mode every line a process writes is one JSON object (uvicorn's own
included, tracebacks in one field); in text mode, lines for a terminal."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from tests.conftest import ROOT, Server, free_port, server_env, start_server

SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
FIELDS = {"time", "level", "logger", "message"}


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(record, dict)
        assert record.keys() >= FIELDS, line
        lines.append(record)
    return lines


def _stopped(server: Server) -> str:
    """Everything the server wrote (stdout and stderr), once it has exited on SIGTERM."""
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0
    output = server.output()
    server.stop()
    return output


@pytest.mark.parametrize("workers", ["1", "2"])
def test_json_mode_writes_only_json_lines_uvicorns_included(workers: str) -> None:
    server = start_server(SERVE, stdout=True, log_format="json", workers=workers)
    try:
        httpx.post(f"{server.url}/v1/vae/encode", json={"inputs": [[0, 1, 1, 0, 1]]})
        httpx.get(f"{server.url}/no/such/path")
        records = _json_lines(_stopped(server))
    finally:
        server.stop()
    messages = [record["message"] for record in records]
    assert any(message.startswith("Started server process") for message in messages)
    assert any(message.startswith("Finished server process") for message in messages)
    paths = [r["path"] for r in records if r["logger"] == "service.access" and r["path"] != "/readyz"]
    # One worker writes its lines in the order it answered; two write theirs each in batches
    # (RequestLog), which interleave in either order.
    in_order = paths if workers == "1" else sorted(paths, key=["/v1/vae/encode", "/no/such/path"].index)
    assert in_order == ["/v1/vae/encode", "/no/such/path"]
    assert {r["logger"] for r in records} >= {"uvicorn.error", "service.access"}


def test_json_mode_startup_errors_are_json_lines(tmp_path: Path) -> None:
    argv = [part.replace("{port}", str(free_port())) for part in SERVE]
    env = server_env(weights=str(tmp_path / "missing.safetensors"), log_format="json")
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    records = _json_lines(result.stdout + result.stderr)
    assert any("missing.safetensors" in record["message"] for record in records)


def test_text_mode_writes_lines_for_a_terminal() -> None:
    server = start_server(SERVE, stdout=True, log_format="text")
    try:
        row = {"inputs": [[0, 1, 1, 0, 1]]}
        httpx.post(f"{server.url}/v1/autoencoder/encode", json=row, headers={"x-request-id": "t-1"})
        output = _stopped(server)
    finally:
        server.stop()
    assert "INFO:     Started server process" in output
    access = [line for line in output.splitlines() if "service.access" in line and "/readyz" not in line]
    assert len(access) == 1
    assert 'request_id=t-1 "POST" "/v1/autoencoder/encode" 200 ' in access[0]
    assert not access[0].startswith("{")


def test_a_traceback_goes_into_one_field(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(*_: Any) -> Any:
        raise RuntimeError("a bug in the model code")

    with TestClient(create_app(Settings(log_format="json")), raise_server_exceptions=False) as client:
        monkeypatch.setattr("service.models.kinds.autoencode", broken)  # after the warm-up
        assert client.post("/v1/autoencoder/encode", json={"inputs": [[0, 1, 1, 0, 1]]}).status_code == 500
    errors = [r for r in _json_lines(capsys.readouterr().out) if r["level"] == "error"]
    assert len(errors) == 1
    assert errors[0]["exception"].startswith("Traceback (most recent call last):")
    assert "RuntimeError: a bug in the model code" in errors[0]["exception"]
