"""``broker connect``: the agent-side connector that lets stock HTTP and MCP clients use the broker (CONTRACT §13).

```
local client ──plain HTTP, loopback only──▶ connector ──mTLS (the agent's SVID)──────────────────▶ broker
  [Authorization: Bearer <local secret>]      Authorization: DPoP <access token>, DPoP: <fresh proof>
```

The connector forwards ``/mcp/*``, ``/v1/*`` and ``/.well-known/*`` (anything else is 404) and streams answers
back as they arrive (MCP Streamable HTTP: SSE answers to POST, the GET stream, ``Mcp-Session-Id`` passed
through). It signs with :class:`broker.sdk.agent.DpopSigner` for the broker's URL (``htu`` is the broker's URL,
never the local one), answers ``use_dpop_nonce`` with one retry (:func:`broker.sdk.agent.nonce_challenge`) and
keeps the latest nonce, and takes the token from a :mod:`broker.sdk.credentials` source.

What it refuses locally, before anything is forwarded (:func:`local_refusal`, pure):
- a ``Host`` that is not a loopback name, any ``Origin``, a ``Sec-Fetch-Site`` other than ``none``, any
  ``OPTIONS``: only browsers send those, and no web page on this machine — not even one served from another
  loopback port (a dev server, Jupyter) — may borrow the agent's credentials; stock MCP clients and CLIs send
  none of them;
- a request without ``Authorization: Bearer <the local secret>`` (compared in constant time). The secret is
  ``--local-token FILE``, else one generated into ``DIR/agents/NAME-connect.token`` (0600, reused on the next
  start); only ``--no-local-token`` serves without one.

Replaying a request after a connection error: a request that never reached the broker (the connection could not
be opened) is retried once whatever its method; a connection that broke before an answer is retried once only for
idempotent methods (RFC 9110 §9.2.2). A POST (an MCP message, a tool call) is never replayed: the broker may have
executed it before the connection broke, and running a tool twice is worse than an error. Pooled connections that
the broker closed (a restart) are dropped by aiohttp before reuse, so a restart costs no error in practice.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import os
import secrets
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from broker.dev.idp import read_jwk
from broker.sdk.agent import DpopSigner, nonce_challenge
from broker.sdk.credentials import (
    CommandToken,
    FileToken,
    TokenSource,
    TokenUnavailable,
    secret_file_problem,
    unverified_claims,
)

__all__ = [
    "Connector",
    "add_connect_parser",
    "agent_tls_context",
    "cmd_connect",
    "default_local_token_path",
    "downstream_headers",
    "forwarded_path",
    "local_refusal",
    "parse_listen",
    "replay_allowed",
    "serving",
    "token_scheme",
    "upstream_headers",
    "whole_answer",
]

log = structlog.get_logger("broker.connect")

DEFAULT_LISTEN = "127.0.0.1:8765"
FORWARDED_PREFIXES = ("/mcp/", "/v1/", "/.well-known/")
#: CONTRACT §8's default body limit: a larger request would be refused by the broker anyway
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: P14: a local client that trickles its body does not hold a request open for ever
BODY_READ_TIMEOUT_SECONDS = 30.0
#: /healthz trusts a successful probe of the broker this long before probing again
HEALTH_CACHE_SECONDS = 5.0
PROBE_PATH = "/.well-known/oauth-protected-resource"
#: RFC 9110 §7.6.1 hop-by-hop fields (plus the framing ones, re-done on each side: HOSTILE P06/P07)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
#: never copied from the local request: the connector sets them (credentials, framing, the broker's Host)
_LOCAL_ONLY = HOP_BY_HOP | {"host", "authorization", "dpop", "content-length"}
#: the connector keeps the nonce; the local client has no use for it
_UPSTREAM_ONLY = HOP_BY_HOP | {"dpop-nonce"}
#: a local secret file larger than this is a mistake, not a secret
MAX_LOCAL_SECRET_BYTES = 4096
#: an answer with a Content-Length up to this is read whole and sent in one write (headers and body together:
#: one segment, one wake-up of the local client); anything larger, or without a length (SSE), is streamed
WHOLE_ANSWER_BYTES = 64 * 1024
#: RFC 9110 §9.2.2
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


# --- pure decisions -------------------------------------------------------------------------------------------


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) → (host, port); :class:`ValueError` unless HOST is loopback."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if host == "localhost":
        return "127.0.0.1", int(port_text)
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(
            f"--listen {text}: not a loopback address; the connector serves plain HTTP and adds the agent's "
            "credentials to every request, so it listens on 127.0.0.1 or [::1] only"
        )
    return host, int(port_text)


@lru_cache(maxsize=64)  # pure, and clients send the same Host on every call: ~30 µs a request saved
def _loopback_host(authority: str) -> bool:
    """Whether an authority (``Host`` value, ``host:port``, ``[::1]:port``) names this machine's loopback."""
    try:
        host = urlsplit("//" + authority).hostname
    except ValueError:
        return False
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def local_refusal(
    method: str, headers: Mapping[str, str], *, secret: bytes | None
) -> tuple[int, str, str] | None:
    """Why a local request is refused, as (status, error, description), or None to serve it.

    ``headers`` are the local request's (case-insensitive mapping); ``secret`` the local secret (None: none
    required). A browser is refused by what only a browser sends, whatever page it comes from: a loopback
    ``Origin`` is another local web app (a dev server, a notebook), not the agent.
    """
    if not _loopback_host(headers.get("Host", "")):
        return 403, "access_denied", "the connector answers only requests addressed to a loopback name"
    if method.upper() == "OPTIONS":  # a CORS preflight: answering it would let a page send what follows
        return 403, "access_denied", "OPTIONS is refused (a browser page cannot use the agent)"
    if "Origin" in headers:
        return (
            403,
            "access_denied",
            "requests with an Origin are refused (a browser page cannot use the agent)",
        )
    if headers.get("Sec-Fetch-Site", "none").lower() != "none":
        return (
            403,
            "access_denied",
            "requests from a web page are refused (a browser page cannot use the agent)",
        )
    if secret is not None:
        scheme, _, credentials = headers.get("Authorization", "").partition(" ")
        presented = credentials.strip().encode() if scheme.lower() == "bearer" else b""
        if not hmac.compare_digest(presented, secret):
            # 403, not 401: a 401 makes OAuth-capable MCP clients (mcp-remote, desktop clients) start a browser
            # sign-in against the connector, which has none; 403 names the missing local token instead
            return 403, "access_denied", "send Authorization: Bearer <the connector's local token>"
    return None


def forwarded_path(raw_path: str) -> bool:
    """Whether the connector forwards this request target (``/mcp/*``, ``/v1/*``, ``/.well-known/*``)."""
    return raw_path.startswith(FORWARDED_PREFIXES)


def _connection_named(headers: Mapping[str, str]) -> set[str]:
    named: set[str] = set()
    for name, value in headers.items():
        if name.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(",") if token.strip())
    return named


def upstream_headers(
    incoming: CIMultiDictProxy[str] | CIMultiDict[str], *, authorization: str, proof: str | None
) -> CIMultiDict[str]:
    """The local request's headers for the broker: hop-by-hop (and those ``Connection`` names), ``Host``,
    framing and any credentials dropped, then ``Authorization`` (and ``DPoP``) set by the connector."""
    dropped = _LOCAL_ONLY | _connection_named(incoming)
    out: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in incoming.items() if name.lower() not in dropped
    )
    if "Accept-Encoding" not in out:
        out["Accept-Encoding"] = "identity"  # bodies pass through undecoded: ask for what the client reads
    out["Authorization"] = authorization
    if proof is not None:
        out["DPoP"] = proof
    return out


def downstream_headers(incoming: CIMultiDictProxy[str] | CIMultiDict[str]) -> CIMultiDict[str]:
    """The broker's answer headers for the local client: hop-by-hop (and those ``Connection`` names) and
    ``DPoP-Nonce`` dropped; ``Content-Length``, ``Content-Type``, ``Mcp-Session-Id`` and the rest kept."""
    dropped = _UPSTREAM_ONLY | _connection_named(incoming)
    return CIMultiDict((name, value) for name, value in incoming.items() if name.lower() not in dropped)


@lru_cache(maxsize=4)  # pure; the same token on every call until it rotates (~40 µs of JSON decoding saved)
def token_scheme(token: str) -> str:
    """``Bearer`` for a certificate-bound token (RFC 8705 ``cnf.x5t#S256`` without ``cnf.jkt``: the TLS
    client certificate is its proof), else ``DPoP`` with a proof per request."""
    cnf = unverified_claims(token).get("cnf")
    if isinstance(cnf, dict) and "x5t#S256" in cnf and "jkt" not in cnf:
        return "Bearer"
    return "DPoP"


def whole_answer(method: str, status: int, headers: Mapping[str, str], limit: int) -> bool:
    """Whether an answer is relayed whole (read, then one write with its headers) rather than streamed: a
    ``Content-Length`` of at most ``limit`` and a body to send (not HEAD, 1xx, 204 or 304). Streams (SSE, the
    MCP GET stream) have no ``Content-Length`` and are always relayed as their bytes arrive."""
    length = headers.get("Content-Length", "")
    if not length.isdigit() or int(length) > limit or method.upper() == "HEAD":
        return False
    return status >= 200 and status not in (204, 304)


def replay_allowed(method: str, *, reached_broker: bool) -> bool:
    """Whether a request that failed on the connection may be sent once more (see the module docstring)."""
    return not reached_broker or method.upper() in IDEMPOTENT_METHODS


# --- the proxy ------------------------------------------------------------------------------------------------


def _error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


class _BodyTooLarge(Exception):
    pass


@dataclass
class Connector:
    """The running connector: one upstream ``ClientSession`` (mTLS), the signer, the token source."""

    broker_url: str
    ssl_context: ssl.SSLContext
    signer: DpopSigner
    tokens: TokenSource
    local_secret: bytes | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    #: the latest ``DPoP-Nonce`` the broker sent (RFC 9449 §8.2: use the most recent)
    nonce: str | None = None
    _session: aiohttp.ClientSession | None = None
    _healthy_until: float = 0.0

    @classmethod
    def from_certs(
        cls,
        broker_url: str,
        certs: Path,
        agent: str,
        tokens: TokenSource,
        *,
        local_secret: bytes | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> Connector:
        """A connector for ``agent`` from the CONTRACT §10 folder; :class:`ValueError` naming an unusable file."""
        return cls(
            broker_url=broker_url.rstrip("/"),
            ssl_context=agent_tls_context(certs, agent),
            signer=DpopSigner(read_jwk(certs / "agents" / f"{agent}-dpop.jwk")),
            tokens=tokens,
            local_secret=local_secret,
            max_body_bytes=max_body_bytes,
        )

    async def start(self) -> None:
        # no total timeout: an MCP GET stream may stay open for hours; connecting is bounded
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.ssl_context),
            timeout=timeout,
            auto_decompress=False,
            # a proxy keeps no cookies: Set-Cookie goes to the local client, and its Cookie header comes back
            # (a shared jar would hand one local client's cookies to every other; and it costs time per request)
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def probe(self) -> bool:
        """Reach the broker's ``/.well-known/oauth-protected-resource`` (no token needed); True on a 200."""
        assert self._session is not None
        try:
            async with asyncio.timeout(5):
                async with self._session.get(self.broker_url + PROBE_PATH, allow_redirects=False) as resp:
                    await resp.read()
                    ok = resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("connect.probe_failed", broker=self.broker_url, error=str(exc) or type(exc).__name__)
            return False
        if ok:
            self._healthy_until = time.monotonic() + HEALTH_CACHE_SECONDS
        return ok

    async def healthz(self, request: web.Request) -> web.Response:
        # no secret: a health check reveals nothing; still no browser
        refusal = local_refusal(request.method, request.headers, secret=None)
        if refusal is not None:
            return _error(*refusal)
        if time.monotonic() < self._healthy_until or await self.probe():
            return web.json_response({"status": "ok", "broker": self.broker_url})
        return web.json_response({"status": "unavailable", "broker": self.broker_url}, status=503)

    async def _read_body(self, request: web.Request) -> bytes:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            raise _BodyTooLarge
        if request.content.is_eof():  # all of it arrived with the headers (a small body): no wait, no timer
            data = request.content.read_nowait()
            if len(data) > self.max_body_bytes:
                raise _BodyTooLarge
            return data
        chunks: list[bytes] = []
        size = 0
        async with asyncio.timeout(BODY_READ_TIMEOUT_SECONDS):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise _BodyTooLarge
                chunks.append(chunk)
        return b"".join(chunks)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        refusal = local_refusal(request.method, request.headers, secret=self.local_secret)
        if refusal is not None:
            return _error(*refusal)
        if not forwarded_path(request.raw_path):
            return _error(404, "not_found", "the connector forwards /mcp/*, /v1/* and /.well-known/* only")
        try:
            # buffered (bounded): the nonce retry must be able to send it again; MCP requests are single messages
            body = await self._read_body(request) if request.body_exists else b""
        except _BodyTooLarge:
            return _error(413, "payload_too_large", f"request body over {self.max_body_bytes} bytes")
        except TimeoutError:
            return _error(408, "invalid_request", "request body not received in time")
        try:
            token = await self.tokens.token()
        except TokenUnavailable as exc:
            # the why (an exit status, a helper's redacted stderr, a file name) is the operator's, not the client's
            log.error("connect.token_unavailable", error=str(exc))
            return _error(502, "token_unavailable", "no access token available; see the connector's log")
        return await self._forward(request, body, token)

    async def _forward(self, request: web.Request, body: bytes, token: str) -> web.StreamResponse:
        assert self._session is not None
        method = request.method
        url = self.broker_url + request.raw_path  # the same bytes the local client sent: the broker decides
        scheme = token_scheme(token)
        nonce_retried = connection_retried = False
        while True:
            proof = (
                self.signer.proof(method, url, access_token=token, nonce=self.nonce)
                if scheme == "DPoP"
                else None
            )
            headers = upstream_headers(request.headers, authorization=f"{scheme} {token}", proof=proof)
            try:
                upstream = await self._session.request(
                    method,
                    URL(url, encoded=True),
                    data=body if body or request.body_exists else None,
                    headers=headers,
                    allow_redirects=False,
                )
            except aiohttp.ClientSSLError as exc:
                log.error("connect.tls_failed", broker=self.broker_url, error=str(exc))
                return _error(502, "broker_unreachable", f"TLS with {self.broker_url} failed: {exc}")
            except (aiohttp.ClientConnectionError, OSError) as exc:
                reached = not isinstance(exc, aiohttp.ClientConnectorError)
                if not connection_retried and replay_allowed(method, reached_broker=reached):
                    connection_retried = True
                    continue
                log.warning("connect.broker_unreachable", method=method, reached=reached, error=str(exc))
                if reached:
                    return _error(
                        502,
                        "broker_unreachable",
                        f"the connection to {self.broker_url} broke before an answer; a {method} is not "
                        "replayed (the broker may have run it)",
                    )
                return _error(502, "broker_unreachable", f"cannot connect to {self.broker_url}")
            fresh = upstream.headers.get("DPoP-Nonce")
            if fresh:
                self.nonce = fresh
            if (
                not nonce_retried
                and scheme == "DPoP"
                and nonce_challenge(upstream.status, fresh, upstream.headers.getall("WWW-Authenticate", []))
            ):
                nonce_retried = True
                upstream.release()
                continue
            return await self._relay(request, upstream)

    async def _relay(self, request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
        """Stream the broker's answer to the local client chunk by chunk (SSE events as they arrive); a small
        answer of a known length (:func:`whole_answer`) is read first and sent with its headers in one write."""
        complete = False
        try:
            if whole_answer(request.method, upstream.status, upstream.headers, WHOLE_ANSWER_BYTES):
                try:
                    body = await upstream.read()
                except aiohttp.ClientPayloadError as exc:
                    # nothing sent yet: the local client gets a status that says so
                    log.warning("connect.answer_truncated", path=request.path, error=str(exc))
                    return _error(502, "broker_unreachable", "the broker broke off its answer")
                complete = True
                headers = downstream_headers(upstream.headers)
                headers.popall("Content-Length", None)  # set again from the body (the same, read to the end)
                return web.Response(
                    status=upstream.status, reason=upstream.reason, headers=headers, body=body
                )
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            response.headers.update(downstream_headers(upstream.headers))
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            complete = True
            await response.write_eof()
            return response
        except aiohttp.ClientPayloadError as exc:
            # the broker broke off mid-answer: the status is already sent, only closing the stream can tell
            log.warning("connect.answer_truncated", path=request.path, error=str(exc))
            raise
        finally:
            # a complete answer's connection goes back to the pool; an unfinished one (the local client left,
            # the stream broke) is closed, which ends the broker's side of a stream too
            if complete:
                upstream.release()
            else:
                upstream.close()


# --- command line ---------------------------------------------------------------------------------------------

_EPILOG = """\
examples:
  (umask 077; broker token --certs certs --sub alice --agent expense-assistant --claim department=42 > token.jwt)
  broker connect --broker https://localhost:8443 --certs certs --agent expense-assistant --token-file token.jwt
  # then point any MCP client at http://127.0.0.1:8765/mcp/expenses with the header
  #   Authorization: Bearer <the secret in certs/agents/expense-assistant-connect.token>

--token-command runs CMD with /bin/sh -c and reads the token from its stdout; it runs again 60 s before the
token's exp (every 300 s for a token without exp). --token-file is re-read whenever the file changes.
Secret files (--token-file, --local-token) that group or others can access are refused: chmod 600 them.
Errors with the flags or files are one line on stderr, exit status 2.
"""


def add_connect_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``connect`` subcommand (CONTRACT §13) to a ``broker`` argparse subparsers object; return it."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "connect",
        help="local connector: lets MCP and HTTP clients without mTLS/DPoP use the broker as an agent",
        description="Serve plain HTTP on a loopback address and forward /mcp/*, /v1/* and /.well-known/* to "
        "the broker over mTLS with the agent's SVID, with the access token and a fresh DPoP proof per request.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--broker", required=True, metavar="URL", help="the broker's public URL (server.public_url)"
    )
    parser.add_argument(
        "--certs", required=True, type=Path, metavar="DIR", help="the CONTRACT §10 folder (ca.pem, agents/)"
    )
    parser.add_argument(
        "--agent",
        required=True,
        metavar="NAME",
        help="use DIR/agents/NAME.pem, NAME-key.pem and NAME-dpop.jwk",
    )
    parser.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"loopback address to serve on (default {DEFAULT_LISTEN}; port 0 picks a free one)",
    )
    local = parser.add_mutually_exclusive_group()
    local.add_argument(
        "--local-token",
        type=Path,
        metavar="FILE",
        help="require local clients to send Authorization: Bearer <the secret in FILE> (mode 0600); by "
        "default a secret is generated into DIR/agents/NAME-connect.token (0600, kept for the next start)",
    )
    local.add_argument(
        "--no-local-token",
        action="store_true",
        help="require no secret: then every process of every local user that can reach the port acts as the "
        "agent, with its credentials",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--token-file", type=Path, metavar="FILE", help="the access token; re-read when it changes"
    )
    source.add_argument(
        "--token-command",
        metavar="CMD",
        help="a command printing the access token; run again before the token's exp",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        metavar="N",
        help=f"largest request body accepted from a local client (default {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.set_defaults(func=cmd_connect)
    return parser


class _UsageError(Exception):
    """A problem with the flags or files; printed as ``broker connect: <message>``, exit 2."""


def agent_tls_context(certs: Path, agent: str) -> ssl.SSLContext:
    """TLS client context: trust ``DIR/ca.pem``, present ``DIR/agents/NAME.pem``; ValueError naming the file."""
    ca, cert, key = certs / "ca.pem", certs / "agents" / f"{agent}.pem", certs / "agents" / f"{agent}-key.pem"
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{ca}: cannot load the trust bundle ({exc})") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(cert), str(key))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"{cert} / {key}: cannot load the agent's certificate and key ({exc})") from exc
    return context


@asynccontextmanager
async def serving(connector: Connector, address: tuple[str, int]) -> AsyncIterator[str]:
    """Serve ``connector`` on ``address`` for the block; yields the local base URL (the real port)."""
    await connector.start()
    # handler_cancellation: a local client that goes away cancels its request, which closes the upstream one
    runner = web.AppRunner(connector.app(), access_log=None, handler_cancellation=True, shutdown_timeout=2)
    await runner.setup()
    try:
        await web.TCPSite(runner, address[0], address[1]).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    finally:
        await runner.cleanup()
        await connector.close()


def default_local_token_path(certs: Path, agent: str) -> Path:
    """Where the generated local secret lives: beside the agent's key, which it guards the use of."""
    return certs / "agents" / f"{agent}-connect.token"


def _read_local_secret(path: Path) -> bytes:
    """The secret in ``path``; :class:`_UsageError` (one line) for a file group or others can access."""
    try:
        with path.open("rb") as file:
            problem = secret_file_problem(path, os.fstat(file.fileno()).st_mode)
            if problem is not None:
                raise _UsageError(f"--local-token {problem}")
            secret = file.read(MAX_LOCAL_SECRET_BYTES + 1).strip()
    except OSError as exc:
        raise _UsageError(f"--local-token {path}: {exc.strerror or exc}") from exc
    if not secret or len(secret) > MAX_LOCAL_SECRET_BYTES or any(c in secret for c in b" \t\r\n"):
        raise _UsageError(f"--local-token {path}: expected one secret on one line")
    return secret


def _generated_secret(path: Path) -> bytes:
    """A new random secret in ``path`` (created 0600, never over an existing file), or the one already there."""
    secret = secrets.token_urlsafe(32).encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        return _read_local_secret(path)  # a previous start's: clients configured with it keep working
    except OSError as exc:
        raise _UsageError(
            f"{path}: cannot create the local token ({exc.strerror or exc}); give --local-token FILE"
        ) from exc
    with os.fdopen(fd, "wb") as file:
        file.write(secret + b"\n")
    return secret


def _local_secret(args: argparse.Namespace) -> tuple[bytes | None, Path | None]:
    """The local secret and its file: ``--local-token``, else generated (:func:`default_local_token_path`),
    and neither with ``--no-local-token``."""
    if args.no_local_token:
        return None, None
    path = args.local_token
    if path is not None:
        return _read_local_secret(path), path
    path = default_local_token_path(args.certs, args.agent)
    return _generated_secret(path), path


def _build(args: argparse.Namespace) -> tuple[Connector, tuple[str, int], Path | None]:
    try:
        address = parse_listen(args.listen)
    except ValueError as exc:
        raise _UsageError(str(exc)) from exc
    broker_url = args.broker.rstrip("/")
    if urlsplit(broker_url).scheme != "https" or not urlsplit(broker_url).netloc:
        raise _UsageError(f"--broker {args.broker}: expected the broker's https:// URL")
    if args.max_body_bytes <= 0:
        raise _UsageError("--max-body-bytes must be positive")
    tokens: TokenSource = (
        FileToken(args.token_file) if args.token_file is not None else CommandToken(args.token_command)
    )
    try:
        connector = Connector.from_certs(
            broker_url,
            args.certs,
            args.agent,
            tokens,
            max_body_bytes=args.max_body_bytes,
        )
    except ValueError as exc:
        raise _UsageError(str(exc)) from exc
    connector.local_secret, secret_file = _local_secret(args)
    return connector, address, secret_file


def _announce(local: str, connector: Connector, agent: str, secret_file: Path | None) -> None:
    lines = [
        f"broker connect: serving {local} for agent {agent} via {connector.broker_url}",
        f"  MCP (per server): {local}/mcp/<server>   e.g. {local}/mcp/expenses",
        f"  REST:             {local}/v1/tools",
        f"  health:           {local}/healthz",
        f"  local token:      send Authorization: Bearer <the secret in {secret_file}>"
        if secret_file is not None
        else "  local token:      none (--no-local-token): any local process can act as the agent",
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()


async def _serve(connector: Connector, address: tuple[str, int], agent: str, secret_file: Path | None) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await connector.tokens.token()  # a missing file or a failing command: say so now, not on a call
    except TokenUnavailable as exc:
        print(f"broker connect: {exc}", file=sys.stderr)
        return 2
    try:
        async with serving(connector, address) as local:
            _announce(local, connector, agent, secret_file)
            if not await connector.probe():
                log.warning("connect.broker_not_reached_yet", broker=connector.broker_url)
            await stop.wait()
    except OSError as exc:
        print(f"broker connect: --listen {address[0]}:{address[1]}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


def cmd_connect(args: argparse.Namespace) -> int:
    """``broker connect``: serve until SIGINT/SIGTERM; 2 with one line on stderr for a flag or file problem."""
    try:
        connector, address, secret_file = _build(args)
    except _UsageError as exc:
        print(f"broker connect: {exc}", file=sys.stderr)
        return 2
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.run(_serve(connector, address, args.agent, secret_file))
    return int(uvloop.run(_serve(connector, address, args.agent, secret_file)))
