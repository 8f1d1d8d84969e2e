"""Issuer key sources (broker.identity.jwks): JWKS parsing (J04, J25) and fetching (J06, J26, CONTRACT §4).

Fetch tests run real HTTPS servers on 127.0.0.1 with certificates from a throwaway CA made here; the client
trusts that CA through the ``ssl`` context handed to IssuerKeys. Time is the ``now`` passed in, never a sleep.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.errors import InvalidToken
from broker.identity.issuer_keys import IssuerKeys, discovery_urls
from broker.identity.jwks import KeyEntry, KeySet, alg_fits_key
from broker.identity.tokens import AccessTokenVerifier, IssuerPolicy
from broker.jose import public_key_from_jwk
from tests.tokenfactory import (
    AUDIENCE,
    ISSUER,
    NOW,
    OMIT,
    ec_jwk,
    ed25519_jwk,
    make_token,
    public_of,
    rsa_jwk,
)

KEY_A = ec_jwk("P-256", kid="a")
KEY_B = ec_jwk("P-256", kid="b")
RSA = rsa_jwk(2048, kid="rsa")
RSA_1024 = rsa_jwk(1024, kid="rsa1024")
ED = ed25519_jwk(kid="ed")
P384 = ec_jwk("P-384", kid="p384")
P521 = ec_jwk("P-521", kid="p521")

AppServer = Callable[..., Awaitable[TestServer]]


# ---------------------------------------------------------------------------------------------------------
# Throwaway CA and server certificate (DNS localhost + IP 127.0.0.1)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_test_pki(folder: Path) -> tuple[Path, Path, Path]:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("test CA"))
        .issuer_name(_name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server-key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting only the throwaway CA)."""
    ca, cert, key = _write_test_pki(tmp_path_factory.mktemp("pki"))
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(ca))
    return server, client


# ---------------------------------------------------------------------------------------------------------
# A small IdP: JWKS and metadata documents, hit counters, hostile behaviours per route


class Idp:
    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.jwks: dict[str, Any] = {"keys": [public_of(KEY_A)]}
        self.routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]] = {}
        self.never = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.hits[request.path] += 1
        handler = self.routes.get(request.path)
        if handler is not None:
            return await handler(request)
        if request.path == "/jwks":
            return web.json_response(self.jwks)
        raise web.HTTPNotFound

    def serve_json(self, path: str, document: Any) -> None:
        async def handler(_: web.Request) -> web.StreamResponse:
            return web.json_response(document)

        self.routes[path] = handler


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def idp(
    aiohttp_server: AppServer, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> tuple[Idp, TestServer]:
    state = Idp()
    server = await aiohttp_server(state.app(), ssl=tls[0])
    return state, server


def _url(server: TestServer, path: str, host: str = "127.0.0.1") -> str:
    return f"https://{host}:{server.port}{path}"


def _verifier(keys: IssuerKeys) -> AccessTokenVerifier:
    return AccessTokenVerifier([(IssuerPolicy(keys.issuer, ("ES256", "RS256", "EdDSA"), AUDIENCE), keys)])


async def _refusal(verifier: AccessTokenVerifier, token: str, now: float) -> str:
    with pytest.raises(InvalidToken) as caught:
        await verifier.verify(token, now=now)
    return caught.value.reason


# ---------------------------------------------------------------------------------------------------------
# Pure: KeySet and alg_fits_key


def _jwk(base: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return public_of(base, **extra)


@pytest.mark.parametrize(
    ("member", "reason"),
    [
        pytest.param({"kty": "oct", "kid": "k", "k": "c2VjcmV0"}, "kty_unsupported", id="J25-oct"),
        pytest.param(_jwk(KEY_A, use="enc"), "use_not_sig", id="J25-use-enc"),
        pytest.param(_jwk(KEY_A, key_ops=["encrypt"]), "key_ops_without_verify", id="J25-key-ops-encrypt"),
        pytest.param(_jwk(KEY_A, key_ops="verify"), "key_ops_without_verify", id="J25-key-ops-not-list"),
        pytest.param(_jwk(RSA_1024), "invalid_key", id="J25-rsa-1024"),
        pytest.param(_jwk(P521), "curve_unsupported", id="J25-p521"),
        pytest.param(_jwk(KEY_A, crv="secp256k1"), "curve_unsupported", id="J25-secp256k1"),
        pytest.param({"kty": "OKP", "crv": "X25519", "x": "AAAA"}, "curve_unsupported", id="J25-x25519"),
        pytest.param({**KEY_A}, "private_members", id="private-d-published"),
        pytest.param(_jwk(KEY_A, alg="HS256"), "alg_unsupported", id="J03-alg-hs256-on-ec"),
        pytest.param(_jwk(KEY_A, alg="ES384"), "alg_unsupported", id="J04-alg-es384-on-p256"),
        pytest.param(_jwk(RSA, alg="RS512"), "alg_unsupported", id="alg-rs512"),
        pytest.param(_jwk(KEY_A, kid=5), "kid_not_string", id="kid-int"),
        pytest.param(_jwk(KEY_A, x="AAAA"), "invalid_key", id="ec-short-coordinate"),
        pytest.param(_jwk(KEY_A, y=_jwk(KEY_B)["y"]), "invalid_key", id="ec-point-not-on-curve"),
        pytest.param({"kty": "XYZ"}, "kty_unsupported", id="kty-unknown"),
        pytest.param(["not", "an", "object"], "not_an_object", id="not-object"),
    ],
)
def test_unusable_jwks_members_are_skipped(member: Any, reason: str) -> None:
    keys = KeySet.from_jwks({"keys": [member, public_of(KEY_B)]})
    assert [e.kid for e in keys.entries] == ["b"]
    assert len(keys.skipped) == 1 and reason in keys.skipped[0]


@pytest.mark.parametrize(
    "member",
    [
        pytest.param(_jwk(KEY_A, use="sig", key_ops=["verify"]), id="use-sig-verify"),
        pytest.param(_jwk(KEY_A, alg="ES256", x5c=["MIIB"]), id="alg-es256-x5c-ignored"),
        pytest.param(_jwk(RSA, alg=OMIT), id="rsa-no-alg"),
        pytest.param(_jwk(ED), id="ed25519"),
        pytest.param(_jwk(P384), id="p384"),
    ],
)
def test_usable_jwks_members_are_kept(member: dict[str, Any]) -> None:
    assert len(KeySet.from_jwks({"keys": [member]}).entries) == 1


@pytest.mark.parametrize(
    "document",
    [pytest.param([], id="array"), pytest.param({}, id="no-keys"), pytest.param({"keys": {}}, id="obj")],
)
def test_jwks_document_shape(document: Any) -> None:
    with pytest.raises(ValueError):
        KeySet.from_jwks(document)


def _entry(jwk: dict[str, Any], alg: str | None = None) -> KeyEntry:
    crv = jwk.get("crv") if jwk["kty"] != "RSA" else None
    return KeyEntry(jwk.get("kid"), public_key_from_jwk(jwk), alg, jwk["kty"], crv)


@pytest.mark.parametrize(
    ("alg", "entry", "fits"),
    [
        pytest.param("ES256", _entry(KEY_A), True, id="ES256-P256"),
        pytest.param("ES384", _entry(P384), True, id="ES384-P384"),
        pytest.param("EdDSA", _entry(ED), True, id="EdDSA-Ed25519"),
        pytest.param("RS256", _entry(RSA), True, id="RS256-RSA"),
        pytest.param("PS256", _entry(RSA), True, id="PS256-RSA"),
        pytest.param("ES384", _entry(KEY_A), False, id="J04-ES384-P256"),
        pytest.param("ES256", _entry(RSA), False, id="J04-ES256-RSA"),
        pytest.param("RS256", _entry(KEY_A), False, id="J04-RS256-EC"),
        pytest.param("EdDSA", _entry(KEY_A), False, id="J04-EdDSA-EC"),
        pytest.param("PS256", _entry(RSA, "RS256"), False, id="J04-PS256-jwk-alg-RS256"),
        pytest.param("RS256", _entry(RSA, "RS256"), True, id="RS256-jwk-alg-RS256"),
        pytest.param("HS256", _entry(RSA), False, id="HS256"),
        pytest.param("none", _entry(KEY_A), False, id="none"),
    ],
)
def test_alg_fits_key(alg: str, entry: KeyEntry, fits: bool) -> None:
    assert alg_fits_key(alg, entry) is fits


def test_same_kid_different_types_are_both_kept() -> None:
    keys = KeySet.from_jwks({"keys": [_jwk(KEY_A, kid="x"), _jwk(RSA, kid="x")]})
    assert {e.kty for e in keys.find("x")} == {"EC", "RSA"}
    assert keys.find(None) == ()  # two keys: an absent kid is ambiguous


@pytest.mark.parametrize(
    ("issuer", "oidc", "oauth"),
    [
        pytest.param(
            "https://idp.example.org",
            "https://idp.example.org/.well-known/openid-configuration",
            "https://idp.example.org/.well-known/oauth-authorization-server",
            id="no-path",
        ),
        pytest.param(
            "https://idp.example.org/realms/acme/",
            "https://idp.example.org/realms/acme/.well-known/openid-configuration",
            "https://idp.example.org/.well-known/oauth-authorization-server/realms/acme",
            id="path",
        ),
    ],
)
def test_discovery_urls(issuer: str, oidc: str, oauth: str) -> None:
    assert discovery_urls(issuer) == (oidc, oauth)


# ---------------------------------------------------------------------------------------------------------
# Static sources


def test_jwks_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [public_of(KEY_A), _jwk(KEY_B, use="enc")]}))
    keys = IssuerKeys(ISSUER, jwks_file=path)
    assert keys.loaded and [e.kid for e in keys.current.entries] == ["a"]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(None, id="missing"),
        pytest.param(b"{not json", id="not-json"),
        pytest.param(b'{"keys":[],"keys":[]}', id="duplicate-member"),
        pytest.param(b'{"keys":[{"kty":"oct","k":"AAAA"}]}', id="no-usable-key"),
        pytest.param(b"[]", id="not-jwks"),
    ],
)
def test_bad_jwks_file_names_the_path(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "issuer-jwks.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=r"issuer-jwks\.json"):
        IssuerKeys(ISSUER, jwks_file=path)


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({}, id="no-source"),
        pytest.param({"jwks_url": "https://idp.example.org/jwks", "discovery": True}, id="two-sources"),
        pytest.param({"jwks_url": "http://idp.example.org/jwks"}, id="J26-http-jwks-url"),
        pytest.param({"jwks_url": "ftp://idp.example.org/jwks"}, id="ftp"),
        pytest.param({"jwks_url": "https:///jwks"}, id="no-host"),
    ],
)
def test_issuer_keys_refuses_bad_sources(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        IssuerKeys(ISSUER, **kwargs)


def test_inline_jwks_without_usable_keys_is_refused() -> None:
    with pytest.raises(ValueError, match="no usable verification key"):
        IssuerKeys(ISSUER, jwks={"keys": [_jwk(KEY_A, use="enc")]})


def test_discovery_needs_an_https_issuer() -> None:
    with pytest.raises(ValueError):
        IssuerKeys("http://idp.example.org", discovery=True)
    IssuerKeys("http://idp.example.org", discovery=True, allow_insecure_http=True)  # explicit opt-in only


# ---------------------------------------------------------------------------------------------------------
# Fetching over real HTTPS


def _url_keys(
    server: TestServer, client_tls: ssl.SSLContext, session: aiohttp.ClientSession, **kw: Any
) -> IssuerKeys:
    return IssuerKeys(ISSUER, jwks_url=_url(server, "/jwks"), session=session, ssl=client_tls, **kw)


async def test_jwks_url_fetch_and_verify(idp: tuple[Idp, TestServer], tls: Any, session: Any) -> None:
    state, server = idp
    keys = _url_keys(server, tls[1], session)
    assert not keys.loaded
    await keys.start(now=NOW)
    assert keys.loaded and state.hits["/jwks"] == 1
    assert (await _verifier(keys).verify(make_token(KEY_A), now=NOW)).sub == "alice"
    assert state.hits["/jwks"] == 1


async def test_server_certificate_is_verified(idp: tuple[Idp, TestServer], session: Any) -> None:
    """J26: without the private CA (default trust store) the TLS handshake fails: no keys, fail closed."""
    _, server = idp
    keys = IssuerKeys(ISSUER, jwks_url=_url(server, "/jwks"), session=session)
    await keys.start(now=NOW)
    assert not keys.loaded
    assert await _refusal(_verifier(keys), make_token(KEY_A), NOW) == "token_jwks_unavailable"


@pytest.mark.parametrize("metadata_path", ["oidc", "rfc8414"])
async def test_discovery(idp: tuple[Idp, TestServer], tls: Any, session: Any, metadata_path: str) -> None:
    state, server = idp
    issuer = _url(server, "/realms/acme")
    oidc, oauth = discovery_urls(issuer)
    path = (oidc if metadata_path == "oidc" else oauth).split(str(server.port), 1)[1]
    state.serve_json(path, {"issuer": issuer, "jwks_uri": _url(server, "/jwks")})
    keys = IssuerKeys(issuer, discovery=True, session=session, ssl=tls[1])
    await keys.start(now=NOW)
    token = make_token(KEY_A, claims={"iss": issuer})
    assert (await _verifier(keys).verify(token, now=NOW)).iss == issuer
    assert state.hits["/jwks"] == 1


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param(
            lambda issuer, jwks: {"issuer": issuer + "/", "jwks_uri": jwks}, id="issuer-trailing-slash"
        ),
        pytest.param(
            lambda issuer, jwks: {"issuer": "https://evil.example", "jwks_uri": jwks}, id="other-issuer"
        ),
        pytest.param(lambda issuer, jwks: {"issuer": issuer}, id="no-jwks-uri"),
        pytest.param(
            lambda issuer, jwks: {"issuer": issuer, "jwks_uri": jwks.replace("https:", "http:")},
            id="J26-http-jwks-uri",
        ),
        pytest.param(lambda issuer, jwks: [issuer, jwks], id="not-object"),
    ],
)
async def test_bad_discovery_fails_closed(
    idp: tuple[Idp, TestServer], tls: Any, session: Any, metadata: Callable[[str, str], Any]
) -> None:
    state, server = idp
    issuer = _url(server, "")
    state.serve_json("/.well-known/openid-configuration", metadata(issuer, _url(server, "/jwks")))
    keys = IssuerKeys(issuer, discovery=True, session=session, ssl=tls[1])
    await keys.start(now=NOW)
    assert not keys.loaded and state.hits["/jwks"] == 0
    token = make_token(KEY_A, claims={"iss": issuer})
    assert await _refusal(_verifier(keys), token, NOW) == "token_jwks_unavailable"


async def test_unknown_kid_flood_fetches_once(idp: tuple[Idp, TestServer], tls: Any, session: Any) -> None:
    """J06: 50 concurrent unknown kids share ONE refetch; more unknown kids within the cooldown: none."""
    state, server = idp
    keys = _url_keys(server, tls[1], session)
    await keys.start(now=NOW)
    verifier = _verifier(keys)
    flood = [make_token(KEY_A, header={"kid": f"random-{i}"}) for i in range(50)]
    reasons = await asyncio.gather(*(_refusal(verifier, t, NOW + 1) for t in flood))
    assert set(reasons) == {"token_unknown_kid"}
    assert state.hits["/jwks"] == 2  # the start fetch + exactly one refetch
    assert (
        await _refusal(verifier, make_token(KEY_A, header={"kid": "another"}), NOW + 29)
        == "token_unknown_kid"
    )
    assert state.hits["/jwks"] == 2  # within the 30 s cooldown: no fetch
    await verifier.verify(make_token(KEY_A), now=NOW + 29)  # known kids keep working
    assert (
        await _refusal(verifier, make_token(KEY_A, header={"kid": "later"}), NOW + 31) == "token_unknown_kid"
    )
    assert state.hits["/jwks"] == 3  # cooldown over: one more
    await keys.close()


async def test_rotated_key_is_found_by_one_refetch(
    idp: tuple[Idp, TestServer], tls: Any, session: Any
) -> None:
    state, server = idp
    keys = _url_keys(server, tls[1], session)
    await keys.start(now=NOW)
    state.jwks = {"keys": [public_of(KEY_A), public_of(KEY_B)]}
    tokens = [make_token(KEY_B, claims={"jti": str(i)}) for i in range(10)]
    results = await asyncio.gather(*(_verifier(keys).verify(t, now=NOW + 5) for t in tokens))
    assert {r.sub for r in results} == {"alice"}
    assert state.hits["/jwks"] == 2


async def test_stale_keys_refresh_in_background(idp: tuple[Idp, TestServer], tls: Any, session: Any) -> None:
    state, server = idp
    keys = _url_keys(server, tls[1], session, max_age=300)
    await keys.start(now=NOW)
    verifier = _verifier(keys)
    state.jwks = {"keys": [public_of(KEY_B)]}  # rotation: KEY_A withdrawn
    await verifier.verify(make_token(KEY_A, claims={"jti": "1"}), now=NOW + 299)
    assert keys.refreshing is None and state.hits["/jwks"] == 1  # not stale yet
    # Stale: the request is served from the current keys while one refresh runs.
    await verifier.verify(make_token(KEY_A, claims={"jti": "2"}), now=NOW + 300)
    refreshing = keys.refreshing
    assert refreshing is not None
    assert await refreshing is True
    assert state.hits["/jwks"] == 2
    assert await _refusal(verifier, make_token(KEY_A, claims={"jti": "3"}), NOW + 301) == "token_unknown_kid"
    await verifier.verify(make_token(KEY_B), now=NOW + 301)


@pytest.mark.parametrize(
    "outage",
    [
        pytest.param("down", id="server-down"),
        pytest.param("http-500", id="http-500"),
        pytest.param("no-usable-key", id="only-unusable-keys"),
        pytest.param("not-json", id="not-json"),
    ],
)
async def test_failed_refresh_keeps_last_known_good(
    idp: tuple[Idp, TestServer], tls: Any, session: Any, outage: str
) -> None:
    """J26: a failed fetch never empties the key set."""
    state, server = idp
    keys = _url_keys(server, tls[1], session)
    await keys.start(now=NOW)
    if outage == "down":
        await server.close()
    elif outage == "http-500":
        state.routes["/jwks"] = _respond(web.Response(status=500))
    elif outage == "no-usable-key":
        state.jwks = {"keys": [{"kty": "oct", "kid": "a", "k": "AAAA"}]}
    else:
        state.routes["/jwks"] = _respond(web.Response(body=b"<html>", content_type="text/html"))
    later = NOW + 3600  # stale and past every cooldown
    assert await keys.refresh(now=later) is False
    assert keys.loaded and [e.kid for e in keys.current.entries] == ["a"]
    assert (await _verifier(keys).verify(make_token(KEY_A, now=later), now=later)).sub == "alice"


def _respond(response: web.StreamResponse) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(_: web.Request) -> web.StreamResponse:
        return response

    return handler


async def test_never_fetched_and_down_fails_closed(
    idp: tuple[Idp, TestServer], tls: Any, session: Any
) -> None:
    _, server = idp
    await server.close()
    keys = _url_keys(server, tls[1], session)
    await keys.start(now=NOW)
    assert not keys.loaded
    verifier = _verifier(keys)
    assert await _refusal(verifier, make_token(KEY_A), NOW + 1) == "token_jwks_unavailable"
    assert (
        await _refusal(verifier, make_token(KEY_A, header={"kid": OMIT}), NOW + 1) == "token_jwks_unavailable"
    )
    assert keys.fetch_count == 1  # within the cooldown a down IdP is not hammered
    assert await _refusal(verifier, make_token(KEY_A), NOW + 31) == "token_jwks_unavailable"
    assert keys.fetch_count == 2


async def test_retry_after_failed_first_fetch(idp: tuple[Idp, TestServer], tls: Any, session: Any) -> None:
    state, server = idp
    state.routes["/jwks"] = _respond(web.Response(status=503))
    keys = _url_keys(server, tls[1], session)
    await keys.start(now=NOW)
    del state.routes["/jwks"]
    verifier = _verifier(keys)
    assert await _refusal(verifier, make_token(KEY_A), NOW + 10) == "token_jwks_unavailable"
    assert (await verifier.verify(make_token(KEY_A), now=NOW + 30)).sub == "alice"


async def _huge_streamed(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.content_type = "application/json"
    await response.prepare(request)
    try:
        await response.write(b'{"keys":[' + b" " * 65536)
        for _ in range(160):  # 10 MB more, unless the client hangs up first
            await response.write(b" " * 65536)
        await response.write_eof(b"]}")
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass  # the client stopped reading at its cap: that is the point of the test
    return response


@pytest.mark.parametrize(
    "handler",
    [
        pytest.param(
            _respond(web.Response(body=b" " * 10_000_000, content_type="application/json")), id="10MB"
        ),
        pytest.param(_huge_streamed, id="10MB-chunked"),
        pytest.param(
            _respond(web.json_response({"keys": [public_of(KEY_A)], "pad": "x" * 65536})),
            id="just-over-64KiB",
        ),
    ],
)
async def test_oversized_jwks_is_refused(
    idp: tuple[Idp, TestServer], tls: Any, session: Any, handler: Any
) -> None:
    state, server = idp
    state.routes["/jwks"] = handler
    keys = _url_keys(server, tls[1], session)
    await keys.start(now=NOW)
    assert not keys.loaded


async def test_redirect_to_another_host_is_not_followed(
    idp: tuple[Idp, TestServer], tls: Any, session: Any
) -> None:
    state, server = idp
    location = _url(server, "/elsewhere", host="localhost")
    state.routes["/jwks"] = _respond(web.Response(status=302, headers={"Location": location}))
    state.routes["/elsewhere"] = _respond(web.json_response(state.jwks))
    keys = _url_keys(server, tls[1], session)
    await keys.start(now=NOW)
    assert not keys.loaded
    assert state.hits["/jwks"] == 1 and state.hits["/elsewhere"] == 0


async def test_slow_server_times_out(idp: tuple[Idp, TestServer], tls: Any, session: Any) -> None:
    state, server = idp

    async def hang(_: web.Request) -> web.StreamResponse:
        await state.never.wait()  # never set: the server never answers
        raise AssertionError("unreachable")

    state.routes["/jwks"] = hang
    keys = _url_keys(server, tls[1], session, timeout=0.2)
    await keys.start(now=NOW)
    assert not keys.loaded and keys.fetch_count == 1


async def test_keys_skipped_in_fetched_jwks(idp: tuple[Idp, TestServer], tls: Any, session: Any) -> None:
    """J25 end to end: a token signed by a key the JWKS offers for encryption (or too weak) is refused."""
    state, server = idp
    enc_key = ec_jwk("P-256", kid="enc")
    state.jwks = {"keys": [public_of(KEY_A), public_of(enc_key, use="enc"), public_of(RSA_1024)]}
    keys = _url_keys(server, tls[1], session)
    await keys.start(now=NOW)
    verifier = _verifier(keys)
    assert await _refusal(verifier, make_token(enc_key), NOW) == "token_unknown_kid"
    assert await _refusal(verifier, make_token(RSA_1024), NOW + 60) == "token_unknown_kid"
    assert (await verifier.verify(make_token(KEY_A), now=NOW)).sub == "alice"


async def test_close_cancels_an_inflight_fetch(idp: tuple[Idp, TestServer], tls: Any, session: Any) -> None:
    state, server = idp
    keys = _url_keys(server, tls[1], session)
    await keys.start(now=NOW)

    async def hang(_: web.Request) -> web.StreamResponse:
        await state.never.wait()
        raise AssertionError("unreachable")

    state.routes["/jwks"] = hang
    await keys.key_for("a", NOW + 301)  # stale: starts a background refresh that will hang
    assert keys.refreshing is not None
    await keys.close()
    assert keys.refreshing is None and keys.loaded
