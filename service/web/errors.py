"""Errors as clients see them: each API's shape (problem), FastAPI's handlers made quiet, startup errors on one line."""

from __future__ import annotations

import sys
from typing import Any

import orjson
from fastapi import HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.utils import is_body_allowed_for_status_code
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.web.paths import route_path


def is_v2(path: str) -> bool:
    """Whether the path belongs to the Open Inference Protocol's API."""
    return path == "/v2" or path.startswith("/v2/")


def problem(path: str, message: Any) -> bytes:
    """An error body in the shape of the API the path belongs to: {"error": ...} on the Open
    Inference Protocol's /v2, {"detail": ...} (FastAPI's) everywhere else."""
    return orjson.dumps({"error" if is_v2(path) else "detail": message})


async def send_problem(
    send: Send, path: str, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    """An error answered straight from a pure-ASGI middleware, in the shape of the path's API."""
    body = problem(path, detail)
    head = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)), *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes (ENCODER_MAX_BODY_BYTES)")


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


LOC_MOST = 64  # characters of a client's key shown in an error's place


def _clean(error: dict[str, Any]) -> dict[str, Any]:
    """A validation error as the client sees it: where and what, never its input echoed back."""
    loc = list(error["loc"])
    ctx = error.get("ctx") or {}
    msg = error["msg"]
    kind = error["type"]
    loc += ctx.get("where", [])  # our validators say where inside the field: row, column, packed, rows
    # A client's own key (an unknown field's name) is part of the place: cut, as every echoed string is.
    loc = [part if not isinstance(part, str) or len(part) <= LOC_MOST else part[:LOC_MOST] + "..." for part in loc]
    if kind == "json_invalid":
        msg = f"invalid JSON at character {loc[-1]}: {ctx.get('error', 'cannot be parsed')}"
    elif kind in ("model_type", "model_attributes_type", "dict_type") and loc == ["body"]:
        msg = "expected a JSON object"
    return {"type": kind, "loc": loc, "msg": msg}


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = [_clean(error) for error in exc.errors()]
    if is_v2(route_path(request.scope)):  # the protocol's shape: 400, {"error": "where: what"}
        first = detail[0]
        where = ".".join(str(part) for part in first["loc"])
        return Response(problem("/v2", f"{where}: {first['msg']}"), status_code=400, media_type="application/json")
    return Response(orjson.dumps({"detail": detail}), status_code=422, media_type="application/json")


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's answer to an HTTPException (its status, its headers), with the body in the shape of
    the path's API (problem): every error of /v2, wherever it is raised, is the protocol's."""
    assert isinstance(exc, StarletteHTTPException)
    if not is_body_allowed_for_status_code(exc.status_code):
        return Response(status_code=exc.status_code, headers=exc.headers)
    content = problem(route_path(request.scope), exc.detail)
    return Response(content, status_code=exc.status_code, headers=exc.headers, media_type="application/json")


async def client_gone_handler(request: Request, exc: Exception) -> Response:
    """The client left before its body was complete: nobody is there to answer. 499 is what the
    access log and the metrics then say, as nginx counts such requests."""
    return Response(status_code=499)


def unprocessable(loc: list[str | int], msg: str, kind: str = "value_error") -> RequestValidationError:
    """A 422 raised by a route after the model's own validation, in the same shape."""
    return RequestValidationError([{"type": kind, "loc": loc, "msg": msg}])
