"""Memory stays bounded when many clients send big bodies at once: 300 connections, each sending
a 13 MiB JSON body (under the 16 MiB limit) a MiB at a time, to `encoding-service serve` with the
manifests' settings. RSS stays under the pod's 512 MiB limit, every request is answered 200 or
503 (with Retry-After), each 503 is counted in /metrics, and RSS comes back near its start
afterwards."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import start_server

SERVE = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
CLIENTS = 300
POD_LIMIT_MIB = 512


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_300_clients_with_big_bodies_stay_under_the_pods_memory_limit() -> None:
    server = start_server(SERVE, input_dim="784", latent_dim="32", access_log="false")
    pid = server.process.pid
    body = json.dumps({"inputs": [[i % 2 for i in range(784)]] * 6000}).encode()
    assert 12 * 2**20 < len(body) < 16 * 2**20
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/autoencoder/encode HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    answers: Counter[str] = Counter()
    retry_after: Counter[bool] = Counter()
    lock = threading.Lock()
    peak = [0.0]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            peak[0] = max(peak[0], _rss_mib(pid))
            time.sleep(0.02)

    def client() -> None:
        with socket.create_connection((host, int(port)), timeout=120) as sock:
            reply = b""
            try:
                sock.sendall(head)
                for start in range(0, len(body), 2**20):
                    sock.sendall(body[start : start + 2**20])
            except OSError:  # answered 503 and closed before the whole body went: read the answer
                pass
            while b"\r\n\r\n" not in reply:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                reply += chunk
        status = reply.split(b" ", 2)[1].decode() if reply else "no answer"
        with lock:
            answers[status] += 1
            if status == "503":
                retry_after[b"\r\nretry-after: 1\r\n" in reply.lower()] += 1

    try:
        before = _rss_mib(pid)
        sampler = threading.Thread(target=sample)
        sampler.start()
        clients = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join(timeout=300)
        time.sleep(1)  # the burst is over: memory handed back
        after = _rss_mib(pid)
        sampling.set()
        sampler.join()
        metrics = httpx.get(f"{server.url}/metrics").text
    finally:
        server.stop()
    print(f"RSS {before:.0f} MiB, peak {peak[0]:.0f} MiB, after {after:.0f} MiB; answers {dict(answers)}")
    assert set(answers) <= {"200", "503"}, answers
    assert answers["200"] >= 8, answers  # the budget lets bodies through, a few at a time
    assert retry_after == Counter({True: answers["503"]})
    assert peak[0] < POD_LIMIT_MIB, peak
    assert after < before + 64, (before, after)
    refused = {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "encoder_requests_refused_total"
    }  # waiting for the budget counts as in progress: past 256 of those, refused at once
    assert refused["memory_budget"] + refused["requests_in_progress"] == answers["503"], refused
    assert "Traceback" not in server.output()
