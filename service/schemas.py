"""Request and response models.

Bit matrices are validated a row at a time in C, never value by value in Python (parse_bits),
and walked value by value only to say where, when something is wrong. Responses hold numpy
arrays, are checked for shape and finiteness in one pass, and are written by orjson without
lists of lists.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import orjson
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

from service.model import DECODE_LIMIT, Array, Batch
from service.weights import safetensors

SEED_LIMIT = 2**63
SAFETENSORS = b"application/x-safetensors"
# Batches of more values than this are read as bytes (parse_bits); smaller ones by a set test a row.
# Measured: a 1 x 5 batch takes 1.4 us by the set test and 1.8 as bytes; 4 x 5, 2.6 and 2.3;
# 100 x 5, 36 and 17; and a float64 matrix spares the model a conversion, which a row or two feel.
SMALL_BATCH = 16


def _describe(value: Any) -> str:
    """A short, JSON-safe description of a client's value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**15 else "an integer that is neither 0 nor 1"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else "a non-finite number"
    kinds: dict[type, str] = {str: "a string", list: "an array", dict: "an object"}
    return kinds.get(type(value), type(value).__name__)


BITS = frozenset((0, 1))


def _is_bit(value: Any) -> bool:
    # JSON booleans, and the numbers 0 and 1 (JSON Schema counts 1.0 as the number 1).
    return value is True or value is False or (type(value) in (int, float) and value in (0, 1))


def _bit_error(message: str, *where: int) -> PydanticCustomError:
    """A validation error whose location gains the row (and column) it names."""
    return PydanticCustomError("bits", message, {"where": list(where)})


def parse_bits(value: Any) -> Batch:
    """A JSON array of rows of 0/1 values -> (n, d) matrix of them, or an error naming row and column.

    Batches of integers and booleans (what JSON clients send) become bytes, one C call a row:
    bytes() takes each value as a byte and refuses anything but an integer from 0 to 255, and one
    translate() finds any byte other than 0 and 1. Everything else (a few values, or floats such
    as 1.0) gets a set test a row, in C: 0, 1, 0.0, 1.0, false and true are each equal to 0 or 1.
    Either costs a fraction of numpy's type inference over the same values.
    """
    if not isinstance(value, list):
        raise _bit_error(f"expected an array of rows, got {_describe(value)}")
    if not value:
        raise _bit_error("expected at least one row, got an empty array")
    width = len(value[0]) if type(value[0]) is list else 0
    if not width:
        raise _explain(value)
    if len(value) * width > SMALL_BATCH and all(type(row) is list for row in value):  # bytes(3) is 3 zeros
        try:
            data = b"".join(map(bytes, value))
        except (TypeError, ValueError):
            pass  # floats, or a value that is wrong: the set test below
        else:
            if not data.translate(None, b"\x00\x01") and set(map(len, value)) == {width}:
                return np.frombuffer(data, dtype=np.uint8).reshape(len(value), width)
    try:  # a row that is no array fails too: no string or object holds only the numbers 0 and 1
        fits = all(len(row) == width and BITS.issuperset(row) for row in value)
    except TypeError:  # a number where a row should be, or an array or an object where a bit should be
        fits = False
    if fits:
        return np.array(value, dtype=np.float64)
    raise _explain(value)


def _explain(
    rows: list[Any], valid: Callable[[Any], bool] = _is_bit, values: str = "0/1 values", value: str = "0 or 1"
) -> PydanticCustomError:
    """The first thing wrong with rows that failed the fast check, as an error naming where it is."""
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            return _bit_error(f"row {i}: expected an array of {values}, got {_describe(row)}", i)
        if not row:
            return _bit_error(f"row {i}: expected {values}, got an empty array", i)
        for j, item in enumerate(row):
            if not valid(item):
                return _bit_error(f"row {i}, column {j}: expected {value}, got {_describe(item)}", i, j)
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            return _bit_error(f"row {i}: has {len(row)} values, but row 0 has {width}", i)
    return _bit_error(f"expected an array of rows of {values}")  # pragma: no cover - the fast check agrees


def _json_int(value: Any) -> Any:
    """Integers as JSON Schema counts them: 3 and 3.0, but not "3" and not true."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("int_type", "expected an integer, got {kind}", {"kind": _describe(value)})
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

# One type per branch: code generators cannot read an enum that mixes integers and booleans.
_BIT_SCHEMA = {
    "anyOf": [{"type": "integer", "enum": [0, 1]}, {"type": "boolean"}],
    "description": "0 or 1 (the booleans false and true count too)",
}


@dataclass(frozen=True)
class Packed:
    """Rows packed eight bits a byte, as `numpy.packbits(x, axis=1)` writes them: the first value
    of a row is the most significant bit of its first byte, and each row is padded to a whole
    byte (the padding bits are ignored). How many rows, and their width, follow from the model."""

    data: bytes

    def rows(self, width: int) -> int:
        """How many rows of `width` bits the bytes hold; ValueError if not a whole number of them."""
        per_row = (width + 7) // 8
        if not self.data or len(self.data) % per_row:
            raise ValueError(
                f"holds {len(self.data)} bytes, not a whole number of rows of {width} bits ({per_row} bytes each)"
            )
        return len(self.data) // per_row

    def unpack(self, width: int) -> Batch:
        """The (rows, width) uint8 matrix of 0/1 values."""
        packed = np.frombuffer(self.data, dtype=np.uint8).reshape(self.rows(width), -1)
        return np.unpackbits(packed, axis=1, count=width)


def parse_packed(value: dict[str, Any]) -> Packed:
    extra = sorted(set(value) - {"packed"})
    if extra:
        raise PydanticCustomError("packed", f"unexpected field {extra[0]!r} next to packed", {"where": []})
    data = value.get("packed")
    if not isinstance(data, str):
        raise PydanticCustomError("packed", f"expected a base64 string, got {_describe(data)}", {"where": ["packed"]})
    try:
        return Packed(base64.b64decode(data, validate=True))
    except binascii.Error as exc:
        raise PydanticCustomError("packed", f"not valid base64 ({exc})", {"where": ["packed"]}) from None


def parse_inputs(value: Any) -> Batch | Packed:
    """Either form of a batch: an array of rows of 0/1 values, or {"packed": base64 of the packed rows}."""
    return parse_packed(value) if isinstance(value, dict) else parse_bits(value)


PACKED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Packed rows",
    "description": (
        "Rows packed eight bits a byte as `numpy.packbits(x, axis=1)` writes them, base64 encoded: "
        "the first value of a row is the most significant bit of its first byte, and each row is "
        "padded to a whole byte (the padding bits are ignored), so a row takes ceil(input_dim / 8) "
        "bytes and the number of rows follows from the length."
    ),
    "properties": {
        "packed": {"type": "string", "contentEncoding": "base64", "description": "rows x ceil(input_dim / 8) bytes"},
    },
    "required": ["packed"],
    "additionalProperties": False,
}

Inputs = Annotated[
    Batch | Packed,
    PlainValidator(parse_inputs),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "array",
                    "title": "Rows",
                    "minItems": 1,
                    "items": {"type": "array", "minItems": 1, "items": _BIT_SCHEMA},
                    "description": "Rows of 0/1 values, each row as wide as the model's input_dim.",
                },
                PACKED_SCHEMA,
            ],
            "description": "The batch: rows of 0/1 values, or the same rows packed eight bits a byte.",
        }
    ),
]


def _nested_numbers(ndim: int, description: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number"}
    for _ in range(ndim):
        schema = {"type": "array", "items": schema}
    return schema | {"description": description}


def _float64(ndim: int) -> Any:
    def check(value: Any) -> Array:
        if not isinstance(value, np.ndarray) or value.ndim != ndim or value.dtype != np.float64:
            raise ValueError(f"expected a float64 array with {ndim} dimensions")
        return value

    return PlainValidator(check)


class NonFiniteOutput(ValueError):
    """A response held NaN or infinity: a bug, since the weights were proven bounded at load time."""


class ArrayModel(BaseModel):
    """A response that holds numpy arrays and writes itself as JSON in one orjson pass."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    MEDIA_TYPES: ClassVar[tuple[bytes, ...]] = (b"application/json", SAFETENSORS)

    def render(self, media_type: bytes) -> bytes:
        return self.to_safetensors() if media_type == SAFETENSORS else self.to_json()

    def to_safetensors(self) -> bytes:
        """The arrays as float64 little-endian in a safetensors file; other fields in its metadata."""
        arrays = {name: value for name, value in self.__dict__.items() if isinstance(value, np.ndarray)}
        for name, value in arrays.items():
            if not np.isfinite(value).all():
                raise NonFiniteOutput(f"{type(self).__name__}.{name} holds a non-finite number")
        metadata = {name: str(value) for name, value in self.__dict__.items() if name not in arrays}
        data: bytes = safetensors().save(arrays, metadata=metadata or None)
        return data

    def to_json(self) -> bytes:
        """The JSON text, checked for finiteness in the same pass: orjson writes NaN and infinity as
        null, and no field of an array response is ever null otherwise."""
        text = orjson.dumps(self.__dict__, option=orjson.OPT_SERIALIZE_NUMPY)
        # A one-byte search runs at memory speed; the four-byte one only if an "n" turns up at all.
        if b"n" in text and b"null" in text:
            raise NonFiniteOutput(f"{type(self).__name__} holds a non-finite number")
        return text

    @model_validator(mode="after")
    def _rows_agree(self, info: ValidationInfo) -> ArrayModel:
        """Every array has one entry per input row, and as many samples as asked (from the context)."""
        expected = info.context or {}
        for name, value in self.__dict__.items():
            if isinstance(value, np.ndarray):
                if "rows" in expected and value.shape[0] != expected["rows"]:
                    raise ValueError(f"{name} has {value.shape[0]} rows, expected {expected['rows']}")
                if value.ndim >= 2 and "latent_dim" in expected and value.shape[-1] != expected["latent_dim"]:
                    raise ValueError(f"{name} has width {value.shape[-1]}, expected {expected['latent_dim']}")
        return self


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
        raise _bit_error(f"expected an array of rows, got {_describe(value)}")
    if not value:
        raise _bit_error("expected at least one row, got an empty array")
    width = len(value[0]) if isinstance(value[0], list) else 0
    if width and all(type(row) is list and len(row) == width and all(map(_is_latent, row)) for row in value):
        return np.array(value, dtype=np.float64)
    raise _explain(value, _is_latent, "numbers", f"a number within +-{DECODE_LIMIT:g}")


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
        Array, _float64(2), WithJsonSchema(_nested_numbers(2, "rows x input_dim probabilities in [0, 1]"))
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

    codes: Annotated[Array, _float64(2), WithJsonSchema(_nested_numbers(2, "rows x latent_dim codes, all >= 0"))]


class VaeResponse(ArrayModel):
    """VAE posterior parameters, samples of z, and the KL divergence to N(0, I), per input row."""

    mu: Annotated[Array, _float64(2), WithJsonSchema(_nested_numbers(2, "rows x latent_dim means"))]
    log_sigma: Annotated[
        Array, _float64(2), WithJsonSchema(_nested_numbers(2, "rows x latent_dim log standard deviations"))
    ]
    z: Annotated[
        Array,
        _float64(3),
        WithJsonSchema(_nested_numbers(3, "rows x samples x latent_dim samples, z = mu + exp(log_sigma) * eps")),
    ]
    kl: Annotated[Array, _float64(1), WithJsonSchema(_nested_numbers(1, "KL(q(z|x) || N(0, I)) per row"))]
    seed: Seed = Field(description="The seed of eps; send it back to reproduce z exactly.")

    @model_validator(mode="after")
    def _samples_agree(self, info: ValidationInfo) -> VaeResponse:
        expected = info.context or {}
        if self.mu.shape != self.log_sigma.shape or self.z.shape[::2] != self.mu.shape:
            raise ValueError(f"shapes disagree: mu {self.mu.shape}, log_sigma {self.log_sigma.shape}, z {self.z.shape}")
        if "samples" in expected and self.z.shape[1] != expected["samples"]:
            raise ValueError(f"z has {self.z.shape[1]} samples per row, expected {expected['samples']}")
        return self


class Limits(BaseModel):
    max_rows: int = Field(description="Most rows in one request.")
    max_samples: int = Field(description="Most VAE samples per row.")
    max_rows_x_samples: int = Field(description="Most z vectors (rows x samples) in one VAE response.")
    max_body_bytes: int = Field(description="Largest request body, in bytes.")


class ModelInfo(BaseModel):
    """What the service serves: dimensions, where the weights came from, and their fingerprint."""

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
