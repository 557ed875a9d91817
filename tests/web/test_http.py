"""The HTTP layer's modules on their own (negotiation, paths, lean, bodies): negotiation by RFC
9110, root paths, lane lookup, errors through the app's own handlers, body reading and limits, and
LeanRoute's refusal of what it would ignore."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Annotated, Any

import mimeparse
import numpy as np
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import PlainTextResponse
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import strategies as st
from starlette.requests import ClientDisconnect
from starlette.types import Message, Scope

from service.api.v1.arrays import SAFETENSORS
from service.api.v1.schemas import AutoencoderRequest, AutoencoderResponse
from service.core.gate import Gate
from service.core.metrics import Metrics
from service.web.admission import Admission
from service.web.bodies import read_body
from service.web.errors import BodyTooLarge
from service.web.lean import FastLane, LeanRoute
from service.web.negotiation import media_ranges, negotiate, quality
from service.web.paths import route_path

JSON = b"application/json"
OFFERED = (JSON, SAFETENSORS)


# Negotiation --------------------------------------------------------------------------------


def test_the_rfc_9110_example_gives_the_rfc_s_qualities() -> None:
    """RFC 9110, section 12.5.1: the qualities its example header gives each media type."""
    ranges = media_ranges(
        b"text/*;q=0.3, text/plain;q=0.7, text/plain;format=flowed, text/plain;format=fixed;q=0.4, */*;q=0.5"
    )
    expected = {b"text/plain": 0.7, b"text/html": 0.3, b"image/jpeg": 0.5}  # media parameters aside
    assert {media: quality(ranges, media)[0] for media in expected} == expected  # type: ignore[index]


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, JSON),
        (b"", JSON),
        (b"*/*", JSON),
        (b"application/*", JSON),
        (b"application/json;q=0, */*", SAFETENSORS),  # q=0 rules JSON out, whatever the wildcard says
        (b"application/json;q=0, application/*", SAFETENSORS),
        (b"application/x-safetensors, application/json", SAFETENSORS),  # a tie: the header's order
        (b"application/json, application/x-safetensors", JSON),
        (b"application/x-safetensors;q=0.5, application/json;q=0.4", SAFETENSORS),
        (b"text/html, */*;q=0.1", JSON),
        (b"APPLICATION/JSON", JSON),
        (b"application/json;q=oops", JSON),  # a q that is not a number counts as 1
        (b"application/json;charset=utf-8", JSON),
    ],
)
def test_negotiation_picks_what_the_header_prefers(accept: bytes | None, chosen: bytes) -> None:
    assert negotiate(accept, OFFERED) == chosen


@pytest.mark.parametrize("accept", [b"text/csv", b"application/json;q=0", b"*/*;q=0", b"application/*;q=0, text/*"])
def test_negotiation_answers_406_when_nothing_offered_is_allowed(accept: bytes) -> None:
    with pytest.raises(HTTPException) as raised:
        negotiate(accept, OFFERED)
    assert raised.value.status_code == 406


RANGES = ["application/json", "application/x-safetensors", "application/*", "*/*", "text/html", "text/*"]


@given(
    st.lists(
        st.tuples(st.sampled_from(RANGES), st.sampled_from([None, "0", "0.001", "0.3", "0.5", "0.7", "1"])),
        min_size=1,
        max_size=6,
    )
)
def test_negotiation_agrees_with_python_mimeparse(parts: list[tuple[str, str | None]]) -> None:
    """python-mimeparse, as an independent oracle: the quality of what is chosen is the best any
    offered type gets, and 406 comes exactly when every offered type gets 0."""
    header = ", ".join(media if q is None else f"{media};q={q}" for media, q in parts)
    best = max(mimeparse.quality(media.decode(), header) for media in OFFERED)
    if best == 0:
        with pytest.raises(HTTPException):
            negotiate(header.encode(), OFFERED)
    else:
        chosen = negotiate(header.encode(), OFFERED)
        assert mimeparse.quality(chosen.decode(), header) == best, header


# Root path, lanes, errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "root", "expected"),
    [
        ("/v1/x", "", "/v1/x"),
        ("/api/v1/x", "/api", "/v1/x"),  # uvicorn --root-path puts the prefix in front
        ("/v1/x", "/api", "/v1/x"),  # a server that does not
        ("/api", "/api", "/"),
        ("/apiary/v1", "/api", "/apiary/v1"),  # a prefix only up to a slash
    ],
)
def test_route_path_strips_the_root_path(path: str, root: str, expected: str) -> None:
    assert route_path({"path": path, "root_path": root}) == expected


def _lean_app(handlers: dict[Any, Callable[..., Any]] | None = None) -> tuple[FastLane, list[Scope]]:
    router = APIRouter(route_class=LeanRoute)

    @router.post("/lean")
    async def lean(request: AutoencoderRequest) -> AutoencoderResponse:
        if request.inputs.shape[0] == 2:
            raise HTTPException(418, "two rows")
        if request.inputs.shape[0] == 3:
            raise RuntimeError("a bug")
        return AutoencoderResponse.model_validate({"codes": np.ones((1, 1))}, context={"rows": 1, "latent_dim": 1})

    passed: list[Scope] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        passed.append(scope)
        await PlainTextResponse("app")(scope, receive, send)

    return FastLane(app, router.routes, handlers), passed


def _call(lane: FastLane, path: str, body: bytes, root: str = "") -> list[Message]:
    scope = {
        "type": "http", "method": "POST", "path": path, "root_path": root, "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }  # fmt: skip
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(lane(scope, receive, send))
    return sent


def test_a_lane_is_found_with_or_without_a_root_path_and_anything_else_goes_on() -> None:
    lane, passed = _lean_app()
    for path, root in (("/lean", ""), ("/api/lean", "/api")):
        sent = _call(lane, path, b'{"inputs": [[0, 1]]}', root)
        assert (sent[0]["status"], sent[1]["body"]) == (200, b'{"codes":[[1.0]]}')
    assert _call(lane, "/other", b"")[1]["body"] == b"app"
    assert [scope["path"] for scope in passed] == ["/other"]


def test_lane_errors_go_to_the_apps_own_handlers(caplog: pytest.LogCaptureFixture) -> None:
    async def teapot(request: Request, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse(f"handled {exc.status_code}", status_code=exc.status_code)  # type: ignore[attr-defined]

    lane, _ = _lean_app({HTTPException: teapot})
    sent = _call(lane, "/lean", b'{"inputs": [[0, 1], [1, 0]]}')
    assert (sent[0]["status"], sent[1]["body"]) == (418, b"handled 418")
    sent = _call(lane, "/lean", b'{"inputs": [[0, 1], [1, 0], [1, 1]]}')  # no handler: a plain 500, logged
    assert (sent[0]["status"], sent[1]["body"]) == (500, b'{"detail":"internal server error"}')
    assert "a bug" in caplog.text
    bare, _ = _lean_app({500: teapot})  # a handler for 500 takes what no other one does
    assert _call(bare, "/lean", b'{"inputs": [[0, 1], [1, 0]]}')[0]["status"] == 418


# Bodies -------------------------------------------------------------------------------------


def _receive(messages: list[Message]) -> Callable[[], Any]:
    queue = list(messages)

    async def receive() -> Message:
        return queue.pop(0)

    return receive


def test_a_body_is_read_whole_and_a_disconnect_is_said() -> None:
    chunks = [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "body": b"c"}]
    assert asyncio.run(read_body(_receive(chunks))) == b"abc"
    with pytest.raises(ClientDisconnect):
        asyncio.run(
            read_body(
                _receive([{"type": "http.request", "body": b"a", "more_body": True}, {"type": "http.disconnect"}])
            )
        )


def test_admission_refuses_a_declared_or_streamed_body_over_the_limit() -> None:
    async def echo(scope: Scope, receive: Any, send: Any) -> None:
        await PlainTextResponse(await read_body(receive))(scope, receive, send)

    limited = Admission(echo, gate=Gate(Metrics(), max_in_progress=10, budget=2**20, wait=1), max_body=4)
    for headers, status in (([(b"content-length", b"5")], 413), ([(b"content-length", b"3")], 200)):
        sent: list[Message] = []
        scope = {"type": "http", "path": "/v1/x", "headers": headers}

        async def send(message: Message, sent: list[Message] = sent) -> None:
            sent.append(message)

        asyncio.run(limited(scope, _receive([{"type": "http.request", "body": b"abc"}]), send))
        assert sent[0]["status"] == status
    streamed = [{"type": "http.request", "body": b"abc", "more_body": True}, {"type": "http.request", "body": b"de"}]
    with pytest.raises(BodyTooLarge):
        asyncio.run(limited({"type": "http", "path": "/v1/x", "headers": []}, _receive(streamed), _noop))


async def _noop(message: Message) -> None:
    pass


# LeanRoute ----------------------------------------------------------------------------------


async def _endpoint(request: AutoencoderRequest) -> AutoencoderResponse:
    return AutoencoderResponse.model_validate({"codes": np.ones((1, 1))}, context={"rows": 1, "latent_dim": 1})


async def _dependency() -> None:
    pass


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"dependencies": [Depends(_dependency)]}, "dependencies"),
        ({"status_code": 201}, "status_code=201"),
        ({"response_class": PlainTextResponse}, "response_class"),
        ({"response_model_exclude_none": True}, "response_model_exclude_none"),
        ({"response_model_by_alias": False}, "response_model_by_alias"),
    ],
)
def test_lean_routes_refuse_options_they_would_ignore(options: dict[str, Any], named: str) -> None:
    router = APIRouter(route_class=LeanRoute)
    with pytest.raises(TypeError, match=named):
        router.add_api_route("/lean", _endpoint, methods=["POST"], **options)


def test_a_routers_and_an_apps_dependencies_and_prefixes_are_refused_too() -> None:
    from service.core.metrics import Metrics
    from service.main import Service
    from service.web.access import RequestLog

    def service(**options: Any) -> Service:
        metrics = Metrics()
        return Service(outer=[], metrics=metrics, request_log=RequestLog(metrics), **options)

    lean = APIRouter(route_class=LeanRoute)
    lean.add_api_route("/lean", _endpoint, methods=["POST"])
    for options in ({"dependencies": [Depends(_dependency)]}, {"prefix": "/v9"}):
        with pytest.raises(TypeError, match=next(iter(options))):
            service().include_router(lean, **options)
    with pytest.raises(TypeError, match="the app's dependencies"):
        service(dependencies=[Depends(_dependency)]).include_router(lean)
    app = service()
    app.include_router(lean, tags=["fine"])
    assert app.lanes == lean.routes
    with pytest.raises(TypeError, match="dependencies"):
        APIRouter(route_class=LeanRoute, dependencies=[Depends(_dependency)]).add_api_route(
            "/x", _endpoint, methods=["POST"]
        )


def test_a_lean_route_without_its_lane_is_served_by_fastapi_as_it_would_be() -> None:
    """FastAPI's own router dispatching to a LeanRoute (no FastLane in front) gets the same answer."""
    app = FastAPI()
    lean = APIRouter(route_class=LeanRoute)
    lean.add_api_route("/lean", _endpoint, methods=["POST"])
    app.include_router(lean)
    with TestClient(app) as client:
        response = client.post("/lean", json={"inputs": [[0, 1]]}, headers={"accept": "application/x-safetensors"})
        assert response.status_code == 200
        assert response.headers["content-type"] == "application/x-safetensors"
        assert client.post("/lean", json={"inputs": [[0, 2]]}).status_code == 422


def _sync(request: Request) -> int:
    return 1


async def _with_a_sync_dependency(request: AutoencoderRequest, value: Annotated[int, Depends(_sync)]) -> Any:
    raise AssertionError


def test_lean_dependencies_must_be_async() -> None:
    endpoint = _with_a_sync_dependency
    with pytest.raises(TypeError, match="neither the body nor an async Depends"):
        APIRouter(route_class=LeanRoute).add_api_route("/lean", endpoint, methods=["POST"])


async def _named(request: AutoencoderRequest, name: Annotated[str, Depends(_path_name)]) -> Any:
    codes = np.full((1, 1), float(len(name)))
    return AutoencoderResponse.model_validate({"codes": codes}, context={"rows": 1, "latent_dim": 1})


async def _path_name(request: Request) -> str:
    request.path_params["name"] += "!"  # an endpoint that changes its parameters changes no later request's
    return str(request.path_params["name"])


def test_a_lane_with_path_parameters_gives_each_request_its_own_and_keeps_a_bounded_number_of_paths(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import service.web.lean as lean_module

    monkeypatch.setattr(lean_module, "MATCHED", 2)
    router = APIRouter(route_class=LeanRoute)
    router.add_api_route("/named/{name}/encode", _named, methods=["POST"])
    lane = FastLane(FastAPI(), router.routes)

    async def post(path: str) -> list[list[float]]:
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": b'{"inputs": [[0, 1]]}', "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        headers = [(b"content-type", b"application/json")]
        await lane({"type": "http", "method": "POST", "path": path, "headers": headers}, receive, send)
        assert sent[0]["status"] == 200, sent
        return list(json.loads(sent[1]["body"])["codes"])

    for name in ["ab", "ab", "abcd", "a", "abcde", "ab"]:
        assert asyncio.run(post(f"/named/{name}/encode")) == [[len(name) + 1]]
    assert len(lane.matched) == 2
