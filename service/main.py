"""The application: `create_app(settings)` builds it; the lifespan loads, checks and warms up the models."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
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

from service import __version__
from service.api import spec
from service.api.docs import add_docs
from service.api.served import core_error_handler
from service.api.v1.routes import encoders, router
from service.api.v2 import codec as oip
from service.api.v2.repository import repository as repository_routes
from service.api.v2.routes import protocol_error_handler, v2
from service.config import Settings, describe
from service.core.control import Action, Control, every
from service.core.gate import Gate
from service.core.inference import DEFAULT, Core, CoreError, Limits, Served, warm_up
from service.core.metrics import Metrics, usable
from service.core.repository import Repository, served_model
from service.core.traces import Tracer, sampler
from service.models import weights
from service.models.encoders import ModelError, seeded
from service.server.logs import configure_logging, json_errors, say_error
from service.web.access import Observe, RequestLog
from service.web.admission import Admission
from service.web.auth import Keys, Policy, RequireKey
from service.web.errors import (
    OneLineStartupErrors,
    StartupError,
    client_gone_handler,
    http_error_handler,
    validation_error_handler,
)
from service.web.lean import FastLane, LeanRoute
from service.web.paths import RootPath

logger = logging.getLogger("service")


class State(TypedDict):
    core: Core
    control: Control
    keys: Keys | None
    policy: Policy | None  # which requests take a key (None: none do), for RequireKey and gRPC alike
    settings: Settings  # what the server's protocol reads its deadlines from
    log: RequestLog  # where the gRPC server (service.server.rpc) counts and logs its calls too
    gate: Gate  # REST's Admission and the gRPC servicer admit requests through the same ones
    tracer: Tracer | None  # traces of REST requests (Observe) and gRPC calls (the servicer), when configured


def load_keys(settings: Settings) -> Keys | None:
    """The API keys the settings ask for, or None when the API is open."""
    if not settings.api_keys_required:
        return None
    key = settings.api_key.get_secret_value() if settings.api_key is not None else None
    try:
        keys = Keys(key, settings.api_keys_file)
    except OSError as exc:
        raise StartupError(f"API keys file {str(settings.api_keys_file)!r}: cannot be read ({exc.strerror})") from None
    except ValueError as exc:
        raise StartupError(f"API keys file {str(settings.api_keys_file)!r}: {exc}") from None
    if not keys.current():
        raise StartupError(f"API keys file {str(settings.api_keys_file)!r}: holds no key")
    return keys


def server_limits(settings: Settings) -> Limits:
    return Limits(settings.max_rows, settings.max_samples, settings.max_rows_x_samples)


def default_model(settings: Settings) -> Served:
    """The one model served without a repository (seeded, or ENCODER_WEIGHTS), checked and warmed
    up; StartupError (one line) when it cannot be served."""
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
    try:
        warm_up(model)
    except ModelError as exc:
        raise StartupError(str(exc)) from None
    # One model, whatever happens: its answers are as they were before models had names (no headers).
    return served_model(DEFAULT, 1, model, server_limits(settings), source, announced=False)


async def open_repository(settings: Settings) -> Repository:
    """The models to serve: the default one, or the model repository's, each version loaded."""
    if settings.model_repository is None:
        return Repository(server_limits(settings), fixed=default_model(settings))
    if not settings.model_repository.is_dir():
        raise StartupError(f"model repository {str(settings.model_repository)!r}: not a directory")
    repository = Repository(server_limits(settings), root=settings.model_repository)
    await repository.scan()
    return repository


def model_labels(served: Served) -> dict[str, str]:
    """encoder_model_info's labels for a served version."""
    source = served.source
    return {
        "fingerprint": served.fingerprint,
        "input_dim": str(served.model.input_dim),
        "latent_dim": str(served.model.latent_dim),
        "source": str(source["source"]),
        "file": str(source["file"] or ""),
        "seed": "" if source["seed"] is None else str(source["seed"]),
    }


def spec_widths(settings: Settings, repository: Repository) -> tuple[int, int]:
    """The widths the spec documents for the default model's routes: the default model's, or the
    settings' when a repository has no model named `default`."""
    default = repository.latest.get(DEFAULT)
    if default is not None:
        return default.model.input_dim, default.model.latent_dim
    return settings.input_dim, settings.latent_dim


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
    policy = Policy.of(settings)

    @asynccontextmanager
    async def lifespan(app: Service) -> AsyncIterator[State]:
        if settings.metrics_dir is not None and (problem := usable(settings.metrics_dir)) is not None:
            raise StartupError(f"ENCODER_METRICS_DIR {str(settings.metrics_dir)!r}: {problem}")
        repository = await open_repository(settings)
        keys = load_keys(settings)
        core = Core(repository, app.metrics, settings.max_body_bytes)
        app.metrics.served = lambda: [
            (served.name, served.version, model_labels(served))
            for versions in repository.serving.values()
            for served in versions
        ]

        async def apply(action: Action) -> None:
            verb, name = action
            try:
                await (repository.load(name) if verb == "load" else repository.unload(name))
            except CoreError as exc:  # what the caller hears of: the index says it
                logger.warning("repository: %s %s: %s", verb, name, exc)

        shared = settings.metrics_dir if settings.model_repository is not None else None
        control = Control(apply, shared)
        await control.catch_up()  # what the other workers were told before this one started
        tasks = [asyncio.create_task(control.run())] if shared is not None else []
        if settings.model_repository is not None and settings.repository_poll is not None:
            poll = every(settings.repository_poll, repository.scan, "the scan failed")
            tasks.append(asyncio.create_task(poll))
        input_dim, latent_dim = spec_widths(settings, repository)
        app.openapi_schema = spec.build(
            app, input_dim, latent_dim, settings, auth=keys is not None, admin_only=settings.admin_api_key is not None
        )
        export = None
        if tracer is not None:
            try:
                from service.server.otel import Export

                export = Export(settings, app.metrics)
            except ImportError as exc:  # the otel extra is not installed, or only part of it
                raise StartupError(
                    f"traces need the otel extra (from a clone: pip install -e '.[otel]'): {exc}"
                ) from None
            tracer.export = export
            export.start()
        # What startup made (modules, models, OpenTelemetry's exporter when traces are on) lives as long
        # as the process: frozen, the collector no longer walks it at every full collection. Measured
        # (bench/paired.py): neutral with traces off, about 6% of a one-row request with them on.
        gc.freeze()
        try:
            yield {
                "core": core,
                "control": control,
                "keys": keys,
                "policy": policy,
                "settings": settings,
                "log": app.request_log,
                "gate": gate,
                "tracer": tracer,
            }
        finally:
            for task in tasks:
                task.cancel()
            app.request_log.flush()
            gc.unfreeze()
            if export is not None:
                await export.stop()  # what is kept goes out before the process exits

    configure_logging(settings.log_level, settings.log_format)
    routers = [encoders, router, v2, repository_routes]
    paths = {getattr(route, "path", "") for each in routers for route in each.routes}
    paths |= {"/docs", "/redoc", "/openapi.json"}
    metrics = Metrics(routes=paths, shared=settings.metrics_dir)
    logs_info = logging.getLogger("service").isEnabledFor(logging.INFO)  # as configure_logging set it
    access_log = settings.access_log and logs_info  # its lines are at info
    request_log = RequestLog(metrics, access_log=access_log, text=settings.log_format == "text")
    # One set of limits for REST (Admission) and gRPC (the servicer, through the lifespan's state).
    gate = Gate(metrics, settings.max_requests_in_progress, settings.memory_budget, settings.admission_wait)
    tracer = tracing(settings, metrics)
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
            Middleware(Observe, metrics=metrics, log=request_log, tracer=tracer),
            *cors(settings),
            *([Middleware(RequireKey, docs_public=settings.docs_public, policy=policy)] if policy is not None else []),
            Middleware(Admission, gate=gate, max_body=settings.max_body_bytes),
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
        openapi_url=None,  # service.api.docs serves /openapi.json,
        docs_url=None,  # and /docs and /redoc without any outside host
        redoc_url=None,
    )
    for each in routers:
        app.include_router(each)
    add_docs(app)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)
    app.add_exception_handler(RequestValidationError, validation_error_handler)
    app.add_exception_handler(ClientDisconnect, client_gone_handler)
    app.add_exception_handler(oip.ProtocolError, protocol_error_handler)
    app.add_exception_handler(CoreError, core_error_handler)
    return app


def tracing(settings: Settings, metrics: Metrics) -> Tracer | None:
    """The tracer when the OTEL_ settings ask for traces (the lifespan gives it its export,
    service.server.otel); None, and OpenTelemetry never imported, when they do not."""
    if not settings.traces:
        return None
    return Tracer(sampler(settings.otel_traces_sampler, settings.otel_traces_sampler_arg), None, metrics.exemplar)


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
        say_error(f"invalid settings: {describe(exc)}", json_errors())
        sys.exit(1)


def __getattr__(name: str) -> FastAPI:
    """`service.main.app`, built from the environment the first time it is asked for (by
    `uvicorn service.main:app`), so that importing this module reads nothing, configures nothing
    and never exits."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    app = _from_environment()
    globals()["app"] = app  # built once a process
    return app
