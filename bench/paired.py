"""Compare the service in the working tree with the service at a git ref, both loaded at once.

    python bench/paired.py [--base HEAD] [--rounds 5] [--duration 4] [--workload A]
                           [--env NAME=VALUE ...] [--collector] [--header NAME:VALUE ...]

For changes of a few percent, which the noise of a shared machine hides when servers are loaded
in turn (bench/run.py): each round starts both services (`encoding-service serve`, default
settings but the input width), the one at `--base` from a copy of that commit, pinned to the
same core, and loads both at the same time with one wrk each, pinned to the other core. The core
is shared between them, so whatever else the machine does slows both alike, and the ratio of the
requests each answered is the inverse ratio of what a request costs each: above 1.00x, the
working tree is cheaper. Which starts first alternates by round. Rounds agree to a few percent;
run it twice before believing a difference under 3%.

`--env` sets a variable for the working tree's service only: with `--base HEAD` and a clean tree,
it measures what a setting costs, e.g. traces with a 1% sampler:
    --base HEAD --collector --env OTEL_TRACES_SAMPLER=parentbased_traceidratio --env OTEL_TRACES_SAMPLER_ARG=0.01
`--collector` runs an OTLP/HTTP sink in this process (it answers every export 200) and points the
working tree's OTEL_EXPORTER_OTLP_ENDPOINT at it. `--header` adds a header to every request of both.
`--path` sends the working tree's requests to another path: what a named model costs against the
default one, for a repository DIR holding a model m as wide as the workload's input:
    --base HEAD --env ENCODER_MODEL_REPOSITORY=DIR --path /v1/models/m/autoencoder/encode
Needs wrk and taskset (Debian: apt-get install wrk util-linux), and git.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
from pathlib import Path

from run import LUA, ROOT, Server, Workload, _free_port, launch, workloads, wrk


def export(ref: str, into: Path) -> Path:
    """The tree of `ref`, written out under `into`."""
    archive = into / "base.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref], check=True)
    tree = into / "base"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def start(tree: Path, input_dim: int, extra: dict[str, str] | None = None) -> Server:
    """`encoding-service serve` from the code in `tree`, on core 0, ready, with `extra` variables."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENCODER_", "OTEL_"))}
    env |= {"ENCODER_INPUT_DIM": str(input_dim), "PYTHONPATH": str(tree)} | (extra or {})
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    return launch(command, port, tree, env, f"the service in {tree}")


def answered(
    servers: list[Server], paths: list[str], connections: int, body: Path, script: Path, duration: int
) -> list[int]:
    """Load every server at once (each at its path), a wrk each on core 1; the requests each answered."""
    loads = [
        subprocess.Popen(
            wrk(f"{server.url}{path}", connections, duration, script),
            env=os.environ | {"BENCH_BODY": str(body)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for server, path in zip(servers, paths, strict=True)
    ]
    counts = []
    for load in loads:
        output, _ = load.communicate()
        if "Non-2xx" in output or "Socket errors" in output:
            raise SystemExit(f"wrk saw errors:\n{output}")
        counts.append(int(re.search(r"(\d+) requests in", output).group(1)))  # type: ignore[union-attr]
    return counts


def sink() -> str:
    """An OTLP/HTTP endpoint that takes every export (in a thread of this process); its URL."""

    class Sink(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["content-length"]))
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Sink)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def comparison(doc: str | None, what: str) -> argparse.ArgumentParser:
    """The options of a comparison of the working tree with a ref (this one, bench/inprocess.py):
    which ref, how many rounds of how long, which workload, and the working tree's `what` (its
    service, its app) run with other variables or asked at another path."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="the git ref to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4, help="seconds a round")
    parser.add_argument("--workload", default="A", help="one of bench/run.py's workloads")
    parser.add_argument("--env", action="append", default=[], help=f"NAME=VALUE for the working tree's {what}")
    parser.add_argument("--path", help="the working tree's path, in place of the workload's")
    return parser


def chosen(args: argparse.Namespace, tools: dict[str, str]) -> tuple[Workload, dict[str, str]]:
    """The workload asked for and the working tree's variables, once the `tools` (command: Debian
    package) are there."""
    for tool, package in tools.items():
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install {package}")
    work = next((w for w in workloads() if w.name == args.workload), None)
    if work is None:
        raise SystemExit(f"no workload {args.workload!r}")
    return work, dict(item.split("=", 1) for item in args.env)


def main() -> None:
    parser = comparison(__doc__, "service")
    parser.add_argument("--collector", action="store_true", help="an OTLP sink for the working tree's traces")
    parser.add_argument("--header", action="append", default=[], help="NAME:VALUE sent with every request")
    args = parser.parse_args()
    work, extra = chosen(args, {"wrk": "wrk", "taskset": "util-linux", "git": "git"})
    if args.collector:
        extra |= {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": sink()}
    tmp = Path(tempfile.mkdtemp(prefix="paired-"))
    try:
        base = export(args.base, tmp)
        script, body = tmp / "post.lua", tmp / "body.json"
        headers = [item.split(":", 1) for item in args.header]
        script.write_text(
            LUA + "".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v.strip())}\n" for k, v in headers)
        )
        body.write_text(json.dumps(work.body))
        ratios = []
        for round_ in range(1, args.rounds + 1):
            trees = [base, ROOT] if round_ % 2 else [ROOT, base]  # which starts first changes each round
            servers = [start(tree, work.input_dim, extra if tree is ROOT else None) for tree in trees]
            paths = [args.path or work.path if tree is ROOT else work.path for tree in trees]
            try:
                answered(servers, paths, work.connections, body, script, 1)  # warm both up
                counts = answered(servers, paths, work.connections, body, script, args.duration)
            finally:
                for server in servers:
                    server.stop()
            before, after = counts if trees[0] is base else counts[::-1]
            ratios.append(after / before)
            print(f"round {round_}: {args.base} {before:,} requests, working tree {after:,}: {ratios[-1]:.3f}x")
        print(f"{work.name} ({work.title}): working tree / {args.base} = {statistics.median(ratios):.3f}x (median)")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
