"""The Python client against a live server, and its retries against a flaky transport."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from service.client import AsyncClient, Client, ServiceError
from service.models import weights
from tests.conftest import Server, start_server

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
        client.encode(np.ones((2, 6)), packed=False)
    assert error.value.status == 422
    assert error.value.detail[0]["msg"] == "rows have 6 values, but the model's input_dim is 5"
    with pytest.raises(ServiceError) as error:
        client.vae(ROWS, samples=5000)
    assert error.value.status == 413
    assert "5000 samples is more than the limit" in error.value.detail


@pytest.mark.parametrize("packed", [True, False])
def test_a_bad_bit_is_named_by_row_and_column_before_anything_is_sent(client: Client, packed: bool) -> None:
    bits = np.ones((3000, 5))
    bits[2345, 3] = 2
    with pytest.raises(ValueError, match=r"^row 2345, column 3: expected 0 or 1, got 2\.0$"):
        client.encode(bits, packed=packed)
    bits[2345, 3] = 0.5  # not rounded to 0 on the way
    with pytest.raises(ValueError, match=r"row 2345, column 3: expected 0 or 1, got 0\.5"):
        client.vae(bits, packed=packed)


def test_a_batch_of_the_wrong_width_is_never_answered_with_codes(client: Client) -> None:
    for shape in [(2000, 6), (2000, 4), (2, 6)]:  # packed above 4096 values, JSON below
        with pytest.raises(ServiceError) as error:
            client.encode(np.ones(shape))
        assert error.value.status == 422
        assert "5" in str(error.value.detail)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Server:
    """A server of trained weights (with decoders) and small row limits."""
    from service.models.train import train

    model, _ = train(np.random.default_rng(0).integers(0, 2, size=(200, 5)), seed=0, epochs=5)
    path = tmp_path_factory.mktemp("trained") / "model.safetensors"
    weights.save(model, path)
    server = start_server(weights=str(path), max_rows="10", max_rows_x_samples="30")
    yield server  # type: ignore[misc]
    server.stop()


def test_decode_and_reconstruct_give_the_servers_numbers(small: Server) -> None:
    live = small
    with Client(small.url) as client:
        codes = client.encode(ROWS)
        direct = httpx.post(f"{live.url}/v1/autoencoder/decode", json={"codes": codes.tolist()})
        np.testing.assert_array_equal(client.decode(codes), direct.json()["probabilities"])
        z = client.vae(ROWS, seed=3).z[:, 0, :]
        direct = httpx.post(f"{live.url}/v1/vae/decode", json={"z": z.tolist()})
        np.testing.assert_array_equal(client.decode(z, kind="vae"), direct.json()["probabilities"])
        for kind in ("autoencoder", "vae"):
            direct = httpx.post(f"{live.url}/v1/{kind}/reconstruct", json={"inputs": ROWS.tolist()})
            np.testing.assert_array_equal(client.reconstruct(ROWS, kind=kind), direct.json()["probabilities"])
        with pytest.raises(ValueError, match="kind must be one of autoencoder, vae"):
            client.decode(codes, kind="gan")


def test_a_batch_over_the_row_limit_is_split_and_its_seeds_reproduce(small: Server) -> None:
    server = small
    bits = np.random.default_rng(0).integers(0, 2, size=(25, 5))
    with Client(server.url) as client:
        codes = client.encode(bits)  # 413, then three requests of at most 10 rows
        chunks = [bits[start : start + 10].tolist() for start in (0, 10, 20)]
        each = [httpx.post(f"{server.url}/v1/autoencoder/encode", json={"inputs": rows}) for rows in chunks]
        np.testing.assert_array_equal(codes, np.vstack([answer.json()["codes"] for answer in each]))
        result = client.vae(bits, samples=4, seed=7)  # 7 rows a request: 4 x 7 <= 30 z vectors
        assert result.z.shape == (25, 4, 2)
        assert result.seed == 7
        np.testing.assert_array_equal(client.vae(bits, samples=4, seed=7).z, result.z)
        second = httpx.post(
            f"{server.url}/v1/vae/encode", json={"inputs": bits[7:14].tolist(), "samples": 4, "seed": 8}
        )  # request i of a split batch draws with seed + i
        np.testing.assert_array_equal(result.z[7:14], second.json()["z"])
        with pytest.raises(ValueError, match="rows of 6 values were given, but the model's are 5 wide"):
            client.encode(np.ones((30, 6)))  # the limits learned, the width is checked before sending
        big = np.random.default_rng(1).integers(0, 2, size=(25, 5))
        direct = [
            httpx.post(f"{server.url}/v1/autoencoder/reconstruct", json={"inputs": big[at : at + 10].tolist()})
            for at in (0, 10, 20)
        ]
        probabilities = np.vstack([answer.json()["probabilities"] for answer in direct])
        np.testing.assert_array_equal(client.reconstruct(big), probabilities)


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
