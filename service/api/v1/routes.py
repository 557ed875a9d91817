"""The /v1 API: thin handlers that decode the request into arrays, ask the inference core
(service.core) to compute, and return the response model, which the encode routes' LeanRoute
writes as JSON or safetensors (ArrayModel.render).

Every inference route is served at three paths, one scheme for every model:
`/v1/{kind}/{op}` (the default model), `/v1/models/{model_name}/{kind}/{op}` (a model's highest
ready version) and `/v1/models/{model_name}/versions/{model_version}/{kind}/{op}`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS

from service.api.served import AnsweringDep, CoreDep
from service.api.v1.arrays import SAFETENSORS
from service.api.v1.bits import Packed, PackedError
from service.api.v1.schemas import (
    AnyWidthAutoencoderDecodeRequest,
    AnyWidthAutoencoderRequest,
    AnyWidthVaeDecodeRequest,
    AnyWidthVaeRequest,
    AutoencoderDecodeRequest,
    AutoencoderRequest,
    AutoencoderResponse,
    DecodeResponse,
    Health,
    ModelInfo,
    ModelList,
    Problem,
    Readiness,
    VaeDecodeRequest,
    VaeRequest,
    VaeResponse,
    ValidationProblem,
)
from service.core.inference import Core, CoreError, Served
from service.models.encoders import Array, Batch
from service.models.kinds import AUTOENCODER, VAE
from service.server.flags import DRAINING
from service.web.errors import unprocessable
from service.web.lean import LeanRoute

NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {
        "model": Problem,
        "description": "The model is not loaded yet; or the server is busy (ENCODER_MAX_REQUESTS_IN_PROGRESS, "
        "ENCODER_MEMORY_BUDGET): retry after the Retry-After header's seconds.",
    },
}
CLIENT_ERRORS: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {SAFETENSORS.decode(): {"schema": {"type": "string", "format": "binary"}}},
        "description": "JSON, or with `Accept: application/x-safetensors` the same arrays as float64 in a "
        "safetensors file (other fields in its metadata).",
    },
    406: {"model": Problem, "description": "The Accept header allows neither JSON nor safetensors."},
    415: {"model": Problem, "description": "The body was not sent as JSON (Content-Type: application/json)."},
    413: {"model": Problem, "description": "Over a limit: too many rows or samples, or too large a body."},
    422: {
        "model": ValidationProblem,
        "description": "Not a batch of 0/1 rows of the model's width; `loc` names the row and column.",
    },
    **NOT_READY,
}

router = APIRouter()
# The inference routes take LeanRoute's short path: they are where the requests are.
encoders = APIRouter(route_class=LeanRoute)

MODEL_NAME = {
    "name": "model_name",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"},
    "description": "A model of the repository (GET /v1/models lists them); `default` without one.",
}
MODEL_VERSION = {
    "name": "model_version",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[1-9][0-9]{0,8}$"},
    "description": "One of the model's ready versions.",
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "No such model or version."}}


def inference_route(
    kind: str, op: str, body: type[Any], any_width: type[Any], **options: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Serve an endpoint at /v1/{kind}/{op} for the default model, and at the per-model and
    per-version paths, where rows of any width are documented (each model has its own)."""

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        responses = options.pop("responses")
        encoders.add_api_route(
            f"/v1/{kind}/{op}", endpoint, methods=["POST"], responses=responses, tags=["v1"], **options
        )
        for suffix, prefix, parameters in (
            ("model", "/v1/models/{model_name}", [MODEL_NAME]),
            ("version", "/v1/models/{model_name}/versions/{model_version}", [MODEL_NAME, MODEL_VERSION]),
        ):

            async def per_model(**arguments: Any) -> Any:
                return await endpoint(**arguments)

            per_model.__wrapped__ = endpoint  # type: ignore[attr-defined]  # what LeanRoute calls instead

            signature = inspect.signature(endpoint, eval_str=True)
            first, *rest = signature.parameters.values()
            per_model.__signature__ = signature.replace(  # type: ignore[attr-defined]
                parameters=[first.replace(annotation=any_width), *rest]
            )
            per_model.__annotations__ = {p.name: p.annotation for p in (first.replace(annotation=any_width), *rest)}
            per_model.__annotations__["return"] = signature.return_annotation
            per_model.__doc__ = endpoint.__doc__
            encoders.add_api_route(
                f"{prefix}/{kind}/{op}",
                per_model,
                methods=["POST"],
                name=f"{endpoint.__name__}_{suffix}",
                responses=responses | NOT_FOUND,
                tags=["models"],
                openapi_extra={"parameters": parameters},
                **(options | {"summary": options["summary"] + f", by {'model' if suffix == 'model' else 'version'}"}),
            )
        return endpoint

    return register


def decode_batch(inputs: Batch | Packed, served: Served, samples: int = 1) -> Batch:
    """A validated batch, checked against the limits and the model's width, and unpacked if packed."""
    width = served.model.input_dim
    try:
        rows = inputs.rows(width) if isinstance(inputs, Packed) else inputs.shape[0]
    except PackedError as exc:
        raise unprocessable(["body", "inputs", exc.field], str(exc), "packed") from None
    if isinstance(inputs, Packed):
        Core.check(served, rows, samples)  # before it is unpacked (the core checks rows again)
        return inputs.unpack(width)
    if inputs.shape[1] != width:
        _check_width(served, inputs.shape[1], "inputs")
    return inputs


def _check_width(served: Served, width: int, field: str, latent: bool = False) -> None:
    """The core's width check, its BAD_INPUT said as /v1's 422 at the field's first row."""
    try:
        Core.check_width(served, width, latent)
    except CoreError as exc:
        raise unprocessable(["body", field, *exc.where], str(exc)) from None


@inference_route(
    "autoencoder",
    "encode",
    AutoencoderRequest,
    AnyWidthAutoencoderRequest,
    response_model=AutoencoderResponse,
    responses=CLIENT_ERRORS,
    summary="Autoencoder codes of binary rows",
)
async def encode_autoencoder(request: AutoencoderRequest, at: AnsweringDep) -> AutoencoderResponse:
    """The deterministic bottleneck `relu(x @ W + b)` of each row: the same rows always give the same codes."""
    core, served = at
    x = decode_batch(request.inputs, served)
    codes = core.encode_one(served, AUTOENCODER, x)[0]["codes"]
    context = {"rows": x.shape[0], "latent_dim": served.model.latent_dim}
    return AutoencoderResponse.model_validate({"codes": codes}, context=context)


@inference_route(
    "vae",
    "encode",
    VaeRequest,
    AnyWidthVaeRequest,
    response_model=VaeResponse,
    responses=CLIENT_ERRORS,
    summary="VAE posterior and samples of binary rows",
)
async def encode_vae(request: VaeRequest, at: AnsweringDep) -> VaeResponse:
    """`mu`, `log_sigma` and `samples` draws of `z = mu + exp(log_sigma) * eps` per row, with the KL to N(0, I).

    `eps = numpy.random.default_rng(seed).standard_normal((rows, samples, latent_dim))`: send the
    returned `seed` back with the same rows and you get the same `z`, bit for bit, on any replica.
    """
    core, served = at
    x = decode_batch(request.inputs, served, request.samples)
    arrays, seed = core.encode_one(served, VAE, x, request.samples, request.seed)
    fields = {**arrays, "seed": seed}
    context = {"rows": x.shape[0], "latent_dim": served.model.latent_dim, "samples": request.samples}
    return VaeResponse.model_validate(fields, context=context)


NO_DECODER: dict[int | str, dict[str, Any]] = {
    409: {"model": Problem, "description": "The served weights have no decoder (train some: encoding-service train)."},
}
DECODING: dict[str, Any] = {"response_model": DecodeResponse, "responses": CLIENT_ERRORS | NO_DECODER}


def latents(h: Array, served: Served, field: str) -> Array:
    """Validated codes or z, checked against the limits and the model's latent width."""
    Core.check(served, h.shape[0])
    _check_width(served, h.shape[1], field, latent=True)
    return h


def probabilities(array: Array) -> DecodeResponse:
    return DecodeResponse.model_validate({"probabilities": array}, context={"rows": array.shape[0]})


@inference_route(
    "autoencoder",
    "decode",
    AutoencoderDecodeRequest,
    AnyWidthAutoencoderDecodeRequest,
    summary="Bit probabilities of autoencoder codes",
    **DECODING,
)
async def decode_autoencoder(request: AutoencoderDecodeRequest, at: AnsweringDep) -> DecodeResponse:
    """`sigmoid(codes @ W_d + b_d)`: for each row of codes, the probability of each bit being 1."""
    core, served = at
    core.require_decoder(served, AUTOENCODER)
    return probabilities(core.decode(served, AUTOENCODER, latents(request.codes, served, "codes")))


@inference_route(
    "vae", "decode", VaeDecodeRequest, AnyWidthVaeDecodeRequest, summary="Bit probabilities of VAE latents", **DECODING
)
async def decode_vae(request: VaeDecodeRequest, at: AnsweringDep) -> DecodeResponse:
    """`sigmoid(z @ W_d + b_d)`: for each row of z, the probability of each bit being 1."""
    core, served = at
    core.require_decoder(served, VAE)
    return probabilities(core.decode(served, VAE, latents(request.z, served, "z")))


@inference_route(
    "autoencoder",
    "reconstruct",
    AutoencoderRequest,
    AnyWidthAutoencoderRequest,
    summary="Encode and decode binary rows in one call",
    **DECODING,
)
async def reconstruct_autoencoder(request: AutoencoderRequest, at: AnsweringDep) -> DecodeResponse:
    """The bit probabilities of each row's own codes: how well the autoencoder reconstructs it."""
    core, served = at
    core.require_decoder(served, AUTOENCODER)
    return probabilities(core.reconstruct(served, AUTOENCODER, decode_batch(request.inputs, served)))


@inference_route(
    "vae",
    "reconstruct",
    AutoencoderRequest,
    AnyWidthAutoencoderRequest,
    summary="Encode binary rows with the VAE and decode their means",
    **DECODING,
)
async def reconstruct_vae(request: AutoencoderRequest, at: AnsweringDep) -> DecodeResponse:
    """The bit probabilities of each row's posterior mean `mu`: the VAE's deterministic reconstruction
    (decode a sampled z with /v1/vae/decode for a random one)."""
    core, served = at
    core.require_decoder(served, VAE)
    return probabilities(core.reconstruct(served, VAE, decode_batch(request.inputs, served)))


def describe(served: Served, core: Core) -> ModelInfo:
    """What GET /v1/model and GET /v1/models/{name}/versions/{version} say of a served version."""
    model = served.model
    return ModelInfo.model_validate(
        {
            "name": served.name,
            "version": served.version,
            "description": served.description,
            "input_dim": model.input_dim,
            "latent_dim": model.latent_dim,
            **served.source,
            "fingerprint": served.fingerprint,
            "parameters": {name: list(value.shape) for name, value in model.arrays().items()},
            "decoders": model.has_decoders,
            "loaded_at": served.loaded_at,
            "limits": {
                "max_rows": served.limits.max_rows,
                "max_samples": served.limits.max_samples,
                "max_rows_x_samples": served.limits.max_rows_x_samples,
                "max_body_bytes": core.max_body_bytes,
            },
        }
    )


OPS = [f"{kind.name}/{op}" for kind in (AUTOENCODER, VAE) for op in ("encode", "decode", "reconstruct")]


def _routes(prefix: str, decoders: bool) -> dict[str, str]:
    return {op: f"{prefix}/{op}" for op in OPS if decoders or op.endswith("encode")}


def listing(core: Core, root: str) -> list[dict[str, Any]]:
    """GET /v1/models: every model with its versions, and the URLs (under the root path) of their routes."""
    models = []
    for name, entry in sorted(core.repository.entries.items()):
        versions = []
        for number, version in sorted(entry.versions.items()):
            row: dict[str, Any] = {"version": number, "state": version.state.value, "reason": version.reason}
            row["routes"] = {}
            if version.served is not None:
                model = version.served.model
                row |= {"input_dim": model.input_dim, "latent_dim": model.latent_dim}
                row |= {"fingerprint": version.served.fingerprint, "loaded_at": version.served.loaded_at}
                row["routes"] = _routes(f"{root}/v1/models/{name}/versions/{number}", model.has_decoders)
            versions.append(row)
        ready = entry.ready()
        models.append(
            {
                "name": name,
                "description": entry.description,
                "state": "READY" if ready else "UNAVAILABLE",
                "reason": "" if ready else core.repository.why(name),
                "routes": _routes(f"{root}/v1/models/{name}", ready[-1].model.has_decoders) if ready else {},
                "versions": versions,
            }
        )
    return models


@router.get(
    "/v1/model", response_model=ModelInfo, responses=NOT_READY | NOT_FOUND, tags=["v1"], summary="The served model"
)
async def model_info(at: AnsweringDep) -> ModelInfo:
    """Dimensions, where the weights came from, their fingerprint, parameter shapes and request limits
    of the default model (the highest ready version of `default` in a repository)."""
    core, served = at
    return describe(served, core)


@router.get("/v1/models", response_model=ModelList, responses=NOT_READY, tags=["models"], summary="Every model served")
async def list_models(request: Request, core: CoreDep) -> ModelList:
    """Each model of the repository (or the one default model): its versions with their state (a
    version that failed to load says why), dimensions, fingerprint, and the URL of each route."""
    return ModelList.model_validate({"models": listing(core, request.scope.get("root_path", ""))})


@router.get(
    "/v1/models/{model_name}/versions/{model_version}",
    response_model=ModelInfo,
    responses=NOT_READY | NOT_FOUND,
    tags=["models"],
    summary="One version of a model",
    openapi_extra={"parameters": [MODEL_NAME, MODEL_VERSION]},
)
async def version_info(at: AnsweringDep) -> ModelInfo:
    """As GET /v1/model, for one ready version of a model."""
    core, served = at
    return describe(served, core)


@router.get(
    "/v1/models/{model_name}",
    response_model=ModelInfo,
    responses=NOT_READY | NOT_FOUND,
    tags=["models"],
    summary="A model",
    openapi_extra={"parameters": [MODEL_NAME]},
)
async def named_model(at: AnsweringDep) -> ModelInfo:
    """As GET /v1/model, for the highest ready version of a model."""
    core, served = at
    return describe(served, core)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={
        200: {
            "content": {
                CONTENT_TYPE_LATEST: {"schema": {"type": "string"}},
                OPENMETRICS: {"schema": {"type": "string"}},
            }
        }
    },
    tags=["health"],
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> PlainTextResponse:
    """Requests by route and status, latency histograms, rows and samples encoded, the model's
    fingerprint (`encoder_model_info`), spans exported and dropped, in the Prometheus text format;
    in the OpenMetrics format when the Accept header asks for it (as Prometheus does), where the
    latency histograms carry the trace id of a sampled request as an exemplar (traces on)."""
    registry = request.app.metrics.registry
    encode, media_type = choose_encoder(request.headers.get("accept", ""))
    return PlainTextResponse(encode(registry), media_type=media_type)


@router.get("/healthz", response_model=Health, tags=["health"], summary="Liveness")
async def healthz() -> Health:
    """200 while the process serves HTTP at all."""
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "The model is not loaded yet, or the server is stopping."}},
    tags=["health"],
    summary="Readiness",
)
async def readyz(request: Request, response: Response) -> Readiness:
    """200 once the weights are loaded and checked, 503 before, and again from SIGTERM on while the
    server drains (ENCODER_SHUTDOWN_DELAY)."""
    if getattr(request.state, DRAINING, False):
        response.status_code = 503
        return Readiness(status="draining")
    core: Core | None = getattr(request.state, "core", None)
    if core is None:
        response.status_code = 503
        return Readiness(status="loading")
    default = core.repository.serving.get("default")
    return Readiness(status="ready", fingerprint=default[-1].fingerprint if default else None)
