"""SPIFFE IDs and X.509-SVID leaf validation: the peer certificate → the actor.

Pure: nothing here reads the clock, the network or the environment. The TLS layer has already verified the
chain against the trust bundle (RFC 5280 path validation, X509-SVID §5.1); :func:`actor_from_certificate`
adds the SPIFFE-specific leaf checks of X509-SVID §5.2 that OpenSSL does not know about, and
:func:`parse_spiffe_id` is the one strict parser of SPIFFE-ID §2 used for certificates, tokens and policy.

Strictness, by design (HOSTILE.md M09–M14): an identifier that is not already canonical is refused, never
normalised. Case, percent-encoding, dot segments, empty segments and trailing slashes are all refusals, so
that two different strings can never name the same actor and a policy match can never be steered by
re-encoding.

Every refusal is an :class:`~broker.errors.InvalidClient` whose ``reason`` is one of the ``REASON_*`` codes
below (a closed set: it labels ``broker_auth_failures_total{reason}``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import TypeVar

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker.errors import InvalidClient

SCHEME_PREFIX = "spiffe://"
#: SPIFFE-ID §2.3: implementations must support (and we refuse anything beyond) 2048 bytes in all.
MAX_ID_BYTES = 2048
#: SPIFFE-ID §2.3: the host component of a URI is at most 255 bytes (RFC 3986).
MAX_TRUST_DOMAIN_BYTES = 255

REASON_BAD_SCHEME = "spiffe_id_bad_scheme"
REASON_BAD_TRUST_DOMAIN = "spiffe_id_bad_trust_domain"
REASON_BAD_PATH = "spiffe_id_bad_path"
REASON_TOO_LONG = "spiffe_id_too_long"
REASON_SVID_MALFORMED = "svid_malformed"
REASON_SVID_EXPIRED = "svid_expired"
REASON_SVID_NOT_YET_VALID = "svid_not_yet_valid"
REASON_SVID_IS_CA = "svid_is_ca"
REASON_SVID_BAD_KEY_USAGE = "svid_bad_key_usage"
REASON_SVID_NO_CLIENT_AUTH = "svid_no_client_auth"
REASON_SVID_NO_URI_SAN = "svid_no_uri_san"
REASON_SVID_MULTIPLE_URI_SANS = "svid_multiple_uri_sans"
REASON_SVID_WRONG_TRUST_DOMAIN = "svid_wrong_trust_domain"
REASON_SVID_NO_PATH = "svid_no_path"

SVID_INVALID = "client certificate is not a valid X.509-SVID"

_Ext = TypeVar("_Ext", bound=x509.ExtensionType)

# SPIFFE-ID §2.1 (as read by go-spiffe's strict parser): lowercase letters, digits, '.', '-', '_'. This also
# rules out userinfo ('@'), ports (':'), percent-encoding ('%'), IPv6 literals ('[') and uppercase.
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
# Dotted-quad IPv4 literals pass the character set but are not names of a trust domain (HOSTILE.md M11).
_IPV4_RE = re.compile(r"[0-9]+(?:\.[0-9]+){3}")
# SPIFFE-ID §2.2: path segments of letters, digits, '.', '-', '_'. No '%' (so no percent-encoding at all),
# no '?'/'#' (§2: no query or fragment), nothing outside ASCII, no NUL (Envoy CVE-2025-66220).
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")


def _invalid(reason: str, detail: str) -> InvalidClient:
    return InvalidClient(f"invalid SPIFFE ID: {detail}", reason=reason)


def validate_trust_domain(name: str) -> str:
    """Return ``name`` if it is a valid SPIFFE trust domain name, else raise InvalidClient.

    Rules: 1–255 bytes of ``[a-z0-9._-]``; no empty label (leading, trailing or doubled dot); not an IPv4
    literal. Use it for ``identity.trust_domain`` in config as well, so that config and peers agree.
    """
    if not isinstance(name, str) or not name:
        raise _invalid(REASON_BAD_TRUST_DOMAIN, "trust domain is empty")
    if len(name.encode("utf-8")) > MAX_TRUST_DOMAIN_BYTES:
        raise _invalid(REASON_BAD_TRUST_DOMAIN, "trust domain is longer than 255 bytes")
    if _TRUST_DOMAIN_RE.fullmatch(name) is None:
        raise _invalid(REASON_BAD_TRUST_DOMAIN, "trust domain may only hold lowercase letters, digits, '.-_'")
    if "" in name.split("."):
        raise _invalid(REASON_BAD_TRUST_DOMAIN, "trust domain has an empty label")
    if _IPV4_RE.fullmatch(name) is not None:
        raise _invalid(REASON_BAD_TRUST_DOMAIN, "trust domain is an IP address")
    return name


def _validate_path(path: str) -> None:
    """``""`` (the trust domain's own ID) or ``/seg(/seg)*`` with every segment canonical."""
    if path == "":
        return
    if not path.startswith("/"):
        raise _invalid(REASON_BAD_PATH, "path must start with '/'")
    for segment in path[1:].split("/"):
        if segment == "":
            # Covers '//' and a trailing '/' (SPIFFE-ID §2.2; go-spiffe refuses both).
            raise _invalid(REASON_BAD_PATH, "path has an empty segment or a trailing '/'")
        if segment in (".", ".."):
            raise _invalid(REASON_BAD_PATH, "path has a '.' or '..' segment")
        if _SEGMENT_RE.fullmatch(segment) is None:
            raise _invalid(
                REASON_BAD_PATH, "path segments may only contain letters, digits, '.', '-' and '_'"
            )


@dataclass(frozen=True)
class SpiffeId:
    """A canonical SPIFFE ID. ``path`` is ``""`` (the trust domain itself) or starts with ``/``.

    Construction validates, so every instance is canonical and ``str(SpiffeId(...))`` round-trips through
    :func:`parse_spiffe_id`. Equality is exact string equality of the parts: no case folding, no decoding.
    """

    trust_domain: str
    path: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        _validate_path(self.path)
        if len(SCHEME_PREFIX) + len(self.trust_domain) + len(self.path) > MAX_ID_BYTES:
            raise _invalid(REASON_TOO_LONG, "longer than 2048 bytes")

    def __str__(self) -> str:
        return f"{SCHEME_PREFIX}{self.trust_domain}{self.path}"

    @property
    def segments(self) -> tuple[str, ...]:
        """The path's segments, e.g. ``("agents", "travel-bot")``; empty for the trust domain's ID."""
        return tuple(self.path[1:].split("/")) if self.path else ()

    def is_member_of(self, trust_domain: str) -> bool:
        """True when this ID belongs to ``trust_domain`` (exact name equality)."""
        return self.trust_domain == trust_domain

    def is_under(self, prefix: SpiffeId) -> bool:
        """True when ``prefix`` equals this ID or is an ancestor of it, segment by segment.

        ``spiffe://td/ns/prod`` is under itself and is an ancestor of ``spiffe://td/ns/prod/x``, but not of
        ``spiffe://td/ns/prod-evil/x`` (HOSTILE.md M18: a raw ``startswith`` would say it is).
        """
        if self.trust_domain != prefix.trust_domain:
            return False
        theirs = prefix.segments
        return self.segments[: len(theirs)] == theirs


def parse_spiffe_id(text: str) -> SpiffeId:
    """Parse a SPIFFE ID strictly (SPIFFE-ID §2); raise InvalidClient with a ``spiffe_id_*`` reason.

    Accepted: exactly ``spiffe://`` (lowercase), a valid trust domain (:func:`validate_trust_domain`), and an
    empty path or ``/``-separated segments of ``[A-Za-z0-9._-]``, none empty, ``.`` or ``..``; 2048 bytes at
    most. Everything else is refused as written — ``SPIFFE://``, ``spiffe:/``, ``spiffe:///x``, ports,
    userinfo, ``%2e``, ``//``, trailing ``/``, ``?``, ``#``, non-ASCII, NUL — and never normalised.
    """
    if not isinstance(text, str):
        raise _invalid(REASON_BAD_SCHEME, "not a string")
    # Length first, before any scanning work (HOSTILE.md M13). Non-ASCII is refused below anyway; counting
    # UTF-8 bytes keeps the limit honest for the error message.
    if len(text.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES:
        raise _invalid(REASON_TOO_LONG, "longer than 2048 bytes")
    if not text.startswith(SCHEME_PREFIX):
        raise _invalid(REASON_BAD_SCHEME, "scheme must be exactly 'spiffe://'")
    rest = text[len(SCHEME_PREFIX) :]
    slash = rest.find("/")
    trust_domain, path = (rest, "") if slash < 0 else (rest[:slash], rest[slash:])
    return SpiffeId(trust_domain, path)


def _as_utc(now: datetime) -> datetime:
    # A naive datetime is taken as UTC, the only zone certificates speak (RFC 5280 §4.1.2.5).
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now


def _svid_error(reason: str) -> InvalidClient:
    return InvalidClient(SVID_INVALID, reason=reason)


@dataclass(frozen=True)
class _LeafFacts:
    spiffe_id: SpiffeId
    not_before: datetime
    not_after: datetime


def _ext_value(cert: x509.Certificate, kind: type[_Ext]) -> _Ext | None:
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


@lru_cache(maxsize=1024)
def _leaf_facts(der: bytes, trust_domain: str) -> _LeafFacts:
    """Everything about the leaf that does not depend on ``now``; cached by DER (a refusal is not cached).

    Order: X509-SVID §5.2 leaf checks (CA flag, key usage), then EKU, then the identity (exactly one URI SAN,
    a canonical SPIFFE ID of our trust domain with a non-root path).
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        # Touching .extensions parses them all: duplicate or undecodable extensions fail here, once.
        cert.extensions  # noqa: B018
        not_before, not_after = cert.not_valid_before_utc, cert.not_valid_after_utc
    except ValueError as exc:  # x509.DuplicateExtension and every ASN.1 decoding error are ValueErrors
        raise _svid_error(REASON_SVID_MALFORMED) from exc

    # X509-SVID §4.1/§5.2: a leaf has cA=false (an absent extension means cA=false, RFC 5280 §4.2.1.9).
    basic = _ext_value(cert, x509.BasicConstraints)
    if basic is not None and basic.ca:
        raise _svid_error(REASON_SVID_IS_CA)

    # X509-SVID §4.3: key usage MUST be present on every SVID; a leaf MUST set digitalSignature and MUST NOT
    # set keyCertSign or cRLSign (§5.2). We require presence too: a stricter reading than go-spiffe's.
    usage = _ext_value(cert, x509.KeyUsage)
    if usage is None or usage.key_cert_sign or usage.crl_sign or not usage.digital_signature:
        raise _svid_error(REASON_SVID_BAD_KEY_USAGE)

    # X509-SVID §4.4: EKU is optional; when present it must allow client authentication (HOSTILE.md M05;
    # Python's getpeercert() hides EKU, so this is the only place it is checked). anyExtendedKeyUsage does
    # not count: the purpose has to be stated.
    eku = _ext_value(cert, x509.ExtendedKeyUsage)
    if eku is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise _svid_error(REASON_SVID_NO_CLIENT_AUTH)

    # X509-SVID §2: exactly one URI SAN; other SAN types (DNS, IP) may be present and are ignored.
    san = _ext_value(cert, x509.SubjectAlternativeName)
    uris = [] if san is None else san.get_values_for_type(x509.UniformResourceIdentifier)
    if not uris:
        raise _svid_error(REASON_SVID_NO_URI_SAN)
    if len(uris) > 1:
        raise _svid_error(REASON_SVID_MULTIPLE_URI_SANS)
    try:
        spiffe_id = parse_spiffe_id(uris[0])
    except InvalidClient as exc:
        raise _svid_error(exc.reason) from exc

    # HOSTILE.md M10: the chain was verified against *our* bundle, so only IDs of our trust domain count.
    if not spiffe_id.is_member_of(trust_domain):
        raise _svid_error(REASON_SVID_WRONG_TRUST_DOMAIN)
    # X509-SVID §3.1/§5.2: a leaf's SPIFFE ID has a non-root path (the bare trust domain ID names the CA).
    if not spiffe_id.path:
        raise _svid_error(REASON_SVID_NO_PATH)
    return _LeafFacts(spiffe_id, not_before, not_after)


def actor_from_certificate(der: bytes, *, trust_domain: str, now: datetime) -> SpiffeId:
    """The SPIFFE ID of a chain-verified client leaf certificate (DER), or InvalidClient.

    Precondition: the TLS layer verified the chain to the trust bundle of ``trust_domain``. This adds the
    X509-SVID leaf rules: parseable; ``not_before <= now <= not_after`` (RFC 5280 §4.1.2.5, inclusive);
    CA=false; key usage present with digitalSignature and without keyCertSign/cRLSign; EKU, if present,
    with clientAuth; exactly one URI SAN holding a canonical SPIFFE ID of ``trust_domain`` with a path.
    The refusal's description is always :data:`SVID_INVALID`; ``reason`` names the check that failed.
    """
    if not isinstance(der, bytes | bytearray | memoryview) or not der:
        raise _svid_error(REASON_SVID_MALFORMED)
    facts = _leaf_facts(bytes(der), trust_domain)
    moment = _as_utc(now)
    if moment < facts.not_before:
        raise _svid_error(REASON_SVID_NOT_YET_VALID)
    if moment > facts.not_after:
        raise _svid_error(REASON_SVID_EXPIRED)
    return facts.spiffe_id
