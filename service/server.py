"""How `encoding-service serve` runs uvicorn: its httptools protocol, with a deadline for each
request to arrive, and each response written in one piece."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import cache
from typing import Any, cast

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings
from service.http import TIMED_OUT, problem


class Deadlines:
    """Deadlines for many waits at once, checked together every `tick` seconds.

    Arming a timer for each wait (asyncio.timeout, loop.call_at) costs 2.5-4 us, measured, which a
    one-row request feels; here a wait starts and ends with a dict insert and delete, one timer
    runs while there are waits, and a deadline is acted on up to `tick` seconds after it passes.
    """

    def __init__(self, tick: float = 0.25) -> None:
        self.tick = tick
        self.waits: dict[object, tuple[float, Callable[[], object]]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    def start(self, key: object, deadline: float, expire: Callable[[], object]) -> None:
        """Call `expire()` once the loop's clock passes `deadline`, unless `end(key)` comes first."""
        self.waits[key] = (deadline, expire)
        if self.timer is None or self.loop is None or self.loop.is_closed():  # arm a timer on the running loop
            self.loop = asyncio.get_running_loop()
            self.timer = self.loop.call_later(self.tick, self._check)

    def end(self, key: object) -> None:
        self.waits.pop(key, None)

    def _check(self) -> None:
        assert self.loop is not None
        now = self.loop.time()
        expired = [key for key, (deadline, _) in self.waits.items() if deadline <= now]
        for key in expired:
            self.waits.pop(key)[1]()
        self.timer = self.loop.call_later(self.tick, self._check) if self.waits else None


@cache
def _request_timeout() -> float:
    return Settings().request_timeout


@cache
def _arrivals() -> Deadlines:
    """The deadlines of the requests arriving on every connection this process serves."""
    return Deadlines(min(0.25, _request_timeout() / 4))


def _too_slow_response(path: str) -> bytes:
    detail = f"the request body did not arrive within {_request_timeout():g} s (ENCODER_REQUEST_TIMEOUT)"
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

    def __getattr__(self, name: str) -> Any:  # everything else is the transport's own
        return getattr(self.transport, name)


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline for each request to arrive, and each
    response written in one piece (OneWrite).

    uvicorn waits for a request's head and body without limit, so a client that opens
    connections and trickles them (slowloris) can hold them all. Here a request must arrive whole
    within ENCODER_REQUEST_TIMEOUT of its first byte (the first request of a connection: of its
    opening). If its head is still coming, the connection is closed; if its body is, the client
    gets 408 (unless something was answered already) and the connection is closed. Idle
    keep-alive connections are uvicorn's own timeout_keep_alive's business.

    The deadline lives here rather than in the app so that a request pays nothing for it but a
    dict insert and delete: checking it around the app's receive() cost a one-row request 5%.
    """

    def _arm(self) -> None:
        if self not in self._arrivals.waits:  # the first request is due within the timeout of opening
            self._arrivals.start(self, self.loop.time() + self._timeout, self._too_slow)

    def _too_slow(self) -> None:
        if self.transport.is_closing():
            return
        cycle = self.cycle
        # uvicorn makes a request's cycle, with its scope, once the request's head is complete.
        body_late = cycle is not None and cycle.scope is self.scope and not cycle.response_started
        if body_late and not self.pipeline:  # and nothing answered, or queued to be, on this connection
            cast(dict[str, Any], cycle.scope)[TIMED_OUT] = True
            self.transport.write(_too_slow_response(self.scope["path"]))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = OneWrite(transport, self.loop)  # type: ignore[assignment]
        self._arrivals, self._timeout = _arrivals(), _request_timeout()
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_message_complete(self) -> None:
        self._arrivals.end(self)
        super().on_message_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._arrivals.end(self)
        super().connection_lost(exc)
