"""Shared fixtures: an in-process client, and real uvicorn processes on free loopback ports."""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app

ROOT = Path(__file__).resolve().parent.parent
# uvicorn finishes in-flight requests on SIGTERM, then re-raises the signal: exit status -15 (143 in a shell).
CLEAN_EXIT = (0, -signal.SIGTERM)


# What makes a test slow: it starts real processes (servers, tools) or runs a long suite. Such tests,
# and everything under tests/system/, are marked `slow`: `pytest -m "not slow"` is the inner loop.
STARTS_PROCESSES = ("start_server(", "run_app(", "subprocess.", "Popen(")


def _helpers(module: object) -> tuple[str, ...]:
    """Calls of the module's own helpers that start processes, as tokens to look for too."""
    found = []
    for name, value in vars(module).items():
        own = inspect.isfunction(value) and value.__module__ == getattr(module, "__name__", "")
        if own and not name.startswith("test_") and any(token in _source(value) for token in STARTS_PROCESSES):
            found.append(f"{name}(")
    return tuple(found)


def _source(function: object) -> str:
    try:
        return inspect.getsource(function)  # type: ignore[arg-type]
    except (TypeError, OSError):  # made at run time, or built in
        return ""


def _starts_processes(item: pytest.Item) -> bool:
    """Whether the test, or any fixture it uses, starts a process (read from their source)."""
    tokens = STARTS_PROCESSES + _helpers(getattr(item, "module", None))
    functions = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)  # pytest's record of the fixtures a test uses
    if info is not None:
        functions += [definition.func for defs in info.name2fixturedefs.values() for definition in defs]
    return any(token in _source(function) for function in functions for token in tokens)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "system" in item.path.parts or _starts_processes(item):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def client() -> Iterator[TestClient]:
    """The default service (seed 0, 5 -> 2), in-process, lifespan run."""
    with TestClient(create_app(Settings())) as test_client:
        yield test_client


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_env(**settings: str) -> dict[str, str]:
    """The environment with no ENCODER_ or OTEL_ variables but those given (and no drain on SIGTERM), and
    a free port for `encoding-service serve`'s gRPC unless one is given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENCODER_", "OTEL_"))}
    env["ENCODER_SHUTDOWN_DELAY"] = "0"  # tests stop servers at once, unless they test the drain
    env["ENCODER_GRPC_PORT"] = str(free_port())  # never the default 8001: servers run side by side
    # OpenTelemetry's own variables (OTEL_TRACES_EXPORTER=...) go in as they are named.
    env.update({k if k.startswith("OTEL_") else f"ENCODER_{k.upper()}": v for k, v in settings.items()})
    return env


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log: IO[bytes]
    final: str | None = None  # what it wrote, once stopped
    grpc: str = ""  # host:port of its gRPC, when `encoding-service serve` serves it

    def stop(self) -> int:
        """SIGTERM by PID, then SIGKILL if it lingers; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.final is None:
            self.final = self.output()
            self.log.close()
        return self.process.returncode

    def connect(self, timeout: float = 15) -> socket.socket:
        """A raw TCP connection to the server, for what an HTTP client would not send."""
        host, port = self.url.removeprefix("http://").split(":")
        return socket.create_connection((host, int(port)), timeout=timeout)

    def output(self) -> str:
        """What the server wrote to stderr so far (all of it, once stopped)."""
        if self.final is not None:
            return self.final
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def read_response(sock: socket.socket) -> bytes:
    """One response with a Content-Length, whole, however many segments it comes in."""

    def more(data: bytes) -> bytes:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before the response was whole: {data!r}")
        return data + chunk

    data = b""
    while b"\r\n\r\n" not in data:
        data = more(data)
    head, _, body = data.partition(b"\r\n\r\n")
    fields = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
    while len(body) < int(fields[b"content-length"]):
        body = more(body)
    return head + b"\r\n\r\n" + body


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection: a response may come in any
    number of segments (plain uvicorn writes its head and body apart)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def start_server(
    command: list[str] | None = None,
    timeout: float = 20.0,
    stdout: bool = False,
    port: int | None = None,
    **settings: str,
) -> Server:
    """Start `uvicorn service.main:app` (or `command` with {port}) and wait for /readyz to answer 200.
    Its stderr (and stdout, the access log, with `stdout=True`) is `Server.output()`."""
    port = port or free_port()
    argv = command or [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", "{port}"]
    argv = [part.replace("{port}", str(port)) for part in argv]
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed by Server.stop; a file, not a pipe, never blocks
    env = server_env(**settings)
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log if stdout else subprocess.DEVNULL, stderr=log)
    server = Server(process, f"http://127.0.0.1:{port}", log, grpc=f"127.0.0.1:{env['ENCODER_GRPC_PORT']}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            output = server.output()
            server.stop()
            raise RuntimeError(f"server exited with {process.returncode}: {output}")
        try:
            if httpx.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    server.stop()
    raise RuntimeError("server did not become ready")


@dataclass
class Load:
    """`clients` threads, each running `client(stop, outcomes)` until `stop` is set, counting each
    call's outcome (a status) in `outcomes`: load for the rolling-restart tests."""

    client: Callable[[threading.Event, Counter[int | str]], None]
    clients: int = 4
    outcomes: Counter[int | str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        self.threads = [
            threading.Thread(target=self.client, args=(self.stop, self.outcomes)) for _ in range(self.clients)
        ]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)


@pytest.fixture(scope="module")
def live() -> Iterator[Server]:
    """A real uvicorn process serving the default model."""
    server = start_server()
    try:
        yield server
    finally:
        server.stop()


def run_app(timeout: float = 20.0, **settings: str) -> subprocess.CompletedProcess[str]:
    """Run `uvicorn service.main:app` expecting it to refuse to start; its exit code and output."""
    port = str(free_port())
    argv = [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", port]
    return subprocess.run(argv, cwd=ROOT, env=server_env(**settings), capture_output=True, text=True, timeout=timeout)
