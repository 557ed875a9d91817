"""How `encoding-service serve` serves connections: uvicorn's httptools protocol, with a deadline
for each request to arrive, each response written in one piece, and a graceful end of each
connection when the server stops (service.server.drain says when)."""

from __future__ import annotations

import asyncio
import math
import os
import socket
from functools import cache
from typing import Any, Protocol, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings
from service.server.flags import TIMED_OUT
from service.web.errors import problem
from service.web.paths import route_path

GRACE = 1.0  # seconds an idle connection stays open once the server stops, for a request already sent


class Watch:
    """The deadlines of the connections this process serves, checked together every `tick` seconds.

    A timer for each wait (uvicorn's keep-alive timer, asyncio.timeout, loop.call_at) costs a
    one-row request several percent, measured. Here `now` counts ticks, and a connection notes the
    tick a wait began in an attribute of its own; one timer, running while there are connections,
    advances `now` and has each connection check its waits (`check(now)`). A wait of `limit`
    ticks is acted on once more than `limit` whole ticks have passed: never early, and at most a
    tick late.
    """

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self.now = 0
        self.watched: set[Watched] = set()
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def ticks(self, seconds: float) -> int:
        """A wait of `seconds`, in ticks."""
        return math.ceil(seconds / self.tick - 1e-9)

    def add(self, watched: Watched) -> None:
        self.watched.add(watched)
        if self.timer is None or self.loop is None or self.loop.is_closed():  # arm a timer on the running loop
            self.loop = asyncio.get_running_loop()
            self.timer = self.loop.call_later(self.tick, self._check)

    def discard(self, watched: Watched) -> None:
        self.watched.discard(watched)

    def _check(self) -> None:
        assert self.loop is not None
        self.now += 1
        for watched in list(self.watched):
            watched.check(self.now)
        self.timer = self.loop.call_later(self.tick, self._check) if self.watched else None


class Watched(Protocol):
    def check(self, now: int) -> None: ...


@cache
def _watch(request_timeout: float) -> Watch:
    """The deadlines of every connection this process serves."""
    return Watch(min(0.25, request_timeout / 4))


def _request_timeout(app_state: dict[str, Any]) -> float:
    """ENCODER_REQUEST_TIMEOUT, from the settings the app was built with (in its lifespan state)."""
    settings = app_state.get("settings")
    if settings is None:  # an app other than the service's
        return cast(float, Settings.model_fields["request_timeout"].default)
    return cast(float, settings.request_timeout)


def _too_slow_response(path: str, request_timeout: float) -> bytes:
    detail = f"the request body did not arrive within {request_timeout:g} s (ENCODER_REQUEST_TIMEOUT)"
    body = problem(path, detail)  # in the shape of the path's API, as the app's own errors are
    head = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    return head + b"content-length: %d\r\n\r\n%s" % (len(body), body)


class OneWrite:
    """A transport that holds small writes until the event loop's current step is over, then
    writes them at once.

    uvicorn writes a response's head and its body in two transport.write calls, and uvloop sends
    each at once: two syscalls and two TCP segments for a 100-byte response, about 10 us of a
    one-row request, measured. An app sends both in one step, so here they leave in one write,
    right after that step. Writes of 64 KiB or more are not held (joining would copy them).
    """

    HOLD = 64 * 1024

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self.transport = transport
        self.loop = loop
        self.held: list[bytes] = []

    def write(self, data: bytes) -> None:
        if len(data) >= self.HOLD:
            self.flush()
            self.transport.write(data)
            return
        if not self.held:
            self.loop.call_soon(self.flush)
        self.held.append(data)

    def flush(self) -> None:
        if self.held:
            data = b"".join(self.held)
            self.held.clear()
            self.transport.write(data)

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def is_closing(self) -> bool:  # asked after every response: not through __getattr__'s slow path
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self.transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline for each request to arrive, coarse deadlines
    for idle connections, and each response written in one piece (OneWrite).

    uvicorn waits for a request's head and body without limit, so a client that opens
    connections and trickles them (slowloris) can hold them all. Here a request must arrive whole
    within ENCODER_REQUEST_TIMEOUT of its first byte (the first request of a connection: of its
    opening). If its head is still coming, the connection is closed; if its body is, the client
    gets 408 (unless something was answered already) and the connection is closed. An idle
    keep-alive connection is closed after ENCODER_KEEP_ALIVE_TIMEOUT (uvicorn's timeout_keep_alive),
    on a coarse deadline too.

    The deadlines live here rather than in the app, and on the Watch's coarse clock, so that a
    request pays nothing for them but a few attribute stores: checking one around the app's
    receive() cost a one-row request 5%, and uvicorn's keep-alive timer about 4%.
    """

    def _too_slow(self) -> None:
        if self.transport.is_closing():
            return
        cycle = self.cycle
        # uvicorn makes a request's cycle, with its scope, once the request's head is complete.
        body_late = cycle is not None and cycle.scope is self.scope and not cycle.response_started
        if body_late and not self.pipeline:  # and nothing answered, or queued to be, on this connection
            cast(dict[str, Any], cycle.scope)[TIMED_OUT] = True
            self.transport.write(_too_slow_response(route_path(cast(dict[str, Any], self.scope)), self._timeout))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = OneWrite(transport, self.loop)  # type: ignore[assignment]
        self._timeout = timeout = _request_timeout(self.app_state)
        self._watch = watch = _watch(timeout)
        self._arrival_ticks = watch.ticks(timeout)
        self._idle_ticks = watch.ticks(self.timeout_keep_alive)
        self._arriving: int | None = watch.now  # the first request is due within the timeout of opening
        self._idle: int | None = None
        self._draining = False
        self._grace: int | None = None
        watch.add(self)

    def check(self, now: int) -> None:
        """Act on a wait that is over: a request that took too long to arrive, an idle connection."""
        if self._arriving is not None and now - self._arriving > self._arrival_ticks:
            self._arriving = None
            self._too_slow()
        elif self._idle is not None and now - self._idle > self._idle_ticks:
            self._idle = None
            self.timeout_keep_alive_handler()
        elif self._grace is not None and now - self._grace > self._watch.ticks(GRACE):
            self._grace = None
            cycle = self.cycle
            if self._arriving is None and (cycle is None or cycle.response_complete):  # nothing being read
                if self._unread():  # a request came in the same tick: it is read, and answered, first
                    self._grace = now
                else:
                    self.timeout_keep_alive_handler()

    def _unread(self) -> bool:
        """Whether bytes the client sent wait in the kernel, not read yet: closing the connection
        now would answer them with a reset."""
        try:
            fileno = self.transport.get_extra_info("socket").fileno()
            with socket.socket(fileno=os.dup(fileno)) as peek:
                return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
        except (OSError, AttributeError, ValueError):  # nothing waiting (EAGAIN), or no socket to ask
            return False

    def shutdown(self) -> None:
        """The server is stopping (uvicorn calls this on each connection). uvicorn closes an idle
        connection at once, and a proxy may be sending a request on it that moment: a reset, a
        502. Here a request in flight is answered with `Connection: close`; an idle connection
        stays open for GRACE seconds, what arrives meanwhile is answered with `Connection: close`,
        and it is closed after only if no request is arriving on it."""
        self._draining = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
        elif not self.transport.is_closing():
            self._idle = None
            self._grace = self._watch.now

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._arriving is None:
            self._arriving = self._watch.now

    def on_message_complete(self) -> None:
        self._arriving = None
        if self._draining and self.cycle is not None:  # the last request of this connection
            self.cycle.keep_alive = False
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # uvicorn's own, but for the idle wait that follows: uvicorn arms a timer for it, and
        # cancels it when the next request comes; here the wait is noted for the Watch.
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        else:
            self._idle = self._watch.now

    def _unset_keepalive_if_required(self) -> None:  # uvicorn calls it as data comes in
        self._idle = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._watch.discard(self)
        super().connection_lost(exc)
