"""SIGTERM loses nothing: `encoding-service serve` drains (ENCODER_SHUTDOWN_DELAY), then answers
every request that reached it, queued in the listen backlog or unread on an idle connection."""

from __future__ import annotations

import json
import signal
import socket
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from service.client import Client
from tests.conftest import Server, read_response, read_until_closed, start_server

SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
BODY = json.dumps({"inputs": [[0, 1, 1, 0, 1]]}).encode()
WIDE = json.dumps({"inputs": [[1, 0] * 512]}).encode()  # a row of the busy test's model (1024 wide)


def request(path: str = "/v1/autoencoder/encode", body: bytes = BODY) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def busy(server: Server) -> tuple[socket.socket, threading.Thread]:
    """Keep the server's event loop busy for a while with one big VAE answer; a connection whose
    /healthz request went unanswered meanwhile, as proof (it must be answered later)."""
    rows = np.random.default_rng(0).integers(0, 2, size=(4000, 1024))

    def big() -> None:
        with Client(server.url, timeout=120) as client:
            client.vae(rows, samples=16, seed=1)

    thread = threading.Thread(target=big, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        probe = server.connect(timeout=0.2)
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        try:
            read_response(probe)
        except TimeoutError:
            probe.settimeout(60)
            return probe, thread
        probe.close()
    raise AssertionError("the server never got busy")


@pytest.mark.parametrize("delay", ["0", "0.5"])
def test_every_request_that_reached_the_server_before_sigterm_is_answered(delay: str) -> None:
    server = start_server(SERVE, input_dim="1024", latent_dim="256", shutdown_delay=delay)
    try:
        idle = server.connect(timeout=60)  # a keep-alive connection, idle when SIGTERM comes
        idle.sendall(request(body=WIDE))
        assert status(read_response(idle)) == 200
        probe, big = busy(server)
        queued = [server.connect(timeout=60) for _ in range(6)]  # in the listen backlog: not accepted yet
        for sock in queued:
            sock.sendall(request(body=WIDE))
        idle.sendall(request("/v1/vae/encode", WIDE))  # unread on the idle connection
        server.process.send_signal(signal.SIGTERM)
        answers = [read_response(sock) for sock in [probe, *queued, idle]]
        assert [status(answer) for answer in answers] == [200] * 8, answers
        assert json.loads(answers[-1].split(b"\r\n\r\n", 1)[1])["z"]
        for sock in [probe, *queued, idle]:  # then each is closed, cleanly
            assert read_until_closed(sock) == b""
            sock.close()
        big.join(timeout=60)
        assert server.process.wait(timeout=60) == 0
        assert "Traceback" not in server.output()
    finally:
        server.stop()


def test_the_drain_says_not_ready_and_serves_on_then_exits_0() -> None:
    server = start_server(SERVE, shutdown_delay="2")
    try:
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/readyz").status_code == 200
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert client.get("/readyz").json() == {"status": "draining", "fingerprint": None}
            assert client.get("/readyz").status_code == 503
            assert client.get("/v2/health/ready").status_code == 503
            assert client.get("/healthz").status_code == 200  # alive: not to be restarted
            encoded = client.post("/v1/autoencoder/encode", json={"inputs": [[0, 1, 1, 0, 1]]})
            assert encoded.status_code == 200
            assert encoded.headers.get("connection") != "close"  # keep-alive holds through the drain
        with httpx.Client(base_url=server.url) as fresh:  # new connections are still accepted
            assert fresh.post("/v1/autoencoder/encode", json={"inputs": [[0, 1, 1, 0, 1]]}).status_code == 200
        assert server.process.wait(timeout=30) == 0
        assert "Draining" in server.output()
    finally:
        server.stop()


def test_a_request_during_the_grace_gets_connection_close() -> None:
    server = start_server(SERVE, shutdown_delay="0")
    try:
        with server.connect() as sock:
            sock.sendall(request())
            assert status(read_response(sock)) == 200
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.4)  # the server has stopped listening; this connection is in its grace
            sock.sendall(request())
            answer = read_response(sock)
            assert status(answer) == 200
            assert b"connection: close" in answer.lower()
            assert read_until_closed(sock) == b""
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "second SIGTERM"])
def test_sigint_or_a_second_sigterm_skips_the_delay(sig: signal.Signals) -> None:
    server = start_server(SERVE, shutdown_delay="600")
    try:
        if sig == signal.SIGTERM:
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert httpx.get(f"{server.url}/readyz").status_code == 503
        server.process.send_signal(sig)
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()


def test_workers_drain_too() -> None:
    server = start_server(SERVE, shutdown_delay="3", workers="2")
    try:
        server.process.send_signal(signal.SIGTERM)  # the supervisor passes it on within 0.5 s
        with httpx.Client(base_url=server.url) as client:
            deadline = time.monotonic() + 10
            while client.get("/readyz").status_code != 503 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.2)  # both workers got it by now
            assert {client.get("/readyz").status_code for _ in range(6)} == {503}
            assert client.post("/v1/autoencoder/encode", json={"inputs": [[0, 1, 1, 0, 1]]}).status_code == 200
        assert server.process.wait(timeout=30) == 0
    finally:
        server.stop()
