"""Closing a listening socket without resetting the connections queued in it, for HTTP
(service.server.drain) and gRPC (service.server.transport) alike.

A TCP listening socket's queue holds connections whose handshake the kernel has completed and the
server not yet accepted: their clients have sent their requests. Closing the socket resets each
(a proxy that sent a request on one sees "connection reset by peer", and, for a request whose body
it streamed, as nginx's grpc_pass does every call's, cannot retry it elsewhere); with SO_REUSEPORT,
each worker's socket has a queue of its own. `close_listening` accepts the queue first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

SO_ATTACH_FILTER = 26  # Linux's socket option for a classic BPF filter
# Seconds between the two looks at a listening socket's queue before it closes: a client whose
# SYN was answered just before refuse_handshakes completes its handshake within a round trip, and
# is accepted at the second look instead of reset by the close.
STRAGGLERS = 0.01

# A classic BPF program, run by the kernel on each packet that reaches the listening socket, from
# its TCP header on: a SYN (a new handshake) is dropped, anything else kept whole, so that a
# handshake already answered completes, and its request arrives, into the queue that is accepted.
TCP_SYN = 0x02
DROP_SYN = (
    (0x30, 0, 0, 13),  # ldb [13]: the TCP header's flags
    (0x45, 0, 1, TCP_SYN),  # jset #SYN: a new handshake ...
    (0x06, 0, 0, 0),  # ret #0: ... is dropped
    (0x06, 0, 0, 0xFFFFFFFF),  # ret #-1: a handshake's last ACK, data: kept
)


def refuse_handshakes(listener: socket.socket) -> None:
    """Have the kernel drop every SYN that reaches a listening socket from now on (a socket
    filter), so that no new handshake starts into its queue while the queue is accepted and the
    socket closed: a connection that completed in between would be reset. A client whose SYN is
    dropped sends it again a second later and finds the socket closed: refused, which a client or
    balancer retries elsewhere. A handshake the socket answered before completes as usual (its last
    ACK is kept), and is accepted with the queue (STRAGGLERS). Linux only; elsewhere, nothing."""
    program = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in DROP_SYN))
    fprog = struct.pack("HL", len(DROP_SYN), ctypes.addressof(program))  # struct sock_fprog {len, *filter}
    with contextlib.suppress(OSError, AttributeError):
        listener.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


async def close_listening(servers: Sequence[asyncio.Server], serve: Callable[[socket.socket], Awaitable[Any]]) -> int:
    """Close `servers` without resetting the connections queued in their listening sockets: keep
    a duplicate of each socket, refuse new handshakes on it, close the servers, accept what is
    queued (twice, STRAGGLERS apart) and hand each connection to `serve`, then close the
    duplicates. How many connections were accepted."""
    listeners = [socket.socket(fileno=os.dup(sock.fileno())) for server in servers for sock in server.sockets]
    for listener in listeners:
        refuse_handshakes(listener)
        listener.setblocking(False)
    for server in servers:
        server.close()
    accepted = 0
    for look in range(2):
        if look:  # a handshake under way as the filter went on completes within a round trip
            await asyncio.sleep(STRAGGLERS)
        for listener in listeners:
            while True:
                try:
                    connection, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                connection.setblocking(False)
                await serve(connection)
                accepted += 1
    for listener in listeners:
        listener.close()
    return accepted
