"""The one settings object: every field can be set by an ENCODER_-prefixed environment variable."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.core.traces import SamplerName

ROOT_PATH = r"^(/[^/\s]+)*$"  # "" or "/api", "/a/b": no trailing slash
KEY = re.compile(r"[!-~]+")  # an API key: printable ASCII without spaces, as a header carries it


class Settings(BaseSettings):
    """Service settings. `ENCODER_SEED=7` sets `seed`, and so on for every field."""

    # Each field's docstring is its description: the README's settings table is made from them.
    model_config = SettingsConfigDict(
        env_prefix="ENCODER_", extra="forbid", frozen=True, use_attribute_docstrings=True, populate_by_name=True
    )

    seed: int = Field(default=0, ge=0, lt=2**63)
    """Seed of the default weights, used when no weights file is given."""

    input_dim: int = Field(default=5, ge=1, le=1_000_000)
    """Width of an input row for seeded weights (a weights file brings its own)."""

    latent_dim: int = Field(default=2, ge=1, le=65_536)
    """Width of a code for seeded weights (a weights file brings its own)."""

    weights: Path | None = None
    """Path of a .npz or .safetensors weights file; when set it wins over the seed."""

    model_repository: Path | None = None
    """A model repository to serve instead of one model: `DIR/<name>/<version>/model.safetensors`
    (or `model.npz`), with an optional `DIR/<name>/config.json`; models load and unload at run time."""

    repository_poll: float | None = Field(default=None, gt=0, le=86_400)
    """Seconds between scans of ENCODER_MODEL_REPOSITORY: new versions load, changed files reload,
    removed ones unload. Unset: only at startup and by the load and unload API."""

    max_rows: int = Field(default=10_000, ge=1)
    """Most rows in one request."""

    max_samples: int = Field(default=1_000, ge=1)
    """Most VAE samples per row in one request."""

    max_rows_x_samples: int = Field(default=100_000, ge=1)
    """Most z vectors (rows x samples) in one VAE response."""

    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1)
    """Largest request body in bytes; a larger one is refused with 413 before it is read."""

    max_requests_in_progress: int = Field(default=256, ge=1)
    """Most requests a worker handles at once (probes and /metrics aside); one more is answered 503
    with Retry-After at once."""

    memory_budget: int = Field(default=256 * 1024 * 1024, ge=1024 * 1024)
    """Bytes of request bodies a worker holds at once, each counted at 4 times its size (read,
    parsed, made into arrays); bodies under 64 KiB are not counted. A request that does not fit
    waits, then gets 503 with Retry-After. The default fits the manifests' 512 MiB per pod with one
    worker: size it as (memory limit - 100 MiB - models) / workers, about."""

    admission_wait: float = Field(default=5.0, ge=0, le=600)
    """Seconds a request waits for room in ENCODER_MEMORY_BUDGET before its 503."""

    request_timeout: float = Field(default=30.0, gt=0)
    """Seconds a client may take to send a request's headers, and again its body: a slower body
    gets 408, slower headers a closed connection (with `encoding-service serve`)."""

    keep_alive_timeout: int = Field(default=5, ge=1)
    """Seconds an idle keep-alive connection stays open (`encoding-service serve`): set it above
    the idle timeout of a load balancer in front, or it may reuse a connection being closed."""

    shutdown_delay: float = Field(default=5.0, ge=0, le=3600)
    """Seconds `encoding-service serve` keeps serving after SIGTERM, answering 503 on the readiness
    endpoints, before it stops accepting: time for Kubernetes to take the endpoint out of its
    Service and for balancers to notice (a few seconds; 5 covers kube-proxy and most ingresses).
    0 stops at once; SIGINT (Ctrl-C) skips it."""

    api_key: SecretStr | None = None
    """An API key that /v1 and /v2 requests must send (Authorization: Bearer, or X-API-Key). Unset: open."""

    api_keys_file: Path | None = None
    """A file of API keys, one a line (`#` starts a comment line), read again when it changes:
    rotate keys without a restart."""

    admin_api_key: SecretStr | None = None
    """The key that loading and unloading models takes (POST /v2/repository/models/{name}/load,
    /unload), and no other key may; valid on every route. Unset: any API key may (any client, when
    the API is open)."""

    docs_public: bool = True
    """Whether /docs, /redoc and /openapi.json stay open when API keys are required."""

    cors_origins: Annotated[list[str], NoDecode] = []
    """Origins allowed to call the API from a browser, comma-separated; none by default."""

    root_path: str = Field(default="", pattern=ROOT_PATH)
    """Path prefix that a proxy in front strips (`/api`): every route, /docs and the spec's server
    URL then work under it. `uvicorn --root-path` does the same."""

    trusted_proxies: Annotated[list[str], NoDecode] = []
    """Proxies whose X-Forwarded-For and X-Forwarded-Proto are believed, comma-separated addresses or
    networks (`10.0.0.0/8`, `*` for any), so that the access log names the real client. None by default."""

    metrics_dir: Path | None = None
    """A directory all worker processes of one server share, where each keeps its counts so that
    /metrics counts every worker, and through which a model repository's loads and unloads reach
    every worker. It must exist and be writable. `encoding-service serve` makes one when
    ENCODER_WORKERS > 1, and empties one you set at its start; set it for another multi-process
    server, emptied at its start."""

    access_log: bool = True
    """One line per request on stdout (ENCODER_LOG_FORMAT): request id, method, path, status,
    duration, size, client."""

    host: str = "127.0.0.1"
    """Address `encoding-service serve` listens on (0.0.0.0 in the container image)."""

    port: int = Field(default=8000, ge=0, le=65_535)
    """Port `encoding-service serve` listens on."""

    grpc_port: int = Field(default=8001, ge=0, le=65_535)
    """Port `encoding-service serve` serves gRPC on, beside HTTP on the same host: the Open Inference
    Protocol (inference.GRPCInferenceService), grpc.health.v1 and reflection. 0: no gRPC."""

    workers: int = Field(default=1, ge=1, le=64)
    """Worker processes `encoding-service serve` starts."""

    log_format: Literal["json", "text"] = "json"
    """`json`: every line the process writes (the access log, uvicorn's own lines with
    `encoding-service serve`, errors with their traceback in one field) is one JSON object; `text`
    for a terminal."""

    log_level: str = Field(default="info", pattern="^(critical|error|warning|info|debug|trace)$")
    """critical, error, warning, info, debug or trace; at warning and above, no access log."""

    # Traces: OpenTelemetry's own variables, as every OpenTelemetry SDK reads them (no ENCODER_ prefix).
    # The exporter reads the rest of its own (OTEL_EXPORTER_OTLP_HEADERS, _TIMEOUT, _COMPRESSION, ...).

    otel_traces_exporter: Literal["otlp", "none"] | None = Field(default=None, validation_alias="OTEL_TRACES_EXPORTER")
    """`otlp` sends traces to OTEL_EXPORTER_OTLP_ENDPOINT; `none`, or unset with no endpoint set, sends
    none, and requests pay nothing for traces. Unset with an endpoint set: `otlp`. Needs the `otel`
    extra (from a clone, `pip install -e '.[otel]'`; the image has it)."""

    otel_exporter_otlp_endpoint: str | None = Field(
        default=None, pattern=r"^https?://\S+$", validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    """Where an OpenTelemetry collector listens: `http://collector:4318` (http/protobuf; traces go to
    its /v1/traces) or `http://collector:4317` (grpc). Unset: http://localhost:4318 (4317 for grpc)."""

    otel_exporter_otlp_traces_endpoint: str | None = Field(
        default=None, pattern=r"^https?://\S+$", validation_alias="OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    """The full URL traces go to, over OTEL_EXPORTER_OTLP_ENDPOINT (nothing is appended to it)."""

    otel_exporter_otlp_protocol: Literal["http/protobuf", "grpc"] = Field(
        default="http/protobuf",
        validation_alias=AliasChoices("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"),
    )
    """How traces are sent: `http/protobuf` or `grpc` (OTEL_EXPORTER_OTLP_TRACES_PROTOCOL wins)."""

    otel_service_name: str | None = Field(default=None, min_length=1, validation_alias="OTEL_SERVICE_NAME")
    """The service.name of the traces (over OTEL_RESOURCE_ATTRIBUTES'); unset: encoding-service."""

    otel_traces_sampler: SamplerName = Field(default="parentbased_always_on", validation_alias="OTEL_TRACES_SAMPLER")
    """Which requests are traced: parent-based samplers follow the caller's `traceparent` (its
    sampled flag) and decide alone for a request without one; `traceidratio` keeps a share of traces."""

    otel_traces_sampler_arg: float | None = Field(default=None, ge=0, le=1, validation_alias="OTEL_TRACES_SAMPLER_ARG")
    """The share of traces the ratio samplers keep, 0 to 1 (unset: 1)."""

    otel_bsp_max_queue_size: int = Field(default=2048, ge=1, le=1_000_000, validation_alias="OTEL_BSP_MAX_QUEUE_SIZE")
    """Most spans kept for export; more are dropped, never waited for (encoder_spans_dropped_total)."""

    otel_bsp_schedule_delay: int = Field(default=5000, ge=0, le=3_600_000, validation_alias="OTEL_BSP_SCHEDULE_DELAY")
    """Milliseconds between exports (sooner when a batch is full)."""

    otel_bsp_max_export_batch_size: int = Field(
        default=512, ge=1, le=1_000_000, validation_alias="OTEL_BSP_MAX_EXPORT_BATCH_SIZE"
    )
    """Most spans in one export."""

    otel_bsp_export_timeout: int = Field(default=30000, ge=1, le=3_600_000, validation_alias="OTEL_BSP_EXPORT_TIMEOUT")
    """Milliseconds the drain waits for the spans kept to be exported before the process exits."""

    otel_sdk_disabled: bool = Field(default=False, validation_alias="OTEL_SDK_DISABLED")
    """`true`: no traces, whatever else is set."""

    @field_validator("cors_origins", "trusted_proxies", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value

    @field_validator("api_key", "admin_api_key")
    @classmethod
    def _not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is empty: unset it to leave the API open, or give a key")
        if value is not None and not KEY.fullmatch(value.get_secret_value()):
            raise ValueError("a key is printable ASCII without spaces")
        return value

    @property
    def traces(self) -> bool:
        """Whether requests are traced and traces exported (the OTEL_ settings)."""
        if self.otel_sdk_disabled or self.otel_traces_exporter == "none":
            return False
        endpoint = self.otel_exporter_otlp_endpoint or self.otel_exporter_otlp_traces_endpoint
        return self.otel_traces_exporter == "otlp" or endpoint is not None

    @property
    def auth_required(self) -> bool:
        return self.api_key is not None or self.api_keys_file is not None or self.admin_api_key is not None

    @property
    def api_keys_required(self) -> bool:
        """Whether the API (not only loading and unloading models) needs a key."""
        return self.api_key is not None or self.api_keys_file is not None


def describe(error: ValidationError) -> str:
    """A settings error on one line, naming the environment variable and the problem."""
    parts = []
    for item in error.errors(include_url=False, include_input=False):
        field = ".".join(str(part) for part in item["loc"])
        parts.append(f"{variable(field)}: {item['msg']}")
    return "; ".join(parts)


def settings_table() -> str:
    """The README's table of settings, made from the fields and their docstrings
    (`encoding-service settings` prints it; tests/test_readme.py checks the README's copy)."""
    rows = ["| variable | default | meaning |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        if default is None or default == "" or default == []:
            shown = "unset"
        elif isinstance(default, bool):
            shown = f"`{str(default).lower()}`"
        else:
            shown = f"`{default:g}`" if isinstance(default, float) else f"`{default}`"
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{variable(name)}` | {shown} | {meaning} |")
    return "\n".join(rows) + "\n"


def variable(field: str) -> str:
    """The environment variable that sets a field (or names an alias): ENCODER_SEED, OTEL_SERVICE_NAME."""
    if field.startswith("OTEL_"):
        return field
    info = Settings.model_fields.get(field)
    alias = info.validation_alias if info is not None else None
    if isinstance(alias, AliasChoices):
        return " or ".join(str(choice) for choice in alias.choices)
    return alias if isinstance(alias, str) else f"ENCODER_{field.upper()}"
