"""service/server/transport.py on its own: gRPC over HTTP/2 (h2) on an event loop, against grpc's
own Python client (gRPC's C core), with a test service of every call shape. What the service's
RPCs do through it is in tests/api/test_grpc.py; here, the protocol's edges: flow control both
ways, compression, the message limit, deadlines and cancellation reaching the handler, metadata,
status details, streaming, the stop, and a request that is not gRPC at all."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame, SettingsFrame

from service.server.transport import Context, Server
from tests.conftest import free_port

LIMIT = 1024 * 1024  # the test server's largest message


class Service:
    """Every call shape, on bytes."""

    def __init__(self) -> None:
        self.cancelled: list[str] = []  # the calls whose handlers saw CancelledError

    async def echo(self, request: bytes, context: Context) -> bytes:
        return request

    async def big(self, request: bytes, context: Context) -> bytes:
        return b"x" * int(request)

    async def slow(self, request: bytes, context: Context) -> bytes:
        try:
            await asyncio.sleep(float(request))
        except asyncio.CancelledError:
            self.cancelled.append(request.decode())
            raise
        return b"done"

    async def meta(self, request: bytes, context: Context) -> bytes:
        pairs = [(k, v.hex() if isinstance(v, bytes) else v) for k, v in context.invocation_metadata()]
        return json.dumps({"metadata": pairs, "remaining": context.time_remaining(), "peer": context.peer()}).encode()

    async def abort(self, request: bytes, context: Context) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, request.decode())
        return b""

    async def boom(self, request: bytes, context: Context) -> bytes:
        raise ValueError("a secret that must not reach the client")

    async def count(self, request: bytes, context: Context) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield str(i).encode()

    async def chat(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[bytes]:
        async for message in requests:
            yield message.upper()

    def register(self, server: Server) -> None:
        unary = {
            name: grpc.unary_unary_rpc_method_handler(getattr(self, name))
            for name in ("echo", "big", "slow", "meta", "abort", "boom")
        }
        streams = {
            "count": grpc.unary_stream_rpc_method_handler(self.count),
            "chat": grpc.stream_stream_rpc_method_handler(self.chat),
        }
        server.add_registered_method_handlers("test.T", unary | streams)


class Running:
    """A transport Server with the test service, on an event loop in a thread of its own."""

    def __init__(self) -> None:
        self.service = Service()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = Server(LIMIT)
        self.service.register(self.server)
        self.port = free_port()
        self.run(self.server.listen("127.0.0.1", self.port))
        self.address = f"127.0.0.1:{self.port}"

    def run(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.run(self.server.stop(0))
        self.halt()

    def halt(self) -> None:
        """End the event loop and its thread (a test that stopped the server itself)."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def running() -> Iterator[Running]:
    server = Running()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="module")
def channel(running: Running) -> Iterator[grpc.Channel]:
    options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
    with grpc.insecure_channel(running.address, options=options) as channel:
        yield channel


def call(channel: grpc.Channel, method: str, request: bytes, **kwargs: Any) -> bytes:
    answer: bytes = channel.unary_unary(f"/test.T/{method}")(request, **kwargs)
    return answer


def status(channel: grpc.Channel, method: str, request: bytes, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call(channel, method, request, **kwargs)
    return caught.value.code(), caught.value.details()


def test_messages_larger_than_the_flow_control_windows_go_both_ways(channel: grpc.Channel) -> None:
    assert call(channel, "echo", b"hello") == b"hello"
    request = bytes(range(256)) * 4000  # 1,024,000 bytes: many windows of 64 KiB
    assert call(channel, "echo", request) == request
    assert call(channel, "big", b"5000000") == b"x" * 5_000_000  # beyond every window the client opens


def test_an_unknown_method_is_unimplemented(channel: grpc.Channel) -> None:
    code, details = status(channel, "nothing", b"")
    assert code == grpc.StatusCode.UNIMPLEMENTED
    assert "/test.T/nothing" in details


@pytest.mark.parametrize("compression", [grpc.Compression.Gzip, grpc.Compression.Deflate])
def test_compressed_requests_are_read(channel: grpc.Channel, compression: grpc.Compression) -> None:
    request = b"bits " * 10_000
    assert call(channel, "echo", request, compression=compression) == request


def test_a_message_over_the_limit_is_refused_compressed_or_not(channel: grpc.Channel, running: Running) -> None:
    code, details = status(channel, "echo", b"0" * (LIMIT + 1))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(LIMIT) in details
    bomb = b"\0" * (20 * LIMIT)  # 20 MiB of zeros, 20 KiB compressed: never inflated whole
    assert len(gzip.compress(bomb)) < LIMIT
    code, _ = status(channel, "echo", bomb, compression=grpc.Compression.Gzip)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert call(channel, "echo", b"still here") == b"still here"  # the connection goes on


def test_a_deadline_cancels_the_handler_and_answers_deadline_exceeded(channel: grpc.Channel, running: Running) -> None:
    code, _ = status(channel, "slow", b"5.0", timeout=0.3)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):
        if "5.0" in running.service.cancelled:
            break
        time.sleep(0.02)
    assert "5.0" in running.service.cancelled  # the handler was stopped, not left to run its 5 s


def test_a_call_the_client_cancels_cancels_its_handler(channel: grpc.Channel, running: Running) -> None:
    future = channel.unary_unary("/test.T/slow").future(b"6.0")
    time.sleep(0.3)
    future.cancel()
    for _ in range(100):
        if "6.0" in running.service.cancelled:
            break
        time.sleep(0.02)
    assert "6.0" in running.service.cancelled


def test_metadata_deadline_and_peer_reach_the_handler(channel: grpc.Channel) -> None:
    metadata = (("x-request-id", "abc"), ("authorization", "Bearer k"), ("trace-bin", b"\x00\x01\xff"))
    seen = json.loads(call(channel, "meta", b"", metadata=metadata, timeout=30))
    pairs = {key: value for key, value in seen["metadata"]}
    assert pairs["x-request-id"] == "abc"
    assert pairs["authorization"] == "Bearer k"
    assert pairs["trace-bin"] == "0001ff"  # binary metadata, decoded
    assert 25 < seen["remaining"] <= 31  # the client sends its deadline rounded up
    assert seen["peer"].startswith("ipv4:127.0.0.1:")
    assert json.loads(call(channel, "meta", b""))["remaining"] is None  # no deadline, none invented


def test_status_details_arrive_as_written(channel: grpc.Channel) -> None:
    details = "no model 'ünï' (100% sure)\tof that"
    assert status(channel, "abort", details.encode()) == (grpc.StatusCode.NOT_FOUND, details)


def test_an_unexpected_error_is_unknown_and_says_nothing_of_itself(channel: grpc.Channel) -> None:
    code, details = status(channel, "boom", b"")
    assert code == grpc.StatusCode.UNKNOWN
    assert "secret" not in details


def test_streams_both_ways(channel: grpc.Channel) -> None:
    counted = list(channel.unary_stream("/test.T/count")(b"4"))
    assert counted == [b"0", b"1", b"2", b"3"]
    answers = list(channel.stream_stream("/test.T/chat")(iter([b"a", b"bc", b"d" * 200_000])))
    assert answers == [b"A", b"BC", b"D" * 200_000]


def test_stop_finishes_calls_in_flight_and_takes_no_new_ones() -> None:
    server = Running()
    try:
        with grpc.insecure_channel(server.address) as channel:
            assert call(channel, "echo", b"up") == b"up"
            in_flight = channel.unary_unary("/test.T/slow").future(b"0.5")
            time.sleep(0.2)
            stopped = asyncio.run_coroutine_threadsafe(server.server.stop(5), server.loop)
            assert in_flight.result(timeout=10) == b"done"  # finished within the grace
            stopped.result(timeout=10)
            code, _ = status(channel, "echo", b"late", timeout=2)
            assert code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    finally:
        server.halt()


def raw_call(port: int, headers: list[tuple[str, str]], body: bytes = b"", method: str = "POST") -> dict[str, str]:
    """One request by a bare HTTP/2 client (h2) that never cancels: every header of the answer,
    trailers included, once the stream ends."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    start = [(":method", method), (":scheme", "http"), (":authority", "x")]
    answered: dict[str, str] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        client.initiate_connection()
        client.send_headers(1, [*start, *headers], end_stream=not body)
        if body:
            client.send_data(1, body, end_stream=True)
        sock.sendall(client.data_to_send())
        ended = False
        while not ended:
            data = sock.recv(65536)
            assert data, f"the connection closed without an answer: {answered}"
            for event in client.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    answered |= dict(event.headers)
                ended = ended or isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset))
            sock.sendall(client.data_to_send())
    return answered


def test_a_request_that_is_not_grpc_gets_415(running: Running) -> None:
    answered = raw_call(running.port, [(":path", "/test.T/echo"), ("content-type", "application/json")])
    assert answered[":status"] == "415"


def test_only_post_is_grpc(running: Running) -> None:
    answered = raw_call(running.port, [(":path", "/test.T/echo"), ("content-type", "application/grpc")], method="GET")
    assert (answered[":status"], answered["allow"]) == ("405", "POST")


def test_the_server_keeps_the_deadline_itself(running: Running) -> None:
    """A client that never cancels still gets DEADLINE_EXCEEDED at its deadline, from the server."""
    headers = [(":path", "/test.T/slow"), ("content-type", "application/grpc"), ("grpc-timeout", "200m")]
    answered = raw_call(running.port, headers, b"\0\0\0\0\x037.0")  # the handler would take 7 s
    assert answered["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert "7.0" in running.service.cancelled


def test_messages_arriving_at_once_are_held_to_a_total(running: Running) -> None:
    """Bytes of calls not yet read whole count against Server.max_arriving_bytes across every
    connection: past it, a call is refused as its bytes come; the others go on, and every byte
    counted is given back."""
    assert running.server.max_arriving_bytes == 4 * LIMIT  # the default: four largest messages
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "x"), (":path", "/test.T/echo")]
    headers.append(("content-type", "application/grpc"))
    part = b"\0" * (LIMIT // 2)  # half a largest message, sent in frames of 16 KiB
    answered: dict[int, dict[str, str]] = {}
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        client.initiate_connection()
        sock.sendall(client.data_to_send())
        while client.outbound_flow_control_window <= 65535:  # the server's settings and window first
            client.receive_data(sock.recv(65536))
            sock.sendall(client.data_to_send())
        first = b"\0" + (LIMIT - 10).to_bytes(4, "big")  # declares a message just under the limit
        for stream in range(1, 20, 2):  # ten calls, each sending half a message, none ending yet
            client.send_headers(stream, headers)
            window = client.local_flow_control_window(stream)
            data = (first + part)[: min(window, LIMIT // 2)]
            for i in range(0, len(data), 16384):
                client.send_data(stream, data[i : i + 16384])
            sock.sendall(client.data_to_send())
        deadline = time.monotonic() + 10
        while len(answered) < 2 and time.monotonic() < deadline:  # the calls past the total are refused
            data = sock.recv(65536)
            for event in client.receive_data(data):
                if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    answered.setdefault(event.stream_id, {}).update(dict(event.headers))
            sock.sendall(client.data_to_send())
    refused = {stream for stream, got in answered.items() if got.get("grpc-status") == "8"}
    assert refused, answered
    assert min(refused) > 1, answered  # the first calls went on; later ones were refused
    for _ in range(100):  # the connection is gone: everything it held is given back
        if running.server.arriving == 0:
            break
        time.sleep(0.02)
    assert running.server.arriving == 0


class Frames:
    """A bare HTTP/2 client written frame by frame (hyperframe, hpack), for what h2's own client
    state machine will not do: open a stream after the server's first GOAWAY."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.encoder, self.decoder = hpack.Encoder(), hpack.Decoder()
        self.buffer = b""
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize())

    def call(self, stream_id: int, path: str, message: bytes) -> bytes:
        """A unary gRPC request's frames (not sent)."""
        headers = [(":method", "POST"), (":scheme", "http"), (":authority", "x"), (":path", path)]
        headers += [("content-type", "application/grpc"), ("te", "trailers")]
        head = HeadersFrame(stream_id, self.encoder.encode(headers), flags=["END_HEADERS"])
        data = DataFrame(stream_id, b"\0" + len(message).to_bytes(4, "big") + message, flags=["END_STREAM"])
        return bytes(head.serialize() + data.serialize())

    def answer(self, stream_id: int, seen: list[Any]) -> tuple[dict[str, str], bytes]:
        """A stream's trailers and message (without its 5-byte prefix), among the frames `seen`."""
        trailers = [f.decoded for f in seen if isinstance(f, HeadersFrame) and f.stream_id == stream_id]
        data = b"".join(f.data for f in seen if isinstance(f, DataFrame) and f.stream_id == stream_id)
        return trailers[-1], data[5:]

    def read(self) -> list[Any]:
        """The next frames the server sent (a SETTINGS frame is acknowledged)."""
        while True:
            chunk = self.sock.recv(65536)
            assert chunk, "the server closed the connection"
            self.buffer += chunk
            frames = []
            while len(self.buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self.buffer[:9]))
                if len(self.buffer) < 9 + length:
                    break
                frame.parse_body(memoryview(self.buffer[9 : 9 + length]))
                self.buffer = self.buffer[9 + length :]
                if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                    self.sock.sendall(SettingsFrame(0, flags=["ACK"]).serialize())
                if isinstance(frame, HeadersFrame):
                    frame.decoded = dict(self.decoder.decode(frame.data))
                frames.append(frame)
            if frames:
                return frames


def test_stop_says_goaway_twice_and_serves_the_calls_sent_between() -> None:
    """First GOAWAY with the highest stream id and a PING; a call the client sends before it has
    read them (before its PING answer) is served; then the last GOAWAY names that call's stream.
    One GOAWAY naming the last stream served left such a call unanswered: nginx said 502."""
    server = Running()
    client = Frames(server.port)
    try:
        client.sock.sendall(client.call(1, "/test.T/echo", b"one"))
        seen: list[Any] = []
        while not any(isinstance(f, HeadersFrame) and "grpc-status" in f.decoded for f in seen):
            seen += client.read()
        stopped = asyncio.run_coroutine_threadsafe(server.server.stop(5), server.loop)
        seen = []
        while not any(isinstance(f, PingFrame) for f in seen):
            seen += client.read()
        goaway = next(f for f in seen if isinstance(f, GoAwayFrame))
        ping = next(f for f in seen if isinstance(f, PingFrame))
        assert goaway.last_stream_id == 2**31 - 1
        client.sock.sendall(client.call(3, "/test.T/echo", b"between"))  # sent before the PING's answer
        client.sock.sendall(PingFrame(0, ping.opaque_data, flags=["ACK"]).serialize())
        seen = []
        while not any(isinstance(f, GoAwayFrame) for f in seen):
            seen += client.read()
        trailers, message = client.answer(3, seen)
        assert {"grpc-status": "0"}.items() <= trailers.items()
        assert message == b"between"
        assert next(f for f in seen if isinstance(f, GoAwayFrame)).last_stream_id == 3
        stopped.result(timeout=10)
    finally:
        client.sock.close()
        server.halt()


def test_a_connection_queued_in_the_listening_socket_at_the_stop_is_served() -> None:
    """A client whose connection the kernel has completed, but the server not yet accepted, when
    the stop begins: its call (already sent, as nginx sends one on a new connection) is answered.
    Closing the listening socket at once reset it: nginx said "connection reset by peer", and its
    grpc_pass cannot send a call whose body it has streamed to another replica."""
    server = Running()

    async def queue_then_stop() -> tuple[Frames, asyncio.Task[None]]:
        # On the server's loop, which accepts nothing until this step ends: the connection is
        # made in the kernel's queue, its call sent, and the stop begun before any accept.
        client = Frames(server.port)
        client.sock.sendall(client.call(1, "/test.T/echo", b"queued"))
        return client, asyncio.ensure_future(server.server.stop(5))

    client, stopped = server.run(queue_then_stop())
    try:
        seen: list[Any] = []
        while not any(isinstance(f, HeadersFrame) and "grpc-status" in f.decoded for f in seen):
            seen += client.read()
        trailers, message = client.answer(1, seen)
        assert {"grpc-status": "0"}.items() <= trailers.items()
        assert message == b"queued"
        server.run(asyncio.wait_for(asyncio.shield(stopped), 10))
    finally:
        client.sock.close()
        server.halt()
