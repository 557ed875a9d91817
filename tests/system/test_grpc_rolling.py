"""gRPC through a rolling restart: two replicas of `encoding-service serve` (one worker each, then
two), clients calling ModelInfer on one channel over both with deploy/grpc-service-config.json as
its service config (round robin, client-side health checks, retries of UNAVAILABLE), and every
replica restarted in turn as Kubernetes would (SIGTERM, wait for the exit, start again): no call
fails, and the calls spread over both replicas again afterwards."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import httpx
import numpy as np
import pytest

from service.api.grpc import inference_pb2 as pb
from service.api.grpc import inference_pb2_grpc as stubs
from tests.conftest import ROOT, Server, free_port, start_server

SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
SERVICE_CONFIG = (ROOT / "deploy" / "grpc-service-config.json").read_text()
# The channel options docs/clients.md recommends with it: retries on, and a restarted replica
# tried again within a second (gRPC's reconnect backoff otherwise grows to minutes).
OPTIONS = [("grpc.service_config", SERVICE_CONFIG), ("grpc.enable_retries", 1), ("grpc.max_reconnect_backoff_ms", 1000)]
ROWS = np.array([[0, 1, 1, 0, 1], [1, 0, 0, 1, 0]], dtype="<i4")


@dataclass
class Replicas:
    servers: list[Server]
    ports: list[tuple[int, int]]  # (HTTP, gRPC) of each, kept across restarts
    settings: dict[str, str]

    @property
    def target(self) -> str:
        """Both replicas as one gRPC target, as DNS gives a headless Service's pods."""
        return "ipv4:" + ",".join(f"127.0.0.1:{grpc_port}" for _, grpc_port in self.ports)

    def start(self, index: int) -> Server:
        http, grpc_port = self.ports[index]
        return start_server(SERVE, port=http, grpc_port=str(grpc_port), **self.settings)

    def restart(self, index: int) -> None:
        """SIGTERM, wait for the exit (the drain, then what is in flight), start again, ready."""
        old = self.servers[index]
        old.process.send_signal(signal.SIGTERM)
        assert old.process.wait(timeout=60) == 0, old.output()
        old.stop()
        self.servers[index] = self.start(index)

    def calls_answered(self, index: int) -> float:
        """ModelInfer calls the replica answered OK since it started, from its /metrics."""
        text = httpx.get(self.servers[index].url + "/metrics", timeout=5).text
        ok = [line for line in text.splitlines() if line.startswith("encoder_grpc_requests_total{")]
        mine = [line for line in ok if '/ModelInfer"' in line and 'code="OK"' in line]
        return sum(float(line.rsplit(" ", 1)[1]) for line in mine)


@pytest.fixture(params=["1", "2"], ids=lambda workers: f"{workers} worker(s)")
def replicas(request: pytest.FixtureRequest) -> Iterator[Replicas]:
    settings = {"workers": request.param, "shutdown_delay": "1"}
    pair = Replicas([], [(free_port(), free_port()), (free_port(), free_port())], settings)
    try:
        for index in range(2):
            pair.servers.append(pair.start(index))
        yield pair
    finally:
        for server in pair.servers:
            server.stop()


@dataclass
class Load:
    """Clients calling ModelInfer on one channel, as an application would hold one."""

    target: str
    clients: int = 4
    codes: Counter[str] = field(default_factory=Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def run(self, stub: stubs.GRPCInferenceServiceStub) -> None:
        request = pb.ModelInferRequest(model_name="vae")
        request.inputs.add(name="input", datatype="INT32", shape=ROWS.shape)
        request.raw_input_contents.append(ROWS.tobytes())
        request.parameters["seed"].int64_param = 7
        while not self.stop.is_set():
            try:
                stub.ModelInfer(request, timeout=30)
                self.codes["OK"] += 1
            except grpc.RpcError as exc:
                self.codes[exc.code().name] += 1

    def __enter__(self) -> Load:
        self.channel = grpc.insecure_channel(self.target, options=OPTIONS)
        stub = stubs.GRPCInferenceServiceStub(self.channel)
        self.threads = [threading.Thread(target=self.run, args=(stub,)) for _ in range(self.clients)]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
        self.channel.close()


def test_a_rolling_restart_under_grpc_load_fails_no_call(replicas: Replicas) -> None:
    with Load(replicas.target) as load:
        time.sleep(1)
        for index in (0, 1, 0):
            replicas.restart(index)
            time.sleep(0.5)
        deadline = time.monotonic() + 5  # both back: the balancer spreads the calls over both again
        while min(spread := [replicas.calls_answered(index) for index in range(2)]) == 0:
            assert time.monotonic() < deadline, spread
            time.sleep(0.25)
    assert set(load.codes) == {"OK"}, load.codes
    assert load.codes["OK"] > 200
