"""HTTP plumbing shared by every route: orjson bodies, the body-size limit, clean error responses."""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, ClassVar, Protocol, TypeVar, get_type_hints

import orjson
from fastapi import HTTPException, Request, Response, params
from fastapi.datastructures import DefaultPlaceholder
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.utils import is_body_allowed_for_status_code
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

Lean = Callable[[Scope, Receive, Send], Awaitable[None]]
logger = logging.getLogger("service")


class Renderable(Protocol):
    """A response that can be written in any of `MEDIA_TYPES` (the first is the default)."""

    MEDIA_TYPES: ClassVar[tuple[bytes, ...]]

    def render(self, media_type: bytes) -> bytes: ...


MediaRange = tuple[bytes, bytes, float]  # type, subtype (either may be *), quality


def media_ranges(accept: bytes) -> list[MediaRange]:
    """The media ranges of an Accept header, in its order. Parameters other than `q` are ignored;
    a `q` that is not a number in [0, 1] counts as 1."""
    ranges = []
    for part in accept.split(b","):
        media_range, _, parameters = part.partition(b";")
        kind, _, sub = media_range.strip().lower().partition(b"/")
        if not kind:
            continue
        quality = 1.0
        for parameter in parameters.split(b";"):
            key, _, value = parameter.strip().partition(b"=")
            if key.strip().lower() == b"q":
                try:
                    quality = float(value.strip())
                except ValueError:
                    quality = 1.0
                if not 0.0 <= quality <= 1.0:
                    quality = 1.0
        ranges.append((kind, sub.strip() or b"*", quality))
    return ranges


def quality(ranges: list[MediaRange], media: bytes) -> tuple[float, int] | None:
    """The quality the ranges give `media` (that of the most specific range matching it: `type/sub`
    over `type/*` over `*/*`, the first of equals), with that range's position; None if none matches."""
    kind, _, sub = media.partition(b"/")
    found: tuple[float, int] | None = None
    specificity = -1
    for index, (range_kind, range_sub, range_quality) in enumerate(ranges):
        if range_kind == kind:
            fit = 2 if range_sub == sub else 1 if range_sub == b"*" else -1
        else:
            fit = 0 if range_kind == b"*" and range_sub == b"*" else -1
        if fit > specificity:
            specificity, found = fit, (range_quality, index)
    return found


def negotiate(accept: bytes | None, offered: tuple[bytes, ...]) -> bytes:
    """The offered media type the Accept header prefers, by RFC 9110 (section 12.5.1), or 406.

    Each offered type takes the quality of the most specific range matching it, so
    `application/json;q=0, */*` rules JSON out and allows the rest. The highest quality above 0
    wins; on a tie, the type whose range comes first in the header, then the first offered (the
    default). Written here rather than taken from python-mimeparse, which the tests use as an
    oracle: it costs a request 8 to 18 us, this 2 to 4, measured."""
    if not accept:
        return offered[0]
    ranges = media_ranges(accept)
    best: tuple[float, int, int] | None = None  # quality, then earlier in the header, then earlier offered
    chosen = offered[0]
    for order, media in enumerate(offered):
        found = quality(ranges, media)
        if found is not None and found[0] > 0 and (best is None or (found[0], -found[1], -order) > best):
            best, chosen = (found[0], -found[1], -order), media
    if best is None:
        allowed = ", ".join(m.decode() for m in offered)
        raise HTTPException(406, f"the Accept header allows none of {allowed}")
    return chosen


class LeanRoute(APIRoute):
    """A route whose requests skip FastAPI's per-request machinery.

    FastAPI builds the OpenAPI operation from the endpoint's signature as usual, but a request
    takes one short path, `lean(scope, receive, send)`: the body is read, parsed by orjson (which
    refuses NaN and Infinity) and validated by the endpoint's pydantic model in one
    `model_validate` call; each other parameter is an `Annotated[T, Depends(async_fn(request))]`,
    awaited directly; the endpoint returns a Renderable model, written in the media type the
    Accept header asks for. Errors are FastAPI's: 415 for a body that is not JSON, 422 with `loc` for the rest.
    """

    # Route options the short path does not honour, with their defaults: anything else is refused.
    IGNORED: ClassVar[dict[str, Any]] = {
        "response_model_include": None,
        "response_model_exclude": None,
        "response_model_by_alias": True,
        "response_model_exclude_unset": False,
        "response_model_exclude_defaults": False,
        "response_model_exclude_none": False,
        "callbacks": None,  # or [], a router's
        "max_body_size": None,  # BodyLimit (ENCODER_MAX_BODY_BYTES) limits every body
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._refuse_what_it_ignores()
        self.lean: Lean = self._lean()

    def _refuse_what_it_ignores(self) -> None:
        """A TypeError, at construction, for any option this route would silently not honour."""
        ignored = [name for name, default in self.IGNORED.items() if getattr(self, name, default) not in (default, [])]
        if self.dependencies:  # the route's own, its router's or the app's
            ignored.append("dependencies=[...] (give the endpoint an async Depends parameter instead)")
        if self.status_code not in (None, 200):
            ignored.append(f"status_code={self.status_code} (it answers 200)")
        if not isinstance(self.response_class, DefaultPlaceholder):
            ignored.append("response_class (the endpoint's Renderable result writes the response)")
        if ignored:
            raise TypeError(f"LeanRoute {self.path} ({self.name}) does not honour {'; '.join(ignored)}: use APIRoute")

    def _lean(self) -> Lean:
        endpoint = self.endpoint
        body: tuple[str, type[BaseModel]] | None = None
        dependencies: list[tuple[str, Callable[[Request], Awaitable[Any]]]] = []
        for name, hint in get_type_hints(endpoint, include_extras=True).items():
            if name == "return":
                continue
            if isinstance(hint, type) and issubclass(hint, BaseModel):
                body = (name, hint)
                continue
            depends = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, params.Depends)]
            if not depends or not inspect.iscoroutinefunction(depends[0].dependency):
                raise TypeError(f"{endpoint.__name__}: parameter {name!r} is neither the body nor an async Depends")
            dependencies.append((name, depends[0].dependency))

        async def lean(scope: Scope, receive: Receive, send: Send) -> None:
            asked = dict(scope["headers"])
            request = Request(scope, receive)
            arguments = {name: await dependency(request) for name, dependency in dependencies}
            if body is not None:
                name, model = body
                arguments[name] = await parse_json_body(asked.get(b"content-type"), receive, model)
            result: Renderable = await endpoint(**arguments)
            # Rendered before anything is sent, so that an error can still be answered.
            media_type = negotiate(asked.get(b"accept"), result.MEDIA_TYPES)
            content = result.render(media_type)
            headers = [(b"content-type", media_type), (b"content-length", str(len(content)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": content})

        return lean

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        # Used only when FastAPI's own router dispatches here (FastLane normally gets there first).
        async def handler(request: Request) -> Response:
            sent: list[Message] = []

            async def collect(message: Message) -> None:
                sent.append(message)

            await self.lean(request.scope, request.receive, collect)  # errors go to the app's handlers
            response = Response(sent[1]["body"], status_code=sent[0]["status"])
            response.raw_headers = list(sent[0]["headers"])
            return response

        return handler


def route_path(scope: Scope) -> str:
    """The path the app routes on: the request's, without the root path (a prefix a proxy strips)
    that servers such as `uvicorn --root-path` put in front of it, as Starlette's router sees it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


class RootPath:
    """Serve behind a proxy that strips a path prefix (ENCODER_ROOT_PATH), under any server: the
    scope gets the prefix as its root_path, and in front of its path, as `uvicorn --root-path`
    does; a root path the server set already wins."""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not scope.get("root_path"):
            scope["root_path"] = root = self.root_path
            scope["path"] = root + scope["path"]
            if scope.get("raw_path") is not None:
                scope["raw_path"] = root.encode() + scope["raw_path"]
        await self.app(scope, receive, send)


class FastLane:
    """Hand requests for LeanRoutes straight to them, ahead of FastAPI's middleware, routing and
    exception layers; anything else goes on to `app`. An error is answered by the app's own
    exception handler for it (`handlers`, the app's exception_handlers), as FastAPI would."""

    def __init__(
        self, app: ASGIApp, routes: Sequence[BaseRoute], handlers: Mapping[Any, Callable[..., Any]] | None = None
    ) -> None:
        self.app = app
        self.handlers = handlers if handlers is not None else {}
        self.lanes = {
            (method, route.path): route.lean
            for route in routes
            if isinstance(route, LeanRoute)
            for method in route.methods or ()
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        lean = self.lanes.get((scope["method"], scope["path"] if not scope.get("root_path") else route_path(scope)))
        if lean is None:
            await self.app(scope, receive, send)
            return
        try:
            await lean(scope, receive, send)  # it sends only once its response is complete
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                logger.exception("unhandled error in %s %s", scope["method"], scope["path"])
                response: Response = Response(b'{"detail":"internal server error"}', 500, media_type="application/json")
            else:
                answer = handler(Request(scope, receive), exc)
                response = await answer if inspect.isawaitable(answer) else answer
            await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Callable[..., Any] | None:
        """The app's handler for this exception's class or its nearest base, as Starlette finds it;
        a handler for Exception (or 500) counts only for what no other handler takes."""
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return self.handlers.get(500)


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


def is_v2(path: str) -> bool:
    """Whether the path belongs to the Open Inference Protocol's API."""
    return path == "/v2" or path.startswith("/v2/")


def problem(path: str, message: Any) -> bytes:
    """An error body in the shape of the API the path belongs to: {"error": ...} on the Open
    Inference Protocol's /v2, {"detail": ...} (FastAPI's) everywhere else."""
    return orjson.dumps({"error" if is_v2(path) else "detail": message})


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes (ENCODER_MAX_BODY_BYTES)")


# Set in a request's scope when the server (service.server) answered 408 itself because the body
# came too slowly: the app's own answer then went to a closed connection, and is not what the client got.
TIMED_OUT = "encoding_service.timed_out"

# Set in the app's state by the server (service.server.DrainingServer) once SIGTERM has started its
# drain: the readiness endpoints answer 503 from then on.
DRAINING = "draining"


class BodyLimit:
    """Refuse a request body over `limit` bytes with 413: at once when its Content-Length says so,
    and as it streams when it has none (the HTTP parser holds a declared body to its length, so
    only those need counting). A body that arrives too slowly is the server's business
    (service.server: 408 after ENCODER_REQUEST_TIMEOUT)."""

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
    loc += ctx.get("where", [])  # our validators say where inside the field: row, column, packed, rows
    if kind == "json_invalid":
        msg = f"invalid JSON at character {loc[-1]}: {ctx.get('error', 'cannot be parsed')}"
    elif kind in ("model_type", "model_attributes_type", "dict_type") and loc == ["body"]:
        msg = "expected a JSON object"
    return {"type": kind, "loc": loc, "msg": msg}


async def validation_error_handler(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    detail = [_clean(error) for error in exc.errors()]
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
