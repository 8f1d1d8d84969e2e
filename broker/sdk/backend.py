"""Txn-token verification for tool backends written with aiohttp (CONTRACT §5, "Propagation").

Every request the broker forwards carries a ``Txn-Token`` header signed by the broker's key. A backend that
trusts the broker checks it with the broker's public JWKS (``GET <broker>/.well-known/jwks.json``)::

    from broker.sdk.backend import TXN, txn_token_middleware

    verifier = txn_token_middleware(
        jwks_url="https://broker.example.org/.well-known/jwks.json",
        issuer="https://broker.example.org",   # the broker's server.public_url
        audience="example.org",                # the trust domain
        ssl=ssl.create_default_context(cafile="ca.pem"),
        injected=("department",),              # only for tokens without tctx.injected (step 4)
        tools={"/approve": "approveExpense", "/invoices": "listInvoices"},
    )
    app = web.Application(middlewares=[verifier])
    app.cleanup_ctx.append(verifier.cleanup_ctx)   # opens the JWKS session at startup, closes it at shutdown

    async def approve(request: web.Request) -> web.Response:
        claims = request[TXN]          # broker.txn.tokens.TxnClaims: sub, actor_id, tool, arguments, ...
        department = claims.injected.get("department")   # set by the broker, verified against the body

What the middleware checks, in order (refusals are ``401 {"error": "invalid_txn_token", ...}``):

1. exactly one ``Txn-Token`` header (none: the handler runs without ``request[TXN]`` when ``required=False``);
2. :func:`broker.txn.tokens.verify_txn_token`: ``typ``, the broker's key by ``kid``, ``alg``, signature,
   ``iss``, ``aud``, lifetime and expiry, and that ``tctx.args_digest`` matches ``tctx.arguments``;
3. with ``tools``, the token's ``tctx.tool`` is the one mapped to this request's path (a token for one tool is
   never accepted by another tool's endpoint);
4. the JSON body is what the token says the broker forwards (:func:`body_matches`). The broker took the
   digest *before* injecting server-side arguments and forwards the arguments *after* injection:

   - a token that carries ``tctx.injected`` (the values the broker injected) is checked completely: the body
     must equal ``claims.forwarded_arguments()`` = ``{**arguments, **injected}`` (RFC 8785 canonical bytes,
     so key order and ``4800``/``4800.0`` do not matter, while types, extra and missing keys do). A forged
     injected value (``department: "7"`` where the broker set ``"42"``) is refused, and the handler can rely
     on ``claims.injected`` for row-level security. The ``injected`` option is not consulted then;
   - a token without ``tctx.injected`` (from a broker that does not record it) falls back to the weaker check:
     the ``injected`` keys configured here must be present in the body and are the only ones allowed to
     differ from ``tctx.arguments`` -- their values cannot be told from forged ones, so never base an
     access decision on them;
5. with ``single_use``, the ``txn`` has not been seen by this process (a bounded in-memory set kept until the
   token expires). The broker already consumes every agent-presented token once across all its replicas;
   this guards the hop from broker to backend. A backend with several replicas that wants single use across
   them brings its own store: claim :func:`broker.txn.tokens.txn_replay_key` ``(request[TXN].txn)`` with an
   atomic ``SET NX`` (expiring at ``exp``) in the handler.

Keys: a static ``jwks`` document (:func:`public_jwks_from_file` reads one from a file), or ``jwks_url``
(J06, J26): fetched over https with certificate verification (``ssl`` may carry a private CA), no
redirects, 64 KiB cap; refreshed in the background every ``refresh_seconds``; an unknown ``kid`` refetches
at most once per 30 s, single-flight, so a flood of made-up ``kid`` values cannot amplify into fetches.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from ssl import SSLContext
from typing import Any, Final

import aiohttp
import structlog
from aiohttp import web

from broker.canonical import args_digest, strict_loads
from broker.errors import InvalidRequest, InvalidTxnToken
from broker.identity.issuer_keys import IssuerKeys
from broker.identity.jwks import KeyEntry
from broker.keys import public_jwks_from_file
from broker.txn.tokens import TxnClaims, unverified_kid, verify_txn_token

__all__ = [
    "TXN",
    "SeenTxns",
    "TxnTokenMiddleware",
    "body_matches",
    "public_jwks_from_file",
    "txn_token_middleware",
]

_log = structlog.get_logger(__name__)

#: where the middleware puts the verified claims for the handler: ``request[TXN]``
TXN: Final = web.RequestKey("txn", TxnClaims)
TXN_HEADER: Final = "Txn-Token"
#: CONTRACT §4/J06: an unknown ``kid`` refetches the JWKS at most once per this many seconds
KID_REFETCH_COOLDOWN: Final = 30.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def body_matches(claims: TxnClaims, body_args: Any, injected: Collection[str] = ()) -> bool:
    """Whether a forwarded body carries the arguments the token was issued for (module docstring, step 4).

    ``body_args`` must be a JSON object. When the token carries ``tctx.injected`` it must equal
    ``claims.forwarded_arguments()`` exactly (same keys, same values under RFC 8785, so ``4800`` and
    ``4800.0`` agree while ``"4800"`` does not) and ``injected`` is ignored. Otherwise it must hold every
    ``injected`` key (the ones the broker sets after the digest was taken) and equal ``claims.arguments`` on
    every other key.
    """
    if not isinstance(body_args, dict):
        return False
    if claims.injected:
        return _same_canonical(body_args, claims.forwarded_arguments())
    skip = frozenset(injected)
    if not skip.issubset(body_args):
        return False
    sent = {k: v for k, v in body_args.items() if k not in skip}
    issued = {k: v for k, v in claims.arguments.items() if k not in skip}
    return _same_canonical(sent, issued)


def _same_canonical(sent: dict[str, Any], issued: dict[str, Any]) -> bool:
    try:
        return hmac.compare_digest(args_digest(sent), args_digest(issued))
    except (ValueError, TypeError):  # not canonicalizable (never from strict_loads): no match
        return False


class SeenTxns:
    """A bounded set of consumed ``txn`` ids, each kept until its token has expired (plus leeway).

    :meth:`claim` is check-and-set in one synchronous step (no await in between, so no race on one loop).
    When the set is full of live entries it refuses to guess: :class:`OverflowError`, which the middleware
    turns into a 503 (fail closed: forgetting a live id would reopen replay).
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be positive")
        self._max = max_entries
        self._expiry: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def claim(self, txn: str, *, forget_after: float, now: float) -> bool:
        """True the first time ``txn`` is claimed (it is recorded until ``forget_after``), False after."""
        if txn in self._expiry:
            if self._expiry[txn] > now:
                return False
            del self._expiry[txn]
        if len(self._expiry) >= self._max:
            self._expiry = {t: until for t, until in self._expiry.items() if until > now}
            if len(self._expiry) >= self._max:
                raise OverflowError("txn replay set is full of unexpired entries")
        self._expiry[txn] = forget_after
        return True


def _refusal(description: str, *, status: int = 401, error: str = "invalid_txn_token") -> web.Response:
    return web.json_response(
        {"error": error, "error_description": description},
        status=status,
        headers={"Cache-Control": "no-store"},
    )


class TxnTokenMiddleware:
    """The aiohttp middleware returned by :func:`txn_token_middleware`; see the module docstring."""

    __middleware_version__ = 1  # aiohttp: a new-style middleware (request, handler)

    def __init__(
        self,
        keys: IssuerKeys,
        *,
        issuer: str,
        audience: str,
        single_use: bool,
        required: bool,
        injected: Collection[str],
        tools: Mapping[str, str] | None,
        check_body: bool,
        leeway: int,
        max_token_bytes: int,
        max_seen: int,
        on_refusal: Callable[[str], None] | None,
    ) -> None:
        self.keys = keys
        self._on_refusal = on_refusal
        self._issuer = issuer
        self._audience = audience
        self._required = required
        self._injected = frozenset(injected)
        self._tools = dict(tools) if tools is not None else None
        self._check_body = check_body
        self._leeway = leeway
        self._max_token_bytes = max_token_bytes
        self._seen = SeenTxns(max_seen) if single_use else None
        self._session: aiohttp.ClientSession | None = None

    async def cleanup_ctx(self, app: web.Application) -> AsyncIterator[None]:
        """For ``app.cleanup_ctx``: first JWKS fetch at startup (a failure is logged; tokens fail closed)."""
        await self._open()
        yield
        await self.close()

    async def close(self) -> None:
        await self.keys.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def _open(self) -> None:
        if self.keys.static or self._session is not None:
            return
        # Set before the first await: concurrent first requests join the fetch that start() begins.
        self._session = aiohttp.ClientSession()
        await self.keys.start(now=time.time(), session=self._session)

    async def _keys_for(self, token: str, now: float) -> dict[str, KeyEntry]:
        kid = unverified_kid(token)
        if kid is None:
            return {}  # verify_txn_token names the precise problem (malformed, no kid)
        if self._session is None:
            await self._open()  # no cleanup_ctx registered: open lazily (close() still closes it)
        entries = await self.keys.key_for(kid, now)
        # Broker kids are RFC 7638 thumbprints: one key per kid. Should a JWKS list several, the first wins
        # and a token meant for another one fails its alg or signature check (fail closed).
        return {kid: entries[0]} if entries else {}

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        tokens = request.headers.getall(TXN_HEADER, [])
        if not tokens:
            if not self._required:
                return await handler(request)
            return self._refuse(request, "txn_missing", "transaction token required")
        if len(tokens) != 1:
            return self._refuse(request, "txn_multiple", "exactly one Txn-Token header is allowed")
        token = tokens[0]
        now = time.time()
        try:
            keys = await self._keys_for(token, now)
            claims = verify_txn_token(
                token,
                keys=keys,
                issuer=self._issuer,
                audience=self._audience,
                now=now,
                leeway=self._leeway,
                max_bytes=self._max_token_bytes,
            )
        except InvalidTxnToken as exc:
            return self._refuse(request, exc.reason, exc.description)
        if self._tools is not None and self._tools.get(request.path) != claims.tool:
            return self._refuse(request, "txn_tool", "transaction token is for another tool")
        if self._check_body:
            try:
                body = strict_loads(await request.read())
            except InvalidRequest:
                return self._refuse(request, "txn_body_invalid", "request body is not the token's arguments")
            if not body_matches(claims, body, self._injected):
                return self._refuse(request, "txn_body_mismatch", "request body is not the token's arguments")
        if self._seen is not None:
            # After every other check: a request refused above does not burn the token.
            try:
                fresh = self._seen.claim(claims.txn, forget_after=claims.exp + self._leeway, now=now)
            except OverflowError:
                _log.warning("txn_replay_set_full", path=request.path)
                return _refusal("replay protection unavailable", status=503, error="temporarily_unavailable")
            if not fresh:
                return self._refuse(request, "txn_replayed", "transaction token already used")
        request[TXN] = claims
        return await handler(request)

    def _refuse(self, request: web.Request, reason: str, description: str) -> web.Response:
        # The precise reason goes to the backend's log (and metrics hook), the client gets the description.
        _log.info("txn_token_refused", reason=reason, path=request.path)
        if self._on_refusal is not None:
            self._on_refusal(reason)
        return _refusal(description)


def txn_token_middleware(
    *,
    jwks_url: str | None = None,
    jwks: Mapping[str, Any] | None = None,
    issuer: str,
    audience: str,
    ssl: SSLContext | None = None,
    single_use: bool = False,
    required: bool = True,
    refresh_seconds: float = 300,
    injected: Collection[str] = (),
    tools: Mapping[str, str] | None = None,
    check_body: bool = True,
    leeway: int = 5,
    max_token_bytes: int = 8192,
    max_seen: int = 100_000,
    on_refusal: Callable[[str], None] | None = None,
) -> TxnTokenMiddleware:
    """An aiohttp middleware verifying the broker's ``Txn-Token`` on every request (module docstring).

    Exactly one key source: ``jwks_url`` (the broker's ``/.well-known/jwks.json``, https only; ``ssl`` for a
    private CA) or a static ``jwks`` document. ``issuer`` is the broker's ``server.public_url``, ``audience``
    its trust domain. ``tools`` maps request paths to tool names (a path it does not list is refused);
    ``injected`` names the keys the broker injects, used only for tokens without ``tctx.injected`` (a token
    that carries it is checked exactly against ``forwarded_arguments()``, step 4 of the module docstring);
    ``check_body=False`` skips the body comparison (for routes without a JSON body). Raises ``ValueError`` for
    a bad key source. Register ``cleanup_ctx`` so that the JWKS session is closed at shutdown. ``on_refusal``
    is called with each refusal's precise reason (``txn_expired``, ``txn_body_mismatch``, ...), e.g. for metrics.
    """
    if (jwks_url is None) == (jwks is None):
        raise ValueError("give exactly one of jwks_url and jwks")
    keys = IssuerKeys(
        issuer,
        jwks_url=jwks_url,
        jwks=jwks,
        ssl=ssl,
        max_age=refresh_seconds,
        refetch_cooldown=KID_REFETCH_COOLDOWN,
    )
    return TxnTokenMiddleware(
        keys,
        issuer=issuer,
        audience=audience,
        single_use=single_use,
        required=required,
        injected=injected,
        tools=tools,
        check_body=check_body,
        leeway=leeway,
        max_token_bytes=max_token_bytes,
        max_seen=max_seen,
        on_refusal=on_refusal,
    )
