"""The OpenAPI document: FastAPI's, made exact for the loaded model (row widths, limits, examples)."""

from __future__ import annotations

import math
from typing import Any

from fastapi import FastAPI

from service.api.v2.codec import InferenceRequest
from service.api.v2.repository import ControlRequest, IndexRequest
from service.config import Settings
from service.core.inference import SEED_LIMIT
from service.web.auth import ADMIN, OPEN, PROTECTED
from service.web.errors import is_v2

DESCRIPTION = """\
Send batches of binary vectors (multi-hot attributes, fingerprints, binarized images) and get
their latent codes back:

- **autoencoder codes**, the deterministic bottleneck `relu(x @ W + b)`;
- **VAE codes**: `mu`, `log_sigma` and samples `z = mu + exp(log_sigma) * eps`.

**Reproducing a VAE sample.** Every VAE response carries the `seed` of its `eps`. Send the same
rows with that `seed` and the same `samples` and you get the same `z`, bit for bit, on any replica
and after any restart; with numpy alone,
`eps = numpy.random.default_rng(seed).standard_normal((rows, samples, latent_dim))` and
`z[i, s] = mu[i] + exp(log_sigma[i]) * eps[i, s]`.

**Which model answers.** `GET /v1/model` gives the dimensions, where the weights came from, the
request limits, and the model's `fingerprint`: equal weights have equal fingerprints, whatever file
they came from.
"""

TAGS = [
    {"name": "v1", "description": "Encode binary rows, and describe the served model."},
    {
        "name": "models",
        "description": "Every /v1 route for a model of the repository, by name (its highest ready version) "
        "and by version; what is served.",
    },
    {"name": "health", "description": "Liveness and readiness probes for load balancers and Kubernetes."},
    {
        "name": "v2",
        "description": "The Open Inference Protocol (KServe v2), with Triton's binary tensor data extension: "
        "the same models and numbers as /v1, for KServe, Triton's clients and Seldon.",
    },
    {
        "name": "repository",
        "description": "The protocol's model repository extension, as Triton answers it: what is served, "
        "and loading and unloading models while serving.",
    },
]


def example_rows(width: int) -> list[list[int]]:
    """Two example rows of a given width: [0, 1, 1, 0, 1, ...] and its complement."""
    row = [int(j % 3 != 0) for j in range(width)]
    return [row, [1 - bit for bit in row]]


def _vectors(schema: dict[str, Any], sizes: list[tuple[int, int]], minimum: float | None = None) -> None:
    """Bound each nesting level of an array schema: sizes[i] = (minItems, maxItems) at depth i."""
    level = schema
    for low, high in sizes:
        level["minItems"], level["maxItems"] = low, high
        level = level["items"]
    if minimum is not None:
        level["minimum"] = minimum


def base64_rows(per_row: int, max_rows: int) -> dict[str, Any]:
    """JSON Schema for base64 of 1 to max_rows rows of per_row bytes each, exactly.

    base64 writes 3 bytes as 4 characters, so a block of L = lcm(per_row, 3) bytes, which is
    R = L / per_row whole rows, is 4L/3 characters with no padding. A string is q such blocks
    and then a tail of r < R rows, whose r * per_row bytes end in "=" or "==" unless they are a
    multiple of 3. At most max_rows rows: q < Q = max_rows // R with any tail, or q = Q with a
    tail of at most max_rows - Q * R rows. (The empty string is left to minLength.)
    """
    char = "[A-Za-z0-9+/]"
    block_bytes = math.lcm(per_row, 3)
    per_block = block_bytes // per_row
    block = f"{char}{{{4 * block_bytes // 3}}}"

    def tails(most: int) -> str:
        options = []
        for r in range(1, most + 1):
            full, rest = divmod(r * per_row, 3)
            options.append(f"{char}{{{4 * full + rest + 1}}}" + "=" * (3 - rest) if rest else f"{char}{{{4 * full}}}")
        return f"(?:{'|'.join(options)})?" if options else ""

    most_blocks, left = divmod(max_rows, per_block)
    last = f"(?:{block}){{{most_blocks}}}{tails(left)}"
    fewer = f"(?:{block}){{0,{most_blocks - 1}}}{tails(per_block - 1)}" if most_blocks else None
    pattern = "^(?:" + "|".join(p for p in (fewer, last) if p) + ")$"
    return {"pattern": pattern, "minLength": 4, "maxLength": 4 * math.ceil(max_rows * per_row / 3)}


def _require_keys(document: dict[str, Any], prefixes: tuple[str, ...] = PROTECTED) -> None:
    document["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "X-API-Key: <API key>"},
    }
    for path, operations in document["paths"].items():
        if path.startswith(prefixes) and not path.startswith(OPEN):  # what RequireKey guards
            schema = "ErrorResponse" if is_v2(path) else "Problem"  # each API's own error shape
            for operation in operations.values():
                operation["security"] = [{"bearer": []}, {"apiKey": []}]
                operation["responses"]["401"] = {
                    "description": "No API key, or not a valid one.",
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
                }


def build(
    app: FastAPI, input_dim: int, latent_dim: int, limits: Settings, auth: bool = False, admin_only: bool = False
) -> dict[str, Any]:
    """The app's OpenAPI document with the default model's widths on its routes, the limits and
    fitting examples, and, when API keys are required, their security schemes, so that "Authorize"
    works in /docs. The per-model routes take rows of any width: each model has its own."""
    app.openapi_schema = None
    document = app.openapi()
    # The /v2 inference body is read raw (JSON, or JSON then binary tensors): its schema is added here.
    request_schema = InferenceRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    document["components"]["schemas"].update(request_schema.pop("$defs"))
    document["components"]["schemas"]["InferenceRequest"] = request_schema
    for read_raw in (IndexRequest, ControlRequest):  # bodies read raw too (Triton's clients send empty ones)
        document["components"]["schemas"][read_raw.__name__] = read_raw.model_json_schema()
    for example in request_schema["examples"]:
        flat = [bit for row in example_rows(input_dim) for bit in row]
        example["inputs"][0] |= {"shape": [2, input_dim], "data": flat}
    if auth:
        _require_keys(document)
    elif admin_only:  # only an admin key: the API is open, loading and unloading are not
        _require_keys(document, (ADMIN,))
    schemas = document["components"]["schemas"]
    # FastAPI documents a 422 wherever a route has parameters; /v2's path parameters are plain
    # strings that cannot fail, and every /v2 error is the protocol's {"error": ...}.
    for path, operations in document["paths"].items():
        if is_v2(path):
            for operation in operations.values():
                operation["responses"].pop("422", None)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    d, k = input_dim, latent_dim
    rows, samples = (1, limits.max_rows), (1, limits.max_samples)
    for name in ("AutoencoderRequest", "VaeRequest"):
        matrix, packed = schemas[name]["properties"]["inputs"]["anyOf"]
        _vectors(matrix, [rows, (d, d)])
        packed["properties"]["packed"].update(base64_rows((d + 7) // 8, limits.max_rows))
        packed["properties"]["width"].update(minimum=d, maximum=d)
        for example in schemas[name]["examples"]:
            example["inputs"] = example_rows(d)
    # FastAPI's OpenAPI models hold bounds as floats, and 2**63 - 1 does not survive that.
    seed = {"type": "integer", "minimum": 0, "maximum": SEED_LIMIT - 1}
    schemas["VaeRequest"]["properties"]["seed"]["anyOf"][0] = seed
    schemas["VaeResponse"]["properties"]["seed"].update(seed)
    schemas["VaeRequest"]["properties"]["samples"].update(minimum=1, maximum=limits.max_samples)
    _vectors(schemas["AutoencoderResponse"]["properties"]["codes"], [rows, (k, k)], minimum=0)
    vae = schemas["VaeResponse"]["properties"]
    _vectors(vae["mu"], [rows, (k, k)])
    _vectors(vae["log_sigma"], [rows, (k, k)])
    _vectors(vae["z"], [rows, samples, (k, k)])
    _vectors(vae["kl"], [rows])
    for name, field in (("AutoencoderDecodeRequest", "codes"), ("VaeDecodeRequest", "z")):
        _vectors(schemas[name]["properties"][field], [rows, (k, k)])
        for example in schemas[name]["examples"]:
            example[field] = [[0.0] * k, [0.5] * k]
    _vectors(schemas["DecodeResponse"]["properties"]["probabilities"], [rows, (d, d)], minimum=0)
    schemas["DecodeResponse"]["properties"]["probabilities"]["items"]["items"]["maximum"] = 1
    return document
