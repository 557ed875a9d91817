"""The Open Inference Protocol: Triton's own client against a live server, and the protocol's errors."""

from __future__ import annotations

import json
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from fastapi.testclient import TestClient
from tritonclient.utils import InferenceServerException

from tests.conftest import Server

ROWS = np.array([[0, 1, 1, 0, 1], [1, 0, 0, 1, 0], [1, 1, 1, 1, 1]])
DATATYPES = ["BOOL", "UINT8", "INT8", "INT32", "INT64", "FP32", "FP64"]
NUMPY = {"BOOL": np.bool_, "UINT8": np.uint8, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64}
NUMPY |= {"FP32": np.float32, "FP64": np.float64}


@pytest.fixture(scope="module")
def triton_client(live: Server) -> triton.InferenceServerClient:
    return triton.InferenceServerClient(url=live.url.removeprefix("http://"))


def _input(datatype: str, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("input", list(ROWS.shape), datatype)
    tensor.set_data_from_numpy(ROWS.astype(NUMPY[datatype]), binary_data=binary)
    return tensor


def test_server_and_model_metadata(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    assert triton_client.is_model_ready("vae")
    assert triton_client.is_model_ready("autoencoder", "1")
    assert not triton_client.is_model_ready("nope")
    server = triton_client.get_server_metadata()
    assert server["name"] == "encoding-service"
    assert "binary_tensor_data" in server["extensions"]
    vae = triton_client.get_model_metadata("vae")
    assert vae["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 5]}]
    assert [(o["name"], o["shape"]) for o in vae["outputs"]] == [
        ("mu", [-1, 2]),
        ("log_sigma", [-1, 2]),
        ("z", [-1, -1, 2]),
        ("kl", [-1]),
    ]
    assert triton_client.get_model_metadata("autoencoder", "1")["outputs"][0]["name"] == "codes"


@pytest.mark.parametrize("datatype", DATATYPES)
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_triton_client_gets_the_numbers_of_v1(
    live: Server, triton_client: triton.InferenceServerClient, datatype: str, binary: bool
) -> None:
    v1_codes = httpx.post(f"{live.url}/v1/autoencoder/encode", json={"inputs": ROWS.tolist()}).json()["codes"]
    outputs = [triton.InferRequestedOutput("codes", binary_data=binary)]
    result = triton_client.infer("autoencoder", [_input(datatype, binary)], outputs=outputs)
    np.testing.assert_array_equal(result.as_numpy("codes"), v1_codes)
    assert result.as_numpy("codes").dtype == np.float64

    v1 = httpx.post(f"{live.url}/v1/vae/encode", json={"inputs": ROWS.tolist(), "samples": 3, "seed": 9}).json()
    names = ("mu", "log_sigma", "z", "kl")
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in names]
    result = triton_client.infer(
        "vae", [_input(datatype, binary)], outputs=outputs, parameters={"seed": 9, "samples": 3}, request_id="r-1"
    )
    for name in names:
        np.testing.assert_array_equal(result.as_numpy(name), v1[name])
    response = result.get_response()
    assert response["parameters"] == {"seed": 9}
    assert response["id"] == "r-1"
    assert response["model_version"] == "1"


def test_by_default_every_output_comes_back_binary(triton_client: triton.InferenceServerClient) -> None:
    result = triton_client.infer("vae", [_input("UINT8", True)], parameters={"seed": 1})
    assert result.as_numpy("z").shape == (3, 1, 2)
    assert all("binary_data_size" in out["parameters"] for out in result.get_response()["outputs"])
    assert isinstance(result.get_response()["parameters"]["seed"], int)


def test_a_subset_of_outputs_in_fp32(live: Server, triton_client: triton.InferenceServerClient) -> None:
    outputs = [triton.InferRequestedOutput("kl", binary_data=True)]
    result = triton_client.infer(
        "vae", [_input("BOOL", True)], outputs=outputs, parameters={"seed": 3, "output_datatype": "FP32"}
    )
    assert [o["name"] for o in result.get_response()["outputs"]] == ["kl"]
    v1 = httpx.post(f"{live.url}/v1/vae/encode", json={"inputs": ROWS.tolist(), "seed": 3}).json()
    np.testing.assert_array_equal(result.as_numpy("kl"), np.array(v1["kl"], dtype=np.float32))


@pytest.mark.parametrize(
    ("model", "rows", "parameters", "words"),
    [
        ("nope", ROWS, {}, "no model 'nope'"),
        ("vae", np.array([[0, 1, 2, 0, 1]]), {}, "row 0, column 2: expected 0 or 1, got 2"),
        ("vae", np.array([[0, 1, 1]]), {}, "has shape [1, 3], expected [rows, 5]"),
        ("vae", ROWS, {"samples": 0}, "parameter 'samples' must be an integer with 1 <= samples"),
        ("vae", ROWS, {"seed": -1}, "parameter 'seed' must be an integer"),
        ("vae", ROWS, {"samples": 2000}, "2000 samples is more than the limit of 1000"),
    ],
)
def test_triton_client_sees_the_servers_message(
    triton_client: triton.InferenceServerClient, model: str, rows: np.ndarray, parameters: dict[str, Any], words: str
) -> None:
    tensor = triton.InferInput("input", list(rows.shape), "INT32")
    tensor.set_data_from_numpy(rows.astype(np.int32))
    with pytest.raises(InferenceServerException) as error:
        triton_client.infer(model, [tensor], parameters=parameters)
    assert words in error.value.message()


def _infer(client: TestClient, body: Any, model: str = "vae", **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(f"/v2/models/{model}/infer", content=content, headers=headers)


def _request(**tensor: Any) -> dict[str, Any]:
    base = {"name": "input", "shape": [1, 5], "datatype": "INT32", "data": [0, 1, 1, 0, 1]}
    return {"inputs": [base | tensor]}


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [
        (b"{not json", {}, 400, "invalid JSON at character 1"),
        ({"inputs": []}, {}, 400, "inputs: List should have at least 1 item"),
        (_request(name="x"), {}, 400, "unknown input 'x'"),
        (_request(datatype="FP16"), {}, 400, "inputs.0.datatype"),
        (_request(data=[0, 1, 1, 0]), {}, 400, "holds 4 values, but its shape [1, 5] needs 5"),
        (_request(data=[[0, 1], [1, 0, 1]]), {}, 400, "data is not a regular array of numbers"),
        (_request(data=["0", 1, 1, 0, 1]), {}, 400, "INT32 data must be numbers"),
        (_request(data=[True, False, True, False, True]), {}, 400, "INT32 data must be numbers, not true or false"),
        (_request(datatype="BOOL"), {}, 400, "BOOL data must be true or false"),
        (_request(data=[0, 1, 1, 0, 0.5]), {}, 400, "row 0, column 4: expected 0 or 1, got 0.5"),
        (_request(data=None), {}, 400, "has neither data nor binary_data_size"),
        (_request(shape=[0, 5], data=[]), {}, 400, "expected [rows, 5] with rows >= 1"),
        (_request() | {"outputs": [{"name": "codes"}]}, {}, 400, "unknown output 'codes'; model 'vae' has mu"),
        (_request() | {"outputs": [{"name": "z", "parameters": {"datatype": "FP16"}}]}, {}, 400, "datatype must be"),
        (_request(), {"inference-header-content-length": "x"}, 400, "is not a number"),
        (_request(), {"inference-header-content-length": "9999"}, 400, "does not fit a body of"),
        (b"", {}, 400, 'the body is empty: an inference request is a JSON object with "inputs"'),
    ],
)
def test_bad_requests_get_400_with_a_message(
    client: TestClient, body: Any, headers: dict[str, str], status: int, words: str
) -> None:
    response = _infer(client, body, **headers)
    assert response.status_code == status
    assert set(response.json()) == {"error"}
    assert words in response.json()["error"]


def test_binary_sizes_must_agree(client: TestClient) -> None:
    header = json.dumps(_request(data=None, parameters={"binary_data_size": 20}) | {}).encode()
    raw = np.array([0, 1, 1, 0, 1], dtype="<i4").tobytes()
    good = _infer(client, header + raw, **{"inference-header-content-length": str(len(header))})
    assert good.status_code == 200
    assert good.headers["content-type"] == "application/json"
    short = _infer(client, header + raw[:8], **{"inference-header-content-length": str(len(header))})
    assert "only 8 bytes follow" in short.json()["error"]
    extra = _infer(client, header + raw + b"xx", **{"inference-header-content-length": str(len(header))})
    assert "2 bytes after the tensors" in extra.json()["error"]
    wrong = json.dumps(_request(data=None, parameters={"binary_data_size": 5})).encode()
    response = _infer(client, wrong + raw[:5], **{"inference-header-content-length": str(len(wrong))})
    assert "5 INT32 values take 20 bytes" in response.json()["error"]


@pytest.mark.parametrize("byte", [2, 255, 0x80])
def test_binary_bool_takes_only_the_bytes_0_and_1(client: TestClient, byte: int) -> None:
    header = json.dumps(_request(datatype="BOOL", data=None, parameters={"binary_data_size": 10}, shape=[2, 5]))
    ones = bytes([0, 1, 1, 0, 1, 1, 0, 0, 1, 0])
    length = {"inference-header-content-length": str(len(header))}
    good = _infer(client, header.encode() + ones, **length)
    assert good.status_code == 200
    bad = _infer(client, header.encode() + ones[:7] + bytes([byte]) + ones[8:], **length)
    assert bad.status_code == 400
    assert bad.json() == {"error": f"input 'input': row 1, column 2: expected 0 or 1, got {byte}"}


BIG = "x" * 1_000_000


@pytest.mark.parametrize(
    "body",
    [
        _request() | {"parameters": {"seed": BIG}},
        _request() | {"parameters": {"samples": BIG}},
        _request() | {"parameters": {"output_datatype": BIG}},
        _request() | {"parameters": {"output_datatype": [BIG]}},
        _request() | {"outputs": [{"name": "mu", "parameters": {"datatype": BIG}}]},
        _request() | {"outputs": [{"name": BIG}]},
        _request(name=BIG),
        _request(datatype=BIG),
    ],
)
def test_no_error_echoes_a_clients_string_whole(client: TestClient, body: dict[str, Any]) -> None:
    response = _infer(client, body)
    assert response.status_code == 400
    assert len(response.content) < 300, response.content[:300]


def test_v1_cuts_an_unknown_fields_name_too(client: TestClient) -> None:
    response = client.post("/v1/vae/encode", json={"inputs": [[0, 1, 1, 0, 1]], BIG: 1})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "x" * 64 + "..."]


@pytest.mark.parametrize(
    "path",
    ["/v2/models/nope", "/v2/models/vae/versions/2", "/v2/models/nope/ready", "/v2/models/vae/versions/7/ready"],
)
def test_unknown_models_and_versions_are_404(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert set(response.json()) == {"error"}
    response = client.post(path.removesuffix("/ready") + "/infer", json=_request())
    assert response.status_code == 404


def test_json_outputs_are_flat_row_major(client: TestClient) -> None:
    response = _infer(
        client,
        _request(shape=[2, 5], data=[[0, 1, 1, 0, 1], [1, 0, 0, 1, 0]]) | {"parameters": {"seed": 5, "samples": 3}},
    )
    body = response.json()
    z = next(o for o in body["outputs"] if o["name"] == "z")
    assert z["shape"] == [2, 3, 2]
    assert len(z["data"]) == 12
    v1 = client.post("/v1/vae/encode", json={"inputs": [[0, 1, 1, 0, 1], [1, 0, 0, 1, 0]], "seed": 5, "samples": 3})
    np.testing.assert_array_equal(np.array(z["data"]).reshape(2, 3, 2), v1.json()["z"])


def test_v2_needs_the_key_but_its_probes_do_not() -> None:
    from service.config import Settings
    from service.main import create_app

    with TestClient(create_app(Settings(api_key="k"))) as locked:
        assert locked.get("/v2/health/ready").status_code == 200
        assert locked.get("/v2/health/live").status_code == 200
        for response in (locked.get("/v2"), locked.get("/v2/models/vae"), _infer(locked, _request())):
            assert response.status_code == 401
            assert response.json() == {
                "error": "a valid API key is required: send Authorization: Bearer <key> (or X-API-Key: <key>)"
            }  # the protocol's error shape
        assert _infer(locked, _request(), authorization="Bearer k").status_code == 200
        paths = locked.get("/openapi.json").json()["paths"]
    for path in ("/v2", "/v2/models/{model_name}", "/v2/models/{model_name}/infer"):
        for operation in paths[path].values():
            assert operation["security"]
            assert operation["responses"]["401"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"
            }
    assert "security" not in paths["/v2/health/live"]["get"]


def test_v2_bodies_over_the_size_limit_get_413_in_the_protocol_s_shape() -> None:
    from service.config import Settings
    from service.main import create_app

    body = json.dumps({"inputs": [{"name": "input", "shape": [40, 5], "datatype": "INT32", "data": [0, 1] * 100}]})
    with TestClient(create_app(Settings(max_body_bytes=100))) as client:
        declared = _infer(client, body.encode())

        def chunks() -> Any:  # no Content-Length: counted while it streams
            yield body[:60].encode()
            yield body[60:].encode()

        streamed = client.post("/v2/models/vae/infer", content=chunks())
    message = "request body is larger than the limit of 100 bytes (ENCODER_MAX_BODY_BYTES)"
    assert (declared.status_code, declared.json()) == (413, {"error": message})
    assert (streamed.status_code, streamed.json()) == (413, {"error": message})


def test_every_v2_error_is_the_protocol_s_shape_and_v1_keeps_fastapi_s() -> None:
    from service.config import Settings
    from service.main import create_app

    app = create_app(Settings())
    not_loaded = TestClient(app).get("/v2/models/vae")  # no lifespan: no model yet
    assert (not_loaded.status_code, not_loaded.json()) == (503, {"error": "the model is not loaded yet"})
    with TestClient(app) as client:
        missing = client.get("/v2/models/vae/nothing")
        assert (missing.status_code, missing.json()) == (404, {"error": "Not Found"})
        wrong_method = client.get("/v2/models/vae/infer")
        assert (wrong_method.status_code, wrong_method.json()) == (405, {"error": "Method Not Allowed"})
        assert wrong_method.headers["allow"] == "POST"
        assert client.get("/v1/nothing").json() == {"detail": "Not Found"}
