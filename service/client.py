"""A small typed client for the v1 API, sync and async, on httpx: numpy arrays in and out.

    from service.client import Client

    with Client("http://127.0.0.1:8000") as client:
        codes = client.encode(x)                     # (rows, latent_dim)
        vae = client.vae(x, samples=3, seed=42)      # vae.mu, vae.log_sigma, vae.z, vae.kl, vae.seed
        client.models()                              # what is served: names, versions, states

    Client(url, model="fingerprints", version=2)     # that model (and version) for every call
    client.encode(x, model="fingerprints")           # or for one call (its highest ready version)

Large batches travel packed (numpy.packbits) with safetensors responses; small ones as JSON; the
numbers are the same. Every call is safe to repeat (without a seed the client draws one first),
so connection errors are retried. A non-2xx answer raises ServiceError with the server's message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import numpy.typing as npt
import safetensors.numpy

SAFETENSORS = "application/x-safetensors"
PACK_ABOVE = 4096  # values; larger batches are sent packed
RETRIED = (httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


class ServiceError(Exception):
    """The service answered with an error: its status and its message (`detail` or `error`)."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class VaeResult:
    mu: npt.NDArray[np.float64]  # (rows, latent_dim)
    log_sigma: npt.NDArray[np.float64]  # (rows, latent_dim)
    z: npt.NDArray[np.float64]  # (rows, samples, latent_dim)
    kl: npt.NDArray[np.float64]  # (rows,)
    seed: int


@dataclass(frozen=True)
class _Call:
    """One request, and how to read its answer."""

    method: str
    path: str
    body: dict[str, Any] | None = None
    binary: bool = False

    def headers(self) -> dict[str, str]:
        return {"accept": SAFETENSORS} if self.binary else {}

    def read(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                problem = response.json()
                detail = problem.get("detail", problem.get("error", problem))
            except ValueError:
                detail = response.text
            raise ServiceError(response.status_code, detail)
        if response.headers.get("content-type", "").startswith(SAFETENSORS):
            arrays: dict[str, Any] = dict(safetensors.numpy.load(response.content))
            header_length = int.from_bytes(response.content[:8], "little")
            metadata = json.loads(response.content[8 : 8 + header_length])
            arrays |= {key: int(value) for key, value in metadata.get("__metadata__", {}).items()}
            return arrays
        payload: dict[str, Any] = response.json()
        return payload


def _batch(x: npt.ArrayLike, packed: bool | None) -> tuple[Any, bool]:
    """The `inputs` of a request for rows x of 0/1 values, and whether they go packed."""
    bits = np.asarray(x)
    if bits.ndim != 2:
        raise ValueError(f"expected a 2-D array of rows, got shape {bits.shape}")
    if packed is None:
        packed = bits.size > PACK_ABOVE
    if packed:
        if not np.isin(bits, (0, 1)).all():
            raise ValueError("every value must be 0 or 1")
        data = base64.b64encode(np.packbits(bits.astype(np.uint8), axis=1).tobytes()).decode()
        return {"packed": data}, True
    return bits.astype(np.int64).tolist(), False


def prefix(model: str | None, version: int | None) -> str:
    """The path of a model's routes: /v1 for the server's default model, else /v1/models/{model}
    (its highest ready version) or /v1/models/{model}/versions/{version}."""
    if model is None and version is None:
        return "/v1"
    path = f"/v1/models/{quote(model or 'default', safe='')}"
    return path if version is None else f"{path}/versions/{int(version)}"


def _encode_call(x: npt.ArrayLike, packed: bool | None, at: str) -> _Call:
    inputs, binary = _batch(x, packed)
    return _Call("POST", f"{at}/autoencoder/encode", {"inputs": inputs}, binary)


def _vae_call(x: npt.ArrayLike, samples: int, seed: int | None, packed: bool | None, at: str) -> _Call:
    inputs, binary = _batch(x, packed)
    chosen = secrets.randbelow(2**63) if seed is None else seed  # chosen here, so a retry draws the same z
    return _Call("POST", f"{at}/vae/encode", {"inputs": inputs, "samples": samples, "seed": chosen}, binary)


def _vae_result(payload: dict[str, Any]) -> VaeResult:
    arrays = {name: np.asarray(payload[name], dtype=np.float64) for name in ("mu", "log_sigma", "z", "kl")}
    return VaeResult(**arrays, seed=int(payload["seed"]))


def _retrying(attempt: int, retries: int) -> float:
    """How long to wait before retry `attempt + 1`; re-raises the current error when none is left."""
    if attempt == retries:
        raise  # only ever called from an `except` block: the connection error in hand
    return 0.1 * (1 << attempt)


class _Base:
    """What both clients share: options, the httpx client they open, and their retry budget."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        retries: int = 2,
        transport: Any = None,
        model: str | None = None,
        version: int | None = None,
    ) -> None:
        self.retries = retries
        self.model, self.version = model, version
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = self._open(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def _open(self, **options: Any) -> Any:
        raise NotImplementedError

    def _at(self, model: str | None, version: int | None) -> str:
        """The routes of the model a call names, or else the client's."""
        if model is None and version is None:
            model, version = self.model, self.version
        return prefix(model, version)


class Client(_Base):
    """The v1 API over a pooled httpx.Client; use it as a context manager or call close().
    Options: api_key, timeout (seconds), retries (on connection errors), transport (for tests),
    model and version (which served model to ask; the server's default model without them)."""

    http: httpx.Client

    def _open(self, **options: Any) -> httpx.Client:
        return httpx.Client(**options)

    def _send(self, call: _Call) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(call.method, call.path, json=call.body, headers=call.headers())
                return call.read(response)
            except RETRIED:
                time.sleep(_retrying(attempt, self.retries))
        raise AssertionError("unreachable")  # pragma: no cover

    def model_info(self, *, model: str | None = None, version: int | None = None) -> dict[str, Any]:
        """What the model (the client's, or the default) is: dimensions, fingerprint, limits."""
        at = self._at(model, version)
        return self._send(_Call("GET", "/v1/model" if at == "/v1" else at))

    def models(self) -> list[dict[str, Any]]:
        """Every model the server knows, with its versions and their states."""
        listed: list[dict[str, Any]] = self._send(_Call("GET", "/v1/models"))["models"]
        return listed

    def encode(
        self, x: npt.ArrayLike, *, packed: bool | None = None, model: str | None = None, version: int | None = None
    ) -> npt.NDArray[np.float64]:
        """Autoencoder codes of rows x, shape (rows, latent_dim)."""
        return np.asarray(self._send(_encode_call(x, packed, self._at(model, version)))["codes"], dtype=np.float64)

    def vae(
        self,
        x: npt.ArrayLike,
        *,
        samples: int = 1,
        seed: int | None = None,
        packed: bool | None = None,
        model: str | None = None,
        version: int | None = None,
    ) -> VaeResult:
        """mu, log_sigma, `samples` draws of z per row and the KL; the seed that reproduces z."""
        return _vae_result(self._send(_vae_call(x, samples, seed, packed, self._at(model, version))))

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The same over httpx.AsyncClient: `async with AsyncClient(url) as client: await client.encode(x)`."""

    http: httpx.AsyncClient

    def _open(self, **options: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(**options)

    async def _send(self, call: _Call) -> dict[str, Any]:
        for attempt in range(self.retries + 1):
            try:
                response = await self.http.request(call.method, call.path, json=call.body, headers=call.headers())
                return call.read(response)
            except RETRIED:
                await asyncio.sleep(_retrying(attempt, self.retries))
        raise AssertionError("unreachable")  # pragma: no cover

    async def model_info(self, *, model: str | None = None, version: int | None = None) -> dict[str, Any]:
        at = self._at(model, version)
        return await self._send(_Call("GET", "/v1/model" if at == "/v1" else at))

    async def models(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = (await self._send(_Call("GET", "/v1/models")))["models"]
        return listed

    async def encode(
        self, x: npt.ArrayLike, *, packed: bool | None = None, model: str | None = None, version: int | None = None
    ) -> npt.NDArray[np.float64]:
        call = _encode_call(x, packed, self._at(model, version))
        return np.asarray((await self._send(call))["codes"], dtype=np.float64)

    async def vae(
        self,
        x: npt.ArrayLike,
        *,
        samples: int = 1,
        seed: int | None = None,
        packed: bool | None = None,
        model: str | None = None,
        version: int | None = None,
    ) -> VaeResult:
        return _vae_result(await self._send(_vae_call(x, samples, seed, packed, self._at(model, version))))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
