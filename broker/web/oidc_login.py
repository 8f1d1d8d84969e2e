"""Sign in and out of the approvals page (CONTRACT §14): OIDC authorization code + PKCE at ``approvals.ui.issuer``.

    GET  /approvals/login?return_to=…   start: the sealed login cookie (nothing stored), 302 to the issuer
    GET  /approvals/callback            the issuer's redirect: state (this browser's sealed cookie), code → token
                                        endpoint, ID token verified with the issuer's configured keys, the state
                                        marked spent (once), the subject's revocation; without ``acr: mfa`` the
                                        person is sent back once with ``acr_values=mfa``
    POST /approvals/logout              CSRF-checked; the session record is deleted (every replica)

Before the issuer answers, a request is anonymous: it writes nothing to the store (the one exception, the login
key, is written once per deployment) and its refusals are counted in ``summary`` records (CONTRACT §15), and a
discovery failure is remembered for :data:`DISCOVERY_FAILURE_SECONDS` with one fetch in flight per issuer, so a
down identity provider is not fetched once per unauthenticated request.

The messages are checked by :mod:`broker.web.oidc` (pure); this module only does their I/O.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import structlog
from aiohttp import web

from broker.config.models import ApprovalsUi, Issuer
from broker.context import CTX
from broker.errors import AccessDenied, InvalidRequest, NotFound, UpstreamError
from broker.jose import b64url_decode, b64url_encode
from broker.resources import RUNTIME, SESSION, STATE, WEB_LOGIN
from broker.state.base import StateStore
from broker.web import oidc
from broker.web.http import html_response, refuse
from broker.web.login_cookie import KEY_BYTES, LOGIN_SECONDS, LoginState, cookie_name, seal, unseal
from broker.web.session import (
    SESSION_COOKIE,
    SessionBook,
    SessionRevoked,
    WebSession,
    cookie_header,
    expired_cookie_header,
    origin_refusal,
    post_refusal,
    valid_token,
)
from broker.web.views import render_continue, render_message

__all__ = ["WebLogin", "callback", "current_session", "login", "logout", "safe_return_to", "ui_config"]

log = structlog.get_logger("broker.web")

_RETURN_TO = re.compile(r"/approvals/(?:[A-Za-z0-9_-]{22})?")
DISCOVERY_TTL_SECONDS: Final = 3600.0
#: a failed discovery is answered from memory this long (per issuer), not fetched again per request
DISCOVERY_FAILURE_SECONDS: Final = 5.0
#: the login-cookie key in the state store: written once (create-if-absent), read by every replica
LOGIN_KEY_RECORD: Final = "web_login_key"
LOGIN_KEY_SECONDS: Final = 30 * 86_400
#: how long a process uses the key it read before reading the store again
_LOGIN_KEY_CACHE_SECONDS: Final = 60.0
_MAX_RESPONSE_BYTES: Final = 65_536
_TIMEOUT = aiohttp.ClientTimeout(total=10)


@dataclass
class WebLogin:
    """Per running broker: the issuers' discovered endpoints (an hour), their recent discovery failures (a few
    seconds), the discovery in flight per issuer, and the login-cookie key read from the store (a minute)."""

    endpoints: dict[str, tuple[oidc.ProviderEndpoints, float]] = field(default_factory=dict)
    failures: dict[str, tuple[str, float]] = field(default_factory=dict)
    inflight: dict[str, asyncio.Task[oidc.ProviderEndpoints]] = field(default_factory=dict)
    login_key: tuple[bytes, float] | None = None


async def login_key(web_login: WebLogin, store: StateStore, *, fresh: bool = False) -> bytes:
    """The key sealing login cookies, the same on every replica: created once in the store (compare-and-set on
    an absent record: concurrent first logins agree on one), then read back at most once a minute."""
    now = time.monotonic()
    if not fresh and web_login.login_key is not None and web_login.login_key[1] > now:
        return web_login.login_key[0]
    for _ in range(4):
        record = await store.get_json(LOGIN_KEY_RECORD)
        if record is not None:
            key = b64url_decode(str(record["key"]))
            web_login.login_key = (key, now + _LOGIN_KEY_CACHE_SECONDS)
            return key
        drawn = b64url_encode(secrets.token_bytes(KEY_BYTES))
        await store.compare_and_set_json(LOGIN_KEY_RECORD, 0, {"key": drawn}, LOGIN_KEY_SECONDS)
    raise RuntimeError("the login key could not be stored")


def safe_return_to(value: str | None) -> str:
    """Only our own page paths: never an open redirect."""
    return value if value is not None and _RETURN_TO.fullmatch(value) else "/approvals/"


def ui_config(request: web.Request) -> tuple[ApprovalsUi, Issuer]:
    config = request.app[RUNTIME].current.config
    ui = config.approvals.ui
    if ui is None:
        raise NotFound("the approvals page is not configured", reason="approvals_ui_off")
    issuer = next(i for i in config.identity.issuers if i.issuer == ui.issuer)  # the config checked it is one
    return ui, issuer


def _public_url(request: web.Request) -> str:
    return request.app[RUNTIME].current.config.server.public_url


def _ssl(issuer: Issuer) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(issuer.ca)) if issuer.ca is not None else True


async def _read_json(response: aiohttp.ClientResponse) -> Any:
    body = await response.content.read(_MAX_RESPONSE_BYTES + 1)
    if len(body) > _MAX_RESPONSE_BYTES:
        raise oidc.LoginError("issuer_response_too_large")
    try:
        return json.loads(body)
    except ValueError:
        raise oidc.LoginError("issuer_response_not_json") from None


async def _discover(session: aiohttp.ClientSession, issuer: Issuer) -> oidc.ProviderEndpoints:
    url = issuer.issuer.rstrip("/") + "/.well-known/openid-configuration"
    try:
        async with session.get(url, ssl=_ssl(issuer), timeout=_TIMEOUT, allow_redirects=False) as response:
            if response.status != 200:
                raise oidc.LoginError("discovery_status")
            document = await _read_json(response)
    except (aiohttp.ClientError, TimeoutError, OSError):
        raise oidc.LoginError("discovery_unreachable") from None
    return oidc.provider_endpoints(document, issuer.issuer)


async def _discover_and_remember(
    web_login: WebLogin, session: aiohttp.ClientSession, issuer: Issuer
) -> oidc.ProviderEndpoints:
    """One discovery, its result remembered before the fetch counts as finished: a request arriving after it
    finds the endpoints or the failure, never a gap in which it would fetch again."""
    try:
        endpoints = await _discover(session, issuer)
    except oidc.LoginError as exc:
        web_login.failures[issuer.issuer] = (exc.reason, time.monotonic() + DISCOVERY_FAILURE_SECONDS)
        raise
    web_login.failures.pop(issuer.issuer, None)
    web_login.endpoints[issuer.issuer] = (endpoints, time.monotonic() + DISCOVERY_TTL_SECONDS)
    return endpoints


def _retrieved(task: asyncio.Task[oidc.ProviderEndpoints]) -> None:
    if not task.cancelled():
        task.exception()  # read: a failure whose waiters all went away is not reported as never retrieved


async def _endpoints(request: web.Request, issuer: Issuer) -> oidc.ProviderEndpoints:
    """The issuer's endpoints: cached an hour; a failure is remembered for :data:`DISCOVERY_FAILURE_SECONDS`;
    concurrent requests share one fetch (single flight)."""
    web_login = request.app[WEB_LOGIN]
    now = time.monotonic()
    cached = web_login.endpoints.get(issuer.issuer)
    if cached is not None and cached[1] > now:
        return cached[0]
    failed = web_login.failures.get(issuer.issuer)
    if failed is not None and failed[1] > now:
        raise oidc.LoginError(failed[0])
    task = web_login.inflight.get(issuer.issuer)
    if task is None:
        task = asyncio.ensure_future(_discover_and_remember(web_login, request.app[SESSION], issuer))
        web_login.inflight[issuer.issuer] = task
        task.add_done_callback(lambda _: web_login.inflight.pop(issuer.issuer, None))
        task.add_done_callback(_retrieved)
    try:
        return await asyncio.shield(task)  # one waiter going away does not cancel the others' fetch
    except oidc.LoginError as exc:
        raise oidc.LoginError(exc.reason) from None


async def _issuer_unavailable(request: web.Request, error: oidc.LoginError) -> web.Response:
    log.warning("approvals login: identity provider unusable", reason=error.reason)
    return await refuse(
        request,
        UpstreamError("the identity provider is not usable", reason=f"login_{error.reason}"),
        title="Sign-in is unavailable",
        text="The identity provider could not be reached or answered something unusable. Try again later.",
        link=None,
    )


async def redirect_to_issuer(request: web.Request, *, return_to: str, mfa: bool) -> web.Response:
    ui, issuer = ui_config(request)
    try:
        endpoints = await _endpoints(request, issuer)
    except oidc.LoginError as exc:
        return await _issuer_unavailable(request, exc)
    login_state = LoginState(
        state=oidc.new_secret(),
        nonce=oidc.new_secret(),
        verifier=oidc.new_secret(),
        return_to=return_to,
        mfa=mfa,
        expires_at=time.time() + LOGIN_SECONDS,
    )
    sealed = seal(login_state, await login_key(request.app[WEB_LOGIN], request.app[STATE]))
    location = oidc.authorization_url(
        endpoints,
        client_id=ui.client_id,
        redirect_uri=_public_url(request) + "/approvals/callback",
        state=login_state.state,
        nonce=login_state.nonce,
        verifier=login_state.verifier,
        mfa=mfa,
    )
    response = html_response(
        render_message("Signing in", ["Continue at your identity provider."], link=(location, "Continue")),
        status=302,
        # Lax: the issuer's redirect back is a cross-site top-level GET, which must carry it
        headers={
            "Location": location,
            "Set-Cookie": cookie_header(
                cookie_name(login_state.state), sealed, max_age=LOGIN_SECONDS, same_site="Lax"
            ),
        },
    )
    return response


async def login(request: web.Request) -> web.StreamResponse:
    """``GET /approvals/login``: start signing in."""
    ui_config(request)
    return await redirect_to_issuer(
        request, return_to=safe_return_to(request.query.get("return_to")), mfa=False
    )


async def _redeem(
    request: web.Request, ui: ApprovalsUi, issuer: Issuer, code: str, login_state: LoginState
) -> str:
    endpoints = await _endpoints(request, issuer)
    form = {
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": _public_url(request) + "/approvals/callback",
        "code_verifier": login_state.verifier,
        "client_id": ui.client_id,
    }
    headers = {"Accept": "application/json"}
    if ui.client_secret_file is not None:
        secret = ui.client_secret_file.read_text(encoding="utf-8").strip()
        # RFC 6749 §2.3.1: client_secret_basic, each part form-urlencoded first
        pair = f"{quote(ui.client_id, safe='')}:{quote(secret, safe='')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
    try:
        async with request.app[SESSION].post(
            endpoints.token_endpoint,
            data=form,
            headers=headers,
            ssl=_ssl(issuer),
            timeout=_TIMEOUT,
            allow_redirects=False,
        ) as response:
            body = await _read_json(response)
            if response.status != 200:
                raise oidc.LoginError("token_endpoint_refused")
    except (aiohttp.ClientError, TimeoutError, OSError):
        raise oidc.LoginError("token_endpoint_unreachable") from None
    return oidc.id_token_of(body)


async def _verify(
    request: web.Request, ui: ApprovalsUi, issuer: Issuer, token: str, nonce: str
) -> oidc.IdToken:
    runtime = request.app[RUNTIME].current
    jws = oidc.parse_id_token(token)
    kid = jws.header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise oidc.LoginError("id_token_kid")
    keys = next(k for k in runtime.authenticator.issuer_keys if k.issuer == issuer.issuer)
    now = time.time()
    return oidc.verify_id_token(
        jws,
        await keys.key_for(kid, now),
        issuer=issuer.issuer,
        client_id=ui.client_id,
        nonce=nonce,
        algorithms=issuer.algorithms,
        now=now,
        leeway=runtime.config.identity.leeway_seconds,
        max_lifetime=issuer.max_lifetime_seconds,
    )


async def _opened_login(request: web.Request) -> LoginState:
    """The login this browser started for the callback's ``state`` (its sealed cookie), or :class:`LoginError`.
    A cookie that does not open with the cached key is tried once with the store's current one (the key was
    created or replaced after this process read it)."""
    state = request.query.get("state")
    if not valid_token(state):
        raise oidc.LoginError("state_missing")
    assert state is not None  # valid_token
    value = request.cookies.get(cookie_name(state))
    web_login, store, now = request.app[WEB_LOGIN], request.app[STATE], time.time()
    try:
        return unseal(value, await login_key(web_login, store), state=state, now=now)
    except oidc.LoginError as exc:
        if exc.reason != "login_cookie_invalid":
            raise
    return unseal(value, await login_key(web_login, store, fresh=True), state=state, now=now)


def _login_refused(reason: str) -> InvalidRequest:
    return InvalidRequest("this sign-in cannot be completed", reason=f"login_{reason}")


async def callback(request: web.Request) -> web.StreamResponse:
    """``GET /approvals/callback``: finish signing in (or step up to MFA once).

    Order, with reasons: the sealed cookie and ``state`` first (login CSRF; costs no store access); the code
    redeemed and the ID token verified next; only then the state marked spent — a replayed callback is refused
    there, and the store write is bounded by real sign-ins at the issuer, never by anonymous requests; then the
    subject's revocation (a revoked person gets no session)."""
    ui, issuer = ui_config(request)
    book = SessionBook(request.app[STATE])
    state = request.query.get("state")
    clear = {"Set-Cookie": expired_cookie_header(cookie_name(state))} if state and valid_token(state) else {}
    try:
        login_state = await _opened_login(request)
        code = oidc.callback_code(request.query, login_state.state)
    except oidc.LoginError as exc:
        return await refuse(
            request,
            _login_refused(exc.reason),
            title="Sign-in failed",
            text="This sign-in was not started here, was already used, or took too long. Start again.",
            link=("/approvals/login", "Sign in"),
            headers=clear,
            anonymous=True,
        )
    try:
        identity = await _verify(
            request, ui, issuer, await _redeem(request, ui, issuer, code, login_state), login_state.nonce
        )
    except oidc.LoginError as exc:
        if exc.reason.startswith(("token_endpoint", "issuer_response", "discovery")):
            return await _issuer_unavailable(request, exc)
        return await refuse(
            request,
            InvalidRequest("the identity provider's answer was refused", reason=f"login_{exc.reason}"),
            title="Sign-in failed",
            text="The identity provider's answer could not be verified. Start again.",
            link=("/approvals/login", "Sign in"),
            headers=clear,
            anonymous=True,
        )
    request[CTX].subject = identity.sub
    if not await book.spend_login(login_state.state):
        return await refuse(
            request,
            _login_refused("state_spent"),
            title="Sign-in failed",
            text="This sign-in was already used. Start again.",
            link=("/approvals/login", "Sign in"),
            headers=clear,
        )
    if await request.app[STATE].is_revoked({"sub": identity.sub}) is not None:
        return await refuse(
            request,
            AccessDenied("this person's access has been revoked", reason="revoked_sub"),
            title="Access revoked",
            text="Your access to the approvals page has been revoked.",
            link=None,
            headers=clear,
        )
    if not identity.mfa:
        if login_state.mfa:  # asked for MFA and still none: the issuer cannot give it to this person
            return await refuse(
                request,
                AccessDenied(
                    "deciding approvals requires multi-factor authentication", reason="login_mfa_missing"
                ),
                title="Multi-factor authentication needed",
                text="Deciding approvals needs a sign-in with a second factor, and your identity provider "
                "did not confirm one.",
                link=("/approvals/login", "Sign in again"),
                headers=clear,
            )
        log.info("approvals login: stepping up to MFA", sub=identity.sub)
        stepped = await redirect_to_issuer(request, return_to=login_state.return_to, mfa=True)
        for name, value in clear.items():
            stepped.headers.add(name, value)
        return stepped
    session_id, _ = await book.create(
        issuer.issuer, identity.sub, identity.claims, now=time.time(), lifetime=ui.session_seconds
    )
    log.info("approvals login", sub=identity.sub)
    response = html_response(render_continue(login_state.return_to), headers=clear)
    response.headers.add("Set-Cookie", cookie_header(SESSION_COOKIE, session_id, max_age=ui.session_seconds))
    return response


async def current_session(request: web.Request) -> WebSession | None:
    """The signed-in person of this request (the session cookie, looked up in the state store), or None.
    Raises :class:`SessionRevoked` once when the subject was revoked (the session is then gone)."""
    return await SessionBook(request.app[STATE]).get(request.cookies.get(SESSION_COOKIE), time.time())


def public_origin(request: web.Request) -> str:
    """``https://host[:port]`` of ``server.public_url``: what a same-origin POST's ``Origin`` says."""
    url = _public_url(request)
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


async def logout(request: web.Request) -> web.StreamResponse:
    """``POST /approvals/logout``: end the session everywhere (its record is deleted), clear the cookie.

    The fetch-metadata and ``Origin`` checks come first, session or not: another site cannot sign anyone out.
    Without a session nothing is cleared (no ``Set-Cookie``)."""
    ui_config(request)
    refused = origin_refusal(request.headers, origin=public_origin(request))
    if refused is not None:
        return await _cross_site(request, refused, anonymous=request.cookies.get(SESSION_COOKIE) is None)
    try:
        session = await current_session(request)
    except SessionRevoked:
        session = None  # the record is already deleted
    if session is None:
        return _signed_out({})
    request[CTX].subject = session.sub
    form = await request.post()
    token = form.get("csrf")
    reason = post_refusal(
        request.headers,
        origin=public_origin(request),
        form_token=token if isinstance(token, str) else None,
        session_token=session.csrf,
    )
    if reason is not None:
        return await _cross_site(request, reason, anonymous=False)
    await SessionBook(request.app[STATE]).end(request.cookies[SESSION_COOKIE])
    return _signed_out({"Set-Cookie": expired_cookie_header(SESSION_COOKIE)})


def _signed_out(headers: dict[str, str]) -> web.Response:
    return html_response(
        render_message(
            "Signed out", ["You are signed out of the approvals page."], link=("/approvals/login", "Sign in")
        ),
        headers=headers,
    )


async def _cross_site(request: web.Request, reason: str, *, anonymous: bool) -> web.Response:
    return await refuse(
        request,
        AccessDenied("cross-site request refused", reason=reason),
        title="Request refused",
        text="This request did not come from the approvals page.",
        anonymous=anonymous,
    )
