"""The path a request routes on, behind a proxy that strips a prefix (the root path)."""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send


def route_path(scope: Scope) -> str:
    """The path the app routes on: the request's, without the root path (a prefix a proxy strips)
    that servers such as `uvicorn --root-path` put in front of it, as Starlette's router sees it."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


class RootPath:
    """Serve behind a proxy that strips a path prefix (ENCODER_ROOT_PATH), under any server: the
    scope gets the prefix as its root_path, and in front of its path, as `uvicorn --root-path`
    does; a root path the server set already wins."""

    def __init__(self, app: ASGIApp, root_path: str) -> None:
        self.app = app
        self.root_path = root_path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket") and not scope.get("root_path"):
            scope["root_path"] = root = self.root_path
            scope["path"] = root + scope["path"]
            if scope.get("raw_path") is not None:
                scope["raw_path"] = root.encode() + scope["raw_path"]
        await self.app(scope, receive, send)
