"""How `encoding-service serve` runs several workers: a supervisor of its own, in place of uvicorn's.

uvicorn's supervisor broke promises that one worker keeps: it kept its copy of the listening
socket after the workers stopped accepting (the kernel completed handshakes into it, and reset
them when it exited: a reset per client connection at every SIGTERM under load), passed SIGTERM
on only at its next half-second poll (readiness said 200 meanwhile), answered SIGINT or a second
SIGTERM with a SIGTERM (so the workers drained the whole delay), and exited 0 when its workers
failed to start. Patching four methods of it would have been harder to read than this.

The supervisor binds the socket, starts `workers` spawned processes that each run a
DrainingServer on it, and then:

- passes SIGTERM and SIGINT on to every worker at once, from the signal handler, as it got them
  (a second SIGTERM, or SIGINT, ends their drain); on the first it closes its own copy of the
  listening socket, so the socket goes away with the last worker's and nothing is queued on it
  that nobody will accept;
- exits with the worker's status (3, uvicorn's, if it has none) when one of the first workers
  dies before it is ready: the app cannot start, and would not start again;
- replaces a worker that dies after it was ready, and gives up (status 1) when workers died more
  than MOST_DEATHS times within DEATHS_WINDOW seconds. What the dead worker counted stays in
  /metrics, but for what it had not handed on yet (at most its last 0.25 s).

Workers are in a process group of their own, so that a terminal's Ctrl-C reaches them once,
through the supervisor; and each asks the kernel for SIGTERM should the supervisor die.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections import deque
from multiprocessing.synchronize import Event
from types import FrameType

import uvicorn

from service.server.drain import STARTUP_FAILURE, DrainingServer, GrpcAddress

logger = logging.getLogger("uvicorn.error")


MOST_DEATHS = 5
DEATHS_WINDOW = 60.0
POLL = 0.05  # seconds between looks at the workers

spawn = multiprocessing.get_context("spawn")
multiprocessing.allow_connection_pickling()  # the listening socket travels to each worker


class ReadyServer(DrainingServer):
    """A DrainingServer that says when its startup is complete (the supervisor's `ready`)."""

    def __init__(self, config: uvicorn.Config, shutdown_delay: float, grpc: GrpcAddress, ready: Event) -> None:
        super().__init__(config, shutdown_delay, grpc)
        self.ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.ready.set()


def _die_with_parent() -> None:
    """Ask Linux for SIGTERM when the supervisor dies (prctl PR_SET_PDEATHSIG), so that no
    orphaned worker keeps the port."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG


def work(
    config: uvicorn.Config, sockets: list[socket.socket], shutdown_delay: float, grpc: GrpcAddress, ready: Event
) -> None:
    """A worker process: its own process group, logging as configured, a ReadyServer on the
    supervisor's socket; exit status 3 if it never started."""
    os.setpgid(0, 0)
    _die_with_parent()
    config.configure_logging()
    server = ReadyServer(config, shutdown_delay, grpc, ready)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=sockets)
    sys.exit(0 if server.started else STARTUP_FAILURE)


class Worker:
    """One worker process, and whether it has said it is ready."""

    def __init__(
        self, config: uvicorn.Config, sock: socket.socket, shutdown_delay: float, grpc: GrpcAddress, replaces: bool
    ) -> None:
        self.replaces = replaces  # started in place of one that died, not at the server's start
        self.ready = spawn.Event()
        self.announced = False  # whether the supervisor has logged that it is ready
        self.process = spawn.Process(target=work, args=(config, [sock], shutdown_delay, grpc, self.ready))
        self.process.start()

    def signal(self, sig: int) -> None:
        if self.process.pid is not None and self.process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)


class Supervisor:
    """Several workers on one socket; `run()` returns the exit status."""

    def __init__(self, config: uvicorn.Config, shutdown_delay: float, grpc: GrpcAddress = None) -> None:
        self.config = config
        self.shutdown_delay = shutdown_delay
        self.grpc = grpc  # each worker listens on it too (SO_REUSEPORT)
        self.socket: socket.socket | None = None
        self.workers: list[Worker] = []
        self.stopping = False
        self.deaths: deque[float] = deque()

    def handle(self, sig: int, _frame: FrameType | None) -> None:
        """SIGTERM or SIGINT: passed on to every worker now, as it came."""
        if not self.stopping:
            self.stopping = True
            logger.info("Received %s: passing it on to %d workers", signal.Signals(sig).name, len(self.workers))
            if self.socket is not None:
                self.socket.close()  # the workers' copies alone keep it open now
        for worker in self.workers:
            worker.signal(sig)

    def start(self, replaces: bool = False) -> Worker:
        assert self.socket is not None
        worker = Worker(self.config, self.socket, self.shutdown_delay, self.grpc, replaces)
        logger.info("Started worker process [%s]", worker.process.pid)
        return worker

    def run(self) -> int:
        self.socket = self.config.bind_socket()
        logger.info("Started supervisor process [%d]", os.getpid())
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.workers = [self.start() for _ in range(self.config.workers)]
            return self.watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.socket is not None:
                self.socket.close()

    def watch(self) -> int:
        status = 0
        while any(worker.process.is_alive() for worker in self.workers) or not self.stopping:
            time.sleep(POLL)
            for index, worker in enumerate(self.workers):
                code = worker.process.exitcode
                if not worker.announced and worker.ready.is_set():
                    worker.announced = True
                    logger.info("Worker [%s] is ready", worker.process.pid)
                if code is None or self.stopping:
                    continue
                if not worker.ready.is_set() and not worker.replaces:
                    logger.error("Worker [%s] failed to start (status %s): stopping", worker.process.pid, code)
                    status = code if code > 0 else STARTUP_FAILURE
                    self.stop()
                    break
                now = time.monotonic()
                self.deaths.append(now)
                while self.deaths and self.deaths[0] < now - DEATHS_WINDOW:
                    self.deaths.popleft()
                if len(self.deaths) > MOST_DEATHS:
                    logger.error("Workers died %d times within %g s: stopping", len(self.deaths), DEATHS_WINDOW)
                    status = 1
                    self.stop()
                    break
                logger.error(
                    "Worker [%s] died (status %s); starting another. Its counts in /metrics stay, but for "
                    "those of its last 0.25 s",
                    worker.process.pid,
                    code,
                )
                self.workers[index] = self.start(replaces=True)
        for worker in self.workers:
            worker.process.join()
        logger.info("Stopping supervisor process [%d]", os.getpid())
        return status

    def stop(self) -> None:
        """Stop every worker without a drain: the server failed, it is not being rolled."""
        self.handle(signal.SIGINT, None)
