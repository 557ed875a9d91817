"""Bit-matrix parsing and response checks: what is accepted, what is refused, and where it says."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from service.api.v1.arrays import NonFiniteOutput
from service.api.v1.bits import SMALL_BATCH
from service.api.v1.schemas import AutoencoderRequest, AutoencoderResponse, VaeRequest, VaeResponse


@pytest.mark.parametrize(
    ("inputs", "expected"),
    [
        ([[0, 1, 1]], [[0.0, 1.0, 1.0]]),
        ([[True, False, 1]], [[1.0, 0.0, 1.0]]),
        ([[1.0, 0.0, -0.0]], [[1.0, 0.0, 0.0]]),  # JSON Schema counts 1.0 as the number 1
        ([[False], [True]], [[0.0], [1.0]]),
    ],
)
def test_accepted_bits(inputs: list[list[Any]], expected: list[list[float]]) -> None:
    parsed = AutoencoderRequest.model_validate({"inputs": inputs}).inputs
    assert parsed.dtype == np.float64
    np.testing.assert_array_equal(parsed, expected)


def _error(body: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(ValidationError) as error:
        VaeRequest.model_validate(body)
    errors = error.value.errors()
    assert len(errors) == 1
    return dict(errors[0])


@pytest.mark.parametrize(
    ("inputs", "where", "message"),
    [
        ([], [], "expected at least one row, got an empty array"),
        ("0101", [], "expected an array of rows, got a string"),
        (None, [], "expected an array of rows, got null"),
        ([0, 1, 1], [0], "row 0: expected an array of 0/1 values, got 0"),
        ([[0, 1], []], [1], "row 1: expected 0/1 values, got an empty array"),
        ([[0, 1], [1]], [1], "row 1: has 1 values, but row 0 has 2"),
        ([[0, 1], [1, 2]], [1, 1], "row 1, column 1: expected 0 or 1, got 2"),
        ([[0, 1], [1, 0.5]], [1, 1], "row 1, column 1: expected 0 or 1, got 0.5"),
        ([[0, -1]], [0, 1], "row 0, column 1: expected 0 or 1, got -1"),
        ([[0, None]], [0, 1], "row 0, column 1: expected 0 or 1, got null"),
        ([[0, "1"]], [0, 1], "row 0, column 1: expected 0 or 1, got a string"),
        ([[0, [1]]], [0, 1], "row 0, column 1: expected 0 or 1, got an array"),
        ([[{"a": 1}, 0]], [0, 0], "row 0, column 0: expected 0 or 1, got an object"),
        ([[0, 2**64]], [0, 1], "row 0, column 1: expected 0 or 1, got an integer that is neither 0 nor 1"),
        ([[0, 10**5000]], [0, 1], "row 0, column 1: expected 0 or 1, got an integer that is neither 0 nor 1"),
        ([[0, float("inf")]], [0, 1], "row 0, column 1: expected 0 or 1, got a non-finite number"),
        ([[1, 1], [1, 1, 1], [3]], [2, 0], "row 2, column 0: expected 0 or 1, got 3"),
    ],
)
def test_refused_bits_say_where(inputs: Any, where: list[int], message: str) -> None:
    error = _error({"inputs": inputs})
    assert error["type"] == "bits"
    assert error["msg"] == message
    assert error["ctx"]["where"] == where


@given(
    st.integers(1, 6)
    .flatmap(
        lambda width: st.lists(st.lists(st.sampled_from([0, 1, True, False, 0.0, 1.0]), min_size=width, max_size=width))
    )
    .filter(bool),
)
def test_any_matrix_of_bits_parses_to_its_values(rows: list[list[Any]]) -> None:
    parsed = AutoencoderRequest.model_validate({"inputs": rows}).inputs
    np.testing.assert_array_equal(parsed, np.array([[float(v) for v in row] for row in rows]))


@given(st.integers(2, 60), st.integers(9, 12), st.sampled_from([[0, 1], [0, 1, True, False], [0, 1, 1.0]]), st.data())
def test_any_larger_matrix_of_bits_parses_to_its_values(
    rows: int, width: int, values: list[Any], data: st.DataObject
) -> None:
    assert rows * width > SMALL_BATCH  # read as bytes, or by the set test once a float is among them
    matrix = [data.draw(st.lists(st.sampled_from(values), min_size=width, max_size=width)) for _ in range(rows)]
    parsed = AutoencoderRequest.model_validate({"inputs": matrix}).inputs
    assert parsed.shape == (rows, width)
    np.testing.assert_array_equal(parsed, np.array([[float(v) for v in row] for row in matrix]))


bad_values = st.one_of(
    st.integers().filter(lambda v: v not in (0, 1)),
    st.floats().filter(lambda v: v not in (0, 1)),
    st.text(max_size=5),
    st.none(),
    st.lists(st.integers(0, 1), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


# Small batches get a set test a row, large ones are read as bytes: the properties cover both.
SIZES = st.one_of(st.tuples(st.integers(1, 4), st.integers(1, 4)), st.tuples(st.integers(200, 300), st.integers(6, 9)))


@given(SIZES, st.data())
def test_one_bad_value_anywhere_is_found_at_its_row_and_column(size: tuple[int, int], data: st.DataObject) -> None:
    rows, width = size
    assert (rows * width > SMALL_BATCH) == (rows >= 200)
    matrix: list[list[Any]] = [[(i + j) % 2 for j in range(width)] for i in range(rows)]
    i, j = data.draw(st.integers(0, rows - 1)), data.draw(st.integers(0, width - 1))
    matrix[i][j] = data.draw(bad_values)
    error = _error({"inputs": matrix})
    assert error["ctx"]["where"] == [i, j]
    assert error["msg"].startswith(f"row {i}, column {j}: expected 0 or 1, got ")


@pytest.mark.parametrize(
    ("body", "field", "kind"),
    [
        ({"samples": 0}, "samples", "greater_than_equal"),
        ({"samples": 1.5}, "samples", "int_from_float"),
        ({"samples": "2"}, "samples", "int_type"),
        ({"samples": True}, "samples", "int_type"),
        ({"seed": -1}, "seed", "greater_than_equal"),
        ({"seed": 2**63}, "seed", "less_than_equal"),
        ({"seed": "7"}, "seed", "int_type"),
        ({"sample": 2}, "sample", "extra_forbidden"),
    ],
)
def test_vae_request_fields(body: dict[str, Any], field: str, kind: str) -> None:
    error = _error({"inputs": [[0, 1]], **body})
    assert error["loc"][0] == field
    assert error["type"] == kind


def test_integral_floats_are_integers_as_json_schema_says() -> None:
    request = VaeRequest.model_validate({"inputs": [[1]], "samples": 3.0, "seed": 2.0})
    assert (request.samples, request.seed) == (3, 2)
    assert isinstance(request.samples, int)
    assert isinstance(request.seed, int)


def _vae(rows: int = 2, samples: int = 3, k: int = 2, **changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "mu": np.zeros((rows, k)),
        "log_sigma": np.zeros((rows, k)),
        "z": np.zeros((rows, samples, k)),
        "kl": np.zeros(rows),
        "seed": 1,
    }
    return fields | changes


def test_responses_refuse_disagreeing_shapes() -> None:
    context = {"rows": 2, "latent_dim": 2, "samples": 3}
    VaeResponse.model_validate(_vae(), context=context)
    for bad in (
        {"mu": np.zeros((2, 3))},
        {"z": np.zeros((2, 4, 2))},
        {"kl": np.zeros(3)},
        {"mu": np.zeros((2, 2), dtype=np.float32)},
    ):
        with pytest.raises(ValidationError):
            VaeResponse.model_validate(_vae(**bad), context=context)
    with pytest.raises(ValidationError, match="codes has 1 rows, expected 2"):
        AutoencoderResponse.model_validate({"codes": np.zeros((1, 2))}, context={"rows": 2})


@pytest.mark.parametrize(
    "bad",
    [{"kl": np.array([0.0, np.nan])}, {"z": np.full((2, 3, 2), np.inf)}, {"mu": np.array([[0.0, -np.inf]] * 2)}],
)
def test_a_non_finite_number_never_reaches_json(bad: dict[str, Any]) -> None:
    response = VaeResponse.model_validate(_vae(**bad))
    with pytest.raises(NonFiniteOutput, match="VaeResponse holds a non-finite number"):
        response.to_json()
    assert VaeResponse.model_validate(_vae()).to_json().count(b"null") == 0


def test_response_json_is_exact() -> None:
    codes = np.array([[0.1, 1 / 3]])
    text = AutoencoderResponse.model_validate({"codes": codes}).to_json()
    assert text == b'{"codes":[[0.1,0.3333333333333333]]}'


@pytest.mark.parametrize(
    ("tail", "where", "message"),
    [
        ([[0, 1, 1], [1]], [401], "row 401: has 1 values, but row 0 has 3"),
        ([[0, 1], [1, 0, 1, 1]], [400], "row 400: has 2 values, but row 0 has 3"),  # as many values in all
        ([[0, 1, "1"]], [400, 2], "row 400, column 2: expected 0 or 1, got a string"),
        ([[0, None, 1]], [400, 1], "row 400, column 1: expected 0 or 1, got null"),
        ([[0, 1, 2]], [400, 2], "row 400, column 2: expected 0 or 1, got 2"),
        ([[0, 1, -1]], [400, 2], "row 400, column 2: expected 0 or 1, got -1"),
        ([[0, 1, 0.5]], [400, 2], "row 400, column 2: expected 0 or 1, got 0.5"),
        ([[0, 1, 2**64]], [400, 2], "row 400, column 2: expected 0 or 1, got an integer that is neither 0 nor 1"),
        ([[0, 1, [1]]], [400, 2], "row 400, column 2: expected 0 or 1, got an array"),
        ([5], [400], "row 400: expected an array of 0/1 values, got 5"),
    ],
)
def test_large_batches_are_refused_at_the_same_places(tail: list[Any], where: list[int], message: str) -> None:
    rows = [[1, 0, 1]] * 400 + tail
    assert len(rows) * 3 > SMALL_BATCH
    error = _error({"inputs": rows})
    assert (error["msg"], error["ctx"]["where"]) == (message, where)


def test_large_batches_of_bools_ints_and_floats_parse() -> None:
    rows = [[True, 0, 1.0]] * 400
    np.testing.assert_array_equal(AutoencoderRequest.model_validate({"inputs": rows}).inputs, [[1.0, 0.0, 1.0]] * 400)
