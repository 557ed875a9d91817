"""inference.GRPCInferenceService over the inference core: each RPC translates its message, asks
the core (service.core), and translates the answer; the core's limits, seeds and counts are the
REST routes' own, so the same numbers come out of every door.

Every call is timed, counted into /metrics and written to the access log as REST requests are
(method "GRPC", path the RPC's full name, status its gRPC status code), and answers a mistake
with the status the protocol's servers use (CODES, REFUSED).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from grpc import StatusCode

from service.api.grpc import inference_pb2 as pb
from service.api.grpc import inference_pb2_grpc as stubs
from service.api.grpc import tensors
from service.api.v2 import codec as oip
from service.core.control import change
from service.core.gate import Gate, body_cost
from service.core.inference import Core, CoreError, Problem, Served
from service.core.metrics import GRPC
from service.core.traces import TRACE, Tracer
from service.core.traces import headers as trace_headers
from service.server.flags import DRAINING
from service.server.transport import Context
from service.web.access import REQUEST_ID, RequestLog, new_request_id
from service.web.auth import Policy, Refusal, presented_key

SERVICE = "inference.GRPCInferenceService"

# The status of each problem the core names (REST's are in service.api.served.STATUS).
CODES: dict[Problem, StatusCode] = {
    Problem.NOT_FOUND: StatusCode.NOT_FOUND,
    Problem.NOT_READY: StatusCode.UNAVAILABLE,
    Problem.OVER_LIMIT: StatusCode.RESOURCE_EXHAUSTED,
    Problem.BAD_INPUT: StatusCode.INVALID_ARGUMENT,
    Problem.NO_DECODER: StatusCode.FAILED_PRECONDITION,
    Problem.LOAD_FAILED: StatusCode.FAILED_PRECONDITION,
    Problem.NOT_APPLIED: StatusCode.UNAVAILABLE,
    Problem.DEADLINE: StatusCode.DEADLINE_EXCEEDED,
}
REFUSED: dict[Refusal, StatusCode] = {
    Refusal.MISSING: StatusCode.UNAUTHENTICATED,
    Refusal.INVALID: StatusCode.UNAUTHENTICATED,
    Refusal.NOT_ADMIN: StatusCode.PERMISSION_DENIED,
}
Handler = Callable[[Any, Any, Any], Awaitable[tuple[Any, Served | None]]]
Metadata = Sequence[tuple[str, str | bytes]]  # a call's, as grpc gives it


class Failed(Exception):
    """A call answered with a status other than OK."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def rpc(name: str, administers: bool = False) -> Callable[[Handler], Callable[..., Awaitable[Any]]]:
    """An RPC of the service: its key checked, its mistakes given their status, the call counted
    and logged. `handler` returns the response and the model version that answered, if any."""
    path = f"/{SERVICE}/{name}"

    def wrap(handler: Handler) -> Callable[..., Awaitable[Any]]:
        async def call(self: Servicer, request: Any, context: Context) -> Any:
            started = time.perf_counter()
            code, message, response, served = StatusCode.OK, "", None, None
            metadata = context.invocation_metadata() or ()
            tracer: Tracer | None = self.state.get("tracer")
            span = token = None
            if tracer is not None:
                span = tracer.start(*trace_headers(_encoded(metadata)))
                token = tracer.enter(span)
                if token is not None and span is not None and (client := _client(context.peer())):
                    span.attributes["client.address"] = client[0]
            try:
                self.authorize(metadata, administers)
                response, served = await self.admitted(handler, request, context)
                return response
            except (Failed, CoreError, oip.ProtocolError) as exc:
                code, message = _status(exc), str(exc)
                served = getattr(exc, "answered", None)  # the version asked for, if the call got that far
            except asyncio.CancelledError:  # the client went away, or its deadline passed
                code = StatusCode.CANCELLED
                raise
            finally:
                size = response.ByteSize() if response is not None else 0
                seconds, trace = time.perf_counter() - started, None
                if span is not None and tracer is not None:
                    trace = tracer.leave(span, token, GRPC, path, code.value[0], seconds, served)
                self.log_call(context, metadata, path, code, seconds, size, served, trace)
            await context.abort(code, message)

        call.__name__ = name
        call.__doc__ = handler.__doc__
        return call

    return wrap


class Servicer(stubs.GRPCInferenceServiceServicer):
    """The RPCs, reading what the app's lifespan made (`state`: core, keys, control, settings,
    log) as each call comes, and whether the server is draining (DRAINING, set there on SIGTERM)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self.state = state

    def authorize(self, metadata: Metadata, changes_models: bool) -> None:
        """Failed (UNAUTHENTICATED, PERMISSION_DENIED) unless the call's metadata carries a key
        that may make it, as the app's key policy says: `authorization: Bearer <key>` or
        `x-api-key: <key>`, as REST's headers."""
        policy: Policy | None = self.state.get("policy")
        if policy is None:
            return
        administers = policy.administers(changes_models)
        if not policy.guards(administers):
            return
        refusal = policy.refuse(presented_key(_encoded(metadata)), self.state.get("keys"), administers)
        if refusal is not None:
            raise Failed(REFUSED[refusal], refusal.value)

    async def admitted(self, handler: Handler, request: Any, context: Any) -> tuple[Any, Served | None]:
        """The handler's answer, once the worker's gate (the same requests in progress and memory
        budget as REST's) lets the call in; RESOURCE_EXHAUSTED, counted, when it does not."""
        gate: Gate | None = self.state.get("gate")
        if gate is None:  # before the app has started: the handler says UNAVAILABLE
            return await handler(self, request, context)
        cost = body_cost(request.ByteSize()) if isinstance(request, pb.ModelInferRequest) else 0
        refused = None if not cost and gate.enter_small() else await gate.enter(cost)
        if refused is not None:
            raise Failed(StatusCode.RESOURCE_EXHAUSTED, f"the server is busy ({refused[1]}): retry in a moment")
        try:
            return await handler(self, request, context)
        finally:
            gate.leave(cost)

    def log_call(
        self,
        context: Context,
        metadata: Metadata,
        path: str,
        code: StatusCode,
        seconds: float,
        size: int,
        served: Served | None,
        trace: tuple[bytes, bytes] | None = None,
    ) -> None:
        log: RequestLog | None = self.state.get("log")
        if log is None:  # before the app has started: nothing counts or logs yet
            return
        request_id = b""
        for key, value in metadata:
            if key == "x-request-id" and REQUEST_ID.fullmatch(_bytes(value)):
                request_id = _bytes(value)
        request_id = request_id or new_request_id()
        log.request(request_id, GRPC, path, code.value[0], seconds, size, _client(context.peer()), served, trace)

    def log_rejected(self, path: str, code: StatusCode, context: Context, seconds: float) -> None:
        """A call the transport answered itself (service.server.transport.Server.rejected)."""
        self.log_call(context, context.invocation_metadata(), path, code, seconds, 0, None)

    def core(self) -> Core:
        core: Core | None = self.state.get("core")
        if core is None:
            raise Failed(StatusCode.UNAVAILABLE, "the models are not loaded yet")
        return core

    # -- the RPCs

    @rpc("ServerLive")
    async def ServerLive(self, request: Any, context: Any) -> tuple[Any, None]:
        """Live while the server answers at all."""
        return pb.ServerLiveResponse(live=True), None

    @rpc("ServerReady")
    async def ServerReady(self, request: Any, context: Any) -> tuple[Any, None]:
        """Ready once the models are loaded, and not from SIGTERM on (the drain)."""
        ready = self.state.get("core") is not None and not self.state.get(DRAINING)
        return pb.ServerReadyResponse(ready=ready), None

    @rpc("ModelReady")
    async def ModelReady(self, request: Any, context: Any) -> tuple[Any, Served | None]:
        """Ready when the model (or that version) is served; not ready while none of its versions
        is; NOT_FOUND for a model or version the server does not have."""
        try:
            served, _ = self.core().answering(request.name, request.version or None)
        except CoreError as exc:
            if exc.problem is not Problem.NOT_READY:
                raise
            return pb.ModelReadyResponse(ready=False), None
        return pb.ModelReadyResponse(ready=True), served

    @rpc("ServerMetadata")
    async def ServerMetadata(self, request: Any, context: Any) -> tuple[Any, None]:
        metadata = oip.SERVER_METADATA
        return pb.ServerMetadataResponse(**metadata.model_dump()), None

    @rpc("ModelMetadata")
    async def ModelMetadata(self, request: Any, context: Any) -> tuple[Any, Served]:
        """The model's input and outputs with their datatypes and shapes, and its ready versions."""
        core = self.core()
        served, kinds = core.answering(request.name, request.version or None)
        metadata = oip.model_metadata(core, served, request.name, kinds).model_dump()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        metadata["inputs"] = [tensor(**each) for each in metadata["inputs"]]
        metadata["outputs"] = [tensor(**each) for each in metadata["outputs"]]
        return pb.ModelMetadataResponse(**metadata), served

    @rpc("ModelInfer")
    async def ModelInfer(self, request: Any, context: Context) -> tuple[Any, Served]:
        """Encode the rows of tensor `input`, as POST /v2/models/{name}/infer does, with the same
        outputs, parameters (samples, seed) and numbers. A call whose deadline has passed is not
        computed, and one whose deadline passes while it computes is given up between two blocks
        of rows (DEADLINE_EXCEEDED)."""
        core = self.core()
        served, kinds = core.answering(request.model_name, request.model_version or None)
        try:
            return self._infer(core, served, kinds, request, context), served
        except (Failed, CoreError, oip.ProtocolError) as exc:
            exc.answered = served  # type: ignore[union-attr]  # the log line and the span name the model
            raise

    @staticmethod
    def _infer(core: Core, served: Served, kinds: Any, request: Any, context: Context) -> Any:
        outputs = tuple(output for kind in kinds for output in kind.outputs)
        span = TRACE.get()
        if span is not None:
            span.begin()
        decoded, raw = tensors.decode(request, request.model_name, served.input_dim, outputs)
        _in_time(context)
        if span is not None:
            span.mark("parse")
        arrays, seed = oip.infer(core, served, kinds, decoded, lambda: _late(context))
        _in_time(context)  # the last block may end past the deadline
        if span is not None:
            span.mark("compute")
        response = tensors.encode(request.model_name, str(served.version), decoded, arrays, seed, raw)
        if span is not None:
            span.mark("encode")
        return response

    @rpc("RepositoryIndex")
    async def RepositoryIndex(self, request: Any, context: Any) -> tuple[Any, None]:
        """Every model of the repository with each version's state and, when not ready, why."""
        rows = self.core().repository.index(ready_only=request.ready)
        entry = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(models=[entry(**row) for row in rows]), None

    @rpc("RepositoryModelLoad", administers=True)
    async def RepositoryModelLoad(self, request: Any, context: Any) -> tuple[Any, None]:
        """Load the model, or load it again; answered once every worker serves the result."""
        name = await self._change("load", request)
        return pb.RepositoryModelLoadResponse(model_name=name, isLoaded=True), None

    @rpc("RepositoryModelUnload", administers=True)
    async def RepositoryModelUnload(self, request: Any, context: Any) -> tuple[Any, None]:
        """Stop serving every version of the model; answered once every worker has unloaded it."""
        name = await self._change("unload", request)
        return pb.RepositoryModelUnloadResponse(model_name=name, isUnloaded=True), None

    async def _change(self, verb: str, request: Any) -> str:
        # Triton's clients send the name in model_name (field 2); KServe's in field 1.
        name = request.model_name or request.repository_name
        control = self.state.get("control")
        if control is None:
            raise Failed(StatusCode.UNAVAILABLE, "the models are not loaded yet")
        await change(self.core(), control, verb, name)
        return str(name)


def _status(exc: Failed | CoreError | oip.ProtocolError) -> StatusCode:
    """The status a mistake is answered with."""
    if isinstance(exc, Failed):
        return exc.code
    if isinstance(exc, CoreError):
        return CODES[exc.problem]
    return StatusCode.NOT_FOUND if exc.status == 404 else StatusCode.INVALID_ARGUMENT


def _in_time(context: Context) -> None:
    if _late(context):
        raise Failed(StatusCode.DEADLINE_EXCEEDED, "the call's deadline passed")


def _late(context: Context) -> bool:
    """Whether the call's deadline has passed (never, for a call without one)."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _encoded(metadata: Metadata) -> list[tuple[bytes, bytes]]:
    """A call's metadata as HTTP headers are read (names and values in bytes)."""
    return [(key.encode(), _bytes(value)) for key, value in metadata]


def _bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode()


@functools.lru_cache(maxsize=1024)  # a connection's calls share their peer
def _client(peer: str | None) -> tuple[str, int] | None:
    """("127.0.0.1", 5000) from gRPC's "ipv4:127.0.0.1:5000" (or "ipv6:[::1]:5000")."""
    if not peer or not peer.startswith(("ipv4:", "ipv6:")):
        return None
    host, _, port = peer[5:].rpartition(":")
    return host.strip("[]"), int(port) if port.isdigit() else 0
