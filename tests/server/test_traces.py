"""Traces: W3C Trace Context in, one server span per request (children when sampled), OTLP out to a
collector that this test runs (a local HTTP server decoding OTLP/protobuf with opentelemetry-proto),
batched off the event loop; nothing of it, not even an import, when the OTEL_ settings are unset.

The sampling decisions are checked against OpenTelemetry's own samplers; the rest through the app
in-process and through `encoding-service serve` (one worker and two), REST and gRPC alike."""

from __future__ import annotations

import http.server
import json
import random
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import yaml
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace as otel
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import sampling
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from service.api.grpc import inference_pb2_grpc as stubs
from service.config import Settings
from service.core.traces import SAMPLERS, Parent, parse_traceparent, sampler
from service.main import create_app
from service.web.errors import StartupError
from tests.api.test_grpc import infer_request
from tests.conftest import ROOT, Server, free_port, run_app, start_server

SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"
SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-01"
NOT_SAMPLED = f"00-{TRACE_ID}-{PARENT_ID}-00"
ROW = {"inputs": [[1, 0, 1, 1, 0]]}


class Collector:
    """An OTLP/HTTP collector on 127.0.0.1: keeps every span it is sent, with its resource's
    attributes; or, as `mode` says, hangs on every export ("hang") or answers 503 ("refuse")."""

    def __init__(self, mode: str = "ok") -> None:
        self.mode = mode
        self.requests: list[ExportTraceServiceRequest] = []
        self.headers: list[dict[str, str]] = []
        self.release = threading.Event()
        collector = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                collector.headers.append({key.lower(): value for key, value in self.headers.items()})
                if collector.mode == "hang":
                    collector.release.wait(60)
                if collector.mode == "refuse":
                    self.send_response(503)
                    self.send_header("content-length", "0")
                    self.end_headers()
                    return
                request = ExportTraceServiceRequest()
                request.ParseFromString(body)
                collector.requests.append(request)
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Collector:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def spans(self) -> list[dict[str, Any]]:
        """Every span received, as a dict: name, ids in hex, kind, status code, times, attributes, resource."""
        found = []
        for request in list(self.requests):
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        found.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent": span.parent_span_id.hex(),
                                "kind": span.kind,
                                "status": span.status.code,
                                "start": span.start_time_unix_nano,
                                "end": span.end_time_unix_nano,
                                "attributes": {a.key: _value(a.value) for a in span.attributes},
                                "trace_state": span.trace_state,
                                "resource": resource,
                                "scope": scope_spans.scope.name,
                            }
                        )
        return found

    def wait_for(self, count: int, timeout: float = 15) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.spans()) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.spans()


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value"))


SERVER, INTERNAL = 2, 1  # OTLP's span kinds
UNSET, ERROR = 0, 2  # OTLP's status codes


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


def traced_app(collector: Collector, **settings: Any) -> TestClient:
    options = {"otel_traces_exporter": "otlp", "otel_exporter_otlp_endpoint": collector.url} | settings
    return TestClient(create_app(Settings(**options)))


# -- the caller's context and the sampling decision


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (SAMPLED, Parent(int(TRACE_ID, 16), int(PARENT_ID, 16), True, "")),
        (NOT_SAMPLED, Parent(int(TRACE_ID, 16), int(PARENT_ID, 16), False, "")),
        (f"00-{TRACE_ID}-{PARENT_ID}-09", Parent(int(TRACE_ID, 16), int(PARENT_ID, 16), True, "")),  # other flags
        (
            f"01-{TRACE_ID}-{PARENT_ID}-01-what-a-later-version-adds",
            Parent(int(TRACE_ID, 16), int(PARENT_ID, 16), True, ""),
        ),
        (f"00-{TRACE_ID}-{PARENT_ID}-01-more", None),  # version 00 has exactly four fields
        (f"ff-{TRACE_ID}-{PARENT_ID}-01", None),  # version ff is invalid
        (f"00-{'0' * 32}-{PARENT_ID}-01", None),  # all-zero trace id
        (f"00-{TRACE_ID}-{'0' * 16}-01", None),  # all-zero parent id
        (f"00-{TRACE_ID.upper()}-{PARENT_ID}-01", None),  # uppercase hex
        (f"00-{TRACE_ID[:-1]}-{PARENT_ID}-01", None),  # short
        ("garbage", None),
    ],
)
def test_traceparent_is_read_as_w3c_trace_context_says(header: str, expected: Parent | None) -> None:
    assert parse_traceparent(header.encode()) == expected


HEX = "0123456789abcdef"
TRACEPARENTS = st.one_of(
    st.builds(
        lambda version, trace, span, flags, rest: f"{version}-{trace}-{span}-{flags}{rest}",
        st.one_of(st.just("00"), st.text(HEX, min_size=2, max_size=2)),
        st.one_of(st.text(HEX, min_size=32, max_size=32), st.just("0" * 32)),
        st.one_of(st.text(HEX, min_size=16, max_size=16), st.just("0" * 16)),
        st.text(HEX, min_size=2, max_size=2),
        st.one_of(st.just(""), st.text(HEX + "-", max_size=8)),
    ),
    st.text(HEX + "-ABCDEFxyz ", max_size=70),
)


@given(TRACEPARENTS)
def test_traceparent_is_read_as_opentelemetry_s_propagator_reads_it(header: str) -> None:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    theirs = otel.get_current_span(TraceContextTextMapPropagator().extract({"traceparent": header})).get_span_context()
    mine = parse_traceparent(header.encode())
    if not theirs.is_valid:
        assert mine is None
    else:
        assert mine == Parent(theirs.trace_id, theirs.span_id, theirs.trace_flags.sampled, "")


def test_tracestate_is_passed_on_unless_too_long() -> None:
    parent = parse_traceparent(SAMPLED.encode(), b"congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
    assert parent is not None
    assert parent.tracestate == "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
    parent = parse_traceparent(SAMPLED.encode(), b"a=" + b"x" * 600)
    assert parent is not None
    assert parent.tracestate == ""


PARENTS = st.one_of(st.none(), st.booleans())  # no parent, or a remote parent sampled or not


@given(
    name=st.sampled_from(SAMPLERS),
    ratio=st.one_of(st.none(), st.floats(0, 1), st.sampled_from([0.0, 0.01, 0.5, 1.0])),
    trace_id=st.integers(1, 2**128 - 1),
    parent=PARENTS,
)
def test_sampling_decides_as_opentelemetry_s_samplers(
    name: str, ratio: float | None, trace_id: int, parent: bool | None
) -> None:
    """The decision for every sampler, ratio, trace id and parent is that of OpenTelemetry's SDK."""
    reference = {
        "always_on": lambda _: sampling.ALWAYS_ON,
        "always_off": lambda _: sampling.ALWAYS_OFF,
        "traceidratio": lambda r: sampling.TraceIdRatioBased(r),
        "parentbased_always_on": lambda _: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda _: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda r: sampling.ParentBased(sampling.TraceIdRatioBased(r)),
    }[name](1.0 if ratio is None else ratio)
    context = None
    mine = None
    if parent is not None:
        flags = TraceFlags(TraceFlags.SAMPLED if parent else TraceFlags.DEFAULT)
        remote = SpanContext(trace_id, 0x1234, is_remote=True, trace_flags=flags)
        context = otel.set_span_in_context(NonRecordingSpan(remote))
        mine = Parent(trace_id, 0x1234, parent, "")
    expected = reference.should_sample(context, trace_id, "span").decision.is_sampled()
    assert sampler(name, ratio)(mine, trace_id) == expected


def test_a_ratio_keeps_about_its_share() -> None:
    keep = sampler("traceidratio", 0.1)
    ids = random.Random(1)
    kept = sum(keep(None, ids.getrandbits(128)) for _ in range(20_000))
    assert 1_800 < kept < 2_200


# -- the app in-process


def test_a_request_continues_the_caller_s_trace_with_its_attributes_and_children(
    collector: Collector, capfd: pytest.CaptureFixture[str]
) -> None:
    with traced_app(collector, otel_bsp_schedule_delay=600_000) as client:
        headers = {"traceparent": SAMPLED, "tracestate": "rojo=00f067aa0ba902b7"}
        response = client.post("/v1/vae/encode", json=ROW | {"samples": 3, "seed": 5}, headers=headers)
        assert response.status_code == 200
        assert collector.spans() == []  # batched: nothing before the schedule or the end
    spans = collector.spans()  # the lifespan's end flushed them
    server = next(span for span in spans if span["kind"] == SERVER)
    assert server["name"] == "POST /v1/vae/encode"
    assert (server["trace_id"], server["parent"]) == (TRACE_ID, PARENT_ID)
    assert server["trace_state"] == "rojo=00f067aa0ba902b7"
    assert server["status"] == UNSET
    attributes = server["attributes"]
    assert attributes["http.request.method"] == "POST"
    assert attributes["http.route"] == "/v1/vae/encode"
    assert attributes["http.response.status_code"] == 200
    assert attributes["url.path"] == "/v1/vae/encode"
    assert (attributes["encoder.model"], attributes["encoder.model_version"]) == ("default", 1)
    assert (attributes["encoder.rows"], attributes["encoder.samples"], attributes["encoder.seeded"]) == (1, 3, True)
    assert server["resource"]["service.name"] == "encoding-service"
    children = sorted((span for span in spans if span["kind"] == INTERNAL), key=lambda span: span["start"])
    assert [child["name"] for child in children] == ["parse", "compute", "encode"]
    for child in children:
        assert (child["trace_id"], child["parent"]) == (TRACE_ID, server["span_id"])
        assert server["start"] <= child["start"] <= child["end"] <= server["end"]
    assert children[0]["end"] <= children[1]["start"]
    assert children[1]["end"] <= children[2]["start"]
    # The access log names the span, so that logs and traces join.
    line = next(json.loads(line) for line in capfd.readouterr().out.splitlines() if "/v1/vae/encode" in line)
    assert (line["trace_id"], line["span_id"]) == (TRACE_ID, server["span_id"])


def test_a_full_batch_goes_out_before_the_schedule(collector: Collector) -> None:
    """OTEL_BSP_MAX_EXPORT_BATCH_SIZE spans kept send a batch at once, whatever the schedule says."""
    with traced_app(collector, otel_bsp_schedule_delay=600_000, otel_bsp_max_export_batch_size=4) as client:
        assert client.post("/v1/vae/encode", json=ROW, headers={"traceparent": SAMPLED}).status_code == 200
        assert len(collector.wait_for(4)) == 4  # a server span and its three children
        assert client.post("/v1/vae/encode", json=ROW, headers={"traceparent": SAMPLED}).status_code == 200
        assert len(collector.wait_for(8)) == 8


def test_v2_and_a_client_mistake(collector: Collector) -> None:
    body = {"inputs": [{"name": "input", "shape": [1, 5], "datatype": "INT32", "data": [1, 0, 1, 1, 0]}]}
    with traced_app(collector) as client:
        assert client.post("/v2/models/autoencoder/infer", json=body).status_code == 200
        assert client.post("/v1/vae/encode", json={"inputs": [[1, 0, 1, 1, 7]]}).status_code == 422
    spans = {span["name"]: span for span in collector.spans() if span["kind"] == SERVER}
    infer = spans["POST /v2/models/{model_name}/infer"]
    assert infer["attributes"]["encoder.rows"] == 1
    assert infer["attributes"]["encoder.samples"] == 0
    assert infer["parent"] == ""  # no traceparent: a trace of its own
    mistake = spans["POST /v1/vae/encode"]
    assert mistake["attributes"]["http.response.status_code"] == 422
    assert mistake["status"] == UNSET  # a client's mistake is not the server's error


def test_a_sampled_out_request_leaves_no_span_but_its_ids_in_the_log(
    collector: Collector, capfd: pytest.CaptureFixture[str]
) -> None:
    with traced_app(collector) as client:
        assert client.post("/v1/autoencoder/encode", json=ROW, headers={"traceparent": NOT_SAMPLED}).status_code == 200
    with traced_app(collector, otel_traces_sampler="traceidratio", otel_traces_sampler_arg=0.0) as client:
        assert client.post("/v1/autoencoder/encode", json=ROW, headers={"traceparent": SAMPLED}).status_code == 200
        assert client.post("/v1/autoencoder/encode", json=ROW).status_code == 200
    assert collector.spans() == []
    lines = [json.loads(line) for line in capfd.readouterr().out.splitlines() if "/v1/autoencoder" in line]
    assert [line.get("trace_id") for line in lines] == [TRACE_ID, TRACE_ID, None]  # a traceparent, or nothing
    assert len({line["span_id"] for line in lines[:2]}) == 2
    assert PARENT_ID not in {line["span_id"] for line in lines[:2]}


def test_the_text_access_log_names_the_trace_too(collector: Collector, capfd: pytest.CaptureFixture[str]) -> None:
    with traced_app(collector, log_format="text") as client:
        assert client.post("/v1/autoencoder/encode", json=ROW, headers={"traceparent": SAMPLED}).status_code == 200
    server = next(span for span in collector.spans() if span["kind"] == SERVER)
    line = next(line for line in capfd.readouterr().out.splitlines() if "/v1/autoencoder/encode" in line)
    assert line.endswith(f" trace_id={TRACE_ID} span_id={server['span_id']}")


def test_probes_and_scrapes_start_no_trace(collector: Collector) -> None:
    with traced_app(collector) as client:
        for path in ("/healthz", "/readyz", "/metrics", "/v2/health/ready"):
            assert client.get(path).status_code == 200
        assert client.get("/healthz", headers={"traceparent": SAMPLED}).status_code == 200  # but join a caller's
    assert [span["name"] for span in collector.spans()] == ["GET /healthz"]


# What Prometheus 3 sends to a target when it may take exemplars
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=1.0.0;escaping=allow-utf-8;q=0.5,text/plain;version=0.0.4;q=0.4,*/*;q=0.1"
)


def test_latency_histograms_carry_the_trace_as_an_exemplar_in_openmetrics(collector: Collector) -> None:
    with traced_app(collector) as client:
        client.post("/v1/autoencoder/encode", json=ROW, headers={"traceparent": SAMPLED})
        text = client.get("/metrics", headers={"accept": PROMETHEUS_ACCEPT})
        assert text.headers["content-type"].startswith("application/openmetrics-text")
        assert f'route="/v1/autoencoder/encode"}} 1.0 # {{trace_id="{TRACE_ID}"}}' in text.text
        plain = client.get("/metrics").text  # Prometheus' text format has no exemplars
        assert "trace_id" not in plain
        assert "encoder_spans_dropped_total" in plain


def test_over_otlp_grpc_too() -> None:
    """OTEL_EXPORTER_OTLP_PROTOCOL=grpc: the spans go to a collector's TraceService over gRPC."""
    received: list[ExportTraceServiceRequest] = []

    class TraceService(trace_grpc.TraceServiceServicer):
        def Export(self, request: ExportTraceServiceRequest, context: Any) -> ExportTraceServiceResponse:
            received.append(request)
            return ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_grpc.add_TraceServiceServicer_to_server(TraceService(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        settings = {"otel_exporter_otlp_protocol": "grpc", "otel_exporter_otlp_endpoint": f"http://127.0.0.1:{port}"}
        with TestClient(create_app(Settings(otel_traces_exporter="otlp", **settings))) as client:
            assert client.post("/v1/vae/encode", json=ROW, headers={"traceparent": SAMPLED}).status_code == 200
    finally:
        server.stop(0)
    names = [
        span.name
        for request in received
        for resources in request.resource_spans
        for scope in resources.scope_spans
        for span in scope.spans
    ]
    assert sorted(names) == ["POST /v1/vae/encode", "compute", "encode", "parse"]


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("POST", "/v1/vae/encode", 200, False),
        ("POST", "/v1/vae/encode", 422, False),
        ("POST", "/v1/vae/encode", 500, True),
        ("POST", "/v1/vae/encode", 503, True),
        ("GRPC", "/inference.GRPCInferenceService/ModelInfer", 0, False),
        ("GRPC", "/inference.GRPCInferenceService/ModelInfer", 3, False),  # INVALID_ARGUMENT: the client's
        ("GRPC", "/inference.GRPCInferenceService/ModelInfer", 5, False),  # NOT_FOUND
        ("GRPC", "/inference.GRPCInferenceService/ModelInfer", 4, True),  # DEADLINE_EXCEEDED
        ("GRPC", "/inference.GRPCInferenceService/ModelInfer", 13, True),  # INTERNAL
        ("GRPC", "/inference.GRPCInferenceService/ModelInfer", 14, True),  # UNAVAILABLE
    ],
)
def test_a_server_span_is_an_error_as_the_semantic_conventions_say(
    method: str, path: str, status: int, error: bool
) -> None:
    """Server errors only: a 5xx, or a gRPC code that the conventions count as the server's."""
    from opentelemetry.trace import StatusCode

    from service.core.metrics import Metrics
    from service.core.traces import Span
    from service.server.otel import Export

    export = Export(Settings(otel_traces_exporter="otlp"), Metrics(routes=["/v1/vae/encode"]))
    made = export.spans(Span(7, 9, None, True), method, path, status)
    assert (made[0].status.status_code is StatusCode.ERROR) == error
    assert ("error.type" in made[0].attributes) == (error and method != "GRPC")


def test_without_the_otel_extra_the_start_fails_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "service.server.otel", raising=False)
    needs = r"traces need the otel extra \(from a clone: pip install -e '\.\[otel\]'\)"
    for missing in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
        monkeypatch.setitem(sys.modules, missing, None)  # as if not installed
        app = create_app(Settings(otel_traces_exporter="otlp"))
        with pytest.raises(StartupError, match=needs), TestClient(app):
            pass
        monkeypatch.delitem(sys.modules, missing)


def test_unset_nothing_of_opentelemetry_is_imported() -> None:
    """No module of OpenTelemetry's beyond the API that FastAPI itself imports (for its own
    hooks, which the service turns off): not the SDK, not an exporter, not service.server.otel."""
    code = (
        "import sys\n"
        "import fastapi\n"
        "fastapi_s = set(sys.modules)\n"
        "from fastapi.testclient import TestClient\n"
        "from service.main import create_app\n"
        "with TestClient(create_app()) as client:\n"
        "    assert client.post('/v1/vae/encode', json={'inputs': [[1, 0, 1, 1, 0]]}, "
        f"headers={{'traceparent': '{SAMPLED}'}}).status_code == 200\n"
        "print(sorted(name for name in set(sys.modules) - fastapi_s if 'opentelemetry' in name or 'otel' in name))\n"
    )
    for variables in (
        {},
        {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"},
    ):
        env = {"PATH": "/usr/bin:/bin", **variables}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
        )
        assert done.stdout.strip().splitlines()[-1] == "[]"
        assert "trace_id" not in done.stdout


def test_a_malformed_otel_setting_stops_the_start_naming_it() -> None:
    done = run_app(OTEL_TRACES_EXPORTER="otlp", OTEL_TRACES_SAMPLER_ARG="2")
    assert done.returncode == 1
    assert "OTEL_TRACES_SAMPLER_ARG: Input should be less than or equal to 1" in done.stderr
    done = run_app(OTEL_EXPORTER_OTLP_ENDPOINT="collector:4318")  # no scheme
    assert done.returncode == 1
    assert "OTEL_EXPORTER_OTLP_ENDPOINT: String should match pattern" in done.stderr
    done = run_app(OTEL_TRACES_EXPORTER="jaeger")
    assert done.returncode == 1
    assert "OTEL_TRACES_EXPORTER: Input should be 'otlp' or 'none'" in done.stderr


# -- `encoding-service serve`: REST and gRPC, one worker and two, the drain, a collector down


def serve(collector_url: str, workers: str = "1", **otel: str) -> Server:
    options = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector_url,
        "OTEL_SERVICE_NAME": "encoder-under-test",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-collector-token=t0ken",  # the exporter's own variables work
    } | otel
    return start_server(SERVE, stdout=True, workers=workers, **options)


def traceparent(n: int) -> tuple[str, str]:
    trace_id = f"{n + 1:032x}"
    return trace_id, f"00-{trace_id}-{PARENT_ID}-01"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_traces_rest_and_grpc_and_the_drain_sends_what_is_kept(collector: Collector, workers: str) -> None:
    """With exports an hour apart, every span reaches the collector anyway: SIGTERM's drain sends
    them before the process exits, in every worker."""
    server = serve(collector.url, workers, OTEL_BSP_SCHEDULE_DELAY="3600000")
    try:
        sent = {}
        with httpx.Client(base_url=server.url) as client:
            for n in range(20):
                trace_id, header = traceparent(n)
                response = client.post("/v1/vae/encode", json=ROW | {"seed": n}, headers={"traceparent": header})
                assert response.status_code == 200
                sent[trace_id] = "POST /v1/vae/encode"
        with grpc.insecure_channel(server.grpc) as channel:
            stub = stubs.GRPCInferenceServiceStub(channel)
            for n in range(20, 30):
                trace_id, header = traceparent(n)
                request = infer_request("vae", np.array([[1, 0, 1, 1, 0]]), raw=True, seed=n, samples=2)
                stub.ModelInfer(request, metadata=(("traceparent", header),), timeout=10)
                sent[trace_id] = "inference.GRPCInferenceService/ModelInfer"
            bad = infer_request("vae", np.array([[1, 0, 1, 1, 7]]), raw=True)
            trace_id, header = traceparent(30)
            with pytest.raises(grpc.RpcError) as refused:
                stub.ModelInfer(bad, metadata=(("traceparent", header),), timeout=10)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            sent[trace_id] = "inference.GRPCInferenceService/ModelInfer"
        time.sleep(0.5)
        assert collector.spans() == []  # kept, not yet sent
    finally:
        assert server.stop() == 0
    servers = {span["trace_id"]: span for span in collector.spans() if span["kind"] == SERVER}
    assert {trace_id: span["name"] for trace_id, span in servers.items()} == sent
    assert {headers["x-collector-token"] for headers in collector.headers} == {"t0ken"}
    for span in servers.values():
        assert span["parent"] == PARENT_ID
        assert span["resource"]["service.name"] == "encoder-under-test"
    grpc_span = servers[traceparent(25)[0]]
    assert grpc_span["attributes"]["rpc.system"] == "grpc"
    assert grpc_span["attributes"]["rpc.method"] == "ModelInfer"
    assert grpc_span["attributes"]["rpc.grpc.status_code"] == 0
    assert (grpc_span["attributes"]["encoder.samples"], grpc_span["attributes"]["encoder.seeded"]) == (2, True)
    children = [span["name"] for span in collector.spans() if span["parent"] == grpc_span["span_id"]]
    assert sorted(children) == ["compute", "encode", "parse"]
    mistake = servers[traceparent(30)[0]]
    assert mistake["attributes"]["rpc.grpc.status_code"] == 3
    assert mistake["attributes"]["encoder.model"] == "default"  # a failed call names the model it asked
    assert mistake["status"] == UNSET
    pids = {span["resource"]["process.pid"] for span in servers.values()}
    assert len(pids) <= int(workers)
    lines = [json.loads(line) for line in server.output().splitlines() if '"service.access"' in line]
    logged = {line["trace_id"] for line in lines if "trace_id" in line}
    assert logged == set(sent)


@pytest.mark.parametrize(("mode", "workers"), [("hang", "1"), ("refuse", "1"), ("down", "1"), ("hang", "2")])
def test_a_collector_that_hangs_refuses_or_is_down_delays_no_request(mode: str, workers: str) -> None:
    """Requests are answered as ever; what cannot be sent is dropped and counted; the drain waits
    for it no longer than OTEL_BSP_EXPORT_TIMEOUT."""
    with Collector(mode if mode != "down" else "ok") as collector:
        url = collector.url if mode != "down" else f"http://127.0.0.1:{free_port()}"
        server = serve(
            url,
            workers,
            OTEL_BSP_SCHEDULE_DELAY="10",
            OTEL_BSP_MAX_QUEUE_SIZE="16",
            OTEL_BSP_MAX_EXPORT_BATCH_SIZE="4",
            OTEL_BSP_EXPORT_TIMEOUT="1000",
            OTEL_EXPORTER_OTLP_TIMEOUT="1",
        )
        try:
            with httpx.Client(base_url=server.url, timeout=5) as client:
                for _ in range(200):
                    response = client.post("/v1/autoencoder/encode", json=ROW, headers={"traceparent": SAMPLED})
                    assert response.status_code == 200
                metrics = _wait_for_drops(client)
        finally:
            stopping = time.monotonic()
            assert server.stop() == 0
            took = time.monotonic() - stopping
        assert took < 8, f"the stop took {took:.1f} s"
        assert metrics["queue_full"] + metrics["export_failed"] > 0
        assert metrics["exported"] == 0
        if mode == "hang":
            assert metrics["queue_full"] > 0


def _wait_for_drops(client: httpx.Client) -> dict[str, float]:
    """encoder_spans_* once some spans were dropped (an export may take its timeout to fail)."""
    deadline = time.monotonic() + 10
    while True:
        found = {"exported": 0.0, "queue_full": 0.0, "export_failed": 0.0}
        for line in client.get("/metrics").text.splitlines():
            if line.startswith("encoder_spans_exported_total "):
                found["exported"] = float(line.split()[-1])
            for reason in ("queue_full", "export_failed"):
                if line.startswith(f'encoder_spans_dropped_total{{reason="{reason}"}}'):
                    found[reason] = float(line.split()[-1])
        if found["queue_full"] + found["export_failed"] > 0 or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_the_kubernetes_example_in_the_docs_turns_traces_on(monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "docs" / "operations.md").read_text()
    block = re.search(
        r"A Deployment's container, sending to a collector's Service:\n\n  ```yaml\n(.*?)  ```", text, re.S
    )
    assert block is not None, "docs/operations.md lost its traces example"
    env = yaml.safe_load(textwrap.dedent(block[1]))["env"]
    for variable in env:
        monkeypatch.setenv(variable["name"], variable["value"])
    settings = Settings()
    assert settings.traces
    assert (settings.otel_traces_sampler, settings.otel_traces_sampler_arg) == ("parentbased_traceidratio", 0.01)
    assert settings.otel_bsp_export_timeout == 5000
    from service.server.otel import resource

    assert resource(settings).attributes["deployment.environment"] == "production"


def test_every_span_is_exported_or_counted_as_dropped() -> None:
    """The event loop adds while the export thread takes: no span is lost or counted twice."""
    import asyncio

    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    from service.core.metrics import Metrics
    from service.core.traces import Span
    from service.server.otel import Export

    class Slow(SpanExporter):
        received = 0

        def export(self, spans: Any) -> SpanExportResult:
            Slow.received += len(spans)
            time.sleep(0.0005)
            return SpanExportResult.SUCCESS

        def shutdown(self) -> None:
            pass

    settings = Settings(
        otel_traces_exporter="otlp",
        otel_bsp_max_queue_size=40,
        otel_bsp_schedule_delay=1,
        otel_bsp_max_export_batch_size=8,
    )
    metrics = Metrics(routes=["/v1/vae/encode"])
    export = Export(settings, metrics, sender=Slow())
    export.start()
    total = 0
    for n in range(5000):
        span = Span(n + 1, n + 1, None, True)
        for phase in ("parse", "compute", "encode")[: n % 4]:
            span.mark(phase)
        export(span, "POST", "/v1/vae/encode", 200)
        total += 1 + n % 4
    asyncio.run(export.stop())
    assert export.queued == 0
    assert metrics.spans["exported"] == Slow.received
    assert metrics.spans["exported"] + metrics.spans["queue_full"] == total
    assert metrics.spans["queue_full"] > 0
    assert metrics.spans["exported"] > 0
