"""The uvicorn internals that service/server/protocol.py, drain.py and supervisor.py override or
call are still there.

protocol.py and drain.py subclass uvicorn's httptools protocol and its server, to keep deadlines,
write responses in one piece and drain on SIGTERM; supervisor.py (the service's own supervisor of
several workers) runs that server on a socket the config binds. Those are not uvicorn's public
API; pyproject pins uvicorn to the versions checked, and this test says which piece moved when a
new uvicorn changes one, instead of a server that silently drops requests.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

# (owner, method): its parameters, as service/server/protocol.py overrides or calls it
SIGNATURES: dict[tuple[type, str], list[str]] = {
    (HttpToolsProtocol, "__init__"): ["self", "config", "server_state", "app_state", "_loop"],
    (HttpToolsProtocol, "connection_made"): ["self", "transport"],
    (HttpToolsProtocol, "connection_lost"): ["self", "exc"],
    (HttpToolsProtocol, "on_message_begin"): ["self"],
    (HttpToolsProtocol, "on_message_complete"): ["self"],
    (HttpToolsProtocol, "on_response_complete"): ["self"],
    (HttpToolsProtocol, "shutdown"): ["self"],
    (HttpToolsProtocol, "timeout_keep_alive_handler"): ["self"],
    (HttpToolsProtocol, "_unset_keepalive_if_required"): ["self"],
    (HttpToolsProtocol, "_start_asgi_task"): ["self", "cycle", "app"],
    (uvicorn.Server, "handle_exit"): ["self", "sig", "frame"],
    (uvicorn.Server, "on_tick"): ["self", "counter"],
    (uvicorn.Server, "shutdown"): ["self", "sockets"],
    (uvicorn.Server, "startup"): ["self", "sockets"],
    (uvicorn.Server, "run"): ["self", "sockets"],
    (uvicorn.Config, "bind_socket"): ["self"],
    (uvicorn.Config, "configure_logging"): ["self"],
}

# (owner, method): what its source must still do for an override to take effect
CALLS: dict[tuple[type, str], list[str]] = {
    (HttpToolsProtocol, "__init__"): ["self.app_state = app_state", "self.timeout_keep_alive = "],
    (HttpToolsProtocol, "data_received"): ["self._unset_keepalive_if_required()"],
    (HttpToolsProtocol, "on_headers_complete"): ["on_response=self.on_response_complete", "self.cycle = "],
    (HttpToolsProtocol, "timeout_keep_alive_handler"): ["self.transport.close()"],
    (uvicorn.Server, "main_loop"): ["self.on_tick("],
    (uvicorn.Server, "capture_signals"): ["self.handle_exit"],
    (uvicorn.Server, "_serve"): ["self.lifespan = ", "await self.shutdown(sockets=sockets)"],
    (uvicorn.Server, "startup"): ["app_state=self.lifespan.state", "self.servers"],
    (uvicorn.Server, "shutdown"): ["server.close()", "connection.shutdown()", "self.lifespan.shutdown()"],
    (RequestResponseCycle, "__init__"): ["self.keep_alive = keep_alive", "self.response_complete = False"],
}


def _member(owner: type, name: str) -> Callable[..., Any]:
    member = inspect.getattr_static(owner, name, None)
    if member is None:
        pytest.fail(f"uvicorn {uvicorn.__version__}: {owner.__module__}.{owner.__name__}.{name} is gone")
    return member.fget if isinstance(member, property) else member  # type: ignore[no-any-return]


@pytest.mark.parametrize(("owner", "name"), list(SIGNATURES), ids=lambda x: getattr(x, "__name__", x))
def test_overridden_and_called_methods_keep_their_signatures(owner: type, name: str) -> None:
    parameters = list(inspect.signature(_member(owner, name)).parameters)
    assert parameters == SIGNATURES[owner, name], (
        f"uvicorn {uvicorn.__version__} changed {owner.__name__}.{name}{tuple(parameters)}: "
        "service/server/protocol.py relies on the old one; check it against uvicorn's source before widening the pin"
    )


@pytest.mark.parametrize(("owner", "name"), list(CALLS), ids=lambda x: getattr(x, "__name__", x))
def test_uvicorn_still_calls_what_is_overridden(owner: type, name: str) -> None:
    source = inspect.getsource(_member(owner, name))
    for needle in CALLS[owner, name]:
        assert needle in source, (
            f"uvicorn {uvicorn.__version__}: {owner.__name__}.{name} no longer has {needle!r}; "
            "service/server/protocol.py's override may no longer take effect"
        )
