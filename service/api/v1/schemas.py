"""The request and response models of the API (the rows they hold are parsed by service.api.v1.bits, the
arrays they answer are written by service.api.v1.arrays)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationInfo,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from service.api.v1.arrays import ArrayModel, float64_array, nested_numbers
from service.api.v1.bits import Inputs, bit_error, explain, kind_of
from service.core.inference import SEED_LIMIT
from service.models.encoders import DECODE_LIMIT, Array


def _json_int(value: Any) -> Any:
    """Integers as JSON Schema counts them: 3 and 3.0, but not "3" and not true."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("int_type", "expected an integer, got {kind}", {"kind": kind_of(value)})
    if isinstance(value, float):
        if not value.is_integer():
            raise PydanticCustomError("int_from_float", "expected an integer, got {value}", {"value": value})
        return int(value)
    return value


Seed = Annotated[
    int,
    Field(ge=0, le=SEED_LIMIT - 1),
    BeforeValidator(_json_int),
    WithJsonSchema({"type": "integer", "minimum": 0, "maximum": SEED_LIMIT - 1}),
]
Samples = Annotated[int, Field(ge=1), BeforeValidator(_json_int), WithJsonSchema({"type": "integer", "minimum": 1})]


class AutoencoderRequest(BaseModel):
    """A batch of binary rows to encode."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": [[0, 1, 1, 0, 1], [1, 0, 0, 1, 0]]}]},
    )

    inputs: Inputs


def _is_latent(value: Any) -> bool:
    return type(value) in (int, float) and abs(value) <= DECODE_LIMIT  # not bool: JSON true is no number


def parse_latents(value: Any) -> Array:
    """A JSON array of rows of numbers within +-DECODE_LIMIT -> (n, k) float64, or an error naming where.

    Checked value by value: latents are narrow (latent_dim columns), and numpy's type inference
    would take a JSON `true` among numbers for 1.0."""
    if not isinstance(value, list):
        raise bit_error(f"expected an array of rows, got {kind_of(value)}")
    if not value:
        raise bit_error("expected at least one row, got an empty array")
    width = len(value[0]) if isinstance(value[0], list) else 0
    if width and all(type(row) is list and len(row) == width and all(map(_is_latent, row)) for row in value):
        return np.array(value, dtype=np.float64)
    raise explain(value, _is_latent, "numbers", f"a number within +-{DECODE_LIMIT:g}")


def _latents(description: str) -> Any:
    schema = {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "array",
            "minItems": 1,
            "items": {"type": "number", "minimum": -DECODE_LIMIT, "maximum": DECODE_LIMIT},
        },
        "description": description,
    }
    return Annotated[Array, PlainValidator(parse_latents), WithJsonSchema(schema)]


class AutoencoderDecodeRequest(BaseModel):
    """Autoencoder codes to decode into bit probabilities."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"codes": [[0.0, 0.0], [0.64, 0.36]]}]})

    codes: _latents("Rows of latent_dim codes, each within +-1e6.")  # type: ignore[valid-type]


class VaeDecodeRequest(BaseModel):
    """VAE latents z to decode into bit probabilities."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"z": [[-1.14, -1.36], [0.5, 0.2]]}]})

    z: _latents("Rows of latent_dim values of z, each within +-1e6.")  # type: ignore[valid-type]


class DecodeResponse(ArrayModel):
    """p(x_i = 1 | code) for every bit: sigmoid(code @ W_d + b_d), rows x input_dim, each in [0, 1]."""

    probabilities: Annotated[
        Array, float64_array(2), WithJsonSchema(nested_numbers(2, "rows x input_dim probabilities in [0, 1]"))
    ]


class VaeRequest(BaseModel):
    """A batch of binary rows to encode with the VAE, with how many samples of z to draw per row."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"inputs": [[0, 1, 1, 0, 1], [1, 0, 0, 1, 0]], "samples": 2, "seed": 42}]},
    )

    inputs: Inputs
    samples: Samples = Field(default=1, description="Samples of z per row.")
    seed: Seed | None = Field(
        default=None,
        description="Seed of eps; leave it out and the server draws one and returns it.",
    )


class AutoencoderResponse(ArrayModel):
    """Autoencoder codes relu(x @ W + b), one row per input row."""

    codes: Annotated[Array, float64_array(2), WithJsonSchema(nested_numbers(2, "rows x latent_dim codes, all >= 0"))]


class VaeResponse(ArrayModel):
    """VAE posterior parameters, samples of z, and the KL divergence to N(0, I), per input row."""

    mu: Annotated[Array, float64_array(2), WithJsonSchema(nested_numbers(2, "rows x latent_dim means"))]
    log_sigma: Annotated[
        Array, float64_array(2), WithJsonSchema(nested_numbers(2, "rows x latent_dim log standard deviations"))
    ]
    z: Annotated[
        Array,
        float64_array(3),
        WithJsonSchema(nested_numbers(3, "rows x samples x latent_dim samples, z = mu + exp(log_sigma) * eps")),
    ]
    kl: Annotated[Array, float64_array(1), WithJsonSchema(nested_numbers(1, "KL(q(z|x) || N(0, I)) per row"))]
    seed: Seed = Field(description="The seed of eps; send it back to reproduce z exactly.")

    @model_validator(mode="after")
    def _samples_agree(self, info: ValidationInfo) -> VaeResponse:
        expected = info.context or {}
        if self.mu.shape != self.log_sigma.shape or self.z.shape[::2] != self.mu.shape:
            raise ValueError(f"shapes disagree: mu {self.mu.shape}, log_sigma {self.log_sigma.shape}, z {self.z.shape}")
        if "samples" in expected and self.z.shape[1] != expected["samples"]:
            raise ValueError(f"z has {self.z.shape[1]} samples per row, expected {expected['samples']}")
        return self


# The per-model routes take rows as wide as the model they name: the same bodies, documented without
# the default model's widths (service.api.spec writes those into the classes above only).
class AnyWidthAutoencoderRequest(AutoencoderRequest):
    """A batch of binary rows to encode, each as wide as the named model's input_dim."""


class AnyWidthVaeRequest(VaeRequest):
    """A batch of binary rows to encode with the VAE, each as wide as the named model's input_dim."""


class AnyWidthAutoencoderDecodeRequest(AutoencoderDecodeRequest):
    """Autoencoder codes to decode, each row as wide as the named model's latent_dim."""


class AnyWidthVaeDecodeRequest(VaeDecodeRequest):
    """VAE latents z to decode, each row as wide as the named model's latent_dim."""


class Limits(BaseModel):
    max_rows: int = Field(description="Most rows in one request.")
    max_samples: int = Field(description="Most VAE samples per row.")
    max_rows_x_samples: int = Field(description="Most z vectors (rows x samples) in one VAE response.")
    max_body_bytes: int = Field(description="Largest request body, in bytes.")


class ModelInfo(BaseModel):
    """What the service serves: dimensions, where the weights came from, and their fingerprint."""

    name: str = Field(description="The model's name: `default` without a model repository.")
    version: int = Field(description="The version answering: a version directory's number (1 without a repository).")
    description: str = Field(description="The model's description, from its config.json.")
    input_dim: int = Field(description="Width of an input row.")
    latent_dim: int = Field(description="Width of a code.")
    source: Literal["seed", "file"] = Field(
        description="Whether the weights were drawn from a seed or read from a file."
    )
    seed: int | None = Field(description="The seed of the weights, when drawn from one.")
    file: str | None = Field(description="The weights file's name, when read from one.")
    fingerprint: str = Field(description="sha256 over the arrays' float64 bytes; equal weights, equal fingerprint.")
    parameters: dict[str, list[int]] = Field(description="Shape of each array, by its name in a weights file.")
    decoders: bool = Field(description="Whether the weights have decoders, for the /decode routes.")
    loaded_at: datetime = Field(
        description="When this process loaded the weights: what it serves until it restarts, even if the file changes."
    )
    limits: Limits


class VersionState(BaseModel):
    version: int
    state: Literal["READY", "UNAVAILABLE"] = Field(description="READY: served; UNAVAILABLE: not, `reason` says why.")
    reason: str = Field(description="Why a version is not served, or why a reload of it failed.")
    input_dim: int | None = None
    latent_dim: int | None = None
    fingerprint: str | None = None
    loaded_at: datetime | None = None
    routes: dict[str, str] = Field(description="The URL of each of this version's routes, by kind/op.")


class ModelEntry(BaseModel):
    name: str
    description: str
    state: Literal["READY", "UNAVAILABLE"] = Field(description="READY when any version is served.")
    reason: str = Field(description="Why no version is served (unloaded, a bad config.json, ...).")
    routes: dict[str, str] = Field(description="The URL of each route of the model's highest ready version.")
    versions: list[VersionState]


class ModelList(BaseModel):
    """Every model the server knows, ready or not."""

    models: list[ModelEntry]


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready", "loading", "draining"]
    fingerprint: str | None = Field(default=None, description="The served model's fingerprint once it is loaded.")


class Problem(BaseModel):
    """A client error that is not about one field: too large, wrong content type, not ready."""

    detail: str


class FieldProblem(BaseModel):
    type: str = Field(description="What kind of mistake: missing, value_error, json_invalid, ...")
    loc: list[str | int] = Field(description='Where: ["body", "inputs", row, column] and the like.')
    msg: str = Field(description="What is wrong, in words.")


class ValidationProblem(BaseModel):
    """A request body that is not what the route takes: each mistake with where it is."""

    detail: list[FieldProblem]
