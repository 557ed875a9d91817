"""The application: `create_app(settings)` builds it; the lifespan loads and checks the model."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypedDict

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.middleware import Middleware
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from service import __version__, spec, weights
from service.config import Settings, describe
from service.docs import add_docs
from service.http import BodyLimit, FastLane, OneLineStartupErrors, StartupError, validation_error_handler
from service.model import ModelError, seeded
from service.routes import Serving, encoders, router
from service.schemas import Limits, ModelInfo


class State(TypedDict):
    serving: Serving


def load(settings: Settings) -> Serving:
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
            "limits": Limits.model_validate(settings.model_dump(include=set(Limits.model_fields))),
        }
    )
    return Serving(model=model, info=info, settings=settings)


def _operation_id(route: APIRoute) -> str:
    """Operation ids are the handlers' names: encode_vae, model_info, ..."""
    return route.name


class Service(FastAPI):
    """FastAPI, with the service's own pure-ASGI middleware outermost, and the encode routes served
    by a FastLane just inside it, ahead of FastAPI's middleware, routing and exception layers.

    Measured through uvicorn, those layers cost a single-row request more than all its math.
    Middleware that must see every request goes in `outer`, not `add_middleware`.
    """

    def __init__(self, *, lanes: Sequence[BaseRoute], outer: Sequence[Middleware], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lanes = lanes
        self.outer = outer

    def build_middleware_stack(self) -> ASGIApp:
        app: ASGIApp = FastLane(super().build_middleware_stack(), self.lanes)
        for cls, args, kwargs in reversed(self.outer):
            app = cls(app, *args, **kwargs)
        return app


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service for these settings (by default, read from ENCODER_ environment variables)."""
    settings = Settings() if settings is None else settings

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[State]:
        loaded = load(settings)
        app.openapi_schema = spec.build(app, loaded.info)
        yield {"serving": loaded}

    app = Service(
        lanes=encoders.routes,
        outer=[
            Middleware(OneLineStartupErrors),
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
        docs_url=None,  # service.docs serves /docs and /redoc without any outside host
        redoc_url=None,
    )
    app.include_router(encoders)
    app.include_router(router)
    add_docs(app)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    return app


def _from_environment() -> FastAPI:
    try:
        return create_app()
    except ValidationError as exc:
        sys.exit(f"encoding-service: invalid settings: {describe(exc)}")


app = _from_environment()
