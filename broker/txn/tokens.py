"""Transaction tokens: minting and verifying the broker's single-use, parameter-locked, 5-minute JWS (CONTRACT §5).

Pure: no clock, no I/O, no state. The caller passes ``now`` and the broker's verification keys, and consumes
``txn`` in the state store itself (single use, T01/T02, under :func:`txn_replay_key`).

Format (draft-ietf-oauth-transaction-tokens, profiled by CONTRACT §5): header ``typ: txntoken+jwt`` and
``kid``; claims ``iss`` (the broker's public URL), ``aud`` (the trust domain), ``iat``, ``exp`` (at most
:data:`MAX_LIFETIME` after ``iat``), ``txn``, ``sub``, ``scope``, ``req_wl`` (the actor's SPIFFE ID),
``rctx`` ``{req_ip?, authn}``, ``tctx`` ``{tool, arguments, args_digest, policy_version, approval_id?, injected?}``
and ``cnf.jkt`` (the agent's DPoP key, when it has one).

``tctx.arguments`` are the agent's arguments *before* server-side injection: ``args_digest`` (the parameter
lock) is over them only. ``tctx.injected``, present when the broker injects server-side arguments for the tool,
holds exactly the values it sets (e.g. ``department`` from the subject's claim), so that a tool backend can
check the whole forwarded body, injected values included: it must equal
:meth:`TxnClaims.forwarded_arguments` ``= {**arguments, **injected}`` (RFC 8785 canonical bytes).

:func:`verify_txn_token` runs its checks in this order; each refusal is :class:`broker.errors.InvalidTxnToken`
with a generic description and a precise ``reason``:

1. size cap before any decoding (J12), then the strict compact parse of :mod:`broker.identity.jws` (segments,
   base64url, duplicate members, ``crit``, ``b64``, JWE members: J09–J15) -> ``txn_<jws reason>``;
2. ``typ`` exactly ``txntoken+jwt``: an access token, DPoP proof or grant is never a txn token (T15, J23);
3. no ``jku``/``jwk``/``x5u``/``x5c``/``cty``: keys come only from the broker's own key map (T14, J07, J08);
4. ``kid`` selects the key from ``keys`` only; ``alg`` must be exactly that key's ``alg`` (``none``, HMAC and
   any other algorithm are refused: T14, J01–J04); then the signature over the very bytes parsed (J15);
5. claims, only now that they are authentic, with strict JSON types: ``iat``/``exp`` integers, lifetime at
   most 300 s (T12), expiry and ``iat`` with ``leeway``, ``iss`` and ``aud`` by exact string equality (J20,
   J21, J24), ``txn``, ``tctx`` and its closed member set (``injected``, when present, a non-empty JSON
   object with an exact RFC 8785 form);
6. ``tctx.args_digest`` has the SHA-256 shape (43 base64url characters) and equals the digest of
   ``tctx.arguments``: the token is internally consistent, and no other hash algorithm exists here (T16).

:func:`check_invocation` then binds a verified token to one invocation (tool, subject, actor, DPoP key: T13)
and enforces the parameter lock (T03, T05, T07–T09): RFC 8785 canonical bytes, so key order and number
spelling do not matter, while types, extra keys and Unicode normalization forms do.
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from broker.canonical import args_digest as compute_args_digest
from broker.canonical import canonicalize
from broker.errors import InvalidTxnToken, TxnTokenMismatch
from broker.identity.jwks import KeyEntry, KeySet
from broker.identity.jws import JwsError, parse_compact
from broker.jose import SigningKey, b64url_encode, default_alg, verify_signature
from broker.state import hash_key_part, hash_tag

__all__ = [
    "MAX_LIFETIME",
    "TXN_TYP",
    "MintedTxn",
    "TxnClaims",
    "check_invocation",
    "mint_txn_token",
    "txn_replay_key",
    "unverified_kid",
    "verification_keys",
    "verify_txn_token",
]

TXN_TYP: Final = "txntoken+jwt"
#: CONTRACT §5: a txn token lives at most five minutes (HOSTILE T12).
MAX_LIFETIME: Final = 300
#: ``txn`` ids we mint are 22 characters (128 random bits); 64 leaves room, and bounds what we hash and store.
MAX_TXN_CHARS: Final = 64
_MAX_KID: Final = 256
_MAX_INT: Final = 2**53  # RFC 7493 §2.2
# base64url of a SHA-256 digest without padding: exactly 43 characters (T16: no MD5, no truncation).
_DIGEST_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]{43}")
#: header members naming a key or a key location, and nested content: never honoured (T14, J07, J08, J14)
_FORBIDDEN_HEADERS: Final = ("jku", "jwk", "x5u", "x5c", "cty")
#: the closed member set of ``tctx``: an unknown member (``hash_alg``, ...) is refused, never ignored (T16)
_TCTX_MEMBERS: Final = frozenset(
    {"tool", "arguments", "args_digest", "policy_version", "approval_id", "injected"}
)
_INVALID: Final = "transaction token is invalid"


def _refuse(reason: str, description: str = _INVALID) -> InvalidTxnToken:
    return InvalidTxnToken(description, reason=reason)


@dataclass(frozen=True, slots=True)
class MintedTxn:
    """A freshly minted txn token and the values the caller records (audit ``txn``, ``args_digest``)."""

    token: str
    txn: str
    exp: int
    args_digest: str


@dataclass(frozen=True, slots=True)
class TxnClaims:
    """A verified txn token. Treat as immutable: ``arguments`` is the token's own (pre-injection) object,
    ``injected`` the server-side arguments the broker set after the digest was taken (``{}`` when it set none).
    """

    txn: str
    sub: str
    scope: str
    #: ``req_wl``: the SPIFFE ID of the workload (agent) the token was issued to
    actor_id: str
    tool: str
    arguments: dict[str, Any]
    args_digest: str
    policy_version: str
    approval_id: str | None
    cnf_jkt: str | None
    exp: int
    iat: int
    #: the key that signed it (audit, key rotation)
    kid: str
    #: every verified claim, read-only
    claims: Mapping[str, Any]
    #: ``tctx.injected``: the server-side argument values the broker sets on top of ``arguments``
    injected: dict[str, Any]

    def forwarded_arguments(self) -> dict[str, Any]:
        """What the tool backend must receive: ``arguments`` with every ``injected`` value set over them.

        A new dict each call. When the token carries no ``injected``, this is a copy of ``arguments``.
        """
        return {**self.arguments, **self.injected}


def mint_txn_token(
    signer: SigningKey,
    *,
    issuer: str,
    audience: str,
    subject: str,
    scope: str,
    actor_id: str,
    tool: str,
    arguments: Mapping[str, Any],
    policy_version: str,
    cnf_jkt: str | None,
    req_ip: str | None,
    authn: str,
    approval_id: str | None = None,
    now: float,
    lifetime: int = MAX_LIFETIME,
    txn: str | None = None,
    injected: Mapping[str, Any] | None = None,
    args_digest: str | None = None,
) -> MintedTxn:
    """Sign a txn token for one call of ``tool`` with exactly ``arguments`` (before server-side injection).

    ``issuer`` is ``server.public_url``, ``audience`` the trust domain. ``txn`` defaults to 128 random bits
    (base64url). ``injected``, when non-empty, is the server-side arguments the broker will set over
    ``arguments`` before forwarding (``tctx.injected``); ``args_digest`` stays over ``arguments`` alone.
    ``arguments`` and ``injected`` must be what :func:`broker.canonical.strict_loads` produces; anything
    :func:`broker.canonical.canonicalize` cannot represent exactly raises ``ValueError``/``TypeError``, as do a
    ``lifetime`` outside ``(0, 300]`` and an empty or over-long ``txn``: these are caller bugs, not refusals.
    ``args_digest``: ``args_digest(arguments)`` when the caller already computed it (the pipeline did, from the
    same arguments), so that it is not computed twice; it then also stands for the canonical-form check of
    ``arguments``. A wrong one only makes a token that fails verification (:func:`verify_txn_token` checks the
    digest against the token's own ``arguments``).
    """
    if isinstance(lifetime, bool) or not isinstance(lifetime, int) or not 0 < lifetime <= MAX_LIFETIME:
        raise ValueError(f"lifetime must be an int in (0, {MAX_LIFETIME}]")
    if txn is None:
        txn = b64url_encode(os.urandom(16))
    elif not isinstance(txn, str) or not 0 < len(txn) <= MAX_TXN_CHARS:
        raise ValueError(f"txn must be a non-empty string of at most {MAX_TXN_CHARS} characters")
    if not isinstance(arguments, Mapping):
        raise TypeError("arguments must be a JSON object")
    args = dict(arguments)
    digest = compute_args_digest(args) if args_digest is None else args_digest
    if injected is not None and not isinstance(injected, Mapping):
        raise TypeError("injected must be a JSON object")
    server_side = dict(injected) if injected else {}
    canonicalize(server_side)  # raises like arguments do: a value without an exact RFC 8785 form is a bug
    iat = int(now)
    exp = iat + lifetime
    tctx: dict[str, Any] = {
        "tool": tool,
        "arguments": args,
        "args_digest": digest,
        "policy_version": policy_version,
    }
    if approval_id is not None:
        tctx["approval_id"] = approval_id
    if server_side:
        tctx["injected"] = server_side
    rctx: dict[str, Any] = {"authn": authn}
    if req_ip is not None:
        rctx["req_ip"] = req_ip
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "iat": iat,
        "exp": exp,
        "txn": txn,
        "sub": subject,
        "scope": scope,
        "req_wl": actor_id,
        "rctx": rctx,
        "tctx": tctx,
    }
    if cnf_jkt is not None:
        claims["cnf"] = {"jkt": cnf_jkt}
    return MintedTxn(token=signer.sign(claims, typ=TXN_TYP), txn=txn, exp=exp, args_digest=digest)


def verification_keys(*public_jwks: Mapping[str, Any]) -> dict[str, KeyEntry]:
    """``kid -> KeyEntry`` for the broker's public JWKs (e.g. ``Signer.public_jwk()`` of current and previous).

    Raises ``ValueError`` for a JWK that cannot verify (wrong ``use``, private members, unsupported key), one
    without ``kid``, or two keys sharing a ``kid`` (the ``kid`` alone selects the key).
    """
    keyset = KeySet.from_jwks({"keys": [dict(jwk) for jwk in public_jwks]})
    if keyset.skipped:
        raise ValueError(f"unusable verification key: {', '.join(keyset.skipped)}")
    keys: dict[str, KeyEntry] = {}
    for entry in keyset.entries:
        if entry.kid is None:
            raise ValueError("every broker verification key needs a kid")
        if entry.kid in keys:
            raise ValueError(f"two verification keys share kid {entry.kid!r}")
        keys[entry.kid] = entry
    return keys


def unverified_kid(token: str) -> str | None:
    """The header ``kid`` of a compact JWS, unverified, or None if it has none or the header is unreadable.

    Only for choosing which key set to load (a JWKS refetch on an unknown ``kid``); never for a decision.
    """
    if not isinstance(token, str):
        return None
    head, _, _ = token.partition(".")
    if len(head) > 1024:
        return None
    try:
        header = parse_compact(head + ".e30.", max_bytes=2048).header  # "e30" = "{}": header-only parse
    except JwsError:
        return None
    kid = header.get("kid")
    return kid if isinstance(kid, str) and 0 < len(kid) <= _MAX_KID else None


def verify_txn_token(
    token: str,
    *,
    keys: Mapping[str, KeyEntry],
    issuer: str,
    audience: str,
    now: float,
    leeway: int = 5,
    max_bytes: int = 8192,
    signed_here: Callable[[str, KeyEntry], bool] | None = None,
) -> TxnClaims:
    """Verify a txn token against the broker's ``keys`` (``kid -> KeyEntry``: current and previous keys).

    Raises :class:`InvalidTxnToken` (``reason="txn_<check>"``) on the first failed check, in the order of the
    module docstring. Does not consume ``txn``: single use is the caller's atomic claim in the state store.
    ``signed_here(token, entry)``: True when this process signed exactly ``token`` with the key ``entry`` verifies
    (:class:`broker.txn.minted.MintedHere`); only the signature verification is then skipped, every other check
    runs.
    """
    if not isinstance(token, str):
        raise _refuse("txn_malformed")
    if len(token) > max_bytes:
        raise _refuse("txn_oversize")
    try:
        jws = parse_compact(token, max_bytes=max_bytes)
    except JwsError as exc:
        # jws reasons are a closed set (jws.REASONS): "jws_crit" -> "txn_crit", and so on.
        raise _refuse("txn_" + exc.reason.removeprefix("jws_")) from None
    header = jws.header
    if header.get("typ") != TXN_TYP:
        raise _refuse("txn_typ")
    for name in _FORBIDDEN_HEADERS:
        if name in header:
            raise _refuse(f"txn_header_{name}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not 0 < len(kid) <= _MAX_KID:
        raise _refuse("txn_kid")
    entry = keys.get(kid)
    if entry is None:
        raise _refuse("txn_unknown_kid")
    expected_alg = entry.alg if entry.alg is not None else default_alg(entry.key)
    if header["alg"] != expected_alg:
        raise _refuse("txn_alg")
    vouched = signed_here is not None and signed_here(token, entry)
    if not vouched and not verify_signature(entry.key, expected_alg, jws.signing_input, jws.signature):
        raise _refuse("txn_signature")
    return _claims(jws.payload, kid=kid, issuer=issuer, audience=audience, now=now, leeway=leeway)


def _int_claim(claims: Mapping[str, Any], name: str) -> int:
    if name not in claims:
        raise _refuse("txn_claim_missing")
    value = claims[name]
    # J18: a JSON integer only (bool is an int subclass; floats and numeric strings are refused)
    if type(value) is not int or not 0 <= value < _MAX_INT:
        raise _refuse("txn_claim_type")
    return value


def _str_claim(claims: Mapping[str, Any], name: str, *, max_len: int | None = None) -> str:
    if name not in claims:
        raise _refuse("txn_claim_missing")
    value = claims[name]
    if not isinstance(value, str) or not value or (max_len is not None and len(value) > max_len):
        raise _refuse("txn_claim_type")
    return value


def _object_claim(claims: Mapping[str, Any], name: str) -> dict[str, Any]:
    if name not in claims:
        raise _refuse("txn_claim_missing")
    value = claims[name]
    if not isinstance(value, dict):
        raise _refuse("txn_claim_type")
    return value


def _claims(
    payload: dict[str, Any], *, kid: str, issuer: str, audience: str, now: float, leeway: int
) -> TxnClaims:
    iat = _int_claim(payload, "iat")
    exp = _int_claim(payload, "exp")
    if not 0 < exp - iat <= MAX_LIFETIME:  # T12: even a token we signed may not live longer
        raise _refuse("txn_lifetime")
    if exp <= now - leeway:
        raise _refuse("txn_expired", "transaction token expired")
    if iat > now + leeway:
        raise _refuse("txn_iat_future")
    # J21/J20/J24: exact string equality; an array ``aud`` is not what we mint, so it is refused.
    if payload.get("iss") != issuer:
        raise _refuse("txn_iss")
    if payload.get("aud") != audience:
        raise _refuse("txn_aud")
    txn = _str_claim(payload, "txn", max_len=MAX_TXN_CHARS)
    sub = _str_claim(payload, "sub")
    scope = _str_claim(payload, "scope")
    actor_id = _str_claim(payload, "req_wl")
    rctx = _object_claim(payload, "rctx")
    if not isinstance(rctx.get("authn"), str) or not isinstance(rctx.get("req_ip", ""), str):
        raise _refuse("txn_claim_type")
    cnf_jkt = None
    if "cnf" in payload:
        cnf_jkt = _str_claim(_object_claim(payload, "cnf"), "jkt")

    tctx = _object_claim(payload, "tctx")
    if not _TCTX_MEMBERS.issuperset(tctx):
        raise _refuse("txn_tctx")
    tool = _str_claim(tctx, "tool")
    arguments = _object_claim(tctx, "arguments")
    policy_version = _str_claim(tctx, "policy_version")
    approval_id = _str_claim(tctx, "approval_id") if "approval_id" in tctx else None
    injected = _injected_claim(tctx) if "injected" in tctx else {}
    claimed = tctx.get("args_digest")
    # T16: the SHA-256 shape only; checked before compare_digest, which refuses non-ASCII str with TypeError.
    if not isinstance(claimed, str) or not _DIGEST_SHAPE.fullmatch(claimed):
        raise _refuse("txn_args_digest_format")
    try:
        computed = compute_args_digest(arguments)
    except (ValueError, TypeError):  # an integer past 2**53: no exact canonical form, so no digest
        raise _refuse("txn_args_digest") from None
    if not hmac.compare_digest(computed, claimed):
        raise _refuse("txn_args_digest")
    return TxnClaims(
        txn=txn,
        sub=sub,
        scope=scope,
        actor_id=actor_id,
        tool=tool,
        arguments=arguments,
        args_digest=claimed,
        policy_version=policy_version,
        approval_id=approval_id,
        cnf_jkt=cnf_jkt,
        exp=exp,
        iat=iat,
        kid=kid,
        claims=MappingProxyType(payload),
        injected=injected,
    )


def _injected_claim(tctx: Mapping[str, Any]) -> dict[str, Any]:
    """``tctx.injected``: a non-empty object (we never mint an empty one: one form per meaning) whose values
    have an exact RFC 8785 form, so that a backend can compare the forwarded body with it byte for byte."""
    injected = _object_claim(tctx, "injected")
    if not injected:
        raise _refuse("txn_injected")
    try:
        canonicalize(injected)
    except (ValueError, TypeError):  # an integer past 2**53: no exact canonical form
        raise _refuse("txn_injected") from None
    return injected


def check_invocation(
    claims: TxnClaims,
    *,
    tool: str,
    arguments: Mapping[str, Any],
    subject: str,
    actor_id: str | None,
    jkt: str | None,
    args_digest: str | None = None,
) -> None:
    """Bind a verified txn token to this invocation; raise on the first mismatch.

    Order: tool (``txn_tool``), subject (``txn_subject``), actor (``txn_actor``), DPoP key when the token
    carries ``cnf.jkt`` (``txn_key_binding``, T13) — all :class:`InvalidTxnToken` — then the parameter lock:
    ``args_digest(arguments)`` (the arguments *before* injection) must equal the token's, else
    :class:`TxnTokenMismatch` (``txn_args_mismatch``; T03, T05, T09). Identity comes first so that a stolen
    token learns nothing about its arguments. Single use is not checked here.

    ``args_digest``: ``args_digest(arguments)`` when the caller already computed it from these very arguments
    (the pipeline did, at stage 2), so that it is not computed twice. It stands for the arguments, never for the
    token: it is still compared with the token's own digest.
    """
    if claims.tool != tool:
        raise _refuse("txn_tool")
    if claims.sub != subject:
        raise _refuse("txn_subject")
    if claims.actor_id != actor_id:
        raise _refuse("txn_actor")
    # a thumbprint is public: plain equality (compare_digest would raise on a non-ASCII str)
    if claims.cnf_jkt is not None and claims.cnf_jkt != jkt:
        raise _refuse("txn_key_binding")
    # RFC 8785 bytes: key order and number spelling (4800 / 4800.0 / 4.8e3) do not change the digest (T07);
    # a type change ("4800"), an added key or another Unicode normalization form does (T05, T09, T08).
    computed = compute_args_digest(arguments) if args_digest is None else args_digest
    if not hmac.compare_digest(computed, claims.args_digest):
        raise TxnTokenMismatch(
            "arguments differ from the ones the transaction token was issued for", reason="txn_args_mismatch"
        )


def txn_replay_key(txn: str) -> str:
    """State-store key under which ``txn`` is consumed (single use, CONTRACT §5).

    The id is hashed (S08: it comes from the token); the digest is also the Redis Cluster hash tag, so a caller
    can claim the txn together with other keys carrying the same tag in one ``claim_all``.
    """
    return f"{hash_tag(hash_key_part(txn))}:txn"
