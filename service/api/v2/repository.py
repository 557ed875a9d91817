"""The protocol's model repository extension, as Triton and MLServer answer it: the index, and
load and unload by name. Loads and unloads reach every worker before they are answered
(service.core.control)."""

from __future__ import annotations

from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError

from service.api.served import core_of
from service.api.v2 import codec as oip
from service.api.v2.codec import ErrorResponse
from service.core.control import Control, change

repository = APIRouter(tags=["repository"])
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Not a model name, no repository, or no version could be loaded."},
    403: {"model": ErrorResponse, "description": "A valid key, but not the admin key (ENCODER_ADMIN_API_KEY)."},
    404: {"model": ErrorResponse, "description": "No such model in the repository."},
    503: {"model": ErrorResponse, "description": "Not loaded yet, or a worker did not apply the change in time."},
}


class IndexRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"ready": True}]})

    ready: StrictBool = Field(default=False, description="Only the versions that are ready.")


class IndexEntry(BaseModel):
    name: str
    version: str = Field(description="The version, or empty for a model that has none to list.")
    state: str = Field(description="READY or UNAVAILABLE.")
    reason: str = Field(description="Why a version is not ready, or why its last reload failed.")


class ControlRequest(BaseModel):
    """Triton's clients send parameters (unload_dependents, config); none applies here."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [{"parameters": {}}]})

    parameters: dict[str, Any] | None = None


Body = TypeVar("Body", bound=BaseModel)


def _control(request: Request) -> Control:
    control: Control | None = request.scope.get("state", {}).get("control")
    if control is None:
        raise HTTPException(503, "the models are not loaded yet")
    return control


def _body(schema: type[BaseModel]) -> dict[str, Any]:
    """The operation's request body for the spec: the body is read by `_read`, since Triton's
    clients send an empty one (the spec's components gain the schema in service.api.spec)."""
    reference = {"$ref": f"#/components/schemas/{schema.__name__}"}
    return {"requestBody": {"required": False, "content": {"application/json": {"schema": reference}}}}


async def _read(request: Request, schema: type[Body]) -> Body:
    """The body as `schema`; an empty one (what Triton's clients send) as its defaults."""
    raw = await request.body()
    if not raw.strip():
        return schema()
    try:
        return schema.model_validate(orjson.loads(raw))
    except orjson.JSONDecodeError as exc:
        raise oip.ProtocolError(f"invalid JSON at character {exc.pos}: {exc.msg}") from None
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in first["loc"])
        raise oip.ProtocolError(f"{where}: {first['msg']}" if where else first["msg"]) from None


@repository.post(
    "/v2/repository/index",
    response_model=list[IndexEntry],
    responses=ERRORS,
    summary="Repository index",
    openapi_extra=_body(IndexRequest),
)
async def repository_index(request: Request) -> list[dict[str, str]]:
    """Every model of the repository with each version's state (and, when not ready, why)."""
    body = await _read(request, IndexRequest)
    rows: list[dict[str, str]] = core_of(request).repository.index(ready_only=body.ready)
    return rows


@repository.post(
    "/v2/repository/models/{model_name}/load",
    response_model=list[IndexEntry],
    responses=ERRORS,
    summary="Load a model",
    openapi_extra=_body(ControlRequest),
)
async def load_model(model_name: str, request: Request) -> list[dict[str, str]]:
    """Load the model from its directory, or load it again: new versions are served, changed files
    read again, removed versions unloaded; a version whose file is bad keeps what it served. Answered
    once every worker serves the result: the model's index entries; 400 if no version is ready."""
    return await _change(request, "load", model_name)


@repository.post(
    "/v2/repository/models/{model_name}/unload",
    response_model=list[IndexEntry],
    responses=ERRORS,
    summary="Unload a model",
    openapi_extra=_body(ControlRequest),
)
async def unload_model(model_name: str, request: Request) -> list[dict[str, str]]:
    """Stop serving every version of the model (requests already running finish on it); it stays
    unloaded until loaded again. Answered once every worker has unloaded it."""
    return await _change(request, "unload", model_name)


async def _change(request: Request, verb: str, name: str) -> list[dict[str, str]]:
    """Load or unload `name` in every worker (service.core.control.change): its index entries after."""
    core, control = core_of(request), _control(request)
    await _read(request, ControlRequest)  # checked; nothing in it applies
    return await change(core, control, verb, name)
