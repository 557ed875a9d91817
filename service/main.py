"""The application: `create_app(settings)` builds it; the lifespan loads and checks the model."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, TypedDict

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from service import __version__, oip, spec, weights
from service.access import Observe, RequestLog
from service.auth import Keys, RequireKey
from service.bodies import BodyLimit
from service.config import Settings, describe
from service.docs import add_docs
from service.errors import (
    OneLineStartupErrors,
    StartupError,
    client_gone_handler,
    http_error_handler,
    validation_error_handler,
)
from service.lean import FastLane, LeanRoute
from service.logs import configure_logging
from service.metrics import Metrics
from service.model import ModelError, seeded
from service.paths import RootPath
from service.routes import encoders, router
from service.schemas import Limits, ModelInfo
from service.serving import Serving
from service.v2 import protocol_error_handler, v2


class State(TypedDict):
    serving: Serving
    keys: Keys | None


def load_keys(settings: Settings) -> Keys | None:
    """The API keys the settings ask for, or None when the API is open."""
    if not settings.auth_required:
        return None
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    try:
        keys = Keys(key, settings.api_keys_file)
    except (OSError, UnicodeDecodeError) as exc:
        raise StartupError(f"API keys file {str(settings.api_keys_file)!r}: cannot be read ({exc})") from None
    if not keys.current():
        raise StartupError(f"API keys file {str(settings.api_keys_file)!r}: holds no key")
    return keys


def load(settings: Settings, metrics: Metrics | None = None) -> Serving:
    """The model the settings ask for, checked; StartupError (one line) when it cannot be served."""
    if settings.weights is not None:
        try:
            model = weights.load(settings.weights)
        except weights.WeightsError as exc:
            raise StartupError(str(exc)) from None
        for field in sorted({"input_dim", "latent_dim"} & settings.model_fields_set):
            if getattr(settings, field) != getattr(model, field):
                raise StartupError(
                    f"weights file {str(settings.weights)!r}: {field} is {getattr(model, field)}, "
                    f"but ENCODER_{field.upper()} is {getattr(settings, field)}"
                )
        source: dict[str, object] = {"source": "file", "seed": None, "file": settings.weights.name}
    else:
        try:
            model = seeded(settings.seed, settings.input_dim, settings.latent_dim)
        except ModelError as exc:
            raise StartupError(f"seeded weights (ENCODER_SEED={settings.seed}): {exc}") from None
        source = {"source": "seed", "seed": settings.seed, "file": None}
    info = ModelInfo.model_validate(
        {
            "input_dim": model.input_dim,
            "latent_dim": model.latent_dim,
            **source,
            "fingerprint": model.fingerprint(),
            "parameters": {name: list(value.shape) for name, value in model.arrays().items()},
            "decoders": model.has_decoders,
            "loaded_at": datetime.now(UTC),
            "limits": Limits.model_validate(settings.model_dump(include=set(Limits.model_fields))),
        }
    )
    metrics = Metrics() if metrics is None else metrics
    metrics.model.info(
        {"fingerprint": info.fingerprint, "input_dim": str(info.input_dim), "latent_dim": str(info.latent_dim)}
        | {"source": info.source, "file": info.file or "", "seed": "" if info.seed is None else str(info.seed)}
    )
    return Serving(model=model, info=info, settings=settings, metrics=metrics)


def _operation_id(route: APIRoute) -> str:
    """Operation ids are the handlers' names: encode_vae, model_info, ..."""
    return route.name


class Service(FastAPI):
    """FastAPI, with the service's own pure-ASGI middleware outermost, and the encode routes served
    by a FastLane just inside it, ahead of FastAPI's middleware, routing and exception layers.

    Measured through uvicorn, those layers cost a single-row request more than all its math.
    Middleware that must see every request goes in `outer`, not `add_middleware`; what concerns
    only the lifespan wraps FastAPI's own stack, behind the FastLane, where requests for the encode
    routes never pass. The lanes are the LeanRoutes of the routers included; including one with
    something a lane would not honour (a prefix, dependencies, the app's own dependencies) is
    refused with a TypeError rather than silently skipped.
    """

    # Starlette's own: FastAPI's adds its OpenTelemetry hooks to every request, and they are off here.
    __call__ = Starlette.__call__

    def __init__(
        self,
        *,
        outer: Sequence[Middleware],
        metrics: Metrics,
        request_log: RequestLog,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.lanes: list[LeanRoute] = []
        self.outer = outer
        self.metrics = metrics
        self.request_log = request_log

    def include_router(self, router: APIRouter, **options: Any) -> None:
        lean = [route for route in router.routes if isinstance(route, LeanRoute)]
        if lean:
            ignored = [
                name for name in ("prefix", "dependencies", "default_response_class", "callbacks") if options.get(name)
            ]
            ignored += ["the app's dependencies"] * bool(self.router.dependencies)
            if ignored:
                paths = ", ".join(route.path for route in lean)
                raise TypeError(f"the lean routes {paths} would not honour {', '.join(ignored)}: use APIRoute")
            self.lanes.extend(lean)
        super().include_router(router, **options)

    def build_middleware_stack(self) -> ASGIApp:
        inner = OneLineStartupErrors(super().build_middleware_stack())
        app: ASGIApp = FastLane(inner, self.lanes, self.exception_handlers)
        for cls, args, kwargs in reversed(self.outer):
            app = cls(app, *args, **kwargs)
        return app


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for these settings (by default, read from ENCODER_ environment variables)."""
    settings = Settings() if settings is None else settings

    @asynccontextmanager
    async def lifespan(app: Service) -> AsyncIterator[State]:
        loaded = load(settings, app.metrics)
        keys = load_keys(settings)
        app.openapi_schema = spec.build(app, loaded.info, auth=keys is not None)
        try:
            yield {"serving": loaded, "keys": keys}
        finally:
            app.request_log.flush()

    configure_logging(settings.log_level, settings.log_format)
    paths = {getattr(route, "path", "") for route in [*encoders.routes, *router.routes, *v2.routes]}
    paths |= {"/docs", "/redoc", "/openapi.json"}
    paths |= {  # the /v2 model routes, with their path parameters filled in: labels stay bounded
        f"/v2/models/{model}{version}{action}"
        for model in oip.MODELS
        for version in ("", f"/versions/{oip.VERSION}")
        for action in ("", "/ready", "/infer")
    }
    metrics = Metrics(routes=paths, shared=settings.metrics_dir)
    logs_info = logging.getLogger("service").isEnabledFor(logging.INFO)  # as configure_logging set it
    access_log = settings.access_log and logs_info  # its lines are at info
    request_log = RequestLog(metrics, access_log=access_log, text=settings.log_format == "text")
    app = Service(
        metrics=metrics,
        request_log=request_log,
        outer=[
            *(
                [Middleware(ProxyHeadersMiddleware, trusted_hosts=settings.trusted_proxies)]
                if settings.trusted_proxies
                else []
            ),
            *([Middleware(RootPath, root_path=settings.root_path)] if settings.root_path else []),
            Middleware(Observe, metrics=metrics, log=request_log),
            *cors(settings),
            *([Middleware(RequireKey, docs_public=settings.docs_public)] if settings.auth_required else []),
            Middleware(BodyLimit, limit=settings.max_body_bytes),
        ],
        title="encoding-service",
        version=__version__,
        summary="Latent codes of binary vectors: autoencoder bottlenecks and VAE samples.",
        description=spec.DESCRIPTION,
        lifespan=lifespan,
        generate_unique_id_function=_operation_id,
        openapi_tags=spec.TAGS,
        # No OpenTelemetry: its per-request check alone costs ~3 us, and nothing here exports it.
        telemetry={"tracing": False, "metrics": False, "logs": False},
        openapi_url=None,  # service.docs serves /openapi.json,
        docs_url=None,  # and /docs and /redoc without any outside host
        redoc_url=None,
    )
    app.include_router(encoders)
    app.include_router(router)
    app.include_router(v2)
    add_docs(app)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(ClientDisconnect, client_gone_handler)
    app.add_exception_handler(oip.ProtocolError, protocol_error_handler)
    return app


def cors(settings: Settings) -> list[Middleware]:
    """CORS for the origins the settings name; none, and no middleware, by default."""
    if not settings.cors_origins:
        return []
    return [
        Middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "accept", "x-api-key", "x-request-id"],
            expose_headers=["x-request-id"],
            max_age=600,
        )
    ]


def _from_environment() -> FastAPI:
    try:
        return create_app()
    except ValidationError as exc:
        sys.exit(f"encoding-service: invalid settings: {describe(exc)}")


def __getattr__(name: str) -> FastAPI:
    """`service.main.app`, built from the environment the first time it is asked for (by
    `uvicorn service.main:app`), so that importing this module reads nothing, configures nothing
    and never exits."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = _from_environment()
    globals()["app"] = app  # built once a process
    return app
