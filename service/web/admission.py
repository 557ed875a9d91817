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
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from service.core.metrics import Metrics
from service.core.repository import release_memory
from service.web.errors import problem
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
    """Requests let in within the cap on requests in progress and the memory budget, or 503."""

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
        if scope["type"] != "http" or route_path(scope).startswith(UNLIMITED):
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.max_in_progress:
            await self._refuse(scope, send, "requests_in_progress", "ENCODER_MAX_REQUESTS_IN_PROGRESS")
            return
        cost = _cost(scope, self.max_body)
        self.in_progress += 1
        try:
            if cost and not await self.budget.acquire(cost, self.wait):
                await self._refuse(scope, send, "memory_budget", "ENCODER_MEMORY_BUDGET")
                return
            try:
                await self.app(scope, receive, send)
            finally:
                if cost:
                    self.budget.release(cost)
        finally:
            self.in_progress -= 1

    async def _refuse(self, scope: Scope, send: Send, reason: str, setting: str) -> None:
        self.metrics.refused[reason] = self.metrics.refused.get(reason, 0) + 1
        body = problem(route_path(scope), f"the server is busy ({setting}): retry in a moment")
        headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", b"1"),
        ]
        if _has_body(scope):
            headers.append((b"connection", b"close"))  # its body is unread
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def _has_body(scope: Scope) -> bool:
    length = _header(scope, b"content-length")
    return _header(scope, b"transfer-encoding") is not None or (length is not None and length != b"0")


def _cost(scope: Scope, max_body: int) -> int:
    """What a request reserves: COST_PER_BODY_BYTE times its body (the largest allowed if unsaid)."""
    length: Any = _header(scope, b"content-length")
    if length is None:
        return COST_PER_BODY_BYTE * max_body if _header(scope, b"transfer-encoding") is not None else 0
    try:
        size = int(length)
    except ValueError:
        return 0
    return COST_PER_BODY_BYTE * size if size >= SMALL else 0
