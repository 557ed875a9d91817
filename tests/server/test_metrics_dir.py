"""ENCODER_METRICS_DIR at its edges: missing, not a directory, unwritable, shared by two servers,
holding an earlier run's counts or a malformed file, removed while the server runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import orjson
import pytest

from service.core.metrics import Metrics
from tests.conftest import ROOT, free_port, run_app, server_env, start_server
from tests.server.test_workers import _counted

SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
ROW = {"inputs": [[0, 1, 1, 0, 1]]}
UNWRITABLE = "/proc/self"  # a directory nobody may create files in, root included


def _serve_refused(**settings: str) -> subprocess.CompletedProcess[str]:
    argv = [part.replace("{port}", str(free_port())) for part in SERVE]
    return subprocess.run(argv, cwd=ROOT, env=server_env(**settings), capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("directory", "problem"),
    [("missing", "does not exist"), ("a-file", "not a directory"), (UNWRITABLE, "cannot be written")],
)
@pytest.mark.parametrize("how", ["serve", "uvicorn"])
def test_a_metrics_dir_that_cannot_hold_the_counts_is_refused_in_one_line(
    tmp_path: Path, directory: str, problem: str, how: str
) -> None:
    (tmp_path / "a-file").write_text("")
    path = directory if directory.startswith("/") else str(tmp_path / directory)
    result = _serve_refused(metrics_dir=path) if how == "serve" else run_app(metrics_dir=path)
    assert result.returncode != 0
    assert f"ENCODER_METRICS_DIR {path!r}: {problem}" in result.stderr
    assert "Traceback" not in result.stderr


def test_one_worker_starts_counting_from_zero_and_two_servers_never_share_a_directory(tmp_path: Path) -> None:
    (tmp_path / "worker-1.json").write_text('{"pid": 1, "requests": "not counts"}')  # malformed, from before
    for run in range(2):  # the second run does not carry the first one's counts over
        server = start_server(SERVE, metrics_dir=str(tmp_path), stdout=True)
        try:
            for _ in range(5):
                assert httpx.post(f"{server.url}/v1/vae/encode", json=ROW).status_code == 200
            metrics = httpx.get(f"{server.url}/metrics")
            assert metrics.status_code == 200
            assert _counted(metrics.text)["requests"] == 5, run
            if run == 0:
                second = _serve_refused(metrics_dir=str(tmp_path))
                assert second.returncode == 2
                assert f"in use by another server (pid {server.process.pid})" in second.stderr
                assert "Traceback" not in second.stderr
        finally:
            assert server.stop() == 0
        assert "Traceback" not in server.output()


def test_a_metrics_dir_gone_bad_at_run_time_loses_no_request_and_no_log_line(tmp_path: Path) -> None:
    directory = tmp_path / "metrics"
    directory.mkdir()
    server = start_server(SERVE, metrics_dir=str(directory), stdout=True)
    try:
        (directory / "worker-1.json").write_text("{not json")  # another worker's file, malformed
        shutil.rmtree(directory)  # and then the whole directory gone
        for _ in range(5):
            assert httpx.post(f"{server.url}/v1/vae/encode", json=ROW).status_code == 200
            time.sleep(0.1)  # counts are handed on every 0.25 s at most: several tries to write
        for _ in range(3):
            metrics = httpx.get(f"{server.url}/metrics")
            assert metrics.status_code == 200
        assert _counted(metrics.text)["requests"] == 5
        time.sleep(0.5)
    finally:
        server.stop()
    output = server.output()
    assert output.count('"path":"/v1/vae/encode"') == 5  # every access-log line written
    assert output.count("cannot write worker-") == 1  # said once
    assert "Traceback" not in output


def test_a_scrape_skips_a_malformed_workers_file_and_says_so_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics(routes=["/v1/vae/encode"], shared=tmp_path)
    metrics.observe("/v1/vae/encode", "POST", 200, 0.001)
    good = Metrics(routes=["/v1/vae/encode"])
    good.observe("/v1/vae/encode", "POST", 200, 0.001)
    snapshot = good.snapshot()
    (tmp_path / "worker-2.json").write_bytes(orjson.dumps(snapshot))
    for name, text in [
        ("worker-3.json", b"{not json"),
        ("worker-4.json", b'{"pid": 4, "requests": "x"}'),
        ("worker-5.json", orjson.dumps({**snapshot, "latency": {"/v1/vae/encode": [1.0, 2.0]}})),
    ]:
        (tmp_path / name).write_bytes(text)
    for _ in range(2):
        assert metrics.totals().requests == {("/v1/vae/encode", "POST", 200): 2}
    warnings = sorted(r.getMessage() for r in caplog.records if r.name == "service.metrics")
    assert [w.split(" skipped")[0] for w in warnings] == [
        "ENCODER_METRICS_DIR: worker-3.json",
        "ENCODER_METRICS_DIR: worker-4.json",
        "ENCODER_METRICS_DIR: worker-5.json",
    ]
