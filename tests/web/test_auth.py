"""API keys and CORS: closed to strangers when configured, open to the probes, quiet about keys."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import create_app
from service.web.auth import Keys
from tests.conftest import run_app

ROW = {"inputs": [[0, 1, 1, 0, 1]]}
KEY = "s3cret-key-0123456789"


@pytest.fixture
def locked() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(api_key=KEY))) as client:
        yield client


@pytest.mark.parametrize("path", ["/v1/autoencoder/encode", "/v1/vae/encode"])
def test_encode_routes_need_a_valid_key(locked: TestClient, path: str) -> None:
    missing = locked.post(path, json=ROW)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="encoding-service"'
    assert "API key is required" in missing.json()["detail"]
    wrong = locked.post(path, json=ROW, headers={"authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"].endswith('error="invalid_token"')
    assert KEY not in wrong.text
    assert locked.post(path, json=ROW, headers={"authorization": f"Bearer {KEY}"}).status_code == 200
    assert locked.post(path, json=ROW, headers={"authorization": f"bearer {KEY}"}).status_code == 200
    assert locked.post(path, json=ROW, headers={"x-api-key": KEY}).status_code == 200
    assert locked.post(path, json=ROW, headers={"authorization": f"Basic {KEY}"}).status_code == 401


def test_model_info_needs_a_key_and_probes_do_not(locked: TestClient) -> None:
    assert locked.get("/v1/model").status_code == 401
    assert locked.get("/v1/model", headers={"x-api-key": KEY}).status_code == 200
    for path in ("/healthz", "/readyz", "/metrics", "/docs", "/redoc", "/openapi.json"):
        assert locked.get(path).status_code == 200, path


def test_docs_can_be_closed_too() -> None:
    with TestClient(create_app(Settings(api_key=KEY, docs_public=False))) as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs-assets/swagger-ui.css"):
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"x-api-key": KEY}).status_code == 200, path
        assert client.get("/healthz").status_code == 200


def test_the_spec_shows_the_security_schemes_only_when_keys_are_required(
    locked: TestClient, client: TestClient
) -> None:
    spec = locked.get("/openapi.json").json()
    assert set(spec["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    assert spec["paths"]["/v1/vae/encode"]["post"]["security"] == [{"bearer": []}, {"apiKey": []}]
    assert "401" in spec["paths"]["/v1/vae/encode"]["post"]["responses"]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert "securitySchemes" not in client.get("/openapi.json").json()["components"]


def test_keys_never_reach_the_log(locked: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        locked.post("/v1/vae/encode", json=ROW, headers={"authorization": f"Bearer {KEY}"})
        locked.post("/v1/vae/encode", json=ROW, headers={"x-api-key": KEY + "x"})
    assert caplog.records
    assert all(KEY not in str(record.__dict__) for record in caplog.records)


def test_a_keys_file_rotates_without_a_restart(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# one key a line\nold-key\n")
    with TestClient(create_app(Settings(api_keys_file=keys))) as client:
        assert client.post("/v1/vae/encode", json=ROW, headers={"x-api-key": "old-key"}).status_code == 200
        keys.write_text("old-key\n# added for the rotation\nnew-key\n")
        os.utime(keys, ns=(time.time_ns(), time.time_ns() + 10**9))
        time.sleep(1.1)  # the file is looked at again at most once a second
        assert client.post("/v1/vae/encode", json=ROW, headers={"x-api-key": "new-key"}).status_code == 200
        keys.write_text("new-key\n")
        os.utime(keys, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
        time.sleep(1.1)
        assert client.post("/v1/vae/encode", json=ROW, headers={"x-api-key": "old-key"}).status_code == 401
        assert client.post("/v1/vae/encode", json=ROW, headers={"x-api-key": "new-key"}).status_code == 200


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "cannot be read"),
        ("# only a comment\n", "holds no key"),
        ("good-key\nsecret # a comment after a key\n", "line 2 is not a key"),
        ("good-key\n".encode("utf-16"), "is not UTF-8 text"),
    ],
)
def test_a_bad_keys_file_refuses_to_start_with_one_line(
    tmp_path: Path, content: str | bytes | None, problem: str
) -> None:
    keys = tmp_path / "keys"
    if content is not None:
        keys.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = run_app(api_keys_file=str(keys))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"API keys file {str(keys)!r}: {problem}" in result.stderr


def test_a_hash_inside_a_key_is_part_of_it(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# the keys\n  abc#def-long-secret  \n")
    with TestClient(create_app(Settings(api_keys_file=keys))) as client:
        for key, status in [("abc", 401), ("abc#def", 401), ("abc#def-long-secret", 200)]:
            assert client.post("/v1/vae/encode", json=ROW, headers={"x-api-key": key}).status_code == status, key


def _touch_later(path: Path, seconds: int) -> None:
    """Move a file's mtime ahead, so that a rewrite within the same clock tick is seen as a change."""
    os.utime(path, ns=(time.time_ns(), time.time_ns() + seconds * 10**9))


def test_a_keys_file_gone_bad_at_run_time_keeps_the_last_good_keys(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Keys, "RECHECK", 0.0)  # looked at before every request
    keys = tmp_path / "keys"
    keys.write_text("the-key\n")
    with TestClient(create_app(Settings(api_keys_file=keys))) as client:
        assert client.post("/v1/vae/encode", json=ROW, headers={"x-api-key": "the-key"}).status_code == 200
        for step, bad in enumerate(["the-key\nnew-key\n".encode("utf-16"), b"the-key\nnew key with spaces\n"], 1):
            keys.write_bytes(bad)
            _touch_later(keys, step)
            for _ in range(3):  # the file is looked at again each time
                answer = client.post("/v1/vae/encode", json=ROW, headers={"x-api-key": "the-key"})
                assert answer.status_code == 200
                assert client.post("/v1/vae/encode", json=ROW, headers={"x-api-key": "new-key"}).status_code == 401
        keys.unlink()  # removed: the keys read last stay
        assert client.post("/v1/vae/encode", json=ROW, headers={"x-api-key": "the-key"}).status_code == 200
        keys.write_text("new-key\n")  # good again: read at once
        _touch_later(keys, 3)
        assert client.post("/v1/vae/encode", json=ROW, headers={"x-api-key": "new-key"}).status_code == 200
        assert client.post("/v1/vae/encode", json=ROW, headers={"x-api-key": "the-key"}).status_code == 401
    warnings = [r.getMessage() for r in caplog.records if r.name == "service.auth"]
    assert len(warnings) == 3, warnings  # each problem once, not once a second
    assert "is not UTF-8 text" in warnings[0]
    assert "the 1 key(s) read before stay valid" in warnings[0]
    assert "line 2 is not a key" in warnings[1]
    assert "No such file or directory" in warnings[2]


@pytest.mark.parametrize("variable", ["api_key", "admin_api_key"])
def test_an_empty_key_setting_is_refused_by_name(variable: str) -> None:
    result = run_app(**{variable: ""})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert f"ENCODER_{variable.upper()}: Value error, is empty: unset it to leave the API open" in result.stderr
    assert "None" not in result.stderr


def test_cors_is_off_by_default(client: TestClient) -> None:
    response = client.post("/v1/vae/encode", json=ROW, headers={"origin": "https://app.example"})
    assert "access-control-allow-origin" not in response.headers


def test_cors_allows_the_configured_origins_only() -> None:
    settings = Settings(cors_origins="https://app.example, https://other.example", api_key=KEY)  # type: ignore[arg-type]
    with TestClient(create_app(settings)) as client:
        preflight = client.options(
            "/v1/vae/encode",
            headers={
                "origin": "https://app.example",
                "access-control-request-method": "POST",
                "access-control-request-headers": "authorization, content-type",
            },
        )
        assert preflight.status_code == 200  # preflights carry no key, and need none
        assert preflight.headers["access-control-allow-origin"] == "https://app.example"
        response = client.post("/v1/vae/encode", json=ROW, headers={"origin": "https://app.example", "x-api-key": KEY})
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert "x-request-id" in response.headers["access-control-expose-headers"]
        stranger = client.post("/v1/vae/encode", json=ROW, headers={"origin": "https://evil.example", "x-api-key": KEY})
        assert "access-control-allow-origin" not in stranger.headers
