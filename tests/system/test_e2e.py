"""End to end against real uvicorn processes on 127.0.0.1, as a client in any language sees it."""

from __future__ import annotations

import json
import math
import sys

import httpx
import numpy as np

from tests.conftest import CLEAN_EXIT, Server, read_until_closed, start_server

ROWS = [[0, 1, 1, 0, 1], [1, 0, 0, 1, 0]]


def reproduce(seed: int, rows: list[list[int]], samples: int, weights_seed: int = 0) -> np.ndarray:
    """z from the recipe of docs/api.md (reproducibility contract), with numpy alone: no import from the service."""
    d, k = 5, 2
    rng = np.random.default_rng(weights_seed)
    rng.standard_normal((d, k))  # the autoencoder's W comes first
    w_mu = rng.standard_normal((d, k)) / math.sqrt(d)
    w_ls = rng.standard_normal((d, k)) / math.sqrt(d)
    x = np.array(rows, dtype=np.float64)
    mu, log_sigma = x @ w_mu, x @ w_ls
    eps = np.random.default_rng(seed).standard_normal((len(rows), samples, k))
    return mu[:, None, :] + np.exp(log_sigma)[:, None, :] * eps


def test_every_endpoint_over_real_http(live: Server) -> None:
    with httpx.Client(base_url=live.url) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        ready = http.get("/readyz").json()
        info = http.get("/v1/model").json()
        assert ready["fingerprint"] == info["fingerprint"]
        codes = http.post("/v1/autoencoder/encode", json={"inputs": ROWS}).json()["codes"]
        assert len(codes) == 2
        assert all(len(c) == 2 and min(c) >= 0 for c in codes)
        vae = http.post("/v1/vae/encode", json={"inputs": ROWS, "samples": 3, "seed": 42}).json()
        np.testing.assert_array_equal(vae["z"], reproduce(42, ROWS, 3))
        drawn = http.post("/v1/vae/encode", json={"inputs": ROWS}).json()
        np.testing.assert_array_equal(drawn["z"], reproduce(drawn["seed"], ROWS, 1))
        spec = http.get("/openapi.json").json()
        assert spec["info"]["title"] == "encoding-service"
        assert http.get("/docs").status_code == 200


def test_client_mistakes_over_real_http(live: Server) -> None:
    with httpx.Client(base_url=live.url) as http:
        bad = http.post("/v1/vae/encode", json={"inputs": [[0, 1, 1, 0, 2]]})
        assert bad.status_code == 422
        assert bad.json()["detail"][0]["loc"] == ["body", "inputs", 0, 4]
        nan = http.post(
            "/v1/vae/encode", content=b'{"inputs": [[NaN, 1, 1, 0, 1]]}', headers={"content-type": "application/json"}
        )
        assert nan.status_code == 422
        assert "invalid JSON" in nan.text
        big = http.post(
            "/v1/autoencoder/encode",
            content=b"[" + b"0," * 9_000_000 + b"0]",
            headers={"content-type": "application/json"},
        )
        assert big.status_code == 413
        assert "16777216 bytes" in big.json()["detail"]
        assert http.get("/healthz").status_code == 200  # still serving


def test_a_declared_oversized_body_is_refused_before_it_is_sent(live: Server) -> None:
    with live.connect(timeout=5) as sock:
        sock.sendall(
            b"POST /v1/autoencoder/encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000\r\n\r\n"
        )
        reply = read_until_closed(sock).decode()  # the 413 closes the connection
    assert reply.startswith("HTTP/1.1 413")
    assert json.loads(reply.split("\r\n\r\n", 1)[1])["detail"].startswith("request body is larger than the limit")


def test_two_replicas_serve_the_same_model_and_the_same_samples() -> None:
    servers = [start_server(seed="3"), start_server(seed="3")]
    try:
        body = {"inputs": ROWS, "samples": 5, "seed": 2**63 - 1}
        infos = [httpx.get(f"{s.url}/v1/model").json() for s in servers]
        answers = [httpx.post(f"{s.url}/v1/vae/encode", json=body).json() for s in servers]
        assert infos[0]["fingerprint"] == infos[1]["fingerprint"]
        assert answers[0] == answers[1]
        np.testing.assert_array_equal(answers[0]["z"], reproduce(2**63 - 1, ROWS, 5, weights_seed=3))
    finally:
        for server in servers:
            assert server.stop() in CLEAN_EXIT


def test_the_cli_serves_as_the_readme_says() -> None:
    command = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
    server = start_server(command, latent_dim="3")
    try:
        assert httpx.get(f"{server.url}/v1/model").json()["latent_dim"] == 3
        assert server.url.startswith("http://127.0.0.1:")  # the default host is loopback
    finally:
        assert server.stop() in CLEAN_EXIT
