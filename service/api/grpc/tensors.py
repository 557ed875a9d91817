"""ModelInferRequest to arrays, arrays to ModelInferResponse: the protocol's codec
(service.api.v2.codec) for gRPC's messages. No gRPC here, only its messages.

A tensor travels as typed `contents` (the field of its datatype) or as raw little-endian bytes in
`raw_input_contents` (what tritonclient.grpc sends). Outputs come back the way the input came:
raw in `raw_output_contents` for raw input, typed contents otherwise; all of them raw when the
request asks for any as binary (`binary_data_output`, or `binary_data` on an output, as on REST),
since the protocol allows no mix.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from service.api.grpc import inference_pb2 as pb
from service.api.v2 import codec as oip
from service.api.v2.codec import DATATYPES, INPUT_NAME, ProtocolError
from service.core.inference import shown

# The typed field each input datatype travels in, and the type the protocol gives that field.
CONTENTS: dict[str, tuple[str, np.dtype[Any]]] = {
    "BOOL": ("bool_contents", np.dtype(np.bool_)),
    "UINT8": ("uint_contents", np.dtype(np.uint32)),
    "INT8": ("int_contents", np.dtype(np.int32)),
    "INT32": ("int_contents", np.dtype(np.int32)),
    "INT64": ("int64_contents", np.dtype(np.int64)),
    "FP32": ("fp32_contents", np.dtype(np.float32)),
    "FP64": ("fp64_contents", np.dtype(np.float64)),
}
OUTPUT_CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents"}


def parameters(message: Any) -> dict[str, Any]:
    """A message's `parameters` map (InferParameter values) as plain Python values."""
    values = {}
    for key, parameter in message.parameters.items():
        choice = parameter.WhichOneof("parameter_choice")
        values[key] = getattr(parameter, choice) if choice is not None else None
    return values


def decode(request: Any, model: str, input_dim: int, outputs: tuple[str, ...]) -> tuple[oip.Decoded, bool]:
    """The request's bit matrix, parameters and outputs (as REST's codec has them), and whether
    its input came raw."""
    if len(request.inputs) != 1:
        raise ProtocolError(
            f"model {shown(model)} takes one input, {INPUT_NAME!r}; the request has {len(request.inputs)}"
        )
    tensor = request.inputs[0]
    if tensor.name != INPUT_NAME:
        raise ProtocolError(f"unknown input {shown(tensor.name)}; model {shown(model)} takes one input, {INPUT_NAME!r}")
    if tensor.datatype not in DATATYPES:
        raise ProtocolError(
            f"input {INPUT_NAME!r}: datatype {shown(tensor.datatype)} is not one of {', '.join(DATATYPES)}"
        )
    shape = list(tensor.shape)
    if len(shape) != 2 or shape[1] != input_dim or shape[0] < 1:
        raise ProtocolError(f"input {INPUT_NAME!r} has shape {shape}, expected [rows, {input_dim}] with rows >= 1")
    raw = len(request.raw_input_contents) > 0
    values = _raw(request, tensor, math.prod(shape)) if raw else _typed(tensor, math.prod(shape))
    if values.dtype.kind != "b" or raw:  # BOOL as raw bytes: only 0 and 1 are bits
        oip.check_bits(values.view(np.uint8) if values.dtype.kind == "b" else values, input_dim)
    options = parameters(request)
    asked = [(out.name, parameters(out)) for out in request.outputs] or None
    chosen = oip.choose_outputs(asked, model, outputs, options)
    decoded = oip.Decoded(x=values.reshape(shape), parameters=options, outputs=chosen, id=request.id or None)
    return decoded, raw


def _raw(request: Any, tensor: Any, count: int) -> npt.NDArray[Any]:
    if len(request.raw_input_contents) != 1:
        raise ProtocolError(
            f"raw_input_contents holds {len(request.raw_input_contents)} tensors; the request has 1 input"
        )
    if tensor.HasField("contents"):
        raise ProtocolError(f"input {INPUT_NAME!r} has both contents and raw_input_contents")
    dtype = DATATYPES[tensor.datatype]
    data = request.raw_input_contents[0]
    if len(data) != count * dtype.itemsize:
        raise ProtocolError(
            f"input {INPUT_NAME!r}: raw_input_contents holds {len(data)} bytes, but {count} {tensor.datatype} "
            f"values take {count * dtype.itemsize}"
        )
    return np.frombuffer(data, dtype=dtype)


def _typed(tensor: Any, count: int) -> npt.NDArray[Any]:
    field, dtype = CONTENTS[tensor.datatype]
    values = np.array(getattr(tensor.contents, field), dtype=dtype)
    if values.size != count:
        shape = list(tensor.shape)
        raise ProtocolError(
            f"input {INPUT_NAME!r} holds {values.size} values in {field}, but its shape {shape} needs {count}"
        )
    return values


def encode(model: str, version: str, decoded: oip.Decoded, arrays: dict[str, Any], seed: int | None, raw: bool) -> Any:
    """The ModelInferResponse: each output asked for, raw or typed (see the module's docstring)."""
    response = pb.ModelInferResponse(model_name=model, model_version=version, id=oip.response_id(decoded.id))
    if seed is not None:
        response.parameters["seed"].int64_param = seed
    raw = raw or any(binary for binary, _ in decoded.outputs.values())  # all raw, or none: the protocol's rule
    for name, (_, datatype) in decoded.outputs.items():
        value = oip.output_array(arrays, name, datatype)
        tensor = response.outputs.add(name=name, datatype=datatype, shape=value.shape)
        if raw:
            response.raw_output_contents.append(value.tobytes())
        else:
            getattr(tensor.contents, OUTPUT_CONTENTS[datatype]).extend(value.ravel().tolist())
    return response
