"""The HTTP API in-process: results, reproducibility, and a clear 4xx for every client mistake."""

from __future__ import annotations

import asyncio
import base64
import json
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from service.config import Settings
from service.main import create_app
from service.models import weights
from service.models.encoders import autoencode, seeded, vae_encode
from service.web.errors import validation_error_handler

ROWS = [[0, 1, 1, 0, 1], [1, 0, 0, 1, 0], [0, 0, 0, 0, 0]]
MODEL = seeded(0, 5, 2)


def test_autoencoder_codes_match_the_model(client: TestClient) -> None:
    response = client.post("/v1/autoencoder/encode", json={"inputs": ROWS})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    codes = response.json()["codes"]
    np.testing.assert_array_equal(codes, autoencode(MODEL, np.array(ROWS, dtype=np.float64)))


def test_vae_with_a_seed_is_reproducible_bit_for_bit(client: TestClient) -> None:
    body = {"inputs": ROWS, "samples": 4, "seed": 42}
    first = client.post("/v1/vae/encode", json=body).json()
    second = client.post("/v1/vae/encode", json=body).json()
    assert first == second
    expected = vae_encode(MODEL, np.array(ROWS, dtype=np.float64), 4, 42)
    assert first["seed"] == 42
    np.testing.assert_array_equal(first["z"], expected.z)  # JSON floats round-trip exactly
    np.testing.assert_array_equal(first["mu"], expected.mu)
    np.testing.assert_array_equal(first["log_sigma"], expected.log_sigma)
    np.testing.assert_array_equal(first["kl"], expected.kl)
    assert np.array(first["z"]).shape == (3, 4, 2)


def test_vae_without_a_seed_returns_the_seed_it_drew(client: TestClient) -> None:
    first = client.post("/v1/vae/encode", json={"inputs": ROWS, "samples": 2}).json()
    second = client.post("/v1/vae/encode", json={"inputs": ROWS, "samples": 2, "seed": None}).json()
    assert first["seed"] != second["seed"]  # 2**-63 odds of a false failure
    again = client.post("/v1/vae/encode", json={"inputs": ROWS, "samples": 2, "seed": first["seed"]}).json()
    assert again == first


def test_concurrent_requests_do_not_share_a_random_state(client: TestClient) -> None:
    expected = {seed: client.post("/v1/vae/encode", json={"inputs": ROWS, "seed": seed}).json() for seed in range(8)}
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(
                lambda seed: (seed, client.post("/v1/vae/encode", json={"inputs": ROWS, "seed": seed}).json()),
                [s % 8 for s in range(64)],
            )
        )
    for seed, result in results:
        assert result == expected[seed]


def test_model_info(client: TestClient) -> None:
    info = client.get("/v1/model").json()
    assert info["input_dim"] == 5
    assert info["latent_dim"] == 2
    assert (info["source"], info["seed"], info["file"]) == ("seed", 0, None)
    assert info["fingerprint"] == MODEL.fingerprint()
    assert info["parameters"]["vae.log_sigma.weight"] == [5, 2]
    assert info["limits"]["max_rows"] == Settings().max_rows


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready", "fingerprint": MODEL.fingerprint()}


def test_without_the_lifespan_the_service_is_not_ready() -> None:
    client = TestClient(create_app(Settings()))  # no `with`: the lifespan never ran
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "loading"
    response = client.post("/v1/autoencoder/encode", json={"inputs": ROWS})
    assert response.status_code == 503
    assert response.json() == {"detail": "the model is not loaded yet"}


def _post(client: TestClient, path: str, content: bytes, content_type: str | None = "application/json") -> Any:
    headers = {"content-type": content_type} if content_type else {}
    return client.post(path, content=content, headers=headers)


@pytest.mark.parametrize("path", ["/v1/autoencoder/encode", "/v1/vae/encode"])
@pytest.mark.parametrize(
    ("body", "loc", "words"),
    [
        (b'{"inputs": []}', ["body", "inputs"], "at least one row"),
        (b'{"inputs": [[0, 1, 1, 0]]}', ["body", "inputs", 0], "rows have 4 values, but the model's input_dim is 5"),
        (b'{"inputs": [[0, 1, 1, 0, 1], [0, 1]]}', ["body", "inputs", 1], "row 1: has 2 values, but row 0 has 5"),
        (b'{"inputs": [[0, 1, 1, 0, 7]]}', ["body", "inputs", 0, 4], "row 0, column 4: expected 0 or 1, got 7"),
        (b'{"inputs": [[0, 1, 1, 0, null]]}', ["body", "inputs", 0, 4], "got null"),
        (b'{"inputs": [[0, 1, 1, 0, 1e999]]}', ["body", 25], "invalid JSON at character 25"),
        (b'{"inputs": [[0, 1, 1, 0, NaN]]}', ["body", 25], "invalid JSON at character 25"),
        (b'{"inputs": [[0, 1, 1, 0, Infinity]]}', ["body", 25], "invalid JSON"),
        (b'{"inputs": [[0, 1, 1, 0, 1]', ["body", 27], "invalid JSON"),
        (b'{"inputs": "\xff\xfe"}', ["body", 0], "invalid JSON at character 0: str is not valid UTF-8"),
        (b"[1, 2]", ["body"], "expected a JSON object"),
        (b"null", ["body"], ""),
        (b"{}", ["body", "inputs"], "Field required"),
        (b'{"inputs": [[0, 1, 1, 0, 1]], "extra": 1}', ["body", "extra"], "Extra inputs are not permitted"),
    ],
)
def test_bad_bodies_get_422_naming_where(
    client: TestClient, path: str, body: bytes, loc: list[Any], words: str
) -> None:
    response = _post(client, path, body)
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert detail[0]["loc"] == loc
    assert words in detail[0]["msg"]
    assert "input" not in detail[0]  # nothing the client sent is echoed back


def test_a_body_that_is_not_json_says_so(client: TestClient) -> None:
    for content_type in ("text/plain", None, "application/x-www-form-urlencoded"):
        response = _post(client, "/v1/autoencoder/encode", b'{"inputs": [[0, 1, 1, 0, 1]]}', content_type)
        assert response.status_code == 415
        assert response.json() == {"detail": "send the body as JSON, with Content-Type: application/json"}
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json", "Application/JSON"):
        response = _post(client, "/v1/autoencoder/encode", b'{"inputs": [[0, 1, 1, 0, 1]]}', content_type)
        assert response.status_code == 200, content_type


def test_a_non_finite_input_cannot_break_the_error_response() -> None:
    # FastAPI's default handler echoes the input; a NaN there would make the error response itself fail.
    # orjson refuses NaN in a body (see above), so feed the handler one directly.
    error = RequestValidationError([{"type": "x", "loc": ("body", "samples"), "msg": "bad", "input": math.nan}])
    response = asyncio.run(validation_error_handler(Request({"type": "http", "path": "/v1/vae/encode"}), error))
    assert response.status_code == 422
    assert json.loads(response.body) == {"detail": [{"type": "x", "loc": ["body", "samples"], "msg": "bad"}]}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"inputs": [[0, 1, 1, 0, 1]] * 11}, "11 rows is more than the limit of 10 (ENCODER_MAX_ROWS)"),
        ({"inputs": [[0, 1, 1, 0, 1]], "samples": 6}, "6 samples is more than the limit of 5 (ENCODER_MAX_SAMPLES)"),
        ({"inputs": [[0, 1, 1, 0, 1]] * 5, "samples": 5}, "5 rows x 5 samples = 25 is more than the limit of 20"),
    ],
)
def test_limits_give_413_with_the_limit(body: dict[str, Any], words: str) -> None:
    settings = Settings(max_rows=10, max_samples=5, max_rows_x_samples=20)
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/vae/encode", json=body)
    assert response.status_code == 413
    assert words in response.json()["detail"]


def test_a_body_over_the_size_limit_is_refused_before_it_is_read() -> None:
    with TestClient(create_app(Settings(max_body_bytes=100))) as client:
        body = b'{"inputs": [' + b"[0, 1, 1, 0, 1], " * 10 + b"[0, 1, 1, 0, 1]]}"
        response = _post(client, "/v1/autoencoder/encode", body)
        assert response.status_code == 413
        assert response.json() == {
            "detail": "request body is larger than the limit of 100 bytes (ENCODER_MAX_BODY_BYTES)"
        }

        def chunks() -> Any:  # no Content-Length: counted while it streams
            yield body[:60]
            yield body[60:]

        response = client.post("/v1/autoencoder/encode", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert "limit of 100 bytes" in response.json()["detail"]
        assert client.post("/v1/autoencoder/encode", json={"inputs": ROWS[:1]}).status_code == 200


def test_unknown_paths_and_methods(client: TestClient) -> None:
    assert client.get("/v1/nothing").status_code == 404
    assert client.get("/v1/vae/encode").status_code == 405


def _packed(rows: np.ndarray) -> dict[str, Any]:
    return {"packed": base64.b64encode(np.packbits(rows.astype(np.uint8), axis=1).tobytes()).decode()}


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 20), st.sampled_from([1, 5, 8, 9, 16, 784]), st.integers(0, 2**32))
def test_packed_rows_give_the_same_answers_as_json(rows: int, width: int, seed: int) -> None:
    bits = np.random.default_rng(seed).integers(0, 2, size=(rows, width))
    packed = _packed(bits)
    if width % 8:  # padding bits are ignored: set them all, the answers must not change
        raw = np.frombuffer(base64.b64decode(packed["packed"]), dtype=np.uint8).reshape(rows, -1).copy()
        raw[:, -1] |= (1 << (8 - width % 8)) - 1
        packed = {"packed": base64.b64encode(raw.tobytes()).decode()}
    with TestClient(create_app(Settings(input_dim=width, latent_dim=3))) as client:
        for path, extra in (("/v1/autoencoder/encode", {}), ("/v1/vae/encode", {"samples": 2, "seed": seed})):
            plain = client.post(path, json={"inputs": bits.tolist(), **extra})
            answer = client.post(path, json={"inputs": packed | {"width": width}, **extra})
            assert plain.status_code == answer.status_code == 200
            assert plain.json() == answer.json()


@pytest.mark.parametrize(
    ("inputs", "loc", "words"),
    [
        ({"packed": ""}, ["body", "inputs", "packed"], "holds no bytes: a batch is at least one row of 5 bits"),
        ({"packed": "AA==", "width": 4}, ["body", "inputs", "width"], "rows of 4 bits were sent, but the model's"),
        ({"packed": "AA==", "width": 0}, ["body", "inputs", "width"], "expected a whole number of bits a row"),
        ({"packed": "AA==", "width": "5"}, ["body", "inputs", "width"], "expected a whole number of bits a row"),
        ({"packed": "AA==", "width": True}, ["body", "inputs", "width"], "expected a whole number of bits a row"),
        ({"packed": "AA==", "width": None}, ["body", "inputs", "width"], "expected a whole number of bits a row"),
        ({"packed": "not base64!"}, ["body", "inputs", "packed"], "not valid base64"),
        ({"packed": "aJA"}, ["body", "inputs", "packed"], "not valid base64"),
        ({"packed": 12}, ["body", "inputs", "packed"], "expected a base64 string, got 12"),
        ({"rows": 1}, ["body", "inputs"], "unexpected field 'rows' next to packed"),
        ({"packed": "AA==", "rows": 1}, ["body", "inputs"], "unexpected field 'rows'"),
    ],
)
def test_bad_packed_rows_get_422_naming_where(client: TestClient, inputs: Any, loc: list[Any], words: str) -> None:
    response = client.post("/v1/autoencoder/encode", json={"inputs": inputs})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"][0]
    assert detail["loc"] == loc
    assert words in detail["msg"]


def test_packed_rows_that_say_their_width_are_never_encoded_at_another() -> None:
    rows = _packed(np.ones((3, 780)))  # 98 bytes a row, as rows of 784 bits take
    with TestClient(create_app(Settings(input_dim=784, latent_dim=3))) as client:
        refused = client.post("/v1/vae/encode", json={"inputs": rows | {"width": 780}})
        assert refused.status_code == 422
        assert refused.json()["detail"][0]["msg"] == "rows of 780 bits were sent, but the model's rows are 784 bits"
        assert client.post("/v1/vae/encode", json={"inputs": rows | {"width": 784}}).status_code == 200


def test_packed_rows_over_the_limit_get_413_before_they_are_unpacked() -> None:
    with TestClient(create_app(Settings(max_rows=10))) as client:
        response = client.post(
            "/v1/autoencoder/encode", json={"inputs": {"packed": base64.b64encode(bytes(11)).decode()}}
        )
    assert response.status_code == 413
    assert "11 rows is more than the limit of 10" in response.json()["detail"]


@pytest.mark.parametrize("accept", ["application/x-safetensors", "application/json;q=0.5, application/x-safetensors"])
def test_safetensors_responses_hold_the_same_numbers(client: TestClient, accept: str) -> None:
    body = {"inputs": ROWS, "samples": 3, "seed": 5}
    as_json = client.post("/v1/vae/encode", json=body).json()
    binary = client.post("/v1/vae/encode", json=body, headers={"accept": accept})
    assert binary.status_code == 200
    assert binary.headers["content-type"] == "application/x-safetensors"
    arrays = safetensors.numpy.load(binary.content)
    assert sorted(arrays) == ["kl", "log_sigma", "mu", "z"]
    for name, value in arrays.items():
        assert value.dtype == np.float64
        np.testing.assert_array_equal(value, as_json[name])
    header = json.loads(binary.content[8 : 8 + int.from_bytes(binary.content[:8], "little")])
    assert header["__metadata__"] == {"seed": "5"}
    codes = client.post("/v1/autoencoder/encode", json=body | {"samples": 1}, headers={"accept": accept})
    assert codes.status_code == 422  # the autoencoder takes no samples: extra fields are refused


@pytest.mark.parametrize(
    ("accept", "status", "media"),
    [
        ("*/*", 200, "application/json"),
        ("application/*", 200, "application/json"),
        ("application/json", 200, "application/json"),
        ("text/html, */*;q=0.8", 200, "application/json"),
        ("text/csv", 406, "application/json"),
        ("application/json;q=0", 406, "application/json"),
        ("application/json;q=0, */*", 200, "application/x-safetensors"),  # RFC 9110: not JSON
        ("application/x-safetensors;q=0, application/json", 200, "application/json"),
        ("application/x-safetensors;q=0.9, */*;q=0.1", 200, "application/x-safetensors"),
    ],
)
def test_content_negotiation(client: TestClient, accept: str, status: int, media: str) -> None:
    response = client.post("/v1/autoencoder/encode", json={"inputs": ROWS}, headers={"accept": accept})
    assert response.status_code == status
    assert response.headers["content-type"] == media
    if status == 406:
        assert (
            response.json()["detail"] == "the Accept header allows none of application/json, application/x-safetensors"
        )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from service.models.train import train

    bits = np.random.default_rng(0).integers(0, 2, size=(200, 5))
    model, _ = train(bits, seed=0, epochs=5)
    path = tmp_path_factory.mktemp("trained") / "model.safetensors"
    weights.save(model, path)
    return model, path


def test_decode_routes_give_sigmoid_of_the_decoders(trained: Any) -> None:
    model, path = trained
    with TestClient(create_app(Settings(weights=path, max_rows=10))) as client:
        assert client.get("/v1/model").json()["decoders"] is True
        codes = [[0.0, 0.0], [0.5, -1.25], [1e6, -1e6]]
        probabilities = client.post("/v1/autoencoder/decode", json={"codes": codes}).json()["probabilities"]
        logits = np.array(codes) @ model.ae_decoder_weight + model.ae_decoder_bias
        np.testing.assert_allclose(
            probabilities, 1 / (1 + np.exp(-np.clip(logits, -700, 700))), rtol=1e-12, atol=1e-300
        )
        z = client.post("/v1/vae/encode", json={"inputs": ROWS, "seed": 3}).json()["z"]
        flat = [row[0] for row in z]
        decoded = client.post("/v1/vae/decode", json={"z": flat}).json()["probabilities"]
        expected = 1 / (1 + np.exp(-(np.array(flat) @ model.vae_decoder_weight + model.vae_decoder_bias)))
        np.testing.assert_allclose(decoded, expected, rtol=1e-12)
        rebuilt = client.post("/v1/autoencoder/reconstruct", json={"inputs": ROWS}).json()["probabilities"]
        own = client.post("/v1/autoencoder/encode", json={"inputs": ROWS}).json()["codes"]
        assert rebuilt == client.post("/v1/autoencoder/decode", json={"codes": own}).json()["probabilities"]
        assert np.array(rebuilt).shape == (3, 5)
        means = client.post("/v1/vae/encode", json={"inputs": ROWS}).json()["mu"]
        vae_rebuilt = client.post("/v1/vae/reconstruct", json={"inputs": ROWS}).json()["probabilities"]
        assert vae_rebuilt == client.post("/v1/vae/decode", json={"z": means}).json()["probabilities"]
        for body, status, words in (
            ({"codes": [[0.0, 1.0, 2.0]]}, 422, "rows have 3 values, but the model's latent_dim is 2"),
            ({"codes": [[0.0, 2e6]]}, 422, "row 0, column 1: expected a number within +-1e+06, got 2000000.0"),
            ({"codes": [[0.0, True]]}, 422, "row 0, column 1: expected a number within +-1e+06, got true"),
            ({"codes": [[0.0, "1"]]}, 422, "got a string"),
            ({"codes": [[0.0, 1.0], [1.0]]}, 422, "row 1: has 1 values, but row 0 has 2"),
            ({"codes": [[0.0, 1.0]] * 11}, 413, "11 rows is more than the limit of 10"),
        ):
            response = client.post("/v1/autoencoder/decode", json=body)
            assert response.status_code == status, response.text
            assert words in response.text


def test_without_decoders_the_decode_routes_say_so(client: TestClient) -> None:
    assert client.get("/v1/model").json()["decoders"] is False
    for path, body in (
        ("/v1/autoencoder/decode", {"codes": [[0.0, 1.0]]}),
        ("/v1/vae/decode", {"z": [[0.0, 1.0]]}),
        ("/v1/autoencoder/reconstruct", {"inputs": ROWS}),
        ("/v1/vae/reconstruct", {"inputs": ROWS}),
    ):
        response = client.post(path, json=body)
        assert response.status_code == 409
        assert "no decoder" in response.json()["detail"]


def test_a_bug_is_a_plain_500_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: Any) -> Any:
        raise RuntimeError("a bug in the model code")

    with TestClient(create_app(Settings()), raise_server_exceptions=False) as client:
        monkeypatch.setattr("service.models.kinds.autoencode", broken)  # after the warm-up
        response = client.post("/v1/autoencoder/encode", json={"inputs": ROWS})
        assert (response.status_code, response.json()) == (500, {"detail": "internal server error"})
        assert "RuntimeError" not in response.text
        assert client.post("/v1/vae/encode", json={"inputs": ROWS}).status_code == 200  # and it serves on
    assert any("a bug in the model code" in (record.exc_text or "") for record in caplog.records)
