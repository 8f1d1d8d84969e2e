"""DPoP proof verification (RFC 9449 §4.3): one row per HOSTILE §1.2 check, each breaking one thing."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from broker.errors import BrokerError, InvalidDpopProof, InvalidRequest, InvalidToken, UseDpopNonce
from broker.identity import jws
from broker.identity.dpop import (
    _JWS_REFUSALS,
    REASONS,
    DpopPolicy,
    VerifiedProof,
    ath_for,
    check_binding,
    parse_authorization,
    single_dpop_header,
    verify_proof,
)
from broker.identity.htu import expected_htu
from broker.identity.nonce import NonceService
from broker.jose import b64url_decode, b64url_encode, jwk_thumbprint, private_key_from_jwk
from tests.dpopfactory import DELETE, ec_key, ed25519_key, make_proof, public_part, rsa_key

NOW = 1_800_000_000
PUBLIC_URL = "https://broker.example.org"
PATH = "/v1/tools/approveExpense"
HTU = expected_htu(PUBLIC_URL, PATH)
TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
ATH = ath_for(TOKEN)
POLICY = DpopPolicy()

KEY = ec_key()
OTHER_KEY = ec_key()
P384_KEY = ec_key("P-384")
P521_KEY = ec_key("P-521")
ED_KEY = ed25519_key()
RSA_KEY = rsa_key(2048)
RSA_1024 = rsa_key(1024)
KEY_JKT = jwk_thumbprint(KEY)

NONCES = NonceService(bytes(range(32)), lifetime=300)
NONCE_CALL: dict[str, Any] = {
    "policy": DpopPolicy(require_nonce=True),
    "nonce_check": lambda nonce, jkt: NONCES.check(nonce, jkt, NOW),
    "nonce_issue": lambda jkt: NONCES.issue(NOW, jkt),
}

# RFC 9449 §4.1 example (HOSTILE §3.2), verified there against PyJWT.
RFC9449_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpD"
    "a0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6"
    "IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUu"
    "Y29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-F"
    "NyJK70nfbV37xRZT3Lg"
)
RFC9449_JKT = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
RFC9449_NOW = 1562262616
RFC9449_HTU = "https://server.example.com/token"


def verify(proof: str, **call: Any) -> VerifiedProof:
    """verify_proof for the default request (POST HTU with TOKEN at NOW), with the given changes."""
    args: dict[str, Any] = {"policy": POLICY, "method": "POST", "htu": HTU, "access_token": TOKEN, "now": NOW}
    return verify_proof(proof, **{**args, **call})


def proof(**changes: Any) -> Callable[[], str]:
    """A builder of the valid proof for the default request, with exactly ``changes`` applied."""

    def build() -> str:
        args: dict[str, Any] = {"htm": "POST", "htu": HTU, "iat": NOW, "ath": ATH, **changes}
        return make_proof(args.pop("key", KEY), **args)

    return build


def mangled(edit: Callable[[list[str]], list[str]]) -> Callable[[], str]:
    """A builder of the valid proof whose three segments are then edited as text."""
    return lambda: ".".join(edit(proof()().split(".")))


def der_signature_proof() -> str:
    header, payload, _ = proof()().split(".")
    key = private_key_from_jwk(KEY)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    der = key.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    return f"{header}.{payload}.{b64url_encode(der)}"


def raw_header_with(extra_json: str) -> str:
    """Header JSON text for KEY with ``extra_json`` spliced in first (duplicates survive in text form)."""
    jwk = json.dumps(public_part(KEY), separators=(",", ":"))
    return "{" + extra_json + '"typ":"dpop+jwt","alg":"ES256","jwk":' + jwk + "}"


def raw_payload_with(extra_json: str) -> str:
    return "{" + extra_json + f'"jti":"j1","htm":"POST","htu":"{HTU}","iat":{NOW},"ath":"{ATH}"' + "}"


def _point_off_curve() -> dict[str, Any]:
    jwk = public_part(KEY)
    y = bytearray(b64url_decode(jwk["y"]))
    y[-1] ^= 1
    return {**jwk, "y": b64url_encode(bytes(y))}


def _big_rsa_jwk(bits: int) -> dict[str, str]:
    n = secrets.randbits(bits) | (1 << (bits - 1)) | 1
    return {"kty": "RSA", "n": b64url_encode(n.to_bytes(bits // 8 + 1, "big").lstrip(b"\0")), "e": "AQAB"}


@dataclass(frozen=True)
class Bad:
    proof: Callable[[], str]
    reason: str
    call: Mapping[str, Any] = field(default_factory=dict)
    error: type[BrokerError] = InvalidDpopProof


BAD: dict[str, Bad] = {
    # --- size and strict parsing (HOSTILE J09-J15, D22) ---
    "D22-100KB-proof": Bad(lambda: "a" * 100_000, "dpop_too_large"),
    "D22-oversized-claims": Bad(proof(payload_overrides={"pad": "x" * 3000}), "dpop_too_large"),
    "J12-oversized-non-ascii": Bad(lambda: "\u00e9" * 5000, "dpop_too_large"),  # the cap comes first
    "J13-not-a-string": Bad(lambda: cast(str, proof()().encode()), "dpop_malformed"),
    "J13-2-segments": Bad(mangled(lambda s: s[:2]), "dpop_malformed"),
    "J13-4-segments": Bad(mangled(lambda s: [*s, s[2]]), "dpop_malformed"),
    "J14-5-segment-jwe": Bad(mangled(lambda s: [s[0], "", s[1], s[2], "tag"]), "dpop_malformed"),
    "J13-empty-signature": Bad(mangled(lambda s: [s[0], s[1], ""]), "dpop_malformed"),
    "J13-empty-header": Bad(mangled(lambda s: ["", s[1], s[2]]), "dpop_malformed"),
    "J13-padding": Bad(mangled(lambda s: [s[0] + "=", s[1], s[2]]), "dpop_malformed"),
    "J13-plus-slash": Bad(mangled(lambda s: [s[0], s[1], "+/" + s[2][2:]]), "dpop_malformed"),
    "J13-space": Bad(mangled(lambda s: [s[0], s[1][:8] + " " + s[1][8:], s[2]]), "dpop_malformed"),
    "J13-newline": Bad(mangled(lambda s: [s[0], s[1][:8] + "\n" + s[1][8:], s[2]]), "dpop_malformed"),
    "J13-non-ascii": Bad(mangled(lambda s: [s[0], s[1] + "\u00e9", s[2]]), "dpop_malformed"),
    "J13-invalid-utf8-header": Bad(proof(raw_header=b"\xff\xfe{}"), "dpop_malformed"),
    "J13-utf8-bom-header": Bad(
        proof(raw_header=b"\xef\xbb\xbf" + raw_header_with("").encode()), "dpop_malformed"
    ),
    "J13-header-array": Bad(proof(raw_header='["dpop+jwt"]'), "dpop_malformed"),
    "J13-header-string": Bad(proof(raw_header='"dpop+jwt"'), "dpop_malformed"),
    "J13-payload-empty": Bad(proof(raw_payload=b""), "dpop_malformed"),
    "J13-payload-array": Bad(proof(raw_payload="[]"), "dpop_malformed"),
    "J11-duplicate-header-alg": Bad(proof(raw_header=raw_header_with('"alg":"none",')), "dpop_malformed"),
    "J11-duplicate-payload-htm": Bad(proof(raw_payload=raw_payload_with('"htm":"GET",')), "dpop_malformed"),
    "J11-duplicate-jwk-member": Bad(
        proof(raw_header=raw_header_with("").replace('"x":', '"x":"AAAA","x":')), "dpop_malformed"
    ),
    "J18-nan-constant": Bad(proof(raw_payload=raw_payload_with('"exp":NaN,')), "dpop_malformed"),
    "J18-overflowing-float": Bad(proof(raw_payload=raw_payload_with('"exp":1e400,')), "dpop_malformed"),
    "J13-deep-nesting": Bad(
        proof(raw_payload=raw_payload_with('"a":' + "[" * 3000 + "]" * 3000 + ",")),
        "dpop_malformed",
        {"policy": DpopPolicy(max_proof_bytes=100_000)},
    ),
    "J09-crit": Bad(proof(header_overrides={"crit": ["exp"]}), "dpop_header_unsupported"),
    "J10-b64-false": Bad(proof(header_overrides={"b64": False}), "dpop_header_unsupported"),
    "J10-b64-true": Bad(proof(header_overrides={"b64": True}), "dpop_header_unsupported"),
    "J14-enc": Bad(proof(header_overrides={"enc": "A256GCM"}), "dpop_header_unsupported"),
    "J14-zip": Bad(proof(header_overrides={"zip": "DEF"}), "dpop_header_unsupported"),
    # --- D03 typ ---
    "D03-typ-JWT": Bad(proof(header_overrides={"typ": "JWT"}), "dpop_typ"),
    "D03-typ-missing": Bad(proof(header_overrides={"typ": DELETE}), "dpop_typ"),
    "D03-typ-at+jwt": Bad(proof(header_overrides={"typ": "at+jwt"}), "dpop_typ"),
    "D03-typ-case": Bad(proof(header_overrides={"typ": "DPoP+JWT"}), "dpop_typ"),
    # --- D04 alg ---
    "D04-alg-none": Bad(proof(header_overrides={"alg": "none"}, signature=b"\0"), "dpop_alg"),
    "D04-alg-None": Bad(proof(header_overrides={"alg": "None"}, signature=b"\0"), "dpop_alg"),
    "D04-alg-HS256": Bad(proof(header_overrides={"alg": "HS256"}, signature=b"m" * 32), "dpop_alg"),
    "D04-alg-missing": Bad(proof(header_overrides={"alg": DELETE}), "dpop_alg"),
    "D04-alg-lowercase": Bad(proof(header_overrides={"alg": "es256"}), "dpop_alg"),
    "D04-alg-trailing-space": Bad(proof(header_overrides={"alg": "ES256 "}), "dpop_alg"),
    "D04-alg-array": Bad(proof(header_overrides={"alg": ["ES256"]}), "dpop_alg"),
    "D04-alg-not-in-policy": Bad(proof(key=P521_KEY), "dpop_alg"),  # ES512
    "D04-alg-ES256K": Bad(proof(header_overrides={"alg": "ES256K"}), "dpop_alg"),
    "D04-RS256-on-EC-key": Bad(
        proof(header_overrides={"alg": "RS256"}, signature=b"s" * 256), "dpop_alg_key_mismatch"
    ),
    "D04-ES384-on-P256-key": Bad(
        proof(header_overrides={"alg": "ES384"}, signature=b"s" * 96), "dpop_alg_key_mismatch"
    ),
    "D04-EdDSA-on-EC-key": Bad(
        proof(header_overrides={"alg": "EdDSA"}, signature=b"s" * 64), "dpop_alg_key_mismatch"
    ),
    "D04-ES256-on-RSA-key": Bad(
        proof(key=RSA_KEY, header_overrides={"alg": "ES256"}, signature=b"s" * 64), "dpop_alg_key_mismatch"
    ),
    "D04-jwk-alg-differs": Bad(
        proof(header_overrides={"jwk": {**public_part(KEY), "alg": "ES384"}}), "dpop_alg_key_mismatch"
    ),
    # --- D05 private key material in jwk ---
    "D05-jwk-d": Bad(
        proof(header_overrides={"jwk": {**public_part(KEY), "d": KEY["d"]}}), "dpop_jwk_private"
    ),
    **{
        f"D05-jwk-rsa-{member}": Bad(
            proof(key=RSA_KEY, header_overrides={"jwk": {**public_part(RSA_KEY), member: RSA_KEY[member]}}),
            "dpop_jwk_private",
        )
        for member in ("p", "q", "dp", "dq", "qi")
    },
    "D05-jwk-oct-k": Bad(
        proof(header_overrides={"jwk": {"kty": "oct", "k": "c2VjcmV0"}}), "dpop_jwk_private"
    ),
    # --- D06 key presence and key quality ---
    "D06-jwk-missing": Bad(proof(header_overrides={"jwk": DELETE}), "dpop_jwk_missing"),
    "D06-kid-instead-of-jwk": Bad(
        proof(header_overrides={"jwk": DELETE, "kid": KEY["kid"]}), "dpop_jwk_missing"
    ),
    "D06-jwk-not-object": Bad(
        proof(header_overrides={"jwk": json.dumps(public_part(KEY))}), "dpop_jwk_missing"
    ),
    "D06-x5c-instead-of-jwk": Bad(
        proof(header_overrides={"jwk": DELETE, "x5c": ["MIIB"]}), "dpop_key_reference"
    ),
    "D06-x5c-beside-jwk": Bad(proof(header_overrides={"x5c": ["MIIB"]}), "dpop_key_reference"),
    "D06-rsa-1024": Bad(proof(key=RSA_1024), "dpop_jwk_unsupported"),
    "D06-rsa-over-4096": Bad(
        proof(key=RSA_KEY, header_overrides={"jwk": _big_rsa_jwk(4104)}), "dpop_jwk_unsupported"
    ),
    "D06-secp256k1": Bad(
        proof(header_overrides={"jwk": {**public_part(KEY), "crv": "secp256k1"}}), "dpop_alg_key_mismatch"
    ),
    "D06-point-off-curve": Bad(proof(header_overrides={"jwk": _point_off_curve()}), "dpop_jwk_unsupported"),
    "D06-jwk-member-not-string": Bad(
        proof(header_overrides={"jwk": {**public_part(KEY), "x": 5}}), "dpop_jwk_unsupported"
    ),
    "D06-ed25519-x25519-crv": Bad(
        proof(key=ED_KEY, header_overrides={"jwk": {**public_part(ED_KEY), "crv": "X25519"}}),
        "dpop_alg_key_mismatch",
    ),
    # --- D07 signature ---
    "D07-payload-altered": Bad(proof(payload_after_signing={"jti": "another"}), "dpop_signature"),
    "D07-other-key": Bad(proof(signing_key=OTHER_KEY), "dpop_signature"),
    "D07-r-s-zero": Bad(proof(signature=bytes(64)), "dpop_signature"),
    "D07-der-signature": Bad(der_signature_proof, "dpop_signature"),
    "D07-rs256-signature-as-ps256": Bad(
        proof(key=RSA_KEY, header_overrides={"alg": "PS256"}, sign_alg="RS256"), "dpop_signature"
    ),
    # --- D08 htm ---
    "D08-htm-GET-on-POST": Bad(proof(htm="GET"), "dpop_htm_mismatch"),
    "D08-htm-lowercase": Bad(proof(htm="post"), "dpop_htm_mismatch"),
    "D08-htm-missing": Bad(proof(payload_overrides={"htm": DELETE}), "dpop_htm_mismatch"),
    "D08-htm-array": Bad(proof(payload_overrides={"htm": ["POST"]}), "dpop_htm_mismatch"),
    # --- D09 htu ---
    "D09b-trailing-slash": Bad(proof(htu=HTU + "/"), "dpop_htu_mismatch"),
    "D09d-path-case": Bad(
        proof(htu=HTU.upper().replace("HTTPS://BROKER.EXAMPLE.ORG", PUBLIC_URL)), "dpop_htu_mismatch"
    ),
    "D09d-encoded-slash": Bad(proof(htu=f"{PUBLIC_URL}/v1%2Ftools/approveExpense"), "dpop_htu_mismatch"),
    "D09d-dot-segments": Bad(proof(htu=f"{PUBLIC_URL}/v1/x/../tools/approveExpense"), "dpop_htu_invalid"),
    "D09d-double-slash": Bad(proof(htu=f"{PUBLIC_URL}/v1//tools/approveExpense"), "dpop_htu_invalid"),
    "D09e-other-host": Bad(proof(htu=f"https://rs.example.net{PATH}"), "dpop_htu_mismatch"),
    "D09e-other-port": Bad(proof(htu=f"{PUBLIC_URL}:8443{PATH}"), "dpop_htu_mismatch"),
    "D09-http-scheme": Bad(proof(htu=f"http://broker.example.org{PATH}"), "dpop_htu_mismatch"),
    "D09-htu-missing": Bad(proof(payload_overrides={"htu": DELETE}), "dpop_htu_invalid"),
    "D09-htu-not-string": Bad(proof(payload_overrides={"htu": [HTU]}), "dpop_htu_invalid"),
    "D09-htu-relative": Bad(proof(htu=PATH), "dpop_htu_invalid"),
    "D10-forwarded-host": Bad(proof(htu=f"https://attacker.example{PATH}"), "dpop_htu_mismatch"),
    "D22-other-route": Bad(proof(htu=f"{PUBLIC_URL}/v1/tools/listInvoices"), "dpop_htu_mismatch"),
    # --- D11 iat ---
    "D11-iat-61s-old": Bad(proof(iat=NOW - 61), "dpop_iat_stale"),
    "D11-iat-10min-old": Bad(proof(iat=NOW - 600), "dpop_iat_stale"),
    "D11-iat-6s-ahead": Bad(proof(iat=NOW + 6), "dpop_iat_future"),
    "D11-iat-10min-ahead": Bad(proof(iat=NOW + 600), "dpop_iat_future"),
    "D11-iat-missing": Bad(proof(payload_overrides={"iat": DELETE}), "dpop_iat_invalid"),
    "D11-iat-string": Bad(proof(payload_overrides={"iat": str(NOW)}), "dpop_iat_invalid"),
    "D11-iat-float": Bad(proof(payload_overrides={"iat": float(NOW)}), "dpop_iat_invalid"),
    "D11-iat-bool": Bad(proof(payload_overrides={"iat": True}), "dpop_iat_invalid"),
    # --- D13 jti ---
    "D13-jti-missing": Bad(proof(payload_overrides={"jti": DELETE}), "dpop_jti"),
    "D13-jti-empty": Bad(proof(jti=""), "dpop_jti"),
    "D13-jti-257-chars": Bad(proof(jti="j" * 257), "dpop_jti"),
    "D13-jti-10KB": Bad(proof(jti="j" * 10_000), "dpop_jti", {"policy": DpopPolicy(max_proof_bytes=100_000)}),
    "D13-jti-newline": Bad(proof(jti="a:*\nb"), "dpop_jti"),
    "D13-jti-lone-surrogate": Bad(
        proof(raw_payload=raw_payload_with('"jti":"\\ud800",').replace('"jti":"j1",', "")), "dpop_jti"
    ),
    "D13-jti-number": Bad(proof(payload_overrides={"jti": 7}), "dpop_jti"),
    # --- D14 ath ---
    "D14-ath-missing": Bad(proof(payload_overrides={"ath": DELETE}), "dpop_ath_missing"),
    "D14-ath-not-string": Bad(proof(payload_overrides={"ath": 1}), "dpop_ath_missing"),
    "D14-ath-other-token": Bad(proof(ath=ath_for(TOKEN + "x")), "dpop_ath_mismatch"),
    "D14-ath-padded-token": Bad(proof(ath=ath_for(TOKEN + "=")), "dpop_ath_mismatch"),
    "D14-ath-whitespace-token": Bad(proof(ath=ath_for(TOKEN + " ")), "dpop_ath_mismatch"),
    "D14-ath-with-padding": Bad(proof(ath=ATH + "="), "dpop_ath_mismatch"),
    "D14-ath-hex": Bad(proof(ath=hashlib.sha256(TOKEN.encode()).hexdigest()), "dpop_ath_mismatch"),
    "D14-ath-non-ascii": Bad(proof(ath="\u00e9" + ATH[1:]), "dpop_ath_mismatch"),
    # --- D20 nonce ---
    "D20-nonce-absent": Bad(proof(), "dpop_nonce_missing", NONCE_CALL, UseDpopNonce),
    "D20-nonce-expired": Bad(
        proof(nonce=NONCES.issue(NOW - 301, KEY_JKT)), "dpop_nonce_invalid", NONCE_CALL, UseDpopNonce
    ),
    "D20-nonce-other-key": Bad(
        proof(nonce=NONCES.issue(NOW, jwk_thumbprint(OTHER_KEY))),
        "dpop_nonce_invalid",
        NONCE_CALL,
        UseDpopNonce,
    ),
    "D20-nonce-forged": Bad(
        proof(nonce=NonceService(b"k" * 32).issue(NOW, KEY_JKT)),
        "dpop_nonce_invalid",
        NONCE_CALL,
        UseDpopNonce,
    ),
    "D20-nonce-not-string": Bad(
        proof(payload_overrides={"nonce": 5}), "dpop_nonce_invalid", NONCE_CALL, UseDpopNonce
    ),
    # --- D22 key references ---
    "D22-jku": Bad(proof(header_overrides={"jku": "https://attacker.example/jwks"}), "dpop_key_reference"),
    "D22-x5u": Bad(proof(header_overrides={"x5u": "https://attacker.example/cert"}), "dpop_key_reference"),
}


@pytest.mark.parametrize("row", list(BAD.values()), ids=list(BAD))
def test_proof_is_refused(row: Bad) -> None:
    with pytest.raises(BrokerError) as caught:
        verify(row.proof(), **row.call)
    assert type(caught.value) is row.error
    assert caught.value.reason == row.reason
    assert row.reason in REASONS


GOOD: dict[str, tuple[Callable[[], str], Mapping[str, Any]]] = {
    "ES256": (proof(), {}),
    "EdDSA": (proof(key=ED_KEY), {}),
    "ES384": (proof(key=P384_KEY), {}),
    "RS256": (proof(key=RSA_KEY), {}),
    "PS256": (proof(key=RSA_KEY, header_overrides={"alg": "PS256"}, sign_alg="PS256"), {}),
    "ES512-when-allowed": (proof(key=P521_KEY), {"policy": DpopPolicy(algorithms=("ES512",))}),
    "D09a-query-and-fragment": (proof(htu=HTU + "?x=1#f"), {}),
    "D09c-case-and-default-port": (proof(htu="HTTPS://BROKER.EXAMPLE.ORG:443" + PATH), {}),
    "D09d-unreserved-encoded": (proof(htu=HTU.replace("approve", "%61pprove")), {}),
    "D09a-request-with-query": (proof(), {"htu": expected_htu(PUBLIC_URL, PATH + "?x=1")}),
    "D11-iat-window-edge": (proof(iat=NOW - 60), {}),
    "D11-iat-skew-edge": (proof(iat=NOW + 5), {}),
    "D13-jti-256-chars": (proof(jti="j" * 256), {}),
    "D13-jti-key-delimiters": (proof(jti="a:b*c dpop:*"), {}),
    "no-token-no-ath": (proof(payload_overrides={"ath": DELETE}), {"access_token": None}),
    "no-token-ath-ignored": (proof(ath="anything"), {"access_token": None}),
    "GET": (proof(htm="GET"), {"method": "GET"}),
    "kid-beside-jwk": (proof(header_overrides={"kid": "k1"}), {}),
    "D20-fresh-nonce": (proof(nonce=NONCES.issue(NOW, KEY_JKT)), NONCE_CALL),
    "nonce-not-required": (proof(nonce="whatever"), {}),
}


@pytest.mark.parametrize(("build", "call"), list(GOOD.values()), ids=list(GOOD))
def test_proof_is_accepted(build: Callable[[], str], call: Mapping[str, Any]) -> None:
    text = build()
    verified = verify(text, **call)
    claims = json.loads(b64url_decode(text.split(".")[1]))
    header = json.loads(b64url_decode(text.split(".")[0]))
    assert verified.jkt == jwk_thumbprint(header["jwk"])
    assert verified.jti == claims["jti"] and verified.iat == claims["iat"]
    assert verified.replay_key == hashlib.sha256(f"{verified.jkt}\x00{verified.jti}".encode()).hexdigest()
    assert verified.replay_ttl >= POLICY.iat_window + POLICY.iat_skew
    assert verified.nonce == claims.get("nonce")


def test_replay_key_is_store_safe_and_per_key() -> None:
    # D13 / S08: the key never carries the jti's characters; the same jti under two keys is two entries (D12).
    mine = verify(proof(jti="x:*y\\z")())
    theirs = verify(proof(key=OTHER_KEY, jti="x:*y\\z")())
    assert all(c in "0123456789abcdef" for c in mine.replay_key) and len(mine.replay_key) == 64
    assert mine.replay_key != theirs.replay_key


def test_every_jws_refusal_has_a_dpop_reason() -> None:
    # The shared parser's reasons are a closed set; each must land on a stable dpop_* metrics label.
    assert set(_JWS_REFUSALS) == jws.REASONS
    assert {reason for _, reason in _JWS_REFUSALS.values()} <= REASONS


def test_size_cap_is_exact() -> None:
    text = proof()()
    verify(text, policy=DpopPolicy(max_proof_bytes=len(text)))
    with pytest.raises(InvalidDpopProof) as caught:
        verify(text, policy=DpopPolicy(max_proof_bytes=len(text) - 1))
    assert caught.value.reason == "dpop_too_large"


def test_use_dpop_nonce_carries_a_fresh_nonce_for_the_proof_key() -> None:
    # D20: the refusal hands the client a nonce it can use at once, bound to its key, valid on any replica.
    with pytest.raises(UseDpopNonce) as caught:
        verify(proof()(), **NONCE_CALL)
    fresh = caught.value.headers["DPoP-Nonce"]
    replica = NonceService(bytes(range(32)), lifetime=300)
    assert replica.check(fresh, KEY_JKT, NOW + 1)
    assert verify(proof(nonce=fresh)(), **NONCE_CALL).nonce == fresh


def test_required_nonce_without_a_checker_is_a_wiring_error() -> None:
    with pytest.raises(ValueError):
        verify(proof()(), policy=DpopPolicy(require_nonce=True))


def test_non_canonical_request_url_is_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as caught:
        verify(proof()(), htu=f"{PUBLIC_URL}/v1/../tools")
    assert caught.value.reason == "request_url_invalid"


# --- RFC vectors (HOSTILE §3.2) ---


def test_rfc9449_example_proof_verifies_with_a_frozen_clock() -> None:
    verified = verify(RFC9449_PROOF, htu=RFC9449_HTU, access_token=None, now=RFC9449_NOW)
    assert verified.jkt == RFC9449_JKT
    assert verified.jti == "-BwC3ESc6acc2lTc" and verified.iat == RFC9449_NOW


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        ({"now": NOW}, "dpop_iat_stale"),
        ({"htu": RFC9449_HTU + "/"}, "dpop_htu_mismatch"),
        ({"method": "GET"}, "dpop_htm_mismatch"),
        ({"access_token": "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"}, "dpop_ath_missing"),
    ],
    ids=["current-clock", "trailing-slash-htu", "htm-GET", "with-access-token"],
)
def test_rfc9449_example_proof_is_refused(call: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidDpopProof) as caught:
        verify(RFC9449_PROOF, **{"htu": RFC9449_HTU, "access_token": None, "now": RFC9449_NOW, **call})
    assert caught.value.reason == reason


def test_rfc9449_jkt_vector() -> None:
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "x": "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs",
        "y": "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA",
    }
    assert jwk_thumbprint(jwk) == RFC9449_JKT


def test_rfc7638_rsa_thumbprint_vector() -> None:
    jwk = {
        "kty": "RSA",
        "n": (
            "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWK"
            "RXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMic"
            "AtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3"
            "XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
        ),
        "e": "AQAB",
    }
    assert jwk_thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
    assert jwk_thumbprint({**jwk, "kid": "2011-04-29", "alg": "RS256"}) == jwk_thumbprint(jwk)


def test_rfc9449_ath_vector() -> None:
    assert (
        ath_for("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU")
        == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"
    )


# --- D15 token binding ---


def test_binding_to_the_proof_key_is_accepted() -> None:
    check_binding(verify(proof()()), KEY_JKT)


@pytest.mark.parametrize(
    ("cnf_jkt", "error", "reason"),
    [
        (jwk_thumbprint(OTHER_KEY), InvalidDpopProof, "dpop_jkt_mismatch"),  # D15: stolen token, own key
        (KEY_JKT[:-1], InvalidDpopProof, "dpop_jkt_mismatch"),
        (KEY_JKT + "=", InvalidDpopProof, "dpop_jkt_mismatch"),
        ("\u00e9" + KEY_JKT[1:], InvalidDpopProof, "dpop_jkt_mismatch"),
        (7, InvalidDpopProof, "dpop_jkt_mismatch"),
        (None, InvalidToken, "token_not_dpop_bound"),  # D17: unbound token under the DPoP scheme
    ],
    ids=["D15-other-key", "D15-truncated", "D15-padded", "D15-non-ascii", "D15-not-string", "D17-unbound"],
)
def test_binding_is_refused(cnf_jkt: Any, error: type[BrokerError], reason: str) -> None:
    verified = verify(proof()())
    with pytest.raises(BrokerError) as caught:
        check_binding(verified, cnf_jkt)
    assert type(caught.value) is error and caught.value.reason == reason


# --- D18/D19 Authorization header, D01/D02 DPoP header ---


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["DPoP abc.def-_~+/ghi"], ("DPoP", "abc.def-_~+/ghi")),
        (["dpop abc"], ("DPoP", "abc")),  # D19: scheme case-insensitive
        (["DPOP abc"], ("DPoP", "abc")),
        (["Bearer abc=="], ("Bearer", "abc==")),
        (["bEARER abc"], ("Bearer", "abc")),
    ],
    ids=["DPoP", "dpop", "DPOP", "Bearer-padded", "bEARER"],
)
def test_authorization_is_parsed(values: list[str], expected: tuple[str, str]) -> None:
    assert parse_authorization(values) == expected


@pytest.mark.parametrize(
    ("values", "error", "reason"),
    [
        ([], InvalidToken, "authorization_missing"),
        (["DPoP a", "DPoP a"], InvalidRequest, "authorization_duplicate"),  # D18
        (["Bearer a", "DPoP a"], InvalidRequest, "authorization_duplicate"),  # D18
        (["DPoP  abc"], InvalidRequest, "authorization_malformed"),  # D19: double space
        (["DPoP\tabc"], InvalidRequest, "authorization_malformed"),
        (["DPoP abc def"], InvalidRequest, "authorization_malformed"),  # D19: trailing garbage
        (
            ["DPoP abc, Bearer def"],
            InvalidRequest,
            "authorization_malformed",
        ),  # D18: two methods in one value
        (["DPoP abc=d"], InvalidRequest, "authorization_malformed"),  # not token68
        (["DPoP abc\u00e9"], InvalidRequest, "authorization_malformed"),
        (['DPoP ab"c'], InvalidRequest, "authorization_malformed"),
        (["DPoP "], InvalidRequest, "authorization_malformed"),
        (["DPoP"], InvalidRequest, "authorization_malformed"),
        (["abc"], InvalidRequest, "authorization_malformed"),
        (["Basic dXNlcjpwYXNz"], InvalidToken, "authorization_scheme_unsupported"),
        (["DPoP " + "a" * 8193], InvalidToken, "token_too_large"),
        (["DPoP " + "a" * 100_000], InvalidToken, "token_too_large"),
    ],
    ids=[
        "none",
        "D18-two-DPoP",
        "D18-Bearer-and-DPoP",
        "D19-double-space",
        "D19-tab",
        "D19-trailing-garbage",
        "D18-comma-joined",
        "D19-not-token68",
        "D19-non-ascii",
        "D19-quote",
        "D19-empty-token",
        "D19-no-token",
        "no-scheme",
        "Basic",
        "token-8KiB+1",
        "token-100KB",
    ],
)
def test_authorization_is_refused(values: list[str], error: type[BrokerError], reason: str) -> None:
    with pytest.raises(BrokerError) as caught:
        parse_authorization(values)
    assert type(caught.value) is error and caught.value.reason == reason


def test_dpop_header_single_value() -> None:
    assert single_dpop_header(["a.b.c"]) == "a.b.c"


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ([], "dpop_missing"),  # D01
        (["a.b.c", "a.b.c"], "dpop_multiple_headers"),  # D02: two header lines
        (["a.b.c, d.e.f"], "dpop_multiple_values"),  # D02: comma-joined by an intermediary
        (["a.b.c,d.e.f"], "dpop_multiple_values"),
    ],
    ids=["D01-missing", "D02-two-lines", "D02-comma-joined", "D02-comma-no-space"],
)
def test_dpop_header_is_refused(values: list[str], reason: str) -> None:
    with pytest.raises(InvalidDpopProof) as caught:
        single_dpop_header(values)
    assert caught.value.reason == reason and reason in REASONS


# --- policy ---


@pytest.mark.parametrize(
    "kwargs",
    [
        {"algorithms": ("none",)},
        {"algorithms": ("HS256",)},
        {"algorithms": ("ES256", "HS512")},
        {"algorithms": ("es256",)},
        {"algorithms": ()},
        {"iat_window": -1},
        {"max_proof_bytes": True},
    ],
    ids=["none", "HS256", "ES256+HS512", "lowercase", "empty", "negative-window", "bool-size"],
)
def test_policy_refuses_bad_settings(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DpopPolicy(**kwargs)
