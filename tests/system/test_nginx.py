"""encoding-service behind a real nginx (Debian's), with deploy/nginx/nginx.conf as shipped: two
replicas of `encoding-service serve` under /api, upstream keep-alive, load running through nginx;
their gRPC through nginx's grpc_pass on a port of its own.

A rolling restart of both replicas during the load answers every request 2xx, and nginx's error
log holds no reset or prematurely closed upstream connection; bursts with pauses around the idle
timeouts meet no keep-alive race; the docs load from under the prefix. gRPC through nginx gives
REST's numbers, the service's statuses and health, and a rolling restart under gRPC load fails
no call, with a client that has no retry policy of its own."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from tests.conftest import ROOT, Load, Server, free_port, start_server

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
if NGINX is None:
    if os.environ.get("CI") == "true":
        pytest.fail("nginx is missing: .ci/run installs it (apt-get install nginx-light)", pytrace=False)
    pytest.skip("nginx is not installed (apt-get install nginx-light)", allow_module_level=True)

CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
# The idle timeouts in the documented relation (nginx's below the service's), made short so that the
# keep-alive test can pause around them: nginx 2 s, the service 3 s.
NGINX_IDLE, SERVICE_IDLE = 2, 3
REPLICA = {"root_path": "/api", "trusted_proxies": "127.0.0.1", "shutdown_delay": "1", "keep_alive_timeout": "3"}
ROW = {"inputs": [[0, 1, 1, 0, 1]]}
OIP = {"inputs": [{"name": "input", "shape": [1, 5], "datatype": "INT32", "data": [0, 1, 1, 0, 1]}]}


@dataclass
class Proxy:
    url: str
    grpc: str  # nginx's gRPC address, host:port
    error_log: Path
    replicas: list[Server]
    ports: list[tuple[int, int]]  # (HTTP, gRPC) of each replica, kept across restarts
    settings: dict[str, str]

    def start(self, index: int) -> Server:
        http, grpc_port = self.ports[index]
        return start_server(SERVE, port=http, grpc_port=str(grpc_port), **self.settings)

    def restart(self, index: int) -> None:
        """Roll one replica as Kubernetes would: SIGTERM, wait for it to exit, start it again, ready."""
        old = self.replicas[index]
        old.process.send_signal(signal.SIGTERM)
        assert old.process.wait(timeout=60) == 0, old.output()
        old.stop()
        self.replicas[index] = self.start(index)

    def upstream_errors(self) -> list[str]:
        """Lines of nginx's error log about an upstream connection that broke, not just refused."""
        text = self.error_log.read_text()
        return [
            line
            for line in text.splitlines()
            if re.search(r"reset by peer|prematurely closed|upstream timed out|no live upstreams|goaway", line)
        ]


def _config(listen: int, listen_grpc: int, ports: list[tuple[int, int]]) -> str:
    text = CONF.read_text()
    text = text.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{listen};")
    text = text.replace("listen 127.0.0.1:8081 http2;", f"listen 127.0.0.1:{listen_grpc} http2;")
    for index, (http, grpc_port) in enumerate(ports):
        text = text.replace(f"server 127.0.0.1:800{index + 1} ", f"server 127.0.0.1:{http} ")
        text = text.replace(f"server 127.0.0.1:900{index + 1} ", f"server 127.0.0.1:{grpc_port} ")
    text = text.replace("keepalive_timeout 60s;", f"keepalive_timeout {NGINX_IDLE}s;", 1)  # the HTTP upstream's
    for port in (listen, listen_grpc, *(port for pair in ports for port in pair)):
        assert text.count(f":{port}") == 1, "the shipped config changed: update the substitutions"
    assert text.count(f"keepalive_timeout {NGINX_IDLE}s;") == 1, "the shipped config changed"
    return text


@pytest.fixture(scope="module", params=["1", "2"], ids=lambda workers: f"{workers} worker(s)")
def proxy(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Proxy]:
    """nginx in front of two replicas, each with one worker, then each with two."""
    settings = REPLICA | {"workers": request.param}
    workdir = tmp_path_factory.mktemp("nginx")
    ports = [(free_port(), free_port()), (free_port(), free_port())]
    listen, listen_grpc = free_port(), free_port()
    (workdir / "nginx.conf").write_text(_config(listen, listen_grpc, ports))
    error_log = workdir / "error.log"
    main = f"pid {workdir / 'nginx.pid'}; error_log {error_log} info; daemon off;"
    nginx = subprocess.Popen(
        [NGINX, "-p", str(workdir), "-c", str(workdir / "nginx.conf"), "-g", main],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    proxy = Proxy(f"http://127.0.0.1:{listen}", f"127.0.0.1:{listen_grpc}", error_log, [], ports, settings)
    try:
        proxy.replicas.extend(proxy.start(index) for index in range(2))
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{proxy.url}/api/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert nginx.poll() is None, error_log.read_text()
            assert time.monotonic() < deadline, error_log.read_text()
            time.sleep(0.05)
        yield proxy
    finally:
        nginx.send_signal(signal.SIGQUIT)  # nginx's graceful stop
        try:
            nginx.wait(timeout=10)
        except subprocess.TimeoutExpired:
            nginx.kill()
            nginx.wait()
        for replica in proxy.replicas:
            replica.stop()


def through(url: str) -> Callable[[threading.Event, Counter[int | str]], None]:
    """A client calling /v1 and /v2 through nginx in turn, on its own keep-alive connection."""

    def client(stop: threading.Event, statuses: Counter[int | str]) -> None:
        with httpx.Client(base_url=url, timeout=30) as http:
            calls = 0
            while not stop.is_set():
                calls += 1
                try:
                    if calls % 2:
                        status: int | str = http.post("/api/v1/vae/encode", json=ROW).status_code
                    else:
                        status = http.post("/api/v2/models/autoencoder/infer", json=OIP).status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                statuses[status] += 1

    return client


def test_a_rolling_restart_under_load_answers_every_request(proxy: Proxy) -> None:
    with Load(through(proxy.url)) as load:
        time.sleep(1)
        for index in range(2):
            proxy.restart(index)
            time.sleep(0.5)
        proxy.restart(0)  # once more, less than nginx's default fail_timeout after the last
        time.sleep(1)
    assert set(load.outcomes) == {200}, load.outcomes
    assert load.outcomes[200] > 200
    assert proxy.upstream_errors() == []


def test_bursts_around_the_idle_timeouts_meet_no_keep_alive_race(proxy: Proxy) -> None:
    statuses: Counter[int | str] = Counter()
    with httpx.Client(base_url=proxy.url, timeout=30) as client:

        def call() -> None:
            statuses.update([client.post("/api/v1/autoencoder/encode", json=ROW).status_code])

        for pause in (NGINX_IDLE - 0.2, NGINX_IDLE, NGINX_IDLE + 0.2, SERVICE_IDLE - 0.1, SERVICE_IDLE + 0.2):
            for _ in range(20):  # a burst opens several upstream connections across both replicas
                threads = [threading.Thread(target=call) for _ in range(4)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            time.sleep(pause)
    assert set(statuses) == {200}, statuses
    assert proxy.upstream_errors() == []


def test_docs_and_client_addresses_behind_nginx(proxy: Proxy) -> None:
    page = httpx.get(f"{proxy.url}/api/docs").text
    assert "/api/openapi.json" in page
    spec = httpx.get(f"{proxy.url}/api/openapi.json").json()
    assert spec["servers"] == [{"url": "/api"}]
    asset = re.search(r"/api/docs-assets/[\w.-]+\.js", page)
    assert asset is not None
    assert httpx.get(proxy.url + asset.group(0)).status_code == 200
    info = httpx.get(f"{proxy.url}/api/v1/model").json()
    assert info["input_dim"] == 5


def test_the_docs_work_in_a_browser_under_the_prefix(proxy: Proxy) -> None:
    """Swagger UI at /api/docs through nginx loads the spec and its assets from under /api, and
    "Try it out" reaches the service through the prefix (the spec names /api as its server)."""
    from tests.system.test_browser import CHROMIUM, FLAGS, _try_it_out

    if not CHROMIUM.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs it", pytrace=False)
        pytest.skip("chromium is not installed")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            failed: list[str] = []
            page.on("response", lambda response: response.status >= 400 and failed.append(response.url))
            page.goto(f"{proxy.url}/api/docs")
            page.locator("#operations-v1-encode_vae").wait_for()
            status, shown = _try_it_out(page, "encode_vae", {"inputs": [[0, 1, 1, 0, 1]], "seed": 7})
            assert status == "200"
            assert shown["seed"] == 7
            page.goto(f"{proxy.url}/api/redoc")
            page.get_by_text("VAE posterior and samples of binary rows").first.wait_for(state="attached")
            assert failed == []
        finally:
            browser.close()


def test_grpc_through_nginx_gives_rests_numbers_the_services_statuses_and_health(proxy: Proxy) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from service.api.grpc import inference_pb2 as pb
    from service.api.grpc import inference_pb2_grpc as stubs

    rows = np.array([[0, 1, 1, 0, 1]], dtype="<i4")
    with grpc.insecure_channel(proxy.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = stubs.GRPCInferenceServiceStub(channel)
        request = pb.ModelInferRequest(model_name="vae")
        request.inputs.add(name="input", datatype="INT32", shape=rows.shape)
        request.raw_input_contents.append(rows.tobytes())
        request.parameters["seed"].int64_param = 7
        reply = stub.ModelInfer(request, timeout=10)
        z = dict(zip((o.name for o in reply.outputs), reply.raw_output_contents, strict=True))["z"]
        rest = httpx.post(f"{proxy.url}/api/v1/vae/encode", json=ROW | {"seed": 7}).json()
        assert np.frombuffer(z, dtype="<f8").tolist() == np.ravel(rest["z"]).tolist()
        request.model_name = "nope"
        with pytest.raises(grpc.RpcError) as refused:
            stub.ModelInfer(request, timeout=10)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in str(refused.value.details())


def test_a_rolling_restart_under_grpc_load_through_nginx_fails_no_call(proxy: Proxy) -> None:
    """Clients on one channel to nginx, with no retry policy: nginx finds a replica for each call."""
    from service.api.grpc import inference_pb2_grpc as stubs
    from tests.system.test_grpc_rolling import caller

    with grpc.insecure_channel(proxy.grpc) as channel, Load(caller(stubs.GRPCInferenceServiceStub(channel))) as load:
        time.sleep(1)
        for index in (0, 1, 0):
            proxy.restart(index)
            time.sleep(0.5)
        time.sleep(1)
    assert set(load.outcomes) == {"OK"}, (load.outcomes, proxy.upstream_errors())
    assert load.outcomes["OK"] > 200
    assert proxy.upstream_errors() == []
