"""Prometheus metrics, counted in plain numbers on the event loop and summed over a server's workers at a scrape."""

from __future__ import annotations

import bisect
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NotRequired

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.samples import Exemplar
from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict

logger = logging.getLogger("service.metrics")

# gRPC calls are kept as requests are (service.api.grpc.servicer): method GRPC, the route the
# RPC's full name, the status its code's number; the metrics give them families of their own.
GRPC = "GRPC"
GRPC_METHODS = ("/inference.", "/grpc.")
CODE_NAMES = {
    0: "OK", 1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
    6: "ALREADY_EXISTS", 7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION",
    10: "ABORTED", 11: "OUT_OF_RANGE", 12: "UNIMPLEMENTED", 13: "INTERNAL", 14: "UNAVAILABLE",
    15: "DATA_LOSS", 16: "UNAUTHENTICATED",
}  # fmt: skip
SPANS = ("exported", "queue_full", "export_failed")
TEMPLATED = 4096  # paths kept with the route template they matched (Metrics.route)
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Snapshot(TypedDict):
    """What a worker's file holds (Counts.snapshot)."""

    pid: int
    requests: list[tuple[str, str, int, int]]
    latency: dict[str, list[float]]
    in_flight: int
    rows: dict[str, int]
    samples: dict[str, int]
    refused: dict[str, int]
    spans: NotRequired[dict[str, int]]


SNAPSHOT = TypeAdapter(Snapshot)


def usable(directory: Path) -> str | None:
    """What keeps a directory from holding the workers' files (ENCODER_METRICS_DIR), or None."""
    if not directory.is_dir():
        return "not a directory" if directory.exists() else "does not exist"
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
            pass
    except OSError as exc:
        return f"cannot be written ({exc.strerror or exc})"
    return None


class Counts:
    """What one process has counted: requests, latency, requests in flight, rows and samples."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}  # (route, method, status) -> count
        self.latency: dict[str, list[float]] = {}  # route -> [count per bucket..., over the last bucket, sum]
        self.in_flight = 0
        self.rows: dict[str, int] = {}  # "model|version|kind" -> rows
        self.samples: dict[str, int] = {}  # "model|version" -> samples of z
        self.refused: dict[str, int] = {}  # reason -> requests refused with 503 (service.web.admission)
        # Spans of sampled requests (service.server.otel): exported, or dropped and why. The keys are
        # all here from the start: the export thread only adds to their values.
        self.spans: dict[str, int] = dict.fromkeys(SPANS, 0)

    def snapshot(self) -> dict[str, Any]:
        """The counts as plain data, as a worker's file holds them (Counts.add reads it back)."""
        return {
            "pid": os.getpid(),
            "requests": [[*key, count] for key, count in self.requests.items()],
            "latency": self.latency,
            "in_flight": self.in_flight,
            "rows": self.rows,
            "samples": self.samples,
            "refused": self.refused,
            "spans": dict(self.spans),
        }

    def add(self, data: dict[str, Any], live: bool) -> None:
        """Add a process's counts (Counts.snapshot); its requests in flight only if it is alive."""
        for route, method, status, count in data["requests"]:
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + count
        for route, counts in data["latency"].items():
            mine = self.latency.setdefault(route, [0.0] * len(counts))
            for i, value in enumerate(counts):
                mine[i] += value
        self.in_flight += data["in_flight"] if live else 0
        for key, count in data["rows"].items():
            self.rows[key] = self.rows.get(key, 0) + count
        for key, count in data["samples"].items():
            self.samples[key] = self.samples.get(key, 0) + count
        for key, count in data["refused"].items():
            self.refused[key] = self.refused.get(key, 0) + count
        for key, count in data.get("spans", {}).items():
            if key in self.spans:
                self.spans[key] += count


class Metrics(Counts):
    """The service's Prometheus metrics, in a registry of their own (one per app).

    Counted in plain Python numbers and turned into Prometheus metric families only when scraped:
    every request and every count runs on the event loop's thread, so there is nothing to lock,
    and a request pays a dict lookup and an addition or two instead of the client library's locked
    counters (about 3 us a request less, measured).

    With several worker processes (`shared`, a directory they all see: ENCODER_METRICS_DIR), each
    writes its counts to a file of its own there whenever its RequestLog hands a batch on (within
    0.25 s of a request), and a scrape sums its own counts and the other workers' files: whichever
    worker answers it, it counts them all. A worker that exited leaves its file, so counters never go
    back; its requests in flight are not counted.
    """

    def __init__(self, routes: Iterable[str] = (), shared: Path | None = None) -> None:
        super().__init__()
        self.registry = CollectorRegistry(auto_describe=True)
        self.routes = frozenset(route for route in routes if "{" not in route)
        # Routes with path parameters are labelled by their template: labels stay bounded.
        self.templates = [
            (re.compile("^" + re.sub(r"\\{[a-z_]+\\}", "[^/]+", re.escape(route)) + "$"), route)
            for route in sorted(routes)
            if "{" in route
        ]
        # Paths already matched to a template, so that each is matched once (a named model's request
        # cost 5% more than the default's for the regexes, measured); at most TEMPLATED paths, as
        # clients choose them.
        self.templated: dict[str, str] = {}
        # What is served now, for encoder_model_info (the app sets it): (name, version, labels) per version.
        self.served: Callable[[], Iterable[tuple[str, int, dict[str, str]]]] = lambda: ()
        self.shared = shared
        self.catch_up: Callable[[], None] = lambda: None  # counts what is kept for later: RequestLog sets it
        self.complained: set[str] = set()  # the problems logged once already
        # The latest sampled request's trace in each latency bucket, by route (this worker's only):
        # the histograms' exemplars, in the OpenMetrics format.
        self.exemplars: dict[str, list[Exemplar | None]] = {}
        self.registry.register(self)

    def route(self, path: str) -> str:
        """A bounded label for a path: a known one, the docs assets, or "unmatched"."""
        if path in self.routes or path.startswith(GRPC_METHODS):  # only the service's own RPCs are counted
            return path
        if (template := self.templated.get(path)) is not None:
            return template
        if path.startswith(("/v1/models/", "/v2/models/", "/v2/repository/models/")):
            for pattern, template in self.templates:
                if pattern.match(path):
                    if len(self.templated) < TEMPLATED:
                        self.templated[path] = template
                    return template
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

    def exemplar(self, path: str, seconds: float, trace_id: int) -> None:
        """Keep a traced request as its latency bucket's exemplar (only sampled requests come here)."""
        route = self.route(path)
        kept = self.exemplars.get(route)
        if kept is None:
            kept = self.exemplars[route] = [None] * (len(LATENCY_BUCKETS) + 1)
        kept[bisect.bisect_left(LATENCY_BUCKETS, seconds)] = Exemplar(
            {"trace_id": f"{trace_id:032x}"}, seconds, time.time()
        )

    def encoded(self, served: Any, kind: str, rows: int, samples: int = 0) -> None:
        """Count rows a model version (a service.core.inference.Served) encoded with a kind."""
        keys = served.keys  # "model|version|kind", made once a version: names have no "|"
        key = keys[kind]
        self.rows[key] = self.rows.get(key, 0) + rows
        if samples:
            key = keys[""][:-1]  # "model|version"
            self.samples[key] = self.samples.get(key, 0) + samples

    def publish(self) -> None:
        """Write this worker's counts where the other workers' scrapes read them (with `shared`)."""
        if self.shared is None:
            return
        path = self.shared / f"worker-{os.getpid()}.json"
        temporary = path.with_suffix(".tmp")
        try:
            temporary.write_bytes(orjson.dumps(self.snapshot()))
            os.replace(temporary, path)  # whole or not at all, for a reader
        except OSError as exc:  # the directory went bad at run time: the requests are still served and logged
            self._complain(
                f"cannot write {path.name} ({exc.strerror or exc}): other workers' scrapes miss this worker's counts"
            )

    def _complain(self, problem: str) -> None:
        """Log a problem with the shared directory once, not at every request or scrape."""
        if problem not in self.complained:
            self.complained.add(problem)
            logger.warning("ENCODER_METRICS_DIR: %s", problem)

    def totals(self) -> Counts:
        """Every worker's counts summed (with `shared`), or this one's."""
        if self.shared is None:
            return self
        totals = Counts()
        totals.add(self.snapshot(), live=True)  # this worker's, as they stand
        mine = f"worker-{os.getpid()}.json"
        for path in sorted(self.shared.glob("worker-*.json")):
            if path.name == mine:
                continue
            try:
                data = SNAPSHOT.validate_json(path.read_bytes())
            except FileNotFoundError:  # a worker's file being replaced
                continue
            except (OSError, ValidationError) as exc:
                reason = exc.strerror if isinstance(exc, OSError) else "not a worker's counts"
                self._complain(f"{path.name} skipped: {reason}")
                continue
            if any(len(buckets) != len(LATENCY_BUCKETS) + 2 for buckets in data["latency"].values()):
                self._complain(f"{path.name} skipped: its latency buckets are not this server's")
                continue
            totals.add(dict(data), live=alive(data["pid"]))
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
        calls = CounterMetricFamily(
            "encoder_grpc_requests",
            "gRPC calls answered, by method (the RPC's full name) and status code.",
            labels=["method", "code"],
        )
        for (route, method, status), count in sorted(counts.requests.items()):
            if method == GRPC:
                calls.add_metric([route, CODE_NAMES.get(status, str(status))], count)
            else:
                requests.add_metric([route, method, str(status)], count)
        yield requests
        yield calls
        latency = HistogramMetricFamily(
            "encoder_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response, by route.",
            labels=["route"],
        )
        durations = HistogramMetricFamily(
            "encoder_grpc_request_duration_seconds",
            "Time from a gRPC call's arrival to its answer, by method.",
            labels=["method"],
        )
        for route, in_buckets in sorted(counts.latency.items()):
            cumulative, buckets = 0.0, []
            exemplars = self.exemplars.get(route) or [None] * len(in_buckets[:-1])
            bounds = [*map(str, LATENCY_BUCKETS), "+Inf"]
            for bound, in_bucket, exemplar in zip(bounds, in_buckets[:-1], exemplars, strict=True):
                cumulative += in_bucket
                buckets.append((bound, cumulative) if exemplar is None else (bound, cumulative, exemplar))
            family = durations if route.startswith(GRPC_METHODS) else latency
            family.add_metric([route], buckets, sum_value=in_buckets[-1])
        yield latency
        yield durations
        yield GaugeMetricFamily("encoder_http_requests_in_flight", "Requests being handled.", value=counts.in_flight)
        refused = CounterMetricFamily(
            "encoder_requests_refused",
            "Requests answered 503 for want of room: over ENCODER_MAX_REQUESTS_IN_PROGRESS "
            "(requests_in_progress) or, after ENCODER_ADMISSION_WAIT, the ENCODER_MEMORY_BUDGET (memory_budget).",
            labels=["reason"],
        )
        for reason in ("memory_budget", "requests_in_progress"):
            refused.add_metric([reason], counts.refused.get(reason, 0))
        yield refused
        yield CounterMetricFamily(
            "encoder_spans_exported", "Spans of sampled requests sent to the collector.", value=counts.spans["exported"]
        )
        dropped = CounterMetricFamily(
            "encoder_spans_dropped",
            "Spans of sampled requests not sent: the queue was full (OTEL_BSP_MAX_QUEUE_SIZE; a collector "
            "slow or down), or the export failed.",
            labels=["reason"],
        )
        for reason in SPANS[1:]:
            dropped.add_metric([reason], counts.spans[reason])
        yield dropped
        rows = CounterMetricFamily(
            "encoder_rows_encoded", "Rows encoded, by model, version and kind.", labels=["model", "version", "kind"]
        )
        for key, count in sorted(counts.rows.items()):
            rows.add_metric(key.split("|"), count)
        yield rows
        samples = CounterMetricFamily(
            "encoder_samples_drawn", "VAE samples of z drawn, by model and version.", labels=["model", "version"]
        )
        for key, count in sorted(counts.samples.items()):
            samples.add_metric(key.split("|"), count)
        yield samples
        info = InfoMetricFamily(
            "encoder_model",
            "Each model version served: its fingerprint, dimensions and where its weights came from.",
            labels=["model", "version"],
        )
        for name, version, labels in self.served():
            info.add_metric([name, str(version)], labels)
        yield info


def alive(pid: int) -> bool:
    """Whether a process of this id is running (a worker that wrote a file here)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
