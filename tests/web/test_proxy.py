"""Behind a reverse proxy: a stripped path prefix (root path) and X-Forwarded-* from trusted proxies,
through real server processes: `uvicorn --root-path`, ENCODER_ROOT_PATH, `encoding-service serve`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ROOT, Server, start_server

UVICORN = [sys.executable, "-m", "uvicorn", "service.main:app", "--host", "127.0.0.1", "--port", "{port}"]
SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
SPEC = json.loads((ROOT / "openapi/openapi.json").read_text())


@pytest.fixture(
    scope="module",
    params=["uvicorn --root-path", "ENCODER_ROOT_PATH", "serve --root-path", "serve, ENCODER_ROOT_PATH"],
)
def prefixed(request: pytest.FixtureRequest) -> Iterator[Server]:
    """A server told that a proxy in front strips /api, in each of the ways docs/operations.md gives."""
    command, settings = {
        "uvicorn --root-path": ([*UVICORN, "--root-path", "/api"], {}),
        "ENCODER_ROOT_PATH": (UVICORN, {"root_path": "/api"}),
        "serve --root-path": ([*SERVE, "--root-path", "/api"], {}),
        "serve, ENCODER_ROOT_PATH": (SERVE, {"root_path": "/api"}),
    }[request.param]
    server = start_server(command, **settings)
    try:
        yield server
    finally:
        server.stop()


def _examples() -> Iterator[tuple[str, str, object]]:
    schemas = SPEC["components"]["schemas"]
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            if "requestBody" in op:
                ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
                body = schemas[ref.rsplit("/", 1)[1]]["examples"][0]
            else:
                body = None
            yield method.upper(), path.replace("{model_name}", "default").replace("{model_version}", "1"), body


def test_every_route_works_behind_a_stripped_prefix(prefixed: Server) -> None:
    for method, path, body in _examples():  # the proxy stripped /api: requests arrive without it
        response = httpx.request(method, prefixed.url + path, json=body)
        expected = 409 if path.endswith(("/decode", "/reconstruct")) else 200  # seeded weights: no decoder
        expected = 400 if path.endswith(("/load", "/unload")) else expected  # no repository to load from
        assert response.status_code == expected, (method, path, response.text)
    metrics = httpx.get(prefixed.url + "/metrics").text
    assert 'route="/v1/vae/encode",status="200"' in metrics  # labels are the routes, not "unmatched"
    assert 'route="unmatched"' not in metrics


def test_docs_load_the_spec_from_under_the_prefix(prefixed: Server) -> None:
    for page in ("/docs", "/redoc"):
        html = httpx.get(prefixed.url + page).text
        assert "'/api/openapi.json'" in html or '"/api/openapi.json"' in html, page
        assert "/api/docs-assets/" in html, page
    spec = httpx.get(prefixed.url + "/openapi.json").json()
    assert spec["servers"] == [{"url": "/api"}]  # "Try it out" calls the API through the prefix
    assert httpx.get(prefixed.url + "/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_errors_keep_each_apis_shape_behind_a_prefix(prefixed: Server) -> None:
    v1 = httpx.post(prefixed.url + "/v1/autoencoder/encode", json={"inputs": [[0, 1, 2, 0, 1]]})
    assert v1.status_code == 422
    assert "detail" in v1.json()
    v2 = httpx.post(prefixed.url + "/v2/models/vae/infer", content=b"{")
    assert v2.status_code == 400
    assert "error" in v2.json()


def test_a_bad_root_path_is_refused_with_a_message() -> None:
    from service.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--root-path", "/api/"])
    assert exit_.value.code == 2


def _logged_clients(server: Server, request_id: str) -> list[str]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the access log is written in batches, within a second
        lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
        clients = [line["client"] for line in lines if line.get("request_id") == request_id]
        if clients:
            return clients
        time.sleep(0.1)
    raise AssertionError(f"no access log line for {request_id}: {server.output()}")


@pytest.mark.parametrize("command", [UVICORN, SERVE], ids=["uvicorn", "serve"])
def test_forwarded_headers_are_believed_only_from_trusted_proxies(command: list[str]) -> None:
    forwarded = {"x-forwarded-for": "203.0.113.7", "x-forwarded-proto": "https"}
    # uvicorn itself believes 127.0.0.1 unless told not to (docs/operations.md says so); serve believes none
    untrusted = start_server(command + ["--no-proxy-headers"] * (command is UVICORN), stdout=True)
    trusted = start_server(command, stdout=True, trusted_proxies="10.0.0.0/8, 127.0.0.1")
    try:
        httpx.get(untrusted.url + "/healthz", headers=forwarded | {"x-request-id": "off"})
        assert _logged_clients(untrusted, "off") == ["127.0.0.1"]  # off by default: the proxy is the client
        httpx.get(trusted.url + "/healthz", headers=forwarded | {"x-request-id": "on"})
        assert _logged_clients(trusted, "on") == ["203.0.113.7"]
        spec = httpx.get(trusted.url + "/docs", headers=forwarded)
        assert spec.status_code == 200
    finally:
        untrusted.stop()
        trusted.stop()
