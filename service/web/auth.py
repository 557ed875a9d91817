"""Optional API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>` on the API's routes."""

from __future__ import annotations

import contextlib
import hmac
import os
import time
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service.web.errors import problem
from service.web.paths import route_path

PROTECTED = ("/v1/", "/v2")
OPEN = ("/v2/health/",)  # the protocol's own probes stay open, as /healthz and /readyz do
ADMIN = "/v2/repository/models/"  # load and unload: with an admin key, only it may call them
DOCS = ("/docs", "/redoc", "/openapi.json", "/docs-assets/")


class Keys:
    """The accepted keys: one from the settings, and those in a file, one a line ('#' starts a
    comment). The file is read again when it changes, at most once a second, so keys can be
    rotated without a restart: add the new key, move clients over, remove the old one."""

    def __init__(self, key: str | None, file: Path | None) -> None:
        self.fixed = [key.encode()] if key else []
        self.file = file
        self.from_file: list[bytes] = []
        self.seen: tuple[int, int] | None = None
        self.checked = 0.0
        self.reload()

    def reload(self) -> None:
        if self.file is None:
            return
        stat = os.stat(self.file)  # a missing or unreadable file fails startup, and later keeps the old keys
        if (stat.st_mtime_ns, stat.st_size) != self.seen:
            lines = (line.split("#", 1)[0].strip() for line in self.file.read_text().splitlines())
            self.from_file = [line.encode() for line in lines if line]
            self.seen = (stat.st_mtime_ns, stat.st_size)

    def current(self) -> list[bytes]:
        now = time.monotonic()
        if self.file is not None and now - self.checked >= 1.0:
            self.checked = now
            with contextlib.suppress(OSError):  # keep serving with the keys already read
                self.reload()
        return self.fixed + self.from_file

    def accepts(self, presented: bytes) -> bool:
        """Constant-time against every key, whichever matches."""
        matched = False
        for key in self.current():
            matched |= hmac.compare_digest(key, presented)
        return matched


class RequireKey:
    """401 with WWW-Authenticate for the API's routes without a valid key; probes, metrics and,
    unless `docs_public` is off, the docs stay open. With an admin key (ENCODER_ADMIN_API_KEY),
    loading and unloading models takes that key alone (403 for another valid key), and it is
    valid everywhere else too; with only an admin key, the rest of the API stays open. Keys are
    never logged or echoed."""

    def __init__(self, app: ASGIApp, docs_public: bool, admin: str | None = None, open_api: bool = False) -> None:
        self.app = app
        self.prefixes = PROTECTED if docs_public else PROTECTED + DOCS
        self.admin = admin.encode() if admin else None
        self.open_api = open_api  # no API keys but the admin key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if "path" in scope else ""
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        administers = self.admin is not None and path.startswith(ADMIN)
        if not administers and (self.open_api or not path.startswith(self.prefixes) or path.startswith(OPEN)):
            await self.app(scope, receive, send)
            return
        keys: Keys | None = scope.get("state", {}).get("keys")  # read at startup, by the lifespan
        presented = _presented_key(scope)
        is_admin = presented is not None and self.admin is not None and hmac.compare_digest(self.admin, presented)
        valid = is_admin or (presented is not None and keys is not None and keys.accepts(presented))
        if valid and (is_admin or not administers):
            await self.app(scope, receive, send)
            return
        if valid:  # a valid key, but not the one that may change what is served
            detail = "this API key may not load or unload models: that takes the admin key (ENCODER_ADMIN_API_KEY)"
            await _refuse(send, 403, [], problem(path, detail))
            return
        detail = "a valid API key is required: send Authorization: Bearer <key> (or X-API-Key: <key>)"
        challenge = b'Bearer realm="encoding-service"'
        if presented is not None:
            detail = "the API key is not valid"
            challenge += b', error="invalid_token"'
        await _refuse(send, 401, [(b"www-authenticate", challenge)], problem(path, detail))


async def _refuse(send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), *headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _presented_key(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = bytes(value).partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value:
            return bytes(value)
    return None
