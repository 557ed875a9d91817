"""The Open Inference Protocol (KServe v2) routes, beside /v1: the same models, the same numbers.

Handlers decode with service.oip, compute with service.model, and encode with service.oip;
every error is {"error": "..."}: 400 for a bad request, 404 for an unknown model or version.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service import __version__, oip
from service.flags import DRAINING
from service.model import autoencode, vae_encode
from service.schemas import SEED_LIMIT
from service.serving import Serving, ServingDep, over_limit

v2 = APIRouter(tags=["v2"])
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": oip.ErrorResponse, "description": "A request the protocol or the model cannot serve."},
    404: {"model": oip.ErrorResponse, "description": "No such model, or no such version of it."},
    413: {"model": oip.ErrorResponse, "description": "A body over ENCODER_MAX_BODY_BYTES."},
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
    return oip.ServerMetadata(name="encoding-service", version=__version__, extensions=["binary_tensor_data"])


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
    ready = state.get("serving") is not None and not state.get(DRAINING)
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def by_model(method: str, action: str, summary: str, **options: Any) -> Callable[[Endpoint], Endpoint]:
    """Route an endpoint at /v2/models/{model_name}{action}, and a copy of it that checks the
    version first at /v2/models/{model_name}/versions/{model_version}{action}."""

    def register(endpoint: Endpoint) -> Endpoint:
        common = {"methods": [method], "responses": ERRORS} | options
        path = "/v2/models/{model_name}"
        v2.add_api_route(path + action, endpoint, summary=summary, operation_id=endpoint.__name__, **common)

        async def versioned(model_version: str, **arguments: Any) -> Any:
            oip.check_model(arguments["model_name"], model_version)
            return await endpoint(**arguments)

        signature = inspect.signature(endpoint)
        version = inspect.Parameter("model_version", inspect.Parameter.KEYWORD_ONLY, annotation=str)
        versioned.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()]
            + [version]
        )
        v2.add_api_route(
            path + "/versions/{model_version}" + action,
            versioned,
            summary=summary + ", by version",
            description=f"As `{method} {path}{action}`, for one version of the model (`1`).\n\n"
            + inspect.cleandoc(endpoint.__doc__ or ""),
            operation_id=endpoint.__name__ + "_version",
            **common,
        )
        return endpoint

    return register


@by_model("GET", "", "Model metadata", response_model=oip.ModelMetadata)
async def model_metadata(model_name: str, loaded: ServingDep) -> oip.ModelMetadata:
    """The model's input (`input`, [-1, input_dim]) and outputs with their datatypes and shapes."""
    name = oip.check_model(model_name, None)
    return oip.model_metadata(name, loaded.model.input_dim, loaded.model.latent_dim)


@by_model("GET", "/ready", "Model readiness")
async def model_ready(model_name: str, loaded: ServingDep) -> dict[str, Any]:
    """200 with `ready: true` once the model is loaded (before, the `loaded` dependency answers 503)."""
    return {"name": oip.check_model(model_name, None), "ready": True}


@by_model(
    "POST",
    "/infer",
    "Inference",
    response_model=oip.InferenceResponse,
    openapi_extra=INFERENCE,
    responses={**ERRORS, 200: INFERRED},
)
async def infer(model_name: str, request: Request, loaded: ServingDep) -> Response:
    """Encode the rows of tensor `input` with `autoencoder` (output `codes`) or `vae` (`mu`,
    `log_sigma`, `z`, `kl`; parameters `seed` and `samples`, the seed used coming back in the
    response's parameters). The numbers are those of /v1 for the same rows and seed."""
    name = oip.check_model(model_name, None)
    body = await request.body()
    decoded = oip.decode(body, request.headers.get("inference-header-content-length"), name, loaded.model.input_dim)
    content, headers = _compute(name, decoded, loaded)
    return Response(content, headers=headers)


def _compute(name: str, decoded: oip.Decoded, loaded: Serving) -> tuple[bytes, dict[str, str]]:
    rows = decoded.x.shape[0]
    if name == "autoencoder":
        if (problem := over_limit(rows, 1, loaded.settings)) is not None:
            raise oip.ProtocolError(problem)
        loaded.metrics.encoded("autoencoder", rows)
        return oip.encode(name, decoded, {"codes": autoencode(loaded.model, decoded.x)})
    samples = _integer(decoded.parameters, "samples", 1, 1, None)
    seed = _integer(decoded.parameters, "seed", None, 0, SEED_LIMIT - 1)
    if (problem := over_limit(rows, samples, loaded.settings)) is not None:
        raise oip.ProtocolError(problem)
    seed = secrets.randbelow(SEED_LIMIT) if seed is None else seed
    out = vae_encode(loaded.model, decoded.x, samples, seed)
    loaded.metrics.encoded("vae", rows, rows * samples)
    arrays = {"mu": out.mu, "log_sigma": out.log_sigma, "z": out.z, "kl": out.kl}
    return oip.encode(name, decoded, arrays, {"seed": seed})


def _integer(parameters: dict[str, Any], key: str, default: int | None, low: int, high: int | None) -> Any:
    value = parameters.get(key, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low} <= {key}" + (f" <= {high}" if high is not None else "")
        raise oip.ProtocolError(f"parameter {key!r} must be an integer with {bound}, got {value!r}")
    return value
