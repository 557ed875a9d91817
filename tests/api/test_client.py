"""The Python client against a live server, and its retries against a flaky transport."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from service.client import AsyncClient, Client, ServiceError
from tests.conftest import Server

ROWS = np.array([[0, 1, 1, 0, 1], [1, 0, 0, 1, 0]])


@pytest.fixture
def client(live: Server) -> Client:
    with Client(live.url) as client:
        yield client  # type: ignore[misc]


def test_encode_and_vae_give_the_servers_numbers(live: Server, client: Client) -> None:
    v1 = httpx.post(f"{live.url}/v1/autoencoder/encode", json={"inputs": ROWS.tolist()}).json()
    np.testing.assert_array_equal(client.encode(ROWS), v1["codes"])
    result = client.vae(ROWS, samples=3, seed=42)
    direct = httpx.post(f"{live.url}/v1/vae/encode", json={"inputs": ROWS.tolist(), "samples": 3, "seed": 42}).json()
    np.testing.assert_array_equal(result.z, direct["z"])
    np.testing.assert_array_equal(result.kl, direct["kl"])
    assert result.seed == 42
    assert result.z.shape == (2, 3, 2)
    assert client.model_info()["input_dim"] == 5


def test_without_a_seed_the_client_picks_one_that_reproduces(client: Client) -> None:
    first = client.vae(ROWS, samples=2)
    again = client.vae(ROWS, samples=2, seed=first.seed)
    np.testing.assert_array_equal(first.z, again.z)


def test_packed_and_json_transports_agree(client: Client) -> None:
    bits = np.random.default_rng(0).integers(0, 2, size=(3000, 5))
    packed, plain = client.encode(bits, packed=True), client.encode(bits, packed=False)
    np.testing.assert_array_equal(packed, plain)
    auto = client.vae(bits, seed=1)  # 15,000 values: packed, with a safetensors answer
    np.testing.assert_array_equal(auto.z, client.vae(bits, seed=1, packed=False).z)
    assert auto.seed == 1


def test_errors_carry_the_servers_message(client: Client) -> None:
    with pytest.raises(ServiceError) as error:
        client.encode(np.array([[0, 1, 2, 0, 1]]), packed=False)
    assert error.value.status == 422
    assert error.value.detail[0]["msg"] == "row 0, column 2: expected 0 or 1, got 2"
    with pytest.raises(ServiceError) as error:
        client.vae(ROWS, samples=5000)
    assert error.value.status == 413
    assert "5000 samples is more than the limit" in error.value.detail
    with pytest.raises(ValueError, match="every value must be 0 or 1"):
        client.encode(np.array([[0, 1, 2, 0, 1]]), packed=True)


def test_the_async_client_gives_the_same_numbers(live: Server, client: Client) -> None:
    async def run() -> tuple[np.ndarray, np.ndarray]:
        async with AsyncClient(live.url) as remote:
            codes, vae = await asyncio.gather(remote.encode(ROWS), remote.vae(ROWS, samples=2, seed=7))
            return codes, vae.z

    codes, z = asyncio.run(run())
    np.testing.assert_array_equal(codes, client.encode(ROWS))
    np.testing.assert_array_equal(z, client.vae(ROWS, samples=2, seed=7).z)


def test_connection_errors_are_retried_with_the_same_request() -> None:
    seen: list[bytes] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        seen.append(request.content)
        if len(seen) < 3:
            raise httpx.ConnectError("refused", request=request)
        z = [[[0.5, 0.25]]]
        return httpx.Response(200, json={"mu": [[0, 0]], "log_sigma": [[0, 0]], "z": z, "kl": [0], "seed": 3})

    with Client("http://test", transport=httpx.MockTransport(flaky), retries=2) as client:
        assert client.vae([[1, 0, 1, 0, 1]]).z.tolist() == [[[0.5, 0.25]]]
    assert len(seen) == 3
    assert seen[0] == seen[1] == seen[2]  # the same seed each time: a retry cannot change z
    with Client("http://test", transport=httpx.MockTransport(flaky), retries=0) as client:
        seen.clear()
        with pytest.raises(httpx.ConnectError):
            client.encode([[1, 0, 1, 0, 1]])


def test_the_api_key_is_sent(live: Server) -> None:
    def check(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer k3y"
        return httpx.Response(200, json={"codes": [[1.0, 2.0]]})

    with Client("http://test", api_key="k3y", transport=httpx.MockTransport(check)) as client:
        assert client.encode([[1, 0, 1, 0, 1]]).tolist() == [[1.0, 2.0]]
