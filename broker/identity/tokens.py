"""Access-token (JWT) verification: CONTRACT §4, HOSTILE.md §1.1 (J01–J27).

:meth:`AccessTokenVerifier.verify` runs the checks in this order; each refusal raises
:class:`broker.errors.InvalidToken` with a short generic description and a precise ``reason``:

1. size cap (``token_oversize``), before hashing or decoding anything (J12);
2. cache by SHA-256 of the token: a hit skips the crypto but its time window is re-checked against ``now``
   (a cached token still expires, PERF.md: the full path runs once per token);
3. strict compact parse (:mod:`broker.identity.jws`): segments, base64url, duplicate members, ``crit``,
   ``b64`` (J09–J15);
4. header: ``typ`` not a DPoP / grant / txn-token type and in the issuer's accepted list (J23); no ``jku``,
   ``x5u``, ``jwk``, ``x5c``: keys come only from the configured JWKS (J07, J08); no ``cty`` (nested, J14);
5. the unverified ``iss`` picks the issuer, whose keys alone are used (no merged kid map: J22, RFC 8725 §3.8);
6. ``alg`` by exact string match in that issuer's allow-list, asymmetric only (J01–J03, RFC 8725 §3.1);
7. ``kid``: a bounded string used only as a dict key (J05); unknown -> single-flight refetch (J06);
8. ``alg`` fits the key (J04), then the signature (raw r||s for ECDSA, J27);
9. claims with strict JSON types (J16–J21): a token is only as good as its *verified* claims, so every
   claim check comes after the signature.
Only successes are cached, in a bounded FIFO. Pure apart from awaiting the issuer's key source.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from broker.errors import InvalidToken
from broker.identity.issuer_keys import IssuerKeys
from broker.identity.jwks import ALG_KEY_TYPES, alg_fits_key
from broker.identity.jws import JwsError, ParsedJws, parse_compact
from broker.jose import b64url_encode, verify_signature

__all__ = ["FORBIDDEN_TYP", "AccessToken", "AccessTokenVerifier", "IssuerPolicy"]

#: ``typ`` values of the other JWTs in play: never accepted as an access token (J23, RFC 8725 §3.11).
FORBIDDEN_TYP = frozenset(
    {"dpop+jwt", "txntoken+jwt", "grant+jwt", "approval-request+jwt", "audit-checkpoint+jwt", "logout+jwt"}
)
#: header members naming a key or key location: keys come only from the configured JWKS (J07, J08).
_KEY_HEADERS = ("jku", "x5u", "jwk", "x5c")
_MAX_INT = 2**53  # RFC 7493 §2.2: integers beyond this are not interoperable
_MAX_KID = 256
_MAX_JTI = 256

_JWS_REASONS = {
    "jws_oversize": "token_oversize",
    "jws_duplicate_member": "token_duplicate_member",
    "jws_crit": "token_crit",
    "jws_b64_false": "token_b64_false",
    "jws_alg": "token_alg_not_allowed",
}
_INVALID = "access token is invalid"


def _refuse(reason: str, description: str = _INVALID) -> InvalidToken:
    return InvalidToken(description, reason=reason)


def _normalize_typ(typ: str) -> str:
    # RFC 7515 §4.1.9: "application/" may be omitted and media types are case-insensitive.
    typ = typ.lower()
    return typ[len("application/") :] if typ.startswith("application/") else typ


@dataclass(frozen=True)
class IssuerPolicy:
    """What one issuer's access tokens must satisfy. ``""`` in ``accepted_typ`` means "no ``typ`` header"."""

    issuer: str
    algorithms: tuple[str, ...]
    audience: str
    max_lifetime: int = 86400
    leeway: int = 30
    accepted_typ: tuple[str, ...] = ("at+jwt", "JWT", "")

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("issuer and audience must be non-empty")
        if not self.algorithms:
            raise ValueError(f"issuer {self.issuer!r}: algorithms must not be empty")
        for alg in self.algorithms:
            if alg not in ALG_KEY_TYPES:  # never none, never HMAC (J01, J03)
                raise ValueError(
                    f"issuer {self.issuer!r}: algorithm {alg!r} is not allowed ({sorted(ALG_KEY_TYPES)})"
                )
        if not 0 <= self.leeway <= 60:  # J17: a small leeway, identical on all replicas
            raise ValueError(f"issuer {self.issuer!r}: leeway must be within 0..60 seconds")
        if self.max_lifetime <= 0:
            raise ValueError(f"issuer {self.issuer!r}: max_lifetime must be positive")
        for typ in self.accepted_typ:
            if _normalize_typ(typ) in FORBIDDEN_TYP:
                raise ValueError(f"issuer {self.issuer!r}: typ {typ!r} can never be an access token")

    @property
    def accepted_typ_normalized(self) -> frozenset[str]:
        return frozenset(_normalize_typ(t) for t in self.accepted_typ)


@dataclass(frozen=True, slots=True)
class AccessToken:
    """A verified access token. Shared between requests through the cache: treat it as immutable."""

    #: all verified claims (read-only view; nested values must not be mutated either)
    claims: Mapping[str, Any]
    sub: str
    iss: str
    jti: str | None
    exp: int
    iat: int
    nbf: int | None
    #: RFC 9449 §6.1 ``cnf.jkt`` and RFC 8705 §3.1 ``cnf.x5t#S256``
    cnf_jkt: str | None
    cnf_x5t: str | None
    act_sub: str | None
    client_id: str | None
    #: base64url(SHA-256(token)): equals the ``ath`` a DPoP proof for this token must carry (RFC 9449 §4.2)
    token_hash: str
    leeway: int

    def check_time(self, now: float) -> None:
        """Its time window (exp, nbf, iat with the issuer's leeway) at ``now``: a call decided later than its
        token was verified (a body still arriving) re-checks it at the decision's time; InvalidToken if not."""
        _check_time(self.exp, self.iat, self.nbf, self.leeway, now)


def _int_claim(claims: Mapping[str, Any], name: str, *, required: bool) -> int | None:
    if name not in claims:
        if required:
            raise _refuse("token_claim_missing")
        return None
    value = claims[name]
    # J18: a JSON integer only: bool is an int subclass in Python, floats and numeric strings are refused.
    if type(value) is not int or not 0 <= value < _MAX_INT:
        raise _refuse("token_claim_type")
    return value


def _optional_str(claims: Mapping[str, Any], name: str, max_len: int | None = None) -> str | None:
    value = claims.get(name)
    if value is None and name not in claims:
        return None
    if not isinstance(value, str) or (max_len is not None and len(value) > max_len):
        raise _refuse("token_claim_type")
    return value


def _check_time(exp: int, iat: int, nbf: int | None, leeway: int, now: float) -> None:
    """RFC 7519 §4.1.4/§4.1.5 with leeway; also run on every cache hit."""
    if exp <= now - leeway:
        raise _refuse("token_expired", "access token expired")
    if nbf is not None and nbf > now + leeway:
        raise _refuse("token_nbf")
    if iat > now + leeway:
        raise _refuse("token_iat_future")


def _claims(payload: dict[str, Any], policy: IssuerPolicy, token_hash: str, now: float) -> AccessToken:
    exp = _int_claim(payload, "exp", required=True)
    iat = _int_claim(payload, "iat", required=True)
    nbf = _int_claim(payload, "nbf", required=False)
    assert exp is not None and iat is not None
    _check_time(exp, iat, nbf, policy.leeway, now)
    if not 0 < exp - iat <= policy.max_lifetime:
        raise _refuse("token_lifetime")
    if payload.get("iss") != policy.issuer:  # J21: exact string equality (already used to pick the issuer)
        raise _refuse("token_iss")
    aud = payload.get("aud")
    if isinstance(aud, list):
        # J20: every member must be a string, and one must equal our audience exactly.
        if not all(isinstance(a, str) for a in aud) or policy.audience not in aud:
            raise _refuse("token_aud")
    elif aud != policy.audience or not isinstance(aud, str):
        raise _refuse("token_aud")
    if "sub" not in payload:
        raise _refuse("token_claim_missing")
    sub = payload["sub"]
    if not isinstance(sub, str) or not sub:
        raise _refuse("token_claim_type")
    jti = _optional_str(payload, "jti", _MAX_JTI)
    client_id = _optional_str(payload, "client_id")
    cnf_jkt = cnf_x5t = act_sub = None
    if "cnf" in payload:
        cnf = payload["cnf"]
        if not isinstance(cnf, dict):
            raise _refuse("token_claim_type")
        cnf_jkt = _optional_str(cnf, "jkt")
        cnf_x5t = _optional_str(cnf, "x5t#S256")
    if "act" in payload:
        act = payload["act"]  # RFC 8693 §4.1: the acting party; its sub is the agent's SPIFFE ID
        if not isinstance(act, dict) or not isinstance(act.get("sub"), str) or not act["sub"]:
            raise _refuse("token_claim_type")
        act_sub = act["sub"]
    return AccessToken(
        claims=MappingProxyType(payload),
        sub=sub,
        iss=policy.issuer,
        jti=jti,
        exp=exp,
        iat=iat,
        nbf=nbf,
        cnf_jkt=cnf_jkt,
        cnf_x5t=cnf_x5t,
        act_sub=act_sub,
        client_id=client_id,
        token_hash=token_hash,
        leeway=policy.leeway,
    )


class AccessTokenVerifier:
    """Verifies the configured issuers' access tokens; one per loaded config (its cache goes with it)."""

    def __init__(
        self,
        issuers: Iterable[tuple[IssuerPolicy, IssuerKeys]],
        *,
        max_token_bytes: int = 8192,
        cache_size: int = 10_000,
    ) -> None:
        self._issuers: dict[str, tuple[IssuerPolicy, IssuerKeys, frozenset[str]]] = {}
        for policy, keys in issuers:
            if policy.issuer in self._issuers:
                raise ValueError(f"issuer {policy.issuer!r} configured twice")
            if keys.issuer != policy.issuer:
                raise ValueError(f"keys of {keys.issuer!r} given for issuer {policy.issuer!r}")
            self._issuers[policy.issuer] = (policy, keys, policy.accepted_typ_normalized)
        if not self._issuers:
            raise ValueError("at least one issuer is required")
        self._max_bytes = max_token_bytes
        self._cache_size = cache_size
        # dict keeps insertion order: the first key is the oldest entry (FIFO eviction).
        self._cache: dict[bytes, AccessToken] = {}

    async def verify(self, token: str, *, now: float) -> AccessToken:
        """Verify ``token`` at ``now`` (epoch seconds); raise :class:`InvalidToken` with a precise reason."""
        if not isinstance(token, str) or len(token) > self._max_bytes:
            raise _refuse("token_oversize" if isinstance(token, str) else "token_malformed")
        if not token.isascii():
            raise _refuse("token_malformed")
        digest = hashlib.sha256(token.encode("ascii")).digest()
        cached = self._cache.get(digest)
        if cached is not None:
            try:
                _check_time(cached.exp, cached.iat, cached.nbf, cached.leeway, now)
            except InvalidToken:
                del self._cache[digest]
                raise
            return cached

        try:
            jws = parse_compact(token, max_bytes=self._max_bytes)
        except JwsError as exc:
            raise _refuse(_JWS_REASONS.get(exc.reason, "token_malformed")) from None
        policy, keys = self._check_header(jws)
        await self._check_signature(jws, keys, now)
        result = _claims(jws.payload, policy, b64url_encode(digest), now)
        if len(self._cache) >= self._cache_size:
            del self._cache[next(iter(self._cache))]
        self._cache[digest] = result
        return result

    def _check_header(self, jws: ParsedJws) -> tuple[IssuerPolicy, IssuerKeys]:
        header = jws.header
        typ = header.get("typ", "")
        if not isinstance(typ, str) or ("typ" in header and not typ) or _normalize_typ(typ) in FORBIDDEN_TYP:
            raise _refuse("token_typ")
        for name in _KEY_HEADERS:
            if name in header:
                raise _refuse(f"token_header_{name}")
        if "cty" in header:
            raise _refuse("token_cty")
        iss = jws.payload.get("iss")
        selected = self._issuers.get(iss) if isinstance(iss, str) else None
        if selected is None:
            raise _refuse("token_iss")
        policy, keys, accepted_typ = selected
        if _normalize_typ(typ) not in accepted_typ:
            raise _refuse("token_typ")
        if header["alg"] not in policy.algorithms:
            raise _refuse("token_alg_not_allowed")
        return policy, keys

    async def _check_signature(self, jws: ParsedJws, keys: IssuerKeys, now: float) -> None:
        header = jws.header
        kid = header.get("kid")
        if kid is not None and (not isinstance(kid, str) or not 0 < len(kid) <= _MAX_KID):
            raise _refuse("token_kid")
        if "kid" in header and kid is None:
            raise _refuse("token_kid")
        if kid is None and keys.loaded and len(keys.current) != 1:
            raise _refuse("token_kid")  # J05: no kid is only unambiguous for a one-key issuer
        candidates = await keys.key_for(kid, now)
        if not candidates:
            if not keys.loaded:
                raise _refuse("token_jwks_unavailable")
            raise _refuse("token_kid" if kid is None else "token_unknown_kid")
        alg = header["alg"]
        fitting = [entry for entry in candidates if alg_fits_key(alg, entry)]
        if not fitting:
            raise _refuse("token_alg_key_mismatch")
        if not any(verify_signature(e.key, alg, jws.signing_input, jws.signature) for e in fitting):
            raise _refuse("token_signature")
