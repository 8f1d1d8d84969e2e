"""Access-token verification (broker.identity.tokens, .jws): HOSTILE.md §1.1 J01–J27, one row per check.

Every hostile row breaks exactly one thing of a valid token and asserts InvalidToken with its reason.
Keys are real (cryptography); the issuer key sources are static JWKS documents (fetching is in test_jwks.py).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from broker.errors import InvalidToken
from broker.identity.issuer_keys import IssuerKeys
from broker.identity.jws import JwsError, parse_compact
from broker.identity.tokens import AccessToken, AccessTokenVerifier, IssuerPolicy
from broker.jose import b64url_encode, private_key_from_jwk
from tests.tokenfactory import (
    AGENT,
    AUDIENCE,
    DPOP_JKT,
    ISSUER,
    NOW,
    OMIT,
    default_claims,
    duplicate_member_json,
    ec_jwk,
    ed25519_jwk,
    make_token,
    public_of,
    rsa_jwk,
)

OTHER_ISSUER = "https://other-idp.example.org"
SINGLE_KEY_ISSUER = "https://single.example.org"
ALL_ALGS = ("ES256", "ES384", "EdDSA", "RS256", "PS256")

# Generated once per module (RSA keygen is the slow part).
ES256 = ec_jwk("P-256", kid="es256")
ES384 = ec_jwk("P-384", kid="es384")
ED = ed25519_jwk(kid="ed")
RSA = rsa_jwk(2048, kid="rsa", alg="RS256")
PS = {**RSA, "kid": "ps", "alg": "PS256"}  # same RSA key published a second time for PS256
OTHER_ES256 = ec_jwk("P-256", kid="es256")  # issuer B, colliding kid (J22)
OTHER_ONLY = ec_jwk("P-256", kid="other-only")
ATTACKER = ec_jwk("P-256", kid="attacker")
ENC_KEY = ec_jwk("P-256", kid="enc")  # published with use=enc: skipped (J25)
SINGLE = ec_jwk("P-256", kid="single")

RFC9449_PROOF = (
    "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0Rs"
    "cEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2"
    "In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2Vu"
    "IiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg"
)
RFC7797_DETACHED = (
    "eyJhbGciOiJIUzI1NiIsImI2NCI6ZmFsc2UsImNyaXQiOlsiYjY0Il19..A5dxf2s96_n5FLueVuW1Z_vh161FwXZC4YLPff6dmDY"
)
RFC7797_ATTACHED = RFC7797_DETACHED.replace("..", ".$.02.")


def make_verifier(cache_size: int = 10_000, max_token_bytes: int = 8192) -> AccessTokenVerifier:
    issuer_a = IssuerKeys(
        ISSUER,
        jwks={
            "keys": [
                public_of(ES256),
                public_of(ES384),
                public_of(ED),
                public_of(RSA),
                public_of(PS),
                public_of(ENC_KEY, use="enc"),
            ]
        },
    )
    issuer_b = IssuerKeys(OTHER_ISSUER, jwks={"keys": [public_of(OTHER_ES256), public_of(OTHER_ONLY)]})
    single = IssuerKeys(SINGLE_KEY_ISSUER, jwks={"keys": [public_of(SINGLE, kid=OMIT)]})
    return AccessTokenVerifier(
        [
            (IssuerPolicy(ISSUER, ALL_ALGS, AUDIENCE), issuer_a),
            (IssuerPolicy(OTHER_ISSUER, ("ES256",), AUDIENCE), issuer_b),
            (IssuerPolicy(SINGLE_KEY_ISSUER, ("ES256",), AUDIENCE), single),
        ],
        cache_size=cache_size,
        max_token_bytes=max_token_bytes,
    )


async def verify(token: str, now: float = NOW) -> AccessToken:
    return await make_verifier().verify(token, now=now)


def _public_key_forms() -> dict[str, bytes]:
    """The issuer's RSA public key in every form an HS256 forger might use as the MAC secret (J03)."""
    pub = private_key_from_jwk(RSA).public_key()
    spki_pem = pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {
        "pem": spki_pem,
        "pem_pkcs1": pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.PKCS1),
        "der": pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo),
        "openssh": pub.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH),
        "jwk_json": json.dumps(public_of(RSA)).encode(),
        "jwk_json_compact": json.dumps(public_of(RSA), separators=(",", ":")).encode(),
    }


def _hs256(secret: bytes) -> str:
    return make_token(RSA, header={"alg": "HS256"}, hmac_secret=secret)


def _zero_signature(size: int) -> str:
    return make_token(ES256, signature=b"\x00" * size)


def _der_es256() -> str:
    return make_token(ES256, der_signature=True)


def _rs_equal_n() -> str:
    n = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # P-256 group order
    return make_token(ES256, signature=n.to_bytes(32, "big") * 2)


def _oversize_kid() -> str:
    return make_token(ES256, header={"kid": "k" * 100_000})


Builder = Callable[[], str]
R = pytest.param

HOSTILE: list[Any] = [
    # J01/J02: alg by exact string match against the issuer's allow-list.
    R(
        lambda: make_token(None, header_value={"alg": "none", "typ": "at+jwt"}),
        "token_alg_not_allowed",
        id="J01-none",
    ),
    R(lambda: make_token(None, header_value={"alg": "None"}), "token_alg_not_allowed", id="J02-None"),
    R(lambda: make_token(None, header_value={"alg": "NONE"}), "token_alg_not_allowed", id="J02-NONE"),
    R(lambda: make_token(None, header_value={"alg": "nOnE"}), "token_alg_not_allowed", id="J02-nOnE"),
    R(
        lambda: make_token(ES256, header={"alg": "ES256 "}, sign_alg="ES256"),
        "token_alg_not_allowed",
        id="J02-space",
    ),
    R(
        lambda: make_token(ES256, header={"alg": "es256"}, sign_alg="ES256"),
        "token_alg_not_allowed",
        id="J02-case",
    ),
    R(
        lambda: make_token(ES256, header={"alg": ["ES256"]}, sign_alg="ES256"),
        "token_alg_not_allowed",
        id="J02-array",
    ),
    R(
        lambda: make_token(ES256, header={"alg": {"a": 1}}, sign_alg="ES256"),
        "token_alg_not_allowed",
        id="J02-object",
    ),
    R(
        lambda: make_token(ES256, header={"alg": OMIT}, sign_alg="ES256"),
        "token_alg_not_allowed",
        id="J02-missing",
    ),
    # J03: HMAC with the issuer's public key as secret, in every form.
    *[
        R(lambda s=s: _hs256(s), "token_alg_not_allowed", id=f"J03-hs256-{f}")
        for f, s in _public_key_forms().items()
    ],
    R(
        lambda: make_token(RSA, header={"alg": "HS384"}, hmac_secret=b"x"),
        "token_alg_not_allowed",
        id="J03-hs384",
    ),
    # J04: alg must fit the key (kty, crv, the JWK's own alg).
    R(lambda: make_token(ES256, header={"kid": "rsa"}), "token_alg_key_mismatch", id="J04-es256-on-rsa"),
    R(
        lambda: make_token(PS, header={"kid": "rsa"}),
        "token_alg_key_mismatch",
        id="J04-ps256-on-jwk-alg-rs256",
    ),
    R(
        lambda: make_token(RSA, header={"kid": "ps"}),
        "token_alg_key_mismatch",
        id="J04-rs256-on-jwk-alg-ps256",
    ),
    R(
        lambda: make_token(ES256, header={"alg": "ES384"}, signature=b"\x01" * 96),
        "token_alg_key_mismatch",
        id="J04-es384-on-p256",
    ),
    R(lambda: make_token(ES384, header={"kid": "ed"}), "token_alg_key_mismatch", id="J04-es384-on-ed25519"),
    # J05: kid is a bounded string used only as a dict key.
    R(lambda: make_token(ES256, header={"kid": "../../dev/null"}), "token_unknown_kid", id="J05-path"),
    R(lambda: make_token(ES256, header={"kid": "/etc/passwd"}), "token_unknown_kid", id="J05-abs-path"),
    R(lambda: make_token(ES256, header={"kid": "x' OR '1'='1"}), "token_unknown_kid", id="J05-sql"),
    R(lambda: make_token(ES256, header={"kid": "es256\u0000"}), "token_unknown_kid", id="J05-nul"),
    R(lambda: make_token(ES256, header={"kid": "k" * 257}), "token_kid", id="J05-257-chars"),
    R(_oversize_kid, "token_oversize", id="J05-100KB"),
    R(lambda: make_token(ES256, header={"kid": 7}), "token_kid", id="J05-int"),
    R(lambda: make_token(ES256, header={"kid": ["es256"]}), "token_kid", id="J05-array"),
    R(lambda: make_token(ES256, header={"kid": None}), "token_kid", id="J05-null"),
    R(lambda: make_token(ES256, header={"kid": ""}), "token_kid", id="J05-empty"),
    R(lambda: make_token(ES256, header={"kid": OMIT}), "token_kid", id="J05-absent-multi-key-issuer"),
    # J07/J08: keys only from the configured JWKS.
    R(
        lambda: make_token(ES256, header={"jku": "https://evil.example/jwks"}),
        "token_header_jku",
        id="J07-jku",
    ),
    R(
        lambda: make_token(ES256, header={"x5u": "https://evil.example/c.pem"}),
        "token_header_x5u",
        id="J07-x5u",
    ),
    R(
        lambda: make_token(ATTACKER, header={"jwk": public_of(ATTACKER)}),
        "token_header_jwk",
        id="J08-embedded-jwk",
    ),
    R(lambda: make_token(ES256, header={"x5c": ["MIIB"]}), "token_header_x5c", id="J08-x5c"),
    # J09/J10: crit and unencoded payloads.
    R(lambda: make_token(ES256, header={"crit": ["foo"], "foo": 1}), "token_crit", id="J09-unknown"),
    R(lambda: make_token(ES256, header={"crit": []}), "token_crit", id="J09-empty"),
    R(lambda: make_token(ES256, header={"crit": ["alg"]}), "token_crit", id="J09-alg"),
    R(lambda: make_token(ES256, header={"crit": ["exp"]}), "token_crit", id="J09-absent-param"),
    R(lambda: make_token(ES256, header={"crit": "b64"}), "token_crit", id="J09-not-array"),
    R(
        lambda: make_token(ES256, header={"b64": False, "crit": ["b64"]}),
        "token_b64_false",
        id="J10-b64-false",
    ),
    R(lambda: make_token(ES256, header={"b64": False}), "token_b64_false", id="J10-b64-false-no-crit"),
    R(lambda: RFC7797_DETACHED, "token_b64_false", id="J10-rfc7797-detached"),
    R(lambda: RFC7797_ATTACHED, "token_malformed", id="J10-rfc7797-attached"),
    # J11: duplicate members, refused in header and payload.
    R(
        lambda: make_token(
            ES256, raw_header=duplicate_member_json({"typ": "at+jwt", "kid": "es256"}, "alg", "ES256", "none")
        ),
        "token_duplicate_member",
        id="J11-header-alg",
    ),
    R(
        lambda: make_token(
            ES256, raw_payload=duplicate_member_json(default_claims(), "sub", "alice", "admin")
        ),
        "token_duplicate_member",
        id="J11-payload-sub",
    ),
    R(
        lambda: make_token(ES256, raw_payload='{"a":{"x":1,"x":2},' + json.dumps(default_claims())[1:]),
        "token_duplicate_member",
        id="J11-nested",
    ),
    # J12: size cap before decoding.
    R(lambda: make_token(ES256, claims={"pad": "x" * 9000}), "token_oversize", id="J12-payload"),
    R(lambda: make_token(ES256, signature_b64="A" * 9000), "token_oversize", id="J12-signature"),
    R(lambda: make_token(ES256, header_b64="e" * 10_000_000), "token_oversize", id="J12-10MB-header"),
    # J13: malformed structure.
    R(lambda: ".".join(make_token(ES256).split(".")[:2]), "token_malformed", id="J13-2-segments"),
    R(lambda: make_token(ES256) + ".AAAA", "token_malformed", id="J13-4-segments"),
    R(
        lambda: make_token(ES256, signature_b64=make_token(ES256).split(".")[2] + "=="),
        "token_malformed",
        id="J13-pad",
    ),
    R(lambda: "+" + make_token(ES256)[1:], "token_malformed", id="J13-plus"),
    R(lambda: make_token(ES256).replace(".", "/.", 1), "token_malformed", id="J13-slash"),
    R(lambda: " " + make_token(ES256), "token_malformed", id="J13-leading-space"),
    R(lambda: make_token(ES256) + "\n", "token_malformed", id="J13-newline"),
    R(lambda: make_token(ES256).replace(".", ". ", 1), "token_malformed", id="J13-inner-space"),
    R(lambda: "é" + make_token(ES256)[1:], "token_malformed", id="J13-non-ascii"),
    R(
        lambda: make_token(ES256, raw_header=b'{"alg":"ES256","x":"\xff"}'),
        "token_malformed",
        id="J13-bad-utf8",
    ),
    R(
        lambda: make_token(ES256, header_value=["ES256"], sign_alg="ES256"),
        "token_malformed",
        id="J13-header-array",
    ),
    R(
        lambda: make_token(ES256, header_value="ES256", sign_alg="ES256"),
        "token_malformed",
        id="J13-header-string",
    ),
    R(lambda: make_token(ES256, raw_header=b""), "token_malformed", id="J13-empty-header"),
    R(lambda: make_token(ES256, raw_payload=b""), "token_malformed", id="J13-empty-payload"),
    R(lambda: make_token(ES256, claims_value=[default_claims()]), "token_malformed", id="J13-payload-array"),
    R(
        lambda: make_token(ES256, raw_payload=json.dumps(default_claims()) + " x"),
        "token_malformed",
        id="J13-trailing",
    ),
    R(lambda: make_token(ES256, raw_payload='{"exp":NaN}'), "token_malformed", id="J13-nan"),
    R(lambda: make_token(ES256, raw_payload='{"exp":Infinity}'), "token_malformed", id="J13-infinity"),
    R(lambda: make_token(ES256, raw_payload='{"exp":1e400}'), "token_malformed", id="J13-overflow-float"),
    R(
        lambda: make_token(ES256, raw_payload='{"x":' + "9" * 5000 + "}"),
        "token_malformed",
        id="J13-5000-digits",
    ),
    R(
        lambda: make_token(ES256, raw_payload="[" * 3000 + "]" * 3000),
        "token_malformed",
        id="J13-deep-nesting",
    ),
    R(lambda: "", "token_malformed", id="J13-empty"),
    # J14/J15: no JWE, no nested JWT, compact serialization only.
    R(
        lambda: "eyJhbGciOiJSU0EtT0FFUCIsImVuYyI6IkEyNTZHQ00ifQ.AAAA.AAAA.AAAA.AAAA",
        "token_malformed",
        id="J14-jwe-5",
    ),
    R(lambda: make_token(ES256, header={"cty": "JWT"}), "token_cty", id="J14-nested-cty"),
    R(lambda: make_token(ES256, header={"zip": "DEF"}), "token_malformed", id="J14-zip"),
    R(lambda: make_token(ES256, header={"enc": "A256GCM"}), "token_malformed", id="J14-enc"),
    R(
        lambda: make_token(ES256, header={"alg": "PBES2-HS256+A128KW", "p2c": 2147483647}, sign_alg="ES256"),
        "token_alg_not_allowed",
        id="J14-pbes2",
    ),
    R(
        lambda: json.dumps({"payload": make_token(ES256).split(".")[1], "signatures": []}),
        "token_malformed",
        id="J15-json-serialization",
    ),
    R(
        lambda: make_token(ES256) + '.{"payload":"x"}',
        "token_malformed",
        id="J15-polyglot",
    ),
    # J16: required claims.
    R(lambda: make_token(ES256, claims={"exp": OMIT}), "token_claim_missing", id="J16-exp-missing"),
    R(lambda: make_token(ES256, claims={"iat": OMIT}), "token_claim_missing", id="J16-iat-missing"),
    R(lambda: make_token(ES256, claims={"sub": OMIT}), "token_claim_missing", id="J16-sub-missing"),
    # J18: strict integer times within [0, 2**53) and a bounded lifetime.
    R(lambda: make_token(ES256, claims={"exp": str(NOW + 600)}), "token_claim_type", id="J18-exp-string"),
    R(lambda: make_token(ES256, claims={"exp": True}), "token_claim_type", id="J18-exp-true"),
    R(lambda: make_token(ES256, claims={"exp": 1e300}), "token_claim_type", id="J18-exp-1e300"),
    R(lambda: make_token(ES256, claims={"exp": float(NOW + 600)}), "token_claim_type", id="J18-exp-float"),
    R(lambda: make_token(ES256, claims={"exp": -1}), "token_claim_type", id="J18-exp-negative"),
    R(lambda: make_token(ES256, claims={"exp": 2**70}), "token_claim_type", id="J18-exp-2**70"),
    R(lambda: make_token(ES256, claims={"exp": 2**53}), "token_claim_type", id="J18-exp-2**53"),
    R(lambda: make_token(ES256, claims={"exp": None}), "token_claim_type", id="J18-exp-null"),
    R(lambda: make_token(ES256, claims={"iat": str(NOW)}), "token_claim_type", id="J18-iat-string"),
    R(lambda: make_token(ES256, claims={"nbf": False}), "token_claim_type", id="J18-nbf-bool"),
    R(lambda: make_token(ES256, claims={"exp": NOW + 86401}), "token_lifetime", id="J18-lifetime"),
    R(lambda: make_token(ES256, claims={"exp": 2**53 - 1}), "token_lifetime", id="J18-lifetime-huge"),
    R(
        lambda: make_token(ES256, claims={"iat": NOW + 5, "exp": NOW + 5}),
        "token_lifetime",
        id="J18-exp-eq-iat",
    ),
    # J19: not yet valid.
    R(lambda: make_token(ES256, claims={"nbf": NOW + 31}), "token_nbf", id="J19-nbf-future"),
    R(lambda: make_token(ES256, claims={"iat": NOW + 31}), "token_iat_future", id="J19-iat-future"),
    # J20: audience by exact string equality.
    R(lambda: make_token(ES256, claims={"aud": "broker-evil"}), "token_aud", id="J20-other"),
    R(lambda: make_token(ES256, claims={"aud": AUDIENCE + ".evil"}), "token_aud", id="J20-suffix"),
    R(lambda: make_token(ES256, claims={"aud": AUDIENCE[:-1]}), "token_aud", id="J20-substring"),
    R(lambda: make_token(ES256, claims={"aud": AUDIENCE + "/"}), "token_aud", id="J20-trailing-slash"),
    R(lambda: make_token(ES256, claims={"aud": OMIT}), "token_aud", id="J20-missing"),
    R(lambda: make_token(ES256, claims={"aud": {"aud": AUDIENCE}}), "token_aud", id="J20-object"),
    R(lambda: make_token(ES256, claims={"aud": 1}), "token_aud", id="J20-number"),
    R(lambda: make_token(ES256, claims={"aud": ["x", "y"]}), "token_aud", id="J20-array-without"),
    R(lambda: make_token(ES256, claims={"aud": [AUDIENCE, 1]}), "token_aud", id="J20-array-non-string"),
    R(lambda: make_token(ES256, claims={"aud": [[AUDIENCE]]}), "token_aud", id="J20-array-nested"),
    R(lambda: make_token(ES256, claims={"aud": []}), "token_aud", id="J20-array-empty"),
    # J21: issuer by exact string equality (it also selects the key set).
    R(lambda: make_token(ES256, claims={"iss": "https://idp"}), "token_iss", id="J21-prefix"),
    R(lambda: make_token(ES256, claims={"iss": ISSUER + "/"}), "token_iss", id="J21-trailing-slash"),
    R(lambda: make_token(ES256, claims={"iss": ISSUER.upper()}), "token_iss", id="J21-case"),
    R(lambda: make_token(ES256, claims={"iss": [ISSUER]}), "token_iss", id="J21-array"),
    R(lambda: make_token(ES256, claims={"iss": OMIT}), "token_iss", id="J21-missing"),
    # J22: issuer B's keys never verify issuer A's tokens.
    R(lambda: make_token(OTHER_ES256), "token_signature", id="J22-kid-collision"),
    R(lambda: make_token(OTHER_ONLY), "token_unknown_kid", id="J22-other-issuers-kid"),
    # J23: other JWT kinds presented as the access token.
    R(lambda: make_token(ES256, header={"typ": "dpop+jwt"}), "token_typ", id="J23-dpop"),
    R(
        lambda: make_token(ES256, header={"typ": "application/DPoP+JWT"}),
        "token_typ",
        id="J23-dpop-media-type",
    ),
    R(lambda: make_token(ES256, header={"typ": "txntoken+jwt"}), "token_typ", id="J23-txn-token"),
    R(lambda: make_token(ES256, header={"typ": "grant+jwt"}), "token_typ", id="J23-grant"),
    R(lambda: make_token(ES256, header={"typ": "logout+jwt"}), "token_typ", id="J23-logout"),
    R(lambda: make_token(ES256, header={"typ": "secevent+jwt"}), "token_typ", id="J23-unlisted"),
    R(lambda: make_token(ES256, header={"typ": 1}), "token_typ", id="J23-typ-not-string"),
    R(lambda: make_token(ES256, header={"typ": ""}), "token_typ", id="J23-typ-empty-string"),
    R(lambda: RFC9449_PROOF, "token_typ", id="J23-rfc9449-proof"),
    R(
        lambda: make_token(ES256, header={"typ": "JWT"}, claims={"aud": "expense-client", "nonce": "n"}),
        "token_aud",
        id="J23-id-token",
    ),
    # J24: another deployment's token.
    R(
        lambda: make_token(ES256, claims={"iss": "https://idp.other-tenant.example"}),
        "token_iss",
        id="J24-iss",
    ),
    R(lambda: make_token(ES256, claims={"aud": "https://broker.other.example"}), "token_aud", id="J24-aud"),
    # J25: a key the JWKS publishes for encryption is never a verification key.
    R(lambda: make_token(ENC_KEY), "token_unknown_kid", id="J25-use-enc-key"),
    # J27 and plain signature failures.
    R(_der_es256, "token_signature", id="J27-der-signature"),
    R(lambda: _zero_signature(64), "token_signature", id="J27-r-s-zero"),
    R(_rs_equal_n, "token_signature", id="J27-r-s-equal-n"),
    R(lambda: make_token(ES256, signature=b""), "token_signature", id="sig-empty"),
    R(lambda: make_token(ATTACKER, header={"kid": "es256"}), "token_signature", id="sig-other-key"),
    R(
        lambda: make_token(
            ES256,
            payload_b64=make_token(ES256, claims={"sub": "admin"}).split(".")[1],
            signature_b64=make_token(ES256).split(".")[2],
        ),
        "token_signature",
        id="sig-payload-swapped",
    ),
    R(
        lambda: make_token(ED, header={"kid": "ed"}, signature=b"\x00" * 64),
        "token_signature",
        id="sig-ed25519-zero",
    ),
    R(
        lambda: make_token(PS, header={"alg": "PS256"}, sign_alg="RS256"),
        "token_signature",
        id="sig-rs256-as-ps256",
    ),
    # Other claim types.
    R(lambda: make_token(ES256, claims={"sub": ""}), "token_claim_type", id="sub-empty"),
    R(lambda: make_token(ES256, claims={"sub": 42}), "token_claim_type", id="sub-int"),
    R(lambda: make_token(ES256, claims={"jti": "j" * 257}), "token_claim_type", id="jti-too-long"),
    R(lambda: make_token(ES256, claims={"jti": 1}), "token_claim_type", id="jti-int"),
    R(lambda: make_token(ES256, claims={"cnf": "x"}), "token_claim_type", id="cnf-not-object"),
    R(lambda: make_token(ES256, claims={"cnf": {"jkt": 1}}), "token_claim_type", id="cnf-jkt-int"),
    R(lambda: make_token(ES256, claims={"cnf": {"x5t#S256": None}}), "token_claim_type", id="cnf-x5t-null"),
    R(lambda: make_token(ES256, claims={"act": AGENT}), "token_claim_type", id="act-not-object"),
    R(lambda: make_token(ES256, claims={"act": {}}), "token_claim_type", id="act-without-sub"),
    R(lambda: make_token(ES256, claims={"act": {"sub": 1}}), "token_claim_type", id="act-sub-int"),
    R(lambda: make_token(ES256, claims={"client_id": ["a"]}), "token_claim_type", id="client-id-array"),
]


@pytest.mark.parametrize(("build", "reason"), HOSTILE)
async def test_hostile_token_is_refused(build: Builder, reason: str) -> None:
    token = build()
    with pytest.raises(InvalidToken) as caught:
        await verify(token)
    assert caught.value.reason == reason
    assert caught.value.status == 401
    assert caught.value.description in ("access token is invalid", "access token expired")  # never echoes


@pytest.mark.parametrize(
    ("jwk", "header"),
    [
        R(ES256, {}, id="ES256"),
        R(ES384, {}, id="ES384"),
        R(ED, {}, id="EdDSA"),
        R(RSA, {}, id="RS256"),
        R(PS, {}, id="PS256"),
        R(ES256, {"typ": OMIT}, id="typ-absent"),
        R(ES256, {"typ": "JWT"}, id="typ-JWT"),
        R(ES256, {"typ": "application/at+jwt"}, id="typ-media-type"),
        R(ES256, {"b64": True}, id="b64-true"),
    ],
)
async def test_valid_token_is_accepted(jwk: dict[str, str], header: dict[str, Any]) -> None:
    token = make_token(jwk, header=header)
    result = await verify(token)
    assert (result.sub, result.iss, result.exp, result.iat) == ("alice", ISSUER, NOW + 600, NOW)
    assert (result.cnf_jkt, result.act_sub, result.client_id) == (DPOP_JKT, AGENT, AGENT)
    assert result.claims["department"] == "42"
    assert result.token_hash == b64url_encode(hashlib.sha256(token.encode()).digest())  # = DPoP ath


@pytest.mark.parametrize(
    "claims",
    [
        R({"aud": ["x", AUDIENCE]}, id="J20-array-containing"),
        R({"cnf": {"x5t#S256": "abc"}, "act": OMIT, "client_id": OMIT, "jti": OMIT}, id="mtls-bound-no-act"),
        R({"nbf": NOW + 30}, id="J19-nbf-at-leeway"),
        R({"iat": NOW + 30, "exp": NOW + 630}, id="J19-iat-at-leeway"),
        R({"jti": "j" * 256}, id="jti-256"),
        R({"exp": NOW + 86400}, id="lifetime-max"),
    ],
)
async def test_valid_claim_variants(claims: dict[str, Any]) -> None:
    await verify(make_token(ES256, claims=claims))


async def test_kid_may_be_absent_for_a_single_key_issuer() -> None:
    token = make_token(SINGLE, header={"kid": OMIT}, claims={"iss": SINGLE_KEY_ISSUER})
    assert (await verify(token)).iss == SINGLE_KEY_ISSUER


@pytest.mark.parametrize(
    ("exp", "accepted"),
    [
        R(NOW - 31, False, id="exp=now-(leeway+1)"),
        R(NOW - 30, False, id="exp=now-leeway"),
        R(NOW - 29, True, id="exp=now-(leeway-1)"),
        R(NOW, True, id="exp=now"),
    ],
)
async def test_expiry_leeway_boundary(exp: int, accepted: bool) -> None:
    """J17: with a 30 s leeway a token is valid while now < exp + leeway (RFC 7519 §4.1.4)."""
    token = make_token(ES256, claims={"iat": NOW - 600, "exp": exp})
    if accepted:
        await verify(token)
    else:
        with pytest.raises(InvalidToken) as caught:
            await verify(token)
        assert caught.value.reason == "token_expired"
        assert caught.value.description == "access token expired"


async def test_cache_hit_rechecks_expiry() -> None:
    verifier = make_verifier()
    token = make_token(ES256)
    first = await verifier.verify(token, now=NOW)
    assert await verifier.verify(token, now=NOW + 629) is first  # a hit: the very same verified object
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token, now=NOW + 630)
    assert caught.value.reason == "token_expired"
    with pytest.raises(InvalidToken):  # and it stays refused
        await verifier.verify(token, now=NOW + 630)


async def test_cache_hit_rechecks_not_before() -> None:
    verifier = make_verifier()
    token = make_token(ES256, claims={"nbf": NOW})
    await verifier.verify(token, now=NOW)
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token, now=NOW - 31)
    assert caught.value.reason == "token_nbf"


async def test_cache_is_bounded_fifo() -> None:
    verifier = make_verifier(cache_size=2)
    tokens = [make_token(ES256, claims={"jti": f"t{i}"}) for i in range(3)]
    results = [await verifier.verify(t, now=NOW) for t in tokens]
    assert await verifier.verify(tokens[2], now=NOW) is results[2]
    assert await verifier.verify(tokens[0], now=NOW) is not results[0]  # evicted, verified afresh


async def test_refusals_are_not_cached() -> None:
    verifier = make_verifier()
    token = make_token(ES256, claims={"nbf": NOW + 100})
    with pytest.raises(InvalidToken):
        await verifier.verify(token, now=NOW)
    assert (await verifier.verify(token, now=NOW + 100)).sub == "alice"


async def test_claims_are_read_only() -> None:
    result = await verify(make_token(ES256))
    with pytest.raises(TypeError):
        result.claims["sub"] = "admin"  # type: ignore[index]


async def test_max_token_bytes_is_configurable() -> None:
    token = make_token(ES256)
    with pytest.raises(InvalidToken) as caught:
        await make_verifier(max_token_bytes=len(token) - 1).verify(token, now=NOW)
    assert caught.value.reason == "token_oversize"
    await make_verifier(max_token_bytes=len(token)).verify(token, now=NOW)


@pytest.mark.parametrize(
    "kwargs",
    [
        R({"algorithms": ("none",)}, id="none"),
        R({"algorithms": ("HS256",)}, id="HS256"),
        R({"algorithms": ("ES256", "HS512")}, id="HS512-among-others"),
        R({"algorithms": ("RS512",)}, id="unknown"),
        R({"algorithms": ()}, id="empty"),
        R({"leeway": 61}, id="leeway-too-large"),
        R({"leeway": -1}, id="leeway-negative"),
        R({"max_lifetime": 0}, id="lifetime-zero"),
        R({"accepted_typ": ("at+jwt", "dpop+jwt")}, id="typ-dpop"),
        R({"accepted_typ": ("application/txntoken+jwt",)}, id="typ-txn"),
        R({"audience": ""}, id="audience-empty"),
    ],
)
def test_issuer_policy_refuses_unsafe_settings(kwargs: dict[str, Any]) -> None:
    args: dict[str, Any] = {"issuer": ISSUER, "algorithms": ("ES256",), "audience": AUDIENCE, **kwargs}
    with pytest.raises(ValueError):
        IssuerPolicy(**args)


def test_verifier_refuses_mismatched_or_duplicate_issuers() -> None:
    keys = IssuerKeys(ISSUER, jwks={"keys": [public_of(ES256)]})
    policy = IssuerPolicy(ISSUER, ("ES256",), AUDIENCE)
    with pytest.raises(ValueError):
        AccessTokenVerifier([(policy, keys), (policy, keys)])
    with pytest.raises(ValueError):
        AccessTokenVerifier([(IssuerPolicy(OTHER_ISSUER, ("ES256",), AUDIENCE), keys)])
    with pytest.raises(ValueError):
        AccessTokenVerifier([])


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        R("a" * 101, "jws_oversize", id="oversize"),
        R("a.b", "jws_segments", id="segments"),
        R("a.b.c.d.e", "jws_segments", id="jwe"),
        R("e30=.e30.", "jws_b64", id="padding"),
        R(b64url_encode(b"[]") + ".e30.", "jws_json", id="header-array"),
        R(b64url_encode(b'{"alg":"ES256","crit":["x"]}') + ".e30.", "jws_crit", id="crit"),
        R(b64url_encode(b'{"alg":"ES256","b64":false}') + ".e30.", "jws_b64_false", id="b64"),
        R(b64url_encode(b'{"alg":"ES256","zip":"DEF"}') + ".e30.", "jws_jwe_header", id="zip"),
        R(b64url_encode(b'{"alg":1}') + ".e30.", "jws_alg", id="alg-type"),
        R(b64url_encode(b'{"alg":"A","alg":"A"}') + ".e30.", "jws_duplicate_member", id="duplicate"),
    ],
)
def test_parse_compact_reasons(token: str, reason: str) -> None:
    with pytest.raises(JwsError) as caught:
        parse_compact(token, max_bytes=100)
    assert caught.value.reason == reason


def test_parse_compact_signing_input_is_the_received_bytes() -> None:
    token = make_token(ES256)
    parsed = parse_compact(token, max_bytes=8192)
    assert parsed.signing_input == token.rsplit(".", 1)[0].encode()
    assert (parsed.header_b64, parsed.payload_b64) == tuple(token.split(".")[:2])
    assert parsed.header["kid"] == "es256" and parsed.payload["sub"] == "alice"
    assert len(parsed.signature) == 64
