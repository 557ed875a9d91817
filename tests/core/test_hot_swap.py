"""Hot swaps under load, through `encoding-service serve --model-repository` as users run it, with
one worker and with two: loading a new version, unloading an old one and replacing a model's file
answer every request 200, each answer's numbers are those of the version it says answered, and
once a load or unload call has answered, every worker serves the new state. Triton's own client
drives the repository extension."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from service.models import weights
from service.models.encoders import Model, seeded
from tests.conftest import Server, start_server

ROWS = [[0, 1, 1, 0, 1], [1, 0, 0, 1, 0]]
SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]


def codes(model: Model) -> list[list[float]]:
    x = np.array(ROWS, dtype=np.float64)
    return np.maximum(x @ model.ae_weight + model.ae_bias, 0.0).tolist()  # type: ignore[no-any-return]


def put(root: Path, version: int, seed: int) -> Model:
    """Seeded weights as root/m/<version>/model.safetensors, the folder renamed into place whole."""
    model = seeded(seed, 5, 2)
    staging = root / "m" / f".staging-{version}-{seed}"
    staging.mkdir(parents=True)
    weights.save(model, staging / "model.safetensors")
    staging.rename(root / "m" / str(version))
    return model


def replace_file(root: Path, version: int, seed: int) -> Model:
    """Replace a version's weights file in place, atomically (a rename over it)."""
    model = seeded(seed, 5, 2)
    temporary = root / "m" / f".replacement-{seed}.safetensors"
    weights.save(model, temporary)
    os.replace(temporary, root / "m" / str(version) / "model.safetensors")
    return model


class Load:
    """Threads that send requests to model m until stopped, each keeping (status, version, codes)."""

    def __init__(self, url: str, threads: int = 4) -> None:
        self.url, self.stop = url, threading.Event()
        self.seen: list[tuple[int, str, Any]] = []
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def _run(self, i: int) -> None:
        tensor = {"name": "input", "shape": [2, 5], "datatype": "INT32", "data": [bit for row in ROWS for bit in row]}
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                if i % 2:
                    response = client.post("/v1/models/m/autoencoder/encode", json={"inputs": ROWS})
                    answer = response.json().get("codes") if response.status_code == 200 else response.text
                else:
                    body = {"inputs": [tensor], "outputs": [{"name": "codes"}]}
                    response = client.post("/v2/models/m/infer", json=body)
                    answer = response.text
                    if response.status_code == 200:
                        answer = np.reshape(response.json()["outputs"][0]["data"], (2, 2)).tolist()
                self.seen.append((response.status_code, response.headers.get("x-model-version", ""), answer))

    def finish(self) -> list[tuple[int, str, Any]]:
        self.stop.set()
        for thread in self.threads:
            thread.join()
        return self.seen


def loaded(live: Server) -> None:
    """Load model m again; the server's last lines if it does not answer 200."""
    response = httpx.post(f"{live.url}/v2/repository/models/m/load", timeout=90)
    assert response.status_code == 200, (response.text, live.output()[-4000:])


def fresh(url: str, path: str, count: int = 40) -> list[httpx.Response]:
    """`count` requests, each on a new connection: with two workers the kernel spreads them over both."""
    return [httpx.post(url + path, json={"inputs": ROWS}, headers={"connection": "close"}) for _ in range(count)]


@pytest.fixture(params=[1, 2], ids=["1 worker", "2 workers"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Server, Path, dict[str, Model]]]:
    root = tmp_path / "repository"
    first = put(root, 1, seed=1)
    command = [*SERVE, "--model-repository", str(root)]
    running = start_server(command, stdout=True, workers=str(request.param), log_format="json")
    try:
        yield running, root, {"1": first}
    finally:
        running.stop()


def test_hot_swaps_under_load_answer_every_request_on_one_version(
    server: tuple[Server, Path, dict[str, Model]],
) -> None:
    live, root, models = server
    expected = {"1": [codes(models["1"])]}
    load = Load(live.url)
    try:
        time.sleep(0.3)
        # A new version: served by every worker once the call has answered.
        expected["2"] = [codes(put(root, 2, seed=2))]
        loaded(live)
        assert {r.headers["x-model-version"] for r in fresh(live.url, "/v1/models/m/autoencoder/encode")} == {"2"}
        time.sleep(0.3)
        # An old version unloaded: its folder removed, the model loaded again.
        for path in (root / "m" / "1").iterdir():
            path.unlink()
        (root / "m" / "1").rmdir()
        loaded(live)
        assert {r.status_code for r in fresh(live.url, "/v1/models/m/versions/1/autoencoder/encode")} == {404}
        time.sleep(0.3)
        # A version's file replaced: the new weights answer, as version 2 still.
        expected["2"].append(codes(replace_file(root, 2, seed=3)))
        loaded(live)
        after = fresh(live.url, "/v1/models/m/autoencoder/encode")
        assert {r.headers["x-model-version"] for r in after} == {"2"}
        assert all(r.json()["codes"] == expected["2"][1] for r in after)
        time.sleep(0.3)
    finally:
        seen = load.finish()
    assert len(seen) > 50
    failed = [(status, answer) for status, _, answer in seen if status != 200]
    assert not failed, failed[:3]
    for _, version, answer in seen:  # every answer's numbers are those of the version it names
        assert answer in expected[version], (version, answer)
    assert {version for _, version, _ in seen} == {"1", "2"}
    # Unloaded: no worker serves it once the call has answered; loaded again: every worker does.
    assert httpx.post(f"{live.url}/v2/repository/models/m/unload", timeout=90).status_code == 200
    assert {r.status_code for r in fresh(live.url, "/v1/models/m/autoencoder/encode")} == {404}
    assert httpx.post(f"{live.url}/v2/repository/models/m/load", timeout=90).status_code == 200
    assert {r.status_code for r in fresh(live.url, "/v1/models/m/autoencoder/encode")} == {200}
    time.sleep(0.5)  # the access log is written in batches
    lines = [line for line in live.output().splitlines() if '"path":"/v1/models/m/autoencoder/encode"' in line]
    assert any('"status":200,' in line and line.endswith('"model":"m","version":2}') for line in lines)


def test_triton_client_drives_the_repository(tmp_path: Path) -> None:
    root = tmp_path / "repository"
    put(root, 1, seed=1)
    live = start_server([*SERVE, "--model-repository", str(root)])
    try:
        client = triton.InferenceServerClient(url=live.url.removeprefix("http://"))
        assert client.get_model_repository_index() == [{"name": "m", "version": "1", "state": "READY", "reason": ""}]
        two = put(root, 2, seed=2)
        assert not client.is_model_ready("m", "2")
        client.load_model("m")
        assert client.is_model_ready("m", "2")
        assert client.is_model_ready("m", "1")
        tensor = triton.InferInput("input", [2, 5], "INT32")
        tensor.set_data_from_numpy(np.array(ROWS, dtype=np.int32))
        for version, model in (("1", seeded(1, 5, 2)), ("2", two)):
            result = client.infer("m", [tensor], model_version=version, parameters={"seed": 4, "samples": 2})
            assert result.get_response()["model_version"] == version
            np.testing.assert_array_equal(result.as_numpy("codes"), codes(model))
            v1 = httpx.post(
                f"{live.url}/v1/models/m/versions/{version}/vae/encode", json={"inputs": ROWS, "seed": 4, "samples": 2}
            ).json()
            np.testing.assert_array_equal(result.as_numpy("z"), v1["z"])
        metadata = client.get_model_metadata("m")
        assert metadata["versions"] == ["1", "2"]
        assert [o["name"] for o in metadata["outputs"]] == ["codes", "mu", "log_sigma", "z", "kl"]
        client.unload_model("m")
        assert not client.is_model_ready("m")
        (row,) = client.get_model_repository_index()
        assert (row["state"], row["reason"]) == ("UNAVAILABLE", "unloaded")
        ready = httpx.post(f"{live.url}/v2/repository/index", json={"ready": True})
        assert ready.json() == []
        with pytest.raises(InferenceServerException, match="no model 'nowhere' in the repository"):
            client.load_model("nowhere")
    finally:
        live.stop()
