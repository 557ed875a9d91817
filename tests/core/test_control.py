"""How a load or unload reaches every worker (service.core.control), in-process: the shared
actions file, applied once each, in order, by however many catch-ups run at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from service.core.control import Action, Control


def test_an_action_is_applied_once_when_two_catch_ups_overlap(tmp_path: Path) -> None:
    """The worker's loop is applying the first action when a call appends a second and catches up
    too: each action is applied once, in order, and the ack counts two."""

    async def scenario() -> tuple[list[Action], int, bytes]:
        applied: list[Action] = []
        slow = asyncio.Event()

        async def apply(action: Action) -> None:
            applied.append(action)
            if action == ("load", "a"):
                await slow.wait()

        control = Control(apply, tmp_path)
        control._append(("load", "a"))
        loop_turn = asyncio.create_task(control.catch_up())  # applying ("load", "a"), waiting
        await asyncio.sleep(0.05)
        control._append(("unload", "b"))
        call = asyncio.create_task(control.catch_up())
        await asyncio.sleep(0.05)
        slow.set()
        await asyncio.gather(loop_turn, call)
        acks = list(tmp_path.glob("repository-ack-*.json"))
        return applied, control.applied, acks[0].read_bytes()

    applied, count, ack = asyncio.run(scenario())
    assert applied == [("load", "a"), ("unload", "b")]
    assert count == 2
    assert ack == b"2"


def test_a_worker_that_starts_late_replays_every_action_in_order(tmp_path: Path) -> None:
    async def scenario() -> list[Action]:
        first = Control(_ignore, tmp_path)
        for action in [("load", "a"), ("unload", "a"), ("load", "b")]:
            await first.submit(action)
        seen: list[Action] = []

        async def record(action: Action) -> None:
            seen.append(action)

        await Control(record, tmp_path).catch_up()
        return seen

    assert asyncio.run(scenario()) == [("load", "a"), ("unload", "a"), ("load", "b")]


async def _ignore(action: Action) -> None:
    return None
