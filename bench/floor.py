"""The floor: a bare ASGI app doing only what any server of this API must do.

orjson parses the body, numpy does the same math as the service (service.models.encoders), orjson dumps
the result. No validation beyond what numpy does by itself, no framework, no middleware. Run it
with `uvicorn bench.floor:app`; ENCODER_INPUT_DIM and ENCODER_LATENT_DIM set the seeded model.
"""

from __future__ import annotations

import os
import secrets
from typing import Any

import numpy as np
import orjson

from service.models.encoders import autoencode, seeded, vae_encode

MODEL = seeded(0, int(os.environ.get("ENCODER_INPUT_DIM", "5")), int(os.environ.get("ENCODER_LATENT_DIM", "2")))
JSON = [(b"content-type", b"application/json")]


async def _body(receive: Any) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await receive()  # startup
        await send({"type": "lifespan.startup.complete"})
        await receive()  # shutdown
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"]
    if path == "/readyz":
        out: Any = {"status": "ready"}
    else:
        body = orjson.loads(await _body(receive))
        x = np.array(body["inputs"], dtype=np.float64)
        if path == "/v1/autoencoder/encode":
            out = {"codes": autoencode(MODEL, x)}
        else:
            seed = body.get("seed")
            seed = secrets.randbelow(2**63) if seed is None else seed
            v = vae_encode(MODEL, x, body.get("samples", 1), seed)
            out = {"mu": v.mu, "log_sigma": v.log_sigma, "z": v.z, "kl": v.kl, "seed": seed}
    await send({"type": "http.response.start", "status": 200, "headers": JSON})
    await send({"type": "http.response.body", "body": orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)})
