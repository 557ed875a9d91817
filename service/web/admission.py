"""Admission: requests in progress and the request bytes held in memory, both bounded.

Without a bound, a hundred clients each sending a 15 MB body (under the 16 MiB limit) made the
server hold all of them, read and parsed, at once: 1.3 GiB, and the pod's 512 MiB limit gets it
OOM-killed with every request in flight. Here:

- A request with a body reserves its cost in a memory budget (ENCODER_MEMORY_BUDGET) before its
  body is read: COST_PER_BODY_BYTE times its Content-Length (the body, its parsed JSON and the
  arrays made from it; a body without a Content-Length reserves the largest a body may be). When
  the budget is spent, it waits, first come first served, up to ENCODER_ADMISSION_WAIT seconds,
  then gets 503 with Retry-After. Its body is not read meanwhile: uvicorn stops reading the
  connection after 64 KiB, and TCP holds the client back. A request costing more than the whole
  budget is let in alone. Bodies under SMALL bytes reserve nothing.
- At most ENCODER_MAX_REQUESTS_IN_PROGRESS requests are in progress; one more gets 503 with
  Retry-After at once, instead of queueing without bound. Probes and /metrics are never refused.
- Each refusal is counted in /metrics (encoder_requests_refused_total{reason}).
- When the budget is empty again after a burst, freed memory is handed back to the system
  (malloc_trim): glibc keeps it otherwise, and RSS would stay at the burst's peak.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.gate import SMALL, Gate, body_cost
from service.web.errors import BodyTooLarge, send_problem
from service.web.paths import route_path

UNLIMITED = ("/healthz", "/readyz", "/metrics", "/v2/health/")


class Admission:
    """What may come in: a body over `max_body` bytes gets 413 (at once when its Content-Length
    says so, as it streams when it has none: the HTTP parser holds a declared body to its length);
    then the cap on requests in progress and the memory budget, or 503. One middleware, one look
    at the headers: a one-row request pays a counter and a comparison or two."""

    def __init__(self, app: ASGIApp, gate: Gate, max_body: int) -> None:
        self.app = app
        self.gate = gate
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, chunked = _body_headers(scope)
        if length is not None and length > self.max_body:
            detail = BodyTooLarge(self.max_body).detail
            await send_problem(send, route_path(scope), 413, detail, [(b"connection", b"close")])
            return
        gate = self.gate
        if length is not None and length < SMALL and gate.enter_small():  # the commonest request
            try:
                await self.app(scope, receive, send)
            finally:
                gate.leave(0)
            return
        if gate.full() and route_path(scope).startswith(UNLIMITED):  # probes are never refused
            await self.app(scope, receive, send)
            return
        if length is None:  # a body may stream without one (chunked): counted as it comes
            receive = self._counted(receive)
        cost = body_cost(self.max_body if length is None and chunked else length or 0)  # what the body may hold
        if (refused := await gate.enter(cost)) is not None:
            await self._refuse(scope, send, refused[1], length)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            gate.leave(cost)

    def _counted(self, receive: Receive) -> Receive:
        """`receive`, refusing a body without a Content-Length once it streams past the limit."""
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                raise BodyTooLarge(self.max_body)  # FastAPI re-raises HTTPException from body reading
            return message

        return counted

    async def _refuse(self, scope: Scope, send: Send, setting: str, length: int | None) -> None:
        headers = [(b"retry-after", b"1")]
        if length != 0:
            headers.append((b"connection", b"close"))  # its body, if any, is unread
        await send_problem(send, route_path(scope), 503, f"the server is busy ({setting}): retry in a moment", headers)


def _body_headers(scope: Scope) -> tuple[int | None, bool]:
    """The request's Content-Length (None if absent or not a number) and whether it is chunked."""
    length: int | None = None
    chunked = False
    for key, value in scope["headers"]:
        if key == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
        elif key == b"transfer-encoding":
            chunked = True
    return length, chunked
