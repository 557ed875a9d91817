"""How `encoding-service serve` runs uvicorn: its httptools protocol, with a deadline for request heads."""

from __future__ import annotations

import asyncio
from functools import cache

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


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline for each request's head.

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
