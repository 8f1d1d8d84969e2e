"""Development PKI and keys (``broker certs``): the CONTRACT §10 layout, and a flexible certificate issuer.

Everything is EC P-256 (fast to generate, ES256 everywhere). :func:`generate` writes exactly::

    ca.pem ca-key.pem broker.pem broker-key.pem backend.pem backend-key.pem
    agents/NAME.pem agents/NAME-key.pem agents/NAME-dpop.jwk   (per agent)
    humans/NAME-dpop.jwk                                        (per human)
    idp.jwk idp-jwks.json broker-signing.jwk

Private keys (PEM and JWK) are created with mode 0600 before a single byte is written, through a fresh
temporary file renamed into place, so re-running over an older, looser file leaves no readable window.
Public files get 0644. Leaf PEM files hold only the leaf: ``ca.pem`` is the trust bundle.

:func:`issue_certificate` is deliberately permissive (any SAN, CA flag, key usage, EKU, validity) so tests can
mint hostile certificates that chain to the same CA. It is tooling, not the broker's runtime: the only
function here that reads the clock is :func:`generate`, when no ``now`` is given.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from broker import jose
from broker.errors import InvalidClient
from broker.identity.spiffe import SpiffeId, validate_trust_domain

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CODE_SIGNING = ExtendedKeyUsageOID.CODE_SIGNING

#: X509-SVID §4.3: a leaf sets digitalSignature (and, for EC keys, nothing else).
LEAF_KEY_USAGE: frozenset[str] = frozenset({"digital_signature"})
#: X509-SVID §4.3: a signing certificate sets keyCertSign and may set cRLSign.
CA_KEY_USAGE: frozenset[str] = frozenset({"key_cert_sign", "crl_sign"})
_KEY_USAGE_NAMES = (
    "digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
    "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only",
)  # fmt: skip

#: agent and human names become a SPIFFE path segment and a file name: keep both boring.
NAME_RE = re.compile(r"[a-z0-9._-]+")
#: issued certificates start this long before ``now``, so a peer whose clock lags a little still accepts them.
BACKDATE = timedelta(minutes=5)

PrivateKey = ec.EllipticCurvePrivateKey


def new_key() -> PrivateKey:
    """A fresh EC P-256 private key."""
    return ec.generate_private_key(ec.SECP256R1())


def _key_usage(names: Collection[str]) -> x509.KeyUsage:
    unknown = set(names) - set(_KEY_USAGE_NAMES)
    if unknown:
        raise ValueError(f"unknown key usage names: {sorted(unknown)}")
    return x509.KeyUsage(**{name: name in names for name in _KEY_USAGE_NAMES})


def _general_names(
    uris: Iterable[str],
    dns: Iterable[str],
    ips: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    # Written as given, even when not ASCII or not a SPIFFE ID: tests need to mint exactly such hostile SANs.
    names += [x509.UniformResourceIdentifier._init_without_validation(uri) for uri in uris]
    return names


def issue_certificate(
    ca_cert: x509.Certificate | None,
    ca_key: PrivateKey | None,
    *,
    common_name: str | None,
    uris: Sequence[str] = (),
    dns: Sequence[str] = (),
    ips: Sequence[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    is_ca: bool = False,
    path_length: int | None = None,
    include_basic_constraints: bool = True,
    key_usage: Collection[str] | None = LEAF_KEY_USAGE,
    eku: Sequence[ObjectIdentifier] | None = (CLIENT_AUTH,),
    san_critical: bool = False,
    not_before: datetime,
    not_after: datetime,
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """Issue a certificate signed by ``ca_key`` (self-signed when ``ca_cert`` is None); return it and its key.

    Every field is the caller's choice, so it can produce hostile certificates too: ``uris``/``dns``/``ips``
    are the SANs (no SAN extension when all are empty; URIs are written verbatim), ``key_usage`` is a set of
    ``x509.KeyUsage`` field names (None: no extension; marked critical, X509-SVID §4.3), ``eku`` the EKU
    OIDs (None: no extension), ``include_basic_constraints=False`` omits basicConstraints altogether. The
    subject is ``CN=common_name`` (empty when None, and then the SAN is made critical, RFC 5280 §4.2.1.6).
    SKI is always set, AKI whenever there is an issuer, as strict X.509 verifiers expect.
    """
    key = key if key is not None else new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else [])
    if ca_cert is None or ca_key is None:
        if (ca_cert is None) != (ca_key is None):
            raise ValueError("give both ca_cert and ca_key, or neither for a self-signed certificate")
        issuer_name, signing_key, issuer_public = subject, key, key.public_key()
    else:
        issuer_name, signing_key, issuer_public = ca_cert.subject, ca_key, ca_key.public_key()

    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public), critical=False)
    )
    if include_basic_constraints:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=path_length if is_ca else None), critical=True
        )
    if key_usage is not None:
        builder = builder.add_extension(_key_usage(key_usage), critical=True)
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    general_names = _general_names(uris, dns, ips)
    if general_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(general_names), critical=san_critical or common_name is None
        )
    return builder.sign(signing_key, hashes.SHA256()), key


def self_signed_ca(
    common_name: str,
    now: datetime,
    days: int,
    *,
    trust_domain: str | None = None,
    key: PrivateKey | None = None,
) -> tuple[x509.Certificate, PrivateKey]:
    """A self-signed signing certificate (CA=true, pathLen 0, keyCertSign+cRLSign), valid ``days`` days.

    With ``trust_domain`` it also carries the trust domain's SPIFFE ID as its URI SAN (SPIFFE-ID §3.1: the
    signing authority SHOULD carry an SVID of its own, without a path; X509-SVID §3.2).
    """
    return issue_certificate(
        None,
        None,
        common_name=common_name,
        uris=[str(SpiffeId(trust_domain, ""))] if trust_domain is not None else (),
        is_ca=True,
        path_length=0,
        key_usage=CA_KEY_USAGE,
        eku=None,
        not_before=now - BACKDATE,
        not_after=now + timedelta(days=days),
        key=key,
    )


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode`` set before the first byte: temp file, fchmod, rename.

    A fresh file in the same folder (O_EXCL, 0600) means an existing file's looser mode, or a symlink planted
    at ``path``, never sees the data; ``os.replace`` swaps the name atomically.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def write_pem_cert(path: Path, *certs: x509.Certificate) -> Path:
    """Write certificates as PEM (mode 0644), in the order given; return ``path``."""
    data = b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
    _write_atomically(Path(path), data, 0o644)
    return Path(path)


def write_pem_key(path: Path, key: PrivateKey) -> Path:
    """Write an unencrypted PKCS#8 PEM private key with mode 0600 from creation; return ``path``."""
    data = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_atomically(Path(path), data, 0o600)
    return Path(path)


def write_private_jwk(path: Path, jwk: Mapping[str, Any]) -> Path:
    """Write a private JWK, mode 0600 from creation (same JSON shape as ``jose.write_private_jwk``)."""
    _write_atomically(Path(path), (json.dumps(dict(jwk), indent=2) + "\n").encode("utf-8"), 0o600)
    return Path(path)


def _write_public_json(path: Path, value: Any) -> Path:
    _write_atomically(Path(path), (json.dumps(value, indent=2) + "\n").encode("utf-8"), 0o644)
    return Path(path)


def load_pem_cert(path: Path) -> x509.Certificate:
    """The first certificate of a PEM file."""
    return x509.load_pem_x509_certificate(Path(path).read_bytes())


def load_pem_key(path: Path) -> PrivateKey:
    """An EC private key from an unencrypted PEM file."""
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path}: not an EC private key")
    return key


def _check_names(kind: str, names: Sequence[str]) -> None:
    if isinstance(names, str):  # a bare string would be taken letter by letter
        raise ValueError(f"{kind} names must be a list of names, not one string")
    for name in names:
        # '.' and '..' pass the character class but are not SPIFFE path segments (SPIFFE-ID §2.2).
        if not isinstance(name, str) or NAME_RE.fullmatch(name) is None or name in (".", ".."):
            raise ValueError(f"invalid {kind} name {name!r}: use lowercase letters, digits, '.', '-' and '_'")
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate {kind} names")


def generate(
    out: Path,
    *,
    trust_domain: str = "example.org",
    agents: Sequence[str] = ("expense-assistant", "travel-bot"),
    humans: Sequence[str] = ("carol", "dave", "sam"),
    now: datetime | None = None,
    validity_days: int = 30,
) -> list[Path]:
    """Write the CONTRACT §10 development PKI into ``out`` and return the written paths (in layout order).

    Raises ValueError, before writing anything, for an invalid trust domain or an agent/human name outside
    ``[a-z0-9._-]+``. Existing files of the layout are replaced; nothing else in ``out`` is touched.
    Certificates are valid from ``now - 5 min`` to ``now + validity_days``.
    """
    try:
        validate_trust_domain(trust_domain)
    except InvalidClient as exc:
        raise ValueError(f"invalid trust domain {trust_domain!r}: {exc.description}") from exc
    _check_names("agent", agents)
    _check_names("human", humans)
    if validity_days < 1:
        raise ValueError("validity_days must be at least 1")
    now = now if now is not None else datetime.now(UTC)
    out = Path(out)
    not_before, not_after = now - BACKDATE, now + timedelta(days=validity_days)
    written: list[Path] = []

    ca_cert, ca_key = self_signed_ca(
        f"broker development CA ({trust_domain})", now, validity_days, trust_domain=trust_domain
    )
    written += [write_pem_cert(out / "ca.pem", ca_cert), write_pem_key(out / "ca-key.pem", ca_key)]

    for service in ("broker", "backend"):
        # Both serve TLS and present themselves as TLS clients (broker → backend mTLS, CONTRACT §8).
        cert, key = issue_certificate(
            ca_cert, ca_key, common_name=service, uris=[str(SpiffeId(trust_domain, f"/{service}"))],
            dns=["localhost"], ips=["127.0.0.1"], eku=(SERVER_AUTH, CLIENT_AUTH),
            not_before=not_before, not_after=not_after,
        )  # fmt: skip
        written += [
            write_pem_cert(out / f"{service}.pem", cert),
            write_pem_key(out / f"{service}-key.pem", key),
        ]

    for name in agents:
        # A real X.509-SVID: one URI SAN, CA=false, digitalSignature, and both TLS purposes (X509-SVID §4.4:
        # "when included, id-kp-serverAuth and id-kp-clientAuth MUST be set").
        cert, key = issue_certificate(
            ca_cert, ca_key, common_name=name, uris=[str(SpiffeId(trust_domain, f"/agents/{name}"))],
            eku=(CLIENT_AUTH, SERVER_AUTH), not_before=not_before, not_after=not_after,
        )  # fmt: skip
        written += [
            write_pem_cert(out / "agents" / f"{name}.pem", cert),
            write_pem_key(out / "agents" / f"{name}-key.pem", key),
            write_private_jwk(out / "agents" / f"{name}-dpop.jwk", jose.generate_ec_jwk()),
        ]

    for name in humans:
        written.append(write_private_jwk(out / "humans" / f"{name}-dpop.jwk", jose.generate_ec_jwk()))

    idp = jose.generate_ec_jwk()  # kid = RFC 7638 thumbprint, alg ES256
    public = {
        **jose.public_jwk(jose.private_key_from_jwk(idp)),
        "kid": idp["kid"],
        "alg": "ES256",
        "use": "sig",
    }
    written += [
        write_private_jwk(out / "idp.jwk", idp),
        _write_public_json(out / "idp-jwks.json", {"keys": [public]}),
        write_private_jwk(out / "broker-signing.jwk", jose.generate_ec_jwk()),
    ]
    return written
