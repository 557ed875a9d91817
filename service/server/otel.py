"""Sending traces: the spans service.core.traces kept for sampled requests, queued on the event loop
and exported in batches by a thread of their own with OpenTelemetry's OTLP exporter.

Imported only when traces are configured (the OTEL_ settings): the `otel` extra's packages are
needed then, and only then. A request pays an append to a bounded queue; the thread turns what
was kept into OpenTelemetry spans and sends them. A collector that is slow, hangs or refuses
delays no request: the queue fills, and what does not fit is dropped and counted
(encoder_spans_dropped_total), as are failed exports.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections import deque
from typing import Any

from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from service import __version__
from service.config import Settings
from service.core.metrics import GRPC, Metrics
from service.core.traces import Span

logger = logging.getLogger("service.traces")

SAMPLED = TraceFlags(TraceFlags.SAMPLED)
SCOPE = InstrumentationScope("encoding-service", __version__)
# gRPC codes that make a server span an error (OpenTelemetry's semantic conventions for RPC)
GRPC_ERRORS = frozenset(
    {2, 4, 12, 13, 14, 15}
)  # UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS
Kept = tuple[Span, str, str, int]  # a sampled request's span, method, path, status


def exporter(settings: Settings) -> SpanExporter:
    """OTLP's exporter for the settings' protocol and endpoint (the rest of its options, headers,
    timeout, compression, certificates, it reads from OTEL_EXPORTER_OTLP_* as it always does)."""
    endpoint = settings.otel_exporter_otlp_traces_endpoint
    if settings.otel_exporter_otlp_protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        endpoint = endpoint or settings.otel_exporter_otlp_endpoint or "http://localhost:4317"
        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if endpoint is None:
        endpoint = (settings.otel_exporter_otlp_endpoint or "http://localhost:4318").rstrip("/") + "/v1/traces"
    return OTLPSpanExporter(endpoint=endpoint)


def resource(settings: Settings) -> Resource:
    """Who sends the spans: OTEL_RESOURCE_ATTRIBUTES, the service's name and version, the process."""
    found = Resource.create({"service.version": __version__, "process.pid": os.getpid()})
    name = settings.otel_service_name or str(found.attributes.get("service.name", ""))
    if not name or name.startswith("unknown_service"):
        name = "encoding-service"
    return found.merge(Resource({"service.name": name}))


class Export:
    """A bounded queue of ended spans that a thread sends in batches (OTEL_BSP_* settings)."""

    def __init__(self, settings: Settings, metrics: Metrics, sender: SpanExporter | None = None) -> None:
        self.sender = sender if sender is not None else exporter(settings)
        self.resource = resource(settings)
        self.metrics = metrics
        self.route = metrics.route
        self.most = settings.otel_bsp_max_queue_size
        self.batch = settings.otel_bsp_max_export_batch_size
        self.delay = settings.otel_bsp_schedule_delay / 1000
        self.timeout = settings.otel_bsp_export_timeout / 1000
        self.queue: deque[Kept] = deque()
        self.queued = 0  # spans in the queue (a request's server span and its children)
        self.lock = threading.Lock()  # over the queue and its count: the loop adds, the thread takes
        self.wake = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None

    def __call__(self, span: Span, method: str, path: str, status: int) -> None:
        """Keep a sampled request's spans for the next export, or drop and count them if the queue is full."""
        size = 1 + len(span.phases)
        with self.lock:
            full = self.queued + size > self.most or self.stopping
            if not full:
                self.queue.append((span, method, path, status))
                self.queued += size
        if full:
            self.metrics.spans["queue_full"] += size
        elif self.queued >= self.batch and not self.wake.is_set():
            self.wake.set()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="otel-export", daemon=True)
        self.thread.start()

    async def stop(self) -> None:
        """Send what is kept (the drain's last step), waiting at most OTEL_BSP_EXPORT_TIMEOUT."""
        self.stopping = True
        self.wake.set()
        thread = self.thread
        if thread is not None:
            await asyncio.to_thread(thread.join, self.timeout)
            if thread.is_alive():
                logger.warning("traces: %d spans not exported by OTEL_BSP_EXPORT_TIMEOUT", self.queued)
                return
        self.sender.shutdown()

    def _run(self) -> None:
        while True:
            self.wake.wait(self.delay)
            self.wake.clear()
            while self.queue:
                self._send()
            if self.stopping:
                return

    def _send(self) -> None:
        spans: list[ReadableSpan] = []
        while self.queue and len(spans) < self.batch:
            with self.lock:
                kept = self.queue.popleft()
                self.queued -= 1 + len(kept[0].phases)
            spans.extend(self.spans(*kept))
        try:
            result = self.sender.export(spans)
        except Exception:  # an exporter's bug must not end the thread
            logger.exception("traces: export failed")
            result = SpanExportResult.FAILURE
        self.metrics.spans["exported" if result is SpanExportResult.SUCCESS else "export_failed"] += len(spans)

    def spans(self, span: Span, method: str, path: str, status: int) -> list[ReadableSpan]:
        """A request's server span and its children, as OpenTelemetry's SDK holds ended spans."""
        context = SpanContext(span.trace_id, span.span_id, is_remote=False, trace_flags=SAMPLED)
        parent = span.parent
        if parent is not None:
            state = TraceState.from_header([parent.tracestate]) if parent.tracestate else None
            context = SpanContext(span.trace_id, span.span_id, False, SAMPLED, state)
            caller = SpanContext(parent.trace_id, parent.span_id, True, TraceFlags(int(parent.sampled)))
        attributes: dict[str, Any]
        if method == GRPC:
            service, _, rpc = path.lstrip("/").rpartition("/")
            name = f"{service}/{rpc}"
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
            attributes["rpc.grpc.status_code"] = status
            failed = status in GRPC_ERRORS
        else:
            route = self.route(path)
            name = method if route == "unmatched" else f"{method} {route}"
            attributes = {"http.request.method": method, "url.path": path, "http.response.status_code": status}
            if route != "unmatched":
                attributes["http.route"] = route
            failed = status >= 500
            if failed:
                attributes["error.type"] = str(status)
        attributes |= span.attributes
        made = [
            ReadableSpan(
                name,
                context,
                caller if parent is not None else None,
                self.resource,
                attributes,
                kind=SpanKind.SERVER,
                status=Status(StatusCode.ERROR) if failed else Status(StatusCode.UNSET),
                start_time=span.wall,
                end_time=span.nanoseconds(span.ended),
                instrumentation_scope=SCOPE,
            )
        ]
        for phase, started, ended in span.phases:
            child = SpanContext(span.trace_id, _span_id(), False, SAMPLED)
            made.append(
                ReadableSpan(
                    phase,
                    child,
                    context,
                    self.resource,
                    kind=SpanKind.INTERNAL,
                    start_time=span.nanoseconds(started),
                    end_time=span.nanoseconds(ended),
                    instrumentation_scope=SCOPE,
                )
            )
        return made


def _span_id() -> int:
    return int.from_bytes(os.urandom(8)) or 1
