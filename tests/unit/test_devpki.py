"""broker.dev.pki: the CONTRACT §10 layout, file modes, certificate profiles, and that OpenSSL accepts them.

The TLS rows run real handshakes over in-memory BIOs (no sockets, no threads): the same ssl module and
OpenSSL code the broker uses, with ``VERIFY_X509_STRICT`` on both sides.
"""

from __future__ import annotations

import json
import ssl
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from broker import jose
from broker.dev import pki as devpki
from broker.errors import InvalidClient
from broker.identity.spiffe import actor_from_certificate
from tests.certfactory import (
    Pki,
    client_ssl_context,
    der_of,
    make_pki,
    mint_client_cert,
    mint_untrusted_cert,
)

NOW = datetime.now(UTC).replace(microsecond=0)
AGENTS = ("expense-assistant", "travel-bot")
HUMANS = ("carol", "dave", "sam")

PUBLIC_FILES = [
    "ca.pem", "broker.pem", "backend.pem", "agents/expense-assistant.pem", "agents/travel-bot.pem",
    "idp-jwks.json",
]  # fmt: skip
PRIVATE_FILES = [
    "ca-key.pem", "broker-key.pem", "backend-key.pem",
    "agents/expense-assistant-key.pem", "agents/expense-assistant-dpop.jwk",
    "agents/travel-bot-key.pem", "agents/travel-bot-dpop.jwk",
    "humans/carol-dpop.jwk", "humans/dave-dpop.jwk", "humans/sam-dpop.jwk",
    "idp.jwk", "broker-signing.jwk",
]  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), now=NOW)


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# ---------------------------------------------------------------------------------------------- layout


def test_generate_writes_exactly_the_contract_layout_and_returns_it(tmp_path: Path) -> None:
    written = devpki.generate(tmp_path, now=NOW)
    assert files_under(tmp_path) == set(PUBLIC_FILES + PRIVATE_FILES)
    assert sorted(str(p.relative_to(tmp_path)) for p in written) == sorted(PUBLIC_FILES + PRIVATE_FILES)
    assert len(written) == len(set(written))


@pytest.mark.parametrize("name", PRIVATE_FILES)
def test_private_files_are_0600(pki: Pki, name: str) -> None:
    assert stat.S_IMODE((pki.root / name).stat().st_mode) == 0o600


@pytest.mark.parametrize("name", PUBLIC_FILES)
def test_public_files_are_0644(pki: Pki, name: str) -> None:
    assert stat.S_IMODE((pki.root / name).stat().st_mode) == 0o644


def test_custom_trust_domain_agents_and_humans(tmp_path: Path) -> None:
    devpki.generate(tmp_path, trust_domain="prod.example.com", agents=["bot-1"], humans=[], now=NOW)
    assert files_under(tmp_path) == {
        "ca.pem", "ca-key.pem", "broker.pem", "broker-key.pem", "backend.pem", "backend-key.pem",
        "agents/bot-1.pem", "agents/bot-1-key.pem", "agents/bot-1-dpop.jwk",
        "idp.jwk", "idp-jwks.json", "broker-signing.jwk",
    }  # fmt: skip
    actor = actor_from_certificate(
        der_of(tmp_path / "agents/bot-1.pem"), trust_domain="prod.example.com", now=NOW
    )
    assert str(actor) == "spiffe://prod.example.com/agents/bot-1"


def test_rerun_replaces_loose_files_and_does_not_follow_symlinks(tmp_path: Path) -> None:
    devpki.generate(tmp_path, now=NOW)
    old_key = (tmp_path / "ca-key.pem").read_bytes()
    (tmp_path / "ca-key.pem").chmod(0o644)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.txt"
    outside.write_text("untouched")
    (tmp_path / "idp.jwk").unlink()
    (tmp_path / "idp.jwk").symlink_to(outside)

    devpki.generate(tmp_path, now=NOW)

    assert stat.S_IMODE((tmp_path / "ca-key.pem").stat().st_mode) == 0o600
    assert (tmp_path / "ca-key.pem").read_bytes() != old_key
    assert not (tmp_path / "idp.jwk").is_symlink()
    assert stat.S_IMODE((tmp_path / "idp.jwk").stat().st_mode) == 0o600
    assert outside.read_text() == "untouched"
    assert files_under(tmp_path) == set(PUBLIC_FILES + PRIVATE_FILES)  # no temporary files left behind


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"trust_domain": "Example.org"}, id="uppercase-trust-domain"),
        pytest.param({"trust_domain": "example.org:443"}, id="trust-domain-with-port"),
        pytest.param({"trust_domain": ""}, id="empty-trust-domain"),
        pytest.param({"trust_domain": "spiffe://example.org"}, id="trust-domain-as-uri"),
        pytest.param({"agents": ["Travel-Bot"]}, id="uppercase-agent"),
        pytest.param({"agents": ["a/b"]}, id="agent-with-slash"),
        pytest.param({"agents": [".."]}, id="agent-dot-dot"),
        pytest.param({"agents": [""]}, id="empty-agent"),
        pytest.param({"agents": ["x y"]}, id="agent-with-space"),
        pytest.param({"agents": ["bot", "bot"]}, id="duplicate-agent"),
        pytest.param({"agents": "bot"}, id="agents-as-one-string"),
        pytest.param({"humans": ["caröl"]}, id="non-ascii-human"),
        pytest.param({"humans": ["../carol"]}, id="human-path-traversal"),
        pytest.param({"validity_days": 0}, id="zero-validity"),
    ],
)
def test_invalid_input_is_refused_before_writing(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        devpki.generate(tmp_path / "out", now=NOW, **kwargs)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- certificates


def test_ca_is_an_ordinary_self_signed_ca(pki: Pki) -> None:
    ca = load(pki.ca)
    ca.verify_directly_issued_by(ca)
    basic = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert basic.critical and basic.value.ca
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    san = ca.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)


LEAVES = ["broker.pem", "backend.pem", "agents/expense-assistant.pem", "agents/travel-bot.pem"]


@pytest.mark.parametrize("name", LEAVES)
def test_leaves_hold_one_certificate_issued_by_the_ca(pki: Pki, name: str) -> None:
    certs = x509.load_pem_x509_certificates((pki.root / name).read_bytes())
    assert len(certs) == 1
    certs[0].verify_directly_issued_by(load(pki.ca))
    basic = certs[0].extensions.get_extension_for_class(x509.BasicConstraints).value
    assert basic.ca is False
    assert certs[0].not_valid_before_utc <= NOW <= certs[0].not_valid_after_utc
    assert certs[0].not_valid_after_utc == NOW + timedelta(days=30)


@pytest.mark.parametrize("name", ["broker", "backend", "agents/expense-assistant", "agents/travel-bot"])
def test_private_key_matches_certificate(pki: Pki, name: str) -> None:
    key = devpki.load_pem_key(pki.root / f"{name}-key.pem")
    assert key.public_key() == load(pki.root / f"{name}.pem").public_key()
    assert isinstance(key.curve, ec.SECP256R1)


@pytest.mark.parametrize("service", ["broker", "backend"])
def test_service_certificates_profile(pki: Pki, service: str) -> None:
    cert = load(pki.root / f"{service}.pem")
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [f"spiffe://example.org/{service}"]


@pytest.mark.parametrize("agent", AGENTS)
def test_agent_certificates_are_svids(pki: Pki, agent: str) -> None:
    cert_path = pki.agent(agent).cert
    actor = actor_from_certificate(der_of(cert_path), trust_domain="example.org", now=NOW)
    assert str(actor) == f"spiffe://example.org/agents/{agent}" == pki.agent_id(agent)
    cert = load(cert_path)
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature
    assert not (usage.value.key_encipherment or usage.value.key_cert_sign or usage.value.crl_sign)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert len(san) == 1


# ---------------------------------------------------------------------------------------------- JWKs


JWK_FILES = [
    "idp.jwk", "broker-signing.jwk", "agents/expense-assistant-dpop.jwk", "agents/travel-bot-dpop.jwk",
    "humans/carol-dpop.jwk", "humans/dave-dpop.jwk", "humans/sam-dpop.jwk",
]  # fmt: skip


@pytest.mark.parametrize("name", JWK_FILES)
def test_private_jwks_load_as_es256_signers(pki: Pki, name: str) -> None:
    signer = jose.Signer.from_file(pki.root / name)
    jwk = json.loads((pki.root / name).read_text())
    assert (signer.alg, jwk["kty"], jwk["crv"]) == ("ES256", "EC", "P-256")
    assert signer.kid == jose.jwk_thumbprint(jwk)


def test_all_generated_keys_are_distinct(pki: Pki) -> None:
    kids = {json.loads((pki.root / name).read_text())["kid"] for name in JWK_FILES}
    assert len(kids) == len(JWK_FILES)


def test_idp_jwks_is_public_and_matches_idp_key(pki: Pki) -> None:
    jwks = json.loads(pki.idp_jwks.read_text())
    assert list(jwks) == ["keys"] and len(jwks["keys"]) == 1
    public = jwks["keys"][0]
    assert set(public) == {"kty", "crv", "x", "y", "kid", "alg", "use"}
    assert not set(public) & jose.PRIVATE_MEMBERS
    signer = jose.Signer.from_file(pki.idp_jwk)
    assert public == signer.public_jwk()
    assert (public["alg"], public["use"], public["kid"]) == ("ES256", "sig", jose.jwk_thumbprint(public))


# ---------------------------------------------------------------------------------------------- real TLS


def server_context(pki: Pki) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(str(pki.broker), str(pki.broker_key))
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> bytes:
    """Run a TLS handshake over memory BIOs; return the server's view of the client leaf (DER)."""
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="localhost")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            # TLS 1.3: the server learns of a refused client certificate only on the next read.
            client.write(b"ping")
            s_in.write(c_out.read())
            assert server.read(4) == b"ping"
            peer = server.getpeercert(binary_form=True)
            assert peer is not None
            return peer
    raise AssertionError("handshake did not finish")


@pytest.mark.parametrize("agent", AGENTS)
def test_agent_svid_completes_mtls_with_broker_cert(pki: Pki, agent: str) -> None:
    cert, key, _ = pki.agent(agent)
    peer = handshake(server_context(pki), client_ssl_context(pki, cert, key))
    assert str(actor_from_certificate(peer, trust_domain="example.org", now=NOW)) == pki.agent_id(agent)


def test_backend_cert_serves_tls_to_broker_as_client(pki: Pki) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server.load_cert_chain(str(pki.backend), str(pki.backend_key))
    server.verify_mode = ssl.CERT_REQUIRED
    server.verify_flags |= ssl.VERIFY_X509_STRICT
    peer = handshake(server, client_ssl_context(pki, pki.broker, pki.broker_key))
    assert peer == der_of(pki.broker)


# ---------------------------------------------------------------------------------------------- certfactory


def test_mint_client_cert_defaults_to_a_valid_svid(pki: Pki, tmp_path: Path) -> None:
    cert, key = mint_client_cert(pki, tmp_path, "fresh-agent")
    load(cert).verify_directly_issued_by(load(pki.ca))
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    peer = handshake(server_context(pki), client_ssl_context(pki, cert, key))
    actor = actor_from_certificate(peer, trust_domain="example.org", now=NOW)
    assert str(actor) == pki.agent_id("fresh-agent")


def test_mint_client_cert_overrides_one_field(pki: Pki, tmp_path: Path) -> None:
    cert, _ = mint_client_cert(pki, tmp_path, "evil", uris=["spiffe://evil.org/agents/evil"])
    load(cert).verify_directly_issued_by(load(pki.ca))
    with pytest.raises(InvalidClient) as caught:
        actor_from_certificate(der_of(cert), trust_domain="example.org", now=NOW)
    assert caught.value.reason == "svid_wrong_trust_domain"


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda tmp: mint_untrusted_cert(tmp, "stranger"), id="M02-other-ca"),
        pytest.param(lambda tmp: mint_untrusted_cert(tmp, "loner", self_signed=True), id="M02-self-signed"),
    ],
)
def test_untrusted_certificates_fail_the_handshake(
    pki: Pki, tmp_path: Path, make: Callable[[Path], tuple[Path, Path]]
) -> None:
    cert, key = make(tmp_path)
    with pytest.raises((ValueError, InvalidSignature)):
        load(cert).verify_directly_issued_by(load(pki.ca))
    with pytest.raises(ssl.SSLError):
        handshake(server_context(pki), client_ssl_context(pki, cert, key))
