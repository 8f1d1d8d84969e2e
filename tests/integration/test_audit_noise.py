"""CONTRACT §15 "unauthenticated noise is bounded", on real TLS sockets: a flood of requests without a client
certificate (and malformed ones) grows the audit by a few ``summary`` records, not a record each; the counts
add up to the refusals; metrics still count every one; a verified SVID keeps its full record."""

from __future__ import annotations

import asyncio
import json
import ssl
import time

import aiohttp

from broker.audit.verify import verify_log
from broker.jose import Signer
from broker.resources import METRICS
from tests.certfactory import client_ssl_context
from tests.conftest import BrokerUnderTest, RecordingUpstream

#: CONTRACT §15: one unauthenticated client cannot grow the audit faster than this
BUDGET_BYTES_PER_SECOND = 10_000
#: (method, path, headers, body) of refusals on audited routes, sent without a client certificate
ANONYMOUS = [
    (
        "POST",
        "/v1/tools/approveExpense",
        {"Content-Type": "application/json"},
        b'{"invoice_id":"x","amount":1}',
    ),
    ("GET", "/v1/tools", {}, b""),
    ("POST", "/v1/token", {"Content-Type": "application/x-www-form-urlencoded"}, b"grant_type=x"),
    ("POST", "/mcp/nowhere", {"Content-Type": "application/json"}, b"{"),
    ("GET", "/v1/approvals", {"Authorization": "Bearer not-a-token"}, b""),  # a human route: token refused
]
#: malformed before anything is decided (framing): refused and counted, never audited
MALFORMED = ("POST", "/v1/tools/approveExpense", {"Transfer-Encoding": "gzip, chunked"}, b"0\r\n\r\n")


async def _flood(url: str, context: ssl.SSLContext, rounds: int) -> dict[int, int]:
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(ssl=context, limit=8)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(method: str, path: str, headers: dict[str, str], body: bytes) -> None:
            async with session.request(method, url + path, headers=headers, data=body or None) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1

        for _ in range(rounds):
            await asyncio.gather(*(one(*request) for request in ANONYMOUS))
    # malformed framing closes the connection after each answer: its own connections
    for _ in range(rounds // 4):
        method, path, headers, body = MALFORMED
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session,
            session.request(method, url + path, headers=headers, data=body) as resp,
        ):
            await resp.read()
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
    return statuses


def _requests_total(broker: BrokerUnderTest, **labels: str) -> float:
    registry = broker.running.app[METRICS].registry
    return sum(
        sample.value
        for family in registry.collect()
        if family.name == "broker_requests"
        for sample in family.samples
        if sample.name == "broker_requests_total"
        and all(sample.labels.get(k) == v for k, v in labels.items())
    )


async def test_an_anonymous_flood_grows_the_audit_within_budget_and_is_counted_exactly(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    rounds = 80
    before = broker.audit_path.stat().st_size
    started = time.monotonic()
    statuses = await _flood(broker.url, client_ssl_context(broker.pki), rounds)
    await broker.flush_noise()  # what the 10 s windows (or shutdown) would write
    elapsed = time.monotonic() - started
    grown = broker.audit_path.stat().st_size - before
    anonymous = rounds * len(ANONYMOUS)
    malformed = rounds // 4
    assert sum(statuses.values()) == anonymous + malformed
    assert all(status in (400, 401, 404) for status in statuses), statuses
    assert upstream.received == []
    # the budget, and far below a record per refusal (~400 bytes each)
    assert grown < BUDGET_BYTES_PER_SECOND * max(elapsed, 1.0), (grown, elapsed)
    assert grown < anonymous * 400 / 20
    records = broker.audit_records()
    summaries = [r for r in records if r["event"] == "summary"]
    assert sum(s["count"] for s in summaries) == anonymous
    assert {s["client_network"] for s in summaries} == {"127.0.0.0/24"}
    assert all(s["decision"] == "deny" and s["window_start"] <= s["window_end"] for s in summaries)
    assert {s["reason"] for s in summaries} >= {"svid_missing"}
    # no per-request record of an anonymous refusal
    assert not [
        r for r in records if r["event"] in ("invocation", "discovery", "exchange", "mcp", "approval")
    ]
    # metrics still count every refusal, the malformed ones included
    assert _requests_total(broker, code="invalid_client") >= rounds * 3
    assert _requests_total(broker, code="invalid_request") >= malformed
    assert _requests_total(broker) >= anonymous + malformed
    await broker.running.stop()
    jwks = {"keys": [Signer.from_file(broker.pki.signing_jwk).public_jwk()]}
    assert verify_log(broker.audit_path, public_jwks=jwks).ok


async def test_a_verified_svid_keeps_its_full_record(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    """The same refusal reason class (a bad token) from a peer with a valid SVID is a full record at once."""
    caller = broker.caller()
    reply = await caller.call(
        "POST", "/v1/tools/approveExpense", {}, auth={"Authorization": "DPoP x", "DPoP": "y"}
    )
    assert reply.status in (400, 401)
    last = next(r for r in reversed(broker.audit_records()) if r["event"] != "checkpoint")
    assert (last["event"], last["request_id"]) == ("invocation", reply.headers["X-Request-Id"])
    assert json.dumps(last).count("summary") == 0


async def test_a_genuine_token_refused_without_a_certificate_keeps_its_full_record(
    broker: BrokerUnderTest, upstream: RecordingUpstream
) -> None:
    """A human route (GET /v1/approvals) takes no client certificate: a stolen, genuine DPoP-bound token replayed
    as a Bearer token is refused — and recorded in full under its subject, not folded into a summary."""
    approver = broker.caller(
        "carol", agent=None, dpop_jwk=json.loads(broker.pki.agent("travel-bot").dpop_jwk.read_text())
    )
    connector = aiohttp.TCPConnector(ssl=client_ssl_context(broker.pki))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(
            broker.url + "/v1/approvals", headers={"Authorization": f"Bearer {approver.token}"}
        ) as reply,
    ):
        assert reply.status == 401
        request_id = reply.headers["X-Request-Id"]
    await broker.flush_noise()
    (record,) = [r for r in broker.audit_records() if r["request_id"] == request_id]
    assert (record["event"], record["subject"], record["reason"]) == (
        "approval",
        "carol",
        "token_dpop_downgrade",
    )
    assert not [r for r in broker.audit_records() if r["event"] == "summary"]
