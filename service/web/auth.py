"""Optional API keys: `Authorization: Bearer <key>` or `X-API-Key: <key>` on the API's routes."""

from __future__ import annotations

import hmac
import logging
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from starlette.types import ASGIApp, Receive, Scope, Send

from service.config import KEY, Settings
from service.web.errors import send_problem
from service.web.paths import route_path

logger = logging.getLogger("service.auth")

PROTECTED = ("/v1/", "/v2")
OPEN = ("/v2/health/",)  # the protocol's own probes stay open, as /healthz and /readyz do
ADMIN = "/v2/repository/models/"  # load and unload: with an admin key, only it may call them
DOCS = ("/docs", "/redoc", "/openapi.json", "/docs-assets/")


class Keys:
    """The accepted keys: one from the settings, and those in a file (its format: `parse_keys`).
    The file is read again when it changes, at most once a second, so keys can be rotated without a
    restart: add the new key, move clients over, remove the old one. A file that cannot be read or
    breaks the format fails startup; at run time it is logged once and the keys read before stay
    (so does a file removed: empty it to take every key back)."""

    RECHECK = 1.0  # seconds between looks at the file

    def __init__(self, key: str | None, file: Path | None) -> None:
        self.fixed = [key.encode()] if key else []
        self.file = file
        self.from_file: list[bytes] = []
        self.seen: tuple[int, int] | None = None
        self.checked = 0.0
        self.complaint: str | None = None  # the last problem logged, so that it is logged once
        self.reload()

    def reload(self) -> None:
        """Read the file if it changed; OSError or ValueError (saying what is wrong) if it is bad."""
        if self.file is None:
            return
        stat = os.stat(self.file)
        if (stat.st_mtime_ns, stat.st_size) != self.seen:
            self.seen = (stat.st_mtime_ns, stat.st_size)  # a bad file is reported once, not every second
            self.from_file = parse_keys(self.file.read_bytes())

    def current(self) -> list[bytes]:
        now = time.monotonic()
        if self.file is not None and now - self.checked >= self.RECHECK:
            self.checked = now
            try:
                self.reload()
            except (OSError, ValueError) as exc:  # keep serving with the keys already read
                problem = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                if problem != self.complaint:
                    self.complaint = problem
                    logger.warning(
                        "API keys file %r: %s; the %d key(s) read before stay valid",
                        str(self.file),
                        problem,
                        len(self.from_file),
                    )
            else:
                self.complaint = None
        return self.fixed + self.from_file

    def accepts(self, presented: bytes) -> bool:
        """Constant-time against every key, whichever matches."""
        matched = False
        for key in self.current():
            matched |= hmac.compare_digest(key, presented)
        return matched


def parse_keys(data: bytes) -> list[bytes]:
    """The keys in a keys file: UTF-8 text, one key a line. A line is blank, a comment (its first
    character other than a space is `#`), or a key: printable ASCII without spaces, `#` included,
    with spaces around it ignored. Any other line is refused (ValueError naming it), never read as
    part of a key: a key is never silently shortened."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("is not UTF-8 text (write it as UTF-8 or ASCII, one key a line)") from None
    keys = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not KEY.fullmatch(line):
            raise ValueError(
                f"line {number} is not a key: a key is printable ASCII without spaces, "
                "and a comment is a line of its own starting with #"
            )
        keys.append(line.encode())
    return keys


@dataclass(frozen=True)
class Policy:
    """Which requests take a key, decided once from the settings; REST's RequireKey and the gRPC
    servicer both ask it. With an admin key (ENCODER_ADMIN_API_KEY), loading and unloading models
    takes that key alone, and it is valid everywhere else too; with only an admin key, the rest of
    the API stays open."""

    admin: bytes | None  # the admin key
    open_api: bool  # no API keys but the admin key

    @classmethod
    def of(cls, settings: Settings) -> Policy | None:
        """The settings' policy, or None when no key is set at all."""
        if not settings.auth_required:
            return None
        admin = settings.admin_api_key.get_secret_value().encode() if settings.admin_api_key is not None else None
        return cls(admin=admin, open_api=not settings.api_keys_required)

    def administers(self, changes_models: bool) -> bool:
        """Whether a request that loads or unloads (`changes_models`) takes the admin key."""
        return changes_models and self.admin is not None

    def guards(self, administers: bool) -> bool:
        """Whether a request of the API takes a key at all: one that administers does; any other
        unless the API is open."""
        return administers or not self.open_api

    def refuse(self, presented: bytes | None, keys: Keys | None, administers: bool) -> Refusal | None:
        """Why a request it guards, that presented a key (or none), may not go on; None if it may."""
        return refuse(presented, keys, self.admin, administers)


class RequireKey:
    """401 with WWW-Authenticate for the API's routes without a valid key, as `policy` says; probes,
    metrics and, unless `docs_public` is off, the docs stay open. Keys are never logged or echoed."""

    def __init__(self, app: ASGIApp, docs_public: bool, policy: Policy) -> None:
        self.app = app
        self.prefixes = PROTECTED if docs_public else PROTECTED + DOCS
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if "path" in scope else ""
        if scope["type"] != "http" or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)
            return
        administers = self.policy.administers(path.startswith(ADMIN))
        api = path.startswith(self.prefixes) and not path.startswith(OPEN)
        if not (administers or (api and self.policy.guards(administers))):
            await self.app(scope, receive, send)
            return
        keys: Keys | None = scope.get("state", {}).get("keys")  # read at startup, by the lifespan
        refusal = self.policy.refuse(_presented_key(scope), keys, administers)
        if refusal is None:
            await self.app(scope, receive, send)
        elif refusal is Refusal.NOT_ADMIN:
            await send_problem(send, path, 403, refusal.value)
        else:
            challenge = b'Bearer realm="encoding-service"'
            if refusal is Refusal.INVALID:
                challenge += b', error="invalid_token"'
            await send_problem(send, path, 401, refusal.value, [(b"www-authenticate", challenge)])


class Refusal(StrEnum):
    """Why a request's key does not let it through; each front end has a status for each."""

    MISSING = "a valid API key is required: send Authorization: Bearer <key> (or X-API-Key: <key>)"
    INVALID = "the API key is not valid"
    NOT_ADMIN = "this API key may not load or unload models: that takes the admin key (ENCODER_ADMIN_API_KEY)"


def refuse(presented: bytes | None, keys: Keys | None, admin: bytes | None, administers: bool) -> Refusal | None:
    """Whether a request that `presented` a key (or none) may go on: None if it may. A request
    that `administers` (loads or unloads) takes the admin key when there is one; any other takes
    a key of `keys` or the admin key. Compared in constant time; never logged or echoed."""
    is_admin = presented is not None and admin is not None and hmac.compare_digest(admin, presented)
    valid = is_admin or (presented is not None and keys is not None and keys.accepts(presented))
    if valid and (is_admin or not administers):
        return None
    if valid:  # a valid key, but not the one that may change what is served
        return Refusal.NOT_ADMIN
    return Refusal.MISSING if presented is None else Refusal.INVALID


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> bytes | None:
    """The key in `Authorization: Bearer <key>` or `X-API-Key: <key>` (header names lowercase)."""
    for name, value in headers:
        if name == b"authorization":
            scheme, _, token = bytes(value).partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return token.strip()
        elif name == b"x-api-key" and value:
            return bytes(value)
    return None


def _presented_key(scope: Scope) -> bytes | None:
    return presented_key(scope["headers"])
