"""Traces without OpenTelemetry's per-request machinery: a request's W3C Trace Context (`traceparent`,
`tracestate`) read, the sampling decision made as OpenTelemetry's samplers make it, and a sampled
request's server span and its children (parse, compute, encode) kept as plain numbers, for
service.server.otel to turn into OpenTelemetry spans and export in a thread of its own.

Nothing here imports OpenTelemetry, and nothing here runs unless traces are configured (the
OTEL_ settings): with them unset a request only reads TRACE, which nothing sets.

    tracer = Tracer(sampler("parentbased_traceidratio", 0.01), export)
    span = tracer.start(traceparent, tracestate)  # None: not sampled, and no caller's trace
    token = TRACE.set(span) if span is not None and span.sampled else None
    ...                                           # span.mark("parse"), span.attributes[...] = ...
    tracer.end(span, method, path, status, seconds, served)  # a sampled span goes to `export`
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any, Literal, NamedTuple, get_args

# A sampled request's span while it is handled, for the code that adds what it knows (rows, phases);
# None for every other request, and always when traces are off (nothing sets it).
TRACE: ContextVar[Span | None] = ContextVar("encoding_service.trace", default=None)

# version "-" trace-id "-" parent-id "-" trace-flags, lowercase hex (W3C Trace Context, level 1)
TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
DASH = ord("-")
SAMPLED_DIGITS = b"13579bdf"  # trace-flags' last hex digit when its lowest bit (sampled) is set
TRACESTATE_MOST = 512  # characters of tracestate passed on; a longer one is dropped (the spec allows that)
# OpenTelemetry's standard samplers (OTEL_TRACES_SAMPLER)
SamplerName = Literal[
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)
ID_LIMIT = (1 << 64) - 1  # TraceIdRatioBased compares the trace id's low 64 bits with its bound


class Parent(NamedTuple):
    """The caller's span, from its traceparent header (or gRPC metadata)."""

    trace_id: int
    span_id: int
    sampled: bool
    tracestate: str


def parse_traceparent(value: bytes | None, tracestate: bytes | None = None) -> Parent | None:
    """The caller's span, or None for a missing or invalid traceparent (a new trace starts then).
    A version above 00 is read as 00 is, as the spec asks, if what follows its four fields is "-..."."""
    if value is None or len(value) < 55 or TRACEPARENT.match(value) is None or value[:2] == b"ff":
        return None
    if len(value) > 55 and (value[:2] == b"00" or value[55] != DASH):
        return None
    trace, span = int(value[3:35], 16), int(value[36:52], 16)
    if not trace or not span:
        return None
    state = ""
    if tracestate and len(tracestate) <= TRACESTATE_MOST and tracestate.isascii():
        state = tracestate.decode().strip()
    return Parent(trace, span, value[54] in SAMPLED_DIGITS, state)


Sampler = Callable[[Parent | None, int], bool]


def sampler(name: str, argument: float | None = None) -> Sampler:
    """The decision of OpenTelemetry's sampler `name` (OTEL_TRACES_SAMPLER) with its argument
    (OTEL_TRACES_SAMPLER_ARG, a ratio, 1.0 when unset), for a span with this parent and trace id.

    The parent-based ones follow a caller's sampled flag and use the rest for a new trace; the
    ratio keeps a trace whose id's low 64 bits are under ratio x 2^64, as TraceIdRatioBased does,
    so every service of a trace with the same ratio makes the same decision."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}: one of {', '.join(SAMPLERS)}")
    ratio = 1.0 if argument is None else argument
    bound = round(ratio * (ID_LIMIT + 1))
    root: Callable[[int], bool]
    if name.endswith("always_on"):
        root = _always
    elif name.endswith("always_off"):
        root = _never
    else:
        root = lambda trace_id: trace_id & ID_LIMIT < bound  # noqa: E731
    if not name.startswith("parentbased_"):
        return lambda parent, trace_id: root(trace_id)
    return lambda parent, trace_id: parent.sampled if parent is not None else root(trace_id)


def _always(trace_id: int) -> bool:
    return True


def _never(trace_id: int) -> bool:
    return False


class Span:
    """A request's server span: its ids always; its times, phases and attributes only when sampled."""

    __slots__ = ("attributes", "ended", "last", "parent", "phases", "sampled", "span_id", "started", "trace_id", "wall")

    def __init__(self, trace_id: int, span_id: int, parent: Parent | None, sampled: bool) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent = parent
        self.sampled = sampled
        self.attributes: dict[str, Any] = {}
        self.phases: list[tuple[str, float, float]] = []  # (name, start, end) by time.perf_counter()
        self.wall = time.time_ns() if sampled else 0
        self.started = self.last = time.perf_counter()
        self.ended = self.started

    @property
    def ids(self) -> tuple[bytes, bytes]:
        """The trace id and span id as the access log writes them (32 and 16 lowercase hex digits)."""
        return b"%032x" % self.trace_id, b"%016x" % self.span_id

    @property
    def logged(self) -> bool:
        """Whether the access log names this span: it was sampled, or the caller sent a traceparent."""
        return self.sampled or self.parent is not None

    def begin(self) -> None:
        """Start the first phase now."""
        self.last = time.perf_counter()

    def mark(self, name: str) -> None:
        """End a phase (a child span) named `name` now; the next one starts here."""
        now = time.perf_counter()
        self.phases.append((name, self.last, now))
        self.last = now

    def nanoseconds(self, at: float) -> int:
        """A time.perf_counter() reading as nanoseconds since the epoch."""
        return self.wall + round((at - self.started) * 1e9)


class Tracer:
    """Start a span for each request, and hand each sampled one, ended, to `export` (a bounded
    queue that a thread empties: service.server.otel)."""

    def __init__(
        self,
        sample: Sampler,
        export: Callable[[Span, str, str, int], None] | None,
        exemplar: Callable[[str, float, int], None] | None = None,
    ) -> None:
        self.sample = sample
        self.export = export  # set by the app's lifespan (service.main), which starts and stops it
        self.exemplar = exemplar  # Metrics.exemplar: a sampled request's trace beside its latency

    def start(self, traceparent: bytes | None, tracestate: bytes | None = None) -> Span | None:
        """The request's span; None for one that is neither sampled nor part of a caller's trace
        (the commonest kind with a ratio sampler: it costs a random number and a comparison)."""
        parent = parse_traceparent(traceparent, tracestate) if traceparent is not None else None
        trace_id = parent.trace_id if parent is not None else _nonzero(128)
        sampled = self.sample(parent, trace_id)
        if not sampled and parent is None:
            return None
        return Span(trace_id, _nonzero(64), parent, sampled)

    @staticmethod
    def enter(span: Span | None) -> Token[Span | None] | None:
        """Make a sampled span the request's current one (TRACE: the core adds to it), until `leave`."""
        return TRACE.set(span) if span is not None and span.sampled else None

    def leave(
        self,
        span: Span,
        token: Token[Span | None] | None,
        method: str,
        path: str,
        status: int,
        seconds: float,
        answered: Any = None,
    ) -> tuple[bytes, bytes] | None:
        """The request is over: its span is no longer current and is ended (`end`); the trace and
        span ids its access-log line carries, if it carries them."""
        if token is not None:
            TRACE.reset(token)
        self.end(span, method, path, status, seconds, answered)
        return span.ids if span.logged else None

    def end(self, span: Span, method: str, path: str, status: int, seconds: float, answered: Any = None) -> None:
        """The request ended with `status` (an HTTP status, or a gRPC code's number for method GRPC)
        after `seconds`, answered by `answered` (a service.core.inference.Served), if any."""
        if not span.sampled:
            return
        span.ended = time.perf_counter()
        if answered is not None:
            span.attributes["encoder.model"] = answered.name
            span.attributes["encoder.model_version"] = answered.version
        if self.export is not None:
            self.export(span, method, path, status)
        if self.exemplar is not None:
            self.exemplar(path, seconds, span.trace_id)


def _nonzero(bits: int) -> int:
    return random.getrandbits(bits) or 1  # ids, not secrets: no syscall for them


def headers(pairs: list[tuple[bytes, bytes]]) -> tuple[bytes | None, bytes | None]:
    """The traceparent and tracestate of a request's headers (ASGI's lowercase names)."""
    traceparent = tracestate = None
    for name, value in pairs:
        if name == b"traceparent":
            traceparent = value
        elif name == b"tracestate":
            tracestate = value if tracestate is None else tracestate + b"," + value
    return traceparent, tracestate
