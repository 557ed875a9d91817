"""Faults against real processes: slow clients, SIGTERM mid-request, weights changed or unreadable."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.models import weights
from service.models.encoders import seeded
from tests.conftest import ROOT, Server, free_port, read_response, read_until_closed, server_env, start_server

SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
HEAD = b"POST /v1/autoencoder/encode HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def impatient() -> Server:
    server = start_server(SERVE, request_timeout="1", keep_alive_timeout="2")
    yield server  # type: ignore[misc]
    server.stop()


def _label(path: str) -> str:
    """The metrics' route label: a path with parameters goes by its template, so labels stay bounded."""
    return path.replace("/v2/models/autoencoder/", "/v2/models/{model_name}/")


@pytest.mark.parametrize("path", ["/v1/autoencoder/encode", "/v2/models/autoencoder/infer"])
def test_a_trickled_body_gets_408_and_the_connection_is_closed(impatient: Server, path: str) -> None:
    with impatient.connect() as sock:
        began = time.monotonic()
        head = HEAD.replace(b"/v1/autoencoder/encode", path.encode())
        sock.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"inp')
        reply = read_until_closed(sock)  # returns once the server closes the connection
    assert reply.startswith(b"HTTP/1.1 408")
    assert b"did not arrive within 1 s (ENCODER_REQUEST_TIMEOUT)" in reply
    assert (b'{"error":' if path.startswith("/v2") else b'{"detail":') in reply  # each API's shape
    assert 0.9 < time.monotonic() - began < 5
    metrics = httpx.get(f"{impatient.url}/metrics").text  # counted as what the client got
    assert f'encoder_http_requests_total{{method="POST",route="{_label(path)}",status="408"}}' in metrics
    assert "Traceback" not in impatient.output()  # the app's side of it, a body cut short, is no error


@pytest.mark.parametrize("path", ["/v1/autoencoder/encode", "/v2/models/autoencoder/infer"])
def test_a_client_that_leaves_mid_body_is_counted_499_without_a_traceback(impatient: Server, path: str) -> None:
    with impatient.connect() as sock:
        head = HEAD.replace(b"/v1/autoencoder/encode", path.encode())
        sock.sendall(head + b"Content-Length: 100\r\n\r\n" + b'{"inp')
        time.sleep(0.2)  # the app is reading the body
    deadline = time.monotonic() + 5
    label = f'encoder_http_requests_total{{method="POST",route="{_label(path)}",status="499"}}'
    while label not in (metrics := httpx.get(f"{impatient.url}/metrics").text) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert label in metrics
    assert "Traceback" not in impatient.output()


def test_a_late_body_after_a_kept_alive_request_gets_its_own_408(impatient: Server) -> None:
    body = json.dumps({"inputs": [[0, 1, 1, 0, 1]]}).encode()
    whole = HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    with impatient.connect() as sock:
        sock.sendall(whole + HEAD + b"Content-Length: 100\r\n\r\n" + b'{"inp')
        reply = read_until_closed(sock)
    first, _, second = reply.partition(b"HTTP/1.1 408")
    assert first.startswith(b"HTTP/1.1 200")
    assert b'"codes"' in first
    assert b"did not arrive within 1 s" in second


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_timeout(impatient: Server) -> None:
    body = json.dumps({"inputs": [[0, 1, 1, 0, 1]]}).encode()
    whole = HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
    with impatient.connect() as sock:
        sock.sendall(whole)
        assert read_response(sock).startswith(b"HTTP/1.1 200")
        time.sleep(1)  # idle, but within ENCODER_KEEP_ALIVE_TIMEOUT: the connection still serves
        sock.sendall(whole)
        began = time.monotonic()
        reply = read_until_closed(sock)  # then the server closes it, idle for the timeout
    assert reply.startswith(b"HTTP/1.1 200")
    assert reply.endswith(b"}")
    assert 1.9 < time.monotonic() - began < 4


def test_a_body_that_never_starts_gets_408(impatient: Server) -> None:
    with impatient.connect() as sock:
        sock.sendall(HEAD + b"Content-Length: 10\r\n\r\n")
        assert read_until_closed(sock).startswith(b"HTTP/1.1 408")


@pytest.mark.parametrize("sent", [b"", b"POST /v1/autoencoder/encode HTTP/1.1\r\nHost: t\r\n"])
def test_slow_or_missing_headers_get_the_connection_closed(impatient: Server, sent: bytes) -> None:
    with impatient.connect() as sock:
        began = time.monotonic()
        sock.sendall(sent)
        assert read_until_closed(sock) == b""
    assert 0.9 < time.monotonic() - began < 5
    assert httpx.get(f"{impatient.url}/healthz").status_code == 200  # everyone else is still served


def test_sigterm_finishes_the_request_in_flight_then_exits_0() -> None:
    server = start_server(SERVE)
    body = json.dumps({"inputs": [[0, 1, 1, 0, 1]]}).encode()
    with server.connect() as sock:
        sock.sendall(HEAD + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:5])
        time.sleep(0.3)  # the request is in flight: headers read, body arriving
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert server.process.poll() is None  # still waiting for the request to finish
        sock.sendall(body[5:])
        reply = read_until_closed(sock)
    assert reply.startswith(b"HTTP/1.1 200")
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["codes"]
    assert server.process.wait(timeout=10) == 0
    assert "Finished server process" in server.output()
    server.stop()


def test_a_replaced_weights_file_does_not_change_what_is_served(tmp_path: Path) -> None:
    path = tmp_path / "model.npz"
    weights.save(seeded(1, 5, 2), path)
    server = start_server(weights=str(path))
    try:
        before = httpx.get(f"{server.url}/v1/model").json()
        codes = httpx.post(f"{server.url}/v1/autoencoder/encode", json={"inputs": [[1, 1, 0, 1, 1]]}).json()
        weights.save(seeded(2, 5, 2), path)  # replaced under the running server
        after = httpx.get(f"{server.url}/v1/model").json()
        assert after == before
        assert after["fingerprint"] == seeded(1, 5, 2).fingerprint()
        again = httpx.post(f"{server.url}/v1/autoencoder/encode", json={"inputs": [[1, 1, 0, 1, 1]]}).json()
        assert again == codes
    finally:
        server.stop()


def test_an_unreadable_weights_file_refuses_to_start(tmp_path: Path) -> None:
    path = tmp_path / "secret.npz"
    weights.save(seeded(0, 5, 2), path)
    path.chmod(0o000)
    argv = [sys.executable, "-m", "uvicorn", "service.main:app", "--port", str(free_port())]
    if os.geteuid() == 0:
        # Root reads anything through its capabilities to override file permissions: the server
        # runs as root still (so any interpreter, wherever it is installed, runs), without them.
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to test permissions as root"
        argv = [setpriv, "--bounding-set=-dac_override,-dac_read_search", *argv]
    env = server_env(weights=str(path))
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert f"weights file {str(path)!r}: cannot be read (Permission denied)" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
