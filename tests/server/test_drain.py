"""SIGTERM loses nothing: `encoding-service serve` drains (ENCODER_SHUTDOWN_DELAY), then answers
every request that reached it, queued in the listen backlog or unread on an idle connection."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.client import Client
from tests.conftest import Server, free_port, read_response, read_until_closed, server_env, start_server

SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
BODY = json.dumps({"inputs": [[0, 1, 1, 0, 1]]}).encode()
WIDE = json.dumps({"inputs": [[1, 0] * 512]}).encode()  # a row of the busy test's model (1024 wide)


def request(path: str = "/v1/autoencoder/encode", body: bytes = BODY) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def busy(server: Server, workers: int = 1) -> tuple[socket.socket, list[threading.Thread]]:
    """Keep the server's event loops busy for a while, each with one big VAE answer; a connection
    whose /healthz request went unanswered meanwhile, as proof (it must be answered later)."""
    rows = np.random.default_rng(0).integers(0, 2, size=(4000, 1024))

    def big() -> None:
        with Client(server.url, timeout=120) as client:
            client.vae(rows, samples=16, seed=1)

    threads: list[threading.Thread] = []

    def another() -> None:
        thread = threading.Thread(target=big, daemon=True)
        thread.start()
        threads.append(thread)

    for _ in range(workers):  # a worker busy computing accepts nothing: the next goes to another
        another()
        time.sleep(0.3)
    deadline = time.monotonic() + 30
    started = time.monotonic()
    while time.monotonic() < deadline:
        probe = server.connect(timeout=0.2)
        probe.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        try:
            read_response(probe)
        except TimeoutError:
            probe.settimeout(60)
            return probe, threads
        probe.close()
        # On a loaded machine two big requests can reach one worker before it starts computing the
        # first: a worker still answers, so another big request goes out, for it.
        if time.monotonic() - started > 2 and len(threads) < 3 * workers:
            another()
            started = time.monotonic()
    raise AssertionError("the server never got busy")


WORKERS = pytest.mark.parametrize("workers", ["1", "2"], ids=lambda workers: f"{workers} worker(s)")


@WORKERS
@pytest.mark.parametrize("delay", ["0", "0.5"])
def test_every_request_that_reached_the_server_before_sigterm_is_answered(delay: str, workers: str) -> None:
    server = start_server(SERVE, input_dim="1024", latent_dim="256", shutdown_delay=delay, workers=workers)
    try:
        idle = server.connect(timeout=60)  # a keep-alive connection, idle when SIGTERM comes
        idle.sendall(request(body=WIDE))
        assert status(read_response(idle)) == 200
        probe, big = busy(server, int(workers))
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
        for thread in big:
            thread.join(timeout=60)
        assert server.process.wait(timeout=60) == 0
        assert "Traceback" not in server.output()
    finally:
        server.stop()


@WORKERS
def test_the_drain_says_not_ready_at_once_and_serves_on_then_exits_0(workers: str) -> None:
    server = start_server(SERVE, shutdown_delay="2", workers=workers)
    try:
        with httpx.Client(base_url=server.url) as client:
            assert client.get("/readyz").status_code == 200
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.05)  # every worker has it by now
            with httpx.Client(base_url=server.url) as each:  # new connections: either worker may take one
                assert [reconnect(each).get("/readyz").status_code for _ in range(6)] == [503] * 6
            assert client.get("/readyz").json() == {"status": "draining", "fingerprint": None}
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


@WORKERS
def test_a_request_during_the_grace_gets_connection_close(workers: str) -> None:
    server = start_server(SERVE, shutdown_delay="0", workers=workers)
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


@WORKERS
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "second SIGTERM"])
def test_sigint_or_a_second_sigterm_skips_the_delay(sig: signal.Signals, workers: str) -> None:
    server = start_server(SERVE, shutdown_delay="600", workers=workers)
    try:
        if sig == signal.SIGTERM:
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            assert httpx.get(f"{server.url}/readyz").status_code == 503
        server.process.send_signal(sig)
        assert server.process.wait(timeout=15) == 0  # not the 600 s of the delay
    finally:
        server.stop()


def reconnect(client: httpx.Client) -> httpx.Client:
    """The client, with its pooled connections closed: the next request opens a new one."""
    client._transport.close()  # type: ignore[attr-defined]
    return client


@WORKERS
@pytest.mark.parametrize("delay", ["0", "2"])
def test_sigterm_under_load_resets_no_connection(workers: str, delay: str) -> None:
    """Clients opening a new connection for each request, as wrk -c16 without keep-alive does:
    through SIGTERM and the exit, each request is answered 200 or its connection refused (the
    server is gone), never reset or closed unanswered."""
    server = start_server(SERVE, shutdown_delay=delay, workers=workers)
    outcomes: Counter[str] = Counter()
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                sock = server.connect(timeout=10)
            except ConnectionRefusedError:
                outcomes["refused"] += 1
                time.sleep(0.01)
                continue
            with sock:
                try:
                    sock.sendall(request())
                    outcomes[str(status(read_response(sock)))] += 1
                except (ConnectionError, OSError) as exc:
                    outcomes[type(exc).__name__] += 1

    threads = [threading.Thread(target=hammer) for _ in range(16)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(1)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=30) == 0
        time.sleep(0.3)  # refused from here on
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        server.stop()
    assert outcomes["200"] > 100, outcomes
    assert set(outcomes) <= {"200", "refused"}, outcomes


def _workers(supervisor: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    return [int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _wait_dead(pid: int) -> None:
    """Wait for a killed process to be dead: a zombie, or gone. Its exit can take the kernel many
    seconds at times (seen under load), and its parent learns of it only then."""
    deadline = time.monotonic() + 120
    stat = Path(f"/proc/{pid}/stat")
    while time.monotonic() < deadline:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return
        except (FileNotFoundError, ProcessLookupError):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still not dead")


def all_started(server: Server, workers: int = 2) -> None:
    """Wait until the supervisor has seen every first worker ready (start_server returns once one
    answers)."""
    deadline = time.monotonic() + 30
    while server.output().count("] is ready") < workers and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.output().count("] is ready") == workers, server.output()


def test_a_worker_that_dies_is_replaced_and_its_counts_stay(tmp_path: Path) -> None:
    server = start_server(SERVE, workers="2", metrics_dir=str(tmp_path))
    try:
        all_started(server)
        for _ in range(40):
            assert httpx.post(f"{server.url}/v1/vae/encode", json={"inputs": [[0, 1, 1, 0, 1]]}).status_code == 200
        time.sleep(0.5)  # handed on to the directory
        before = _workers(server.process.pid)
        assert len(before) == 2
        os.kill(before[0], signal.SIGKILL)
        _wait_dead(before[0])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
            len(_workers(server.process.pid)) < 2 or before[0] in _workers(server.process.pid)
        ):
            time.sleep(0.1)
        after = _workers(server.process.pid)
        assert len(after) == 2, after
        assert before[0] not in after
        for _ in range(20):  # both workers answer
            assert httpx.post(f"{server.url}/v1/vae/encode", json={"inputs": [[0, 1, 1, 0, 1]]}).status_code == 200
        metrics = httpx.get(f"{server.url}/metrics").text
        counted = sum(
            sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "encoder_http_requests_total" and sample.labels["route"] == "/v1/vae/encode"
        )
        assert counted >= 60 - 1, counted  # the dead worker's counts stay (but for at most its last request)
        assert server.process.poll() is None
    finally:
        assert server.stop() == 0
    assert "died (status -9); starting another" in server.output()


def test_a_failed_start_or_workers_that_keep_dying_exit_non_zero(tmp_path: Path) -> None:
    argv = [part.replace("{port}", str(free_port())) for part in SERVE]
    failed = subprocess.run(
        argv,
        env=server_env(workers="2", weights=str(tmp_path / "missing.npz")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert failed.returncode == 3
    assert "failed to start (status 3)" in failed.stderr
    server = start_server(SERVE, workers="2")
    try:
        all_started(server)  # what dies from here on is a crash, not a failed start
        for _ in range(200):  # each death counts once the kernel has finished it: that can take a while
            for pid in _workers(server.process.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if server.process.poll() is not None:
                break
            time.sleep(0.3)
        assert server.process.wait(timeout=60) == 1
        assert "Workers died 6 times within 60 s: stopping" in server.output()
    finally:
        server.stop()


def test_workers_have_a_group_of_their_own_and_do_not_outlive_the_supervisor() -> None:
    server = start_server(SERVE, workers="2")
    try:
        workers = _workers(server.process.pid)
        assert len(workers) == 2
        # /readyz answered once one worker was up; the other sets its group as it starts.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(os.getpgid(pid) == pid for pid in workers):
            time.sleep(0.1)
        assert all(os.getpgid(pid) == pid != os.getpgid(server.process.pid) for pid in workers)
        server.process.kill()  # no chance to pass anything on
        server.process.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in workers):
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/healthz")
    finally:
        server.stop()


def test_a_handshake_answered_before_the_listener_refuses_completes_into_its_queue() -> None:
    """A client whose SYN was answered just before the drain's filter: its last ACK and its
    request still reach the queue, and are accepted; dropping them (as a filter of every packet
    did) left the client to be reset once the socket closed. TCP_DEFER_ACCEPT holds the handshake
    half-done in the kernel until the request's first bytes come, so they are what crosses the
    filter here, deterministically."""
    from service.server.listening import refuse_handshakes

    with socket.socket() as listener:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 10)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        with socket.create_connection(listener.getsockname(), timeout=1) as client:  # SYN answered
            refuse_handshakes(listener)
            client.sendall(b"GET / HTTP/1.1\r\n\r\n")  # completes the handshake, after the filter
            listener.settimeout(2)
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.recv(100) == b"GET / HTTP/1.1\r\n\r\n"


def test_a_listener_that_refuses_handshakes_still_hands_over_its_queue() -> None:
    from service.server.listening import refuse_handshakes

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        queued = socket.create_connection(listener.getsockname(), timeout=1)
        refuse_handshakes(listener)
        with pytest.raises(TimeoutError):  # its SYN is dropped: no handshake completes
            socket.create_connection(listener.getsockname(), timeout=0.3)
        accepted, _ = listener.accept()  # what was queued before is still there
        queued.sendall(b"x")
        assert accepted.recv(1) == b"x"
        accepted.close()
        queued.close()
