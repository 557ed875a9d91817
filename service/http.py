"""HTTP plumbing shared by every route: orjson bodies, the body-size limit, clean error responses."""

from __future__ import annotations

import sys
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class OrjsonRequest(Request):
    """A request whose JSON body is parsed by orjson: several times faster, and it refuses NaN and Infinity."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = orjson.loads(await self.body())
        return self._json


class OrjsonRoute(APIRoute):
    """A route that hands its handler an OrjsonRequest; FastAPI turns its decode errors into 422."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def orjson_handler(request: Request) -> Response:
            return await handler(OrjsonRequest(request.scope, request.receive))

        return orjson_handler


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes (ENCODER_MAX_BODY_BYTES)")


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413: at once from Content-Length, else while it streams."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            error = BodyTooLarge(self.limit)
            response = Response(
                orjson.dumps({"detail": error.detail}),
                status_code=413,
                media_type="application/json",
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise BodyTooLarge(self.limit)  # FastAPI re-raises HTTPException from body reading
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class StartupError(Exception):
    """A reason not to start, worth one line in the log and no traceback."""


class OneLineStartupErrors:
    """Report a StartupError raised in the lifespan as its own one-line message instead of a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def send_one_line(message: Message) -> None:
            # Starlette sends startup.failed from inside its `except`, where the error is still current.
            error = sys.exc_info()[1]
            if message["type"] == "lifespan.startup.failed" and isinstance(error, StartupError):
                message = {**message, "message": str(error)}
            await send(message)

        await self.app(scope, receive, send_one_line)


def _clean(error: dict[str, Any]) -> dict[str, Any]:
    """A validation error as the client sees it: where and what, never its input echoed back."""
    loc = list(error["loc"])
    ctx = error.get("ctx") or {}
    msg = error["msg"]
    kind = error["type"]
    if kind == "bits":
        loc += ctx.get("where", [])
    elif kind == "json_invalid":
        msg = f"invalid JSON at character {loc[-1]}: {ctx.get('error', 'cannot be parsed')}"
    elif kind in ("model_attributes_type", "dict_type") and loc == ["body"]:
        msg = "expected a JSON object, sent with Content-Type: application/json"
    return {"type": kind, "loc": loc, "msg": msg}


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = [_clean(error) for error in exc.errors()]
    return Response(orjson.dumps({"detail": detail}), status_code=422, media_type="application/json")


def unprocessable(loc: list[str | int], msg: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 raised by a route after the model's own validation, in the same shape."""
    return RequestValidationError([{"type": kind, "loc": loc, "msg": msg}])
