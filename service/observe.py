"""What operators see: request ids, Prometheus metrics and JSON access logs, in one middleware pass."""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_logger = logging.getLogger("service.access")
REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")


class Metrics:
    """The service's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "encoder_http_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "encoder_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response, by route.",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.in_flight = Gauge("encoder_http_requests_in_flight", "Requests being handled.", registry=self.registry)
        self.rows = Counter("encoder_rows_encoded", "Rows encoded, by model.", ["model"], registry=self.registry)
        self.samples = Counter("encoder_samples_drawn", "VAE samples of z drawn.", registry=self.registry)
        self.model = Info("encoder_model", "The served model.", registry=self.registry)

        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        """Count and time one request (the labelled children are looked up once and kept)."""
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(route, method, str(status)), self.latency.labels(route))
            if len(self._children) < 10_000:  # labels are bounded; this only guards the cache
                self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def encoded(self, model: str, rows: int, samples: int = 0) -> None:
        self.rows.labels(model).inc(rows)
        if samples:
            self.samples.inc(samples)


class Observe:
    """Give every request an id (its X-Request-ID if it sends a sane one), count and time it by
    route, and write one JSON access-log line: who, what, how it ended, never what it sent."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: Iterable[str], access_log: bool) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = frozenset(routes)
        self.access_log = access_log

    def route(self, path: str) -> str:
        """A bounded label: a known path, the docs assets, or "unmatched"."""
        if path in self.routes:
            return path
        return "/docs-assets" if path.startswith("/docs-assets/") else "unmatched"

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

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            self.metrics.observe(self.route(scope["path"]), scope["method"], status, elapsed)
            if self.access_log and access_logger.isEnabledFor(logging.INFO):
                # The line is built here, once, with orjson; the access logger writes it as it is.
                line = {
                    "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                    "level": "info",
                    "logger": "service.access",
                    "message": "request",
                    "request_id": request_id.decode(),
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "response_bytes": size,
                    "client": (scope.get("client") or ("", 0))[0],
                }
                access_logger.info(orjson.dumps(line).decode())


def _request_id(scope: Scope) -> bytes:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and REQUEST_ID.fullmatch(value):
            return bytes(value)
    return os.urandom(16).hex().encode()


_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


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


def configure_logging(level: str) -> None:
    """JSON lines on stdout for the service's own loggers, once per process. Access-log records
    are JSON lines already (built by Observe), and are written as they are."""
    for name, formatter in (("service", JsonFormatter()), ("service.access", logging.Formatter("%(message)s"))):
        logger = logging.getLogger(name)
        logger.setLevel(level.upper() if level != "trace" else "DEBUG")
        if not any(getattr(handler, "_service_json", False) for handler in logger.handlers):
            handler = logging.StreamHandler(sys.stdout)
            handler.setFormatter(formatter)
            handler._service_json = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            logger.propagate = False
