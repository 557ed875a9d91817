"""Each request observed once: its id (X-Request-ID), and what it took, counted into the metrics and
written to the access log in batches (RequestLog)."""

from __future__ import annotations

import asyncio
import random
import re
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.metrics import Metrics
from service.core.traces import Tracer
from service.core.traces import headers as trace_headers
from service.server.flags import ANSWERED, TIMED_OUT
from service.web.admission import UNLIMITED
from service.web.paths import route_path

REQUEST_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")


# What is kept of a request: time, request id, method, path, status, seconds, bytes, client, the
# model version that answered it (a service.core.inference.Served), if any, and its trace id and
# span id when it was traced or came with a traceparent (service.core.traces).
Request = tuple[float, bytes, str, str, int, float, int, tuple[str, int] | None, Any, tuple[bytes, bytes] | None]
# One access-log line, as JsonFormatter would write it (the time in ISO 8601, UTC, to the millisecond).
LINE = (
    b'{"time":"%s.%03d+00:00","level":"info","logger":"service.access","message":"request","request_id":"%s",'
    b'"method":%s,"path":%s,"status":%d,"duration_ms":%.3f,"response_bytes":%d,"client":%s%s%s}\n'
)
TRACED = (b',"trace_id":"%s","span_id":"%s"', b" trace_id=%s span_id=%s")  # JSON, text
# Lines of requests that a model answered end with its name and version, made once a version
# (service.core.inference.Served.log): ,"model":"digits","version":2 or model=digits version=2
# The same, as text (ENCODER_LOG_FORMAT=text): what a client controls still goes in quotes, escaped.
TEXT_LINE = b"%s.%03dZ INFO service.access: request_id=%s %s %s %d %.3fms %dB client=%s%s%s\n"


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
        self.text = int(text)  # which of a Served's two log suffixes (JSON, text) to add
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
        answered: Any = None,
        trace: tuple[bytes, bytes] | None = None,
    ) -> None:
        """Keep one request, stamped with the time now."""
        kept = self.kept
        kept.append((time.time(), request_id, method, path, status, seconds, size, client, answered, trace))
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
        for _, _, method, path, status, seconds, _, _, _, _ in kept:
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
        dumps, template, traced = orjson.dumps, self.template, TRACED[self.text]
        for at, request_id, method, path, status, seconds, size, client, answered, trace in kept:
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
                b"" if answered is None else answered.log[self.text],
                b"" if trace is None else traced % trace,
            )


class Observe:
    """Give every request an id (its X-Request-ID if it sends a sane one), and keep when it ended,
    how and how long it took, never what it sent, for the metrics and the access log (RequestLog)."""

    def __init__(self, app: ASGIApp, metrics: Metrics, log: RequestLog, tracer: Tracer | None = None) -> None:
        self.app = app
        self.metrics = metrics
        self.log = log
        self.tracer = tracer  # None unless traces are configured: then nothing of them runs

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
        span = token = None
        if self.tracer is not None:
            traceparent, tracestate = trace_headers(scope["headers"])
            span = self.tracer.start(traceparent, tracestate)
            # Probes and scrapes start no trace of their own: they join a caller's, if it sent one.
            if span is not None and span.parent is None and route_path(scope).startswith(UNLIMITED):
                span = None
            if (token := self.tracer.enter(span)) is not None and span is not None:
                span.attributes |= http_attributes(scope)
        try:
            await self.app(scope, receive, observed_send)
        finally:
            metrics.in_flight -= 1
            if TIMED_OUT in scope:  # the server answered 408 itself
                status, size = 408, 0
            elapsed = time.perf_counter() - started
            path, answered = route_path(scope), scope.get(ANSWERED)
            trace = None
            if span is not None and self.tracer is not None:
                trace = self.tracer.leave(span, token, scope["method"], path, status, elapsed, answered)
            self.log.request(
                request_id, scope["method"], path, status, elapsed, size, scope.get("client"), answered, trace
            )


def http_attributes(scope: Scope) -> dict[str, Any]:
    """A traced request's attributes that its scope holds (OpenTelemetry's HTTP semantic conventions)."""
    attributes: dict[str, Any] = {"url.scheme": scope.get("scheme", "http")}
    attributes["network.protocol.version"] = scope.get("http_version", "1.1")
    if client := scope.get("client"):
        attributes["client.address"] = client[0]
    if server := scope.get("server"):
        attributes["server.address"], attributes["server.port"] = server[0], server[1]
    for name, value in scope["headers"]:
        if name == b"user-agent":
            attributes["user_agent.original"] = value.decode("latin-1")
    return attributes


def _request_id(scope: Scope) -> bytes:
    for name, value in scope["headers"]:
        if name == b"x-request-id" and REQUEST_ID.fullmatch(value):
            return bytes(value)
    return new_request_id()


def new_request_id() -> bytes:
    """An id for a request that sent none (REST and gRPC alike)."""
    return random.getrandbits(128).to_bytes(16).hex().encode()  # an id, not a secret: no syscall for it
