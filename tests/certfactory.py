"""Test factory for certificates and keys: the §10 development PKI, plus hostile variants on demand.

Usage from any test (unit or integration, real TLS)::

    pki = make_pki(tmp_path_factory.mktemp("pki"))          # broker.dev.pki.generate() into a folder
    cert, key, dpop = pki.agent("expense-assistant")         # the genuine SVID and DPoP key files
    bad_cert, bad_key = mint_client_cert(pki, tmp, "ca-leaf", is_ca=True,
                                         key_usage={"key_cert_sign", "digital_signature"})  # M03
    alien_cert, alien_key = mint_untrusted_cert(tmp, "stranger")                         # M02
    ctx = client_ssl_context(pki, cert, key)                 # for aiohttp.TCPConnector(ssl=ctx)

``mint_client_cert`` starts from a valid SVID for ``spiffe://<td>/agents/<name>`` and lets keyword arguments
of :func:`broker.dev.pki.issue_certificate` override any field, so each hostile row breaks exactly one thing.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker.dev.pki import (
    CA_KEY_USAGE,
    CLIENT_AUTH,
    CODE_SIGNING,
    LEAF_KEY_USAGE,
    SERVER_AUTH,
    PrivateKey,
    generate,
    issue_certificate,
    load_pem_cert,
    load_pem_key,
    self_signed_ca,
    write_pem_cert,
    write_pem_key,
)

__all__ = [
    "CA_KEY_USAGE",
    "CLIENT_AUTH",
    "CODE_SIGNING",
    "LEAF_KEY_USAGE",
    "SERVER_AUTH",
    "AgentFiles",
    "Pki",
    "PrivateKey",
    "client_ssl_context",
    "der_of",
    "issue_certificate",
    "make_pki",
    "mint_client_cert",
    "mint_untrusted_cert",
    "self_signed_ca",
]


class AgentFiles(NamedTuple):
    cert: Path
    key: Path
    dpop_jwk: Path


@dataclass(frozen=True)
class Pki:
    """Paths of one generated §10 folder, and the moment it was generated at."""

    root: Path
    trust_domain: str
    now: datetime

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca-key.pem"

    @property
    def broker(self) -> Path:
        return self.root / "broker.pem"

    @property
    def broker_key(self) -> Path:
        return self.root / "broker-key.pem"

    @property
    def backend(self) -> Path:
        return self.root / "backend.pem"

    @property
    def backend_key(self) -> Path:
        return self.root / "backend-key.pem"

    @property
    def idp_jwk(self) -> Path:
        return self.root / "idp.jwk"

    @property
    def idp_jwks(self) -> Path:
        return self.root / "idp-jwks.json"

    @property
    def signing_jwk(self) -> Path:
        return self.root / "broker-signing.jwk"

    def agent(self, name: str) -> AgentFiles:
        """(cert, key, dpop_jwk) paths of a generated agent."""
        folder = self.root / "agents"
        return AgentFiles(folder / f"{name}.pem", folder / f"{name}-key.pem", folder / f"{name}-dpop.jwk")

    def human_dpop(self, name: str) -> Path:
        return self.root / "humans" / f"{name}-dpop.jwk"

    def agent_id(self, name: str) -> str:
        """The SPIFFE ID string of an agent of this trust domain."""
        return f"spiffe://{self.trust_domain}/agents/{name}"

    def load_ca(self) -> tuple[x509.Certificate, PrivateKey]:
        return load_pem_cert(self.ca), load_pem_key(self.ca_key)


def make_pki(
    tmp_dir: Path,
    *,
    trust_domain: str = "example.org",
    agents: tuple[str, ...] = ("expense-assistant", "travel-bot"),
    humans: tuple[str, ...] = ("carol", "dave", "sam"),
    now: datetime | None = None,
) -> Pki:
    """Generate the §10 layout into ``tmp_dir`` with :func:`broker.dev.pki.generate` and describe it."""
    now = now if now is not None else datetime.now(UTC)
    generate(Path(tmp_dir), trust_domain=trust_domain, agents=agents, humans=humans, now=now)
    return Pki(root=Path(tmp_dir), trust_domain=trust_domain, now=now)


def _write_pair(tmp_dir: Path, name: str, cert: x509.Certificate, key: PrivateKey) -> tuple[Path, Path]:
    folder = Path(tmp_dir)
    return write_pem_cert(folder / f"{name}.pem", cert), write_pem_key(folder / f"{name}-key.pem", key)


def _svid_defaults(trust_domain: str, name: str, now: datetime) -> dict[str, Any]:
    return {
        "common_name": name,
        "uris": [f"spiffe://{trust_domain}/agents/{name}"],
        "eku": (CLIENT_AUTH, SERVER_AUTH),
        "not_before": now - timedelta(minutes=5),
        "not_after": now + timedelta(days=1),
    }


def mint_client_cert(pki: Pki, tmp_dir: Path, name: str, **issue_kwargs: Any) -> tuple[Path, Path]:
    """A client certificate signed by ``pki``'s CA, written to ``tmp_dir/NAME.pem`` and ``NAME-key.pem``.

    Without keyword arguments it is a valid SVID for ``spiffe://<td>/agents/NAME``; any keyword of
    :func:`broker.dev.pki.issue_certificate` (``uris``, ``is_ca``, ``key_usage``, ``eku``, ``not_after``, …)
    overrides that one field.
    """
    ca_cert, ca_key = pki.load_ca()
    kwargs = {**_svid_defaults(pki.trust_domain, name, pki.now), **issue_kwargs}
    cert, key = issue_certificate(ca_cert, ca_key, **kwargs)
    return _write_pair(tmp_dir, name, cert, key)


def mint_untrusted_cert(
    tmp_dir: Path,
    name: str,
    *,
    trust_domain: str = "example.org",
    now: datetime | None = None,
    self_signed: bool = False,
    **issue_kwargs: Any,
) -> tuple[Path, Path]:
    """A well-formed SVID for ``spiffe://<td>/agents/NAME`` that does *not* chain to any generated PKI.

    It is signed by a fresh CA (also written, as ``tmp_dir/NAME-ca.pem``), or by its own key when
    ``self_signed`` (HOSTILE.md M02). Keyword arguments override fields as in :func:`mint_client_cert`.
    """
    now = now if now is not None else datetime.now(UTC)
    kwargs = {**_svid_defaults(trust_domain, name, now), **issue_kwargs}
    if self_signed:
        cert, key = issue_certificate(None, None, **kwargs)
    else:
        ca_cert, ca_key = self_signed_ca(f"untrusted CA {name}", now, 2, trust_domain=trust_domain)
        write_pem_cert(Path(tmp_dir) / f"{name}-ca.pem", ca_cert)
        cert, key = issue_certificate(ca_cert, ca_key, **kwargs)
    return _write_pair(tmp_dir, name, cert, key)


def der_of(cert_path: Path) -> bytes:
    """The DER bytes of the (first) certificate in a PEM file, as ``getpeercert(True)`` would give them."""
    return load_pem_cert(cert_path).public_bytes(serialization.Encoding.DER)


def client_ssl_context(pki: Pki, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A TLS client context trusting ``pki.ca`` that presents ``cert``/``key`` (none when omitted)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    if cert is not None:
        context.load_cert_chain(str(cert), str(key) if key is not None else None)
    return context
