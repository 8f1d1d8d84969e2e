"""HOSTILE §1.1–§1.3 rows that had no test named after them: J06, J17, D12, D21, M01, M06, M15, M16, M17.

Pure rows call the real verifier; the others run a real broker on real TLS (``tests/conftest.py``) and assert,
besides the refusal, what must not happen: nothing reaches the upstream, and the audit record names the reason.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from broker.config.loader import load_config
from broker.errors import InvalidToken
from broker.identity.issuer_keys import IssuerKeys
from broker.identity.tokens import AccessTokenVerifier, IssuerPolicy
from broker.server import server_ssl_context
from tests.certfactory import Pki, client_ssl_context
from tests.conftest import BrokerFactory, BrokerUnderTest, RecordingUpstream, backend_ssl_context, base_config
from tests.dpopfactory import ec_key
from tests.redisutil import redis_stores
from tests.security import rawhttp
from tests.security.support import (
    INVOICE,
    TOOL,
    admin,
    agent_tls,
    auth_lines,
    claims_of,
    main_port,
    retoken,
    x5t_s256,
)
from tests.tokenfactory import AUDIENCE, ISSUER, NOW, ec_jwk, make_token, public_of

# -- J06: unknown-kid flood ---------------------------------------------------------------------------------


@dataclass
class JwksServer:
    url: str = ""
    document: dict[str, Any] = field(default_factory=dict)
    hits: int = 0

    async def handle(self, _: web.Request) -> web.StreamResponse:
        self.hits += 1
        return web.json_response(self.document)


@pytest.fixture
async def jwks_server(pki: Pki) -> AsyncIterator[JwksServer]:
    server = JwksServer(document={"keys": [public_of(pki_idp_jwk(pki))]})
    app = web.Application()
    app.router.add_get("/jwks", server.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    ctx = backend_ssl_context(pki)
    ctx.verify_mode = ssl.CERT_NONE  # a JWKS endpoint is public: no client certificate
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    server.url = f"https://127.0.0.1:{runner.addresses[0][1]}/jwks"
    yield server
    await runner.cleanup()


def pki_idp_jwk(pki: Pki) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(pki.idp_jwk.read_text())
    return jwk


async def test_j06_unknown_kid_flood_costs_one_jwks_refetch(
    broker_factory: BrokerFactory,
    upstream: RecordingUpstream,
    jwks_server: JwksServer,
    pki: Pki,
    tmp_path: Path,
) -> None:
    """J06: 20 concurrent calls, each with a random kid, share one refetch (single-flight, 30 s cooldown)."""
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["identity"]["issuers"] = [{"issuer": ISSUER, "jwks_url": jwks_server.url, "ca": str(pki.ca)}]
    broker = await broker_factory(config)
    assert jwks_server.hits == 1  # fetched once before serving
    caller = broker.caller()
    assert (await caller.call("POST", TOOL, INVOICE)).status == 200
    flood = [retoken(caller, header={"kid": f"random-{uuid.uuid4().hex}"}) for _ in range(20)]
    replies = await asyncio.gather(*(c.call("POST", TOOL, INVOICE) for c in flood))
    assert {(r.status, r.error) for r in replies} == {(401, "invalid_token")}
    assert jwks_server.hits == 2  # the start fetch and exactly one refetch for the whole flood
    more = await retoken(caller, header={"kid": "yet-another"}).call("POST", TOOL, INVOICE)
    assert (more.status, jwks_server.hits) == (401, 2)  # within the cooldown: no fetch at all
    assert len(upstream.received) == 1
    reasons = Counter(r["reason"] for r in broker.audit_records() if r["decision"] == "deny")
    assert reasons == {"token_unknown_kid": 21}


# -- J17: expiry and not-before at the leeway boundary --------------------------------------------------------

KEY = ec_jwk("P-256", kid="k1")
LEEWAY = 30


@pytest.mark.parametrize(
    ("claims", "leeway", "refusal"),
    [
        ({"exp": NOW - (LEEWAY + 1)}, LEEWAY, "token_expired"),
        ({"exp": NOW - LEEWAY}, LEEWAY, "token_expired"),
        ({"exp": NOW - (LEEWAY - 1)}, LEEWAY, None),
        ({"exp": NOW}, LEEWAY, None),
        ({"exp": NOW}, 0, "token_expired"),
        ({"exp": NOW + 1}, 0, None),
        ({"nbf": NOW + LEEWAY}, LEEWAY, None),
        ({"nbf": NOW + LEEWAY + 1}, LEEWAY, "token_nbf"),
        ({"iat": NOW + LEEWAY + 1, "exp": NOW + 600}, LEEWAY, "token_iat_future"),
    ],
    ids=[
        "J17-exp-now-minus-leeway-plus-1-refused",
        "J17-exp-at-now-minus-leeway-refused",
        "J17-exp-now-minus-leeway-minus-1-accepted",
        "J17-exp-equals-now-accepted-within-leeway",
        "J17-exp-equals-now-refused-without-leeway",
        "J17-exp-now-plus-1-accepted-without-leeway",
        "J17-nbf-at-now-plus-leeway-accepted",
        "J17-nbf-beyond-leeway-refused",
        "J17-iat-beyond-leeway-refused",
    ],
)
async def test_j17_time_claims_at_the_leeway_boundary(
    claims: dict[str, int], leeway: int, refusal: str | None
) -> None:
    claims = {"iat": NOW - 600, **claims}
    verifier = AccessTokenVerifier(
        [
            (
                IssuerPolicy(issuer=ISSUER, algorithms=("ES256",), audience=AUDIENCE, leeway=leeway),
                IssuerKeys(ISSUER, jwks={"keys": [public_of(KEY)]}),
            )
        ]
    )
    token = make_token(KEY, claims=claims)
    if refusal is None:
        assert (await verifier.verify(token, now=NOW)).exp == claims.get("exp", NOW + 600)
    else:
        with pytest.raises(InvalidToken) as caught:
            await verifier.verify(token, now=NOW)
        assert caught.value.reason == refusal


@pytest.mark.parametrize("leeway", [-1, 61], ids=["J17-negative-leeway", "J17-leeway-over-60s"])
def test_j17_leeway_is_small_and_comes_from_config(leeway: int) -> None:
    """The leeway is one config value (identity.leeway_seconds), identical on every replica, at most 60 s."""
    with pytest.raises(ValueError, match="leeway"):
        IssuerPolicy(issuer=ISSUER, algorithms=("ES256",), audience=AUDIENCE, leeway=leeway)


# -- D12: one proof, many presentations, two replicas ----------------------------------------------------------


@pytest.mark.redis
async def test_d12_replayed_proof_is_accepted_exactly_once_across_two_replicas(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    async with redis_stores() as redis:
        config = base_config(pki, tmp_path, upstream_url=upstream.url)
        # a generous store deadline: this row proves single use, and a loaded CI machine can stall the event
        # loop past the 200 ms default (a timeout is a 503, fail closed — tested in test_rows_state.py)
        config["state"] = {
            "backend": "redis",
            "redis_url": redis.url,
            "key_prefix": redis.prefix,
            "timeout_ms": 2000,
        }
        config_b = {**config, "audit": {"file": str(tmp_path / "audit-b.jsonl"), "checkpoint_every": 5}}
        replica_a, replica_b = await broker_factory(config), await broker_factory(config_b)
        caller_a = replica_a.caller()
        caller_b = replace(caller_a, broker=replica_b)
        auth = caller_a.auth_headers("POST", TOOL)  # ONE proof, presented 20 times
        replies = await asyncio.gather(
            *(c.call("POST", TOOL, INVOICE, auth=auth) for c in [caller_a, caller_b] * 10)
        )
        assert sorted(r.status for r in replies) == [200] + [401] * 19
        assert {r.error for r in replies if r.status == 401} == {"invalid_dpop_proof"}
        again = await caller_a.call("POST", TOOL, INVOICE, auth=auth)  # and later, sequentially
        assert (again.status, again.error) == (401, "invalid_dpop_proof")
        assert len(upstream.received) == 1
        reasons = Counter(
            r["reason"]
            for b in (replica_a, replica_b)
            for r in b.audit_records()
            if r["event"] == "invocation" and r["decision"] == "deny"
        )
        assert reasons == {"dpop_replay": 20}


# -- D21: both bindings in one token ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x5t_of", "proof_key", "status", "reason"),
    [
        ("expense-assistant", "agent", 200, None),
        ("travel-bot", "agent", 401, "token_x5t_mismatch"),
        ("expense-assistant", "attacker", 401, "dpop_jkt_mismatch"),
    ],
    ids=["D21-both-hold", "D21-certificate-half-broken", "D21-dpop-half-broken"],
)
async def test_d21_token_with_jkt_and_x5t_needs_both(
    broker: BrokerUnderTest,
    upstream: RecordingUpstream,
    pki: Pki,
    x5t_of: str,
    proof_key: str,
    status: int,
    reason: str | None,
) -> None:
    caller = broker.caller()
    # the token keeps its cnf.jkt (the agent's DPoP key) and gains a certificate binding next to it
    cnf = {**claims_of(caller.token)["cnf"], "x5t#S256": x5t_s256(pki.agent(x5t_of).cert)}
    bound = retoken(caller, cnf=cnf)
    if proof_key == "attacker":
        bound = replace(bound, dpop_jwk=ec_key())  # proof signed by another key; cnf.jkt names the agent's
    reply = await bound.call("POST", TOOL, INVOICE)
    assert reply.status == status
    assert len(upstream.received) == (1 if status == 200 else 0)
    if reason is not None:
        assert broker.audit_records()[-1]["reason"] == reason


# -- M01: no client certificate ---------------------------------------------------------------------------------


async def test_m01_no_certificate_on_an_agent_route_is_invalid_client(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    """``client_cert: optional`` (humans may call the approvals API): agent routes still demand an SVID."""
    caller = replace(broker.caller(), cert=None, key=None)
    for method, path in (("POST", TOOL), ("GET", "/v1/tools"), ("POST", "/v1/token")):
        reply = await caller.call(method, path, INVOICE if method == "POST" else None)
        assert (reply.status, reply.error) == (401, "invalid_client"), path
    assert upstream.received == []
    # CONTRACT §15: refusals before identity are counted per reason and client network, not recorded one by one
    await broker.flush_noise()
    [summary] = [r for r in broker.audit_records() if r["event"] == "summary"]
    assert (summary["reason"], summary["count"], summary["decision"]) == ("svid_missing", 3, "deny")


async def test_m01_no_certificate_fails_the_handshake_when_required(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["server"]["tls"]["client_cert"] = "require"
    broker = await broker_factory(config)
    caller = replace(broker.caller(), cert=None, key=None)
    with pytest.raises((aiohttp.ClientConnectionError, ssl.SSLError)):
        await caller.call("POST", TOOL, INVOICE)
    assert (await broker.caller().call("POST", TOOL, INVOICE)).status == 200  # control: with an SVID
    assert len(upstream.received) == 1


# -- M06: revoked certificate -------------------------------------------------------------------------------------


async def test_m06_a_compromised_agent_is_cut_off_by_revoking_its_spiffe_id(
    broker: BrokerUnderTest, upstream: RecordingUpstream, pki: Pki
) -> None:
    """No CRL/OCSP is configured (SVIDs are short-lived, README): the control for a revoked SVID is revoking
    its SPIFFE ID (``act``) on every replica at once, and it takes effect on the very next call."""
    caller = broker.caller()
    assert (await caller.call("POST", TOOL, INVOICE)).status == 200
    agent = pki.agent_id("expense-assistant")
    assert (await admin(broker, "POST", "/admin/revocations", {"kind": "act", "value": agent}))[0] == 200
    reply = await caller.call("POST", TOOL, INVOICE)
    assert (reply.status, reply.error) == (401, "invalid_token")
    assert [r for r in broker.audit_records() if r["event"] != "checkpoint"][-1]["reason"] == "revoked_act"
    other = await broker.caller(agent="travel-bot").call("GET", "/v1/tools")
    assert other.status == 200  # only the revoked agent is cut off
    assert len(upstream.received) == 1


def test_m06_the_tls_layer_checks_no_revocation_lists(pki: Pki, tmp_path: Path) -> None:
    """What the README documents: Python's ssl checks no CRL unless told to, and the broker does not tell it."""
    loaded = _loaded(pki, tmp_path)
    ctx = server_ssl_context(loaded.config.server)
    assert not ctx.verify_flags & (ssl.VERIFY_CRL_CHECK_LEAF | ssl.VERIFY_CRL_CHECK_CHAIN)


def _loaded(pki: Pki, tmp_path: Path, **server: Any) -> Any:
    config = base_config(pki, tmp_path, upstream_url="https://127.0.0.1:1")
    config["server"]["tls"].update(server)
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_config(path)


# -- M15: certificate-bound token over another connection ---------------------------------------------------------


@pytest.mark.parametrize(
    ("bound_to", "present", "status", "reason"),
    [
        ("expense-assistant", "expense-assistant", 200, None),
        ("travel-bot", "expense-assistant", 401, "token_x5t_mismatch"),
        ("expense-assistant", "travel-bot", 401, "token_x5t_mismatch"),
        ("expense-assistant", None, 401, "svid_missing"),
    ],
    ids=[
        "M15-same-certificate",
        "M15-token-bound-to-another-certificate",
        "M15-stolen-token-on-another-agents-connection",
        "M15-no-certificate",
    ],
)
async def test_m15_certificate_bound_token_needs_its_certificate(
    broker_factory: BrokerFactory,
    upstream: RecordingUpstream,
    pki: Pki,
    tmp_path: Path,
    bound_to: str,
    present: str | None,
    status: int,
    reason: str | None,
) -> None:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["identity"]["proof"] = "mtls"
    broker = await broker_factory(config)
    caller = broker.caller(claims={"cnf": {"x5t#S256": x5t_s256(pki.agent(bound_to).cert)}})
    if present is None:
        caller = replace(caller, cert=None, key=None)
    elif present != "expense-assistant":
        files = pki.agent(present)
        caller = replace(caller, cert=files.cert, key=files.key)
    reply = await caller.call("POST", TOOL, INVOICE, auth={"Authorization": f"Bearer {caller.token}"})
    assert reply.status == status
    assert len(upstream.received) == (1 if status == 200 else 0)
    if reason is not None:
        await broker.flush_noise()  # without a certificate: a summary record (CONTRACT §15)
        decided = [r for r in broker.audit_records() if r["event"] in ("invocation", "summary")]
        assert decided[-1]["reason"] == reason


# -- M16: client-supplied certificate headers -----------------------------------------------------------------------

CERT_HEADERS = ("X-Forwarded-Client-Cert", "ssl-client-cert", "X-SSL-Client-Cert", "X-Client-Cert")


async def test_m16_certificate_headers_never_stand_in_for_the_tls_certificate(
    broker: BrokerUnderTest, upstream: RecordingUpstream, pki: Pki
) -> None:
    agent_pem = pki.agent("expense-assistant").cert.read_text()
    spoof = {
        "X-Forwarded-Client-Cert": f"By=spiffe://example.org/broker;URI={pki.agent_id('expense-assistant')}",
        "ssl-client-cert": agent_pem.replace("\n", " "),
        "X-SSL-Client-Cert": agent_pem.replace("\n", "\t"),
        "X-Client-Cert": ":" + agent_pem.replace("\n", "") + ":",
    }
    caller = broker.caller()
    anonymous = replace(caller, cert=None, key=None)
    reply = await anonymous.call("POST", TOOL, INVOICE, headers=spoof)
    assert (reply.status, reply.error) == (401, "invalid_client")
    travel = pki.agent("travel-bot")
    other = replace(caller, cert=travel.cert, key=travel.key)  # another agent claiming to be this one
    reply = await other.call("POST", TOOL, INVOICE, headers=spoof)
    assert (reply.status, reply.error) == (401, "invalid_token")
    assert broker.audit_records()[-1]["reason"] == "token_actor_mismatch"
    assert upstream.received == []
    assert (await caller.call("POST", TOOL, INVOICE, headers=spoof)).status == 200
    [forwarded] = upstream.received
    assert not {h.lower() for h in CERT_HEADERS} & {h.lower() for h in forwarded.headers}


# -- M17: renegotiation and per-connection identity ------------------------------------------------------------------


def test_m17_server_context_refuses_renegotiation(pki: Pki, tmp_path: Path) -> None:
    ctx = server_ssl_context(_loaded(pki, tmp_path).config.server)
    assert ctx.options & ssl.OP_NO_RENEGOTIATION
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2


async def test_m17_tls13_only_listener_refuses_tls12(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["server"]["tls"]["min_version"] = "1.3"
    broker = await broker_factory(config)
    files = pki.agent("expense-assistant")
    old = client_ssl_context(pki, files.cert, files.key)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.open_connection("127.0.0.1", main_port(broker), ssl=old, server_hostname="localhost")
    assert (await broker.caller().call("POST", TOOL, INVOICE)).status == 200


async def test_m17_identity_is_read_per_connection_on_keep_alive(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    """Two pipelined calls on one keep-alive connection with travel-bot's certificate: both are judged by that
    connection's certificate (a token of expense-assistant is refused both times), while the same calls on
    expense-assistant's connection pass."""
    caller = broker.caller()
    calls = [
        rawhttp.request(
            "POST",
            TOOL,
            [*auth_lines(caller, "POST", TOOL), ("Content-Type", "application/json")],
            b'{"invoice_id":"INV-1","amount":1}',
        )
        for _ in range(2)
    ]
    closing = rawhttp.request("GET", "/v1/tools", [("Connection", "close")], b"", content_length=False)
    travel = await rawhttp.exchange(main_port(broker), agent_tls(broker, "travel-bot"), [*calls, closing])
    assert travel.statuses == [401, 401, 401]
    assert upstream.received == []
    calls = [
        rawhttp.request(
            "POST",
            TOOL,
            [*auth_lines(caller, "POST", TOOL), ("Content-Type", "application/json")],
            b'{"invoice_id":"INV-1","amount":1}',
        )
        for _ in range(2)
    ]
    own = await rawhttp.exchange(main_port(broker), agent_tls(broker), [*calls, closing])
    assert own.statuses == [200, 200, 401]
    assert len(upstream.received) == 2
