"""How `encoding-service serve` runs uvicorn: its httptools protocol, with a deadline for request heads."""

from __future__ import annotations

import asyncio
from functools import cache

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Settings


@cache
def _request_timeout() -> float:
    return Settings().request_timeout


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with a deadline for each request's head.

    uvicorn waits for request headers without limit, so a client that opens connections and
    trickles headers (slowloris) can hold them all. Here a connection that sends no complete
    request head within ENCODER_REQUEST_TIMEOUT of opening, or of starting its next request, is
    closed. Idle keep-alive connections are uvicorn's own timeout_keep_alive's business.
    """

    _head_deadline: asyncio.TimerHandle | None = None

    def _arm(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.call_later(_request_timeout(), self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)
