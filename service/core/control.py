"""How a load or unload reaches every worker process of a server before it is answered.

One process (no shared directory): the change is applied at once. Several (`encoding-service serve`
with ENCODER_WORKERS > 1, whose workers share ENCODER_METRICS_DIR): the worker that takes the call
appends it to `repository-actions.json` there (under a lock), every worker applies what is new in
that file within `TICK` seconds and writes how far it got to `repository-ack-<pid>.json`, and the
call is answered once every live worker has applied it. A worker that starts replays the whole
file, so a restarted worker serves the same models as the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson

from service.core.inference import Core, CoreError, Problem, shown
from service.core.metrics import alive
from service.core.repository import valid_name

logger = logging.getLogger("service.repository")

ACTIONS = "repository-actions.json"
LOCK = "repository-actions.lock"
ACK = "repository-ack-{pid}.json"
STALE = ("repository-*.json", "repository-*.lock")  # an earlier run's files, removed by serve at its start
TICK = 0.05

Action = tuple[str, str]  # ("load" | "unload", model name)


class Control:
    """Actions on the repository, applied by `apply` in every worker in the same order."""

    def __init__(self, apply: Callable[[Action], Awaitable[None]], shared: Path | None) -> None:
        self.apply = apply
        self.shared = shared
        self.applied = 0  # how many of the shared actions this worker has applied
        self.acked = -1  # how many its ack file says
        self.seen: tuple[int, int] | None = None
        # One catch-up at a time: the loop's and a call's would otherwise both apply an action
        # appended between their reads, and count it twice.
        self.catching_up = asyncio.Lock()

    async def submit(self, action: Action, timeout: float = 60.0) -> None:
        """Apply an action in every worker; return once each has (TimeoutError if one does not)."""
        if self.shared is None:
            await self.apply(action)
            return
        count = await asyncio.to_thread(self._append, action)
        await self.catch_up()  # this worker's share, at once
        deadline = time.monotonic() + timeout
        while not await asyncio.to_thread(self._everyone_has, count):
            if time.monotonic() > deadline:
                raise TimeoutError(f"not every worker applied the change within {timeout:g} s")
            await asyncio.sleep(TICK / 2)

    async def catch_up(self) -> None:
        """Apply the shared actions this worker has not applied yet, and say how far it got."""
        if self.shared is None:
            return
        async with self.catching_up:
            actions = await asyncio.to_thread(self._read)
            for action in (actions or [])[self.applied :]:
                await self.apply(action)
                self.applied += 1
            if self.applied != self.acked:
                await asyncio.to_thread(self._ack)

    async def run(self) -> None:
        """Catch up every TICK seconds, for as long as the worker serves."""
        await every(TICK, self.catch_up, "cannot read the workers' shared actions")

    # -- the files (in a worker thread)

    def _append(self, action: Action) -> int:
        assert self.shared is not None
        with (self.shared / LOCK).open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            actions = self._read(force=True) or []
            actions.append(action)
            temporary = self.shared / f"{ACTIONS}.{os.getpid()}.tmp"
            temporary.write_bytes(orjson.dumps(actions))
            os.replace(temporary, self.shared / ACTIONS)  # whole or not at all, for a reader
            return len(actions)

    def _read(self, force: bool = False) -> list[Action] | None:
        """Every action so far, or None when the file has not changed since the last read."""
        assert self.shared is not None
        path = self.shared / ACTIONS
        try:
            info = path.stat()
        except FileNotFoundError:
            return []
        if not force and (info.st_mtime_ns, info.st_size) == self.seen:
            return None
        data = orjson.loads(path.read_bytes())
        self.seen = (info.st_mtime_ns, info.st_size)
        return [(str(verb), str(name)) for verb, name in data]

    def _ack(self) -> None:
        assert self.shared is not None
        path = self.shared / ACK.format(pid=os.getpid())
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(orjson.dumps(self.applied))
        os.replace(temporary, path)
        self.acked = self.applied

    def _everyone_has(self, count: int) -> bool:
        assert self.shared is not None
        for path in self.shared.glob(ACK.format(pid="*")):
            pid = int(path.stem.rsplit("-", 1)[1])
            with contextlib.suppress(FileNotFoundError, ValueError, orjson.JSONDecodeError):
                if orjson.loads(path.read_bytes()) < count and alive(pid):
                    return False
        return True


async def every(seconds: float, action: Callable[[], Awaitable[None]], failure: str) -> None:
    """Run `action` every `seconds` until cancelled; a failure is logged and the loop goes on (a
    file or directory that cannot be read now may be readable the next time)."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await action()
        except Exception:
            logger.exception("repository: %s", failure)


async def change(core: Core, control: Control, verb: str, name: str) -> list[dict[str, str]]:
    """Load or unload the model `name` in every worker (`verb`: "load" or "unload"); its index
    entries after. What each protocol's load and unload call: NOT_FOUND for a model the repository
    does not have, LOAD_FAILED when a load leaves no version ready, NOT_APPLIED when a worker
    did not apply it in time."""
    core.repository.check_explicit()
    valid_name(name)
    try:
        await control.submit((verb, name))
    except TimeoutError as exc:
        raise CoreError(Problem.NOT_APPLIED, str(exc)) from None
    if not core.repository.known(name):
        raise CoreError(Problem.NOT_FOUND, f"no model {shown(name)} in the repository")
    rows = [row for row in core.repository.index() if row["name"] == name]
    if verb == "load" and not any(row["state"] == "READY" for row in rows):
        raise CoreError(Problem.LOAD_FAILED, f"failed to load {name!r}: {core.repository.why(name)}")
    return rows
