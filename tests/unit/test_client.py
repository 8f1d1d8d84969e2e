"""The agent-side client: DPoP proofs the broker's verifier accepts, and AgentClient on real sockets.

Proofs are judged by the server-side code itself (``verify_proof``, ``check_binding``); the HTTP tests run a
small aiohttp server on 127.0.0.1 that parses ``Authorization``/``DPoP`` and verifies every proof with the same
functions, demanding a nonce (RFC 9449 §9) when the row asks for it.
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from multidict import CIMultiDict

from broker.dev.idp import jkt_of, mint_access_token, read_jwk
from broker.errors import BrokerError, InvalidDpopProof
from broker.identity.dpop import (
    DpopPolicy,
    ath_for,
    check_binding,
    parse_authorization,
    single_dpop_header,
    verify_proof,
)
from broker.identity.htu import expected_htu
from broker.identity.issuer_keys import IssuerKeys
from broker.identity.tokens import AccessTokenVerifier, IssuerPolicy
from broker.jose import b64url_decode, generate_ec_jwk, private_jwk
from broker.sdk.agent import AgentClient, ClientReply, DpopSigner, challenge_error, htu_of
from tests.certfactory import Pki

NOW = 1_800_000_000
URL = "https://broker.example.org/v1/tools/approveExpense"
POLICY = DpopPolicy(algorithms=("ES256", "ES384", "EdDSA"))
AGENT_ID = "spiffe://example.org/agents/expense-assistant"

KEYS: dict[str, Callable[[], dict[str, str]]] = {
    "ES256": generate_ec_jwk,
    "ES384": lambda: private_jwk(ec.generate_private_key(ec.SECP384R1())),
    "EdDSA": lambda: private_jwk(ed25519.Ed25519PrivateKey.generate()),
}


def decode(jws: str, index: int) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(b64url_decode(jws.split(".")[index]))
    return value


def verify(proof: str, **overrides: Any) -> Any:
    arguments: dict[str, Any] = {
        "policy": POLICY,
        "method": "POST",
        "htu": URL,
        "access_token": None,
        "now": NOW,
        **overrides,
    }
    return verify_proof(proof, **arguments)


# --- DpopSigner -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", sorted(KEYS))
def test_proof_passes_verify_proof(alg: str) -> None:
    signer = DpopSigner(KEYS[alg]())
    proof = signer.proof("POST", URL, now=NOW + 0.7)
    verified = verify(proof)
    assert verified.jkt == signer.jkt and verified.iat == NOW
    header, claims = decode(proof, 0), decode(proof, 1)
    assert header == {"typ": "dpop+jwt", "alg": alg, "jwk": signer.public_jwk}
    assert "d" not in header["jwk"]  # RFC 9449 §4.2: the public key only
    assert set(claims) == {"jti", "htm", "htu", "iat"}
    assert len(b64url_decode(claims["jti"])) >= 16


@pytest.mark.parametrize("alg", sorted(KEYS))
def test_ath_binds_the_proof_to_a_token_minted_for_the_signer(pki: Pki, alg: str) -> None:
    signer = DpopSigner(KEYS[alg]())
    token = mint_access_token(read_jwk(pki.idp_jwk), sub="alice", now=NOW, cnf_jkt=signer.jkt)
    proof = signer.proof("POST", URL, access_token=token, now=NOW)
    assert decode(proof, 1)["ath"] == ath_for(token)
    verified = verify(proof, access_token=token)
    check_binding(verified, decode(token, 1)["cnf"]["jkt"])


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        ("token-bound-to-another-key", "dpop_jkt_mismatch"),
        ("proof-made-for-another-token", "dpop_ath_mismatch"),
        ("proof-without-ath", "dpop_ath_missing"),
        ("other-method", "dpop_htm_mismatch"),
        ("other-url", "dpop_htu_mismatch"),
        ("stale", "dpop_iat_stale"),
    ],
    ids=lambda value: value,
)
def test_the_verifier_refuses_a_proof_that_does_not_fit(pki: Pki, break_it: str, reason: str) -> None:
    idp = read_jwk(pki.idp_jwk)
    signer = DpopSigner(generate_ec_jwk())
    bound_to = DpopSigner(generate_ec_jwk()).jkt if break_it == "token-bound-to-another-key" else signer.jkt
    token = mint_access_token(idp, sub="alice", now=NOW, cnf_jkt=bound_to)
    other_token = mint_access_token(idp, sub="alice", now=NOW, cnf_jkt=signer.jkt)
    proof = signer.proof(
        "GET" if break_it == "other-method" else "POST",
        URL + "x" if break_it == "other-url" else URL,
        access_token={"proof-made-for-another-token": other_token, "proof-without-ath": None}.get(
            break_it, token
        ),
        now=NOW - 3600 if break_it == "stale" else NOW,
    )
    with pytest.raises(InvalidDpopProof) as refused:
        check_binding(verify(proof, access_token=token), bound_to)
    assert refused.value.reason == reason


@pytest.mark.parametrize(
    ("url", "htu"),
    [
        (URL, URL),
        (URL + "?x=1&y=2", URL),
        (URL + "#frag", URL),
        (URL + "?q=a#f?g", URL),
        ("https://broker.example.org/v1/tools?next=/a#b?c", "https://broker.example.org/v1/tools"),
    ],
    ids=["plain", "query", "fragment", "query-and-fragment", "question-mark-in-fragment"],
)
def test_htu_drops_query_and_fragment(url: str, htu: str) -> None:
    assert htu_of(url) == htu
    proof = DpopSigner(generate_ec_jwk()).proof("GET", url, now=NOW)
    assert decode(proof, 1)["htu"] == htu
    verify(proof, method="GET", htu=htu)


@pytest.mark.parametrize(
    "nonce", ["n-1", 'with "quotes" and \\', "ünïcode"], ids=["plain", "escapes", "utf8"]
)
def test_nonce_is_carried_and_accepted(nonce: str) -> None:
    proof = DpopSigner(generate_ec_jwk()).proof("POST", URL, nonce=nonce, now=NOW)
    assert decode(proof, 1)["nonce"] == nonce
    policy = DpopPolicy(algorithms=("ES256",), require_nonce=True)
    assert verify(proof, policy=policy, nonce_check=lambda n, jkt: n == nonce).nonce == nonce


def test_every_proof_has_a_fresh_jti() -> None:
    signer = DpopSigner(generate_ec_jwk())
    jtis = {decode(signer.proof("POST", URL, now=NOW), 1)["jti"] for _ in range(200)}
    assert len(jtis) == 200


def test_jkt_is_the_rfc7638_thumbprint(pki: Pki) -> None:
    jwk = read_jwk(pki.agent("expense-assistant").dpop_jwk)
    assert DpopSigner(jwk).jkt == jkt_of(jwk) == jwk["kid"]


@pytest.mark.parametrize(
    "jwk",
    [
        {k: v for k, v in generate_ec_jwk().items() if k != "d"},
        {**generate_ec_jwk(), "alg": "ES384"},
        {**generate_ec_jwk(), "crv": "P-999"},
        {"kty": "oct", "k": "c2VjcmV0", "d": "x"},
    ],
    ids=["public-only", "alg-does-not-fit-key", "unknown-curve", "symmetric"],
)
def test_unusable_keys_are_refused(jwk: dict[str, str]) -> None:
    with pytest.raises(ValueError, match=r"private JWK|not usable"):
        DpopSigner(jwk)


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (
            ['DPoP error="use_dpop_nonce", error_description="Resource server requires nonce"'],
            "use_dpop_nonce",
        ),
        (['DPoP algs="ES256 EdDSA", error="invalid_dpop_proof"'], "invalid_dpop_proof"),
        (["Bearer error=invalid_token"], "invalid_token"),
        (['DPoP ERROR="use_dpop_nonce"'], "use_dpop_nonce"),
        (['DPoP error_description="error=\\"use_dpop_nonce\\"", error="invalid_token"'], "invalid_token"),
        (['Bearer realm="x"', 'DPoP error="use_dpop_nonce"'], "use_dpop_nonce"),
        (['DPoP realm="x"'], None),
        ([], None),
    ],
    ids=[
        "nonce",
        "after-other-param",
        "token-form",
        "case",
        "quoted-decoy",
        "second-challenge",
        "none",
        "empty",
    ],
)
def test_challenge_error(values: list[str], error: str | None) -> None:
    assert challenge_error(values) == error


# --- tokens from the IdP verify as the broker verifies them ---------------------------------------------


@pytest.mark.parametrize(
    ("act_sub", "bound"),
    [(AGENT_ID, True), (None, True), (None, False)],
    ids=["agent-for-user", "human-acting-directly", "unbound"],
)
async def test_minted_tokens_verify_with_the_broker_verifier(
    pki: Pki, act_sub: str | None, bound: bool
) -> None:
    signer = DpopSigner(generate_ec_jwk())
    token = mint_access_token(
        read_jwk(pki.idp_jwk),
        sub="alice",
        now=NOW,
        act_sub=act_sub,
        cnf_jkt=signer.jkt if bound else None,
        claims={"groups": ["finance-managers"], "department": "42", "approval_limit": 20000},
    )
    keys = IssuerKeys("https://idp.example.org", jwks_file=pki.idp_jwks)
    policy = IssuerPolicy("https://idp.example.org", ("ES256",), "https://broker.example.org")
    verified = await AccessTokenVerifier([(policy, keys)]).verify(token, now=NOW + 10)
    assert verified.sub == "alice"
    assert verified.act_sub == act_sub and verified.client_id == act_sub
    assert verified.cnf_jkt == (signer.jkt if bound else None)
    assert verified.claims["groups"] == ["finance-managers"] and verified.claims["approval_limit"] == 20000


# --- AgentClient against a real server ------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    raw_path: str
    headers: CIMultiDict[str]
    body: bytes
    proof_claims: dict[str, Any] | None


@dataclass
class ProofCheckingServer:
    """Verifies Authorization + DPoP like the broker's identity stage and records every request.

    ``require_nonce``: proofs must carry ``nonce`` (refusals send ``DPoP-Nonce: <nonce>``);
    ``accept_nonce``: False makes every nonce wrong; ``send_nonce_header``: False omits the header;
    ``rotate_to``: a new nonce announced on successful answers (RFC 9449 §8.2);
    ``refuse``: a fixed refusal for every request.
    """

    base_url: str = ""
    require_nonce: bool = False
    nonce: str = "nonce-1"
    accept_nonce: bool = True
    send_nonce_header: bool = True
    rotate_to: str | None = None
    refuse: BrokerError | None = None
    seen: list[Seen] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        proofs = request.headers.getall("DPoP", [])
        claims = decode(proofs[0], 1) if len(proofs) == 1 else None
        self.seen.append(Seen(request.method, request.raw_path, CIMultiDict(request.headers), body, claims))
        try:
            if self.refuse is not None:
                raise self.refuse
            _, token = parse_authorization(request.headers.getall("Authorization", []))
            verify_proof(
                single_dpop_header(proofs),
                policy=DpopPolicy(algorithms=("ES256",), require_nonce=self.require_nonce),
                method=request.method,
                htu=expected_htu(self.base_url, request.raw_path),
                access_token=token,
                now=time.time(),
                nonce_check=lambda nonce, jkt: self.accept_nonce and nonce == self.nonce,
                nonce_issue=lambda jkt: self.nonce,
            )
        except BrokerError as exc:
            headers = dict(exc.headers) if self.send_nonce_header else {}
            headers["WWW-Authenticate"] = f'DPoP error="{exc.code}", error_description="{exc.description}"'
            return web.json_response(exc.body("req-1"), status=exc.status, headers=headers)
        headers = {}
        if self.rotate_to is not None:
            self.nonce = self.rotate_to
            headers["DPoP-Nonce"] = self.rotate_to
        return web.json_response({"path": request.raw_path}, headers=headers)


@pytest.fixture
async def server(aiohttp_server: Callable[..., Any]) -> ProofCheckingServer:
    checking = ProofCheckingServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", checking.handle)
    test_server: TestServer = await aiohttp_server(app)
    checking.base_url = str(test_server.make_url("")).rstrip("/")
    return checking


@pytest.fixture
async def client(server: ProofCheckingServer, pki: Pki) -> AsyncIterator[AgentClient]:
    async with AgentClient(
        server.base_url,
        ca=pki.ca,
        cert=None,
        key=None,
        dpop_jwk=generate_ec_jwk(),
        access_token="header.payload.signature",
    ) as agent:
        yield agent


async def test_nonce_retry_sends_exactly_two_requests(
    server: ProofCheckingServer, client: AgentClient
) -> None:
    server.require_nonce = True
    reply = await client.list_tools()
    assert reply.status == 200
    assert len(server.seen) == 2
    first, second = server.seen
    assert first.proof_claims is not None and "nonce" not in first.proof_claims
    assert second.proof_claims is not None and second.proof_claims["nonce"] == "nonce-1"
    assert first.proof_claims["jti"] != second.proof_claims["jti"]  # a fresh proof, not the refused one


async def test_nonce_is_remembered(server: ProofCheckingServer, client: AgentClient) -> None:
    server.require_nonce = True
    await client.list_tools()
    server.seen.clear()
    assert (await client.list_tools()).status == 200
    assert len(server.seen) == 1 and server.seen[0].proof_claims is not None
    assert server.seen[0].proof_claims["nonce"] == "nonce-1"


async def test_nonce_announced_on_success_is_used_next(
    server: ProofCheckingServer, client: AgentClient
) -> None:
    server.require_nonce, server.rotate_to = True, "nonce-2"
    await client.list_tools()
    assert client.nonce == "nonce-2"
    server.seen.clear()
    assert (await client.list_tools()).status == 200
    assert len(server.seen) == 1 and server.seen[0].proof_claims is not None
    assert server.seen[0].proof_claims["nonce"] == "nonce-2"


@pytest.mark.parametrize(
    ("setup", "requests", "error"),
    [
        ({"require_nonce": True, "accept_nonce": False}, 2, "use_dpop_nonce"),
        ({"require_nonce": True, "send_nonce_header": False}, 1, "use_dpop_nonce"),
        ({"refuse": InvalidDpopProof("bad proof", reason="dpop_signature")}, 1, "invalid_dpop_proof"),
    ],
    ids=["retries-only-once", "no-nonce-header-no-retry", "other-401-no-retry"],
)
async def test_retry_is_bounded(
    server: ProofCheckingServer, client: AgentClient, setup: dict[str, Any], requests: int, error: str
) -> None:
    for name, value in setup.items():
        setattr(server, name, value)
    reply = await client.list_tools()
    assert (reply.status, reply.error) == (401, error)
    assert len(server.seen) == requests


async def test_callers_proof_is_sent_as_is_and_never_retried(
    server: ProofCheckingServer, client: AgentClient
) -> None:
    server.require_nonce = True
    proof = client.proof_for("GET", "/v1/tools")
    reply = await client.request("GET", "/v1/tools", headers={"dpop": proof})
    assert (reply.status, reply.error) == (401, "use_dpop_nonce")
    assert len(server.seen) == 1
    assert server.seen[0].headers.getall("DPoP") == [proof]  # the caller's replaced the generated one


async def test_requests_carry_token_and_a_proof_for_the_exact_url(
    server: ProofCheckingServer, client: AgentClient
) -> None:
    reply = await client.call_tool("listInvoices", {"department": "42"}, txn_token="txn.token.value")
    assert reply.status == 200 and reply.json() == {"path": "/v1/tools/listInvoices"}
    (seen,) = server.seen
    assert seen.headers["Authorization"] == "DPoP header.payload.signature"
    assert seen.headers["Txn-Token"] == "txn.token.value"
    assert json.loads(seen.body) == {"department": "42"}
    assert seen.proof_claims is not None
    assert seen.proof_claims["htu"] == server.base_url + "/v1/tools/listInvoices"
    assert seen.proof_claims["ath"] == ath_for("header.payload.signature")


@pytest.mark.parametrize(
    ("call", "method", "raw_path"),
    [
        (lambda c: c.list_tools(), "GET", "/v1/tools"),
        (lambda c: c.call_tool("a/b?c", {}), "POST", "/v1/tools/a%2Fb%3Fc"),
        (lambda c: c.approval("ap-1"), "GET", "/v1/approvals/ap-1"),
        (lambda c: c.decide("ap-1", "approve"), "POST", "/v1/approvals/ap-1"),
        (lambda c: c.exchange("approveExpense", {"amount": 1}), "POST", "/v1/token"),
        (lambda c: c.request("GET", "/v1/tools?verbose=1"), "GET", "/v1/tools?verbose=1"),
    ],
    ids=["list-tools", "tool-name-is-one-segment", "approval", "decide", "exchange", "query-not-in-htu"],
)
async def test_convenience_routes_verify(
    server: ProofCheckingServer,
    client: AgentClient,
    call: Callable[[AgentClient], Any],
    method: str,
    raw_path: str,
) -> None:
    reply: ClientReply = await call(client)
    assert reply.status == 200, reply.body
    (seen,) = server.seen
    assert (seen.method, seen.raw_path) == (method, raw_path)


async def test_exchange_form_follows_contract_5(server: ProofCheckingServer, client: AgentClient) -> None:
    args = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}
    await client.exchange("approveExpense", args, approval_id="ap-7")
    (seen,) = server.seen
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = {name: values[0] for name, values in parse_qs(seen.body.decode(), strict_parsing=True).items()}
    assert form == {
        "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
        "requested_token_type": "urn:ietf:params:oauth:token-type:txn_token",
        "audience": "example.org",
        "subject_token": "header.payload.signature",
        "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
        "scope": "tool:approveExpense",
        "request_details": json.dumps({"tool": "approveExpense", "arguments": args}, separators=(",", ":")),
        "approval_id": "ap-7",
    }


async def test_decide_sends_the_decision(server: ProofCheckingServer, client: AgentClient) -> None:
    await client.decide("ap-1", "deny")
    assert json.loads(server.seen[0].body) == {"decision": "deny"}


async def test_without_a_key_no_proof_is_sent(server: ProofCheckingServer, pki: Pki) -> None:
    async with AgentClient(
        server.base_url, ca=pki.ca, cert=None, key=None, dpop_jwk=None, access_token="a.b.c"
    ) as agent:
        reply = await agent.list_tools()
    assert (reply.status, reply.error) == (401, "invalid_dpop_proof")
    assert "DPoP" not in server.seen[0].headers


async def test_request_outside_async_with_is_refused(pki: Pki) -> None:
    agent = AgentClient(
        "http://127.0.0.1:9", ca=pki.ca, cert=None, key=None, dpop_jwk=None, access_token=None
    )
    with pytest.raises(RuntimeError, match="async with"):
        await agent.list_tools()


# --- from_certs over real TLS ---------------------------------------------------------------------------


@dataclass
class TlsPeerRecorder:
    peers: list[str | None] = field(default_factory=list)
    jkts: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        uris = [value for kind, value in (cert or {}).get("subjectAltName", ()) if kind == "URI"]
        self.peers.append(uris[0] if uris else None)
        _, token = parse_authorization(request.headers.getall("Authorization", []))
        verified = verify_proof(
            single_dpop_header(request.headers.getall("DPoP", [])),
            policy=POLICY,
            method=request.method,
            htu=str(request.url.with_query(None)),
            access_token=token,
            now=time.time(),
        )
        check_binding(verified, decode(token, 1)["cnf"]["jkt"])
        self.jkts.append(verified.jkt)
        return web.json_response({"ok": True})


@pytest.fixture
async def tls_server(pki: Pki) -> AsyncIterator[tuple[str, TlsPeerRecorder]]:
    recorder = TlsPeerRecorder()
    app = web.Application()
    app.router.add_get("/v1/tools", recorder.handle)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(pki.backend), str(pki.backend_key))
    context.load_verify_locations(cafile=str(pki.ca))
    context.verify_mode = ssl.CERT_OPTIONAL  # approvers come without a client certificate (§11)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    yield f"https://127.0.0.1:{runner.addresses[0][1]}", recorder
    await runner.cleanup()


@pytest.mark.parametrize(
    ("who", "peer", "key_file"),
    [
        ({"agent": "expense-assistant"}, AGENT_ID, Path("agents/expense-assistant-dpop.jwk")),
        ({"human": "carol"}, None, Path("humans/carol-dpop.jwk")),
    ],
    ids=["agent-presents-its-svid", "human-presents-no-certificate"],
)
async def test_from_certs(
    tls_server: tuple[str, TlsPeerRecorder], pki: Pki, who: dict[str, str], peer: str | None, key_file: Path
) -> None:
    url, recorder = tls_server
    dpop_jwk = read_jwk(pki.root / key_file)
    token = mint_access_token(read_jwk(pki.idp_jwk), sub="alice", now=time.time(), cnf_jkt=jkt_of(dpop_jwk))
    async with AgentClient.from_certs(url, pki.root, access_token=token, **who) as agent:
        assert agent.trust_domain == "example.org"
        reply = await agent.list_tools()
    assert reply.status == 200, reply.body
    assert recorder.peers == [peer]
    assert recorder.jkts == [jkt_of(dpop_jwk)]


@pytest.mark.parametrize(
    "who",
    [{}, {"agent": "expense-assistant", "human": "carol"}],
    ids=["neither", "both"],
)
def test_from_certs_needs_exactly_one_identity(pki: Pki, who: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        AgentClient.from_certs("https://localhost:8443", pki.root, access_token="a.b.c", **who)


def test_from_certs_names_a_missing_key(pki: Pki) -> None:
    with pytest.raises(ValueError, match=r"nobody-dpop\.jwk"):
        AgentClient.from_certs("https://localhost:8443", pki.root, human="nobody", access_token="a.b.c")
