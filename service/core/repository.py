"""The models a server serves: one seeded or file model (no repository), or a model repository laid
out as Triton's, `DIR/<name>/<version>/model.safetensors` (or `model.npz`) with an optional
`DIR/<name>/config.json`, loaded and unloaded at run time (explicitly, or by polling the directory).

What requests read is `serving`: name -> the ready versions (Served, ascending), a mapping that is
replaced whole, never changed in place, after each load or unload. A request holds the Served it
resolved until it ends, so a swap never changes the version a request started on, and an unloaded
version's memory is returned once its last request is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import re
import stat
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.core.inference import DEFAULT, VERSION, CoreError, Limits, Problem, Served, shown, warm_up
from service.models import weights
from service.models.encoders import Model, ModelError
from service.models.kinds import KINDS

logger = logging.getLogger("service.repository")

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # no "/", no NUL, no leading "." or "-", 64 at most
FILES = ("model.safetensors", "model.npz")
CONFIG = "config.json"
RESERVED = frozenset(KINDS)  # the default model's kinds are served names of their own (Core.target)


class State(StrEnum):
    """A version's state, as the protocol's repository index names them."""

    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"


class ModelConfig(BaseModel):
    """`DIR/<name>/config.json`: everything optional."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(default="", max_length=1000, description="What the model is, for people.")
    versions: list[int] | None = Field(
        default=None, description="The versions to serve (default: every version found)."
    )
    latest: int | None = Field(default=None, ge=1, description="Serve only the highest `latest` versions found.")
    max_rows: int | None = Field(default=None, ge=1, description="Most rows a request (at most ENCODER_MAX_ROWS).")
    max_samples: int | None = Field(
        default=None, ge=1, description="Most samples per row (at most ENCODER_MAX_SAMPLES)."
    )
    max_rows_x_samples: int | None = Field(
        default=None, ge=1, description="Most z vectors a response (at most ENCODER_MAX_ROWS_X_SAMPLES)."
    )


@dataclass(frozen=True)
class Version:
    number: int
    reason: str = ""
    served: Served | None = None  # what answers for this version (kept when a reload fails)
    signature: tuple[int, int, int, int] | None = None  # (device, inode, size, mtime) of the file served

    @property
    def state(self) -> State:
        """READY while something answers for it (a reload that failed keeps what it served)."""
        return State.UNAVAILABLE if self.served is None else State.READY


@dataclass(frozen=True)
class Entry:
    """One model of the repository: its versions, and what its config or an unload says."""

    name: str
    versions: dict[int, Version] = field(default_factory=dict)
    reason: str = ""  # why the model as a whole serves nothing (a bad config, unloaded, removed)
    description: str = ""

    def ready(self) -> tuple[Served, ...]:
        return tuple(v.served for _, v in sorted(self.versions.items()) if v.served is not None)


def valid_name(name: str) -> str:
    """The name, if a model may have it; a CoreError (BAD_INPUT) that says why, otherwise."""
    if not NAME.fullmatch(name) or ".." in name:
        raise CoreError(
            Problem.BAD_INPUT,
            f"{shown(name)} is not a model name: 1 to 64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit, and no '..'",
        )
    return name


class Repository:
    """The models served, and the only code that reads the model repository's directory."""

    def __init__(self, limits: Limits, root: Path | None = None, fixed: Served | None = None) -> None:
        self.limits = limits
        self.root = root.resolve() if root is not None else None
        self.entries: dict[str, Entry] = {}
        self.serving: dict[str, tuple[Served, ...]] = {}
        self.latest: dict[str | None, Served] = {}
        self.lock = asyncio.Lock()  # one load, unload or scan at a time
        if fixed is not None:
            self.entries[fixed.name] = Entry(fixed.name, {fixed.version: Version(fixed.version, "", fixed)})
            self._publish()

    @property
    def explicit(self) -> bool:
        """Whether models can be loaded and unloaded (there is a repository)."""
        return self.root is not None

    def known(self, name: str) -> bool:
        return name in self.entries

    def why(self, name: str) -> str:
        entry = self.entries[name]
        reasons = [f"version {v.number}: {v.reason}" for _, v in sorted(entry.versions.items()) if v.reason]
        return entry.reason or "; ".join(reasons) or "none found"

    def _publish(self) -> None:
        self.serving = {name: ready for name, entry in sorted(self.entries.items()) if (ready := entry.ready())}
        # What an unversioned request resolves to, one lookup away (the default model: None).
        self.latest = {name: ready[-1] for name, ready in self.serving.items()}
        if DEFAULT in self.latest:
            self.latest[None] = self.latest[DEFAULT]
        release_memory()  # of what is no longer served, once its last request ends

    def index(self, ready_only: bool = False) -> list[dict[str, str]]:
        """The protocol's repository index: an entry per version (per model, when it has none)."""
        rows = []
        for name, entry in sorted(self.entries.items()):
            if not entry.versions and not ready_only:
                rows.append({"name": name, "version": "", "state": State.UNAVAILABLE.value, "reason": entry.reason})
            for number, version in sorted(entry.versions.items()):
                if ready_only and version.served is None:
                    continue
                rows.append(
                    {"name": name, "version": str(number), "state": version.state.value, "reason": version.reason}
                )
        return rows

    # -- changing what is served (each on the event loop, under the lock; file work in a thread)

    async def scan(self) -> None:
        """Serve what the repository holds now: new models and versions load, changed files reload,
        removed ones go. Models unloaded by the API stay unloaded until loaded again."""
        if self.root is None:
            return
        async with self.lock:
            on_disk = await asyncio.to_thread(self._names)
            for name in sorted(set(on_disk) | set(self.entries)):
                if name not in on_disk:
                    if self.entries.pop(name).versions:
                        logger.info("model %s: removed from the repository, unloaded", name)
                    continue
                if self.entries.get(name, Entry(name)).reason == "unloaded":
                    continue
                await self._refresh(name)
            self._publish()

    async def load(self, name: str) -> Entry:
        """(Re)load the model `name` from its directory: NOT_FOUND if there is none."""
        self.check_explicit()
        valid_name(name)
        async with self.lock:
            if name not in await asyncio.to_thread(self._names):
                raise CoreError(Problem.NOT_FOUND, f"no model {shown(name)} in the repository")
            await self._refresh(name)
            self._publish()
            return self.entries[name]

    async def unload(self, name: str) -> None:
        """Serve no version of `name` until it is loaded again (a scan leaves it unloaded)."""
        self.check_explicit()
        valid_name(name)
        async with self.lock:
            if name not in self.entries and name not in await asyncio.to_thread(self._names):
                raise CoreError(Problem.NOT_FOUND, f"no model {shown(name)} in the repository")
            self.entries[name] = Entry(name, reason="unloaded")
            self._publish()
            logger.info("model %s: unloaded", name)

    def check_explicit(self) -> None:
        if self.root is None:
            raise CoreError(
                Problem.BAD_INPUT,
                "this server serves one model; set ENCODER_MODEL_REPOSITORY to load and unload models",
            )

    async def _refresh(self, name: str) -> None:
        entry = self.entries.get(name, Entry(name))
        self.entries[name] = await asyncio.to_thread(self._read_model, entry)

    # -- reading the directory (in a worker thread)

    def _inside(self, path: Path) -> bool:
        """Whether `path`, its links followed, is inside the repository: nothing outside is read."""
        assert self.root is not None
        try:
            return path.resolve(strict=True).is_relative_to(self.root)
        except (OSError, RuntimeError):  # missing, or a loop of links
            return False

    def _names(self) -> list[str]:
        assert self.root is not None
        names = []
        for path in self.root.iterdir():
            if NAME.fullmatch(path.name) and ".." not in path.name and path.is_dir() and self._inside(path):
                names.append(path.name)
        return names

    def _read_model(self, entry: Entry) -> Entry:
        """The entry anew from its directory: each wanted version loaded if its file changed."""
        assert self.root is not None
        name, directory = entry.name, self.root / entry.name
        if name in RESERVED:
            return Entry(name, reason=f"{name!r} is reserved: it names the default model's {name}")
        try:
            config = self._config(directory)
        except ValueError as exc:
            # A bad config serves nothing new; what was served keeps serving.
            kept = {n: replace(v, reason=f"config.json: {exc}") for n, v in entry.versions.items() if v.served}
            return replace(entry, versions=kept, reason="" if kept else f"config.json: {exc}")
        found = {
            int(path.name): path
            for path in directory.iterdir()
            if VERSION.fullmatch(path.name) and path.is_dir() and self._inside(path)
        }
        wanted = sorted(found)
        if config.versions is not None:
            wanted = [n for n in wanted if n in config.versions]
        if config.latest is not None:
            wanted = wanted[-config.latest :]
        limits = self._limits(config, name)
        versions = {}
        for number in wanted:
            versions[number] = self._read_version(
                name, number, found[number], entry.versions.get(number), limits, config
            )
        for number in sorted(set(entry.versions) - set(versions)):
            logger.info("model %s version %d: no longer in the repository (or its config), unloaded", name, number)
        return Entry(
            name, versions, "" if versions else "no version directory (1, 2, ...) with a model file", config.description
        )

    def _config(self, directory: Path) -> ModelConfig:
        path = directory / CONFIG
        if not path.exists():
            return ModelConfig()
        if not self._inside(path) or not path.is_file():
            raise ValueError("not a file inside the repository")
        try:
            return ModelConfig.model_validate(orjson.loads(path.read_bytes()))
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"invalid JSON ({exc.msg} at character {exc.pos})") from None
        except ValidationError as exc:
            first = exc.errors(include_url=False, include_input=False)[0]
            raise ValueError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}") from None

    def _limits(self, config: ModelConfig, name: str) -> Limits:
        asked = {key: getattr(config, key) for key in ("max_rows", "max_samples", "max_rows_x_samples")}
        if all(value is None for value in asked.values()):
            return self.limits
        chosen = {
            key: min(value, getattr(self.limits, key)) if value is not None else getattr(self.limits, key)
            for key, value in asked.items()
        }
        return Limits(**chosen, source=f"{name}/config.json")

    def _read_version(
        self, name: str, number: int, directory: Path, before: Version | None, limits: Limits, config: ModelConfig
    ) -> Version:
        files = [directory / file for file in FILES if (directory / file).exists()]
        if len(files) != 1:
            problem = "holds both model files" if files else f"holds no {' or '.join(FILES)}"
            return self._unavailable(number, problem, before)
        path = files[0]
        try:
            if not self._inside(path):
                raise weights.WeightsError(path, "leads outside the repository")
            info = os.stat(path)
            if not stat.S_ISREG(info.st_mode):
                raise weights.WeightsError(path, "is not a regular file")
            signature = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            if before is not None and before.signature == signature and before.served is not None:
                if before.served.limits == limits and before.served.description == config.description:
                    return before
                return replace(before, served=replace(before.served, limits=limits, description=config.description))
            model = weights.load(path)
            warm_up(model)
        except (weights.WeightsError, ModelError, OSError) as exc:
            problem = exc.problem if isinstance(exc, weights.WeightsError) else str(exc)
            logger.warning("model %s version %d: not served: %s", name, number, problem)
            return self._unavailable(number, problem, before)
        served = served_model(name, number, model, limits, {"source": "file", "seed": None, "file": path.name})
        served = replace(served, description=config.description)
        logger.info("model %s version %d: ready (%s)", name, number, served.fingerprint)
        return Version(number, "", served, signature)

    @staticmethod
    def _unavailable(number: int, problem: str, before: Version | None) -> Version:
        """A version that could not be read: what it served before (if anything) keeps serving."""
        if before is None or before.served is None:
            return Version(number, problem)
        kept = before.served
        reason = f"{problem}; still serving what was loaded at {kept.loaded_at.isoformat(timespec='seconds')}"
        return Version(number, reason, kept, before.signature)


def release_memory() -> None:
    """Return the memory of unloaded weights to the system. Their arrays are freed as soon as no
    request holds them, but glibc keeps freed blocks for reuse (the more so in the loading
    threads' arenas): measured, unloading 50 of 100 models of 784 -> 32 returned nothing without
    malloc_trim, and 30 MiB with it (bench/repository.py). Elsewhere than glibc, nothing to do."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def served_model(
    name: str, version: int, model: Model, limits: Limits, source: dict[str, Any], announced: bool = True
) -> Served:
    return Served(
        name=name,
        version=version,
        model=model,
        limits=limits,
        fingerprint=model.fingerprint(),
        loaded_at=datetime.now(UTC),
        source=source,
        announced=announced,
    )
