"""service/api/v2/codec.py on its own: the Open Inference Protocol codec, JSON and binary tensors, against
hand-built bodies (the end-to-end tests with real clients are in test_v2.py and test_clients.py)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from service.api.v2 import codec as oip
from service.models.kinds import AUTOENCODER, VAE

ROWS = np.array([[0, 1, 1, 0, 1], [1, 0, 0, 1, 0]])


def _json(**fields: Any) -> bytes:
    tensor = {"name": "input", "shape": [2, 5], "datatype": "INT32", "data": ROWS.ravel().tolist()}
    return json.dumps({"inputs": [tensor | fields]}).encode()


def _binary(rows: np.ndarray, datatype: str, **request: Any) -> tuple[bytes, str]:
    raw = rows.astype(oip.DATATYPES[datatype]).tobytes()
    tensor = {
        "name": "input",
        "shape": list(rows.shape),
        "datatype": datatype,
        "parameters": {"binary_data_size": len(raw)},
    }
    header = json.dumps({"inputs": [tensor], **request}).encode()
    return header + raw, str(len(header))


def test_json_and_binary_requests_decode_to_the_same_rows() -> None:
    from_json = oip.decode(_json(), None, "vae", 5, VAE.outputs)
    np.testing.assert_array_equal(from_json.x, ROWS)
    for datatype in ("BOOL", "UINT8", "INT8", "INT32", "INT64", "FP32", "FP64"):
        body, length = _binary(ROWS, datatype)
        np.testing.assert_array_equal(oip.decode(body, length, "vae", 5, VAE.outputs).x.astype(int), ROWS)


@given(hnp.arrays(np.uint8, st.tuples(st.integers(1, 6), st.just(5)), elements=st.integers(0, 1)))
def test_any_binary_batch_round_trips(rows: np.ndarray) -> None:
    body, length = _binary(rows, "UINT8", id="r-1")
    decoded = oip.decode(body, length, "autoencoder", 5, AUTOENCODER.outputs)
    np.testing.assert_array_equal(decoded.x, rows)
    assert decoded.id == "r-1"


def test_unknown_fields_are_ignored_and_the_id_is_kept() -> None:
    body = json.loads(_json(extra=1))
    body |= {"model_name": "vae", "id": "abc", "whatever": {"x": 1}}
    decoded = oip.decode(json.dumps(body).encode(), None, "vae", 5, VAE.outputs)
    assert decoded.id == "abc"


@pytest.mark.parametrize(
    ("body", "length", "message"),
    [
        (b"{", None, "invalid JSON at character"),
        (_json(shape=[2, 4]), None, "expected [rows, 5]"),
        (_json(data=[0, 1, 2, 0, 1, 1, 0, 0, 1, 0]), None, "row 0, column 2: expected 0 or 1"),
        (_json(datatype="FP16"), None, "datatype"),
        (_json(name="x"), None, "unknown input 'x'"),
        (_json(data=[0, 1]), None, "holds 2 values"),
        (_json(), "x", "is not a number"),
        (_json(), "99999", "does not fit a body"),
    ],
)
def test_bad_requests_say_what_is_wrong(body: bytes, length: str | None, message: str) -> None:
    with pytest.raises(oip.ProtocolError, match=message.replace("[", r"\[").replace("]", r"\]")):
        oip.decode(body, length, "vae", 5, VAE.outputs)


def test_binary_sizes_are_checked() -> None:
    body, length = _binary(ROWS, "UINT8")
    with pytest.raises(oip.ProtocolError, match="bytes after the tensors"):
        oip.decode(body + b"\0", length, "vae", 5, VAE.outputs)
    with pytest.raises(oip.ProtocolError, match="only 9 bytes follow"):
        oip.decode(body[:-1], length, "vae", 5, VAE.outputs)


def test_encode_writes_json_or_binary_outputs_with_an_id() -> None:
    arrays = {"codes": np.array([[0.5, 1.25], [0.0, 2.0]])}
    plain = oip.decode(
        json.dumps({**json.loads(_json()), "id": "q"}).encode(), None, "autoencoder", 5, AUTOENCODER.outputs
    )
    body, headers = oip.encode("autoencoder", "1", plain, arrays)
    answer = json.loads(body)
    assert headers == {"content-type": "application/json"}
    assert answer["id"] == "q"
    assert answer["outputs"] == [{"name": "codes", "datatype": "FP64", "shape": [2, 2], "data": [0.5, 1.25, 0.0, 2.0]}]
    binary = oip.decode(
        json.dumps(
            {**json.loads(_json()), "parameters": {"binary_data_output": True, "output_datatype": "FP32"}}
        ).encode(),
        None,
        "autoencoder",
        5,
        AUTOENCODER.outputs,
    )
    body, headers = oip.encode("autoencoder", "1", binary, arrays)
    header_length = int(headers["inference-header-content-length"])
    header = json.loads(body[:header_length])
    assert header["id"]  # a new one
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 16}
    np.testing.assert_array_equal(np.frombuffer(body[header_length:], np.float32).reshape(2, 2), arrays["codes"])


@given(
    st.sampled_from(["i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f4", "f8"]).flatmap(
        lambda dtype: hnp.arrays(
            np.dtype(dtype),
            st.integers(1, 200),  # both sides of check_bits' FEW
            elements=st.one_of(st.sampled_from([0, 1]), hnp.from_dtype(np.dtype(dtype), allow_nan=False)),
        )
    )
)
def test_check_bits_names_the_first_value_that_is_not_a_bit(values: np.ndarray) -> None:
    bad = [i for i, value in enumerate(values.tolist()) if value not in (0, 1)]  # by hand, value by value
    if not bad:
        oip.check_bits(values, 4)
        return
    with pytest.raises(oip.ProtocolError) as caught:
        oip.check_bits(values, 4)
    row, column = divmod(bad[0], 4)
    assert f"row {row}, column {column}:" in str(caught.value)
