"""OpenID Connect login for the approvals page (CONTRACT §14), the pure part: no socket, no clock.

Authorization code flow with PKCE (RFC 7636, S256 only) and a ``nonce`` (OIDC Core §3.1.2.1). Each function
checks one message and raises :class:`LoginError` with a stable ``reason``:

- :func:`provider_endpoints`: the discovery document names *this* issuer (OIDC Discovery §4.3: a document for
  another issuer is an impersonation attempt) and https endpoints;
- :func:`authorization_url`: the request; ``acr_values=mfa`` asks the issuer for MFA (the step-up);
- :func:`callback_code`: the redirect back: the issuer's ``error``, then ``state`` equal to the one this browser
  started with (login CSRF), then the ``code``;
- :func:`verify_id_token`: the token response's ID token (OIDC Core §3.1.3.7): strict compact JWS
  (:mod:`broker.identity.jws`), a JWT type that is not another token's (an access token is not a login), no
  key-carrying headers, an allowed ``alg`` fitting a key of the configured issuer (:mod:`broker.identity.jwks`),
  the signature, then claims with strict types: ``iss``, ``aud`` (+ ``azp``), ``exp``/``iat``/``nbf`` against ``now``,
  ``nonce``, ``sub``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlencode, urlsplit

from broker.identity.jwks import KeyEntry, alg_fits_key
from broker.identity.jws import JwsError, ParsedJws, parse_compact
from broker.identity.tokens import FORBIDDEN_TYP
from broker.jose import b64url_encode, verify_signature
from broker.policy.approvers import has_mfa

__all__ = [
    "IdToken",
    "LoginError",
    "ProviderEndpoints",
    "authorization_url",
    "callback_code",
    "code_challenge",
    "id_token_of",
    "new_secret",
    "parse_id_token",
    "provider_endpoints",
    "verify_id_token",
]

MAX_ID_TOKEN_BYTES: Final = 16_384
MAX_PARAM: Final = 2048
_MAX_SUB: Final = 256
_KEY_HEADERS: Final = ("jku", "x5u", "jwk", "x5c")


class LoginError(ValueError):
    """A login message that cannot be accepted; ``reason`` is stable (audit, logs), never shown with secrets."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def new_secret() -> str:
    """32 random bytes, base64url: a ``state``, a ``nonce``, a PKCE verifier (43 characters, RFC 7636 §4.1)."""
    return b64url_encode(secrets.token_bytes(32))


def code_challenge(verifier: str) -> str:
    """RFC 7636 §4.2 S256: BASE64URL(SHA256(ASCII(code_verifier)))."""
    return b64url_encode(hashlib.sha256(verifier.encode("ascii")).digest())


@dataclass(frozen=True, slots=True)
class ProviderEndpoints:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str


def _https(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > MAX_PARAM:
        return False
    parts = urlsplit(value)
    return parts.scheme == "https" and bool(parts.netloc) and not parts.fragment


def provider_endpoints(document: Any, issuer: str) -> ProviderEndpoints:
    """The endpoints of ``issuer`` from its ``/.well-known/openid-configuration`` document."""
    if not isinstance(document, dict):
        raise LoginError("discovery_not_object")
    if document.get("issuer") != issuer:
        raise LoginError("discovery_issuer_mismatch")
    authorize, token = document.get("authorization_endpoint"), document.get("token_endpoint")
    if not _https(authorize) or not _https(token):
        raise LoginError("discovery_endpoint_not_https")
    methods = document.get("code_challenge_methods_supported")
    if methods is not None and (not isinstance(methods, list) or "S256" not in methods):
        raise LoginError("discovery_no_pkce_s256")
    return ProviderEndpoints(issuer, str(authorize), str(token))


def authorization_url(
    endpoints: ProviderEndpoints,
    *,
    client_id: str,
    redirect_uri: str,
    state: str,
    nonce: str,
    verifier: str,
    mfa: bool,
) -> str:
    """The authorization request (OIDC Core §3.1.2.1) with PKCE S256; ``mfa`` adds ``acr_values=mfa``."""
    params = {
        "response_type": "code",
        "client_id": client_id,
        "redirect_uri": redirect_uri,
        "scope": "openid profile",
        "state": state,
        "nonce": nonce,
        "code_challenge": code_challenge(verifier),
        "code_challenge_method": "S256",
    }
    if mfa:
        params["acr_values"] = "mfa"
        params["prompt"] = "login"  # the person authenticates again, with the second factor
    separator = "&" if urlsplit(endpoints.authorization_endpoint).query else "?"
    return endpoints.authorization_endpoint + separator + urlencode(params)


def callback_code(query: Mapping[str, str], expected_state: str | None) -> str:
    """The ``code`` of the redirect back from the issuer, after the issuer's error and ``state`` are checked.

    ``expected_state`` is the state this browser started the login with (its login cookie): None when it has
    none — a callback it did not start (login CSRF, OAuth 2.0 Security BCP §4.7)."""
    if "error" in query:
        raise LoginError("issuer_error")
    state = query.get("state")
    if expected_state is None or not isinstance(state, str) or len(state) > MAX_PARAM:
        raise LoginError("state_missing")
    if not hmac.compare_digest(state.encode(), expected_state.encode()):
        raise LoginError("state_mismatch")
    code = query.get("code")
    if not isinstance(code, str) or not code or len(code) > MAX_PARAM:
        raise LoginError("code_missing")
    return code


def id_token_of(body: Any) -> str:
    """The ``id_token`` of a token response (OIDC Core §3.1.3.3)."""
    if not isinstance(body, dict):
        raise LoginError("token_response_not_object")
    token = body.get("id_token")
    if not isinstance(token, str) or not token:
        raise LoginError("token_response_no_id_token")
    token_type = body.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() not in ("bearer", "dpop"):
        raise LoginError("token_response_token_type")
    return token


@dataclass(frozen=True, slots=True)
class IdToken:
    """The verified login: who, their claims (what approver rules read), whether MFA was done, until when."""

    sub: str
    claims: Mapping[str, Any]
    mfa: bool
    exp: int


def parse_id_token(token: str) -> ParsedJws:
    """Strict compact parse (size cap first); the caller then fetches the issuer's keys for its ``kid``."""
    if not isinstance(token, str) or not token.isascii():
        raise LoginError("id_token_malformed")
    try:
        return parse_compact(token, max_bytes=MAX_ID_TOKEN_BYTES)
    except JwsError as exc:
        raise LoginError(f"id_token_{exc.reason}") from None


def _int(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**53:
        raise LoginError(f"id_token_{name}")
    return value


def verify_id_token(
    jws: ParsedJws,
    keys: Sequence[KeyEntry],
    *,
    issuer: str,
    client_id: str,
    nonce: str,
    algorithms: Sequence[str],
    now: float,
    leeway: int,
    max_lifetime: int,
) -> IdToken:
    """OIDC Core §3.1.3.7 on a parsed ID token; ``keys`` are the configured issuer's keys for its ``kid``."""
    header, claims = jws.header, jws.payload
    typ = header.get("typ", "JWT")
    if not isinstance(typ, str) or typ.lower().removeprefix("application/") in FORBIDDEN_TYP | {"at+jwt"}:
        raise LoginError("id_token_typ")
    if any(name in header for name in _KEY_HEADERS) or "cty" in header:
        raise LoginError("id_token_header")
    alg = header["alg"]
    if alg not in algorithms:
        raise LoginError("id_token_alg")
    fitting = [entry for entry in keys if alg_fits_key(alg, entry)]
    if not fitting:
        raise LoginError("id_token_no_key")
    if not any(verify_signature(e.key, alg, jws.signing_input, jws.signature) for e in fitting):
        raise LoginError("id_token_signature")
    # every claim check after the signature: only verified claims mean anything
    if claims.get("iss") != issuer:
        raise LoginError("id_token_iss")
    aud = claims.get("aud")
    audiences = [aud] if isinstance(aud, str) else aud
    if not isinstance(audiences, list) or client_id not in audiences:
        raise LoginError("id_token_aud")
    azp = claims.get("azp")
    if (len(audiences) > 1 or azp is not None) and azp != client_id:
        raise LoginError("id_token_azp")
    exp, iat = _int(claims, "exp"), _int(claims, "iat")
    if now >= exp + leeway:
        raise LoginError("id_token_expired")
    if iat > now + leeway or exp - iat > max_lifetime:
        raise LoginError("id_token_iat")
    if "nbf" in claims and _int(claims, "nbf") > now + leeway:  # RFC 7519 §4.1.5, when present
        raise LoginError("id_token_nbf")
    presented = claims.get("nonce")
    if not isinstance(presented, str) or not hmac.compare_digest(presented.encode(), nonce.encode()):
        raise LoginError("id_token_nonce")
    sub = claims.get("sub")
    if not isinstance(sub, str) or not 0 < len(sub) <= _MAX_SUB:
        raise LoginError("id_token_sub")
    return IdToken(sub=sub, claims=dict(claims), mfa=has_mfa(claims), exp=exp)
