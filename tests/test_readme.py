"""The README's client examples, run as they stand, in order, against a live server."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, Server

BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def blocks(title: str) -> list[tuple[str, str]]:
    return [(match[1], match[2]) for match in BLOCK.finditer(section(title))]


def test_the_clients_section_has_each_kind_of_client() -> None:
    text = section("Clients")
    for name in ("curl", "service.client", "tritonclient", "kserve", "openapi-python-client"):
        assert name in text, name
    assert {kind for kind, _ in blocks("Clients")} == {"console", "python", "sh"}


def test_every_client_example_runs(live: Server, tmp_path: Path) -> None:
    address = live.url.removeprefix("http://")
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path)])

    def run(argv: list[str]) -> str:
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{argv}\n{result.stdout}{result.stderr}"
        return result.stdout

    ran = 0
    for kind, code in blocks("Clients"):
        code = code.replace("127.0.0.1:8000", address).replace("localhost:8000", address)
        if kind == "console":  # `$ command` lines, each followed by exactly what it prints
            for command, expected in re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", code, re.MULTILINE):
                assert run(shlex.split(command)).strip() == expected.strip(), command
        elif kind == "sh":
            for command in code.strip().splitlines():
                run(shlex.split(command))
        else:
            run([sys.executable, "-c", code])
        ran += 1
    assert ran == len(blocks("Clients"))


def test_examples_name_only_the_address_the_test_replaces() -> None:
    for _, code in blocks("Clients"):
        for address in re.findall(r"(?:127\.0\.0\.1|localhost):\d+", code):
            assert address in ("127.0.0.1:8000", "localhost:8000"), address
