"""The server's plumbing: coarse deadlines, and one write a response."""

from __future__ import annotations

import asyncio
import sys

from service.server import Deadlines, OneWrite
from tests.conftest import start_server


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


def test_deadlines_arm_a_new_timer_when_their_loop_is_gone() -> None:
    deadlines = Deadlines(tick=0.01)
    fired: list[str] = []

    async def wait_for(key: str) -> None:
        loop = asyncio.get_running_loop()
        deadlines.start(key, loop.time(), lambda: fired.append(key))
        deadlines.start(f"after {key}", loop.time() + 3600, lambda: None)  # still waiting when the loop ends
        await asyncio.sleep(0.1)

    asyncio.run(wait_for("first"))
    assert deadlines.timer is not None  # armed on a loop that is gone
    asyncio.run(wait_for("second"))  # a new loop, as each test client has
    assert fired == ["first", "second"]


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
