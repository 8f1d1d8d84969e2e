"""``POST /v1/token``: RFC 8693 token exchange for a transaction token (CONTRACT §5) — a transport over
:mod:`broker.gateway.pipeline`.

1 identity     the same DPoP/mTLS authentication as every call; the subject_token must be the very access
               token that authenticates this request (an agent cannot exchange someone else's token).
2 form         every RFC 8693 parameter, exactly once, exactly the values we issue for (OAuth errors); the call
               to lock from ``request_details`` or its RFC 9396 form ``authorization_details`` (one
               ``tool_invocation`` entry, :func:`broker.policy.intent.parse_requested`; CONTRACT §17).
3 authorize    :func:`~broker.gateway.pipeline.authorize` with step ``exchange``: visibility, arguments,
               policy, MFA, approvals (``approval_id``), injection, guard, mint, audit — the order is written
               there. The exchange executes nothing, so it reserves no place in the counters (CONTRACT §12).
"""

from __future__ import annotations

import hmac
import time
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import web
from multidict import MultiDict, MultiDictProxy

from broker.canonical import strict_loads
from broker.context import CTX
from broker.errors import (
    InvalidAuthorizationDetails,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    UnsupportedGrantType,
    UnsupportedMediaType,
)
from broker.gateway.body import authenticate, read_body, runtime_of
from broker.gateway.pipeline import ToolCall, authorize, given
from broker.identity.dpop import ath_for
from broker.policy.intent import IntentError, RequestedCall, parse_requested
from broker.resources import SERVICES
from broker.txn.tokens import MAX_LIFETIME

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
TXN_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:txn_token"
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
_PARAMS = frozenset(
    {
        "grant_type",
        "requested_token_type",
        "audience",
        "subject_token",
        "subject_token_type",
        "scope",
        "request_details",
        "authorization_details",
        "approval_id",
    }
)


def _one(form: MultiDictProxy[str], name: str, *, required: bool = True) -> str | None:
    values = form.getall(name, [])
    if len(values) > 1:
        raise InvalidRequest(f"{name} must be sent once", reason=f"exchange_duplicate_{name}")
    if not values:
        if required:
            raise InvalidRequest(f"{name} is required", reason=f"exchange_missing_{name}")
        return None
    return values[0]


async def read_form(request: web.Request) -> MultiDictProxy[str]:
    if request.content_type != "application/x-www-form-urlencoded":
        raise UnsupportedMediaType(
            "send application/x-www-form-urlencoded (RFC 8693 §2.1)", reason="exchange_media"
        )
    limits = runtime_of(request).limits
    body = await read_body(request, limits)
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the form is not UTF-8", reason="exchange_not_utf8") from None
    try:
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=32)
    except ValueError:
        raise InvalidRequest("the form cannot be parsed", reason="exchange_form") from None
    form: MultiDict[str] = MultiDict(pairs)
    unknown = set(form) - _PARAMS
    if unknown:
        raise InvalidRequest(f"unknown parameter {sorted(unknown)[0]!r}", reason="exchange_unknown_parameter")
    return MultiDictProxy(form)


async def token_exchange(request: web.Request) -> web.StreamResponse:
    ctx = request[CTX]
    ctx.route = "exchange"
    runtime = runtime_of(request)
    config = runtime.config

    principal = await authenticate(request, runtime)  # 1
    form = await read_form(request)  # 2
    if _one(form, "grant_type") != GRANT_TYPE:
        raise UnsupportedGrantType(
            "grant_type must be token-exchange (RFC 8693)", reason="exchange_grant_type"
        )
    if _one(form, "requested_token_type") != TXN_TOKEN_TYPE:
        raise InvalidTarget("requested_token_type must be txn_token", reason="exchange_token_type")
    if _one(form, "audience") != config.identity.trust_domain:
        raise InvalidTarget("audience must be this trust domain", reason="exchange_audience")
    if _one(form, "subject_token_type") != ACCESS_TOKEN_TYPE:
        raise InvalidRequest("subject_token_type must be access_token", reason="exchange_subject_token_type")
    subject_token = _one(form, "subject_token") or ""
    if not subject_token.isascii() or not hmac.compare_digest(
        ath_for(subject_token), principal.token.token_hash
    ):
        raise InvalidGrant(
            "subject_token must be the access token of this request", reason="exchange_subject_token"
        )
    scope = _one(form, "scope") or ""
    if not scope.startswith("tool:") or " " in scope:
        raise InvalidScope("scope must be tool:<name>", reason="exchange_scope")
    name = scope.removeprefix("tool:")
    requested = _requested_call(form, name, runtime.limits.max_json_depth, config.server.public_url)
    approval_id = _one(form, "approval_id", required=False)

    call = ToolCall(
        step="exchange",
        name=name,
        arguments=given(requested.arguments),
        principal=principal,
        tool=runtime.tools[name].spec if name in runtime.tools else None,
        approval_id=approval_id,
        client_ip=request.remote,
    )
    ctx.status = 200  # the allow record says what the agent gets; a refusal overwrites it
    authorized = await authorize(call, request.app[SERVICES], ctx, time.time())  # 3
    body: dict[str, Any] = {
        "access_token": authorized.txn_token,
        "issued_token_type": TXN_TOKEN_TYPE,
        "token_type": "N_A",
        "expires_in": MAX_LIFETIME,
    }
    return web.json_response(body, headers={"Cache-Control": "no-store", "Pragma": "no-cache"})


def _requested_call(form: MultiDictProxy[str], name: str, max_depth: int, public_url: str) -> RequestedCall:
    """The call to lock, from ``request_details`` or (RFC 9396) ``authorization_details``: exactly one of them.
    Both forms lock the same arguments; the minted txn token does not say which one was sent."""
    plain = _one(form, "request_details", required=False)
    rich = _one(form, "authorization_details", required=False)
    if plain is not None and rich is not None:
        raise InvalidRequest(
            "send request_details or authorization_details, not both", reason="exchange_details_both"
        )
    if rich is not None:
        try:
            value = strict_loads(rich.encode("utf-8"), max_depth=max_depth)  # JSON text: invalid_request
            requested = parse_requested(value, public_url=public_url)
        except IntentError as exc:
            raise InvalidAuthorizationDetails(str(exc), reason=f"exchange_{exc.reason}") from None
        if requested.tool != name:
            raise InvalidAuthorizationDetails(
                "authorization_details[0].tool must match the scope", reason="exchange_details_tool_mismatch"
            )
        return requested
    if not plain:
        raise InvalidRequest(
            "request_details (or authorization_details) is required",
            reason="exchange_missing_request_details",
        )
    details = strict_loads(plain.encode("utf-8"), max_depth=max_depth)
    if not isinstance(details, dict) or set(details) - {"tool", "arguments"}:
        raise InvalidRequest("request_details must be {tool, arguments}", reason="exchange_request_details")
    if details.get("tool") != name:
        raise InvalidRequest("request_details.tool must match the scope", reason="exchange_tool_mismatch")
    return RequestedCall(tool=name, arguments=details.get("arguments", {}))
