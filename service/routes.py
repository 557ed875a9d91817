"""Thin handlers: decode the request into arrays, compute with service.model, return the response
model; the encode routes' LeanRoute writes it as JSON or safetensors (ArrayModel.render)."""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.arrays import SAFETENSORS
from service.bits import Packed
from service.errors import unprocessable
from service.flags import DRAINING
from service.lean import LeanRoute
from service.model import Array, Batch, affine, autoencode, decode, vae_encode
from service.schemas import (
    SEED_LIMIT,
    AutoencoderDecodeRequest,
    AutoencoderRequest,
    AutoencoderResponse,
    DecodeResponse,
    Health,
    ModelInfo,
    Problem,
    Readiness,
    VaeDecodeRequest,
    VaeRequest,
    VaeResponse,
    ValidationProblem,
)
from service.serving import Serving, ServingDep, over_limit

NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": Problem, "description": "The model is not loaded yet."},
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
# The encode routes take LeanRoute's short path: they are where the requests are.
encoders = APIRouter(route_class=LeanRoute)


def decode_batch(inputs: Batch | Packed, loaded: Serving, samples: int = 1) -> Batch:
    """A validated batch, checked against the limits and the model's width, and unpacked if packed."""
    limits, width = loaded.settings, loaded.model.input_dim
    try:
        rows = inputs.rows(width) if isinstance(inputs, Packed) else inputs.shape[0]
    except ValueError as exc:
        raise unprocessable(["body", "inputs", "packed"], str(exc), "packed") from None
    if (problem := over_limit(rows, samples, limits)) is not None:
        raise HTTPException(413, problem)
    if isinstance(inputs, Packed):
        return inputs.unpack(width)
    if inputs.shape[1] != width:
        message = f"rows have {inputs.shape[1]} values, but the model's input_dim is {width}"
        raise unprocessable(["body", "inputs", 0], message)
    return inputs


@encoders.post(
    "/v1/autoencoder/encode",
    response_model=AutoencoderResponse,
    responses=CLIENT_ERRORS,
    tags=["v1"],
    summary="Autoencoder codes of binary rows",
)
async def encode_autoencoder(request: AutoencoderRequest, loaded: ServingDep) -> AutoencoderResponse:
    """The deterministic bottleneck `relu(x @ W + b)` of each row: the same rows always give the same codes."""
    x = decode_batch(request.inputs, loaded)
    codes = autoencode(loaded.model, x)
    loaded.metrics.encoded("autoencoder", x.shape[0])
    context = {"rows": x.shape[0], "latent_dim": loaded.model.latent_dim}
    return AutoencoderResponse.model_validate({"codes": codes}, context=context)


@encoders.post(
    "/v1/vae/encode",
    response_model=VaeResponse,
    responses=CLIENT_ERRORS,
    tags=["v1"],
    summary="VAE posterior and samples of binary rows",
)
async def encode_vae(request: VaeRequest, loaded: ServingDep) -> VaeResponse:
    """`mu`, `log_sigma` and `samples` draws of `z = mu + exp(log_sigma) * eps` per row, with the KL to N(0, I).

    `eps = numpy.random.default_rng(seed).standard_normal((rows, samples, latent_dim))`: send the
    returned `seed` back with the same rows and you get the same `z`, bit for bit, on any replica.
    """
    x = decode_batch(request.inputs, loaded, request.samples)
    seed = secrets.randbelow(SEED_LIMIT) if request.seed is None else request.seed
    out = vae_encode(loaded.model, x, request.samples, seed)
    loaded.metrics.encoded("vae", x.shape[0], x.shape[0] * request.samples)
    fields = {"mu": out.mu, "log_sigma": out.log_sigma, "z": out.z, "kl": out.kl, "seed": seed}
    context = {"rows": x.shape[0], "latent_dim": loaded.model.latent_dim, "samples": request.samples}
    return VaeResponse.model_validate(fields, context=context)


NO_DECODER: dict[int | str, dict[str, Any]] = {
    409: {"model": Problem, "description": "The served weights have no decoder (train some: encoding-service train)."},
}


def decoder(loaded: Serving, which: str) -> Callable[[Batch], DecodeResponse]:
    """The served `which` decoder, as codes -> validated response; 409 when the weights have none."""
    model = loaded.model
    pairs = {
        "autoencoder": (model.ae_decoder_weight, model.ae_decoder_bias),
        "vae": (model.vae_decoder_weight, model.vae_decoder_bias),
    }
    weight, bias = pairs[which]
    if weight is None or bias is None:
        raise HTTPException(409, "the served weights have no decoder; train some with: encoding-service train")

    def to_bits(h: Batch) -> DecodeResponse:
        context = {"rows": h.shape[0]}
        return DecodeResponse.model_validate({"probabilities": decode(weight, bias, h)}, context=context)

    return to_bits


def latents(h: Array, loaded: Serving, field: str) -> Array:
    """Validated codes or z, checked against the limits and the model's latent width."""
    if (problem := over_limit(h.shape[0], 1, loaded.settings)) is not None:
        raise HTTPException(413, problem)
    if h.shape[1] != loaded.model.latent_dim:
        message = f"rows have {h.shape[1]} values, but the model's latent_dim is {loaded.model.latent_dim}"
        raise unprocessable(["body", field, 0], message)
    return h


DECODING: dict[str, Any] = {"response_model": DecodeResponse, "responses": CLIENT_ERRORS | NO_DECODER, "tags": ["v1"]}


@encoders.post("/v1/autoencoder/decode", summary="Bit probabilities of autoencoder codes", **DECODING)
async def decode_autoencoder(request: AutoencoderDecodeRequest, loaded: ServingDep) -> DecodeResponse:
    """`sigmoid(codes @ W_d + b_d)`: for each row of codes, the probability of each bit being 1."""
    to_bits = decoder(loaded, "autoencoder")
    return to_bits(latents(request.codes, loaded, "codes"))


@encoders.post("/v1/vae/decode", summary="Bit probabilities of VAE latents", **DECODING)
async def decode_vae(request: VaeDecodeRequest, loaded: ServingDep) -> DecodeResponse:
    """`sigmoid(z @ W_d + b_d)`: for each row of z, the probability of each bit being 1."""
    to_bits = decoder(loaded, "vae")
    return to_bits(latents(request.z, loaded, "z"))


@encoders.post("/v1/autoencoder/reconstruct", summary="Encode and decode binary rows in one call", **DECODING)
async def reconstruct_autoencoder(request: AutoencoderRequest, loaded: ServingDep) -> DecodeResponse:
    """The bit probabilities of each row's own codes: how well the autoencoder reconstructs it."""
    to_bits = decoder(loaded, "autoencoder")
    return to_bits(autoencode(loaded.model, decode_batch(request.inputs, loaded)))


@encoders.post("/v1/vae/reconstruct", summary="Encode binary rows with the VAE and decode their means", **DECODING)
async def reconstruct_vae(request: AutoencoderRequest, loaded: ServingDep) -> DecodeResponse:
    """The bit probabilities of each row's posterior mean `mu`: the VAE's deterministic reconstruction
    (decode a sampled z with /v1/vae/decode for a random one)."""
    to_bits = decoder(loaded, "vae")
    x = decode_batch(request.inputs, loaded)
    return to_bits(affine(x, loaded.model.mu_weight, loaded.model.mu_bias))


@router.get("/v1/model", response_model=ModelInfo, responses=NOT_READY, tags=["v1"], summary="The served model")
async def model_info(loaded: ServingDep) -> ModelInfo:
    """Dimensions, where the weights came from, their fingerprint, parameter shapes and request limits."""
    return loaded.info


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
    tags=["health"],
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> PlainTextResponse:
    """Requests by route and status, latency histograms, rows and samples encoded, the model's
    fingerprint (`encoder_model_info`), in the Prometheus text format."""
    registry = request.app.metrics.registry
    return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


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
    loaded: Serving | None = getattr(request.state, "serving", None)
    if loaded is None:
        response.status_code = 503
        return Readiness(status="loading")
    return Readiness(status="ready", fingerprint=loaded.info.fingerprint)
