"""Request bodies: read whole, parsed as JSON into a model, and held to a size limit."""

from __future__ import annotations

from typing import TypeVar

import orjson
from fastapi import HTTPException, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.web.errors import BodyTooLarge, problem
from service.web.paths import route_path


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


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


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413: at once when its Content-Length says so,
    and as it streams when it has none (the HTTP parser holds a declared body to its length, so
    only those need counting). A body that arrives too slowly is the server's business
    (service.server.protocol: 408 after ENCODER_REQUEST_TIMEOUT)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None:
            if declared <= self.limit:
                await self.app(scope, receive, send)
                return
            error = BodyTooLarge(self.limit)
            response = Response(
                problem(route_path(scope), error.detail),
                status_code=413,
                media_type="application/json",
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)  # FastAPI re-raises HTTPException from body reading
            return message

        await self.app(scope, counted_receive, send)


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    try:
        return None if value is None else int(value)
    except ValueError:
        return None
