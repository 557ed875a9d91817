"""The container image, built from the repository's own Dockerfile and run for real, with podman.

There is no Docker engine here and Docker Hub cannot be reached, so this suite:
- builds a stand-in for the Dockerfile's base image, `python:3.11-slim`, from Debian's own
  packages with debootstrap (bookworm, minbase, with Debian's Python 3.11) and tags it with that
  name: the image under test is built on this stand-in, not on the official image;
- builds the unchanged Dockerfile with podman (runc, lowered ulimits, the host's CA bundle
  mounted so that pip can reach the package index), and runs it.
Without podman it skips on a laptop; under CI=true it fails instead (`.ci/run` installs podman).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.models import weights
from service.models.encoders import seeded
from tests.conftest import ROOT, free_port
from tests.server.test_traces import Collector

BASE = "docker.io/library/python:3.11-slim"
IMAGE = "localhost/encoding-service:test"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
RUN = ["--runtime", "runc", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]

for tool in ("podman", "debootstrap"):
    if shutil.which(tool) is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{tool} is missing: CI must install it (.ci/run does)", pytrace=False)
        pytest.skip(
            f"{tool} is not installed (apt-get install podman buildah debootstrap runc)", allow_module_level=True
        )


def podman(*args: str, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def build_stand_in_base(workdir: Path) -> None:
    """A python:3.11-slim stand-in: Debian bookworm minbase with Debian's Python 3.11."""
    root = workdir / "rootfs"
    subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
         "bookworm", str(root), "http://deb.debian.org/debian"],
        check=True, capture_output=True, timeout=1200,
    )  # fmt: skip
    for name in ("python", "python3"):  # where the official image has them
        (root / "usr/local/bin" / name).symlink_to("/usr/bin/python3")
    shutil.rmtree(root / "var/cache/apt/archives", ignore_errors=True)
    archive = workdir / "rootfs.tar"
    subprocess.run(["tar", "-C", str(root), "-cf", str(archive), "."], check=True, timeout=600)
    podman(
        "import", "--change", "ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "--change", 'CMD ["python3"]', str(archive), BASE,
    )  # fmt: skip


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    if podman("image", "exists", BASE, check=False).returncode != 0:
        build_stand_in_base(tmp_path_factory.mktemp("base"))
    podman(
        "build", "--pull=never", "--format", "docker", *RUN, "--network", "host",
        "-v", f"{CA_BUNDLE}:{CA_BUNDLE}:ro", "-t", IMAGE, str(ROOT),
    )  # fmt: skip
    return IMAGE


class Container:
    def __init__(self, image: str, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        environment = {"ENCODER_PORT": str(self.port)} | (env or {})
        flags = [arg for key, value in environment.items() for arg in ("-e", f"{key}={value}")]
        self.started = time.monotonic()
        self.id = podman("run", "-d", *RUN, "--network", "host", "--read-only", *flags, *extra, image).stdout.strip()
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f"not ready: {podman('logs', self.id, check=False).stderr[-2000:]}")

    def inspect(self, template: str) -> str:
        return podman("inspect", "--format", template, self.id).stdout.strip()

    def remove(self) -> None:
        podman("rm", "-f", "-t", "0", self.id, check=False)


@pytest.fixture
def container(image: str) -> Iterator[Container]:
    running = Container(image)
    try:
        yield running
    finally:
        running.remove()


def test_the_image_is_small_and_non_root(image: str) -> None:
    config = json.loads(podman("image", "inspect", image).stdout)[0]
    size_mib = config["Size"] / 2**20
    print(f"\nimage {image}: {size_mib:.0f} MiB")
    assert size_mib < 400
    assert config["Config"]["User"] == "10001"
    assert "8000/tcp" in config["Config"]["ExposedPorts"]
    history = podman("history", "--no-trunc", "--format", "{{.CreatedBy}}", image).stdout
    assert "gcc" not in history


def test_it_serves_the_seeded_contract_healthy_read_only_and_as_a_user(container: Container) -> None:
    cold_start = container.wait_ready()
    print(f"\ncontainer start to ready: {cold_start:.2f} s")
    assert podman("healthcheck", "run", container.id, check=False).returncode == 0
    assert container.inspect("{{.State.Health.Status}}") == "healthy"
    assert podman("exec", container.id, "id", "-u").stdout.strip() == "10001"
    info = httpx.get(f"{container.url}/v1/model").json()
    assert info["fingerprint"] == seeded(0, 5, 2).fingerprint()
    body = {"inputs": [[0, 1, 1, 0, 1]], "samples": 2, "seed": 42}
    answer = httpx.post(f"{container.url}/v1/vae/encode", json=body).json()
    model = seeded(0, 5, 2)
    x = np.array(body["inputs"], dtype=np.float64)
    eps = np.random.default_rng(42).standard_normal((1, 2, 2))
    z = (x @ model.mu_weight)[:, None, :] + np.exp(x @ model.ls_weight)[:, None, :] * eps
    np.testing.assert_array_equal(answer["z"], z)
    oip = {
        "parameters": {"seed": 42, "samples": 2},
        "inputs": [{"name": "input", "shape": [1, 5], "datatype": "INT32", "data": [0, 1, 1, 0, 1]}],
    }
    outputs = httpx.post(f"{container.url}/v2/models/vae/infer", json=oip).json()["outputs"]
    np.testing.assert_array_equal(next(o for o in outputs if o["name"] == "z")["data"], z.ravel())
    assert podman("exec", container.id, "touch", "/opt/venv/x", check=False).returncode != 0  # read-only


def test_sigterm_drains_then_stops_it_cleanly(container: Container) -> None:
    container.wait_ready()
    began = time.monotonic()
    podman("stop", "-t", "30", container.id)  # the default drain (ENCODER_SHUTDOWN_DELAY) is 5 s
    assert 5 <= time.monotonic() - began < 20  # drained, then stopped on its own: not killed at 30 s
    assert container.inspect("{{.State.ExitCode}}") == "0"
    logs = podman("logs", container.id)
    assert "Draining" in logs.stdout + logs.stderr


def test_weights_mounted_read_only(image: str, tmp_path: Path) -> None:
    model = seeded(7, 12, 3)
    path = tmp_path / "model.safetensors"
    weights.save(model, path)
    path.chmod(0o644)
    tmp_path.chmod(0o755)
    running = Container(
        image, "-v", f"{path}:/weights/model.safetensors:ro", env={"ENCODER_WEIGHTS": "/weights/model.safetensors"}
    )
    try:
        running.wait_ready()
        info = httpx.get(f"{running.url}/v1/model").json()
        assert (info["fingerprint"], info["input_dim"], info["file"]) == (model.fingerprint(), 12, "model.safetensors")
    finally:
        running.remove()


def test_the_image_sends_traces(image: str) -> None:
    """The image has the otel extra: set the OTEL_ variables and a request's span reaches a collector."""
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with Collector() as collector:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_BSP_SCHEDULE_DELAY": "50"}
        running = Container(image, env=env)
        try:
            running.wait_ready()
            body = {"inputs": [[0, 1, 1, 0, 1]]}
            headers = {"traceparent": traceparent}
            assert httpx.post(f"{running.url}/v1/autoencoder/encode", json=body, headers=headers).status_code == 200
            spans = collector.wait_for(4)
        finally:
            running.remove()
    server = next(span for span in spans if span["name"] == "POST /v1/autoencoder/encode")
    assert (server["trace_id"], server["parent"]) == ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331")
