"""The OpenAPI document: FastAPI's, made exact for the loaded model (row widths, limits, examples)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from service.schemas import SEED_LIMIT, ModelInfo

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
    {"name": "health", "description": "Liveness and readiness probes for load balancers and Kubernetes."},
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


def build(app: FastAPI, info: ModelInfo) -> dict[str, Any]:
    """The app's OpenAPI document with the served model's widths, the limits and fitting examples."""
    app.openapi_schema = None
    document = app.openapi()
    schemas = document["components"]["schemas"]
    d, k, limits = info.input_dim, info.latent_dim, info.limits
    rows, samples = (1, limits.max_rows), (1, limits.max_samples)
    for name in ("AutoencoderRequest", "VaeRequest"):
        matrix, packed = schemas[name]["properties"]["inputs"]["anyOf"]
        _vectors(matrix, [rows, (d, d)])
        packed["properties"]["rows"]["maximum"] = limits.max_rows
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
    return document
