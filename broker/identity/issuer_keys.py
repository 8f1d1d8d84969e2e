"""Issuers' verification keys, the I/O part (the pure parser is :mod:`broker.identity.jwks`).

:class:`IssuerKeys` holds one issuer's keys from exactly one source: a ``jwks_file`` (read at
construction, errors name the path), an inline ``jwks`` document, a ``jwks_url``, or OIDC / RFC 8414 discovery
from the issuer URL. Fetches (J26): https only, the server certificate verified (``ssl`` may carry a private
CA), redirects never followed, a 64 KiB body cap, a total timeout; a failed fetch keeps the last-known-good
keys, and an issuer whose keys were never fetched has none (fail closed). Unknown ``kid`` refetches at most
once per ``refetch_cooldown`` and concurrent callers share one in-flight fetch (J06, CONTRACT §4); keys older
than ``max_age`` are refreshed in the background, also single-flight, while the current keys keep serving.
Time is always the caller's ``now``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from ssl import SSLContext
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog

from broker.identity.jwks import EMPTY_KEYS, KeyEntry, KeySet
from broker.identity.jws import JwsError, loads_strict

__all__ = ["IssuerKeys", "JwksFetchError", "discovery_urls"]

_log = structlog.get_logger(__name__)
MAX_JWKS_BYTES = 64 * 1024


class JwksFetchError(Exception):
    """A JWKS or discovery fetch that failed; the message is safe to log."""


def _check_url(url: str, allow_http: bool, what: str) -> None:
    parts = urlsplit(url)
    allowed = ("https", "http") if allow_http else ("https",)
    if parts.scheme not in allowed or not parts.hostname:
        raise ValueError(f"{what} must be an https URL: {url!r}")


def discovery_urls(issuer: str) -> tuple[str, str]:
    """OIDC Discovery 1.0 §4 (append) and RFC 8414 §3.1 (insert before the issuer's path) metadata URLs."""
    parts = urlsplit(issuer)
    path = parts.path.rstrip("/")
    oidc = f"{parts.scheme}://{parts.netloc}{path}/.well-known/openid-configuration"
    oauth = f"{parts.scheme}://{parts.netloc}/.well-known/oauth-authorization-server{path}"
    return oidc, oauth


class IssuerKeys:
    """One issuer's keys. Exactly one source: ``jwks_file``, ``jwks``, ``jwks_url`` or ``discovery=True``.

    Static sources load here (a bad file raises ValueError naming the path). URL sources need an
    ``aiohttp.ClientSession`` (here or at :meth:`start`) and fetch lazily on the caller's ``now``.
    """

    def __init__(
        self,
        issuer: str,
        *,
        jwks_file: Path | None = None,
        jwks: Mapping[str, Any] | None = None,
        jwks_url: str | None = None,
        discovery: bool = False,
        session: aiohttp.ClientSession | None = None,
        ssl: SSLContext | None = None,
        max_age: float = 300.0,
        refetch_cooldown: float = 30.0,
        timeout: float = 5.0,
        max_bytes: int = MAX_JWKS_BYTES,
        allow_insecure_http: bool = False,
    ) -> None:
        sources = sum((jwks_file is not None, jwks is not None, jwks_url is not None, discovery))
        if sources != 1:
            raise ValueError(f"issuer {issuer!r}: give exactly one of jwks_file, jwks, jwks_url, discovery")
        self.issuer = issuer
        self._jwks_url = jwks_url
        self._discovery = discovery
        self._session = session
        #: passed to aiohttp as ``ssl=``: None means default verification against the system CAs
        self._ssl = ssl
        self._max_age = max_age
        self._cooldown = refetch_cooldown
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._max_bytes = max_bytes
        self._allow_http = allow_insecure_http
        self._keys: KeySet | None = None
        self._fetched_at = 0.0
        self._last_attempt: float | None = None
        self._last_kid_refetch: float | None = None
        self._inflight: asyncio.Task[bool] | None = None
        #: number of completed fetch attempts (successful or not), for metrics and tests
        self.fetch_count = 0
        if jwks_url is not None:
            _check_url(jwks_url, allow_insecure_http, "jwks_url")
        if discovery:
            _check_url(issuer, allow_insecure_http, "issuer (for discovery)")
        if jwks_file is not None:
            self._keys = self._load_file(Path(jwks_file))
        elif jwks is not None:
            self._keys = self._static_keys(dict(jwks), f"issuer {issuer!r}")

    @staticmethod
    def _static_keys(document: Any, where: str) -> KeySet:
        try:
            keys = KeySet.from_jwks(document)
        except ValueError as exc:
            raise ValueError(f"{where}: not a valid JWKS: {exc}") from exc
        if not keys.entries:
            skipped = ", ".join(keys.skipped)
            raise ValueError(f"{where}: JWKS has no usable verification key (skipped: {skipped})")
        return keys

    @classmethod
    def _load_file(cls, path: Path) -> KeySet:
        try:
            document = loads_strict(path.read_bytes())
        except OSError as exc:
            raise ValueError(f"{path}: cannot read JWKS: {exc.strerror}") from exc
        except JwsError as exc:
            raise ValueError(f"{path}: not a valid JWKS: {exc.reason}") from exc
        return cls._static_keys(document, str(path))

    @property
    def static(self) -> bool:
        return self._jwks_url is None and not self._discovery

    @property
    def loaded(self) -> bool:
        """True once a key set was loaded or fetched (an issuer that never had keys fails closed)."""
        return self._keys is not None

    @property
    def current(self) -> KeySet:
        return self._keys if self._keys is not None else EMPTY_KEYS

    @property
    def refreshing(self) -> asyncio.Task[bool] | None:
        """The in-flight fetch, if any (await it to observe a background refresh complete)."""
        return self._inflight

    async def start(self, *, now: float, session: aiohttp.ClientSession | None = None) -> None:
        """First fetch for URL sources; a failure is logged, not raised (the issuer fails closed)."""
        if session is not None:
            self._session = session
        if not self.static:
            await self.refresh(now=now)

    async def refresh(self, *, now: float) -> bool:
        """Fetch now (joining a fetch in flight); True if new keys were installed. Static sources: False."""
        if self.static:
            return False
        if self._inflight is None:
            self._start_fetch(now)
        assert self._inflight is not None
        return await asyncio.shield(self._inflight)

    async def close(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def key_for(self, kid: str | None, now: float) -> tuple[KeyEntry, ...]:
        """Usable keys for ``kid`` (see :meth:`KeySet.find`); () if none even after the allowed refetch."""
        if self.static:
            return self.current.find(kid)
        if self._keys is None:
            # Never loaded: try (again) at most once per cooldown; concurrent callers share the attempt.
            if self._inflight is None and self._cooled(self._last_attempt, now):
                self._start_fetch(now)
            if self._inflight is not None:
                await asyncio.shield(self._inflight)
            return self.current.find(kid)
        stale = now - self._fetched_at >= self._max_age
        if stale and self._inflight is None and self._cooled(self._last_attempt, now):
            self._start_fetch(now)  # background refresh: the current keys keep serving meanwhile
        found = self._keys.find(kid)
        if found:
            return found
        # J06: an unknown kid refetches at most once per cooldown, single-flight, whatever the kid flood.
        if self._inflight is None and self._cooled(self._last_kid_refetch, now):
            self._last_kid_refetch = now
            self._start_fetch(now)
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
        return self.current.find(kid)

    def _cooled(self, last: float | None, now: float) -> bool:
        return last is None or now - last >= self._cooldown

    def _start_fetch(self, now: float) -> None:
        self._last_attempt = now
        task = asyncio.get_running_loop().create_task(self._refresh(now))
        self._inflight = task
        task.add_done_callback(self._fetch_done)

    def _fetch_done(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None
        # A background refresh may have no awaiter: retrieve (and log) an unexpected error here.
        if not task.cancelled() and (error := task.exception()) is not None:
            _log.error("jwks_refresh_crashed", issuer=self.issuer, error=repr(error))

    async def _refresh(self, now: float) -> bool:
        """Fetch and swap in a new key set; on any failure keep the last-known-good set (J26)."""
        try:
            keys = await self._fetch()
        except JwksFetchError as exc:
            _log.warning("jwks_fetch_failed", issuer=self.issuer, error=str(exc), kept=self._keys is not None)
            return False
        finally:
            self.fetch_count += 1
        if keys.skipped:
            _log.info("jwks_keys_skipped", issuer=self.issuer, skipped=list(keys.skipped))
        self._keys = keys
        self._fetched_at = now
        return True

    async def _fetch(self) -> KeySet:
        url = self._jwks_url if self._jwks_url is not None else await self._discover()
        try:
            keys = KeySet.from_jwks(await self._get_json(url))
        except ValueError as exc:
            raise JwksFetchError(f"{url}: {exc}") from None
        if not keys.entries:
            # A document with nothing usable is treated as a failed fetch: keep the last-known-good keys.
            raise JwksFetchError(f"{url}: no usable verification key (skipped: {', '.join(keys.skipped)})")
        return keys

    async def _discover(self) -> str:
        """OIDC discovery, then RFC 8414; the metadata ``issuer`` must equal ours exactly (RFC 8414 §3.3)."""
        errors = []
        for url in discovery_urls(self.issuer):
            try:
                metadata = await self._get_json(url)
            except JwksFetchError as exc:
                errors.append(str(exc))
                continue
            if not isinstance(metadata, dict) or metadata.get("issuer") != self.issuer:
                raise JwksFetchError(f"{url}: metadata issuer does not equal {self.issuer!r}")
            jwks_uri = metadata.get("jwks_uri")
            if not isinstance(jwks_uri, str):
                raise JwksFetchError(f"{url}: metadata has no jwks_uri")
            try:
                _check_url(jwks_uri, self._allow_http, "jwks_uri")
            except ValueError as exc:
                raise JwksFetchError(f"{url}: {exc}") from None
            return jwks_uri
        raise JwksFetchError("discovery failed: " + "; ".join(errors))

    async def _get_json(self, url: str) -> Any:
        if self._session is None:
            raise JwksFetchError("no HTTP session")
        try:
            async with self._session.get(
                url,
                allow_redirects=False,  # J26: a redirect could point anywhere; IdPs publish the final URL
                timeout=self._timeout,
                ssl=self._ssl if self._ssl is not None else True,
                headers={"Accept": "application/json, application/jwk-set+json"},
            ) as resp:
                if resp.status != 200:
                    raise JwksFetchError(f"{url}: HTTP {resp.status}")
                if resp.content_length is not None and resp.content_length > self._max_bytes:
                    raise JwksFetchError(f"{url}: body larger than {self._max_bytes} bytes")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(16384):
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise JwksFetchError(f"{url}: body larger than {self._max_bytes} bytes")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise JwksFetchError(f"{url}: {type(exc).__name__}: {exc}") from None
        try:
            return loads_strict(bytes(body))
        except JwsError as exc:
            raise JwksFetchError(f"{url}: not JSON ({exc.reason})") from None
