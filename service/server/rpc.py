"""The gRPC server beside uvicorn's, in each worker and on its event loop: the Open Inference
Protocol (service.api.grpc), grpc.health.v1 (what Kubernetes' gRPC probes call) and server
reflection (what grpcurl-style tools list and call), served by service.server.transport (gRPC
over HTTP/2 with h2, on the event loop).

Each worker binds ENCODER_GRPC_PORT with SO_REUSEPORT: the kernel spreads new connections over the
workers, as the workers share the HTTP socket. DrainingServer starts it once the app has started
and stops it as it stops (service.server.drain).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import _async as reflection_async
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from service.api.grpc import inference_pb2, inference_pb2_grpc
from service.api.grpc.servicer import SERVICE, Servicer
from service.server.drain import GrpcOptions
from service.server.flags import DRAINING
from service.server.transport import Context, Server

logger = logging.getLogger("uvicorn.error")

HEALTH = "grpc.health.v1.Health"
LIVENESS = "liveness"  # the health service name that says SERVING while the process runs, as /healthz
WATCH_EVERY = 0.25  # seconds between looks at the state for Health.Watch
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health(health_pb2_grpc.HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 as the HTTP probes answer: the service ("") and the inference service are
    SERVING once the models are loaded and NOT_SERVING before and from SIGTERM on, as /readyz;
    "liveness" is SERVING while the process runs, draining included, as /healthz; NOT_FOUND for
    any other name. A Watch ends when the server stops, so that it never holds up the stop."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state
        self.stopping = asyncio.Event()

    def status(self, service: str) -> int | None:
        if service == LIVENESS:
            return int(SERVING)
        if service not in ("", SERVICE):
            return None
        return int(SERVING) if self.state.get("core") is not None and not self.state.get(DRAINING) else int(NOT_SERVING)

    async def Check(self, request: Any, context: Context) -> Any:
        if (status := self.status(request.service)) is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:64]!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: Context) -> AsyncIterator[Any]:
        if self.status(request.service) is None:
            yield health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            return
        last = None
        while not self.stopping.is_set():
            if (status := self.status(request.service)) != last:
                last = status
                yield health_pb2.HealthCheckResponse(status=status)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), WATCH_EVERY)


class RpcServer:
    """gRPC as `options` say, for the app whose lifespan `state` it is given (filled in as the
    app starts: until then, every call answers UNAVAILABLE)."""

    def __init__(self, options: GrpcOptions, state: dict[str, Any]) -> None:
        self.host, self.port = options.host, options.port
        self.address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        self.server = Server(options.max_message_bytes, options.max_arriving_bytes)  # RESOURCE_EXHAUSTED above
        servicer = Servicer(state)
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self.server)  # type: ignore[no-untyped-call]
        self.server.rejected = servicer.log_rejected  # calls answered before any handler ran: logged too
        self.health = Health(state)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        pool = inference_pb2.DESCRIPTOR.pool  # the stubs' own (service.api.grpc), with the health's and reflection's
        for descriptor in (health_pb2.DESCRIPTOR, reflection_pb2.DESCRIPTOR):
            pool.AddSerializedFile(descriptor.serialized_pb)
        names = (SERVICE, HEALTH, reflection.SERVICE_NAME)
        reflecting = reflection_async.ReflectionServicer(names, pool=pool)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflecting, self.server)

    async def start(self) -> None:
        """Listen, or OSError saying why not (the port is taken, the address is not this host's)."""
        try:
            await self.server.listen(self.host, self.port)
        except OSError as exc:
            raise OSError(f"gRPC cannot listen on {self.address}: {exc.strerror or exc}") from None
        logger.info("gRPC listening on %s (ENCODER_GRPC_PORT)", self.address)

    async def stop(self, grace: float) -> None:
        """Take no new calls; give those in flight `grace` seconds to finish (health watches end now)."""
        self.health.stopping.set()
        await self.server.stop(grace)
