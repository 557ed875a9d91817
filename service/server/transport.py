"""gRPC over HTTP/2 on the event loop, with the h2 library's protocol state machine: what
grpc.aio's server did for the service, at about twice its rate for a one-row call.

grpc.aio runs gRPC's C core in a thread of its own and hands each call's events to the event loop:
its empty answer measured ~3,400 calls a second on one core (bench/infer_grpc.py's floor), under
three times MLServer's whole inference, so no servicer on it could reach three times MLServer.
Here each connection is an asyncio Protocol whose HTTP/2 frames h2 reads and writes; gRPC's part
(the paths, the 5-byte message framing, grpc-timeout, metadata, status trailers) is this module's.

The services are registered as with grpc's servers, by the generated `add_..._to_server`
functions (`Server.add_registered_method_handlers`), and called as grpc.aio calls them: a
handler gets the request (or an async iterator of them) and a `Context`, and returns the response
(or yields them). Requests may come compressed (gzip, deflate); answers never are. Not served:
TLS (as before: plaintext HTTP/2, h2c, behind whatever terminates TLS).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import logging
import socket
import struct
import time
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
from grpc import RpcMethodHandler, StatusCode
from hyperframe.frame import GoAwayFrame

from service.server.listening import close_listening

logger = logging.getLogger("uvicorn.error")

WINDOW = 16 * 1024 * 1024  # bytes a client may send ahead, per connection and per stream
MAX_STREAMS = 1000  # calls at once on one connection
# A graceful stop says GOAWAY twice, as gRPC's own servers do: first with the highest stream id
# (no new calls here, please; those already on their way are served) and a PING, then, once the
# client has answered the PING (it has read the first) or NOTICE seconds have passed, with the last
# stream id served. One GOAWAY naming the last stream races the calls a client sends meanwhile:
# nginx answers those 502 (its grpc_pass does not retry them), seen under load in rolling restarts.
GOING = 2**31 - 1
NOTICE = 1.0
NOTICE_PING = b"stopping"
PREFIX = struct.Struct(">?I")  # a message on the wire: compressed?, length, then the message
RESPONSE_HEADERS = [
    (b":status", b"200"),
    (b"content-type", b"application/grpc"),
    (b"grpc-accept-encoding", b"identity,deflate,gzip"),
]
WBITS = {b"gzip": 16 + zlib.MAX_WBITS, b"deflate": zlib.MAX_WBITS}  # gRPC's deflate is zlib's format
TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")  # grpc-message percent-encodes the rest
RESERVED = frozenset({b"content-type", b"te", b"grpc-timeout", b"grpc-encoding", b"grpc-accept-encoding"})


class Abort(Exception):
    """Raised by `Context.abort`: the call ends with this status."""

    def __init__(self, code: StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Context:
    """What a handler knows of its call, as grpc.aio's ServicerContext says it."""

    __slots__ = ("_metadata", "_peer", "deadline")

    def __init__(self, metadata: tuple[tuple[str, str | bytes], ...], peer: str, deadline: float | None) -> None:
        self._metadata = metadata
        self._peer = peer
        self.deadline = deadline  # time.monotonic()'s, or None

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        return self._peer

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    async def abort(self, code: StatusCode, details: str = "") -> None:
        raise Abort(code, details)


class Server:
    """The services, and the listening sockets of one process."""

    def __init__(self, max_message_bytes: int, max_arriving_bytes: int | None = None) -> None:
        self.max_message_bytes = max_message_bytes
        # The bytes of calls still arriving, held across every connection, and how many may be:
        # past it a call is refused as its bytes come (RESOURCE_EXHAUSTED), so that many clients
        # sending big messages at once cannot fill the memory before any handler sees them.
        self.arriving = 0
        self.max_arriving_bytes = max_arriving_bytes if max_arriving_bytes is not None else 4 * max_message_bytes
        # Told of each call of a known method answered before its handler ran (a message over the
        # limit, a deadline passed while it arrived...): (path, status, context, seconds).
        self.rejected: Callable[[str, StatusCode, Context, float], None] | None = None
        self.methods: dict[bytes, RpcMethodHandler] = {}
        self.listeners: list[asyncio.Server] = []
        self.connections: set[Connection] = set()
        self.closing = False

    # -- what the generated registration functions call

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Nothing: every service is registered by name as well (add_registered_method_handlers)."""

    def add_registered_method_handlers(self, service: str, handlers: dict[str, RpcMethodHandler]) -> None:
        for method, handler in handlers.items():
            self.methods[f"/{service}/{method}".encode()] = handler

    # -- running

    async def listen(self, host: str, port: int) -> None:
        """Listen on host:port, sharing the port with the other workers (SO_REUSEPORT); OSError if not."""
        loop = asyncio.get_running_loop()
        listener = await loop.create_server(lambda: Connection(self), host, port, reuse_port=True, backlog=2048)
        self.listeners.append(listener)

    async def stop(self, grace: float) -> None:
        """Take no new connection or call (GOAWAY: clients move to another server); let those in
        flight finish for `grace` seconds, then end them, CANCELLED, and close every connection."""
        loop = asyncio.get_running_loop()

        async def serve(connection: socket.socket) -> None:
            await loop.connect_accepted_socket(lambda: Connection(self), connection)

        # What is queued in the listening sockets is accepted (a close would reset it: nginx has
        # sent its call, and cannot retry it), then told to go away as the open connections are.
        if accepted := await close_listening(self.listeners, serve):
            logger.info("gRPC: accepted %d queued connection(s) before closing the listening sockets", accepted)
        self.closing = True
        notices = [connection.notice() for connection in list(self.connections)]
        if notices:
            await asyncio.wait(notices, timeout=min(NOTICE, grace))
        for connection in list(self.connections):
            connection.go_away()
        deadline = time.monotonic() + grace
        while any(c.calls for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            connection.close()
        for listener in self.listeners:
            with contextlib.suppress(Exception):
                await listener.wait_closed()


class Call:
    """One stream: a call on its way in, being answered, or both (streaming)."""

    __slots__ = (
        "began",
        "body",
        "cancelled",
        "context",
        "encoding",
        "handler",
        "held",
        "messages",
        "out",
        "path",
        "pending",
        "running",
        "started",
        "stream_id",
        "task",
        "timer",
        "waiting",
    )

    def __init__(self, stream_id: int, path: bytes, handler: RpcMethodHandler, context: Context) -> None:
        self.stream_id = stream_id
        self.began = time.perf_counter()
        self.path = path
        self.handler = handler
        self.context = context
        self.body = bytearray()  # bytes received, not yet taken as messages
        self.out = bytearray()  # bytes to send that the client's flow-control window has no room for yet
        self.messages: asyncio.Queue[Any] | None = None  # a streaming request's, as they come
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.started = False  # response headers sent
        self.waiting: Any = None  # what a handler started at once waits for, before it has a task (_start)
        self.cancelled = False
        self.encoding = b"identity"  # grpc-encoding: how its messages say they are compressed
        self.held = 0  # bytes of it counted in Server.arriving
        self.running = False  # its handler has been started
        self.pending: asyncio.Future[None] | None = None  # waiting for the client's flow-control window


END = object()  # the end of a streaming request's messages


class Connection(asyncio.Protocol):
    """One client connection: HTTP/2 frames in and out through h2, gRPC calls on its streams."""

    def __init__(self, server: Server) -> None:
        self.server = server
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,  # ours, valid by construction
            normalize_outbound_headers=False,
            # A client's header block is checked here (_request), as far as gRPC reads it: h2's
            # own checks of every header cost more than a one-row call's whole inference.
            validate_inbound_headers=False,
            normalize_inbound_headers=False,
        )
        self.h2 = h2.connection.H2Connection(config)
        self.calls: dict[int, Call] = {}
        self.transport: asyncio.Transport | None = None
        self.peer = ""
        self.gone = False  # GOAWAY sent: no new calls
        self.noticed: asyncio.Future[None] | None = None  # the first GOAWAY's PING answered (notice)
        self.flushing = False  # a flush is scheduled (flush_soon)
        self.loop = asyncio.get_running_loop()  # made by the loop's server, on it

    # -- asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = _peer(transport.get_extra_info("peername"))
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 16384,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(WINDOW - 65535)  # the connection's, beside each stream's
        if self.server.closing:
            self.go_away()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self._noticed()
        for call in self.calls.values():
            self._cancel(call)
        self.calls.clear()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.flush()  # h2's GOAWAY, saying why
            self.close()
            return
        for event in events:
            if isinstance(event, h2.events.DataReceived):
                self._data(event)
            elif isinstance(event, h2.events.RequestReceived):
                self._request(event)
            elif isinstance(event, h2.events.StreamEnded):
                self._ended(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                if (call := self.calls.pop(event.stream_id, None)) is not None:
                    self._cancel(call)
            elif isinstance(event, h2.events.WindowUpdated):
                self._window_opened(event.stream_id)
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.go_away()
            elif isinstance(event, h2.events.PingAckReceived) and event.ping_data == NOTICE_PING:
                self._noticed()
        self.flush()

    def flush(self) -> None:
        self.flushing = False
        if (out := self.h2.data_to_send()) and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def flush_soon(self) -> None:
        """Flush once the event loop's current step is over: the answers of the calls that end in
        one step go out in one write (one system call, one TCP segment) instead of one each."""
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self.flush)

    def notice(self) -> asyncio.Future[None]:
        """The first GOAWAY of a graceful stop (GOING: calls still come in and are served) and a
        PING; done when the client has answered it, or the connection is gone."""
        noticed = self.noticed = self.loop.create_future()
        if self.gone or self.transport is None or self.transport.is_closing():
            self._noticed()
            return noticed
        self._goaway(GOING)
        try:
            self.h2.ping(NOTICE_PING)
        except h2.exceptions.ProtocolError:  # the client has closed its side (its own GOAWAY)
            self._noticed()
        self.flush()
        return noticed

    def _noticed(self) -> None:
        if self.noticed is not None and not self.noticed.done():
            self.noticed.set_result(None)

    def go_away(self) -> None:
        """No new calls on this connection (the last GOAWAY, naming the last call it serves); the
        connection closes once those in it are answered. The frame is written here, not by h2: its
        close_connection() would end the streams still being answered."""
        if self.gone:
            return
        self.gone = True
        self._goaway(self.h2.highest_inbound_stream_id)
        if not self.calls:
            self.close()

    def _goaway(self, last_stream_id: int) -> None:
        """A GOAWAY frame after what h2 has queued, written here, not by h2 (go_away says why)."""
        self.flush()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(GoAwayFrame(stream_id=0, last_stream_id=last_stream_id, error_code=0).serialize())

    def close(self) -> None:
        for call in list(self.calls.values()):
            self._cancel(call)
        self.calls.clear()
        if self.transport is not None:
            self.transport.close()

    # -- a call coming in

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        headers = event.headers or []
        path = b""
        content_type = method = b""
        encoding = b"identity"
        timeout = None
        metadata: list[tuple[str, str | bytes]] = []
        for name, value in headers:
            if name[:1] == b":":
                if name == b":path":
                    path = value
                elif name == b":method":
                    method = value
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = _timeout(value)
            elif name == b"grpc-encoding":
                encoding = value
            elif name not in RESERVED:
                key = name.decode("latin-1")
                if key.endswith("-bin"):
                    metadata.append((key, _unbase64(value)))
                else:
                    metadata.append((key, value.decode("latin-1")))
        if self.gone:
            self._reset(stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        if method != b"POST":  # gRPC is POST only
            self.h2.send_headers(stream_id, [(b":status", b"405"), (b"allow", b"POST")], end_stream=True)
            return
        if not content_type.startswith(b"application/grpc"):
            self.h2.send_headers(stream_id, [(b":status", b"415")], end_stream=True)
            return
        handler = self.server.methods.get(path)
        if handler is None:  # not logged: a client's made-up paths would fill the metrics' labels
            self._status(stream_id, StatusCode.UNIMPLEMENTED, f"unknown method {path.decode('latin-1')[:128]}", False)
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        call = Call(stream_id, path, handler, Context(tuple(metadata), self.peer, deadline))
        call.encoding = encoding
        self.calls[stream_id] = call
        if deadline is not None:
            call.timer = self.loop.call_at(self.loop.time() + (timeout or 0.0), self._expired, call)
        if handler.request_streaming:
            call.messages = asyncio.Queue()
            call.running = True
            call.task = self.loop.create_task(self._run(call, None))

    def _data(self, event: h2.events.DataReceived) -> None:
        self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        call = self.calls.get(event.stream_id)
        if call is None:
            return
        server = self.server
        if not call.running and server.arriving + len(event.data) > server.max_arriving_bytes:
            limit = f"more than {server.max_arriving_bytes} bytes of messages arriving at once"
            self._fail(call, StatusCode.RESOURCE_EXHAUSTED, f"the server is busy ({limit}): retry in a moment")
            return
        call.body += event.data
        if not call.running:
            server.arriving += len(event.data)
            call.held += len(event.data)
        if len(call.body) >= 5:
            length = PREFIX.unpack_from(call.body)[1]
            if length > self.server.max_message_bytes or len(call.body) > 5 + self.server.max_message_bytes:
                message = f"received message larger than max ({length} vs. {self.server.max_message_bytes})"
                self._fail(call, StatusCode.RESOURCE_EXHAUSTED, message)
                return
        if call.messages is not None:
            self._take_messages(call)

    def _take_messages(self, call: Call) -> None:
        """Queue each whole message of a streaming request's bytes."""
        assert call.messages is not None
        while len(call.body) >= 5:
            compressed, length = PREFIX.unpack_from(call.body)
            if len(call.body) < 5 + length:
                return
            message = self._unpacked(call, compressed, bytes(call.body[5 : 5 + length]))
            del call.body[: 5 + length]
            if message is None:
                return
            try:
                call.messages.put_nowait(_deserialize(call.handler)(message))
            except Exception:  # noqa: BLE001 - a message that is not the request's type
                self._fail(call, StatusCode.INTERNAL, "the request message could not be parsed")
                return

    def _ended(self, stream_id: int) -> None:
        call = self.calls.get(stream_id)
        if call is None:
            return
        if call.messages is not None:
            if call.body:
                self._fail(call, StatusCode.INTERNAL, "the request ended inside a message")
                return
            call.messages.put_nowait(END)
            return
        body = call.body
        if len(body) < 5 or len(body) != 5 + PREFIX.unpack_from(body)[1]:
            self._fail(call, StatusCode.INTERNAL, "a unary call takes exactly one message")
            return
        message = self._unpacked(call, bool(body[0]), bytes(memoryview(body)[5:]))
        if message is None:
            return
        try:
            request = _deserialize(call.handler)(message)
        except Exception:  # noqa: BLE001 - a message that is not the request's type
            self._fail(call, StatusCode.INTERNAL, "the request message could not be parsed")
            return
        call.body = bytearray()
        self._release(call)
        self._start(call, request)

    def _start(self, call: Call, request: Any) -> None:
        """Run the call's handler at once, as far as it goes without waiting: a one-row inference
        ends right here, without the cost of a task and of a turn of the event loop. A handler
        that waits goes on in a task from where it waited, as Python 3.12's eager tasks do
        (asyncio.eager_task_factory), done by hand for 3.11: the task is made only once what the
        coroutine waits for is done, so that the Future it resumes in is done, as asyncio checks.
        tests/server/test_transport.py's slow handler (waiting, finishing, cancelled while it
        waits) guards this."""
        call.running = True
        context = contextvars.copy_context()
        coro = self._run(call, request)
        try:
            waited = context.run(coro.send, None)
        except StopIteration:
            return
        call.waiting = waited

        def resume(_: Any = None) -> None:
            call.waiting = None
            call.task = asyncio.Task(coro, loop=self.loop, context=context)
            if call.cancelled:
                call.task.cancel()

        if isinstance(waited, asyncio.Future):
            waited._asyncio_future_blocking = False  # what a task does with what it awaits
            waited.add_done_callback(resume)
        else:  # a bare yield (asyncio.sleep(0)): go on at the next turn
            self.loop.call_soon(resume)

    def _unpacked(self, call: Call, compressed: bool, data: bytes) -> bytes | None:
        """A message as it was before the client compressed it; None, the call failed, if it cannot be."""
        if not compressed:
            return data
        wbits = WBITS.get(call.encoding)
        if wbits is None:
            shown = call.encoding.decode("latin-1")[:32]
            self._fail(call, StatusCode.UNIMPLEMENTED, f"grpc-encoding {shown!r} is not supported: gzip or deflate")
            return None
        limit = self.server.max_message_bytes
        inflater = zlib.decompressobj(wbits)
        try:
            message = inflater.decompress(data, limit + 1)
        except zlib.error:
            self._fail(call, StatusCode.INTERNAL, f"the message is not valid {call.encoding.decode()}")
            return None
        if len(message) > limit or inflater.unconsumed_tail:
            self._fail(call, StatusCode.RESOURCE_EXHAUSTED, f"received message larger than max (more than {limit})")
            return None
        return message

    # -- answering

    async def _run(self, call: Call, request: Any) -> None:
        handler, context = call.handler, call.context
        code, details = StatusCode.OK, ""
        try:
            if not handler.request_streaming and not handler.response_streaming:
                response = await handler.unary_unary(request, context)
                self._send(call, _serialize(handler)(response))
            elif handler.response_streaming:
                source = (
                    handler.unary_stream(request, context)
                    if not handler.request_streaming
                    else (handler.stream_stream(_requests(call), context))
                )
                async for response in source:
                    await self._send_when_open(call, _serialize(handler)(response))
            else:
                response = await handler.stream_unary(_requests(call), context)
                self._send(call, _serialize(handler)(response))
        except Abort as exc:
            code, details = exc.code, exc.details
        except asyncio.CancelledError:
            if self.calls.get(call.stream_id) is not call:  # the client reset it, or the connection is gone
                raise
            code, details = StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"
        except Exception:
            logger.exception("gRPC %s failed", call.path.decode("latin-1"))
            code, details = StatusCode.UNKNOWN, "Unexpected error"
        if self.calls.get(call.stream_id) is call:
            await self._drained(call)
            self._finish(call, code, details)

    def _send(self, call: Call, message: bytes) -> None:
        """Send one message now if the client's window lets it (the usual case), else when it does."""
        data = PREFIX.pack(False, len(message)) + message
        if not call.started:
            self.h2.send_headers(call.stream_id, RESPONSE_HEADERS)
            call.started = True
        fits = len(data) <= min(self.h2.max_outbound_frame_size, self.h2.local_flow_control_window(call.stream_id))
        if fits and not call.out:  # the usual case: one frame, now
            self.h2.send_data(call.stream_id, data)
            return
        call.out += data
        self._send_some(call)

    async def _send_when_open(self, call: Call, message: bytes) -> None:
        await self._drained(call)
        self._send(call, message)
        self.flush()

    def _send_some(self, call: Call) -> None:
        stream_id = call.stream_id
        while call.out:
            room = min(self.h2.local_flow_control_window(stream_id), self.h2.max_outbound_frame_size)
            if room <= 0:
                return
            if room >= len(call.out):
                self.h2.send_data(stream_id, bytes(call.out))
                call.out.clear()
                return
            self.h2.send_data(stream_id, bytes(call.out[:room]))
            del call.out[:room]

    async def _drained(self, call: Call) -> None:
        """Wait until what the call had to send is sent."""
        while call.out:
            call.pending = self.loop.create_future()
            self.flush()
            await call.pending

    def _window_opened(self, stream_id: int) -> None:
        if stream_id == 0:  # the connection's window: any call may go on
            calls = list(self.calls.values())
        else:
            calls = [call] if (call := self.calls.get(stream_id)) is not None else []
        for call in calls:
            if call.out:
                with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                    self._send_some(call)
                if not call.out and call.pending is not None and not call.pending.done():
                    call.pending.set_result(None)

    def _finish(self, call: Call, code: StatusCode, details: str) -> None:
        self.calls.pop(call.stream_id, None)
        if call.timer is not None:
            call.timer.cancel()
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._status(call.stream_id, code, details, call.started)
        if self.gone and not self.calls:
            self.flush()
            self.close()
        else:
            self.flush_soon()

    def _status(self, stream_id: int, code: StatusCode, details: str, started: bool) -> None:
        trailers = [(b"grpc-status", str(code.value[0]).encode())]
        if details:
            trailers.append((b"grpc-message", urllib.parse.quote(details, safe=PRINTABLE).encode()))
        if not started:  # trailers only
            trailers = [*RESPONSE_HEADERS, *trailers]
        self.h2.send_headers(stream_id, trailers, end_stream=True)

    def _fail(self, call: Call, code: StatusCode, details: str) -> None:
        """End a call that cannot go on, whether or not its handler runs, and stop reading it."""
        self.calls.pop(call.stream_id, None)
        if not call.running:  # the handler, which logs its calls, never saw it
            self._rejected(call.path.decode("latin-1"), code, call.context, call.began)
        self._cancel(call)
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self._status(call.stream_id, code, details, call.started)
            self._reset(call.stream_id, h2.errors.ErrorCodes.NO_ERROR)

    def _rejected(self, path: str, code: StatusCode, context: Context, began: float) -> None:
        if self.server.rejected is not None:
            self.server.rejected(path, code, context, time.perf_counter() - began)

    def _expired(self, call: Call) -> None:
        """The call's deadline passed: a handler still at work is cancelled, and answers
        DEADLINE_EXCEEDED (_run); a call still arriving is answered so at once."""
        call.timer = None
        if self.calls.get(call.stream_id) is not call:
            return
        if call.running:
            self._stop_handler(call)
        else:
            self._fail(call, StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
            self.flush()

    def _release(self, call: Call) -> None:
        """The call's bytes no longer count as arriving (it is read whole, or over)."""
        self.server.arriving -= call.held
        call.held = 0

    def _cancel(self, call: Call) -> None:
        """The call is over for the client (reset, connection gone) or for us: stop all of it."""
        self._release(call)
        if call.timer is not None:
            call.timer.cancel()
        self._stop_handler(call)
        if call.pending is not None and not call.pending.done():
            call.pending.cancel()

    @staticmethod
    def _stop_handler(call: Call) -> None:
        """Cancel the call's handler wherever it is: in its task, or waiting before it has one (_start)."""
        call.cancelled = True
        if call.task is not None:
            if not call.task.done():
                call.task.cancel()
        elif isinstance(call.waiting, asyncio.Future):
            call.waiting.cancel()  # as Task.cancel() does: what it waits for raises CancelledError in it

    def _reset(self, stream_id: int, code: h2.errors.ErrorCodes) -> None:
        with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
            self.h2.reset_stream(stream_id, code)


def _same(message: Any) -> Any:
    return message


def _deserialize(handler: RpcMethodHandler) -> Callable[[bytes], Any]:
    return handler.request_deserializer or _same  # None: the handler takes the bytes


def _serialize(handler: RpcMethodHandler) -> Callable[[Any], bytes]:
    return handler.response_serializer or _same


async def _requests(call: Call) -> AsyncIterator[Any]:
    """A streaming request's messages, as they come."""
    assert call.messages is not None
    while (message := await call.messages.get()) is not END:
        yield message


def _timeout(value: bytes) -> float | None:
    """Seconds from gRPC's grpc-timeout header ("100m", "5S", ...); None when it is not one."""
    unit = TIMEOUT_UNITS.get(value[-1:])
    if unit is None or not value[:-1].isdigit() or len(value) > 9:
        return None
    return int(value[:-1]) * unit


def _unbase64(value: bytes) -> bytes:
    with contextlib.suppress(ValueError):
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    return b""


def _peer(address: Any) -> str:
    """gRPC's name for a peer: "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000"."""
    if not isinstance(address, tuple) or len(address) < 2:
        return ""
    host, port = address[0], address[1]
    return f"ipv6:[{host}]:{port}" if ":" in host else f"ipv4:{host}:{port}"
