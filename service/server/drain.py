"""How `encoding-service serve` stops: uvicorn's server and worker process, with a drain phase on
SIGTERM that loses no request that reached it (DrainingServer)."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import socket
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import uvicorn

from service.server.flags import DRAINING
from service.server.listening import close_listening

logger = logging.getLogger("uvicorn.error")

STARTUP_FAILURE = 3  # uvicorn's exit status when the app cannot start


@dataclass(frozen=True)
class GrpcOptions:
    """Where gRPC listens beside HTTP, its largest message (ENCODER_MAX_BODY_BYTES) and how many
    bytes of messages still arriving it holds at most (the memory budget's share of raw bodies,
    ENCODER_MEMORY_BUDGET / 4); the requests in progress and the memory budget of the calls being
    answered are the app's (service.core.gate), shared with REST."""

    host: str
    port: int
    max_message_bytes: int
    max_arriving_bytes: int = 64 * 1024 * 1024


GrpcAddress = GrpcOptions | None
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

    gRPC (service.server.rpc), when it is served too, says NOT_SERVING from the drain's start,
    and at its end takes no new calls and finishes those in flight, beside HTTP.
    """

    def __init__(self, config: uvicorn.Config, shutdown_delay: float, grpc: GrpcAddress = None) -> None:
        super().__init__(config)
        self.shutdown_delay = shutdown_delay
        self.drain_until: float | None = None
        self.drain_logged = False
        self.grpc = grpc
        self.rpc: Any = None  # service.server.rpc.RpcServer, once started

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it only sets flags; on_tick, on the event loop, acts on them.
        if sig == signal.SIGTERM and self.shutdown_delay > 0 and self.drain_until is None and not self.should_exit:
            # Still starting, too: a worker that stopped at once would close the listening socket
            # its siblings drain on. It drains from its first tick, never having been ready.
            self.drain_until = time.monotonic() + self.shutdown_delay
            if self.started:
                self.lifespan.state[DRAINING] = True  # each request's scope copies it: readiness says 503
            return
        super().handle_exit(sig, frame)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if self.grpc is not None and not await self._start_grpc(self.grpc):
            return
        try:
            await super().startup(sockets)  # SystemExit when the app cannot start
        finally:
            if not self.started and self.rpc is not None:  # then gRPC stops too, on this loop
                await self.rpc.stop(0)
                self.rpc = None
        if self.drain_until is not None and self.started:  # SIGTERM came during startup
            self.lifespan.state[DRAINING] = True

    async def _start_grpc(self, options: GrpcOptions) -> bool:
        """gRPC beside HTTP, on this event loop, before the app starts: it answers UNAVAILABLE (and
        health NOT_SERVING) until the models are loaded, and is listening by the time /readyz says
        200. Whether it could listen: a port it cannot is a failed startup, as HTTP's is."""
        from service.server.rpc import RpcServer

        self.rpc = RpcServer(options, self.lifespan.state)
        try:
            await self.rpc.start()
        except OSError as exc:
            logger.error("%s", exc)
            self.rpc = None
            self.should_exit = True
            return False
        return True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_until is not None and not self.should_exit and time.monotonic() >= self.drain_until:
            self.should_exit = True
        if counter % 10 == 0 and self.drain_until is not None and not self.drain_logged:
            self.drain_logged = True
            logger.info("Draining: not ready, serving for %g s more (ENCODER_SHUTDOWN_DELAY)", self.shutdown_delay)
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self.rpc is not None:  # gRPC takes no new calls, and finishes those in flight, meanwhile
            await asyncio.gather(self._serve_backlog(), self.rpc.stop(IN_FLIGHT))
        else:
            await self._serve_backlog()
        await super().shutdown(sockets)

    async def _serve_backlog(self) -> None:
        """Stop listening without resetting the connections queued in the listening sockets
        (service.server.listening): what is queued is accepted and served, as uvicorn's startup
        serves each connection."""
        loop = asyncio.get_running_loop()
        protocol = functools.partial(  # as uvicorn's startup makes each connection's protocol
            self.config.http_protocol_class,  # type: ignore[call-arg]
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )
        accepted = await close_listening(self.servers, lambda c: loop.connect_accepted_socket(protocol, c))
        if accepted:
            logger.info("Accepted %d queued connection(s) before closing the listening sockets", accepted)


def serve(config: uvicorn.Config, shutdown_delay: float, grpc: GrpcAddress = None) -> int:
    """Run the server as uvicorn.run does, each worker a DrainingServer (several under
    service.server.supervisor's Supervisor), with gRPC on `grpc` (host, port) if given; the
    exit status."""
    if config.workers > 1:
        from service.server.supervisor import Supervisor

        return Supervisor(config, shutdown_delay, grpc).run()
    server = DrainingServer(config, shutdown_delay, grpc)
    server.run()
    return 0 if server.started else STARTUP_FAILURE
