"""Request bodies: read whole, and parsed as JSON into a model (service.web.admission holds them to a size limit)."""

from __future__ import annotations

from typing import TypeVar

import orjson
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive


def _is_json(content_type: bytes | None) -> bool:
    media = (content_type or b"").split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def parse_json_body(content_type: bytes | None, receive: Receive, model: type[ModelT]) -> ModelT:
    """The request's body as `model`, or the error FastAPI would give, without echoing the input."""
    if not _is_json(content_type):
        raise HTTPException(415, "send the body as JSON, with Content-Type: application/json")
    raw = await read_body(receive)
    if not raw:
        raise RequestValidationError([{"type": "missing", "loc": ("body",), "msg": "Field required"}])
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestValidationError(
            [{"type": "json_invalid", "loc": ("body", exc.pos), "msg": "JSON decode error", "ctx": {"error": exc.msg}}]
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        raise RequestValidationError([{**error, "loc": ("body", *error["loc"])} for error in errors]) from None


ModelT = TypeVar("ModelT", bound=BaseModel)
