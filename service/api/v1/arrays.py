"""Responses that hold numpy arrays: checked for shape and finiteness in one pass, written as JSON by
orjson without lists of lists, or as safetensors (ArrayModel.render)."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    PlainValidator,
    ValidationInfo,
    model_validator,
)

from service.models.encoders import Array
from service.models.weights import safetensors

SAFETENSORS = b"application/x-safetensors"


def nested_numbers(ndim: int, description: str) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "number"}
    for _ in range(ndim):
        schema = {"type": "array", "items": schema}
    return schema | {"description": description}


def float64_array(ndim: int) -> Any:
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
