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

import asyncio
import collections

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.metrics import Metrics
from service.core.repository import release_memory
from service.web.errors import BodyTooLarge, send_problem
from service.web.paths import route_path

COST_PER_BODY_BYTE = 4  # measured: a JSON body of bits, parsed (lists of ints) and as arrays, holds ~4x its size
SMALL = 64 * 1024  # bodies under this reserve nothing: the cap on requests in progress bounds them
TRIM_AFTER = 32 * 1024 * 1024  # a burst that held this much is handed back once it is over
UNLIMITED = ("/healthz", "/readyz", "/metrics", "/v2/health/")


class Budget:
    """Bytes reserved by requests being read, parsed and answered; waiters served in order."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.peak = 0  # since the budget was last empty
        self.waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def acquire(self, cost: int, wait: float) -> bool:
        """Reserve `cost` (at most the whole budget), waiting up to `wait` seconds; whether it was."""
        cost = min(cost, self.capacity)
        if not self.waiters and self.used + cost <= self.capacity:
            self._take(cost)
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (cost, future)
        self.waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(future), wait)
            return True
        except TimeoutError:
            if future.done():  # granted as the wait ran out: keep it
                return True
            self.waiters.remove(entry)
            self._grant()  # one that waited behind it may fit now
            return False
        except asyncio.CancelledError:  # the request is gone: what it holds, or waits for, is not
            if future.done():
                self.release(cost)
            else:
                self.waiters.remove(entry)
                self._grant()
            raise

    def release(self, cost: int) -> None:
        self.used -= min(cost, self.capacity)
        self._grant()
        if self.used == 0:
            if self.peak >= TRIM_AFTER:
                release_memory()
            self.peak = 0

    def _take(self, cost: int) -> None:
        self.used += cost
        self.peak = max(self.peak, self.used)

    def _grant(self) -> None:
        while self.waiters and self.used + self.waiters[0][0] <= self.capacity:
            cost, future = self.waiters.popleft()
            if not future.done():
                self._take(cost)
                future.set_result(None)


class Admission:
    """What may come in: a body over `max_body` bytes gets 413 (at once when its Content-Length
    says so, as it streams when it has none: the HTTP parser holds a declared body to its length);
    then the cap on requests in progress and the memory budget, or 503. One middleware, one look
    at the headers: a one-row request pays a counter and a comparison or two."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, max_in_progress: int, budget: int, wait: float, max_body: int
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.max_in_progress = max_in_progress
        self.budget = Budget(budget)
        self.wait = wait
        self.max_body = max_body
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, chunked = _body_headers(scope)
        if length is not None and length > self.max_body:
            detail = BodyTooLarge(self.max_body).detail
            await send_problem(send, route_path(scope), 413, detail, [(b"connection", b"close")])
            return
        if self.in_progress >= self.max_in_progress and not route_path(scope).startswith(UNLIMITED):
            await self._refuse(scope, send, "requests_in_progress", "ENCODER_MAX_REQUESTS_IN_PROGRESS", length)
            return
        if length is None:  # a body may stream without one (chunked): counted as it comes
            receive = self._counted(receive)
        size = self.max_body if length is None and chunked else length or 0  # what the body may hold
        cost = COST_PER_BODY_BYTE * size if size >= SMALL else 0
        self.in_progress += 1
        try:
            if cost and not await self.budget.acquire(cost, self.wait):
                await self._refuse(scope, send, "memory_budget", "ENCODER_MEMORY_BUDGET", length)
                return
            try:
                await self.app(scope, receive, send)
            finally:
                if cost:
                    self.budget.release(cost)
        finally:
            self.in_progress -= 1

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

    async def _refuse(self, scope: Scope, send: Send, reason: str, setting: str, length: int | None) -> None:
        self.metrics.refused[reason] = self.metrics.refused.get(reason, 0) + 1
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
