"""Compare the app in the working tree with the app at a git ref, in process: no server, no sockets.

    python bench/inprocess.py [--base HEAD] [--rounds 5] [--duration 4] [--workload A]
                              [--env NAME=VALUE ...] [--path PATH]

Each round runs two processes pinned to core 0 at the same time, one per tree; each builds the
service's app (`service.main:app`, its lifespan run) and calls it through its whole ASGI stack,
as uvicorn would, with the workload's request, for `--duration` seconds. The ratio of the calls
each made is the inverse ratio of what a request costs the app: above 1.00x, the working tree is
cheaper. What uvicorn and the kernel do is left out, so the app's own changes show larger and
steadier than under bench/paired.py (rounds agree to about 1%): use this one to find what costs,
and bench/paired.py to say what a user gets. `--env` and `--path` are the working tree's, as in
bench/paired.py. The access log goes to /dev/null. Needs taskset (util-linux) and git.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from paired import chosen, comparison, export
from run import ROOT


async def _calls(path: str, body: bytes, start: float, duration: float) -> int:
    """In a worker process: call the app with one request, from `start` for `duration` seconds."""
    from service.main import app

    startup: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    state: dict[str, Any] = {}
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
    lifespan = asyncio.create_task(app(scope, startup.get, replies.put))
    if (await replies.get())["type"] != "lifespan.startup.complete":
        raise SystemExit("the app did not start")
    headers = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    async def call() -> None:
        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 50000), "scheme": "http", "method": "POST",
            "root_path": "", "path": path, "raw_path": path.encode(), "query_string": b"", "headers": headers,
            "state": state.copy(),
        }  # fmt: skip
        await app(scope, receive, send)

    for _ in range(3000):  # warm up
        await call()
    if set(statuses) != {200}:
        raise SystemExit(f"{path} answered {sorted(set(statuses))}")
    while time.time() < start:
        await asyncio.sleep(0.001)
    calls, end = 0, start + duration
    while time.time() < end:
        for _ in range(100):
            await call()
        calls += 100
    await startup.put({"type": "lifespan.shutdown"})
    await replies.get()
    await lifespan
    return calls


def worker() -> None:
    """`inprocess.py --worker PATH BODY_FILE START DURATION`, with PYTHONPATH the tree: prints the calls."""
    path, body, start, duration = sys.argv[2], Path(sys.argv[3]).read_bytes(), float(sys.argv[4]), float(sys.argv[5])
    import uvloop

    print(uvloop.run(_calls(path, body, start, duration)), file=sys.stderr)


def main() -> None:
    args = comparison(__doc__, "app").parse_args()
    work, extra = chosen(args, {"taskset": "util-linux", "git": "git"})
    tmp = Path(tempfile.mkdtemp(prefix="inprocess-"))
    try:
        base = export(args.base, tmp)
        body = tmp / "body.json"
        body.write_text(json.dumps(work.body))
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("ENCODER_", "OTEL_"))}
        ratios = []
        for round_ in range(1, args.rounds + 1):
            start = time.time() + 5  # both have started and warmed up by then
            runs = {}
            for tree in (base, ROOT):
                env = clean | {"ENCODER_INPUT_DIM": str(work.input_dim), "PYTHONPATH": str(tree)}
                env |= extra if tree is ROOT else {}
                path = args.path or work.path if tree is ROOT else work.path
                command = [sys.executable, __file__, "--worker", path, str(body), str(start), str(args.duration)]
                pinned = ["taskset", "-c", "0", *command]
                runs[tree] = subprocess.Popen(
                    pinned, cwd=tree, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )
            counts = {}
            for tree, run in runs.items():
                _, errors = run.communicate()
                if run.returncode != 0:
                    raise SystemExit(f"the app in {tree} failed:\n{errors.decode()}")
                counts[tree] = int(errors.split()[-1])
            ratios.append(counts[ROOT] / counts[base])
            before, after = counts[base], counts[ROOT]
            print(f"round {round_}: {args.base} {before:,} calls, working tree {after:,}: {ratios[-1]:.3f}x")
        median = statistics.median(ratios)
        print(f"{work.name} ({work.title}), in process: working tree / {args.base} = {median:.3f}x (median)")
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker()
    else:
        main()
