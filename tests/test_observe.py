"""Request ids, metrics and access logs, in-process."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.config import Settings
from service.main import create_app
from service.model import seeded
from service.observe import JsonFormatter, configure_logging

ROW = [[0, 1, 1, 0, 1]]


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(record.getMessage()))  # access-log records are JSON lines


@pytest.fixture
def access_log() -> Iterator[Collect]:
    handler = Collect()
    logger = logging.getLogger("service.access")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


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
    assert samples[("encoder_rows_encoded_total", (("model", "autoencoder"),))] == 3
    assert samples[("encoder_rows_encoded_total", (("model", "vae"),))] == 2
    assert samples[("encoder_samples_drawn_total", ())] == 8
    count = samples[("encoder_http_request_duration_seconds_count", (("route", "/v1/vae/encode"),))]
    assert count == 2
    info = next(labels for (name, labels) in samples if name == "encoder_model_info")
    assert ("fingerprint", seeded(0, 5, 2).fingerprint()) in info


def test_access_log_is_one_json_line_per_request_without_the_data(client: TestClient, access_log: Collect) -> None:
    client.post(
        "/v1/vae/encode",
        json={"inputs": [[1, 1, 1, 1, 1]], "seed": 987654321},
        headers={"x-request-id": "log-me"},
    )
    client.post("/v1/vae/encode", json={"inputs": [[1, 1, 1, 1, 7]]})
    first, second = access_log.lines[-2:]
    assert first["request_id"] == "log-me"
    assert (first["method"], first["path"], first["status"]) == ("POST", "/v1/vae/encode", 200)
    assert first["level"] == "info"
    assert first["logger"] == "service.access"
    assert isinstance(first["duration_ms"], float)
    assert first["response_bytes"] > 0
    assert second["status"] == 422
    text = json.dumps(access_log.lines)
    assert "987654321" not in text
    assert "inputs" not in text
    assert "[1, 1, 1, 1, 7]" not in text


def test_service_logs_are_json_lines_too(capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("service.test")
    record = logger.makeRecord("service.test", logging.WARNING, __file__, 1, "weights %s", ("reloaded",), None)
    line = json.loads(JsonFormatter().format(record))
    assert (line["level"], line["logger"], line["message"]) == ("warning", "service.test", "weights reloaded")
    configure_logging("info")
    configure_logging("info")  # once per process, however often it is called
    ours = [h for h in logging.getLogger("service.access").handlers if getattr(h, "_service_json", False)]
    assert len(ours) == 1


def test_access_log_can_be_turned_off(access_log: Collect) -> None:
    with TestClient(create_app(Settings(access_log=False))) as quiet:
        quiet.get("/healthz")
    assert access_log.lines == []
