"""The server's plumbing: coarse deadlines, and one write a response."""

from __future__ import annotations

import asyncio
import sys

from service.server.protocol import OneWrite, Watch
from tests.conftest import start_server


class Waiting:
    """A connection that waits `limit` ticks from the tick it was watched, and notes when it was acted on."""

    def __init__(self, watch: Watch, limit: int) -> None:
        self.began, self.limit, self.acted = watch.now, limit, -1.0
        self.loop = asyncio.get_running_loop()
        self.started = self.loop.time()

    def check(self, now: int) -> None:
        if self.acted < 0 and now - self.began > self.limit:
            self.acted = self.loop.time() - self.started


def test_a_wait_is_acted_on_after_its_time_never_before_and_within_a_tick_after() -> None:
    async def run() -> None:
        watch = Watch(tick=0.05)
        assert (watch.ticks(0.2), watch.ticks(0.21)) == (4, 5)
        waiting = Waiting(watch, watch.ticks(0.2))
        watch.add(waiting)
        gone = Waiting(watch, watch.ticks(0.2))
        watch.add(gone)
        await asyncio.sleep(0.05)
        watch.discard(gone)  # its connection closed
        await asyncio.sleep(0.4)
        assert 0.2 <= waiting.acted < 0.2 + 0.05 + 0.1  # a tick late at most, and some slack for a busy machine
        assert gone.acted < 0
        watch.discard(waiting)
        await asyncio.sleep(0.1)
        assert watch.timer is None  # nothing watched, no timer

    asyncio.run(run())


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


def test_the_watch_arms_a_new_timer_when_its_loop_is_gone() -> None:
    watch = Watch(tick=0.01)
    acted: list[float] = []

    async def watch_one() -> None:
        waiting = Waiting(watch, 0)
        watch.add(waiting)
        watch.add(Waiting(watch, 10**6))  # still watched when the loop ends
        await asyncio.sleep(0.1)
        acted.append(waiting.acted)

    asyncio.run(watch_one())
    assert watch.timer is not None  # armed on a loop that is gone
    asyncio.run(watch_one())  # a new loop, as each test client has
    assert [a >= 0 for a in acted] == [True, True]


def test_a_served_response_arrives_in_one_piece() -> None:
    """Head and body in one write, so one recv() holds the whole response; with uvicorn's two
    writes the head often arrives alone."""
    server = start_server([sys.executable, "-m", "service.cli", "serve", "--port", "{port}"])
    try:
        body = b'{"inputs": [[0, 1, 1, 0, 1]]}'
        request = (
            b"POST /v1/autoencoder/encode HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        with server.connect(timeout=10) as sock:
            for _ in range(20):
                sock.sendall(request)
                head, _, content = sock.recv(65536).partition(b"\r\n\r\n")
                headers = dict(line.lower().split(b": ", 1) for line in head.split(b"\r\n")[1:])
                assert head.startswith(b"HTTP/1.1 200")
                assert len(content) == int(headers[b"content-length"])
                assert b'"codes"' in content
    finally:
        server.stop()
