"""Test factory for access tokens, well-formed or hostile.

``make_token(key_jwk, **overrides)`` builds a valid ES256/ES384/EdDSA/RS256/PS256 access token for
``ISSUER``/``AUDIENCE`` at ``NOW`` by default; each override breaks exactly one thing:

- ``header={...}`` / ``claims={...}``: merged into the defaults; a value of ``OMIT`` removes that member;
- ``header_value=`` / ``claims_value=``: replace the whole header / payload with any JSON value;
- ``raw_header=`` / ``raw_payload=``: the JSON text itself (str or bytes), e.g. duplicate members;
- ``header_b64=`` / ``payload_b64=`` / ``signature_b64=``: raw segments, used verbatim;
- ``signature=bytes``: the signature bytes; ``der_signature=True``: ECDSA as DER instead of r||s;
- ``hmac_secret=bytes``: MAC the signing input with HMAC-SHA256 instead of signing (J03);
- ``sign_alg=``: the algorithm used to sign, when it must differ from the header ``alg``;
- ``segments=[...]``: the whole token as raw segments joined by ``.``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.jose import (
    PRIVATE_MEMBERS,
    PrivateKey,
    b64url_decode,
    b64url_encode,
    compact_json,
    private_jwk,
    private_key_from_jwk,
    raw_signature,
)

ISSUER = "https://idp.example.org"
AUDIENCE = "https://broker.example.org"
NOW = 1_800_000_000
AGENT = "spiffe://example.org/agents/expense-assistant"
DPOP_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"  # RFC 9449 example key thumbprint (HOSTILE §3.2)


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT: Any = _Omit()


def ec_jwk(crv: str = "P-256", kid: str | None = None) -> dict[str, str]:
    curve = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1(), "P-521": ec.SECP521R1()}[crv]
    return _with_kid(private_jwk(ec.generate_private_key(curve)), kid)


def ed25519_jwk(kid: str | None = None) -> dict[str, str]:
    return _with_kid(private_jwk(ed25519.Ed25519PrivateKey.generate()), kid)


def rsa_jwk(bits: int = 2048, kid: str | None = None, alg: str = "RS256") -> dict[str, str]:
    jwk = _with_kid(private_jwk(rsa.generate_private_key(public_exponent=65537, key_size=bits)), kid)
    jwk["alg"] = alg
    return jwk


def _with_kid(jwk: dict[str, str], kid: str | None) -> dict[str, str]:
    if kid is not None:
        jwk["kid"] = kid
    return jwk


def public_of(jwk: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The public JWK (``kid``, ``alg`` kept) as an IdP publishes it; ``extra``: more members (OMIT drops)."""
    pub: dict[str, Any] = {k: v for k, v in jwk.items() if k not in PRIVATE_MEMBERS}
    pub.update(extra)
    return {k: v for k, v in pub.items() if v is not OMIT}


def jwks_of(*jwks: Mapping[str, Any]) -> dict[str, Any]:
    return {"keys": [public_of(j) for j in jwks]}


def default_claims(now: int = NOW) -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 600,
        "jti": "tok-" + hashlib.sha256(str(now).encode()).hexdigest()[:12],
        "cnf": {"jkt": DPOP_JKT},
        "act": {"sub": AGENT},
        "client_id": AGENT,
        "groups": ["finance-managers"],
        "department": "42",
    }


def _merge(base: dict[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    merged = dict(base)
    for name, value in (overrides or {}).items():
        if value is OMIT:
            merged.pop(name, None)
        else:
            merged[name] = value
    return merged


_KEYS: dict[str, PrivateKey] = {}


def _private_key(jwk: Mapping[str, Any]) -> PrivateKey:
    """Key objects are cached: building an RSA private key from numbers costs ~40 ms."""
    cache_key = json.dumps(dict(jwk), sort_keys=True)
    if cache_key not in _KEYS:
        _KEYS[cache_key] = _weak_rsa_key(jwk) if jwk.get("kty") == "RSA" else private_key_from_jwk(jwk)
    return _KEYS[cache_key]


def _weak_rsa_key(jwk: Mapping[str, Any]) -> PrivateKey:
    """Any RSA size (broker.jose refuses < 2048 bits, but hostile tests must be able to sign with 1024)."""
    n, e, d, p, q = (int.from_bytes(b64url_decode(jwk[m]), "big") for m in ("n", "e", "d", "p", "q"))
    public = rsa.RSAPublicNumbers(e, n)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q), public
    )
    return numbers.private_key()


def _segment(value: Any) -> str:
    if isinstance(value, str):
        value = value.encode("utf-8")
    if isinstance(value, bytes):
        return b64url_encode(value)
    return b64url_encode(compact_json(value))


def _der_signature(key: PrivateKey, alg: str, signing_input: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes

    assert isinstance(key, ec.EllipticCurvePrivateKey)
    digest = {"ES256": hashes.SHA256(), "ES384": hashes.SHA384()}[alg]
    return key.sign(signing_input, ec.ECDSA(digest))


def make_token(
    key_jwk: Mapping[str, Any] | None,
    *,
    header: Mapping[str, Any] | None = None,
    claims: Mapping[str, Any] | None = None,
    header_value: Any = OMIT,
    claims_value: Any = OMIT,
    raw_header: str | bytes | None = None,
    raw_payload: str | bytes | None = None,
    header_b64: str | None = None,
    payload_b64: str | None = None,
    signature_b64: str | None = None,
    signature: bytes | None = None,
    der_signature: bool = False,
    hmac_secret: bytes | None = None,
    sign_alg: str | None = None,
    segments: list[str] | None = None,
    now: int = NOW,
) -> str:
    """A compact JWS access token; see the module docstring for the overrides."""
    if segments is not None:
        return ".".join(segments)
    base_header: dict[str, Any] = {"typ": "at+jwt"}
    if key_jwk is not None:
        base_header = {"alg": key_jwk.get("alg", "ES256"), "typ": "at+jwt", "kid": key_jwk.get("kid")}
    hdr = header_value if header_value is not OMIT else _merge(base_header, header)
    body = claims_value if claims_value is not OMIT else _merge(default_claims(now), claims)

    if header_b64 is None:
        header_b64 = _segment(raw_header if raw_header is not None else hdr)
    if payload_b64 is None:
        payload_b64 = _segment(raw_payload if raw_payload is not None else body)
    h64, p64 = header_b64, payload_b64
    signing_input = f"{h64}.{p64}".encode("ascii")
    if signature_b64 is not None:
        return f"{h64}.{p64}.{signature_b64}"
    if signature is None:
        alg = sign_alg or (hdr.get("alg") if isinstance(hdr, dict) else None) or "ES256"
        if hmac_secret is not None:
            signature = hmac.new(hmac_secret, signing_input, hashlib.sha256).digest()
        elif key_jwk is None:
            signature = b""
        else:
            key = _private_key(key_jwk)
            if der_signature:
                signature = _der_signature(key, alg, signing_input)
            else:
                signature = raw_signature(key, alg, signing_input)
    return f"{h64}.{p64}.{b64url_encode(signature)}"


def duplicate_member_json(base: Mapping[str, Any], name: str, first: Any, last: Any) -> str:
    """JSON object text with ``name`` twice (``first`` then ``last``): RFC 7515 §5.2 duplicate members."""
    members = [json.dumps(k) + ":" + json.dumps(v) for k, v in base.items() if k != name]
    members.append(json.dumps(name) + ":" + json.dumps(first))
    members.append(json.dumps(name) + ":" + json.dumps(last))
    return "{" + ",".join(members) + "}"
