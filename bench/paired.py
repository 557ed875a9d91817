"""Compare the service in the working tree with the service at a git ref, both loaded at once.

    python bench/paired.py [--base HEAD] [--rounds 5] [--duration 4] [--workload A]

For changes of a few percent, which the noise of a shared machine hides when servers are loaded
in turn (bench/run.py): each round starts both services (`encoding-service serve`, default
settings but the input width), the one at `--base` from a copy of that commit, pinned to the
same core, and loads both at the same time with one wrk each, pinned to the other core. The core
is shared between them, so whatever else the machine does slows both alike, and the ratio of the
requests each answered is the inverse ratio of what a request costs each: above 1.00x, the
working tree is cheaper. Which starts first alternates by round. Rounds agree to a few percent;
run it twice before believing a difference under 3%.
Needs wrk and taskset (Debian: apt-get install wrk util-linux), and git.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from run import LUA, ROOT, Server, _free_port, launch, workloads, wrk


def export(ref: str, into: Path) -> Path:
    """The tree of `ref`, written out under `into`."""
    archive = into / "base.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), ref], check=True)
    tree = into / "base"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    return tree


def start(tree: Path, input_dim: int) -> Server:
    """`encoding-service serve` from the code in `tree`, on core 0, ready."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCODER_")}
    env |= {"ENCODER_INPUT_DIM": str(input_dim), "PYTHONPATH": str(tree)}
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    return launch(command, port, tree, env, f"the service in {tree}")


def answered(servers: list[Server], path: str, connections: int, body: Path, script: Path, duration: int) -> list[int]:
    """Load every server at once, a wrk each on core 1; the requests each answered."""
    loads = [
        subprocess.Popen(
            wrk(f"{server.url}{path}", connections, duration, script),
            env=os.environ | {"BENCH_BODY": str(body)},
            stdout=subprocess.PIPE,
            text=True,
        )
        for server in servers
    ]
    counts = []
    for load in loads:
        output, _ = load.communicate()
        if "Non-2xx" in output or "Socket errors" in output:
            raise SystemExit(f"wrk saw errors:\n{output}")
        counts.append(int(re.search(r"(\d+) requests in", output).group(1)))  # type: ignore[union-attr]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="HEAD", help="the git ref to compare the working tree with")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=4, help="seconds of load a round")
    parser.add_argument("--workload", default="A", help="one of bench/run.py's workloads")
    args = parser.parse_args()
    for tool in ("wrk", "taskset", "git"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install wrk util-linux git")
    work = next((w for w in workloads() if w.name == args.workload), None)
    if work is None:
        raise SystemExit(f"no workload {args.workload!r}")
    tmp = Path(tempfile.mkdtemp(prefix="paired-"))
    try:
        base = export(args.base, tmp)
        script, body = tmp / "post.lua", tmp / "body.json"
        script.write_text(LUA)
        body.write_text(json.dumps(work.body))
        ratios = []
        for round_ in range(1, args.rounds + 1):
            trees = [base, ROOT] if round_ % 2 else [ROOT, base]  # which starts first changes each round
            servers = [start(tree, work.input_dim) for tree in trees]
            try:
                answered(servers, work.path, work.connections, body, script, 1)  # warm both up
                counts = answered(servers, work.path, work.connections, body, script, args.duration)
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
