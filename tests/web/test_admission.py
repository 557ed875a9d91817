"""Admission: the cap on requests in progress and the memory budget, driven through the ASGI
interface with requests held open at will."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.core.gate import SMALL, Budget, Gate
from service.core.metrics import Metrics
from service.web.admission import Admission

BIG = 1024 * 1024  # a body of 1 MiB costs 4 MiB


def _scope(path: str = "/v1/vae/encode", length: int | None = BIG) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {"type": "http", "method": "POST", "path": path, "headers": headers, "root_path": ""}


class Held:
    """An app whose requests stay in progress until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.entered = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.entered += 1
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def _call(app: Admission, scope: dict[str, Any]) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), sent[1]["body"]


def _admission(inner: Held, **options: Any) -> Admission:
    settings = {"max_in_progress": 100, "budget": 10 * BIG, "wait": 0.2, "max_body": 16 * BIG} | options
    max_body = settings.pop("max_body")
    return Admission(inner, gate=Gate(Metrics(), **settings), max_body=max_body)


def test_one_request_over_the_cap_is_refused_at_once_and_probes_never_are() -> None:
    async def run() -> None:
        inner = Held()
        app = _admission(inner, max_in_progress=2)
        held = [asyncio.create_task(_call(app, _scope(length=10))) for _ in range(2)]
        await asyncio.sleep(0.01)
        status, headers, body = await asyncio.wait_for(_call(app, _scope(length=10)), 0.1)  # at once
        assert status == 503
        assert headers[b"retry-after"] == b"1"
        assert b"ENCODER_MAX_REQUESTS_IN_PROGRESS" in body
        probe = asyncio.create_task(_call(app, _scope("/readyz", length=None)))
        metrics = asyncio.create_task(_call(app, _scope("/metrics", length=None)))
        await asyncio.sleep(0.01)
        assert inner.entered == 4  # both let through, over the cap
        inner.release.set()
        assert [(await task)[0] for task in [*held, probe, metrics]] == [200] * 4
        assert app.gate.metrics.refused == {"requests_in_progress": 1}
        assert app.gate.in_progress == 0

    asyncio.run(run())


def test_a_body_that_does_not_fit_the_budget_waits_then_gets_503() -> None:
    async def run() -> None:
        inner = Held()
        app = _admission(inner, budget=10 * BIG, wait=0.2)
        first = asyncio.create_task(_call(app, _scope(length=2 * BIG)))  # 8 MiB of 10
        await asyncio.sleep(0.01)
        small = asyncio.create_task(_call(app, _scope(length=SMALL - 1)))  # costs nothing: in
        started = asyncio.get_running_loop().time()
        status, headers, body = await _call(app, _scope(length=BIG))  # 4 more: waits, then 503
        assert 0.19 < asyncio.get_running_loop().time() - started < 1
        assert status == 503
        assert headers[b"retry-after"] == b"1"
        assert headers[b"connection"] == b"close"  # its body was never read
        assert b"ENCODER_MEMORY_BUDGET" in body
        waiting = asyncio.create_task(_call(app, _scope(length=BIG)))  # this one is let in when room is made
        await asyncio.sleep(0.05)
        assert inner.entered == 2
        inner.release.set()
        assert [(await task)[0] for task in (first, small, waiting)] == [200, 200, 200]
        assert app.gate.metrics.refused == {"memory_budget": 1}
        assert app.gate.budget.used == 0

    asyncio.run(run())


def test_the_budget_grants_in_order_lets_one_oversized_in_alone_and_frees_what_a_gone_request_held() -> None:
    async def run() -> None:
        budget = Budget(10)
        assert await budget.acquire(6, wait=1)
        order: list[str] = []

        async def wants(name: str, cost: int) -> None:
            assert await budget.acquire(cost, wait=1)
            order.append(name)

        waiting = [asyncio.create_task(wants("large", 8)), asyncio.create_task(wants("smaller", 1))]
        await asyncio.sleep(0.01)
        assert order == []  # the smaller one would fit, but waits its turn behind the large one
        budget.release(6)
        await asyncio.gather(*waiting)
        assert order == ["large", "smaller"]
        budget.release(8)
        budget.release(1)
        assert await budget.acquire(25, wait=1)  # more than the whole budget: alone
        assert budget.used == 10
        gone = asyncio.create_task(budget.acquire(3, wait=5))
        await asyncio.sleep(0.01)
        gone.cancel()  # the client left while it waited
        with pytest.raises(asyncio.CancelledError):
            await gone
        budget.release(25)
        assert budget.used == 0
        assert not budget.waiters

    asyncio.run(run())


def test_a_body_without_a_length_reserves_the_largest_body_and_is_held_to_the_limit() -> None:
    async def run() -> None:
        inner = Held()
        inner.release.set()
        app = _admission(inner, budget=10 * BIG, wait=0.05, max_body=2 * BIG)
        chunked = _scope(length=None)
        chunked["headers"].append((b"transfer-encoding", b"chunked"))
        first = asyncio.create_task(_call(app, _scope(length=BIG)))  # 4 MiB of 10, held a moment
        assert (await _call(app, chunked))[0] == 200  # 8 MiB: fits beside it
        await first
        inner.release.clear()
        held = asyncio.create_task(_call(app, _scope(length=BIG)))
        await asyncio.sleep(0.01)
        assert (await _call(app, chunked))[0] == 503  # 4 + 8 > 10
        inner.release.set()
        await held
        status, headers, body = await _call(app, _scope(length=2 * BIG + 1))
        assert status == 413
        assert headers[b"connection"] == b"close"
        assert b"ENCODER_MAX_BODY_BYTES" in body

    asyncio.run(run())
