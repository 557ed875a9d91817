"""Binary input rows: validated a row at a time in C, never value by value in Python (parse_bits), and
walked value by value only to say where (row, column) when something is wrong; packed rows too."""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from pydantic import (
    PlainValidator,
    WithJsonSchema,
)
from pydantic_core import PydanticCustomError

from service.core.inference import shown
from service.models.encoders import Batch

# Batches of more values than this are read as bytes (parse_bits); smaller ones by a set test a row.
# Measured: a 1 x 5 batch takes 1.4 us by the set test and 1.8 as bytes; 4 x 5, 2.6 and 2.3;
# 100 x 5, 36 and 17; and a float64 matrix spares the model a conversion, which a row or two feel.
SMALL_BATCH = 16


def kind_of(value: Any) -> str:
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


def bit_error(message: str, *where: int) -> PydanticCustomError:
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
        raise bit_error(f"expected an array of rows, got {kind_of(value)}")
    if not value:
        raise bit_error("expected at least one row, got an empty array")
    width = len(value[0]) if type(value[0]) is list else 0
    if not width:
        raise explain(value)
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
    raise explain(value)


def explain(
    rows: list[Any], valid: Callable[[Any], bool] = _is_bit, values: str = "0/1 values", value: str = "0 or 1"
) -> PydanticCustomError:
    """The first thing wrong with rows that failed the fast check, as an error naming where it is."""
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            return bit_error(f"row {i}: expected an array of {values}, got {kind_of(row)}", i)
        if not row:
            return bit_error(f"row {i}: expected {values}, got an empty array", i)
        for j, item in enumerate(row):
            if not valid(item):
                return bit_error(f"row {i}, column {j}: expected {value}, got {kind_of(item)}", i, j)
    width = len(rows[0])
    for i, row in enumerate(rows):
        if len(row) != width:
            return bit_error(f"row {i}: has {len(row)} values, but row 0 has {width}", i)
    return bit_error(f"expected an array of rows of {values}")  # pragma: no cover - the fast check agrees


# One type per branch: code generators cannot read an enum that mixes integers and booleans.
_BIT_SCHEMA = {
    "anyOf": [{"type": "integer", "enum": [0, 1]}, {"type": "boolean"}],
    "description": "0 or 1 (the booleans false and true count too)",
}


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
        "width": {
            "type": "integer",
            "minimum": 1,
            "description": (
                "Bits a row: when given, it must be the model's input_dim. A byte count cannot tell "
                "780-bit rows from 784-bit ones; send it, and such a batch is refused, not encoded."
            ),
        },
    },
    "required": ["packed"],
    "additionalProperties": False,
}


class PackedError(ValueError):
    """Packed rows that do not fit the model, and the field that says so (packed or width)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class Packed:
    """Rows packed eight bits a byte, as `numpy.packbits(x, axis=1)` writes them: the first value
    of a row is the most significant bit of its first byte, and each row is padded to a whole
    byte (the padding bits are ignored). How many rows, and their width, follow from the model."""

    data: bytes
    width: int | None = None  # bits a row, as the client says (optional)

    def rows(self, width: int) -> int:
        """How many rows of `width` bits the bytes hold; PackedError if the client's width is
        another, or the bytes are not a whole number of rows."""
        if self.width is not None and self.width != width:
            raise PackedError("width", f"rows of {self.width} bits were sent, but the model's rows are {width} bits")
        per_row = (width + 7) // 8
        if not self.data:
            raise PackedError("packed", f"holds no bytes: a batch is at least one row of {width} bits")
        if len(self.data) % per_row:
            raise PackedError(
                "packed",
                f"holds {len(self.data)} bytes, not a whole number of rows of {width} bits "
                f"({per_row} byte{'s' * (per_row > 1)} each)",
            )
        return len(self.data) // per_row

    def unpack(self, width: int) -> Batch:
        """The (rows, width) uint8 matrix of 0/1 values."""
        packed = np.frombuffer(self.data, dtype=np.uint8).reshape(self.rows(width), -1)
        return np.unpackbits(packed, axis=1, count=width)


def parse_packed(value: dict[str, Any]) -> Packed:
    extra = sorted(set(value) - {"packed", "width"})
    if extra:
        raise PydanticCustomError("packed", f"unexpected field {shown(extra[0])} next to packed", {"where": []})
    width = value.get("width")
    if "width" in value and (isinstance(width, bool) or not isinstance(width, int) or width < 1):
        raise PydanticCustomError("packed", "expected a whole number of bits a row, at least 1", {"where": ["width"]})
    data = value.get("packed")
    if not isinstance(data, str):
        raise PydanticCustomError("packed", f"expected a base64 string, got {kind_of(data)}", {"where": ["packed"]})
    try:
        return Packed(base64.b64decode(data, validate=True), width)
    except binascii.Error as exc:
        raise PydanticCustomError("packed", f"not valid base64 ({exc})", {"where": ["packed"]}) from None


def parse_inputs(value: Any) -> Batch | Packed:
    """Either form of a batch: an array of rows of 0/1 values, or {"packed": base64 of the packed rows}."""
    return parse_packed(value) if isinstance(value, dict) else parse_bits(value)


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
