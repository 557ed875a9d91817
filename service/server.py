"""How `encoding-service serve` runs uvicorn: its httptools protocol, with a deadline for request
heads and a response's head and body written together."""

from __future__ import annotations

import asyncio
from functools import cache
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings
from service.http import Deadlines


@cache
def _request_timeout() -> float:
    return Settings().request_timeout


@cache
def _heads() -> Deadlines:
    """The deadlines of the request heads of every connection this process serves."""
    return Deadlines(min(0.25, _request_timeout() / 4))


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
    """uvicorn's httptools protocol, with a deadline for each request's head, and each response
    written in one piece (OneWrite).

    uvicorn waits for request headers without limit, so a client that opens connections and
    trickles headers (slowloris) can hold them all. Here a connection that sends no complete
    request head within ENCODER_REQUEST_TIMEOUT of opening, or of starting its next request, is
    closed. Idle keep-alive connections are uvicorn's own timeout_keep_alive's business.
    """

    def _arm(self) -> None:
        heads = _heads()
        if self not in heads.waits:  # the first request's head is due within the timeout of opening
            heads.start(self, self.loop.time() + _request_timeout(), self._head_too_slow)

    def _head_too_slow(self) -> None:
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.transport = OneWrite(transport, self.loop)  # type: ignore[assignment]
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        _heads().end(self)
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        _heads().end(self)
        super().connection_lost(exc)
