"""What a model repository costs: startup time and memory for N models, and what unloading returns.

    python bench/repository.py [--models 100] [--input-dim 784] [--latent-dim 32]

Writes N seeded models (input_dim -> latent_dim, with no decoders) into a temporary repository,
then starts `encoding-service serve` twice in the same run, pinned to one core: once with the
default model (the baseline), once with the repository. It prints the time to ready of each,
their resident memory, the memory a model adds ((repository - baseline) / N), and the resident
memory after half the models are unloaded through the API.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from run import ROOT, _free_port, launch

sys.path.insert(0, str(ROOT))
from service.models import weights
from service.models.encoders import seeded


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024  # type: ignore[union-attr]


def post(url: str) -> None:
    headers = {"content-type": "application/json"}
    request = urllib.request.Request(url, data=b"{}", method="POST", headers=headers)  # noqa: S310 - loopback
    with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310 - loopback only
        reply.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--input-dim", type=int, default=784)
    parser.add_argument("--latent-dim", type=int, default=32)
    args = parser.parse_args()
    command = [sys.executable, "-m", "service.cli", "serve", "--port", "{port}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCODER_")}
    env |= {"ENCODER_SHUTDOWN_DELAY": "0", "ENCODER_ACCESS_LOG": "false"}
    with tempfile.TemporaryDirectory() as folder:
        repository = Path(folder)
        for i in range(args.models):
            (repository / f"m{i:03d}" / "1").mkdir(parents=True)
            model = seeded(i, args.input_dim, args.latent_dim)
            weights.save(model, repository / f"m{i:03d}" / "1" / "model.safetensors")
        size = sum(p.stat().st_size for p in repository.rglob("*.safetensors")) / args.models / 2**20
        results = {}
        for label, extra in (("baseline (default model)", []), ("repository", ["--model-repository", folder])):
            port = _free_port()
            argv = [part.replace("{port}", str(port)) for part in command + extra]
            server = launch(argv, port, ROOT, env, label)
            time.sleep(1)
            results[label] = (server.cold_start, rss_mib(server.process.pid))
            if extra:
                for i in range(0, args.models, 2):
                    post(f"{server.url}/v2/repository/models/m{i:03d}/unload")
                time.sleep(1)
                half = rss_mib(server.process.pid)
            server.stop()
    (base_start, base_rss), (repo_start, repo_rss) = results.values()
    per_model = (repo_rss - base_rss) / args.models
    print(json.dumps({"models": args.models, "dims": f"{args.input_dim} -> {args.latent_dim}"}))
    print(f"weights file: {size:.2f} MiB a model")
    print(f"time to ready: baseline {base_start:.2f} s, {args.models} models {repo_start:.2f} s")
    print(f"resident memory: baseline {base_rss:.1f} MiB, {args.models} models {repo_rss:.1f} MiB")
    print(f"memory a loaded model adds: {per_model:.2f} MiB")
    print(f"after unloading {(args.models + 1) // 2} of them: {half:.1f} MiB ({repo_rss - half:.1f} MiB returned)")


if __name__ == "__main__":
    main()
