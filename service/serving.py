"""What every route serves from: the model the lifespan loaded (Serving, the ServingDep dependency)
and the limits a batch is held to (over_limit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from service.config import Settings
from service.metrics import Metrics
from service.model import Model
from service.schemas import (
    ModelInfo,
)


@dataclass(frozen=True)
class Serving:
    """What the lifespan loaded: the model, its description, and the settings it was loaded with."""

    model: Model
    info: ModelInfo
    settings: Settings
    metrics: Metrics


async def serving(request: Request) -> Serving:
    """The loaded model, or 503 while there is none."""
    loaded: Serving | None = request.scope.get("state", {}).get("serving")  # the lifespan's State
    if loaded is None:
        raise HTTPException(503, "the model is not loaded yet")
    return loaded


ServingDep = Annotated[Serving, Depends(serving)]


def over_limit(rows: int, samples: int, limits: Settings) -> str | None:
    """What limit a request of `rows` rows and `samples` samples per row is over, if any."""
    if rows > limits.max_rows:
        return f"{rows} rows is more than the limit of {limits.max_rows} (ENCODER_MAX_ROWS)"
    if samples > limits.max_samples:
        return f"{samples} samples is more than the limit of {limits.max_samples} (ENCODER_MAX_SAMPLES)"
    if rows * samples > limits.max_rows_x_samples:
        return (
            f"{rows} rows x {samples} samples = {rows * samples} is more than the limit of "
            f"{limits.max_rows_x_samples} (ENCODER_MAX_ROWS_X_SAMPLES)"
        )
    return None
