"""How `encoding-service serve` stops: uvicorn's server and worker process, with a drain phase on
SIGTERM that loses no request that reached it (DrainingServer)."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import signal
import socket
import time
from types import FrameType

import uvicorn
from uvicorn.supervisors import multiprocess

from service.server.flags import DRAINING

logger = logging.getLogger("uvicorn.error")

IN_FLIGHT = 30  # seconds the server gives requests in flight to finish once it stops (after the drain)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, stopping on SIGTERM without losing a request that reached it.

    uvicorn, on SIGTERM, closes its listening sockets at once (the kernel resets the connections
    queued in their backlog) and closes idle keep-alive connections at once (a request a proxy
    sends on one that moment is lost): behind a balancer, 502s at every rolling restart. Here:

    1. SIGTERM starts a drain of `shutdown_delay` seconds: the readiness endpoints answer 503 at
       once (the app's state holds DRAINING), and everything else is served as before, while
       Kubernetes takes the endpoint out and balancers move away. A second SIGTERM, or SIGINT,
       ends the wait.
    2. Then the connections queued in the listening sockets are accepted and served before the
       sockets close, and each open connection stops as GuardedHttpToolsProtocol.shutdown says.
    3. uvicorn's own shutdown finishes what is in flight (up to timeout_graceful_shutdown).
    """

    def __init__(self, config: uvicorn.Config, shutdown_delay: float) -> None:
        super().__init__(config)
        self.shutdown_delay = shutdown_delay
        self.drain_until: float | None = None
        self.drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it only sets flags; on_tick, on the event loop, acts on them.
        if sig == signal.SIGTERM and self.shutdown_delay > 0 and self.started and self.drain_until is None:
            self.drain_until = time.monotonic() + self.shutdown_delay
            self.lifespan.state[DRAINING] = True  # each request's scope copies it: readiness says 503
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and not self.should_exit and time.monotonic() >= self.drain_until:
            self.should_exit = True
        if counter % 10 == 0 and self.drain_until is not None and not self.drain_logged:
            self.drain_logged = True
            logger.info("Draining: not ready, serving for %g s more (ENCODER_SHUTDOWN_DELAY)", self.shutdown_delay)
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self._serve_backlog()
        await super().shutdown(sockets)

    async def _serve_backlog(self) -> None:
        """Stop listening without resetting the connections queued in the listening sockets: keep a
        duplicate of each while the servers close, accept what is queued on it, then close it."""
        listeners = [
            socket.socket(fileno=os.dup(sock.fileno())) for server in self.servers for sock in server.sockets or ()
        ]
        for server in self.servers:
            server.close()
        loop = asyncio.get_running_loop()
        protocol = functools.partial(  # as uvicorn's startup makes each connection's protocol
            self.config.http_protocol_class,  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        accepted = 0
        for listener in listeners:
            listener.setblocking(False)
            while True:
                try:
                    connection, _ = listener.accept()
                except (BlockingIOError, InterruptedError):
                    break
                connection.setblocking(False)
                await loop.connect_accepted_socket(protocol, connection)
                accepted += 1
            listener.close()
        if accepted:
            logger.info("Accepted %d queued connection(s) before closing the listening sockets", accepted)


class DrainingProcess(multiprocess.Process):
    """A worker process of uvicorn's supervisor that runs a DrainingServer."""

    delay = 0.0  # set before the supervisor makes its workers; each keeps its own copy

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        self.shutdown_delay = self.delay

    @property
    def server(self) -> uvicorn.Server:
        if self._server is None:
            self._server = DrainingServer(self.config, self.shutdown_delay)
        return self._server


def serve(config: uvicorn.Config, shutdown_delay: float) -> bool:
    """Run the server as uvicorn.run does, each worker a DrainingServer; whether it started."""
    if config.workers > 1:
        # uvicorn's supervisor makes its workers with the module's own Process class.
        DrainingProcess.delay = shutdown_delay
        multiprocess.Process = DrainingProcess  # type: ignore[misc]
        multiprocess.Multiprocess(config, sockets=[config.bind_socket()]).run()
        return True
    server = DrainingServer(config, shutdown_delay)
    server.run()
    return server.started
