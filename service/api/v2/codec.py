"""The Open Inference Protocol (KServe v2) codec: requests to arrays, arrays to responses. No HTTP.

Tensors travel as JSON (`data`, flat or nested, row-major) or, with Triton's binary tensor data
extension, as raw little-endian bytes after the JSON header, whose length the
`Inference-Header-Content-Length` header gives (`binary_data_size` per tensor).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service import __version__
from service.core.inference import SEED_LIMIT, Core, Encoded, Expired, Served, shown
from service.models.encoders import Batch
from service.models.kinds import Kind

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
INPUT_NAME = "input"


class ProtocolError(Exception):
    """A request the protocol cannot serve: 400 by default, 404 for an unknown model."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class RequestInput(BaseModel):
    # Fields the protocol's clients add (KServe's SDK: model_name, id) or that a later version of
    # the protocol defines are ignored, as KServe's own servers do; what is here is checked.
    model_config = ConfigDict(extra="ignore")

    name: str = Field(json_schema_extra={"enum": [INPUT_NAME]}, description="The model's one input.")
    shape: list[int] = Field(description="[rows, input_dim]")
    datatype: Literal["BOOL", "UINT8", "INT8", "INT32", "INT64", "FP32", "FP64"]
    parameters: dict[str, Any] | None = Field(default=None, description="binary_data_size for binary data")
    data: list[Any] | None = Field(default=None, description="Row-major values, flat or nested; each 0 or 1.")


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    parameters: dict[str, Any] | None = Field(
        default=None, description='binary_data: true for raw bytes; datatype: "FP32" or "FP64" (the default)'
    )


class InferenceRequest(BaseModel):
    """An Open Inference Protocol request: one input tensor of 0/1 values, shape [rows, input_dim]."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "examples": [
                {
                    "id": "42",
                    "parameters": {"seed": 42, "samples": 2},
                    "inputs": [
                        {"name": "input", "shape": [2, 5], "datatype": "INT32", "data": [0, 1, 1, 0, 1, 1, 0, 0, 1, 0]}
                    ],
                }
            ]
        },
    )

    id: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None,
        description="seed and samples for the VAE; binary_data_output: true for raw outputs; "
        'output_datatype: "FP32" for 32-bit outputs',
    )
    inputs: list[RequestInput] = Field(min_length=1, max_length=1)
    outputs: list[RequestOutput] | None = None


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


SERVER_METADATA = ServerMetadata(name="encoding-service", version=__version__, extensions=["binary_tensor_data"])


class ErrorResponse(BaseModel):
    error: str


class ResponseOutput(BaseModel):
    name: str
    datatype: Literal["FP32", "FP64"]
    shape: list[int]
    data: list[float] | None = Field(default=None, description="Row-major values (absent when sent as binary).")
    parameters: dict[str, Any] | None = Field(default=None, description="binary_data_size when sent as binary")


class InferenceResponse(BaseModel):
    """The outputs asked for (all by default), FP64 unless FP32 was asked for; the VAE's seed in parameters."""

    model_name: str
    model_version: str
    id: str = Field(description="The request's id, or a new one when it sent none.")
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


@dataclass
class Decoded:
    """What a request asks for: the bit matrix, outputs by name with binary and dtype, parameters."""

    x: Batch
    parameters: dict[str, Any]
    outputs: dict[str, tuple[bool, str]] = field(default_factory=dict)
    id: str | None = None


def model_metadata(core: Core, served: Served, name: str, kinds: tuple[Kind, ...]) -> ModelMetadata:
    """The protocol's model metadata of the model `name` stands for (Core.target): one input,
    [rows, input_dim], each output's shape, and the model's ready versions."""
    versions = [str(s.version) for s in core.repository.serving[served.name]]
    shapes = {out: shape for kind in kinds for out, shape in kind.shapes(served.model.latent_dim).items()}
    return ModelMetadata(
        name=name,
        versions=versions,
        platform="numpy",
        inputs=[MetadataTensor(name=INPUT_NAME, datatype="FP64", shape=[-1, served.model.input_dim])],
        outputs=[MetadataTensor(name=out, datatype="FP64", shape=shape) for out, shape in shapes.items()],
    )


def infer(
    core: Core, served: Served, kinds: tuple[Kind, ...], decoded: Decoded, expired: Expired | None = None
) -> Encoded:
    """Compute what a decoded request asks for: only the kinds of the outputs it wants; the VAE's
    `samples` and `seed` from its parameters. The same for REST and gRPC (whose calls' deadlines
    are `expired`: Core.encode)."""
    wanted = tuple(kind for kind in kinds if set(kind.outputs) & set(decoded.outputs))
    sampled = any(kind.sampled for kind in wanted)
    samples = integer_parameter(decoded.parameters, "samples", 1, 1, None) if sampled else 1
    seed = integer_parameter(decoded.parameters, "seed", None, 0, SEED_LIMIT - 1) if sampled else None
    return core.encode(served, wanted, decoded.x, samples, seed, expired)


def decode(body: bytes, header_length: str | None, model: str, input_dim: int, outputs: tuple[str, ...]) -> Decoded:
    """An inference request's body (JSON, then binary tensors if header_length is given) as arrays."""
    try:
        json_length = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise ProtocolError(f"Inference-Header-Content-Length is not a number: {str(header_length)[:20]!r}") from None
    if not body and header_length is None:
        raise ProtocolError('the body is empty: an inference request is a JSON object with "inputs"')
    if not 0 < json_length <= len(body):
        raise ProtocolError(f"Inference-Header-Content-Length {json_length} does not fit a body of {len(body)} bytes")
    try:
        request = InferenceRequest.model_validate(orjson.loads(body[:json_length]))
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"invalid JSON at character {exc.pos}: {exc.msg}") from None
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise ProtocolError(f"{where}: {first['msg']}" if where else first["msg"]) from None
    binary = memoryview(body)[json_length:]
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise ProtocolError(f"unknown input {shown(tensor.name)}; model {shown(model)} takes one input, {INPUT_NAME!r}")
    x, used = _tensor(tensor, binary, input_dim)
    if used != len(binary):
        raise ProtocolError(f"the body holds {len(binary) - used} bytes after the tensors it declares")
    parameters = request.parameters or {}
    return Decoded(x=x, parameters=parameters, outputs=_outputs(request, model, outputs, parameters), id=request.id)


def _tensor(tensor: RequestInput, binary: memoryview, input_dim: int) -> tuple[Batch, int]:
    """The input as a (rows, input_dim) array of 0/1 values, and how many binary bytes it took."""
    if len(tensor.shape) != 2 or tensor.shape[1] != input_dim or tensor.shape[0] < 1:
        raise ProtocolError(
            f"input {INPUT_NAME!r} has shape {tensor.shape}, expected [rows, {input_dim}] with rows >= 1"
        )
    count = math.prod(tensor.shape)
    dtype = DATATYPES[tensor.datatype]
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is not None:
        if tensor.data is not None:
            raise ProtocolError(f"input {INPUT_NAME!r} has both data and binary_data_size")
        if isinstance(size, bool) or not isinstance(size, int) or size != count * dtype.itemsize:
            raise ProtocolError(
                f"input {INPUT_NAME!r}: binary_data_size is {size!r}, but {count} {tensor.datatype} values "
                f"take {count * dtype.itemsize} bytes"
            )
        if size > len(binary):
            raise ProtocolError(
                f"input {INPUT_NAME!r}: binary_data_size is {size}, but only {len(binary)} bytes follow"
            )
        values = np.frombuffer(binary[:size], dtype=dtype)
        used = size
    elif tensor.data is None:
        raise ProtocolError(f"input {INPUT_NAME!r} has neither data nor binary_data_size")
    else:
        values = _json_values(tensor.data, tensor.datatype)
        used = 0
    if values.size != count:
        raise ProtocolError(
            f"input {INPUT_NAME!r} holds {values.size} values, but its shape {tensor.shape} needs {count}"
        )
    if dtype.kind != "b" or size is not None:  # BOOL in binary: bytes, of which only 0 and 1 are bits
        check_bits(values.view(np.uint8) if dtype.kind == "b" else values, input_dim)
    return values.reshape(tensor.shape), used


FEW = 64
BITS = frozenset((0, 1))


def check_bits(values: npt.NDArray[Any], input_dim: int) -> None:
    """ProtocolError naming the row and column of the first value that is not 0 or 1."""
    if values.size <= FEW:  # a row or two: Python's set is several times faster than numpy's passes
        if set(values.tolist()) <= BITS:
            return
    elif values.dtype.kind in "iu" and not np.right_shift(values, 1).any():  # integers: one pass, no copy
        return
    bad = np.flatnonzero((values != 0) & (values != 1))
    if bad.size:
        row, column = divmod(int(bad[0]), input_dim)
        raise ProtocolError(f"input {INPUT_NAME!r}: row {row}, column {column}: expected 0 or 1, got {values[bad[0]]}")


def _json_values(data: list[Any], datatype: str) -> npt.NDArray[Any]:
    try:
        values = np.array(data).ravel()
    except (ValueError, TypeError, OverflowError):
        raise ProtocolError(f"input {INPUT_NAME!r}: data is not a regular array of numbers") from None
    expected = "b" if datatype == "BOOL" else "biuf"
    if values.size and values.dtype.kind not in expected:
        wanted = "true or false" if datatype == "BOOL" else "numbers"
        raise ProtocolError(f"input {INPUT_NAME!r}: {datatype} data must be {wanted}")
    if datatype != "BOOL" and values.dtype.kind == "b":
        raise ProtocolError(f"input {INPUT_NAME!r}: {datatype} data must be numbers, not true or false")
    return values


def _outputs(
    request: InferenceRequest, model: str, names: tuple[str, ...], parameters: dict[str, Any]
) -> dict[str, tuple[bool, str]]:
    """The outputs to send: name -> (as binary, datatype)."""
    asked = None if request.outputs is None else [(out.name, out.parameters or {}) for out in request.outputs]
    return choose_outputs(asked, model, names, parameters)


def choose_outputs(
    asked: list[tuple[str, dict[str, Any]]] | None, model: str, names: tuple[str, ...], parameters: dict[str, Any]
) -> dict[str, tuple[bool, str]]:
    """The outputs to send, from those `asked` for (name and parameters; None: every one of
    `names`): name -> (as binary, datatype). Each protocol (REST, gRPC) reads the same options."""
    binary_default = parameters.get("binary_data_output") is True
    default_type = parameters.get("output_datatype", "FP64")
    if default_type not in ("FP32", "FP64"):
        raise ProtocolError(f'output_datatype must be "FP32" or "FP64", got {_shown(default_type)}')
    if asked is None:
        return {name: (binary_default, default_type) for name in names}
    chosen = {}
    for name, options in asked:
        if name not in names:
            raise ProtocolError(f"unknown output {shown(name)}; model {shown(model)} has {', '.join(names)}")
        datatype = options.get("datatype", default_type)
        if datatype not in ("FP32", "FP64"):
            raise ProtocolError(f'output {name!r}: datatype must be "FP32" or "FP64", got {_shown(datatype)}')
        chosen[name] = (options.get("binary_data", binary_default) is True, datatype)
    return chosen


def integer_parameter(parameters: dict[str, Any], key: str, default: int | None, low: int, high: int | None) -> Any:
    """The integer parameter `key` (a float that is an integer counts), within [low, high]."""
    value = parameters.get(key, default)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"{low} <= {key}" + (f" <= {high}" if high is not None else "")
        got = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise ProtocolError(f"parameter {key!r} must be an integer with {bound}, got {got}")
    return value


def response_id(request_id: str | None) -> str:
    """The response's id: the request's, or a new one (KServe's clients read one)."""
    return request_id if request_id is not None else str(uuid.uuid4())


def _shown(value: Any) -> str:
    """A client's value of any type, for a message: cut as `shown` cuts a string."""
    if isinstance(value, str):
        return shown(value)
    text = repr(value)
    return text if len(text) <= 64 else text[:64] + "..."


def output_array(arrays: dict[str, Any], name: str, datatype: str) -> npt.NDArray[Any]:
    """The output `name` as contiguous values of `datatype` (FP32 or FP64), checked finite."""
    value = np.ascontiguousarray(arrays[name], dtype=DATATYPES[datatype])
    if not np.isfinite(value).all():
        raise ValueError(f"output {name!r} holds a non-finite number")  # proven impossible at load time
    return value


def encode(
    model: str, version: str, decoded: Decoded, arrays: dict[str, Any], parameters: dict[str, Any] | None = None
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, then the binary outputs in order if any."""
    outputs, chunks = [], []
    for name, (binary, datatype) in decoded.outputs.items():
        value = output_array(arrays, name, datatype)
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": list(value.shape)}
        if binary:
            raw = value.tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = value.ravel()
        outputs.append(tensor)
    response: dict[str, Any] = {
        "model_name": model,
        "model_version": version,
        "id": response_id(decoded.id),
        "outputs": outputs,
    }
    if parameters:
        response["parameters"] = parameters
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return header, {"content-type": "application/json"}
    headers = {"content-type": "application/octet-stream", "inference-header-content-length": str(len(header))}
    return b"".join([header, *chunks]), headers
