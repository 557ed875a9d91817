"""A small typed client for the v1 API, sync and async, on httpx: numpy arrays in and out.

    from service.client import Client

    with Client("http://127.0.0.1:8000") as client:
        codes = client.encode(x)                     # (rows, latent_dim)
        vae = client.vae(x, samples=3, seed=42)      # vae.mu, vae.log_sigma, vae.z, vae.kl, vae.seed
        client.decode(codes)                         # bit probabilities; kind="vae" for z
        client.reconstruct(x)                        # the probabilities of each row's own code
        client.models()                              # what is served: names, versions, states

    Client(url, model="fingerprints", version=2)     # that model (and version) for every call
    client.encode(x, model="fingerprints")           # or for one call (its highest ready version)

Large batches travel packed (numpy.packbits, with their width) with safetensors responses; small
ones as JSON; the numbers are the same. A value that is not 0 or 1 raises ValueError naming its
row and column, before anything is sent. Every call is safe to repeat (without a seed the client
draws one first), so connection errors are retried. A batch over the server's limits is split
once a 413 has told the client to read them (request i of a split VAE call draws with seed + i).
A non-2xx answer raises ServiceError with the server's message.
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


def prefix(model: str | None, version: int | None) -> str:
    """The path of a model's routes: /v1 for the server's default model, else /v1/models/{model}
    (its highest ready version) or /v1/models/{model}/versions/{version}."""
    if model is None and version is None:
        return "/v1"
    path = f"/v1/models/{quote(model or 'default', safe='')}"
    return path if version is None else f"{path}/versions/{int(version)}"


@dataclass(frozen=True)
class Fit:
    """What a batch must fit on one model: its widths and limits (from its info)."""

    input_dim: int
    latent_dim: int
    max_rows: int
    max_rows_x_samples: int
    max_body_bytes: int

    @classmethod
    def of(cls, info: dict[str, Any]) -> Fit:
        limits = info["limits"]
        return cls(
            info["input_dim"],
            info["latent_dim"],
            limits["max_rows"],
            limits["max_rows_x_samples"],
            limits["max_body_bytes"],
        )


KINDS = ("autoencoder", "vae")
DECODED = {"autoencoder": "codes", "vae": "z"}  # what each kind's decode route takes


def _bits(x: npt.ArrayLike) -> npt.NDArray[np.uint8]:
    """Rows of 0/1 values as uint8; ValueError naming the first value that is not 0 or 1 (row, column)."""
    bits = np.asarray(x)
    if bits.ndim != 2 or 0 in bits.shape:
        raise ValueError(f"expected a 2-D array of one or more rows, got shape {bits.shape}")
    bad = np.argwhere((bits != 0) & (bits != 1))  # NaN included
    if bad.size:
        row, column = (int(i) for i in bad[0])
        raise ValueError(f"row {row}, column {column}: expected 0 or 1, got {bits[row, column].item()!r}")
    return bits.astype(np.uint8)


def _latents(x: npt.ArrayLike) -> npt.NDArray[np.float64]:
    values = np.asarray(x, dtype=np.float64)
    if values.ndim != 2 or 0 in values.shape:
        raise ValueError(f"expected a 2-D array of one or more rows, got shape {values.shape}")
    return values


def _rows_a_request(fit: Fit | None, samples: int, row_bytes: int) -> int | None:
    """The most rows one request may carry on a model of this fit (None: unknown)."""
    if fit is None:
        return None
    by_body = (fit.max_body_bytes - 1024) // row_bytes  # 1 KiB for the rest of the body
    return max(1, min(fit.max_rows, fit.max_rows_x_samples // samples, by_body))


def _plan(
    op: str,
    kind: str,
    x: npt.ArrayLike,
    at: str,
    fit: Fit | None,
    *,
    samples: int = 1,
    seed: int | None = None,
    packed: bool | None = None,
) -> list[_Call]:
    """The requests of one call: one, or, when the client knows the model's limits (it asks for
    them after a 413), the batch split into requests that fit them."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    values: npt.NDArray[Any]
    if op == "decode":
        values, field, width = _latents(x), DECODED[kind], fit.latent_dim if fit else None
        binary = values.size > PACK_ABOVE
        row_bytes = 26 * values.shape[1] + 2  # a float64 in JSON, and its separator
    else:
        values, field, width = _bits(x), "inputs", fit.input_dim if fit else None
        binary = values.size > PACK_ABOVE if packed is None else packed
        row_bytes = 4 * ((values.shape[1] + 7) // 8) // 3 + 4 if binary else 3 * values.shape[1] + 2
    if width is not None and values.shape[1] != width:
        raise ValueError(f"rows of {values.shape[1]} values were given, but the model's are {width} wide")
    options: dict[str, Any] = {}
    if kind == "vae" and op == "encode":
        chosen = secrets.randbelow(2**63) if seed is None else seed  # chosen here: a retry draws the same z
        options = {"samples": samples, "seed": chosen}
    most = _rows_a_request(fit, samples, row_bytes) or values.shape[0]
    calls = []
    for number, start in enumerate(range(0, values.shape[0], most)):
        chunk = values[start : start + most]
        if binary and op != "decode":  # rows say their width: never encoded at another
            batch: Any = {"packed": base64.b64encode(np.packbits(chunk.astype(np.uint8), axis=1).tobytes()).decode()}
            batch["width"] = chunk.shape[1]
        else:
            batch = chunk.tolist()
        body = {field: batch, **options}
        if "seed" in options:  # request i of a split batch draws with seed + i
            body["seed"] = (options["seed"] + number) % 2**63
        calls.append(_Call("POST", f"{at}/{kind}/{op}", body, binary))
    return calls


def _join(op: str, kind: str, calls: list[_Call], payloads: list[dict[str, Any]]) -> Any:
    """One call's answer from its requests' answers, in order."""

    def stacked(name: str) -> npt.NDArray[np.float64]:
        return np.concatenate([np.asarray(payload[name], dtype=np.float64) for payload in payloads])

    if op == "encode" and kind == "vae":
        arrays = {name: stacked(name) for name in ("mu", "log_sigma", "z", "kl")}
        assert calls[0].body is not None
        return VaeResult(**arrays, seed=int(calls[0].body["seed"]))
    return stacked("codes" if op == "encode" else "probabilities")


def _retrying(attempt: int, retries: int) -> float:
    """How long to wait before retry `attempt + 1`; re-raises the current error when none is left."""
    if attempt == retries:
        raise  # only ever called from an `except` block: the connection error in hand
    return 0.1 * (1 << attempt)


class _Base:
    """What both clients share: options, the httpx client they open, their retry budget, and the
    limits they learned of each model (to split a batch that is over them)."""

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
        self.fits: dict[str, Fit] = {}  # a model's routes -> its widths and limits, learned after a 413
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = self._open(base_url=base_url, headers=headers, timeout=timeout, transport=transport)

    def _open(self, **options: Any) -> Any:
        raise NotImplementedError

    def _at(self, model: str | None, version: int | None) -> str:
        """The routes of the model a call names, or else the client's."""
        if model is None and version is None:
            model, version = self.model, self.version
        return prefix(model, version)


def _info_call(at: str) -> _Call:
    return _Call("GET", "/v1/model" if at == "/v1" else at)


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

    def _call(
        self, op: str, kind: str, x: npt.ArrayLike, model: str | None, version: int | None, **options: Any
    ) -> Any:
        """One call: its requests, and once more split to fit if the server says it is over a limit."""
        at = self._at(model, version)
        for attempt in range(2):
            calls = _plan(op, kind, x, at, self.fits.get(at), **options)
            try:
                return _join(op, kind, calls, [self._send(call) for call in calls])
            except ServiceError as error:
                if error.status != 413 or attempt:
                    raise
                self.fits[at] = Fit.of(self._send(_info_call(at)))
        raise AssertionError("unreachable")  # pragma: no cover

    def model_info(self, *, model: str | None = None, version: int | None = None) -> dict[str, Any]:
        """What the model (the client's, or the default) is: dimensions, fingerprint, limits."""
        return self._send(_info_call(self._at(model, version)))

    def models(self) -> list[dict[str, Any]]:
        """Every model the server knows, with its versions and their states."""
        listed: list[dict[str, Any]] = self._send(_Call("GET", "/v1/models"))["models"]
        return listed

    def encode(
        self, x: npt.ArrayLike, *, packed: bool | None = None, model: str | None = None, version: int | None = None
    ) -> npt.NDArray[np.float64]:
        """Autoencoder codes of rows x, shape (rows, latent_dim)."""
        codes: npt.NDArray[np.float64] = self._call("encode", "autoencoder", x, model, version, packed=packed)
        return codes

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
        result: VaeResult = self._call("encode", "vae", x, model, version, samples=samples, seed=seed, packed=packed)
        return result

    def decode(
        self, latents: npt.ArrayLike, *, kind: str = "autoencoder", model: str | None = None, version: int | None = None
    ) -> npt.NDArray[np.float64]:
        """Bit probabilities (rows, input_dim) of autoencoder codes, or of VAE z with kind="vae"."""
        probabilities: npt.NDArray[np.float64] = self._call("decode", kind, latents, model, version)
        return probabilities

    def reconstruct(
        self,
        x: npt.ArrayLike,
        *,
        kind: str = "autoencoder",
        packed: bool | None = None,
        model: str | None = None,
        version: int | None = None,
    ) -> npt.NDArray[np.float64]:
        """Bit probabilities (rows, input_dim) of each row's own code (kind="vae": its mu)."""
        probabilities: npt.NDArray[np.float64] = self._call("reconstruct", kind, x, model, version, packed=packed)
        return probabilities

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

    async def _call(
        self, op: str, kind: str, x: npt.ArrayLike, model: str | None, version: int | None, **options: Any
    ) -> Any:
        at = self._at(model, version)
        for attempt in range(2):
            calls = _plan(op, kind, x, at, self.fits.get(at), **options)
            try:
                return _join(op, kind, calls, [await self._send(call) for call in calls])
            except ServiceError as error:
                if error.status != 413 or attempt:
                    raise
                self.fits[at] = Fit.of(await self._send(_info_call(at)))
        raise AssertionError("unreachable")  # pragma: no cover

    async def model_info(self, *, model: str | None = None, version: int | None = None) -> dict[str, Any]:
        return await self._send(_info_call(self._at(model, version)))

    async def models(self) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = (await self._send(_Call("GET", "/v1/models")))["models"]
        return listed

    async def encode(
        self, x: npt.ArrayLike, *, packed: bool | None = None, model: str | None = None, version: int | None = None
    ) -> npt.NDArray[np.float64]:
        codes: npt.NDArray[np.float64] = await self._call("encode", "autoencoder", x, model, version, packed=packed)
        return codes

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
        options = {"samples": samples, "seed": seed, "packed": packed}
        result: VaeResult = await self._call("encode", "vae", x, model, version, **options)
        return result

    async def decode(
        self, latents: npt.ArrayLike, *, kind: str = "autoencoder", model: str | None = None, version: int | None = None
    ) -> npt.NDArray[np.float64]:
        probabilities: npt.NDArray[np.float64] = await self._call("decode", kind, latents, model, version)
        return probabilities

    async def reconstruct(
        self,
        x: npt.ArrayLike,
        *,
        kind: str = "autoencoder",
        packed: bool | None = None,
        model: str | None = None,
        version: int | None = None,
    ) -> npt.NDArray[np.float64]:
        probabilities: npt.NDArray[np.float64] = await self._call("reconstruct", kind, x, model, version, packed=packed)
        return probabilities

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
