"""Fuzzing: schemathesis against the live server's spec, and hypothesis for the edges around it."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT, Server

CONFIG = Path(__file__).with_name("schemathesis.toml")
# CI runs a bounded pass; `FUZZ_EXAMPLES=2000 pytest tests/system/test_fuzz.py` is the longer run.
EXAMPLES = os.environ.get("FUZZ_EXAMPLES", "60")


def test_schemathesis_finds_nothing(live: Server) -> None:
    import subprocess

    argv = [
        str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(CONFIG), "--no-color",
        "run", f"{live.url}/openapi.json", "--checks", "all", "--max-examples", EXAMPLES,
    ]  # fmt: skip
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout


# Any JSON at all: huge integers, floats of every size, unicode, nesting.
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=40,
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"inputs": json_values}),
    st.fixed_dictionaries(
        {"inputs": st.lists(st.lists(st.sampled_from([0, 1, 1.0, 0.0, True, 1.5, -0.0]), min_size=5, max_size=5))},
        optional={"samples": json_values, "seed": json_values, "extra": json_values},
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, path=st.sampled_from(["/v1/autoencoder/encode", "/v1/vae/encode"]))
def test_any_json_gets_an_answer_and_never_a_server_error(client: TestClient, body: Any, path: str) -> None:
    response = client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})
    assert response.status_code in (200, 413, 422), response.text
    payload = json.loads(response.text)  # strict JSON: no NaN or Infinity
    if response.status_code == 422:
        assert all(set(error) == {"type", "loc", "msg"} for error in payload["detail"])


@pytest.mark.parametrize("depth", [10, 1000, 100_000])
def test_deep_nesting_is_refused_cleanly(client: TestClient, depth: int) -> None:
    body = '{"inputs": ' + "[" * depth + "]" * depth + "}"
    response = client.post("/v1/vae/encode", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422


@pytest.mark.parametrize(
    ("value", "accepted"),
    [(1, True), (1.0, True), (0.0, True), (True, True), (1.5, False), (2, False), (10**30, False), ("1", False)],
)
def test_numbers_as_json_schema_counts_them(client: TestClient, value: Any, accepted: bool) -> None:
    response = client.post("/v1/autoencoder/encode", json={"inputs": [[value, 0, 1, 0, 1]]})
    assert response.status_code == (200 if accepted else 422)
