"""The README and the docs pages as they stand: their examples run against a live server, in
order, and the README's settings table is the one the settings make."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.config import settings_table
from tests.conftest import ROOT, Server, free_port, server_env, start_server

BLOCK = re.compile(r"^```(\w+)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
# Where examples run: a page, and the section of it (None: all of it).
EXAMPLES = [("README.md", "The API at a glance"), ("docs/clients.md", None)]


def section(page: str, title: str | None) -> str:
    text = (ROOT / page).read_text()
    if title is None:
        return text
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def blocks(page: str, title: str | None) -> list[tuple[str, str]]:
    return [(match[1], match[2]) for match in BLOCK.finditer(section(page, title))]


def test_the_clients_page_has_each_kind_of_client() -> None:
    text = section("docs/clients.md", None)
    for name in ("curl", "service.client", "tritonclient", "kserve", "openapi-python-client"):
        assert name in text, name
    assert {kind for kind, _ in blocks("docs/clients.md", None)} == {"console", "python", "sh"}


def test_the_grpc_service_config_in_the_clients_page_is_the_one_in_deploy() -> None:
    (code,) = [code for kind, code in blocks("docs/clients.md", "gRPC through restarts") if kind == "python"]
    shown = code[code.index("config = {") + len("config = ") : code.index("\noptions = [")]
    published = json.loads((ROOT / "deploy" / "grpc-service-config.json").read_text())
    assert ast.literal_eval(shown) == published


@pytest.fixture(scope="module")
def serving() -> Iterator[Server]:
    """`encoding-service serve`, as the pages' readers run it: HTTP and gRPC."""
    server = start_server([sys.executable, "-m", "service.cli", "serve", "--port", "{port}"])
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(("page", "title"), EXAMPLES)
def test_every_example_runs(serving: Server, tmp_path: Path, page: str, title: str | None) -> None:
    address = serving.url.removeprefix("http://")
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(tmp_path)])

    def run(argv: list[str]) -> str:
        result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{argv}\n{result.stdout}{result.stderr}"
        return result.stdout

    ran = 0
    for kind, code in blocks(page, title):
        code = code.replace("127.0.0.1:8000", address).replace("localhost:8000", address)
        code = code.replace("127.0.0.1:8001", serving.grpc)
        if kind == "console":  # `$ command` lines, each followed by exactly what it prints
            for command, expected in re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", code, re.MULTILINE):
                assert run(shlex.split(command)).strip() == expected.strip(), command
        elif kind == "sh":
            for command in code.strip().splitlines():
                run(shlex.split(command))
        else:
            run([sys.executable, "-c", code])
        ran += 1
    assert ran == len(blocks(page, title)) > 0


@pytest.mark.parametrize(("page", "title"), EXAMPLES)
def test_examples_name_only_the_address_the_test_replaces(page: str, title: str | None) -> None:
    for _, code in blocks(page, title):
        for address in re.findall(r"(?:127\.0\.0\.1|localhost):\d+", code):
            assert address in ("127.0.0.1:8000", "localhost:8000", "127.0.0.1:8001"), address


def test_the_readme_settings_table_is_made_from_the_settings() -> None:
    text = (ROOT / "README.md").read_text()
    table = re.search(r"<!-- settings:.*?-->\n(.*?)<!-- /settings -->", text, re.DOTALL)
    assert table is not None, "the README's settings table lost its markers"
    assert table[1] == settings_table(), "the README's settings table is stale: paste `encoding-service settings`"


def test_the_readme_stays_a_landing_page() -> None:
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move details into docs/"
    for link in re.findall(r"\]\(((?:docs|openapi|deploy)/[^)#]+)", "\n".join(lines)):
        assert (ROOT / link).exists(), link


def run_walkthrough(page: str, title: str | None, tmp_path: Path) -> str:
    """The page's one `sh` block (of the section), run by bash as a reader pastes it, with the
    service's commands on PATH and the server on a free port; what it printed."""
    (script,) = [code for kind, code in blocks(page, title) if kind == "sh"]
    port = str(free_port())
    env = server_env() | {"ENCODER_PORT": port}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    script = script.replace("localhost:8000", f"localhost:{port}")
    result = subprocess.run(
        ["bash", "-eu", "-o", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = tmp_path / "server.log"
    assert result.returncode == 0, result.stdout + result.stderr + (log.read_text() if log.exists() else "")
    return result.stdout


def test_the_repository_walkthrough_runs_as_a_reader_pastes_it(tmp_path: Path) -> None:
    stdout = run_walkthrough("docs/models.md", "Walkthrough: two models, then a third version", tmp_path)
    wrote = [line for line in stdout.splitlines() if line.startswith("wrote models/")]
    assert [line.split()[1] for line in wrote] == [
        f"models/{name}/{version}/model.safetensors"
        for name, version in (("fingerprints", 1), ("attributes", 1), ("fingerprints", 2))
    ]
    lines = [line for line in stdout.splitlines() if not line.startswith("wrote ")]
    assert lines[0] == "[('attributes', [1]), ('fingerprints', [1])]"
    assert lines[1].strip().lower() == "x-model-version: 1"
    assert [row["version"] for row in json.loads(lines[2])] == ["1", "2"]
    assert lines[3].strip().lower() == "x-model-version: 2"
    assert sorted(p.name for p in (tmp_path / "models" / "fingerprints" / "2").iterdir()) == [
        "model.safetensors",
        "report.json",
    ]


def test_the_training_walkthrough_runs_as_a_reader_pastes_it(tmp_path: Path) -> None:
    stdout = run_walkthrough("docs/training.md", None, tmp_path)
    text = (ROOT / "docs/training.md").read_text()
    trained, codes, decoded, reconstructed, plotted = stdout.splitlines()
    assert plotted == "wrote latent.png"
    quoted = re.search(r"held-out bit\s+accuracy ([\d.]+) \(autoencoder\), ([\d.]+) \(vae\)", text)
    assert quoted is not None
    assert f"accuracy {quoted[1]} (autoencoder), {quoted[2]} (vae)" in trained  # what the page says it prints
    assert len(json.loads(codes)["codes"][0]) == 2
    for answer in (decoded, reconstructed):
        (row,) = json.loads(answer)["probabilities"]
        assert len(row) == 64
        assert all(0 <= p <= 1 for p in row)
    assert (tmp_path / "latent.png").read_bytes().startswith(b"\x89PNG")


def _console(page: str, command: str) -> list[str]:
    """The lines a page shows a console command printing."""
    text = (ROOT / page).read_text()
    start = text.index(f"$ {command}\n") + len(command) + 3
    return text[start : text.index("```", start)].splitlines()


def test_api_md_shows_the_model_info_as_it_is(live: Server) -> None:
    (shown,) = _console("docs/api.md", "curl -s localhost:8000/v1/model")
    answer = httpx.get(f"{live.url}/v1/model").json()
    documented = json.loads(shown)
    assert documented.keys() == answer.keys()
    assert {k: v for k, v in documented.items() if k != "loaded_at"} == {
        k: v for k, v in answer.items() if k != "loaded_at"
    }


def test_api_md_shows_a_failed_start_as_it_is(tmp_path: Path) -> None:
    command = 'ENCODER_WEIGHTS=missing.npz encoding-service serve; echo "exit status $?"'
    shown = _console("docs/api.md", command)
    env = server_env() | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    printed = (result.stderr + result.stdout).splitlines()

    def comparable(line: str) -> object:  # a JSON line, but for its time and the process id
        if not line.startswith("{"):
            return line
        fields = json.loads(line)
        fields.pop("time")
        fields["message"] = re.sub(r"\[\d+\]", "[pid]", fields["message"])
        fields["message"] = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:port", fields["message"])
        return fields

    assert [comparable(line) for line in printed] == [comparable(line) for line in shown]


def test_every_file_architecture_md_names_exists() -> None:
    """The layout it draws is the code's: each file or folder it names (by its path from the
    repository, or from a folder it names around it) is there."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    names = {name for name in re.findall(r"[\w/]+\.py|[\w/]+/(?=[`\s)])", text) if not name.startswith("/")}
    tops = [ROOT / top for top in ("service", "bench", "tests", "deploy")]
    tree = tops + [path for top in tops for path in top.rglob("*")]
    there = {path.relative_to(ROOT).as_posix() + ("/" if path.is_dir() else "") for path in tree}
    missing = [name for name in sorted(names) if not any(path == name or path.endswith("/" + name) for path in there)]
    assert len(names) > 30
    assert missing == []
