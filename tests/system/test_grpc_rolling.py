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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import httpx
import numpy as np
import pytest

from service.api.grpc import inference_pb2 as pb
from service.api.grpc import inference_pb2_grpc as stubs
from tests.conftest import ROOT, Load, Server, free_port, start_server

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


def caller(stub: stubs.GRPCInferenceServiceStub) -> Callable[[threading.Event, Counter[int | str]], None]:
    """A client calling ModelInfer on the shared channel's stub, as an application's threads would."""
    request = pb.ModelInferRequest(model_name="vae")
    request.inputs.add(name="input", datatype="INT32", shape=ROWS.shape)
    request.raw_input_contents.append(ROWS.tobytes())
    request.parameters["seed"].int64_param = 7

    def client(stop: threading.Event, codes: Counter[int | str]) -> None:
        while not stop.is_set():
            try:
                stub.ModelInfer(request, timeout=30)
                codes["OK"] += 1
            except grpc.RpcError as exc:
                codes[exc.code().name] += 1

    return client


def test_a_rolling_restart_under_grpc_load_fails_no_call(replicas: Replicas) -> None:
    channel = grpc.insecure_channel(replicas.target, options=OPTIONS)  # one, as an application holds one
    with channel, Load(caller(stubs.GRPCInferenceServiceStub(channel))) as load:
        time.sleep(1)
        for index in (0, 1, 0):
            replicas.restart(index)
            time.sleep(0.5)
        deadline = time.monotonic() + 5  # both back: the balancer spreads the calls over both again
        while min(spread := [replicas.calls_answered(index) for index in range(2)]) == 0:
            assert time.monotonic() < deadline, spread
            time.sleep(0.25)
    assert set(load.outcomes) == {"OK"}, load.outcomes
    assert load.outcomes["OK"] > 200
