"""Benchmark the service against the bare-ASGI floor, interleaved, and print ratios.

    python bench/run.py [--rounds 3] [--duration 5] [--only A,C] [--floor-server uvicorn|service]

Each round starts the floor (bench/floor.py) and the service (`encoding-service serve`, default
settings but the input width), one worker each, pinned to core 0 with taskset, and loads each
in turn with wrk pinned to core 1, on 127.0.0.1. The floor runs on plain uvicorn (uvloop and
httptools), or with --floor-server service on the service's own protocol (service/server/protocol.py),
which writes each response in one piece: that tells the app's overhead from the server's gain.
Machines are shared and noisy, so what counts is each figure's ratio to the floor in the same
round; the table shows the median over rounds.
Needs wrk and taskset (Debian: apt-get install wrk util-linux).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
LUA = """
local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
wrk.headers["Content-Type"] = "application/json"
f:close()
"""


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    input_dim: int
    path: str
    body: dict[str, Any]
    rows: int
    connections: int
    floor_workload: str = ""  # compare with the floor's figures of another workload (E: the floor's JSON C)


def _bits(rows: int, width: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2, size=(rows, width), dtype=np.uint8)


def workloads() -> list[Workload]:
    one = [[0, 1, 1, 0, 1]]
    big = _bits(1000, 784, 1).tolist()
    huge = _bits(10_000, 784, 2)
    packed = {"packed": base64.b64encode(np.packbits(huge, axis=1).tobytes()).decode()}
    hundred = _bits(100, 5, 3).tolist()
    return [
        Workload("A", "single-row autoencoder", 5, "/v1/autoencoder/encode", {"inputs": one}, 1, 32),
        Workload("B", "single-row VAE, seeded", 5, "/v1/vae/encode", {"inputs": one, "seed": 42}, 1, 32),
        Workload("C", "1000 x 784 autoencoder, JSON", 784, "/v1/autoencoder/encode", {"inputs": big}, 1000, 4),
        Workload(
            "D",
            "100 rows x 100 samples VAE",
            5,
            "/v1/vae/encode",
            {"inputs": hundred, "samples": 100, "seed": 7},
            100,
            4,
        ),
        Workload(
            "E", "10000 x 784 autoencoder, packed", 784, "/v1/autoencoder/encode", {"inputs": packed}, 10_000, 2, "C"
        ),
    ]


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    cold_start: float

    def peak_rss_mib(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start(kind: str, input_dim: int, floor_server: str = "uvicorn") -> Server:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCODER_")}
    env |= {"ENCODER_INPUT_DIM": str(input_dim), "PYTHONPATH": str(ROOT)}
    if kind == "floor":
        command = [sys.executable, "-m", "uvicorn", "bench.floor:app", "--port", str(port), "--no-access-log"]
        if floor_server == "service":
            command += ["--http", "service.server.protocol:GuardedHttpToolsProtocol"]
    else:
        command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    return launch(command, port, ROOT, env, kind)


def launch(command: list[str], port: int, cwd: Path, env: dict[str, str], what: str) -> Server:
    """Run `command` pinned to core 0, and return once its /readyz answers 200."""
    began = time.perf_counter()
    process = subprocess.Popen(
        ["taskset", "-c", "0", *command], cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    while True:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=1) as reply:  # noqa: S310 - loopback only
                if reply.status == 200:
                    return Server(process, url, time.perf_counter() - began)
        except OSError:
            time.sleep(0.002)


@dataclass
class Result:
    rps: float
    p50: float
    p99: float
    rows_per_s: float


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise SystemExit(f"cannot read wrk's latency {text!r}")
    number, unit = match.groups()
    return float(number) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]


def wrk(url: str, connections: int, duration: float, script: Path) -> list[str]:
    """The wrk command that loads `url` from core 1, one thread, with the latency distribution."""
    seconds = f"-d{max(1, round(duration))}s"
    return ["taskset", "-c", "1", "wrk", "-t1", f"-c{connections}", seconds, "--latency", "-s", str(script), url]


def load(server: Server, work: Workload, body_file: Path, script: Path, duration: float) -> Result:
    command = wrk(f"{server.url}{work.path}", work.connections, duration, script)
    output = subprocess.run(
        command, env=os.environ | {"BENCH_BODY": str(body_file)}, capture_output=True, text=True, check=True
    ).stdout
    if "Non-2xx" in output or "Socket errors" in output:
        raise SystemExit(f"{work.name}: wrk saw errors:\n{output}")
    try:
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output).group(1))  # type: ignore[union-attr]
        p50 = _seconds(re.search(r"^\s+50%\s+(\S+)$", output, re.M).group(1))  # type: ignore[union-attr]
        p99 = _seconds(re.search(r"^\s+99%\s+(\S+)$", output, re.M).group(1))  # type: ignore[union-attr]
    except (AttributeError, SystemExit):
        raise SystemExit(f"{work.name}: cannot read wrk's output:\n{output}") from None
    return Result(rps, p50, p99, rps * work.rows)


@dataclass
class Ratios:
    figures: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.figures.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        return statistics.median(self.figures[name])


def check_same_answers(floor: Server, service: Server, work: Workload) -> None:
    """Both servers must compute the same numbers, or the comparison means nothing."""
    if "packed" in json.dumps(work.body)[:200]:
        return
    data = json.dumps(work.body).encode()
    answers = []
    for server in (floor, service):
        request = urllib.request.Request(  # noqa: S310 - loopback only
            f"{server.url}{work.path}", data=data, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310 - loopback only
            answers.append(json.loads(reply.read()))
    if answers[0] != answers[1]:
        raise SystemExit(f"{work.name}: the floor and the service disagree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per server and workload")
    parser.add_argument("--only", default="", help="comma-separated workloads, e.g. A,C")
    parser.add_argument(
        "--floor-server", choices=["uvicorn", "service"], default="uvicorn", help="the server the floor runs on"
    )
    args = parser.parse_args()
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install wrk util-linux")
    chosen = [w for w in workloads() if not args.only or w.name in args.only.split(",")]
    if any(w.floor_workload for w in chosen):  # E is measured against the floor's C
        chosen = [w for w in workloads() if w in chosen or w.name in {c.floor_workload for c in chosen}]
    tmp = Path(tempfile.mkdtemp(prefix="bench-"))
    script = tmp / "post.lua"
    script.write_text(LUA)
    bodies = {}
    for work in chosen:
        bodies[work.name] = tmp / f"{work.name}.json"
        bodies[work.name].write_text(json.dumps(work.body))

    table: dict[str, Ratios] = {w.name: Ratios() for w in chosen}
    rss, cold = Ratios(), Ratios()
    for round_ in range(1, args.rounds + 1):
        results: dict[tuple[str, str], Result] = {}
        for dim in sorted({w.input_dim for w in chosen}):
            floor, service = start("floor", dim, args.floor_server), start("service", dim)
            try:
                for work in (w for w in chosen if w.input_dim == dim):
                    check_same_answers(floor, service, work)
                    for kind, server in (("floor", floor), ("service", service)):
                        if kind == "floor" and work.floor_workload:
                            continue
                        results[(kind, work.name)] = load(server, work, bodies[work.name], script, args.duration)
                rss.add(f"floor {dim}", floor.peak_rss_mib())
                rss.add(f"service {dim}", service.peak_rss_mib())
                cold.add(f"floor {dim}", floor.cold_start)
                cold.add(f"service {dim}", service.cold_start)
            finally:
                floor.stop()
                service.stop()
        for work in chosen:
            mine = results[("service", work.name)]
            base = results[("floor", work.floor_workload or work.name)]
            ratios = table[work.name]
            for name in ("rps", "p50", "p99", "rows_per_s"):
                ratios.add(name, getattr(mine, name) / getattr(base, name))
                ratios.add(f"service {name}", getattr(mine, name))
                ratios.add(f"floor {name}", getattr(base, name))
        print(f"round {round_} of {args.rounds} done", file=sys.stderr)

    print(
        f"\n{args.rounds} rounds of {args.duration:g} s per server and workload; medians; ratio = service / floor; "
        f"the floor on {'plain uvicorn' if args.floor_server == 'uvicorn' else 'the service protocol'}\n"
    )
    print("| workload | service req/s | floor req/s | ratio | p50 ratio | p99 ratio | service rows/s | rows/s ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for work in chosen:
        r = table[work.name]
        floor_name = f" (floor: {work.floor_workload})" if work.floor_workload else ""
        print(
            f"| {work.name}: {work.title}{floor_name} | {r.median('service rps'):,.0f} | {r.median('floor rps'):,.0f} "
            f"| {r.median('rps'):.2f}x | {r.median('p50'):.2f}x | {r.median('p99'):.2f}x "
            f"| {r.median('service rows_per_s'):,.0f} | {r.median('rows_per_s'):.2f}x |"
        )
    print("\n| input_dim | peak RSS service / floor (MiB) | ratio | cold start service / floor (s) |")
    print("| --- | --- | ---: | --- |")
    for dim in sorted({w.input_dim for w in chosen}):
        s_rss, f_rss = rss.median(f"service {dim}"), rss.median(f"floor {dim}")
        print(
            f"| {dim} | {s_rss:.0f} / {f_rss:.0f} | {s_rss / f_rss:.2f}x "
            f"| {cold.median(f'service {dim}'):.2f} / {cold.median(f'floor {dim}'):.2f} |"
        )
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
