"""Single-row ModelInfer over gRPC: this service against MLServer 1.7 serving the same model, and
against its own REST /v2, in the same run, and print ratios.

    python bench/infer_grpc.py --mlserver PYTHON [--rounds 3] [--duration 5] [--streams 32] [--input-dim 5]

PYTHON is the interpreter of an environment that has MLServer 1.7 (its pins clash with the
service's, so it gets its own: `python3 -m venv VENV && VENV/bin/pip install mlserver==1.7.1`).
MLServer serves the service's default autoencoder (seed 0, `--input-dim` -> 2, written to an .npz)
through a custom runtime (an MLModel) computing relu(x @ W + b) with numpy, in its main process
(`parallel_workers: 0`, its fastest on one core: no hop to a worker process). Before loading, one
call to each checks that both answer the same numbers.

Each round starts `encoding-service serve` (default settings: JSON access log and metrics on),
MLServer and the floor (bench/grpc_floor.py: grpc.aio answering an empty message, what grpc.aio
itself costs), one process each pinned to core 0 in turn, and loads each with h2load (nghttp2-client)
pinned to core 1: gRPC as HTTP/2 POSTs of one prepared framed ModelInferRequest (the autoencoder,
one row, raw_input_contents, as tritonclient.grpc sends it) on one connection with `--streams`
concurrent streams; REST /v2 as JSON over HTTP/1.1 on `--streams` connections. The machine is
shared and noisy: what counts is the ratios within a round; the table shows the median over rounds.
Needs h2load and taskset (Debian: apt-get install nghttp2-client util-linux).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import ROOT, Server, _free_port, launch

sys.path.insert(0, str(ROOT))
from service.api.grpc import inference_pb2 as pb
from service.api.grpc import inference_pb2_grpc as stubs
from service.models.encoders import seeded

RUNTIME = '''
import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class Autoencoder(MLModel):
    """relu(x @ W + b), the service's autoencoder, from an .npz."""

    async def load(self) -> bool:
        weights = np.load(self.settings.parameters.uri)
        self.weight, self.bias = weights["weight"], weights["bias"]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float64)
        codes = np.maximum(x @ self.weight + self.bias, 0.0)
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("codes", codes)])
'''


def infer_request(row: np.ndarray) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="autoencoder")
    request.inputs.add(name="input", datatype="INT32", shape=[1, row.size])
    request.raw_input_contents.append(row.astype("<i4").tobytes())
    return request


def framed(message: bytes) -> bytes:
    """One gRPC message as it goes on the wire: not compressed, its length, itself."""
    return struct.pack(">?I", False, len(message)) + message


def codes(address: str, request: pb.ModelInferRequest) -> np.ndarray:
    with grpc.insecure_channel(address) as channel:
        response = stubs.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    (output,) = response.outputs
    if response.raw_output_contents:
        values = np.frombuffer(response.raw_output_contents[0], dtype="<f8")
    else:
        values = np.array(output.contents.fp64_contents)
    return values.reshape(list(output.shape))


def start_service(input_dim: int) -> tuple[Server, str]:
    port, grpc_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENCODER_")}
    env |= {"ENCODER_INPUT_DIM": str(input_dim), "ENCODER_GRPC_PORT": str(grpc_port), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    return launch(command, port, ROOT, env, "the service"), f"127.0.0.1:{grpc_port}"


def start_mlserver(python: str, folder: Path) -> tuple[Server, str]:
    http, grpc_port, metrics = _free_port(), _free_port(), _free_port()
    settings = {"host": "127.0.0.1", "http_port": http, "grpc_port": grpc_port, "metrics_port": metrics}
    (folder / "settings.json").write_text(json.dumps(settings | {"parallel_workers": 0}))
    began = time.perf_counter()
    process = subprocess.Popen(
        ["taskset", "-c", "0", str(Path(python).parent / "mlserver"), "start", str(folder)],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{http}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"MLServer exited with {process.returncode} (run `mlserver start {folder}` to see why)")
        try:
            with urllib.request.urlopen(f"{url}/v2/models/autoencoder/ready", timeout=1) as reply:  # noqa: S310
                if reply.status == 200:
                    return Server(process, url, time.perf_counter() - began), f"127.0.0.1:{grpc_port}"
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("MLServer did not become ready in 120 s")


def start_floor() -> tuple[Server, str]:
    """bench/grpc_floor.py on core 0, once it answers."""
    port = _free_port()
    began = time.perf_counter()
    command = ["taskset", "-c", "0", sys.executable, str(Path(__file__).parent / "grpc_floor.py"), str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
    return Server(process, "", time.perf_counter() - began), f"127.0.0.1:{port}"


def h2load(url: str, body: Path, duration: float, streams: int, grpc_call: bool) -> float:
    """Requests a second that h2load saw answered, from core 1; any failure stops the run."""
    if grpc_call:
        shape = ["-c", "1", "-m", str(streams), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    else:
        shape = ["--h1", "-c", str(streams), "-m", "1", "-H", "content-type: application/json"]
    command = ["taskset", "-c", "1", "h2load", "-D", str(max(1, round(duration))), *shape, "-d", str(body), url]
    output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    done = re.search(
        r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", output
    )
    rate = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", output)
    if done is None or rate is None:
        raise SystemExit(f"cannot read h2load's output:\n{output}")
    if int(done.group(3)) or int(done.group(4)) or done.group(1) != done.group(2):
        raise SystemExit(f"h2load saw failures on {url}:\n{output}")
    return float(rate.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlserver", required=True, help="the python of an environment with mlserver 1.7")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of load per server and protocol")
    parser.add_argument("--streams", type=int, default=32, help="calls in flight at once")
    parser.add_argument("--input-dim", type=int, default=5)
    args = parser.parse_args()
    for tool in ("h2load", "taskset"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is missing: apt-get install nghttp2-client util-linux")

    tmp = Path(tempfile.mkdtemp(prefix="bench-grpc-"))
    model = seeded(0, args.input_dim, 2)
    folder = tmp / "mlserver"
    (folder / "autoencoder").mkdir(parents=True)
    np.savez(folder / "autoencoder" / "weights.npz", weight=model.ae_weight, bias=model.ae_bias)
    (folder / "autoencoder" / "runtime.py").write_text(textwrap.dedent(RUNTIME))
    model_settings = {
        "name": "autoencoder",
        "implementation": "runtime.Autoencoder",
        "parameters": {"uri": str(folder / "autoencoder" / "weights.npz")},
    }
    (folder / "autoencoder" / "model-settings.json").write_text(json.dumps(model_settings))

    row = np.random.default_rng(1).integers(0, 2, size=args.input_dim)
    request = infer_request(row)
    grpc_body, rest_body = tmp / "infer.grpc", tmp / "infer.json"
    grpc_body.write_bytes(framed(request.SerializeToString()))
    tensor = {"name": "input", "shape": [1, args.input_dim], "datatype": "INT32", "data": row.tolist()}
    rest_body.write_text(json.dumps({"inputs": [tensor]}))
    method = "/inference.GRPCInferenceService/ModelInfer"

    names = {"service": "service gRPC", "mlserver": "MLServer gRPC", "floor": "grpc.aio floor"}
    rates: dict[str, list[float]] = {name: [] for name in [*names.values(), "service REST /v2"]}
    ratios: dict[str, list[float]] = {
        "gRPC: service / MLServer": [],
        "gRPC: floor / MLServer": [],
        "gRPC: service / floor": [],
        "service: gRPC / REST /v2": [],
    }
    for round_ in range(1, args.rounds + 1):
        got: dict[str, float] = {}
        order = ["service", "mlserver", "floor"] if round_ % 2 else ["floor", "mlserver", "service"]
        for which in order:
            if which == "service":
                server, address = start_service(args.input_dim)
            elif which == "mlserver":
                server, address = start_mlserver(args.mlserver, folder)
            else:
                server, address = start_floor()
            try:
                if which != "floor":
                    answer = codes(address, request)
                    expected = np.maximum(row @ model.ae_weight + model.ae_bias, 0.0)[None, :]
                    if not np.array_equal(answer, expected):
                        raise SystemExit(f"{which} answered {answer}, not {expected}")
                got[names[which]] = h2load(f"http://{address}{method}", grpc_body, args.duration, args.streams, True)
                if which == "service":
                    url = f"{server.url}/v2/models/autoencoder/infer"
                    got["service REST /v2"] = h2load(url, rest_body, args.duration, args.streams, False)
            finally:
                server.stop()
        for name, rate in got.items():
            rates[name].append(rate)
        ratios["gRPC: service / MLServer"].append(got["service gRPC"] / got["MLServer gRPC"])
        ratios["gRPC: floor / MLServer"].append(got["grpc.aio floor"] / got["MLServer gRPC"])
        ratios["gRPC: service / floor"].append(got["service gRPC"] / got["grpc.aio floor"])
        ratios["service: gRPC / REST /v2"].append(got["service gRPC"] / got["service REST /v2"])
        print(f"round {round_}: " + ", ".join(f"{name} {rate:,.0f}/s" for name, rate in got.items()), flush=True)

    print(f"\nsingle-row ModelInfer, {args.input_dim} -> 2, {args.streams} in flight, median of {args.rounds} rounds")
    for name, values in rates.items():
        print(f"  {name:<28} {statistics.median(values):>10,.0f} requests/s")
    for name, values in ratios.items():
        each = ", ".join(f"{v:.2f}x" for v in values)
        print(f"  {name:<28} {statistics.median(values):>10.2f}x   (rounds: {each})")


if __name__ == "__main__":
    main()
