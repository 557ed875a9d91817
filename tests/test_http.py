"""The HTTP plumbing on its own: coarse deadlines, the body limit's 408, one write a response."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from service.http import BodyLimit, BodyTooSlow, Deadlines, read_body
from service.server import OneWrite


def test_a_deadline_fires_within_a_tick_after_it_passes_and_not_after_it_ends() -> None:
    fired: dict[str, float] = {}

    async def run() -> None:
        deadlines = Deadlines(tick=0.05)
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadlines.start("slow", began + 0.2, lambda: fired.setdefault("slow", loop.time() - began))
        deadlines.start("quick", began + 0.2, lambda: fired.setdefault("quick", loop.time() - began))
        await asyncio.sleep(0.05)
        deadlines.end("quick")
        await asyncio.sleep(0.4)
        assert deadlines.waits == {}
        assert deadlines.timer is None  # no waits, no timer

    asyncio.run(run())
    assert list(fired) == ["slow"]
    assert 0.2 <= fired["slow"] < 0.2 + 0.05 + 0.1  # a tick late at most, and some slack for a busy machine


async def _never(app: Any, timeout: float, cancel_after: float | None = None) -> tuple[BaseException | None, float]:
    """Run `app` behind BodyLimit with a client whose body never comes; what it raised, and when."""

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError(f"nothing should be sent: {message}")

    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"content-length", b"10")]}
    began = time.monotonic()
    task = asyncio.create_task(BodyLimit(app, limit=100, timeout=timeout)(scope, receive, send))
    if cancel_after is not None:
        await asyncio.sleep(cancel_after)
        task.cancel()
    try:
        await task
    except BaseException as exc:  # noqa: BLE001 - what it raised is the outcome under test
        return exc, time.monotonic() - began
    return None, time.monotonic() - began


async def _reads_body(scope: Any, receive: Any, send: Any) -> None:
    await read_body(receive)


def test_a_body_that_never_comes_is_too_slow_after_the_timeout() -> None:
    error, elapsed = asyncio.run(_never(_reads_body, timeout=0.2))
    assert isinstance(error, BodyTooSlow)
    assert error.status_code == 408
    assert 0.2 <= elapsed < 1.0


def test_a_task_cancelled_by_someone_else_stays_cancelled() -> None:
    error, elapsed = asyncio.run(_never(_reads_body, timeout=5.0, cancel_after=0.05))
    assert isinstance(error, asyncio.CancelledError)
    assert elapsed < 1.0


@pytest.mark.parametrize("timeout", [0.01, 1.0, 30.0])
def test_the_tick_is_a_quarter_of_the_timeout_at_most(timeout: float) -> None:
    assert BodyLimit(_reads_body, limit=1, timeout=timeout).deadlines.tick == min(0.25, timeout / 4)


class Recording:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def test_one_write_sends_a_step_s_small_writes_together_and_big_ones_at_once() -> None:
    async def run() -> Recording:
        recording = Recording()
        transport = OneWrite(recording, asyncio.get_running_loop())  # type: ignore[arg-type]
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        transport.write(b"body")
        assert recording.writes == []  # held until this step is over
        await asyncio.sleep(0)
        assert recording.writes == [b"HTTP/1.1 200 OK\r\n\r\nbody"]
        transport.write(b"head")
        big = b"x" * OneWrite.HOLD
        transport.write(big)  # what was held goes first, then the big write, uncopied
        assert recording.writes[1:] == [b"head", big]
        assert recording.writes[2] is big
        transport.write(b"last")
        transport.close()  # writes what it holds before closing
        assert recording.writes[-1] == b"last"
        assert transport.is_closing()  # anything else is the transport's own
        await asyncio.sleep(0)  # the step's flush finds nothing left
        return recording

    assert len(asyncio.run(run()).writes) == 4
