"""The worker's limits, one set for every front end (REST's Admission, the gRPC servicer): the
requests in progress (ENCODER_MAX_REQUESTS_IN_PROGRESS) and the memory budget their bodies
reserve (ENCODER_MEMORY_BUDGET), each refusal counted in /metrics
(encoder_requests_refused_total{reason}). service.web.admission says why and how."""

from __future__ import annotations

import asyncio
import collections

from service.core.metrics import Metrics
from service.core.repository import release_memory

COST_PER_BODY_BYTE = 4  # measured: a JSON body of bits, parsed (lists of ints) and as arrays, holds ~4x its size
SMALL = 64 * 1024  # bodies under this reserve nothing: the cap on requests in progress bounds them
TRIM_AFTER = 32 * 1024 * 1024  # a burst that held this much is handed back once it is over


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


# Why a request was refused: the reason counted in /metrics, and the setting that says how many.
IN_PROGRESS = ("requests_in_progress", "ENCODER_MAX_REQUESTS_IN_PROGRESS")
MEMORY = ("memory_budget", "ENCODER_MEMORY_BUDGET")


class Gate:
    """The requests in progress and the memory budget of one worker, shared by REST and gRPC:
    `enter` admits a request costing `cost` bytes (or says why not, counted), `leave` ends it."""

    def __init__(self, metrics: Metrics, max_in_progress: int, budget: int, wait: float) -> None:
        self.metrics = metrics
        self.max_in_progress = max_in_progress
        self.budget = Budget(budget)
        self.wait = wait
        self.in_progress = 0

    def full(self) -> bool:
        return self.in_progress >= self.max_in_progress

    async def enter(self, cost: int) -> tuple[str, str] | None:
        """Admit a request (not a probe) whose body costs `cost` bytes: None once it is in progress,
        or why it is refused (IN_PROGRESS at once, MEMORY after waiting up to `wait` seconds)."""
        if self.full():
            return self.refused(IN_PROGRESS)
        self.in_progress += 1
        if cost:
            try:
                admitted = await self.budget.acquire(cost, self.wait)
            except BaseException:
                self.in_progress -= 1
                raise
            if not admitted:
                self.in_progress -= 1
                return self.refused(MEMORY)
        return None

    def enter_small(self) -> bool:
        """`enter(0)` without a coroutine, for a request whose body reserves nothing (under SMALL),
        when there is room for it: whether it is now in progress. When there is none, `enter` says
        why (and counts it). A one-row request pays ~1 us less this way."""
        if self.in_progress >= self.max_in_progress:
            return False
        self.in_progress += 1
        return True

    def leave(self, cost: int) -> None:
        """The request `enter` admitted is over."""
        self.in_progress -= 1
        if cost:
            self.budget.release(cost)

    def refused(self, why: tuple[str, str]) -> tuple[str, str]:
        self.metrics.refused[why[0]] = self.metrics.refused.get(why[0], 0) + 1
        return why


def body_cost(size: int) -> int:
    """What a request body of `size` bytes reserves in the budget: nothing under SMALL."""
    return COST_PER_BODY_BYTE * size if size >= SMALL else 0
