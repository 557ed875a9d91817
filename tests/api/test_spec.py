"""The committed OpenAPI spec is what the app serves, and it is written for someone exploring it."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fastapi.testclient import TestClient

from service.cli import DEFAULT_SPEC, spec_text
from service.config import Settings
from tests.conftest import ROOT

COMMITTED = ROOT / DEFAULT_SPEC


def test_committed_spec_is_what_the_app_serves(client: TestClient) -> None:
    committed = json.loads(COMMITTED.read_text())
    assert committed == client.get("/openapi.json").json(), "run: encoding-service openapi"
    assert COMMITTED.read_text() == spec_text(Settings.model_construct()), "run: encoding-service openapi"


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]


def test_every_operation_is_documented() -> None:
    spec = json.loads(COMMITTED.read_text())
    ids = set()
    for path, method, op in _operations(spec):
        assert op.get("summary"), f"{method} {path} has no summary"
        assert op.get("description"), f"{method} {path} has no description"
        ids.add(op["operationId"])
    assert {"encode_autoencoder", "encode_vae", "model_info", "healthz", "readyz"} <= ids


def test_every_body_example_works_as_it_stands(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for path, method, op in _operations(spec):
        if "requestBody" not in op:
            continue
        ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        examples = schemas[ref.rsplit("/", 1)[1]]["examples"]
        assert examples, f"{method} {path} has no example"
        decoders = client.get("/v1/model").json()["decoders"]
        for example in examples:
            path = path.replace("{model_name}", "default").replace("{model_version}", "1")
            response = client.request(method, path, json=example)
            if path.endswith(("/load", "/unload")):  # the default service serves one model, no repository
                assert response.status_code == 400, (path, response.text)
                continue
            if not decoders and path.endswith(("/decode", "/reconstruct")):
                assert response.status_code == 409, (path, response.text)  # the seeded model has no decoder
                continue
            assert response.status_code == 200, (path, response.text)


def test_row_widths_and_limits_are_in_the_schema() -> None:
    schemas = json.loads(COMMITTED.read_text())["components"]["schemas"]
    inputs = schemas["VaeRequest"]["properties"]["inputs"]["anyOf"][0]
    assert (inputs["minItems"], inputs["maxItems"]) == (1, Settings().max_rows)
    assert inputs["items"]["minItems"] == inputs["items"]["maxItems"] == 5
    bit = inputs["items"]["items"]["anyOf"]  # one type per branch: generated clients read it
    assert bit == [{"type": "integer", "enum": [0, 1]}, {"type": "boolean"}]
    seed = schemas["VaeRequest"]["properties"]["seed"]["anyOf"][0]
    assert (seed["minimum"], seed["maximum"]) == (0, 2**63 - 1)
    z = schemas["VaeResponse"]["properties"]["z"]
    assert z["items"]["items"]["minItems"] == z["items"]["items"]["maxItems"] == 2
    assert schemas["AutoencoderResponse"]["properties"]["codes"]["items"]["items"]["minimum"] == 0


def test_the_docs_screenshot_shows_the_committed_spec() -> None:
    """openapi/docs.png is a picture of /docs; beside it, the hash of the spec it shows. When the
    spec changes, the picture is out of date: refresh both with
    UPDATE_SCREENSHOT=1 pytest tests/system/test_browser.py."""
    recorded = (ROOT / "openapi" / "docs.png.spec-sha256").read_text().split()[0]
    assert recorded == hashlib.sha256(COMMITTED.read_bytes()).hexdigest(), (
        "openapi/docs.png shows an older spec: UPDATE_SCREENSHOT=1 pytest tests/system/test_browser.py"
    )
