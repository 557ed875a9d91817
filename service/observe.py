"""What operators see: request ids, Prometheus metrics and JSON access logs, in one middleware pass."""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson
from prometheus_client import CollectorRegistry, Info
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.http import TIMED_OUT, route_path

REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Counts:
    """What one process has counted: requests, latency, requests in flight, rows and samples."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}  # (route, method, status) -> count
        self.latency: dict[str, list[float]] = {}  # route -> [count per bucket..., over the last bucket, sum]
        self.in_flight = 0
        self.rows = {"autoencoder": 0, "vae": 0}
        self.samples = 0

    def dump(self) -> bytes:
        return orjson.dumps(
            {
                "pid": os.getpid(),
                "requests": [[*key, count] for key, count in self.requests.items()],
                "latency": self.latency,
                "in_flight": self.in_flight,
                "rows": self.rows,
                "samples": self.samples,
            }
        )

    def add(self, data: dict[str, Any], live: bool) -> None:
        """Add another process's counts (Counts.dump); its requests in flight only if it is alive."""
        for route, method, status, count in data["requests"]:
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + count
        for route, counts in data["latency"].items():
            mine = self.latency.setdefault(route, [0.0] * len(counts))
            for i, value in enumerate(counts):
                mine[i] += value
        self.in_flight += data["in_flight"] if live else 0
        for model, count in data["rows"].items():
            self.rows[model] = self.rows.get(model, 0) + count
        self.samples += data["samples"]


class Metrics(Counts):
    """The service's Prometheus metrics, in a registry of their own (one per app).

    Counted in plain Python numbers and turned into Prometheus metric families only when scraped:
    every request and every count runs on the event loop's thread, so there is nothing to lock,
    and a request pays a dict lookup and an addition or two instead of the client library's locked
    counters (about 3 us a request less, measured).

    With several worker processes (`shared`, a directory they all see: ENCODER_METRICS_DIR), each
    writes its counts to a file of its own there whenever its RequestLog hands a batch on (within
    0.25 s of a request) and when scraped, and a scrape sums every worker's file: whichever worker
    answers it, it counts them all. A worker that exited leaves its file, so counters never go
    back; its requests in flight are not counted.
    """

    def __init__(self, routes: Iterable[str] = (), shared: Path | None = None) -> None:
        super().__init__()
        self.registry = CollectorRegistry(auto_describe=True)
        self.model = Info("encoder_model", "The served model.", registry=self.registry)
        self.routes = frozenset(routes)
        self.shared = shared
        self.catch_up: Callable[[], None] = lambda: None  # counts what is kept for later: RequestLog sets it
        self.registry.register(self)

    def route(self, path: str) -> str:
        """A bounded label for a path: a known one, the docs assets, or "unmatched"."""
        if path in self.routes:
            return path
        return "/docs-assets" if path.startswith("/docs-assets/") else "unmatched"

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count and time one request."""
        key = (route, method, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        latency = self.latency.get(route)
        if latency is None:
            latency = self.latency[route] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        latency[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: a bucket counts what is <= its bound
        latency[-1] += seconds

    def encoded(self, model: str, rows: int, samples: int = 0) -> None:
        self.rows[model] += rows
        self.samples += samples

    def publish(self) -> None:
        """Write this worker's counts where the other workers' scrapes read them (with `shared`)."""
        if self.shared is None:
            return
        path = self.shared / f"worker-{os.getpid()}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(self.dump())
        os.replace(temporary, path)  # whole or not at all, for a reader

    def totals(self) -> Counts:
        """Every worker's counts summed (with `shared`), or this one's."""
        if self.shared is None:
            return self
        self.publish()
        totals = Counts()
        for path in sorted(self.shared.glob("worker-*.json")):
            try:
                data = orjson.loads(path.read_bytes())
            except (OSError, orjson.JSONDecodeError):
                continue
            totals.add(data, live=data["pid"] == os.getpid() or _alive(data["pid"]))
        return totals

    def collect(self) -> Iterator[Metric]:
        """The metric families as they stand (prometheus_client calls this on each scrape)."""
        self.catch_up()
        counts = self.totals()
        requests = CounterMetricFamily(
            "encoder_http_requests",
            "HTTP requests answered, by route, method and status.",
            labels=["route", "method", "status"],
        )
        for (route, method, status), count in sorted(counts.requests.items()):
            requests.add_metric([route, method, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "encoder_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response, by route.",
            labels=["route"],
        )
        for route, in_buckets in sorted(counts.latency.items()):
            cumulative, buckets = 0.0, []
            for bound, in_bucket in zip([*map(str, LATENCY_BUCKETS), "+Inf"], in_buckets[:-1], strict=True):
                cumulative += in_bucket
                buckets.append((bound, cumulative))
            latency.add_metric([route], buckets, sum_value=in_buckets[-1])
        yield latency
        yield GaugeMetricFamily("encoder_http_requests_in_flight", "Requests being handled.", value=counts.in_flight)
        rows = CounterMetricFamily("encoder_rows_encoded", "Rows encoded, by model.", labels=["model"])
        for model, count in sorted(counts.rows.items()):
            rows.add_metric([model], count)
        yield rows
        yield CounterMetricFamily("encoder_samples_drawn", "VAE samples of z drawn.", value=counts.samples)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# What is kept of a request: time, request id, method, path, status, seconds, bytes, client.
Request = tuple[float, bytes, str, str, int, float, int, tuple[str, int] | None]
# One access-log line, as JsonFormatter would write it (the time in ISO 8601, UTC, to the millisecond).
LINE = (
    b'{"time":"%s.%03d+00:00","level":"info","logger":"service.access","message":"request","request_id":"%s",'
    b'"method":%s,"path":%s,"status":%d,"duration_ms":%.3f,"response_bytes":%d,"client":%s}\n'
)
# The same, as text (ENCODER_LOG_FORMAT=text): what a client controls still goes in quotes, escaped.
TEXT_LINE = b"%s.%03dZ INFO service.access: request_id=%s %s %s %d %.3fms %dB client=%s\n"


class RequestLog:
    """What Observe keeps of each request, handed on a batch at a time: counted into the metrics
    and, with the access log on, written as JSON lines on stdout.

    A request costs an append to a list. The batch is handed on as soon as `KEEP` requests have
    gathered, when the metrics are scraped, when the app shuts down, and, with the access log on,
    `delay` seconds after its first request, as a web server's buffered access log is written.
    Writing each line through `logging` cost a one-row request about 35 us, and counting it into
    the metrics as it ended about 4% of its throughput, measured; in batches, the same work runs in
    one tight loop. The price: a process killed outright (SIGKILL) loses up to `delay` seconds of
    lines. Each write holds whole lines, at most PIPE_BUF bytes of them, so workers sharing a pipe
    never split each other's lines.
    """

    PIPE_BUF = 4096
    KEEP = 512

    def __init__(
        self,
        metrics: Metrics,
        *,
        access_log: bool = True,
        stream: IO[bytes] | None = None,
        delay: float = 0.25,
        text: bool = False,
    ) -> None:
        self.metrics = metrics
        self.template = TEXT_LINE if text else LINE
        self.access_log = access_log
        self.stream = stream  # None: sys.stdout, as it is when the lines are written
        self.delay = delay
        self.kept: list[Request] = []
        self.pending: asyncio.Handle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.second: tuple[int, bytes] = (0, b"")
        self.timed = access_log or metrics.shared is not None  # a batch goes out `delay` after its first
        metrics.catch_up = self.flush

    def request(
        self,
        request_id: bytes,
        method: str,
        path: str,
        status: int,
        seconds: float,
        size: int,
        client: tuple[str, int] | None,
    ) -> None:
        """Keep one request, stamped with the time now."""
        kept = self.kept
        kept.append((time.time(), request_id, method, path, status, seconds, size, client))
        if len(kept) == self.KEEP:  # soon, but after this step: its response goes out first
            if self.pending is not None:
                self.pending.cancel()
            self.loop = asyncio.get_running_loop()
            self.pending = self.loop.call_soon(self.flush)
        elif self.timed and (self.pending is None or self.loop is None or self.loop.is_closed()):
            self.loop = asyncio.get_running_loop()  # a test client's loop may be gone: a new one
            self.pending = self.loop.call_later(self.delay, self.flush)

    def flush(self) -> None:
        """Count the kept requests into the metrics, and write their lines if the access log is on."""
        if self.pending is not None:
            self.pending.cancel()
            self.pending = None
        kept, self.kept = self.kept, []
        if not kept:
            return
        observe, route = self.metrics.observe, self.metrics.route
        for _, _, method, path, status, seconds, _, _ in kept:
            observe(route(path), method, status, seconds)
        self.metrics.publish()
        if self.access_log:
            self.write(kept)

    def write(self, kept: list[Request]) -> None:
        stream = self.stream if self.stream is not None else sys.stdout.buffer
        chunk: list[bytes] = []
        size = 0
        for line in self.lines(kept):
            if chunk and size + len(line) > self.PIPE_BUF:
                stream.write(b"".join(chunk))
                stream.flush()
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        stream.write(b"".join(chunk))
        stream.flush()

    def lines(self, kept: list[Request]) -> Iterator[bytes]:
        """The lines (JSON, or text), made with one template: the request id is a safe token (REQUEST_ID, or
        made here), the numbers are numbers, and the strings a client controls are encoded by orjson."""
        dumps, template = orjson.dumps, self.template
        for at, request_id, method, path, status, seconds, size, client in kept:
            second = int(at)
            if second != self.second[0]:  # the time up to the second is made once a second
                self.second = (second, datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S").encode())
            yield template % (
                self.second[1],
                int((at - second) * 1000),
                request_id,
                dumps(method),
                dumps(path),
                status,
                seconds * 1000,
                size,
                dumps(client[0] if client else ""),
            )


class Observe:
    """Give every request an id (its X-Request-ID if it sends a sane one), and keep when it ended,
    how and how long it took, never what it sent, for the metrics and the access log (RequestLog)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log: RequestLog) -> None:
        self.app = app
        self.metrics = metrics
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        status, size = 500, 0

        async def observed_send(message: Message) -> None:
            nonlocal status, size
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (b"x-request-id", request_id)]
            elif message["type"] == "http.response.body":
                size += len(message.get("body", b""))
            await send(message)

        metrics = self.metrics
        metrics.in_flight += 1
        try:
            await self.app(scope, receive, observed_send)
        finally:
            metrics.in_flight -= 1
            if TIMED_OUT in scope:  # the server answered 408 itself
                status, size = 408, 0
            elapsed = time.perf_counter() - started
            self.log.request(request_id, scope["method"], route_path(scope), status, elapsed, size, scope.get("client"))


def _request_id(scope: Scope) -> bytes:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and REQUEST_ID.fullmatch(value):
            return bytes(value)
    return random.getrandbits(128).to_bytes(16).hex().encode()  # an id, not a secret: no syscall for it


# Not fields of a line: a record's own attributes, and uvicorn's colored copy of the message.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and any `extra` fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update((k, v) for k, v in record.__dict__.items() if k not in _RECORD_FIELDS)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


def configure_logging(level: str, log_format: str = "json") -> None:
    """The service's own loggers on stdout, once per process, as JSON lines or text (the access
    log writes its own lines: RequestLog)."""
    logger = logging.getLogger("service")
    logger.setLevel(level.upper() if level != "trace" else "DEBUG")
    for handler in [h for h in logger.handlers if getattr(h, "_service", False)]:
        logger.removeHandler(handler)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT))
    handler._service = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


def uvicorn_log_config(log_format: str) -> dict[str, Any]:
    """uvicorn's logging config, for `encoding-service serve`: its own lines (startup, errors,
    shutdown), and anything else logged through the root logger, as JSON lines on stderr, or as
    uvicorn writes them by default. uvicorn applies ENCODER_LOG_LEVEL on top."""
    if log_format == "json":
        formatter: dict[str, Any] = {"()": JsonFormatter}
    else:
        formatter = {"()": "uvicorn.logging.DefaultFormatter", "fmt": "%(levelprefix)s %(message)s"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
        },
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
            "uvicorn.access": {"handlers": ["default"], "level": "INFO", "propagate": False},
        },
        "root": {"handlers": ["default"], "level": "WARNING"},
    }
