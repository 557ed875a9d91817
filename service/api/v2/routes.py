"""The Open Inference Protocol (KServe v2) routes, beside /v1: the same models, the same numbers.

Handlers decode with service.api.v2.codec, compute with the inference core (service.core), and
encode with service.api.v2.codec; every error is {"error": "..."}: 400 for a bad request, 404 for
an unknown model or version, 413 over a limit, 503 while a model has no ready version.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.api.served import core_of
from service.api.v2 import codec as oip
from service.core.inference import Core, Served
from service.core.traces import TRACE
from service.models.kinds import Kind
from service.server.flags import ANSWERED, DRAINING

v2 = APIRouter(tags=["v2"])
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": oip.ErrorResponse, "description": "A request the protocol or the model cannot serve."},
    404: {"model": oip.ErrorResponse, "description": "No such model, or no such version of it."},
    413: {"model": oip.ErrorResponse, "description": "A body over ENCODER_MAX_BODY_BYTES, or a batch over a limit."},
    503: {
        "model": oip.ErrorResponse,
        "description": "No version of the model is ready (or nothing is loaded yet); or the server is busy "
        "(ENCODER_MAX_REQUESTS_IN_PROGRESS, ENCODER_MEMORY_BUDGET): retry after the Retry-After header's seconds.",
    },
}
BINARY = (
    "the JSON, `Inference-Header-Content-Length` bytes long, then the raw little-endian bytes of each "
    "binary tensor in order (Triton's binary tensor data extension)."
)
INFERENCE = {
    "requestBody": {
        "required": True,
        "description": "An inference request as JSON (`Content-Type: application/json`), or, with binary "
        "input, as the binary tensor data extension has it (`Content-Type: application/octet-stream` and the "
        "`Inference-Header-Content-Length` header): " + BINARY,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
    "parameters": [
        {
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "schema": {"type": "integer", "minimum": 1},
            "description": "With binary input: the length in bytes of the JSON that starts the body.",
        }
    ],
}
INFERRED = {
    "description": "The outputs as JSON, or, when any is asked for as binary (`binary_data`, "
    "`binary_data_output`), as `application/octet-stream`: " + BINARY,
    "headers": {
        "Inference-Header-Content-Length": {
            "description": "With binary output: the length in bytes of the JSON that starts the body.",
            "schema": {"type": "integer"},
        }
    },
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}


async def protocol_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Every /v2 error as the protocol has it: {"error": "..."}."""
    assert isinstance(exc, oip.ProtocolError)
    return JSONResponse({"error": str(exc)}, status_code=exc.status)


@v2.get("/v2", response_model=oip.ServerMetadata, summary="Server metadata")
async def server_metadata() -> oip.ServerMetadata:
    """The server's name, version and protocol extensions (binary tensor data)."""
    return oip.SERVER_METADATA


# The protocol's REST spec writes the path as /v2/ too: answered, not redirected.
v2.add_api_route("/v2/", server_metadata, response_model=oip.ServerMetadata, include_in_schema=False)


@v2.get("/v2/health/live", summary="Server liveness")
async def server_live() -> dict[str, bool]:
    """200 while the server answers at all."""
    return {"live": True}


@v2.get("/v2/health/ready", summary="Server readiness", responses={503: {"description": "Not ready yet, or stopping."}})
async def server_ready(request: Request) -> JSONResponse:
    """200 once the models are loaded, 503 before, and again from SIGTERM on while the server
    drains (ENCODER_SHUTDOWN_DELAY)."""
    state = request.scope.get("state", {})
    ready = state.get("core") is not None and not state.get(DRAINING)
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def _answering(request: Request, model_name: str, model_version: str | None) -> tuple[Core, Served, tuple[Kind, ...]]:
    """The core, the version that answers and which of its kinds the name stands for (Core.target)."""
    core = core_of(request)
    served, kinds = core.answering(model_name, model_version)
    request.scope[ANSWERED] = served
    return core, served, kinds


def by_model(method: str, action: str, summary: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    """Route an endpoint at /v2/models/{model_name}{action} (the model's highest ready version),
    and at /v2/models/{model_name}/versions/{model_version}{action}."""

    def register(endpoint: Endpoint) -> Endpoint:
        common = {"methods": [method], "responses": ERRORS} | options
        path = "/v2/models/{model_name}"
        signature = inspect.signature(endpoint)
        others = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in signature.parameters.values()
            if p.name != "model_version"
        ]

        async def unversioned(**arguments: Any) -> Any:
            return await endpoint(model_version=None, **arguments)

        async def versioned(model_version: str, **arguments: Any) -> Any:
            return await endpoint(model_version=model_version, **arguments)

        version = inspect.Parameter("model_version", inspect.Parameter.KEYWORD_ONLY, annotation=str)
        unversioned.__signature__ = signature.replace(parameters=others)  # type: ignore[attr-defined]
        versioned.__signature__ = signature.replace(parameters=[*others, version])  # type: ignore[attr-defined]
        unversioned.__doc__ = endpoint.__doc__
        v2.add_api_route(path + action, unversioned, summary=summary, operation_id=endpoint.__name__, **common)
        v2.add_api_route(
            path + "/versions/{model_version}" + action,
            versioned,
            summary=summary + ", by version",
            description=f"As `{method} {path}{action}`, for one ready version of the model.\n\n"
            + inspect.cleandoc(endpoint.__doc__ or ""),
            operation_id=endpoint.__name__ + "_version",
            **common,
        )
        return endpoint

    return register


@by_model("GET", "", "Model metadata", response_model=oip.ModelMetadata)
async def model_metadata(model_name: str, request: Request, model_version: str | None = None) -> oip.ModelMetadata:
    """The model's input (`input`, [-1, input_dim]) and outputs with their datatypes and shapes, and
    its ready versions."""
    core, served, kinds = _answering(request, model_name, model_version)
    return oip.model_metadata(core, served, model_name, kinds)


@by_model("GET", "/ready", "Model readiness")
async def model_ready(model_name: str, request: Request, model_version: str | None = None) -> dict[str, Any]:
    """200 with `ready: true` when the model (or that version) is served; 404 for a model or
    version the server does not have, 503 while none of its versions is ready."""
    _answering(request, model_name, model_version)
    return {"name": model_name, "ready": True}


@by_model(
    "POST",
    "/infer",
    "Inference",
    response_model=oip.InferenceResponse,
    openapi_extra=INFERENCE,
    responses={**ERRORS, 200: INFERRED},
)
async def infer(model_name: str, request: Request, model_version: str | None = None) -> Response:
    """Encode the rows of tensor `input`. A model of the repository (and `default`) has the outputs
    of both its kinds, `codes` and `mu`, `log_sigma`, `z`, `kl`: ask for some with `outputs`, and
    only their kinds are computed. `autoencoder` and `vae` are the default model's two kinds, with
    their outputs alone. The VAE takes parameters `seed` and `samples`; the seed used comes back in
    the response's parameters. The numbers are those of /v1 for the same rows and seed."""
    span = TRACE.get()  # a sampled request's span (traces on): its phases are timed
    if span is not None:
        span.begin()
    core, served, kinds = _answering(request, model_name, model_version)
    body = await request.body()
    outputs = tuple(name for kind in kinds for name in kind.outputs)
    header = request.headers.get("inference-header-content-length")
    decoded = oip.decode(body, header, model_name, served.model.input_dim, outputs)
    if span is not None:
        span.mark("parse")
    arrays, seed = oip.infer(core, served, kinds, decoded)
    if span is not None:
        span.mark("compute")
    parameters = {"seed": seed} if seed is not None else None
    content, headers = oip.encode(model_name, str(served.version), decoded, arrays, parameters)
    if span is not None:
        span.mark("encode")
    return Response(content, headers=headers | {name.decode(): value.decode() for name, value in served.headers})
