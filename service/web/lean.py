"""The fast path: LeanRoute (a FastAPI route whose requests skip its per-request machinery) and
FastLane (which hands them straight to it, ahead of FastAPI's layers)."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, ClassVar, Protocol, get_type_hints

from fastapi import Request, Response, params
from fastapi.datastructures import DefaultPlaceholder
from fastapi.routing import APIRoute
from pydantic import BaseModel
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.core.traces import TRACE
from service.server.flags import ANSWERED
from service.web.bodies import parse_json_body
from service.web.negotiation import negotiate
from service.web.paths import route_path

Lean = Callable[[Scope, Receive, Send], Awaitable[None]]
MATCHED = 4096  # paths kept with the lane they matched (FastLane._match)
logger = logging.getLogger("service")


class Renderable(Protocol):
    """A response that can be written in any of `MEDIA_TYPES` (the first is the default)."""

    MEDIA_TYPES: ClassVar[tuple[bytes, ...]]

    def render(self, media_type: bytes) -> bytes: ...


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
        "max_body_size": None,  # Admission (ENCODER_MAX_BODY_BYTES) limits every body
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
        # An endpoint that only hands its arguments on, under another signature (a wider body, say),
        # names its target `__wrapped__`: the target is called, one coroutine fewer a request.
        target = getattr(endpoint, "__wrapped__", endpoint)

        async def lean(scope: Scope, receive: Receive, send: Send) -> None:
            span = TRACE.get()  # a sampled request's span (traces on): its phases are timed
            if span is not None:
                span.begin()
            asked = dict(scope["headers"])
            request = Request(scope, receive)
            arguments = {name: await dependency(request) for name, dependency in dependencies}
            if body is not None:
                name, model = body
                arguments[name] = await parse_json_body(asked.get(b"content-type"), receive, model)
            if span is not None:
                span.mark("parse")
            result: Renderable = await target(**arguments)
            if span is not None:
                span.mark("compute")
            # Rendered before anything is sent, so that an error can still be answered.
            media_type = negotiate(asked.get(b"accept"), result.MEDIA_TYPES)
            content = result.render(media_type)
            if span is not None:
                span.mark("encode")
            headers = [(b"content-type", media_type), (b"content-length", str(len(content)).encode())]
            answered = scope.get(ANSWERED)  # who answered, when a dependency resolved a model
            if answered is not None and answered.headers:
                headers.extend(answered.headers)
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


class FastLane:
    """Hand requests for LeanRoutes straight to them, ahead of FastAPI's middleware, routing and
    exception layers; anything else goes on to `app`. An error is answered by the app's own
    exception handler for it (`handlers`, the app's exception_handlers), as FastAPI would."""

    def __init__(
        self, app: ASGIApp, routes: Sequence[BaseRoute], handlers: Mapping[Any, Callable[..., Any]] | None = None
    ) -> None:
        self.app = app
        self.handlers = handlers if handlers is not None else {}
        lean = [route for route in routes if isinstance(route, LeanRoute)]
        self.lanes = {
            (method, route.path): route.lean
            for route in lean
            if not route.param_convertors
            for method in route.methods or ()
        }
        # Routes with path parameters (/v1/models/{model_name}/...): matched by their regex, after
        # the exact paths miss, and only under their common prefix.
        self.patterns = [
            (method, route.path_regex, route.lean)
            for route in lean
            if route.param_convertors
            for method in route.methods or ()
        ]
        self.prefixes = tuple({route.path.split("{", 1)[0] for route in lean if route.param_convertors})
        # Paths already matched, with their lane and parameters: a path is matched once (the regexes
        # cost a named model's request 2-3%, measured); at most MATCHED, as clients choose paths.
        self.matched: dict[tuple[str, str], tuple[Lean, dict[str, str]]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        lean = self.lanes.get((scope["method"], path))
        if lean is None and self.prefixes and path.startswith(self.prefixes):
            lean = self._match(scope, path)
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

    def _match(self, scope: Scope, path: str) -> Lean | None:
        """The lane whose pattern the path matches, with its path parameters set in the scope."""
        key = (scope["method"], path)
        if (matched := self.matched.get(key)) is not None:
            scope["path_params"] = dict(matched[1])
            return matched[0]
        for method, regex, lean in self.patterns:
            if method == key[0] and (match := regex.match(path)):
                scope["path_params"] = params = match.groupdict()
                if len(self.matched) < MATCHED:
                    self.matched[key] = (lean, dict(params))
                return lean
        return None

    def _handler(self, exc: Exception) -> Callable[..., Any] | None:
        """The app's handler for this exception's class or its nearest base, as Starlette finds it;
        a handler for Exception (or 500) counts only for what no other handler takes."""
        for cls in type(exc).__mro__:
            if cls in self.handlers:
                return self.handlers[cls]
        return self.handlers.get(500)
