"""Which model a request is for (the ServedDep of every inference route), and how each API says a
CoreError: the core names the problem, the API its status."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, Response

from service.core.inference import Core, CoreError, Problem, Served
from service.server.flags import ANSWERED
from service.web.errors import is_v2, problem
from service.web.paths import route_path

# The status each API gives each problem. The same mistake means the same thing on both.
STATUS: dict[str, dict[Problem, int]] = {
    "v1": {
        Problem.NOT_FOUND: 404,
        Problem.NOT_READY: 503,
        Problem.OVER_LIMIT: 413,
        Problem.BAD_INPUT: 422,
        Problem.NO_DECODER: 409,
        Problem.LOAD_FAILED: 400,
        Problem.NOT_APPLIED: 503,
        Problem.DEADLINE: 504,  # not met on REST, which has no deadlines (gRPC's calls carry them)
    },
    "v2": {
        Problem.NOT_FOUND: 404,
        Problem.NOT_READY: 503,
        Problem.OVER_LIMIT: 413,
        Problem.BAD_INPUT: 400,
        Problem.NO_DECODER: 400,
        Problem.LOAD_FAILED: 400,
        Problem.NOT_APPLIED: 503,
        Problem.DEADLINE: 504,
    },
}


def core_of(request: Request) -> Core:
    """The app's inference core, or 503 before the lifespan has loaded the models."""
    core: Core | None = request.scope.get("state", {}).get("core")
    if core is None:
        raise HTTPException(503, "the model is not loaded yet")
    return core


async def core_dep(request: Request) -> Core:
    return core_of(request)


# The core, and the model version that answers. A plain tuple: a NamedTuple costs a one-row request
# 0.4 us to make, measured.
Answering = tuple[Core, Served]


async def answering(request: Request) -> Answering:
    """The core, and the model and version the path names (`model_name`, `model_version`; the
    default model on the routes without them), marked on the request for its response headers and
    access log line. One dependency for both: each costs a one-row request about a microsecond."""
    scope = request.scope
    core: Core | None = scope["state"].get("core") if "state" in scope else None
    if core is None:
        core = core_of(request)  # raises: 503
    params = scope.get("path_params")
    served = core.resolve(params.get("model_name"), params.get("model_version")) if params else core.resolve(None, None)
    scope[ANSWERED] = served
    return core, served


AnsweringDep = Annotated[Answering, Depends(answering)]
CoreDep = Annotated[Core, Depends(core_dep)]


async def core_error_handler(request: Request, exc: Exception) -> Response:
    """A CoreError in the shape and with the status of the path's API."""
    assert isinstance(exc, CoreError)
    path = route_path(request.scope)
    status = STATUS["v2" if is_v2(path) else "v1"][exc.problem]
    detail: Any = str(exc)
    if status == 422:  # /v1's validation shape: where, as a location
        detail = [{"type": "value_error", "loc": ["body", *exc.where], "msg": str(exc)}]
    return Response(problem(path, detail), status_code=status, media_type="application/json")
