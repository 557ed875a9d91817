"""Load and soak: hundreds of concurrent connections on a mixed workload, against 127.0.0.1 only.

CI runs a short pass. The full run holds 300 connections for a minute:
    LOAD_SECONDS=60 LOAD_CONNECTIONS=300 pytest -s tests/system/test_load.py
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson

from tests.conftest import start_server

SECONDS = float(os.environ.get("LOAD_SECONDS", "8"))
CONNECTIONS = int(os.environ.get("LOAD_CONNECTIONS", "200"))
# RSS from the first to the last quarter of the run, after warm-up, may grow by at most this much.
RSS_GROWTH = 0.10

ONE = [[0, 1, 1, 0, 1]]
BATCH = [[(i >> j) & 1 for j in range(5)] for i in range(500)]
WORK: list[tuple[str, str, dict[str, object], int]] = [
    ("autoencoder", "/v1/autoencoder/encode", {"inputs": ONE}, 200),
    ("vae seeded", "/v1/vae/encode", {"inputs": ONE, "samples": 3, "seed": 11}, 200),
    ("vae drawn", "/v1/vae/encode", {"inputs": ONE, "samples": 2}, 200),
    ("batch", "/v1/autoencoder/encode", {"inputs": BATCH}, 200),
    ("vae batch", "/v1/vae/encode", {"inputs": BATCH[:100], "samples": 10, "seed": 3}, 200),
    ("bad value", "/v1/vae/encode", {"inputs": [[0, 1, 2, 0, 1]]}, 422),
    ("ragged", "/v1/autoencoder/encode", {"inputs": [[0, 1], [1]]}, 422),
    ("over limit", "/v1/vae/encode", {"inputs": BATCH, "samples": 1000}, 413),
]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def hammer(url: str, pid: int) -> tuple[Counter[tuple[str, int]], Counter[str], list[float]]:
    outcomes: Counter[tuple[str, int]] = Counter()
    errors: Counter[str] = Counter()
    rss: list[float] = []
    deadline = time.monotonic() + SECONDS
    limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)

    bodies = [(name, path, orjson.dumps(body), expected) for name, path, body, expected in WORK]
    headers = {"content-type": "application/json"}

    async def worker(client: httpx.AsyncClient, rng: random.Random) -> None:
        while time.monotonic() < deadline:
            name, path, body, expected = rng.choice(bodies)
            try:
                response = await client.post(path, content=body, headers=headers)
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1
                continue
            outcomes[(name, response.status_code)] += 1
            if response.status_code != expected:
                errors[f"{name}: {response.status_code}"] += 1

    async def sample() -> None:
        while time.monotonic() < deadline:
            rss.append(rss_mib(pid))
            await asyncio.sleep(SECONDS / 40)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        seeds = itertools.count()
        await asyncio.gather(sample(), *(worker(client, random.Random(next(seeds))) for _ in range(CONNECTIONS)))
    return outcomes, errors, rss


def test_mixed_load_has_no_errors_and_flat_memory() -> None:
    server = start_server([sys.executable, "-m", "service.cli", "serve", "--port", "{port}"], access_log="false")
    try:
        outcomes, errors, rss = asyncio.run(hammer(server.url, server.process.pid))
        assert server.process.poll() is None
    finally:
        server.stop()
    total = sum(outcomes.values())
    quarter = len(rss) // 4
    first, last = statistics.mean(rss[quarter : 2 * quarter]), statistics.mean(rss[-quarter:])
    print(
        f"\nload: {CONNECTIONS} connections for {SECONDS:g} s: {total} responses ({total / SECONDS:.0f}/s), "
        f"errors {dict(errors)}, RSS {rss[0]:.0f} -> {first:.1f} (2nd quarter) -> {last:.1f} MiB (last quarter), "
        f"peak {max(rss):.1f} MiB; by kind: {dict(sorted(outcomes.items()))}"
    )
    assert not errors, errors
    assert all(status < 500 for _, status in outcomes)
    assert total > CONNECTIONS  # every connection got answers, not just one
    assert {name for name, _ in outcomes} == {name for name, *_ in WORK}
    assert last <= first * (1 + RSS_GROWTH), f"RSS grew from {first:.1f} to {last:.1f} MiB"
