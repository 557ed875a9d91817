"""Several workers (`encoding-service serve` with ENCODER_WORKERS=2): one /metrics counts them all."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import start_server

SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]


def _counted(text: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if sample.name == "encoder_http_requests_total" and labels["route"] == "/v1/vae/encode":
                found["requests"] = found.get("requests", 0) + sample.value
            elif sample.name == "encoder_http_request_duration_seconds_count" and labels["route"] == "/v1/vae/encode":
                found["timed"] = sample.value
            elif sample.name == "encoder_rows_encoded_total" and labels["kind"] == "vae":
                found["rows"] = sample.value
            elif sample.name == "encoder_samples_drawn_total":
                found["samples"] = sample.value
    return found


def test_every_scrape_counts_every_workers_requests(tmp_path: Path) -> None:
    stale = tmp_path / "worker-1.json"
    stale.write_text("{}")  # an earlier run's file: emptied at start
    server = start_server(SERVE, workers="2", metrics_dir=str(tmp_path), access_log="false")
    try:
        for _ in range(300):  # a new connection each: the kernel spreads them over both workers
            response = httpx.post(f"{server.url}/v1/vae/encode", json={"inputs": [[0, 1, 1, 0, 1]] * 2, "samples": 3})
            assert response.status_code == 200
        time.sleep(1)  # each worker hands its counts on within 0.25 s
        files = sorted(tmp_path.glob("worker-*.json"))
        assert stale not in files
        per_worker = [dict(json.loads(path.read_text())["rows"])["default|1|vae"] for path in files]
        assert len(per_worker) == 2, per_worker
        assert all(0 < rows < 600 for rows in per_worker), per_worker  # both answered some
        for _ in range(6):
            counted = _counted(httpx.get(f"{server.url}/metrics").text)
            assert counted == {"requests": 300, "timed": 300, "rows": 600, "samples": 1800}, counted
    finally:
        server.stop()


def test_one_worker_with_a_metrics_dir_counts_itself_once(tmp_path: Path) -> None:
    server = start_server(SERVE, metrics_dir=str(tmp_path))
    try:
        httpx.post(f"{server.url}/v1/vae/encode", json={"inputs": [[0, 1, 1, 0, 1]]})
        assert _counted(httpx.get(f"{server.url}/metrics").text)["requests"] == 1
    finally:
        server.stop()
