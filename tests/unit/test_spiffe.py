"""broker.identity.spiffe: strict SPIFFE IDs (SPIFFE-ID §2) and X.509-SVID leaf checks (X509-SVID §5.2).

HOSTILE.md §1.3: M03, M04, M05, M07, M08, M10 (certificates), M09, M11–M14 (parsing), M18 (prefixes).
Certificates are real, minted per module by :func:`broker.dev.pki.issue_certificate` under one CA.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.errors import InvalidClient
from broker.identity.spiffe import (
    SVID_INVALID,
    SpiffeId,
    actor_from_certificate,
    parse_spiffe_id,
    validate_trust_domain,
)
from tests.certfactory import (
    CLIENT_AUTH,
    CODE_SIGNING,
    SERVER_AUTH,
    PrivateKey,
    issue_certificate,
    self_signed_ca,
)

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
TD = "example.org"
AGENT = "spiffe://example.org/agents/expense-assistant"
Ca = tuple[x509.Certificate, PrivateKey]

# ---------------------------------------------------------------------------------------------- parsing

LONGEST_ID = "spiffe://example.org/" + "a" * (2048 - len("spiffe://example.org/"))
LONGEST_TD = "a" * 255

ACCEPTED = [
    pytest.param(AGENT, TD, "/agents/expense-assistant", id="agent"),
    pytest.param("spiffe://example.org", TD, "", id="trust-domain-id-without-path"),
    pytest.param("spiffe://a_b-c.d9/Ns/PROD/x.y_z-1", "a_b-c.d9", "/Ns/PROD/x.y_z-1", id="all-allowed-chars"),
    pytest.param("spiffe://example.org/...", TD, "/...", id="three-dots-is-a-name"),
    pytest.param(LONGEST_ID, TD, LONGEST_ID[len("spiffe://example.org") :], id="M13-exactly-2048-bytes"),
    pytest.param(f"spiffe://{LONGEST_TD}/x", LONGEST_TD, "/x", id="M13-trust-domain-exactly-255-bytes"),
]


@pytest.mark.parametrize(("text", "trust_domain", "path"), ACCEPTED)
def test_parse_accepts_canonical_ids(text: str, trust_domain: str, path: str) -> None:
    parsed = parse_spiffe_id(text)
    assert (parsed.trust_domain, parsed.path) == (trust_domain, path)
    assert str(parsed) == text


REFUSED = [
    # M09: the scheme is exactly "spiffe://", never normalised.
    pytest.param("SPIFFE://example.org/x", "spiffe_id_bad_scheme", id="M09-uppercase-scheme"),
    pytest.param("Spiffe://example.org/x", "spiffe_id_bad_scheme", id="M09-mixed-case-scheme"),
    pytest.param("spiffe:/example.org/x", "spiffe_id_bad_scheme", id="M09-single-slash"),
    pytest.param("spiffe:example.org/x", "spiffe_id_bad_scheme", id="M09-no-authority"),
    pytest.param("spiffe:///x", "spiffe_id_bad_trust_domain", id="M09-empty-authority"),
    pytest.param("https://example.org/x", "spiffe_id_bad_scheme", id="M09-https"),
    pytest.param(" spiffe://example.org/x", "spiffe_id_bad_scheme", id="M09-leading-space"),
    pytest.param("", "spiffe_id_bad_scheme", id="empty-string"),
    pytest.param("spiffe://", "spiffe_id_bad_trust_domain", id="no-trust-domain"),
    # M11: trust domain is lowercase [a-z0-9._-], no userinfo, port, IP literal, empty label, '%'.
    pytest.param("spiffe://Example.org/x", "spiffe_id_bad_trust_domain", id="M11-uppercase"),
    pytest.param("spiffe://example.org:443/x", "spiffe_id_bad_trust_domain", id="M11-port"),
    pytest.param("spiffe://example.org:/x", "spiffe_id_bad_trust_domain", id="M11-empty-port"),
    pytest.param("spiffe://user@example.org/x", "spiffe_id_bad_trust_domain", id="M11-userinfo"),
    pytest.param("spiffe://127.0.0.1/x", "spiffe_id_bad_trust_domain", id="M11-ipv4-literal"),
    pytest.param("spiffe://[::1]/x", "spiffe_id_bad_trust_domain", id="M11-ipv6-literal"),
    pytest.param("spiffe://example.org./x", "spiffe_id_bad_trust_domain", id="M11-trailing-dot"),
    pytest.param("spiffe://.example.org/x", "spiffe_id_bad_trust_domain", id="M11-leading-dot"),
    pytest.param("spiffe://example..org/x", "spiffe_id_bad_trust_domain", id="M11-empty-label"),
    pytest.param("spiffe://exa%6Dple.org/x", "spiffe_id_bad_trust_domain", id="M11-percent"),
    pytest.param("spiffe://ex\u00e4mple.org/x", "spiffe_id_bad_trust_domain", id="M11-non-ascii"),
    pytest.param("spiffe://example.org?x", "spiffe_id_bad_trust_domain", id="M11-query-after-authority"),
    # M12: path segments are canonical as written.
    pytest.param("spiffe://example.org/agents/%2e%2e", "spiffe_id_bad_path", id="M12-percent-dot-dot"),
    pytest.param("spiffe://example.org/agents%2Fx", "spiffe_id_bad_path", id="M12-percent-slash"),
    pytest.param("spiffe://example.org/agents/%41", "spiffe_id_bad_path", id="M12-percent-unreserved"),
    pytest.param("spiffe://example.org/a/../admin", "spiffe_id_bad_path", id="M12-dot-dot-segment"),
    pytest.param("spiffe://example.org/./x", "spiffe_id_bad_path", id="M12-dot-segment"),
    pytest.param("spiffe://example.org/agents/..", "spiffe_id_bad_path", id="M12-trailing-dot-dot"),
    pytest.param("spiffe://example.org//x", "spiffe_id_bad_path", id="M12-leading-double-slash"),
    pytest.param("spiffe://example.org/agents//x", "spiffe_id_bad_path", id="M12-inner-double-slash"),
    pytest.param("spiffe://example.org/agents/x/", "spiffe_id_bad_path", id="M12-trailing-slash"),
    pytest.param("spiffe://example.org/", "spiffe_id_bad_path", id="M12-root-trailing-slash"),
    pytest.param("spiffe://example.org/x?q=1", "spiffe_id_bad_path", id="M12-query"),
    pytest.param("spiffe://example.org/x#f", "spiffe_id_bad_path", id="M12-fragment"),
    pytest.param("spiffe://example.org/agents/\u00e9", "spiffe_id_bad_path", id="M12-non-ascii"),
    pytest.param("spiffe://example.org/agents/x y", "spiffe_id_bad_path", id="M12-space"),
    pytest.param("spiffe://example.org/agents/x\\y", "spiffe_id_bad_path", id="M12-backslash"),
    pytest.param("spiffe://example.org/agents/x ", "spiffe_id_bad_path", id="M12-trailing-space"),
    pytest.param("spiffe://example.org/x:y", "spiffe_id_bad_path", id="M12-colon"),
    # M13: lengths.
    pytest.param(LONGEST_ID + "a", "spiffe_id_too_long", id="M13-2049-bytes"),
    pytest.param(f"spiffe://{LONGEST_TD}a/x", "spiffe_id_bad_trust_domain", id="M13-trust-domain-256-bytes"),
    # M14: NUL anywhere.
    pytest.param("spiffe://example.org/a\x00.evil", "spiffe_id_bad_path", id="M14-nul-in-path"),
    pytest.param(
        "spiffe://example.org\x00.evil/a", "spiffe_id_bad_trust_domain", id="M14-nul-in-trust-domain"
    ),
]


@pytest.mark.parametrize(("text", "reason"), REFUSED)
def test_parse_refuses_non_canonical_ids(text: str, reason: str) -> None:
    with pytest.raises(InvalidClient) as caught:
        parse_spiffe_id(text)
    assert caught.value.reason == reason
    assert caught.value.status == 401


def test_parse_refuses_non_string() -> None:
    with pytest.raises(InvalidClient):
        parse_spiffe_id(b"spiffe://example.org/x")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("trust_domain", "path"),
    [
        pytest.param("Example.org", "/x", id="uppercase-trust-domain"),
        pytest.param(TD, "x", id="path-without-leading-slash"),
        pytest.param(TD, "/x/", id="trailing-slash"),
        pytest.param(TD, "/a/../b", id="dot-dot"),
    ],
)
def test_constructing_a_non_canonical_id_is_refused(trust_domain: str, path: str) -> None:
    with pytest.raises(InvalidClient):
        SpiffeId(trust_domain, path)


def test_validate_trust_domain_accepts_and_returns_the_name() -> None:
    assert validate_trust_domain("prod.example-1_a.org") == "prod.example-1_a.org"


def test_segments() -> None:
    assert parse_spiffe_id(AGENT).segments == ("agents", "expense-assistant")
    assert parse_spiffe_id("spiffe://example.org").segments == ()


# ---------------------------------------------------------------------------------------------- M18 prefixes


@pytest.mark.parametrize(
    ("candidate", "prefix", "expected"),
    [
        pytest.param("spiffe://td/ns/prod/x", "spiffe://td/ns/prod", True, id="child"),
        pytest.param("spiffe://td/ns/prod/x/y", "spiffe://td/ns/prod", True, id="grandchild"),
        pytest.param("spiffe://td/ns/prod", "spiffe://td/ns/prod", True, id="itself"),
        pytest.param("spiffe://td/anything", "spiffe://td", True, id="trust-domain-id-prefixes-all"),
        pytest.param(
            "spiffe://td/ns/prod-evil/x", "spiffe://td/ns/prod", False, id="M18-sibling-sharing-chars"
        ),
        pytest.param("spiffe://td/ns/production", "spiffe://td/ns/prod", False, id="M18-longer-segment"),
        pytest.param("spiffe://td/ns", "spiffe://td/ns/prod", False, id="parent-is-not-under-child"),
        pytest.param("spiffe://td/ns/Prod/x", "spiffe://td/ns/prod", False, id="case-sensitive-path"),
        pytest.param("spiffe://other/ns/prod/x", "spiffe://td/ns/prod", False, id="other-trust-domain"),
        pytest.param("spiffe://td.evil/ns/prod/x", "spiffe://td/ns/prod", False, id="trust-domain-suffix"),
        pytest.param("spiffe://t/d/ns/prod", "spiffe://td/ns/prod", False, id="trust-domain-split"),
    ],
)
def test_is_under_is_segment_aware(candidate: str, prefix: str, expected: bool) -> None:
    assert parse_spiffe_id(candidate).is_under(parse_spiffe_id(prefix)) is expected


@pytest.mark.parametrize(
    ("trust_domain", "expected"),
    [
        pytest.param("example.org", True, id="same"),
        pytest.param("Example.org", False, id="case"),
        pytest.param("example.org.", False, id="trailing-dot"),
        pytest.param("org", False, id="parent-domain"),
    ],
)
def test_is_member_of_is_exact(trust_domain: str, expected: bool) -> None:
    assert parse_spiffe_id(AGENT).is_member_of(trust_domain) is expected


# ---------------------------------------------------------------------------------------------- certificates


@pytest.fixture(scope="module")
def ca() -> Ca:
    return self_signed_ca("test CA", NOW - timedelta(days=1), 10, trust_domain=TD)


def mint(ca: Ca, **overrides: Any) -> bytes:
    """DER of a valid agent SVID under ``ca``, with ``overrides`` applied to issue_certificate."""
    fields: dict[str, Any] = {
        "common_name": "expense-assistant",
        "uris": [AGENT],
        "eku": (CLIENT_AUTH, SERVER_AUTH),
        "not_before": NOW - timedelta(hours=1),
        "not_after": NOW + timedelta(hours=1),
        **overrides,
    }
    cert, _ = issue_certificate(ca[0], ca[1], **fields)
    return cert.public_bytes(serialization.Encoding.DER)


SVID_ACCEPTED = [
    pytest.param({}, id="valid-svid"),
    pytest.param({"eku": None}, id="no-eku-extension"),
    pytest.param({"eku": (CLIENT_AUTH,)}, id="client-auth-only"),
    pytest.param({"dns": ["agent.example.org"], "ips": ["10.0.0.1"]}, id="dns-and-ip-sans-beside-the-uri"),
    pytest.param({"include_basic_constraints": False}, id="no-basic-constraints-means-ca-false"),
    pytest.param({"key_usage": {"digital_signature", "key_agreement"}}, id="key-agreement-allowed"),
    pytest.param({"common_name": None}, id="empty-subject-critical-san"),
    pytest.param({"not_after": NOW}, id="M04-boundary-not-after-equals-now"),
    pytest.param({"not_before": NOW}, id="M04-boundary-not-before-equals-now"),
]


@pytest.mark.parametrize("overrides", SVID_ACCEPTED)
def test_valid_svid_gives_the_actor(ca: Ca, overrides: dict[str, Any]) -> None:
    actor = actor_from_certificate(mint(ca, **overrides), trust_domain=TD, now=NOW)
    assert actor == parse_spiffe_id(AGENT)
    assert str(actor) == AGENT


SVID_REFUSED = [
    # M03: a signing certificate is never a client identity (X509-SVID §5.2).
    pytest.param(
        {"is_ca": True, "key_usage": {"key_cert_sign", "crl_sign", "digital_signature"}},
        "svid_is_ca",
        id="M03-ca-certificate-as-leaf",
    ),
    pytest.param({"is_ca": True}, "svid_is_ca", id="M03-ca-flag-only"),
    pytest.param(
        {"key_usage": {"digital_signature", "key_cert_sign"}}, "svid_bad_key_usage", id="M03-key-cert-sign"
    ),
    pytest.param({"key_usage": {"digital_signature", "crl_sign"}}, "svid_bad_key_usage", id="M03-crl-sign"),
    pytest.param({"key_usage": {"key_agreement"}}, "svid_bad_key_usage", id="no-digital-signature"),
    pytest.param({"key_usage": None}, "svid_bad_key_usage", id="no-key-usage-extension"),
    # M04: validity.
    pytest.param({"not_after": NOW - timedelta(seconds=1)}, "svid_expired", id="M04-expired"),
    pytest.param({"not_before": NOW + timedelta(seconds=1)}, "svid_not_yet_valid", id="M04-not-yet-valid"),
    # M05: EKU present without clientAuth.
    pytest.param({"eku": (SERVER_AUTH,)}, "svid_no_client_auth", id="M05-server-auth-only"),
    pytest.param({"eku": (CODE_SIGNING,)}, "svid_no_client_auth", id="M05-code-signing"),
    pytest.param(
        {"eku": (ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,)}, "svid_no_client_auth", id="M05-any-eku-only"
    ),
    # M07: no URI SAN.
    pytest.param({"uris": []}, "svid_no_uri_san", id="M07-no-san"),
    pytest.param(
        {"uris": [], "dns": ["expense-assistant.example.org"]}, "svid_no_uri_san", id="M07-dns-san-only"
    ),
    pytest.param({"uris": [], "ips": ["127.0.0.1"]}, "svid_no_uri_san", id="M07-ip-san-only"),
    # M08: exactly one URI SAN.
    pytest.param(
        {"uris": [AGENT, "spiffe://example.org/agents/travel-bot"]},
        "svid_multiple_uri_sans",
        id="M08-two-spiffe-uris",
    ),
    pytest.param(
        {"uris": [AGENT, "https://example.org/agents/x"]}, "svid_multiple_uri_sans", id="M08-spiffe-and-https"
    ),
    pytest.param({"uris": [AGENT, AGENT]}, "svid_multiple_uri_sans", id="M08-same-uri-twice"),
    # M09 and M11–M14 through a certificate: the SAN is parsed strictly.
    pytest.param(
        {"uris": ["SPIFFE://example.org/agents/expense-assistant"]},
        "spiffe_id_bad_scheme",
        id="M09-uppercase",
    ),
    pytest.param({"uris": ["https://example.org/agents/x"]}, "spiffe_id_bad_scheme", id="M09-https-uri"),
    pytest.param(
        {"uris": ["spiffe://Example.org/agents/x"]}, "spiffe_id_bad_trust_domain", id="M11-uppercase-td"
    ),
    pytest.param(
        {"uris": ["spiffe://example.org:8443/agents/x"]}, "spiffe_id_bad_trust_domain", id="M11-port"
    ),
    pytest.param({"uris": ["spiffe://example.org/agents/%2e%2e"]}, "spiffe_id_bad_path", id="M12-percent"),
    pytest.param({"uris": ["spiffe://example.org/agents/x/"]}, "spiffe_id_bad_path", id="M12-trailing-slash"),
    pytest.param({"uris": ["spiffe://example.org/agents/\u00e9"]}, "spiffe_id_bad_path", id="M12-non-ascii"),
    pytest.param({"uris": [LONGEST_ID + "a"]}, "spiffe_id_too_long", id="M13-too-long"),
    pytest.param({"uris": ["spiffe://example.org/a\x00.evil"]}, "spiffe_id_bad_path", id="M14-nul"),
    # M10: the chain verified against our bundle, so the SAN must name our trust domain.
    pytest.param({"uris": ["spiffe://evil.org/agents/x"]}, "svid_wrong_trust_domain", id="M10-other-domain"),
    pytest.param(
        {"uris": ["spiffe://example.org.evil/agents/x"]}, "svid_wrong_trust_domain", id="M10-suffixed-domain"
    ),
    pytest.param({"uris": ["spiffe://org/agents/x"]}, "svid_wrong_trust_domain", id="M10-parent-domain"),
    # X509-SVID §3.1: a leaf's ID has a path; the bare trust domain ID belongs to the CA.
    pytest.param({"uris": ["spiffe://example.org"]}, "svid_no_path", id="trust-domain-id-as-leaf"),
]


@pytest.mark.parametrize(("overrides", "reason"), SVID_REFUSED)
def test_invalid_svid_is_refused(ca: Ca, overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidClient) as caught:
        actor_from_certificate(mint(ca, **overrides), trust_domain=TD, now=NOW)
    assert caught.value.reason == reason
    assert caught.value.description == SVID_INVALID
    assert (caught.value.status, caught.value.code) == (401, "invalid_client")


@pytest.mark.parametrize(
    "der",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not a certificate", id="garbage"),
        pytest.param(b"\x30\x82\x01\x00", id="truncated-der"),
    ],
)
def test_unparseable_certificate_is_refused(der: bytes) -> None:
    with pytest.raises(InvalidClient) as caught:
        actor_from_certificate(der, trust_domain=TD, now=NOW)
    assert caught.value.reason == "svid_malformed"


def test_pem_instead_of_der_is_refused(ca: Ca) -> None:
    pem = x509.load_der_x509_certificate(mint(ca)).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(InvalidClient) as caught:
        actor_from_certificate(pem, trust_domain=TD, now=NOW)
    assert caught.value.reason == "svid_malformed"


def test_validity_is_checked_on_every_call_despite_caching(ca: Ca) -> None:
    der = mint(ca)
    assert str(actor_from_certificate(der, trust_domain=TD, now=NOW)) == AGENT
    with pytest.raises(InvalidClient) as caught:
        actor_from_certificate(der, trust_domain=TD, now=NOW + timedelta(hours=2))
    assert caught.value.reason == "svid_expired"


def test_trust_domain_is_checked_on_every_call_despite_caching(ca: Ca) -> None:
    der = mint(ca)
    assert str(actor_from_certificate(der, trust_domain=TD, now=NOW)) == AGENT
    with pytest.raises(InvalidClient) as caught:
        actor_from_certificate(der, trust_domain="other.org", now=NOW)
    assert caught.value.reason == "svid_wrong_trust_domain"


def test_naive_now_is_taken_as_utc(ca: Ca) -> None:
    der = mint(ca, not_after=NOW)
    naive = NOW.replace(tzinfo=None)
    assert str(actor_from_certificate(der, trust_domain=TD, now=naive)) == AGENT
    with pytest.raises(InvalidClient):
        actor_from_certificate(der, trust_domain=TD, now=naive + timedelta(seconds=1))
