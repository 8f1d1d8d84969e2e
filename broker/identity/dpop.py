"""DPoP proof verification (RFC 9449 §4.3), as pure functions.

:func:`verify_proof` runs every check of RFC 9449 §4.3 except replay, in the order of HOSTILE §3.4, cheapest
and most structural first, so a junk proof never costs a signature check or a state-store write:

 1. size cap, before any decoding (HOSTILE J12/D22);
 2. strict compact-JWS parse, shared with access tokens (:func:`broker.identity.jws.parse_compact`, which also
    does step 1): exactly 3 segments, strict base64url, UTF-8 JSON objects, duplicate members and
    NaN/Infinity refused (J11, J13, J15), no ``crit``, ``b64``, ``enc`` or ``zip`` (J09, J10, J14), ``alg`` a
    string (J02), and a non-empty signature;
 3. header ``typ`` is exactly ``dpop+jwt`` (§4.3 check 4, D03);
 4. ``alg`` is in the policy's asymmetric allow-list (check 5, D04);
 5. ``jwk`` present, an object, public only (check 7, D05); no ``x5c``/``x5u``/``jku``: the key is the
    embedded ``jwk`` and nothing is ever fetched (D06, D22);
 6. the key is built (no ``oct``, RSA < 2048, unknown curves, secp256k1) and ``alg`` fits it (D04, D06);
 7. signature (check 6, D07); everything after this reads claims an attacker could not have forged;
 8. ``jti`` (check 3, D13), ``htm`` (check 8, D08), ``htu`` (check 9, D09/D10), ``iat`` (check 11, D11);
 9. ``ath`` when an access token is presented (check 12, D14);
10. ``nonce`` when the policy requires one (check 10, D20), refused with ``use_dpop_nonce``.

Replay (D12) is deliberately NOT here: the caller does one atomic ``SET replay_key NX EX replay_ttl`` as the
very last step of the request's checks (HOSTILE §3.4 step 10), so invalid proofs never burn jtis. The token
binding (check 12, ``cnf.jkt``, D15) is :func:`check_binding`, run once the access token is verified.

Refusals raise :class:`~broker.errors.InvalidDpopProof` with ``reason`` from :data:`REASONS` (a closed set,
safe as a metrics label), or :class:`~broker.errors.UseDpopNonce` for the nonce.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NoReturn

from cryptography.hazmat.primitives.asymmetric import rsa

from broker.errors import InvalidDpopProof, InvalidRequest, InvalidToken, UseDpopNonce
from broker.identity.htu import normalize_url
from broker.identity.jws import JwsError, ParsedJws, parse_compact
from broker.jose import (
    PRIVATE_MEMBERS,
    JoseError,
    PublicKey,
    b64url_encode,
    jwk_thumbprint,
    public_key_from_jwk,
    verify_signature,
)

#: asymmetric JWS algorithms broker.jose can verify; a policy may allow a subset of these, nothing else
SUPPORTED_ALGORITHMS = frozenset({"ES256", "ES384", "ES512", "EdDSA", "RS256", "PS256"})
# alg -> (kty, crv) it requires (RFC 7518 §3.4, RFC 8037 §3.1); RSA keys carry no crv
_ALG_KEY_TYPE = {
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
    "RS256": ("RSA", None),
    "PS256": ("RSA", None),
}
_MAX_RSA_BITS = 4096  # bounds the cost of an RSA public operation on an attacker-chosen key
_KEY_MEMBERS = ("kty", "crv", "x", "y", "n", "e")
# Header parameters that point at keys elsewhere: a proof's key is its own `jwk`, never fetched (§4.2).
_KEY_REFERENCES = frozenset({"x5c", "x5u", "jku", "x5t", "x5t#S256"})
_REPLAY_MARGIN = 5  # seconds on top of the acceptance window: clock differences between replicas

REASONS = frozenset(
    {
        "dpop_missing",
        "dpop_multiple_headers",
        "dpop_multiple_values",
        "dpop_too_large",
        "dpop_malformed",
        "dpop_header_unsupported",
        "dpop_typ",
        "dpop_alg",
        "dpop_jwk_missing",
        "dpop_jwk_private",
        "dpop_key_reference",
        "dpop_jwk_unsupported",
        "dpop_alg_key_mismatch",
        "dpop_signature",
        "dpop_jti",
        "dpop_htm_mismatch",
        "dpop_htu_invalid",
        "dpop_htu_mismatch",
        "dpop_iat_invalid",
        "dpop_iat_stale",
        "dpop_iat_future",
        "dpop_ath_missing",
        "dpop_ath_mismatch",
        "dpop_nonce_missing",
        "dpop_nonce_invalid",
        "dpop_jkt_mismatch",
    }
)


@dataclass(frozen=True)
class DpopPolicy:
    """What proofs the broker accepts (``identity.dpop`` in the config)."""

    algorithms: tuple[str, ...] = ("ES256", "EdDSA", "ES384", "RS256", "PS256")
    iat_window: int = 60  # seconds a proof may be old
    iat_skew: int = 5  # seconds a proof may be "from the future" (client clock ahead)
    max_proof_bytes: int = 4096
    max_jti_chars: int = 256
    require_nonce: bool = False

    def __post_init__(self) -> None:
        if not self.algorithms or not set(self.algorithms) <= SUPPORTED_ALGORITHMS:
            # none and HS* are never acceptable for DPoP (RFC 9449 §4.3 check 5: asymmetric only).
            bad = sorted(set(self.algorithms) - SUPPORTED_ALGORITHMS)
            raise ValueError(
                f"DPoP algorithms must be a non-empty subset of {sorted(SUPPORTED_ALGORITHMS)}; "
                f"refused: {bad}"
            )
        for name in ("iat_window", "iat_skew", "max_proof_bytes", "max_jti_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"DPoP {name} must be a non-negative integer")


@dataclass(frozen=True)
class VerifiedProof:
    """A proof that passed every stateless check; the caller still owes the replay check."""

    jkt: str  #: RFC 7638 thumbprint of the proof's key (compare with the token's cnf.jkt)
    jti: str
    iat: int
    replay_key: str  #: hex SHA-256 of jkt + NUL + jti: safe as a store key whatever the jti holds (D13)
    replay_ttl: int  #: seconds the replay entry must live to outlast the acceptance window
    nonce: str | None


def _refuse(description: str, reason: str) -> NoReturn:
    raise InvalidDpopProof(description, reason=reason)


_MALFORMED = ("DPoP proof is not a compact JWS", "dpop_malformed")
_UNSUPPORTED_HEADER = ("DPoP proof uses unsupported header parameters", "dpop_header_unsupported")
# broker.identity.jws reasons -> (description, reason) of the refusal; every jws.REASONS member is here
# (a test holds this), and an unknown one would still be refused as dpop_malformed.
_JWS_REFUSALS: dict[str, tuple[str, str]] = {
    "jws_oversize": ("DPoP proof is too large", "dpop_too_large"),
    "jws_malformed": _MALFORMED,
    "jws_segments": _MALFORMED,
    "jws_b64": _MALFORMED,
    "jws_json": _MALFORMED,
    "jws_duplicate_member": _MALFORMED,
    "jws_crit": _UNSUPPORTED_HEADER,  # RFC 7515 §4.1.11: we understand no extension (J09)
    "jws_b64_false": _UNSUPPORTED_HEADER,  # RFC 7797 unencoded payload (J10)
    "jws_jwe_header": _UNSUPPORTED_HEADER,  # enc/zip: a proof is never encrypted or compressed (J14)
    "jws_alg": ("DPoP proof alg is not allowed", "dpop_alg"),  # alg missing or not a string (J02)
}


def _parse_proof(proof: str, max_bytes: int) -> ParsedJws:
    """The strictly parsed proof (size cap first, HOSTILE J12/D22), or the mapped :class:`InvalidDpopProof`."""
    try:
        jws = parse_compact(proof, max_bytes=max_bytes)
    except JwsError as exc:
        _refuse(*_JWS_REFUSALS.get(exc.reason, _MALFORMED))
    if not jws.signature:  # an unsecured JWS (RFC 7515 §A.5) is not even worth a signature check (J13)
        _refuse(*_MALFORMED)
    return jws


@lru_cache(maxsize=1024)
def _key_and_thumbprint(members: tuple[tuple[str, str], ...]) -> tuple[PublicKey, str]:
    # Keyed by exactly the members the key and its RFC 7638 thumbprint are computed from, so a hit is the
    # same key: agents reuse their key on every call, and building it (point validation, OpenSSL set-up)
    # costs more than a third of an ES256 verification. Failures are not cached (lru_cache never caches
    # exceptions), and the bounded size caps what a flood of random keys can hold.
    jwk = dict(members)
    key = public_key_from_jwk(jwk)
    if isinstance(key, rsa.RSAPublicKey) and key.key_size > _MAX_RSA_BITS:
        raise JoseError("RSA key longer than 4096 bits")
    return key, jwk_thumbprint(jwk)


@lru_cache(maxsize=1024)
def _normalized_expected_htu(htu: str) -> str:
    return normalize_url(htu)


def _check_header(header: Mapping[str, Any], policy: DpopPolicy) -> tuple[str, PublicKey, str]:
    """The proof's ``alg``, public key and key thumbprint, after checks 4, 5 and 7 of RFC 9449 §4.3."""
    # parse_compact refused crit, enc, zip and b64 other than true; a proof has no use for b64 at all (J10).
    if "b64" in header:
        _refuse(*_UNSUPPORTED_HEADER)
    if header.get("typ") != "dpop+jwt":  # exact: "JWT" or a missing typ is another kind of token (D03)
        _refuse("DPoP proof typ must be dpop+jwt", "dpop_typ")
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in policy.algorithms:  # exact match, no case folding (J02)
        _refuse("DPoP proof alg is not allowed", "dpop_alg")
    if not _KEY_REFERENCES.isdisjoint(header):
        _refuse("DPoP proof must carry its key as jwk only", "dpop_key_reference")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        _refuse("DPoP proof has no jwk", "dpop_jwk_missing")
    if not PRIVATE_MEMBERS.isdisjoint(jwk):  # RFC 9449 §4.3 check 7 (wso2/product-is#19887)
        _refuse("DPoP proof jwk must be a public key", "dpop_jwk_private")
    members = {name: jwk[name] for name in _KEY_MEMBERS if name in jwk}
    if not all(isinstance(value, str) for value in members.values()):
        _refuse("DPoP proof jwk is not usable", "dpop_jwk_unsupported")
    kty, crv = _ALG_KEY_TYPE[alg]
    if (
        members.get("kty") != kty
        or (crv is not None and members.get("crv") != crv)
        or ("alg" in jwk and jwk["alg"] != alg)
    ):
        _refuse("DPoP proof alg does not fit its key", "dpop_alg_key_mismatch")
    try:
        key, jkt = _key_and_thumbprint(tuple(sorted(members.items())))
    except (ValueError, TypeError):  # JoseError, and cryptography's refusal of e.g. an even RSA exponent
        _refuse("DPoP proof jwk is not usable", "dpop_jwk_unsupported")
    return alg, key, jkt


def ath_for(token: str) -> str:
    """RFC 9449 §4.2 ``ath``: base64url(SHA-256(ASCII bytes of the access token)), no padding."""
    return b64url_encode(hashlib.sha256(token.encode("ascii")).digest())


def verify_proof(
    proof: str,
    *,
    policy: DpopPolicy,
    method: str,
    htu: str,
    access_token: str | None,
    now: float,
    nonce_check: Callable[[str, str], bool] | None = None,
    nonce_issue: Callable[[str], str] | None = None,
) -> VerifiedProof:
    """Check one DPoP proof against the request; every RFC 9449 §4.3 check but replay (see module doc).

    ``method`` is the request method as received (compared case-sensitively, D08). ``htu`` is the URL the
    broker expects, built from configuration by :func:`broker.identity.htu.expected_htu` (never from Host
    or X-Forwarded-*, D10); a ``htu`` that cannot be normalised raises :class:`InvalidRequest`.
    ``access_token`` is the presented token (``ath`` is then required, D14) or None at a token endpoint.
    ``nonce_check(nonce, jkt)`` decides nonces when ``policy.require_nonce``; ``nonce_issue(jkt)``, if
    given, supplies the fresh ``DPoP-Nonce`` header of a ``use_dpop_nonce`` refusal (RFC 9449 §9).
    """
    required_nonce_check = nonce_check if policy.require_nonce else None
    if policy.require_nonce and nonce_check is None:
        raise ValueError("require_nonce needs a nonce_check")  # wiring error, not a client refusal
    jws = _parse_proof(proof, policy.max_proof_bytes)
    alg, key, jkt = _check_header(jws.header, policy)
    # Claims come from exactly the bytes whose signature is checked (HOSTILE J15).
    if not verify_signature(key, alg, jws.signing_input, jws.signature):
        _refuse("DPoP proof signature is invalid", "dpop_signature")
    claims = jws.payload

    jti = claims.get("jti")
    if not isinstance(jti, str) or not 0 < len(jti) <= policy.max_jti_chars or not jti.isprintable():
        # Printable only: no control characters, and no lone surrogates that could not be hashed (D13).
        _refuse("DPoP proof jti is missing or invalid", "dpop_jti")
    if claims.get("htm") != method:
        _refuse("DPoP proof htm does not match the request", "dpop_htm_mismatch")
    try:
        expected = _normalized_expected_htu(htu)
    except ValueError as exc:
        raise InvalidRequest("request URL is not in canonical form", reason="request_url_invalid") from exc
    claimed = claims.get("htu")
    if not isinstance(claimed, str):
        _refuse("DPoP proof htu is missing", "dpop_htu_invalid")
    if claimed != expected:  # normalize_url is idempotent: an equal string needs no second normalisation
        try:
            normalized = normalize_url(claimed)
        except ValueError:
            _refuse("DPoP proof htu is not a valid URL", "dpop_htu_invalid")
        if normalized != expected:
            _refuse("DPoP proof htu does not match the request", "dpop_htu_mismatch")
    iat = claims.get("iat")
    if type(iat) is not int:  # JSON integer only: not bool, float or numeric string (HOSTILE J18)
        _refuse("DPoP proof iat is missing or invalid", "dpop_iat_invalid")
    if iat < now - policy.iat_window:
        _refuse("DPoP proof is too old", "dpop_iat_stale")
    if iat > now + policy.iat_skew:
        _refuse("DPoP proof is from the future", "dpop_iat_future")

    if access_token is not None:
        ath = claims.get("ath")
        if not isinstance(ath, str):
            _refuse("DPoP proof ath is missing", "dpop_ath_missing")
        try:
            expected_ath = ath_for(access_token)
        except UnicodeEncodeError:  # a non-ASCII token has no ath anyone could have computed
            _refuse("DPoP proof ath does not match the access token", "dpop_ath_mismatch")
        # compare_digest wants ASCII str or bytes; encoding the claim keeps non-ASCII input a plain mismatch
        if not hmac.compare_digest(ath.encode("utf-8", "surrogatepass"), expected_ath.encode("ascii")):
            _refuse("DPoP proof ath does not match the access token", "dpop_ath_mismatch")

    nonce = claims.get("nonce")
    if required_nonce_check is not None and (
        not isinstance(nonce, str) or not required_nonce_check(nonce, jkt)
    ):
        # RFC 9449 §9: the refusal carries a fresh nonce (bound to this key) the client can use at once.
        headers = {"DPoP-Nonce": nonce_issue(jkt)} if nonce_issue is not None else None
        if nonce is None:
            raise UseDpopNonce(
                "DPoP proof must carry the server nonce", reason="dpop_nonce_missing", headers=headers
            )
        raise UseDpopNonce("DPoP nonce is invalid or expired", reason="dpop_nonce_invalid", headers=headers)

    return VerifiedProof(
        jkt=jkt,
        jti=jti,
        iat=iat,
        replay_key=hashlib.sha256(f"{jkt}\x00{jti}".encode()).hexdigest(),
        # A proof stays acceptable from (iat - skew) until (iat + window): remember its jti that long.
        replay_ttl=policy.iat_window + policy.iat_skew + _REPLAY_MARGIN,
        nonce=nonce if isinstance(nonce, str) else None,
    )


def check_binding(verified: VerifiedProof, cnf_jkt: str | None) -> None:
    """RFC 9449 §4.3 check 12 / §6.1: the access token's ``cnf.jkt`` is the proof key's thumbprint (D15).

    A token without ``cnf.jkt`` is not DPoP-bound: refused with ``invalid_token`` (D17); callers whose
    policy admits unbound tokens under the DPoP scheme simply do not call this.
    """
    if cnf_jkt is None:
        raise InvalidToken("access token is not DPoP-bound", reason="token_not_dpop_bound")
    if not isinstance(cnf_jkt, str) or not hmac.compare_digest(
        cnf_jkt.encode("utf-8", "surrogatepass"), verified.jkt.encode("ascii")
    ):
        _refuse("DPoP proof key does not match the access token", "dpop_jkt_mismatch")


# RFC 9110 §11.4 credentials = auth-scheme [ 1*SP token68 ]; we accept exactly one SP (D19) and a strict
# token68 (RFC 9110 §11.2: 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"=").
_CREDENTIALS = re.compile(r"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([A-Za-z0-9\-._~+/]+=*)")
_SCHEMES = {"dpop": "DPoP", "bearer": "Bearer"}


def parse_authorization(header_values: Sequence[str], *, max_token_chars: int = 8192) -> tuple[str, str]:
    """``(scheme, token)`` from the request's ``Authorization`` header values (all of them, D18).

    The scheme is matched case-insensitively (RFC 9110 §11.1, D19) and returned as ``"DPoP"`` or
    ``"Bearer"``. Two headers, or a value that is not exactly ``scheme SP token68``, is ``invalid_request``
    (RFC 6750 §3.1: "uses more than one method", "otherwise malformed"); no header, an oversized token
    (CONTRACT §8: 8 KiB) or another scheme is ``invalid_token``.
    """
    if not header_values:
        raise InvalidToken("access token required", reason="authorization_missing")
    if len(header_values) > 1:
        raise InvalidRequest("more than one Authorization header", reason="authorization_duplicate")
    value = header_values[0]
    if len(value) > max_token_chars + 16:  # before any matching; 16 covers the scheme and the space
        raise InvalidToken("access token is too large", reason="token_too_large")
    match = _CREDENTIALS.fullmatch(value)
    if match is None:
        raise InvalidRequest("malformed Authorization header", reason="authorization_malformed")
    scheme = _SCHEMES.get(match.group(1).lower())
    if scheme is None:
        raise InvalidToken("unsupported authorization scheme", reason="authorization_scheme_unsupported")
    token = match.group(2)
    if len(token) > max_token_chars:
        raise InvalidToken("access token is too large", reason="token_too_large")
    return scheme, token


def single_dpop_header(values: Sequence[str]) -> str:
    """The one ``DPoP`` header value (RFC 9449 §4.3 checks 1-2; D01, D02).

    Pass every value (aiohttp ``request.headers.getall("DPoP", [])``): none, two lines, or one value that
    an intermediary comma-joined from several (RFC 9110 §5.3) are all ``invalid_dpop_proof``.
    """
    if not values:
        _refuse("DPoP proof required", "dpop_missing")
    if len(values) > 1:
        _refuse("more than one DPoP header", "dpop_multiple_headers")
    if "," in values[0]:  # a compact JWS never contains a comma
        _refuse("more than one DPoP proof", "dpop_multiple_values")
    return values[0]
