"""Request ids, metrics and access logs, in-process."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.core.metrics import Metrics
from service.main import create_app
from service.models.encoders import seeded
from service.server.logs import JsonFormatter, configure_logging
from service.web.access import RequestLog

ROW = [[0, 1, 1, 0, 1]]


def _lines(stream: io.BytesIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = client.get("/metrics").text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_request_ids_are_taken_when_sane_and_made_otherwise(client: TestClient) -> None:
    assert client.get("/healthz", headers={"x-request-id": "trace-42"}).headers["x-request-id"] == "trace-42"
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32
    assert made != client.get("/healthz").headers["x-request-id"]
    for bad in ("x" * 200, "a b", "a;b", "<script>"):
        returned = client.get("/healthz", headers={"x-request-id": bad}).headers["x-request-id"]
        assert returned != bad
        assert len(returned) == 32
    encoded = client.post("/v1/vae/encode", json={"inputs": ROW}, headers={"x-request-id": "vae-1"})
    assert encoded.headers["x-request-id"] == "vae-1"


def test_metrics_count_requests_rows_samples_and_name_the_model(client: TestClient) -> None:
    client.post("/v1/autoencoder/encode", json={"inputs": ROW * 3})
    client.post("/v1/vae/encode", json={"inputs": ROW * 2, "samples": 4})
    client.post("/v1/vae/encode", json={"inputs": [[2]]})
    client.get("/no/such/path")
    samples = _samples(client)
    requests = "encoder_http_requests_total"
    assert samples[(requests, (("method", "POST"), ("route", "/v1/autoencoder/encode"), ("status", "200")))] == 1
    assert samples[(requests, (("method", "POST"), ("route", "/v1/vae/encode"), ("status", "422")))] == 1
    assert samples[(requests, (("method", "GET"), ("route", "unmatched"), ("status", "404")))] == 1
    default = (("kind", "autoencoder"), ("model", "default"), ("version", "1"))
    assert samples[("encoder_rows_encoded_total", default)] == 3
    assert samples[("encoder_rows_encoded_total", (("kind", "vae"), *default[1:]))] == 2
    assert samples[("encoder_samples_drawn_total", (("model", "default"), ("version", "1")))] == 8
    count = samples[("encoder_http_request_duration_seconds_count", (("route", "/v1/vae/encode"),))]
    assert count == 2
    info = next(labels for (name, labels) in samples if name == "encoder_model_info")
    assert ("fingerprint", seeded(0, 5, 2).fingerprint()) in info


def test_a_scrape_counts_the_requests_kept_for_the_next_batch() -> None:
    with TestClient(create_app(Settings())) as client:
        client.app.request_log.delay = 3600  # type: ignore[attr-defined]
        client.app.request_log.stream = io.BytesIO()  # type: ignore[attr-defined]
        for _ in range(3):
            client.post("/v1/autoencoder/encode", json={"inputs": ROW})
        kept = len(client.app.request_log.kept)  # type: ignore[attr-defined]
        encode = (("method", "POST"), ("route", "/v1/autoencoder/encode"), ("status", "200"))
        assert (kept, _samples(client)[("encoder_http_requests_total", encode)]) == (3, 3)


def test_access_log_is_one_json_line_per_request_without_the_data(client: TestClient) -> None:
    stream = client.app.request_log.stream = io.BytesIO()  # type: ignore[attr-defined]
    client.post(
        "/v1/vae/encode",
        json={"inputs": [[1, 1, 1, 1, 1]], "seed": 987654321},
        headers={"x-request-id": "log-me"},
    )
    client.post("/v1/vae/encode", json={"inputs": [[1, 1, 1, 1, 7]]})
    client.app.request_log.flush()  # type: ignore[attr-defined]
    lines = _lines(stream)
    first, second = lines
    assert first["request_id"] == "log-me"
    assert (first["method"], first["path"], first["status"]) == ("POST", "/v1/vae/encode", 200)
    assert first["level"] == "info"
    assert first["logger"] == "service.access"
    assert isinstance(first["duration_ms"], float)
    assert first["response_bytes"] > 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", str(first["time"]))
    assert second["status"] == 422
    text = json.dumps(lines)
    assert "987654321" not in text
    assert "inputs" not in text
    assert "[1, 1, 1, 1, 7]" not in text


def test_service_logs_are_json_lines_too(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("service.test")
    record = logger.makeRecord("service.test", logging.WARNING, __file__, 1, "weights %s", ("reloaded",), None)
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["logger"], line["message"]) == ("warning", "service.test", "weights reloaded")
    configure_logging("info", "text")
    configure_logging("info")  # one handler, however often it is called, in the format asked last
    ours = [h for h in logging.getLogger("service").handlers if getattr(h, "_service", False)]
    assert len(ours) == 1
    assert isinstance(ours[0].formatter, JsonFormatter)


@pytest.mark.parametrize("settings", [Settings(access_log=False), Settings(log_level="warning")])
def test_access_log_can_be_turned_off_and_requests_are_still_counted(settings: Settings) -> None:
    app = create_app(settings)
    stream = app.request_log.stream = io.BytesIO()  # type: ignore[attr-defined]
    with TestClient(app) as quiet:
        assert quiet.get("/healthz").status_code == 200
        healthz = (("method", "GET"), ("route", "/healthz"), ("status", "200"))
        assert _samples(quiet)[("encoder_http_requests_total", healthz)] == 1
    assert stream.getvalue() == b""


def test_access_log_lines_go_out_together_soon_after_and_at_shutdown() -> None:
    stream = io.BytesIO()
    with TestClient(create_app(Settings())) as client:
        client.app.request_log.stream = stream  # type: ignore[attr-defined]
        client.app.request_log.delay = 0.5  # type: ignore[attr-defined]
        for _ in range(3):
            client.get("/healthz")
        assert stream.getvalue() == b""  # kept for now
        portal_sleep = client.portal.call  # type: ignore[union-attr]
        portal_sleep(asyncio.sleep, 0.8)  # the app's own event loop runs the delayed write
        assert [line["path"] for line in _lines(stream)] == ["/healthz"] * 3
        client.get("/readyz")
    assert _lines(stream)[-1]["path"] == "/readyz"  # written when the app shut down


class Chunks(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.writes.append(bytes(data))
        return super().write(data)


def test_access_log_writes_whole_lines_at_most_pipe_buf_at_a_time() -> None:
    stream = Chunks()
    log = RequestLog(Metrics(), stream=stream)

    async def write_many() -> None:
        for i in range(200):
            log.request(str(i).encode(), "GET", "/" + "x" * (i % 50), 200, 0.001, 10, ("127.0.0.1", 50000))
        log.flush()

    asyncio.run(write_many())
    assert len(stream.writes) > 1
    assert all(len(chunk) <= RequestLog.PIPE_BUF and chunk.endswith(b"\n") for chunk in stream.writes)
    assert [line["request_id"] for line in _lines(stream)] == [str(i) for i in range(200)]


def test_latency_buckets_count_what_is_at_or_below_their_bound() -> None:
    metrics = Metrics()
    for seconds in (0.0005, 0.0007, 0.001, 0.3, 20.0):
        metrics.observe("/healthz", "GET", 200, seconds)
    families = text_string_to_metric_families(generate_latest(metrics.registry).decode())
    latency = next(f for f in families if f.name == "encoder_http_request_duration_seconds")
    buckets = {s.labels["le"]: s.value for s in latency.samples if s.name.endswith("_bucket")}
    for bound, count in buckets.items():
        assert count == sum(1 for s in (0.0005, 0.0007, 0.001, 0.3, 20.0) if s <= float(bound)), bound
    totals = {s.name: s.value for s in latency.samples if not s.name.endswith("_bucket")}
    assert totals["encoder_http_request_duration_seconds_count"] == 5
    assert totals["encoder_http_request_duration_seconds_sum"] == pytest.approx(20.3022)


def test_access_log_lines_are_json_whatever_the_path_and_client() -> None:
    stream = io.BytesIO()
    log = RequestLog(Metrics(), stream=stream)
    path, client = '/a"b\\c\n\u00e9\u2028', 'proxy "x"'

    async def write_one() -> None:
        log.request(b"id-1", "GET", path, 404, 0.0123456, 0, (client, 1))
        log.flush()

    asyncio.run(write_one())
    (line,) = _lines(stream)
    assert (line["path"], line["client"], line["request_id"], line["status"]) == (path, client, "id-1", 404)
    assert line["duration_ms"] == 12.346
    assert (line["level"], line["logger"], line["message"]) == ("info", "service.access", "request")
    assert line["method"] == "GET"


def test_a_full_batch_is_written_right_after_the_step_that_filled_it() -> None:
    stream = io.BytesIO()
    log = RequestLog(Metrics(), stream=stream, delay=3600)

    async def fill() -> None:
        for i in range(RequestLog.KEEP + 1):
            log.request(str(i).encode(), "GET", "/healthz", 200, 0.001, 10, ("127.0.0.1", 50000))
        assert stream.getvalue() == b""  # not in the step that answers a request
        await asyncio.sleep(0)
        assert len(_lines(stream)) == RequestLog.KEEP + 1

    asyncio.run(fill())


def test_lines_kept_when_a_loop_ends_go_out_with_the_next_loop_s_batch() -> None:
    stream = io.BytesIO()
    log = RequestLog(Metrics(), stream=stream, delay=0.05)

    async def one(request_id: bytes, wait: float) -> None:
        log.request(request_id, "GET", "/healthz", 200, 0.001, 10, ("127.0.0.1", 50000))
        await asyncio.sleep(wait)

    asyncio.run(one(b"first", 0))  # its loop ends before the delayed write
    asyncio.run(one(b"second", 0.2))  # as a test client without a lifespan does, request after request
    assert [line["request_id"] for line in _lines(stream)] == ["first", "second"]


def test_paths_with_parameters_are_labelled_by_their_template_and_the_labels_kept_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import service.core.metrics as metrics_module

    monkeypatch.setattr(metrics_module, "TEMPLATED", 3)
    metrics = Metrics(routes=["/v1/autoencoder/encode", "/v1/models/{model_name}/autoencoder/encode"])
    for name in ["a", "b", "a", "c", "d", "e", "a"]:
        assert metrics.route(f"/v1/models/{name}/autoencoder/encode") == "/v1/models/{model_name}/autoencoder/encode"
    assert metrics.route("/v1/models/a/b/autoencoder/encode") == "unmatched"  # [^/]+: one segment
    assert metrics.route("/v1/autoencoder/encode") == "/v1/autoencoder/encode"
    assert len(metrics.templated) == 3  # made-up names are matched each time, not kept
