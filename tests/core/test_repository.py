"""The model repository in-process: layout, versions, config, bad files, load and unload, polling,
names that try to leave the repository. Numbers are checked against numpy written out here."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.cli import main as cli
from service.config import Settings
from service.main import create_app
from service.models import weights
from service.models.encoders import Model, seeded

ROW = [[0, 1, 1, 0, 1]]


def codes(model: Model, rows: list[list[int]]) -> np.ndarray:
    """relu(x @ W + b), written out independently of the service's own math."""
    x = np.array(rows, dtype=np.float64)
    return np.maximum(x @ model.ae_weight + model.ae_bias, 0.0)


def put(root: Path, name: str, version: int, seed: int, input_dim: int = 5, suffix: str = ".safetensors") -> Model:
    """Write seeded weights as DIR/name/version/model<suffix>, atomically (a rename of the folder)."""
    model = seeded(seed, input_dim, 2)
    staging = root / name / f".new-{version}"
    staging.mkdir(parents=True)
    weights.save(model, staging / f"model{suffix}")
    staging.rename(root / name / str(version))
    return model


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    return root


def serve(root: Path, **settings: Any) -> TestClient:
    return TestClient(create_app(Settings(model_repository=root, **settings)))


def test_every_version_is_served_and_unversioned_routes_take_the_highest(repo: Path) -> None:
    one, two = put(repo, "digits", 1, seed=1), put(repo, "digits", 2, seed=2, suffix=".npz")
    wide = put(repo, "wide", 7, seed=3, input_dim=9)
    with serve(repo) as client:
        for path, model in (
            ("/v1/models/digits/versions/1", one),
            ("/v1/models/digits/versions/2", two),
            ("/v1/models/digits", two),
        ):
            response = client.post(f"{path}/autoencoder/encode", json={"inputs": ROW})
            assert response.status_code == 200, response.text
            np.testing.assert_array_equal(response.json()["codes"], codes(model, ROW))
            assert response.headers["x-model-name"] == "digits"
        assert client.post("/v1/models/digits/vae/encode", json={"inputs": ROW}).headers["x-model-version"] == "2"
        nine = [[1, 0, 1, 0, 1, 0, 1, 0, 1]]
        answer = client.post("/v1/models/wide/autoencoder/encode", json={"inputs": nine}).json()
        np.testing.assert_array_equal(answer["codes"], codes(wide, nine))
        # The default model's routes have no model to answer in a repository without one named default.
        missing = client.post("/v1/autoencoder/encode", json={"inputs": ROW})
        assert missing.status_code == 404
        assert "no model 'default'; this server serves: digits, wide" in missing.json()["detail"]
        narrow = client.post("/v1/models/wide/autoencoder/encode", json={"inputs": ROW})
        assert narrow.status_code == 422
        assert "input_dim is 9" in narrow.text


def test_the_listing_names_every_version_its_state_and_its_routes(repo: Path) -> None:
    model = put(repo, "digits", 1, seed=1)
    (repo / "digits" / "2").mkdir()  # no file yet
    (repo / "digits" / "config.json").write_text(json.dumps({"description": "MNIST, binarized"}))
    with serve(repo, root_path="/api") as client:
        listed = client.get("/v1/models").json()["models"]  # a proxy stripped /api
        assert [entry["name"] for entry in listed] == ["digits"]
        (digits,) = listed
        assert (digits["state"], digits["description"]) == ("READY", "MNIST, binarized")
        first, second = digits["versions"]
        assert first | {"loaded_at": None} == {
            "version": 1,
            "state": "READY",
            "reason": "",
            "input_dim": 5,
            "latent_dim": 2,
            "fingerprint": model.fingerprint(),
            "loaded_at": None,
            "routes": {
                "autoencoder/encode": "/api/v1/models/digits/versions/1/autoencoder/encode",
                "vae/encode": "/api/v1/models/digits/versions/1/vae/encode",
            },
        }
        assert (second["state"], second["routes"]) == ("UNAVAILABLE", {})
        assert "holds no model.safetensors or model.npz" in second["reason"]
        for url in digits["routes"].values():
            assert client.post(url.removeprefix("/api"), json={"inputs": ROW}).status_code == 200
        info = client.get("/v1/models/digits/versions/1").json()
        assert (info["name"], info["version"], info["fingerprint"]) == ("digits", 1, model.fingerprint())


def test_a_bad_file_is_not_served_and_says_why_while_the_others_serve(repo: Path) -> None:
    put(repo, "digits", 1, seed=1)
    (repo / "digits" / "2").mkdir()
    (repo / "digits" / "2" / "model.safetensors").write_bytes(b"not weights")
    (repo / "broken").mkdir()
    (repo / "broken" / "1").mkdir()
    np.savez(repo / "broken" / "1" / "model.npz", nothing=np.zeros(2))
    with serve(repo) as client:
        assert client.post("/v1/models/digits/vae/encode", json={"inputs": ROW}).headers["x-model-version"] == "1"
        index = client.post("/v2/repository/index", json={}).json()
        reasons = {(row["name"], row["version"]): (row["state"], row["reason"]) for row in index}
        assert reasons[("digits", "1")] == ("READY", "")
        assert reasons[("digits", "2")][0] == "UNAVAILABLE"
        assert "not a valid .safetensors file" in reasons[("digits", "2")][1]
        assert "missing array 'autoencoder.weight'" in reasons[("broken", "1")][1]
        assert [row["name"] for row in client.post("/v2/repository/index", json={"ready": True}).json()] == ["digits"]
        response = client.post("/v1/models/broken/autoencoder/encode", json={"inputs": ROW})
        assert response.status_code == 503
        assert "missing array" in response.json()["detail"]
        v2 = client.post("/v2/models/broken/infer", json=_tensor(ROW))
        assert (v2.status_code, "missing array" in v2.json()["error"]) == (503, True)


def test_a_reload_that_fails_keeps_what_was_served(repo: Path) -> None:
    model = put(repo, "digits", 1, seed=1)
    with serve(repo) as client:
        (repo / "digits" / "1" / "model.safetensors").write_bytes(b"half a file")
        answer = client.post("/v2/repository/models/digits/load")
        assert answer.status_code == 200  # the version is still served
        (row,) = answer.json()
        assert row["state"] == "READY"
        assert "not a valid .safetensors file" in row["reason"]
        assert "still serving what was loaded at" in row["reason"]
        response = client.post("/v1/models/digits/autoencoder/encode", json={"inputs": ROW})
        np.testing.assert_array_equal(response.json()["codes"], codes(model, ROW))


def test_load_serves_new_versions_and_unload_stops_every_one(repo: Path) -> None:
    put(repo, "digits", 1, seed=1)
    with serve(repo) as client:
        three = put(repo, "digits", 3, seed=3)
        assert client.post("/v1/models/digits/vae/encode", json={"inputs": ROW}).headers["x-model-version"] == "1"
        loaded = client.post("/v2/repository/models/digits/load", json={"parameters": {}})
        assert [row["version"] for row in loaded.json()] == ["1", "3"]
        response = client.post("/v1/models/digits/autoencoder/encode", json={"inputs": ROW})
        np.testing.assert_array_equal(response.json()["codes"], codes(three, ROW))
        assert client.post("/v2/repository/models/digits/unload").status_code == 200
        gone = client.post("/v1/models/digits/autoencoder/encode", json={"inputs": ROW})
        assert gone.status_code == 404
        assert "is unloaded" in gone.json()["detail"]
        assert client.get("/v2/models/digits/ready").status_code == 404
        index = client.post("/v2/repository/index").json()
        assert index == [{"name": "digits", "version": "", "state": "UNAVAILABLE", "reason": "unloaded"}]
        assert client.post("/v2/repository/models/digits/load").status_code == 200
        assert client.get("/v2/models/digits/versions/3/ready").status_code == 200
        missing = client.post("/v2/repository/models/nothing/load")
        assert (missing.status_code, missing.json()) == (404, {"error": "no model 'nothing' in the repository"})


def test_config_chooses_versions_and_tightens_limits(repo: Path) -> None:
    for version in (1, 2, 3):
        put(repo, "digits", version, seed=version)
    config = repo / "digits" / "config.json"
    config.write_text(json.dumps({"versions": [1, 2], "max_rows": 2}))
    with serve(repo, max_rows=100) as client:
        assert client.get("/v2/models/digits").json()["versions"] == ["1", "2"]
        over = client.post("/v1/models/digits/autoencoder/encode", json={"inputs": ROW * 3})
        assert over.status_code == 413
        assert over.json()["detail"] == "3 rows is more than the limit of 2 (max_rows in digits/config.json)"
        over2 = client.post("/v2/models/digits/infer", json=_tensor(ROW * 3))
        assert over2.status_code == 413  # the same mistake means the same on /v2
        config.write_text(json.dumps({"latest": 1}))
        client.post("/v2/repository/models/digits/load")
        assert client.get("/v2/models/digits").json()["versions"] == ["3"]
        config.write_text("{not json")
        answer = client.post("/v2/repository/models/digits/load")
        assert answer.status_code == 200  # version 3 keeps serving
        assert "config.json: invalid JSON" in answer.json()[0]["reason"]
        config.write_text(json.dumps({"max_rows": 0, "colour": "red"}))
        answer = client.post("/v2/repository/models/digits/load")
        assert "max_rows: Input should be greater than or equal to 1" in answer.json()[0]["reason"]


@pytest.mark.parametrize(
    "name", ["..", ".hidden", "-x", "a" * 65, "a..b", "%2e%2e", "x%00y", "%2Fetc", "a%2Fb", "vae%00", " x"]
)
def test_names_that_could_leave_the_repository_are_refused(repo: Path, name: str) -> None:
    put(repo, "digits", 1, seed=1)
    with serve(repo) as client:
        for verb in ("load", "unload"):
            response = client.post(f"/v2/repository/models/{name}/{verb}")
            assert response.status_code in (400, 404), (name, response.text)
            assert len(response.content) < 300  # never echoed whole


def test_links_out_of_the_repository_are_not_followed(repo: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    put(outside, "secret", 1, seed=9)
    (repo / "secret").symlink_to(outside / "secret")  # a model folder that leads out
    put(repo, "digits", 1, seed=1)
    (repo / "digits" / "2").mkdir()
    (repo / "digits" / "2" / "model.safetensors").symlink_to(outside / "secret" / "1" / "model.safetensors")
    (repo / "digits" / "3").symlink_to(outside / "secret" / "1")  # a version folder that leads out
    with serve(repo) as client:
        assert [m["name"] for m in client.get("/v1/models").json()["models"]] == ["digits"]
        index = {row["version"]: row for row in client.post("/v2/repository/index").json()}
        assert sorted(index) == ["1", "2"]
        assert "leads outside the repository" in index["2"]["reason"]
        assert client.post("/v2/repository/models/secret/load").status_code == 404


def test_reserved_names_are_not_served(repo: Path) -> None:
    put(repo, "vae", 1, seed=1)
    with serve(repo) as client:
        (row,) = client.post("/v2/repository/index").json()
        assert row["state"] == "UNAVAILABLE"
        assert "reserved" in row["reason"]


def test_polling_serves_new_versions_and_drops_removed_ones(repo: Path) -> None:
    put(repo, "digits", 1, seed=1)
    with serve(repo, repository_poll=0.1) as client:
        two = put(repo, "digits", 2, seed=2)
        _until(
            lambda: (
                client.post("/v1/models/digits/vae/encode", json={"inputs": ROW}).headers.get("x-model-version") == "2"
            )
        )
        response = client.post("/v1/models/digits/autoencoder/encode", json={"inputs": ROW})
        np.testing.assert_array_equal(response.json()["codes"], codes(two, ROW))
        new = put(repo, "letters", 1, seed=5)
        _until(lambda: client.post("/v1/models/letters/autoencoder/encode", json={"inputs": ROW}).status_code == 200)
        np.testing.assert_array_equal(
            client.post("/v1/models/letters/autoencoder/encode", json={"inputs": ROW}).json()["codes"], codes(new, ROW)
        )
        for path in (repo / "digits" / "2").iterdir():
            path.unlink()
        (repo / "digits" / "2").rmdir()
        _until(
            lambda: (
                client.post("/v1/models/digits/vae/encode", json={"inputs": ROW}).headers.get("x-model-version") == "1"
            )
        )


def test_train_writes_the_next_version_whole(repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bits.npy"
    np.save(data, np.random.default_rng(0).integers(0, 2, size=(60, 6)))
    for expected in ("1", "2"):
        assert cli(["train", str(data), "--repository", str(repo), "--name", "bits", "--epochs", "2"]) == 0
        version = repo / "bits" / expected
        assert sorted(p.name for p in version.iterdir()) == ["model.safetensors", "report.json"]
        assert (
            json.loads((version / "report.json").read_text())["fingerprint"]
            == weights.load(version / "model.safetensors").fingerprint()
        )
    assert sorted(p.name for p in (repo / "bits").iterdir()) == ["1", "2"]  # no staging left behind
    assert f"wrote {repo / 'bits' / '2' / 'model.safetensors'}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli(["train", str(data), "--repository", str(repo), "--name", "../escape"])
    with pytest.raises(SystemExit):
        cli(["train", str(data), "--repository", str(repo)])


def test_without_a_repository_nothing_changes(client: TestClient) -> None:
    listed = client.get("/v1/models").json()["models"]
    assert [(m["name"], [v["version"] for v in m["versions"]]) for m in listed] == [("default", [1])]
    same = [
        client.post(path, json={"inputs": ROW}).json()
        for path in ("/v1/autoencoder/encode", "/v1/models/default/autoencoder/encode")
    ]
    assert same[0] == same[1]
    answer = client.post("/v1/autoencoder/encode", json={"inputs": ROW})
    assert "x-model-name" not in answer.headers  # one model: answers as they were before models had names
    refused = client.post("/v2/repository/models/default/load")
    assert (refused.status_code, "ENCODER_MODEL_REPOSITORY" in refused.json()["error"]) == (400, True)


def test_a_missing_repository_refuses_to_start(tmp_path: Path) -> None:
    from service.web.errors import StartupError

    with pytest.raises(StartupError, match="not a directory"), serve(tmp_path / "nowhere"):
        pass


def _tensor(rows: list[list[int]]) -> dict[str, Any]:
    flat = [bit for row in rows for bit in row]
    return {"inputs": [{"name": "input", "shape": [len(rows), len(rows[0])], "datatype": "INT32", "data": flat}]}


def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("ENCODER_")]:
        monkeypatch.delenv(key)


def test_the_client_addresses_a_model_and_a_version(repo: Path) -> None:
    from service.client import AsyncClient, Client, ServiceError
    from tests.conftest import start_server

    one, two = put(repo, "digits", 1, seed=1), put(repo, "digits", 2, seed=2)
    live = start_server(model_repository=str(repo))
    try:
        with Client(live.url) as client:
            assert [m["name"] for m in client.models()] == ["digits"]
            np.testing.assert_array_equal(client.encode(ROW, model="digits"), codes(two, ROW))
            np.testing.assert_array_equal(client.encode(ROW, model="digits", version=1), codes(one, ROW))
            assert client.model_info(model="digits", version=1)["fingerprint"] == one.fingerprint()
            same = client.vae(ROW, samples=2, seed=8, model="digits", version=1)
            body = {"inputs": ROW, "samples": 2, "seed": 8}
            direct = httpx.post(f"{live.url}/v1/models/digits/versions/1/vae/encode", json=body).json()
            np.testing.assert_array_equal(same.z, direct["z"])
            with pytest.raises(ServiceError, match="404: no model 'default'"):
                client.encode(ROW)
        with Client(live.url, model="digits", version=1) as pinned:
            np.testing.assert_array_equal(pinned.encode(ROW), codes(one, ROW))

        async def listed() -> list[str]:
            async with AsyncClient(live.url, model="digits") as client:
                np.testing.assert_array_equal(await client.encode(ROW), codes(two, ROW))
                return [m["name"] for m in await client.models()]

        assert asyncio.run(listed()) == ["digits"]
    finally:
        live.stop()


def test_repository_operations_need_the_api_key(repo: Path) -> None:
    put(repo, "digits", 1, seed=1)
    with serve(repo, api_key="s3cret-key") as client:
        for path in (
            "/v2/repository/index",
            "/v2/repository/models/digits/load",
            "/v2/repository/models/digits/unload",
        ):
            refused = client.post(path)
            assert refused.status_code == 401
            assert "error" in refused.json()  # the protocol's shape
        assert (
            client.post("/v2/repository/models/digits/unload", headers={"x-api-key": "s3cret-key"}).status_code == 200
        )
        assert client.post("/v1/models/digits/vae/encode", json={"inputs": ROW}).status_code == 401


def test_unloading_frees_the_weights_once_no_request_holds_them(repo: Path) -> None:
    import gc
    import weakref

    put(repo, "digits", 1, seed=1)
    with serve(repo) as client:
        core = client.app_state["core"]
        weight = weakref.ref(core.repository.latest["digits"].model.ae_weight)
        assert client.post("/v1/models/digits/autoencoder/encode", json={"inputs": ROW}).status_code == 200
        client.app.request_log.flush()  # type: ignore[attr-defined]  # the access log keeps who answered until then
        client.post("/v2/repository/models/digits/unload")
        gc.collect()
        assert weight() is None  # nothing else held them: their memory is the allocator's again


@pytest.mark.parametrize("api_key", ["s3cret-key", None])
def test_an_admin_key_alone_loads_and_unloads(repo: Path, api_key: str | None) -> None:
    put(repo, "digits", 1, seed=1)
    admin = {"authorization": "Bearer admin-key-0123"}
    user = {"x-api-key": "s3cret-key"} if api_key else {}
    with serve(repo, api_key=api_key, admin_api_key="admin-key-0123") as client:
        for verb in ("unload", "load"):
            path = f"/v2/repository/models/digits/{verb}"
            assert client.post(path).status_code == 401
            if api_key:
                refused = client.post(path, headers=user)
                assert refused.status_code == 403
                assert "admin key (ENCODER_ADMIN_API_KEY)" in refused.json()["error"]
            assert client.post(path, headers=admin).status_code == 200
        assert client.post("/v2/repository/index", headers=user).status_code == 200
        assert client.post("/v2/repository/index", headers=admin).status_code == 200
        encode = client.post("/v1/models/digits/vae/encode", json={"inputs": ROW}, headers=user)
        assert encode.status_code == 200  # open without API keys; with them, the user's key works
        spec = client.get("/openapi.json").json()["paths"]
        assert "security" in spec["/v2/repository/models/{model_name}/load"]["post"]
        assert ("security" in spec["/v1/models/{model_name}/vae/encode"]["post"]) == bool(api_key)
