"""The `encoding-service` command: serve, export the OpenAPI spec, write seeded weights."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

from pydantic import ValidationError

from service.config import ROOT_PATH, Settings, describe, settings_table
from service.models import weights
from service.models.encoders import Model, ModelError, seeded
from service.server.logs import json_errors, say_error

DEFAULT_SPEC = Path("openapi/openapi.json")
SERVER_LOCK = "server.lock"  # in ENCODER_METRICS_DIR, held by the server that counts there


def spec_document(settings: Settings) -> dict[str, Any]:
    """The OpenAPI document the service serves with these settings."""
    from service.api import spec
    from service.main import create_app

    return spec.build(create_app(settings), settings.input_dim, settings.latent_dim, settings)


def spec_text(settings: Settings) -> str:
    return json.dumps(spec_document(settings), indent=2, ensure_ascii=False) + "\n"


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    import uvicorn

    from service.core.gate import COST_PER_BODY_BYTE
    from service.server.drain import IN_FLIGHT, GrpcOptions, serve
    from service.server.logs import uvicorn_log_config
    from service.server.protocol import GuardedHttpToolsProtocol

    # With ENCODER_SHUTDOWN_DELAY=0, uvicorn raises SIGTERM again once it has finished; that second
    # SIGTERM lands here, so a graceful stop exits 0, as orchestrators expect.
    signal.signal(signal.SIGTERM, lambda _signal, _frame: sys.exit(0))
    if args.model_repository is not None:  # the app, in each worker, reads it with its settings
        os.environ["ENCODER_MODEL_REPOSITORY"] = str(args.model_repository.resolve())
    config = uvicorn.Config(
        "service.main:app",
        host=args.host or settings.host,
        port=settings.port if args.port is None else args.port,
        workers=settings.workers if args.workers is None else args.workers,
        log_level=settings.log_level,
        log_config=uvicorn_log_config(settings.log_format),
        # --root-path; ENCODER_ROOT_PATH is the app's own (RootPath), under any server, so not twice
        root_path=args.root_path or "",
        proxy_headers=False,  # the app believes X-Forwarded-* from ENCODER_TRUSTED_PROXIES only
        access_log=False,  # the service writes its own JSON access log (ENCODER_ACCESS_LOG)
        http=GuardedHttpToolsProtocol,  # requests arrive within ENCODER_REQUEST_TIMEOUT; one write a response
        timeout_keep_alive=settings.keep_alive_timeout,  # kept by the protocol's coarse timer
        timeout_graceful_shutdown=IN_FLIGHT,
    )
    with _metrics_dir(settings, config.workers):
        try:
            grpc_port = settings.grpc_port if args.grpc_port is None else args.grpc_port
            arriving = settings.memory_budget // COST_PER_BODY_BYTE
            grpc = GrpcOptions(config.host, grpc_port, settings.max_body_bytes, arriving)
            return serve(config, settings.shutdown_delay, grpc if grpc_port else None)
        except KeyboardInterrupt:
            return 0


class CommandError(Exception):
    """A mistake in a command's flags or settings, said in one line."""


@contextlib.contextmanager
def _metrics_dir(settings: Settings, workers: int) -> Iterator[None]:
    """The directory where each worker keeps its counts for /metrics (Metrics.shared): with
    ENCODER_METRICS_DIR, that one, checked, held for this server alone (a lock: two servers
    counting into one directory would wipe each other's counts) and emptied of an earlier run's
    files; else, with several workers, a new one removed at exit."""
    directory = settings.metrics_dir
    if directory is None:
        if workers == 1:
            yield
            return
        with tempfile.TemporaryDirectory(prefix="encoding-service-metrics-") as made:
            os.environ["ENCODER_METRICS_DIR"] = made  # the workers read it with their settings
            yield
        return
    import fcntl

    from service.core.control import STALE
    from service.core.metrics import usable

    problem = usable(directory)
    if problem is not None:
        raise CommandError(f"ENCODER_METRICS_DIR {str(directory)!r}: {problem}")
    with (directory / SERVER_LOCK).open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise CommandError(
                f"ENCODER_METRICS_DIR {str(directory)!r}: in use by another server (pid {holder}); "
                "each server needs a directory of its own"
            ) from None
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        for pattern in ("worker-*.json", "worker-*.tmp", *STALE):
            for stale in directory.glob(pattern):
                stale.unlink(missing_ok=True)
        yield  # the lock is released when the file closes, at exit


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line naming it (not a usage block), and serve's is a JSON
    log line when the log format is JSON, as everything else it writes."""

    json_lines = False  # main sets it for `serve` when the log format is JSON

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("encoding-service").strip()
        say_error(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)", self.json_lines)
        sys.exit(2)


def _setting(name: str) -> Callable[[str], Any]:
    """A flag's value checked as the setting of that name is (the same bounds, the same words)."""
    from pydantic import TypeAdapter

    field = Settings.model_fields[name]
    adapter: TypeAdapter[Any] = TypeAdapter(Annotated[field.annotation, *field.metadata])  # type: ignore[arg-type]

    def parse(text: str) -> Any:
        try:
            return adapter.validate_python(text)
        except ValidationError as exc:
            message = exc.errors(include_url=False, include_input=False)[0]["msg"]
            raise argparse.ArgumentTypeError(f"{message[0].lower()}{message[1:]}, not {text!r}") from None

    parse.__name__ = name
    return parse


def _number(
    kind: type, low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False
) -> Callable[[str], Any]:
    """A flag's number within bounds (closed unless said open)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, not {text!r}"
            ) from None
        below = value <= low if open_low else value < low
        above = high is not None and (value >= high if open_high else value > high)
        if below or above or value != value:  # NaN too
            low_side = f"{'>' if open_low else '>='} {low:g}"
            high_side = "" if high is None else f" and {'<' if open_high else '<='} {high:g}"
            raise argparse.ArgumentTypeError(f"must be {low_side}{high_side}, not {text!r}")
        return value

    return parse


def _settings(_args: argparse.Namespace, _settings: Settings) -> int:
    print(settings_table(), end="")
    return 0


def _root_path(value: str) -> str:
    if not re.fullmatch(ROOT_PATH, value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a path prefix such as /api (no trailing slash)")
    return value


def _openapi(args: argparse.Namespace, _settings: Settings) -> int:
    text = spec_text(Settings.model_construct())  # the default model, whatever the environment says
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date; run: encoding-service openapi", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


def _weights(args: argparse.Namespace, settings: Settings) -> int:
    seed = settings.seed if args.seed is None else args.seed
    input_dim = settings.input_dim if args.input_dim is None else args.input_dim
    latent_dim = settings.latent_dim if args.latent_dim is None else args.latent_dim
    try:
        model = seeded(seed, input_dim, latent_dim)
        weights.save(model, args.out)
    except (ModelError, weights.WeightsError, OSError) as exc:
        print(f"encoding-service: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: seed {seed}, input_dim {input_dim}, latent_dim {latent_dim}, {model.fingerprint()}")
    return 0


def _train(args: argparse.Namespace, _settings: Settings) -> int:
    from service.models.train import load_data, train

    try:
        data = load_data(args.data)
    except (OSError, ValueError) as exc:
        print(f"encoding-service: {exc}", file=sys.stderr)
        return 1
    width = 30

    def progress(line: str) -> None:
        epoch = re.match(r"\S+ epoch +(\d+)/(\d+):", line)  # "<model> epoch <i>/<n>: ..." gets a bar
        if epoch:
            filled = round(width * int(epoch.group(1)) / int(epoch.group(2)))
            line = f"[{'#' * filled}{'.' * (width - filled)}] {line}"
        print(line, file=sys.stderr, flush=True)

    try:
        model, report = train(
            data,
            latent_dim=args.latent_dim,
            seed=args.seed,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            held_out=args.held_out,
            patience=args.patience,
            progress=progress,
        )
        if args.repository is not None:
            out, report_path = publish_version(args.repository, args.name, model, report)
        else:
            out, report_path = args.out, args.report or args.out.with_suffix(".json")
            weights.save(model, out)
            report_path.write_text(json.dumps(report, indent=2) + "\n")
    except (ModelError, weights.WeightsError, OSError) as exc:
        print(f"encoding-service: {exc}", file=sys.stderr)
        return 1
    accuracy = report["held_out_accuracy"]
    print(
        f"wrote {out} ({report['fingerprint']}) and {report_path}: held-out bit accuracy "
        f"{accuracy['autoencoder']:.3f} (autoencoder), {accuracy['vae']:.3f} (vae), "
        f"{report['rows_per_second']:,} rows/s"
    )
    return 0


def publish_version(repository: Path, name: str, model: Model, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write `model` as the next version of `name` in a model repository, whole or not at all: the
    weights and the report go into a hidden directory beside the versions, which is then renamed to
    the next version number (a rename is atomic, so a polling server never reads half a file, and
    two trainings at once take two numbers). The paths of the weights file and the report."""
    from service.core.inference import VERSION

    folder = repository / name
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=folder))
    try:
        weights.save(model, staging / "model.safetensors")
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        while True:
            taken = [int(p.name) for p in folder.iterdir() if VERSION.fullmatch(p.name)]
            version = folder / str(max(taken, default=0) + 1)
            try:
                staging.rename(version)  # fails if another training took the number first
                break
            except OSError:
                if not version.exists():
                    raise
        return version / "model.safetensors", version / "report.json"
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _name(value: str) -> str:
    from service.core.inference import CoreError
    from service.core.repository import valid_name

    try:
        return valid_name(value)
    except CoreError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _plot(args: argparse.Namespace, _settings: Settings) -> int:
    from service.models.plot import plot

    try:
        plot(args.data, args.weights, args.out, labels=args.labels, samples=args.samples, seed=args.seed)
    except ImportError:
        print("encoding-service: plotting needs matplotlib: pip install 'encoding-service[plot]'", file=sys.stderr)
        return 1
    except (OSError, ValueError, weights.WeightsError) as exc:
        print(f"encoding-service: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = Parser(
        prog="encoding-service",
        description="Latent codes of binary vectors over HTTP. Settings come from ENCODER_* variables.",
    )
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service (uvicorn)")
    serve.add_argument("--host", help="address to listen on (default: ENCODER_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=_setting("port"), help="port to listen on (default: ENCODER_PORT, 8000)")
    serve.add_argument(
        "--grpc-port", type=_setting("grpc_port"), help="gRPC port, 0 for none (default: ENCODER_GRPC_PORT, 8001)"
    )
    serve.add_argument("--workers", type=_setting("workers"), help="worker processes (default: ENCODER_WORKERS, 1)")
    serve.add_argument(
        "--root-path", type=_root_path, help="path prefix a proxy in front strips (default: ENCODER_ROOT_PATH)"
    )
    serve.add_argument(
        "--model-repository", type=Path, help="a model repository to serve (default: ENCODER_MODEL_REPOSITORY)"
    )
    serve.set_defaults(run=_serve)

    table = commands.add_parser("settings", help="print the table of ENCODER_ settings (the README's)")
    table.set_defaults(run=_settings)

    openapi = commands.add_parser("openapi", help="write the OpenAPI spec of the default model")
    openapi.add_argument("--out", type=Path, default=DEFAULT_SPEC, help=f"where to write it (default: {DEFAULT_SPEC})")
    openapi.add_argument("--check", action="store_true", help="exit 1 if the file differs instead of writing it")
    openapi.set_defaults(run=_openapi)

    write = commands.add_parser("weights", help="write seeded weights to a .npz or .safetensors file")
    write.add_argument("out", type=Path, help="file to write; the extension picks the format")
    write.add_argument("--seed", type=_setting("seed"), help="seed (default: ENCODER_SEED, 0)")
    write.add_argument("--input-dim", type=_setting("input_dim"), help="input width (default: ENCODER_INPUT_DIM, 5)")
    write.add_argument("--latent-dim", type=_setting("latent_dim"), help="code width (default: ENCODER_LATENT_DIM, 2)")
    write.set_defaults(run=_weights)

    fit = commands.add_parser("train", help="train both models on a file of 0/1 rows; write weights with decoders")
    fit.add_argument("data", type=Path, help=".npy, .npz or .csv of 0/1 rows")
    target = fit.add_mutually_exclusive_group(required=True)
    target.add_argument("--out", type=Path, help="weights file to write (.safetensors or .npz)")
    target.add_argument("--repository", type=Path, help="model repository to write the next version into (with --name)")
    fit.add_argument("--name", type=_name, help="the model's name in --repository")
    fit.add_argument("--report", type=Path, help="JSON report (default: the weights file's name with .json)")
    fit.add_argument("--latent-dim", type=_setting("latent_dim"), default=2, help="code width (default 2)")
    fit.add_argument(
        "--seed", type=_setting("seed"), default=0, help="seed: the same data and seed give the same weights"
    )
    fit.add_argument("--epochs", type=_number(int, 1), default=200, help="most epochs, at least 1 (default 200)")
    fit.add_argument("--batch-size", type=_number(int, 1), default=128, help="rows a step (default 128)")
    fit.add_argument(
        "--lr", type=_number(float, 0, 1, open_low=True), default=0.003, help="Adam's learning rate (default 0.003)"
    )
    fit.add_argument(
        "--held-out",
        type=_number(float, 0, 1, open_low=True, open_high=True),
        default=0.1,
        help="share of rows held out, between 0 and 1 (default 0.1)",
    )
    fit.add_argument(
        "--patience", type=_number(int, 1), default=10, help="epochs without a better held-out loss to stop"
    )
    fit.set_defaults(run=_train)

    draw = commands.add_parser("plot", help="draw both latent spaces to a PNG (needs matplotlib)")
    draw.add_argument("data", type=Path, help=".npy, .npz or .csv of 0/1 rows")
    draw.add_argument("--weights", type=Path, required=True, help="weights file")
    draw.add_argument("--out", type=Path, required=True, help="PNG to write")
    draw.add_argument("--labels", type=Path, help="one label a row (.npy, .csv or text), to colour by")
    draw.add_argument("--samples", type=_number(int, 1, 1000), default=5, help="z samples drawn per row (default 5)")
    draw.add_argument("--seed", type=_setting("seed"), default=0, help="seed of the samples")
    draw.set_defaults(run=_plot)
    return root


def main(argv: list[str] | None = None) -> int:
    command = parser()
    words = sys.argv[1:] if argv is None else argv
    Parser.json_lines = bool(words) and words[0] == "serve" and json_errors()  # a server's lines go to its log
    args = command.parse_args(argv)
    if args.command == "train" and (args.repository is None) != (args.name is None):
        command.error("--repository and --name go together")
    as_json = Parser.json_lines
    try:
        settings = Settings()
    except ValidationError as exc:
        say_error(f"invalid settings: {describe(exc)}", as_json)
        return 2
    try:
        code: int = args.run(args, settings)
    except CommandError as exc:
        say_error(str(exc), as_json)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
