"""gRPC through `encoding-service serve`: the same numbers as REST, the protocol's status codes,
keys, health and reflection, and the clients people use (tritonclient.grpc, KServe's), unmodified.

tritonclient.grpc and kserve each put the protocol's messages into protobuf's default pool and
cannot share a process, so each runs in a process of its own; the service's stubs keep theirs
apart (service.api.grpc) and are used here directly."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.grpc import inference_pb2 as pb
from service.api.grpc import inference_pb2_grpc as stubs
from service.models import weights
from service.models.encoders import autoencode, seeded
from tests.conftest import ROOT, Server, start_server

SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
ROWS = np.array([[0, 1, 1, 0, 1], [1, 0, 0, 1, 0], [1, 1, 1, 1, 1]], dtype=np.int32)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = start_server(SERVE, api_key="k1", stdout=True)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def stub(server: Server) -> Iterator[stubs.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.grpc) as channel:
        yield stubs.GRPCInferenceServiceStub(channel)


KEY = (("authorization", "Bearer k1"),)


def infer_request(model: str, rows: np.ndarray, raw: bool, **parameters: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype="INT32", shape=rows.shape)
    if raw:
        request.raw_input_contents.append(rows.astype("<i4").tobytes())
    else:
        tensor.contents.int_contents.extend(rows.ravel().tolist())
    for key, value in parameters.items():
        request.parameters[key].int64_param = value
    return request


def outputs(response: pb.ModelInferResponse) -> dict[str, np.ndarray]:
    found = {}
    for i, tensor in enumerate(response.outputs):
        if response.raw_output_contents:
            values = np.frombuffer(response.raw_output_contents[i], dtype="<f8")
        else:
            values = np.array(tensor.contents.fp64_contents)
        found[tensor.name] = values.reshape(list(tensor.shape))
    return found


def logged(server: Server, request_id: str) -> dict:
    """The access-log line of the call with this x-request-id (the log is written in batches)."""
    for _ in range(40):
        if lines := [json.loads(line) for line in server.output().splitlines() if request_id in line]:
            return lines[0]
        time.sleep(0.05)
    raise AssertionError(f"no log line for {request_id}: {server.output()[-2000:]}")


def rest(server: Server, path: str, body: dict) -> dict:
    return httpx.post(server.url + path, json=body, headers={"x-api-key": "k1"}).json()


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_the_numbers_are_rest_s_bit_for_bit(server: Server, stub: stubs.GRPCInferenceServiceStub, raw: bool) -> None:
    vae = stub.ModelInfer(infer_request("vae", ROWS, raw, seed=42, samples=3), metadata=KEY)
    assert vae.model_name == "vae"
    assert vae.model_version == "1"
    assert vae.parameters["seed"].int64_param == 42
    assert bool(vae.raw_output_contents) == raw
    got = outputs(vae)
    expected = rest(server, "/v1/vae/encode", {"inputs": ROWS.tolist(), "seed": 42, "samples": 3})
    for name in ("mu", "log_sigma", "z", "kl"):
        assert np.array_equal(got[name], np.array(expected[name])), name
    codes = outputs(stub.ModelInfer(infer_request("autoencoder", ROWS, raw), metadata=KEY))["codes"]
    assert np.array_equal(codes, np.array(rest(server, "/v1/autoencoder/encode", {"inputs": ROWS.tolist()})["codes"]))
    both = outputs(stub.ModelInfer(infer_request("default", ROWS, raw, seed=42, samples=3), metadata=KEY))
    assert set(both) == {"codes", "mu", "log_sigma", "z", "kl"}
    assert np.array_equal(both["z"], got["z"])


def test_without_a_seed_the_one_drawn_comes_back(stub: stubs.GRPCInferenceServiceStub) -> None:
    first = stub.ModelInfer(infer_request("vae", ROWS, True), metadata=KEY)
    seed = first.parameters["seed"].int64_param
    again = stub.ModelInfer(infer_request("vae", ROWS, True, seed=seed), metadata=KEY)
    assert np.array_equal(outputs(first)["z"], outputs(again)["z"])


@pytest.mark.parametrize(
    ("change", "code", "message"),
    [
        (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "no model 'nope'"),
        (lambda r: setattr(r, "model_version", "7"), grpc.StatusCode.NOT_FOUND, "no ready version '7'"),
        (lambda r: r.inputs[0].contents.int_contents.__setitem__(7, 2), grpc.StatusCode.INVALID_ARGUMENT,
         "row 1, column 2: expected 0 or 1, got 2"),
        (lambda r: r.inputs[0].shape.__setitem__(1, 4), grpc.StatusCode.INVALID_ARGUMENT, "expected [rows, 5]"),
        (lambda r: setattr(r.inputs[0], "name", "x" * 500), grpc.StatusCode.INVALID_ARGUMENT, "unknown input 'xxx"),
        (lambda r: r.parameters["samples"].__setattr__("int64_param", 5000), grpc.StatusCode.RESOURCE_EXHAUSTED,
         "ENCODER_MAX_SAMPLES"),
        (lambda r: r.outputs.add(name="codes"), grpc.StatusCode.INVALID_ARGUMENT, "unknown output 'codes'"),
    ],
    ids=["model", "version", "bit", "width", "name", "samples", "output"],
)  # fmt: skip
def test_mistakes_get_the_protocol_s_codes_and_say_where(
    stub: stubs.GRPCInferenceServiceStub, change, code: grpc.StatusCode, message: str
) -> None:
    request = infer_request("vae", ROWS, False)
    change(request)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=KEY)
    assert caught.value.code() == code
    assert message in caught.value.details()
    assert len(caught.value.details()) < 300


def test_keys_as_rest_s_in_metadata(stub: stubs.GRPCInferenceServiceStub) -> None:
    for metadata in ((), (("authorization", "Bearer nope"),)):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=(("x-api-key", "k1"),)).name == "encoding-service"


def test_a_message_over_the_body_limit_is_refused(server: Server, stub: stubs.GRPCInferenceServiceStub) -> None:
    big = np.zeros((20_000, 5), dtype=np.int32)  # 400 kB raw; the server's limit is 16 MiB: fine
    assert stub.ModelInfer(infer_request("autoencoder", big[:9000], True), metadata=KEY).outputs
    request = infer_request("autoencoder", np.zeros((1, 5), dtype=np.int32), True)
    request.id = "x" * (17 * 1024 * 1024)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(request, metadata=(*KEY, ("x-request-id", "too-big")))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    line = logged(server, "too-big")  # refused before any handler saw it, and still logged
    assert (line["path"], line["status"]) == ("/inference.GRPCInferenceService/ModelInfer", 8)


def test_a_call_past_its_deadline_is_not_computed(stub: stubs.GRPCInferenceServiceStub) -> None:
    rows = np.ones((10_000, 5), dtype=np.int32)
    with pytest.raises(grpc.RpcError) as caught:
        stub.ModelInfer(infer_request("vae", rows, True, samples=10), metadata=KEY, timeout=0.0005)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_messages_arriving_at_once_are_held_to_a_quarter_of_the_memory_budget() -> None:
    server = start_server(SERVE, memory_budget=str(1024 * 1024))  # 256 KiB of messages arriving
    try:
        with grpc.insecure_channel(server.grpc) as channel:
            stub = stubs.GRPCInferenceServiceStub(channel)
            assert stub.ModelInfer(infer_request("autoencoder", ROWS, True)).outputs
            big = infer_request("autoencoder", np.zeros((20_000, 5), dtype=np.int32), True)  # 400 kB
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(big)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "262144 bytes of messages arriving" in caught.value.details()
    finally:
        server.stop()


@pytest.mark.slow
def test_a_long_computation_is_given_up_at_its_deadline() -> None:
    """A batch whose deadline passes while it is computed ends at the next block of 1024 rows:
    the server answers DEADLINE_EXCEEDED itself and counts none of its rows (computed to the end,
    they would be counted, whatever the answer). The deadline, a third of what the whole batch
    takes here (the same numpy, as reference), leaves the request ample time to arrive first."""
    dims = {"input_dim": "2048", "latent_dim": "2048", "max_body_bytes": str(64 * 1024 * 1024)}
    x = (np.random.default_rng(0).random((10_000, 2048)) < 0.5).astype(np.uint8)  # ten blocks; 20 MB as raw BOOL
    model, times = seeded(0, 2048, 2048), []
    for _ in range(2):  # what the server's whole computation takes, about: the faster of two
        began = time.perf_counter()
        autoencode(model, x)
        times.append(time.perf_counter() - began)
    deadline = max(min(times) / 3, 0.3)
    request = pb.ModelInferRequest(model_name="autoencoder")
    request.inputs.add(name="input", datatype="BOOL", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    server = start_server(SERVE, stdout=True, **dims)
    try:
        with grpc.insecure_channel(server.grpc, options=[("grpc.max_send_message_length", -1)]) as channel:
            stub = stubs.GRPCInferenceServiceStub(channel)
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(request, metadata=(("x-request-id", "long-call"),), timeout=deadline)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        line = logged(server, "long-call")
        assert (line["status"], line["model"]) == (4, "default"), line  # the server's own DEADLINE_EXCEEDED
        assert "encoder_rows_encoded_total{" not in httpx.get(server.url + "/metrics").text  # none counted
    finally:
        server.stop()


def test_health_and_reflection_are_open(server: Server) -> None:
    with grpc.insecure_channel(server.grpc) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "liveness"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as caught:
            health.Check(health_pb2.HealthCheckRequest(service="other"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        ask = [reflection_pb2.ServerReflectionRequest(list_services="")]
        (answer,) = list(reflection.ServerReflectionInfo(iter(ask)))
        names = {service.name for service in answer.list_services_response.service}
        assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names
        ask = [reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService")]
        (answer,) = list(reflection.ServerReflectionInfo(iter(ask)))
        assert answer.file_descriptor_response.file_descriptor_proto


def test_calls_are_logged_and_counted(server: Server, stub: stubs.GRPCInferenceServiceStub) -> None:
    stub.ModelInfer(infer_request("vae", ROWS, True), metadata=(*KEY, ("x-request-id", "grpc-call-1")))
    metrics = httpx.get(server.url + "/metrics").text
    assert 'encoder_grpc_requests_total{code="OK",method="/inference.GRPCInferenceService/ModelInfer"}' in metrics
    assert 'encoder_grpc_request_duration_seconds_count{method="/inference.GRPCInferenceService/ModelInfer"}' in metrics
    lines = [json.loads(line) for line in server.output().splitlines() if "grpc-call-1" in line]
    assert lines, server.output()[-2000:]
    assert lines[0] | {"time": "", "duration_ms": 0} == lines[0] | {
        "time": "",
        "duration_ms": 0,
        "method": "GRPC",
        "path": "/inference.GRPCInferenceService/ModelInfer",
        "status": 0,
        "model": "default",
        "version": 1,
    }
    bad = infer_request("vae", np.array([[0, 1, 7, 0, 1]], dtype=np.int32), True)
    with pytest.raises(grpc.RpcError):
        stub.ModelInfer(bad, metadata=(*KEY, ("x-request-id", "grpc-call-2")))
    time.sleep(0.5)  # the access log is written in batches, within 0.25 s
    failed = [json.loads(line) for line in server.output().splitlines() if "grpc-call-2" in line]
    assert (failed[0]["status"], failed[0]["model"], failed[0]["version"]) == (
        3,
        "default",
        1,
    )  # named, though it failed


def run_client(code: str, server: Server) -> dict:
    """A client script in a process of its own; the JSON it prints."""
    script = textwrap.dedent(code).replace("ADDRESS", server.grpc)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_tritonclient_grpc_sync_and_aio(server: Server) -> None:
    got = run_client(
        """
        import asyncio, json
        import numpy as np
        import tritonclient.grpc as triton
        import tritonclient.grpc.aio as aio

        rows = np.array(ROWS, dtype=np.uint8)
        headers = {"authorization": "Bearer k1"}
        client = triton.InferenceServerClient("ADDRESS")
        tensor = triton.InferInput("input", list(rows.shape), "UINT8")
        tensor.set_data_from_numpy(rows)
        result = client.infer("vae", [tensor], parameters={"seed": 42, "samples": 3}, headers=headers)
        index = client.get_model_repository_index(headers=headers, as_json=True)

        async def other():
            async with aio.InferenceServerClient("ADDRESS") as client:
                tensor = aio.InferInput("input", list(rows.shape), "UINT8")
                tensor.set_data_from_numpy(rows)
                result = await client.infer("autoencoder", [tensor], headers=headers, model_version="1")
                live = await client.is_server_live(headers=headers)
                ready = await client.is_model_ready("vae", headers=headers)
                return live, ready, result.as_numpy("codes").tolist()

        live, ready, codes = asyncio.run(other())
        print(json.dumps({"z": result.as_numpy("z").tolist(), "live": live, "ready": ready, "codes": codes,
                          "meta": client.get_model_metadata("vae", headers=headers, as_json=True)["inputs"],
                          "index": index}))
        """.replace("ROWS", repr(ROWS.tolist())),
        server,
    )
    expected = rest(server, "/v1/vae/encode", {"inputs": ROWS.tolist(), "seed": 42, "samples": 3})
    assert got["z"] == expected["z"]
    assert got["codes"] == rest(server, "/v1/autoencoder/encode", {"inputs": ROWS.tolist()})["codes"]
    assert (got["live"], got["ready"]) == (True, True)
    assert got["meta"] == [{"name": "input", "datatype": "FP64", "shape": ["-1", "5"]}]
    assert got["index"] == {"models": [{"name": "default", "version": "1", "state": "READY"}]}


def test_kserve_grpc_client(server: Server) -> None:
    got = run_client(
        """
        import asyncio, json
        import numpy as np
        from kserve import InferenceGRPCClient, InferInput, InferRequest

        async def main():
            client = InferenceGRPCClient("ADDRESS", timeout=30)
            tensor = InferInput("input", [3, 5], "INT64")
            tensor.set_data_from_numpy(np.array(ROWS))
            request = InferRequest(model_name="vae", infer_inputs=[tensor], parameters={"seed": 42})
            response = await client.infer(request, headers=(("x-api-key", "k1"),))
            ready = await client.is_model_ready("autoencoder", headers=(("x-api-key", "k1"),))
            await client.close()
            return {output.name: output.as_numpy().tolist() for output in response.outputs}, ready

        outputs, ready = asyncio.run(main())
        print(json.dumps({"outputs": outputs, "ready": ready}))
        """.replace("ROWS", repr(ROWS.tolist())),
        server,
    )
    expected = rest(server, "/v1/vae/encode", {"inputs": ROWS.tolist(), "seed": 42})
    assert got["ready"] is True
    assert {name: got["outputs"][name] for name in ("mu", "log_sigma", "z", "kl")} == {
        name: expected[name] for name in ("mu", "log_sigma", "z", "kl")
    }


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_says_not_serving_at_once_and_serves_through_the_drain(workers: str) -> None:
    """Readiness ("") turns NOT_SERVING at SIGTERM, liveness stays SERVING (a liveness probe must
    not kill a draining pod), calls are still answered; a Watch open all along (what client-side
    health checking keeps) sees the change and ends when the server stops, without holding it up."""
    draining = start_server(SERVE, shutdown_delay="3", workers=workers)
    try:
        with grpc.insecure_channel(draining.grpc) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            inference = stubs.GRPCInferenceServiceStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=60)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            draining.process.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            deadline = signalled + 1
            while health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "still SERVING a second after SIGTERM"
                time.sleep(0.05)
            liveness = health.Check(health_pb2.HealthCheckRequest(service="liveness")).status
            assert liveness == health_pb2.HealthCheckResponse.SERVING
            assert not inference.ServerReady(pb.ServerReadyRequest()).ready
            assert outputs(inference.ModelInfer(infer_request("autoencoder", ROWS, True)))["codes"].shape == (3, 2)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert list(watch) == []  # the stream ends, OK, as the server stops
        assert draining.process.wait(timeout=30) == 0
        assert time.monotonic() - signalled < 3 + 5, "an open Watch held up the stop"
    finally:
        draining.stop()


def test_the_repository_over_grpc_with_the_admin_key(tmp_path: Path) -> None:
    first, second = seeded(1, 5, 2), seeded(2, 5, 2)
    for version, model in ((1, first), (2, second)):
        (tmp_path / "m" / str(version)).mkdir(parents=True)
        weights.save(model, tmp_path / "m" / str(version) / "model.safetensors")
    server = start_server(SERVE, model_repository=str(tmp_path), api_key="k1", admin_api_key="admin")
    admin = (("authorization", "Bearer admin"),)
    try:
        with grpc.insecure_channel(server.grpc) as channel:
            stub = stubs.GRPCInferenceServiceStub(channel)
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), metadata=KEY)
            assert [(m.name, m.version, m.state) for m in index.models] == [("m", "1", "READY"), ("m", "2", "READY")]
            request = infer_request("m", ROWS, True)
            request.model_version = "1"
            codes = outputs(stub.ModelInfer(request, metadata=KEY))["codes"]
            assert np.array_equal(codes, np.maximum(ROWS @ first.ae_weight + first.ae_bias, 0.0))
            with pytest.raises(grpc.RpcError) as caught:
                stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="m"), metadata=KEY)
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
            unloaded = stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="m"), metadata=admin)
            assert (unloaded.model_name, unloaded.isUnloaded) == ("m", True)
            assert not stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), metadata=KEY).models
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfer(infer_request("m", ROWS, True), metadata=KEY)
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            # KServe's clients send the model's name as field 1 (Triton's repository_name)
            loaded = stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(repository_name="m"), metadata=admin)
            assert (loaded.model_name, loaded.isLoaded) == ("m", True)
            assert stub.ModelInfer(infer_request("m", ROWS, True), metadata=KEY).model_version == "2"
            with pytest.raises(grpc.RpcError) as caught:
                stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="../etc"), metadata=admin)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not a model name" in caught.value.details()
    finally:
        server.stop()


def test_plain_uvicorn_serves_no_grpc() -> None:
    server = start_server()  # uvicorn service.main:app, with ENCODER_GRPC_PORT set all the same
    try:
        host, port = server.grpc.split(":")
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((host, int(port)), timeout=5).close()
    finally:
        server.stop()


def test_grpc_and_rest_share_one_gate() -> None:
    """One worker's requests in progress are REST's and gRPC's together: with the cap at one, a
    REST request whose body is still coming holds the only place, and a gRPC call is refused at
    once (RESOURCE_EXHAUSTED, saying which setting), counted with REST's refusals; health is not."""
    server = start_server(SERVE, max_requests_in_progress="1")
    try:
        with server.connect() as held, grpc.insecure_channel(server.grpc) as channel:
            held.sendall(b"POST /v1/vae/encode HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
            held.sendall(b"Content-Length: 100\r\n\r\n{")  # in progress until the rest of its body comes
            time.sleep(0.3)
            with pytest.raises(grpc.RpcError) as caught:
                stubs.GRPCInferenceServiceStub(channel).ModelInfer(infer_request("autoencoder", ROWS, True))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "ENCODER_MAX_REQUESTS_IN_PROGRESS" in caught.value.details()
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'encoder_requests_refused_total{reason="requests_in_progress"} 1.0' in metrics
        assert (
            'encoder_grpc_requests_total{code="RESOURCE_EXHAUSTED",method="/inference.GRPCInferenceService/ModelInfer"}'
            in metrics
        )
        with grpc.insecure_channel(server.grpc) as channel:  # the place is free again
            answer = stubs.GRPCInferenceServiceStub(channel).ModelInfer(infer_request("autoencoder", ROWS, True))
            assert outputs(answer)["codes"].shape == (3, 2)
    finally:
        server.stop()
