"""The inference core that every front end calls: resolve a model and its version, hold a batch to
the limits, draw the seed, compute, count. No HTTP and no protocol: a mistake is a CoreError whose
`problem` each front end turns into its own status (service/api/v1, service/api/v2).

    core = Core(repository, metrics)
    served = core.resolve("fingerprints", None)        # the highest ready version
    arrays, seed = core.encode(served, (VAE,), x, samples=3, seed=None)
    arrays["z"], seed
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import numpy as np

from service.core.metrics import Metrics
from service.core.traces import TRACE, Span
from service.models.encoders import DECODE_LIMIT, ROWS_PER_BLOCK, Array, Batch, Model, ModelError
from service.models.kinds import KINDS, Kind

SEED_LIMIT = 2**63
DEFAULT = "default"  # the name of the model served without a repository, and of the legacy routes' model
VERSION = re.compile(r"[1-9][0-9]{0,8}")  # a version: a positive integer, as its directory is named


class Problem(StrEnum):
    """What kind of mistake a request made; each front end has a status for each."""

    NOT_FOUND = "not_found"  # no such model, or no such version of it
    NOT_READY = "not_ready"  # nothing loaded yet, or no version of the model is ready
    OVER_LIMIT = "over_limit"  # too many rows, samples, or rows x samples
    BAD_INPUT = "bad_input"  # not a batch the model takes; `where` is (row,) or (row, column)
    NO_DECODER = "no_decoder"  # the weights have no decoder for the decode and reconstruct routes
    LOAD_FAILED = "load_failed"  # a load left no version of the model ready (the index says why)
    NOT_APPLIED = "not_applied"  # a worker did not apply a load or unload in time
    DEADLINE = "deadline"  # the caller's deadline passed while its batch was computed (gRPC's deadlines)


class CoreError(Exception):
    def __init__(self, problem: Problem, message: str, where: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.problem = problem
        self.where = where


def shown(text: str, most: int = 64) -> str:
    """A client's string quoted for a message, cut to `most` characters: never echoed whole."""
    return repr(text) if len(text) <= most else repr(text[:most]) + "..."


@dataclass(frozen=True)
class Limits:
    """The most a request may ask of a model, and where each limit was set (for the message)."""

    max_rows: int
    max_samples: int
    max_rows_x_samples: int
    source: str = "ENCODER_"  # "ENCODER_" (the server's settings) or a model's config.json

    def over(self, rows: int, samples: int) -> str | None:
        """The limit a request of `rows` rows and `samples` samples per row is over, if any."""
        if rows > self.max_rows:
            return f"{rows} rows is more than the limit of {self.max_rows} ({self._name('max_rows')})"
        if samples > self.max_samples:
            return f"{samples} samples is more than the limit of {self.max_samples} ({self._name('max_samples')})"
        if rows * samples > self.max_rows_x_samples:
            return (
                f"{rows} rows x {samples} samples = {rows * samples} is more than the limit of "
                f"{self.max_rows_x_samples} ({self._name('max_rows_x_samples')})"
            )
        return None

    def _name(self, limit: str) -> str:
        return f"ENCODER_{limit.upper()}" if self.source == "ENCODER_" else f"{limit} in {self.source}"


@dataclass(frozen=True, eq=False)
class Served:
    """One loaded, checked and warmed-up version of a model. Immutable: a request that resolved it
    finishes on it, whatever is loaded or unloaded meanwhile."""

    name: str
    version: int
    model: Model
    limits: Limits
    fingerprint: str
    loaded_at: datetime
    source: dict[str, Any]  # {"source": "seed" | "file", "seed": ..., "file": ...}
    description: str = ""
    # Whether responses say who answered (x-model-name, x-model-version): with a model repository,
    # where what answers can change; not for the one model served without (its answers are as
    # they were before models had names, and two header lines cost a one-row request 2-3%).
    announced: bool = True
    # Made once, used by every request: what a response says of who answered (header lines), what
    # the access log adds to a line (JSON, text), and the metrics' keys by kind.
    headers: tuple[tuple[bytes, bytes], ...] = field(default=(), init=False)
    input_dim: int = field(default=0, init=False)
    log: tuple[bytes, bytes] = field(default=(b"", b""), init=False)
    keys: dict[str, str] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        version = str(self.version).encode()
        answered = ((b"x-model-name", self.name.encode()), (b"x-model-version", version))
        object.__setattr__(self, "headers", answered if self.announced else ())
        object.__setattr__(self, "input_dim", self.model.input_dim)
        name = self.name.encode()  # a name is letters, digits, '_', '.' and '-': nothing to escape
        object.__setattr__(
            self, "log", (b',"model":"%s","version":%s' % (name, version), b" model=%s version=%s" % (name, version))
        )
        object.__setattr__(self, "keys", {kind: f"{self.name}|{self.version}|{kind}" for kind in (*KINDS, "")})


Expired = Callable[[], bool]  # whether the caller's deadline has passed


# What an encoding gives: the arrays by name, and the seed of eps when a sampled kind ran. A plain
# tuple: a NamedTuple costs a one-row request 0.4 us to make, measured.
Encoded = tuple[dict[str, Array], int | None]


class Core:
    """Resolve, check, compute, count: the one place where the rules of a request live."""

    def __init__(self, repository: Any, metrics: Metrics, max_body_bytes: int) -> None:
        self.repository = repository  # service.core.repository.Repository: `serving`, `known(name)`
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes  # the server's, for what a model's description says

    # -- which model answers

    @staticmethod
    def target(name: str) -> tuple[str, tuple[Kind, ...]]:
        """The model a served name stands for, and which of its kinds: `autoencoder` and `vae` are
        the default model's kinds (today's names); any other name is a model with all its kinds."""
        kind = KINDS.get(name)
        return (DEFAULT, (kind,)) if kind is not None else (name, tuple(KINDS.values()))

    def answering(self, served_name: str, version: str | None) -> tuple[Served, tuple[Kind, ...]]:
        """The version that answers for a served name (`target`), and which of its kinds: what
        the protocol's routes and RPCs ask first."""
        name, kinds = self.target(served_name)
        return self.resolve(name, version), kinds

    def resolve(self, name: str | None, version: str | int | None) -> Served:
        """The named model (the default one for None) at `version`, or its highest ready version."""
        if version is None and (latest := self.repository.latest.get(name)) is not None:
            return latest  # type: ignore[no-any-return]
        name = DEFAULT if name is None else name
        versions = self.repository.serving.get(name)
        if not versions:
            self._missing(name)
        if version is None:
            served: Served = versions[-1]
            return served
        number = version if isinstance(version, int) else int(version) if VERSION.fullmatch(version) else -1
        for served in versions:
            if served.version == number:
                return served
        ready = ", ".join(str(s.version) for s in versions)
        message = f"model {shown(name)} has no ready version {shown(str(version), 16)}; its ready versions: {ready}"
        raise CoreError(Problem.NOT_FOUND, message)

    def _missing(self, name: str) -> None:
        if self.repository.known(name) and self.repository.why(name) == "unloaded":
            message = f"model {shown(name)} is unloaded (POST /v2/repository/models/{name}/load serves it again)"
            raise CoreError(Problem.NOT_FOUND, message)
        if self.repository.known(name):
            raise CoreError(Problem.NOT_READY, f"model {shown(name)} has no ready version: {self.repository.why(name)}")
        served = ", ".join(sorted(self.repository.serving)) or "none"
        raise CoreError(Problem.NOT_FOUND, f"no model {shown(name)}; this server serves: {served}")

    # -- the rules of a batch

    @staticmethod
    def check(served: Served, rows: int, samples: int = 1) -> None:
        """OVER_LIMIT unless `rows` rows of `samples` samples each are within the model's limits."""
        if (problem := served.limits.over(rows, samples)) is not None:
            raise CoreError(Problem.OVER_LIMIT, problem)

    @staticmethod
    def check_width(served: Served, width: int, latent: bool = False) -> None:
        """BAD_INPUT unless rows of `width` values fit the model's input (or, `latent`, its codes)."""
        expected = served.model.latent_dim if latent else served.model.input_dim
        if width != expected:
            what = "latent_dim" if latent else "input_dim"
            raise CoreError(Problem.BAD_INPUT, f"rows have {width} values, but the model's {what} is {expected}", (0,))

    @staticmethod
    def draw_seed(seed: int | None) -> int:
        """The seed of eps: the client's, or one drawn here (the only place a server draws one)."""
        return secrets.randbelow(SEED_LIMIT) if seed is None else seed

    # -- compute and count

    def encode_one(
        self,
        served: Served,
        kind: Kind,
        x: Batch,
        samples: int = 1,
        seed: int | None = None,
        expired: Expired | None = None,
    ) -> Encoded:
        """As `encode`, for one kind: the path of a /v1 request, kept short."""
        rows = self._admit(served, x, kind.sampled, samples)
        drawn = self.draw_seed(seed) if kind.sampled else None
        if (span := TRACE.get()) is not None:  # a sampled request's (traces on)
            traced(span, rows, samples if kind.sampled else 0, seed)
        arrays = compute(kind, served.model, x, samples, 0 if drawn is None else drawn, expired)
        self.metrics.encoded(served, kind.name, rows, rows * samples if kind.sampled else 0)
        return arrays, drawn

    def encode(
        self,
        served: Served,
        kinds: Sequence[Kind],
        x: Batch,
        samples: int = 1,
        seed: int | None = None,
        expired: Expired | None = None,
    ) -> Encoded:
        """The outputs of each kind for the 0/1 rows x, within the limits; counted. With `expired`
        (a caller's deadline), a batch is computed in blocks and given up, DEADLINE, between two
        blocks once it says so (`compute`): nothing is counted then."""
        if len(kinds) == 1:
            return self.encode_one(served, kinds[0], x, samples, seed, expired)
        sampled = any(kind.sampled for kind in kinds)
        rows = self._admit(served, x, sampled, samples)
        drawn = self.draw_seed(seed) if sampled else None
        if (span := TRACE.get()) is not None:
            traced(span, rows, samples if sampled else 0, seed)
        arrays: dict[str, Array] = {}
        for kind in kinds:
            arrays |= compute(kind, served.model, x, samples, 0 if drawn is None else drawn, expired)
        for kind in kinds:
            self.metrics.encoded(served, kind.name, rows, rows * samples if kind.sampled else 0)
        return arrays, drawn

    def _admit(self, served: Served, x: Batch, sampled: bool, samples: int) -> int:
        """The rows of a batch to encode, if it is within the limits and as wide as the model's input.
        The limits are compared inline first: the message is made only for a batch over one."""
        rows, width = x.shape
        limits = served.limits
        if rows > limits.max_rows or (
            sampled and (samples > limits.max_samples or rows * samples > limits.max_rows_x_samples)
        ):
            self.check(served, rows, samples if sampled else 1)  # raises, saying which limit
        if width != served.input_dim:
            self.check_width(served, width)
        return int(rows)

    def decode(self, served: Served, kind: Kind, h: Array) -> Array:
        """Bit probabilities of codes (or z) h within +-DECODE_LIMIT, by the kind's decoder."""
        self.require_decoder(served, kind)
        self.check(served, h.shape[0])
        self.check_width(served, h.shape[1], latent=True)
        if h.size and float(abs(h).max()) > DECODE_LIMIT:  # the schemas refuse these first
            raise CoreError(Problem.BAD_INPUT, f"codes must lie within +-{DECODE_LIMIT:g}")
        return kind.decode(served.model, h)

    def reconstruct(self, served: Served, kind: Kind, x: Batch) -> Array:
        """Bit probabilities of each row's own deterministic code (the VAE's: mu)."""
        self.require_decoder(served, kind)
        self.check(served, x.shape[0])
        self.check_width(served, x.shape[1])
        self.metrics.encoded(served, kind.name, x.shape[0])
        return kind.reconstruct(served.model, x)

    @staticmethod
    def require_decoder(served: Served, kind: Kind) -> None:
        """NO_DECODER unless the served weights have the kind's decoder."""
        if not kind.has_decoder(served.model):
            message = "the served weights have no decoder; train some with: encoding-service train"
            raise CoreError(Problem.NO_DECODER, message)


def compute(kind: Kind, model: Model, x: Batch, samples: int, seed: int, expired: Expired | None) -> dict[str, Array]:
    """The kind's outputs for the rows x. With `expired`, a batch of more than ROWS_PER_BLOCK rows
    is computed a block at a time, and given up (DEADLINE) before the next block once `expired()`
    says so: a long computation ends soon after its caller's deadline instead of running on.

    The numbers are the same either way: the blocks are those `affine` computes in, and eps is
    drawn from one generator passed through them, row after row, as for the whole batch.
    """
    n = x.shape[0]
    if expired is None or n <= ROWS_PER_BLOCK:
        return kind.compute(model, x, samples, seed)
    rng = np.random.default_rng(seed)
    arrays: dict[str, Array] = {}
    for start in range(0, n, ROWS_PER_BLOCK):
        if expired():
            raise CoreError(Problem.DEADLINE, f"the call's deadline passed; {start} of its {n} rows were computed")
        block = kind.compute(model, x[start : start + ROWS_PER_BLOCK], samples, rng)
        for name, values in block.items():
            if name not in arrays:
                arrays[name] = np.empty((n, *values.shape[1:]), dtype=values.dtype)
            arrays[name][start : start + len(values)] = values
    return arrays


def traced(span: Span, rows: int, samples: int, seed: int | None) -> None:
    """What a traced request asked: rows, samples of z per row (0 when none are drawn), whether it gave a seed."""
    span.attributes |= {"encoder.rows": rows, "encoder.samples": samples, "encoder.seeded": seed is not None}


def warm_up(model: Model) -> None:
    """Answer one request of each kind (and decoder) on a row of zeros and one of ones; ModelError
    if any output is not finite. A version is ready only after this."""
    x = np.array([[0] * model.input_dim, [1] * model.input_dim], dtype=np.uint8)
    for kind in KINDS.values():
        outputs = kind.compute(model, x, 1, 0)
        if kind.has_decoder(model):
            outputs["reconstructed"] = kind.reconstruct(model, x)
        for name, value in outputs.items():
            if not np.isfinite(value).all():
                raise ModelError(f"warm-up: {kind.name} output {name!r} is not finite")
