"""Approvals on real TLS (CONTRACT §3, §6, §11 rows 7, 8): status, approvers' decisions, the CLI, webhooks.

Approvals are created the way the token exchange creates them, through ``app[APPROVALS].request``; approvers
call the broker as themselves (their own DPoP key, no client certificate). Every refusal also checks that
nothing was recorded on the approval and that the refusal was audited.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from broker.canonical import args_digest
from broker.config.models import Approvals, Webhook
from broker.gateway.approvals import ApprovalService
from broker.jose import Signer, b64url_decode, generate_ec_jwk, public_key_from_jwk, verify_signature
from broker.policy.approvers import Eligibility
from broker.resources import APPROVALS
from broker.sdk.approvals_cli import COLUMNS, add_approvals_parser
from broker.state.base import StateStore
from broker.txn.approval_rules import Approval
from broker.txn.approvals import ApprovalBook
from broker.txn.webhooks import ANNOUNCEMENT_TYP, WebhookNotifier
from tests.certfactory import Pki
from tests.conftest import BrokerFactory, BrokerUnderTest, Caller, Reply, base_config
from tests.redisutil import redis_stores

INVOICE = {"invoice_id": "INV-8831", "amount": 6000, "department": "42"}
NO_UPSTREAM = "https://127.0.0.1:9"  # approvals never forward: nothing listens there
WAIT = 10.0  # bound on waiting for a background delivery (an Event, not a sleep)

MANAGER = {"groups": ["managers"], "acr": "mfa"}
SECURITY = {"groups": ["security"], "acr": "mfa"}
ENGINEER = {"groups": ["engineers"], "acr": "mfa"}


def service_of(broker: BrokerUnderTest) -> ApprovalService:
    service = broker.running.app.get(APPROVALS)
    if service is None:
        pytest.fail(
            "build_app does not wire approvals: app[APPROVALS] must hold "
            "broker.gateway.approvals.ApprovalService.create(...) (cleanup_ctx), and the routes "
            "GET /v1/approvals, GET|POST /v1/approvals/{id} must be registered"
        )
    return service


def human(broker: BrokerUnderTest, sub: str, claims: Mapping[str, Any]) -> Caller:
    """``sub`` acting directly: own DPoP key (the §10 one for carol/dave/sam), no certificate, no ``act``."""
    key_file = broker.pki.human_dpop(sub)
    key = json.loads(key_file.read_text()) if key_file.exists() else generate_ec_jwk()
    return broker.caller(sub, agent=None, claims=dict(claims), dpop_jwk=key)


async def new_approval(
    broker: BrokerUnderTest,
    required: tuple[str, ...] = ("manager_approval",),
    subject: str = "alice",
    issuer: str | None = None,
) -> Approval:
    approval, created = await service_of(broker).request(
        subject=subject,
        actor=broker.pki.agent_id("expense-assistant"),
        tool="approveExpense",
        arguments=INVOICE,
        args_digest=args_digest(INVOICE),
        required=required,
        reason="amount above 5000",
        policy_version="test",
        now=time.time(),
        issuer=issuer,
    )
    assert created
    return approval


async def stored(broker: BrokerUnderTest, approval: Approval) -> Approval:
    found = await service_of(broker).book.get(approval.id, time.time())
    assert found is not None
    return found


async def decide(caller: Caller, approval: Approval, decision: str = "approve") -> Reply:
    return await caller.call("POST", f"/v1/approvals/{approval.id}", {"decision": decision})


async def metrics_text(broker: BrokerUnderTest) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{broker.admin_url}/metrics") as resp:
        return await resp.text()


def last_approval_record(broker: BrokerUnderTest) -> dict[str, Any]:
    return [r for r in broker.audit_records() if r.get("event") == "approval"][-1]


@pytest.fixture
async def broker(broker_factory: BrokerFactory, pki: Pki, tmp_path: Path) -> BrokerUnderTest:
    return await broker_factory(base_config(pki, tmp_path, upstream_url=NO_UPSTREAM))


# --- decisions --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "claims",
    [MANAGER, {"groups": ["managers"], "amr": ["pwd", "mfa"]}],
    ids=["acr-mfa", "amr-mfa"],
)
async def test_a_manager_with_mfa_approves(broker: BrokerUnderTest, claims: dict[str, Any]) -> None:
    approval = await new_approval(broker)
    reply = await decide(human(broker, "carol", claims), approval)
    assert reply.status == 200, reply.body
    assert reply.body["state"] == "approved" and reply.body["id"] == approval.id
    assert [(v["sub"], v["decision"]) for v in reply.body["approvals"]] == [("carol", "approve")]
    assert reply.headers["Cache-Control"] == "no-store"
    record = last_approval_record(broker)
    assert (record["decision"], record["subject"], record["tool"], record["status"]) == (
        "allow",
        "carol",
        "approveExpense",
        200,
    )
    assert record["args_digest"] == args_digest(INVOICE) and approval.id in record["reason"]
    assert 'broker_approvals_total{state="approved"} 1.0' in await metrics_text(broker)


def _carol_without_mfa(b: BrokerUnderTest) -> Caller:
    return human(b, "carol", {"groups": ["managers"], "acr": "pwd"})


def _requester(b: BrokerUnderTest) -> Caller:
    return human(b, "alice", MANAGER)


def _agent(b: BrokerUnderTest) -> Caller:
    return b.caller("carol", claims=MANAGER)  # carol's token for the agent, with its SVID


def _agent_token_without_certificate(b: BrokerUnderTest) -> Caller:
    agent = b.caller("carol", claims=MANAGER)
    return Caller(b, token=agent.token, dpop_jwk=agent.dpop_jwk, cert=None, key=None)


def _spiffe_client_id(b: BrokerUnderTest) -> Caller:
    # the dual-identity form without act: a token issued to the agent, presented without its certificate
    return human(b, "carol", {**MANAGER, "client_id": b.pki.agent_id("expense-assistant")})


def _outsider(b: BrokerUnderTest) -> Caller:
    return human(b, "erin", ENGINEER)


def _outsider_without_mfa(b: BrokerUnderTest) -> Caller:
    return human(b, "erin", {"groups": ["engineers"]})


def _security(b: BrokerUnderTest) -> Caller:
    return human(b, "sam", SECURITY)


@pytest.mark.parametrize(
    ("make_caller", "status", "error", "reason"),
    [
        (_carol_without_mfa, 401, "insufficient_user_authentication", "approval_mfa_required"),
        (_requester, 403, "access_denied", "approval_self"),
        (_agent, 403, "access_denied", "approval_by_agent"),
        (_agent_token_without_certificate, 403, "access_denied", "approval_by_agent"),
        (_spiffe_client_id, 403, "access_denied", "approval_by_agent"),
        (_outsider, 403, "access_denied", "approval_not_eligible"),
        (_outsider_without_mfa, 403, "access_denied", "approval_not_eligible"),
        (_security, 403, "access_denied", "approval_not_eligible"),
    ],
    ids=[
        "no-mfa",
        "requester",
        "agent",
        "agent-token-no-cert",
        "agent-client-id",
        "outside-groups",
        "outside-groups-no-mfa",
        "wrong-group",
    ],
)
async def test_refused_decisions_record_nothing(
    broker: BrokerUnderTest, make_caller: Any, status: int, error: str, reason: str
) -> None:
    approval = await new_approval(broker)
    reply = await decide(make_caller(broker), approval)
    assert (reply.status, reply.error) == (status, error), reply.body
    after = await stored(broker, approval)
    assert (after.state, after.approvals) == ("pending", ())
    record = last_approval_record(broker)
    assert (record["reason"], record["status"]) == (reason, status)
    if status == 401:
        challenge = reply.headers["WWW-Authenticate"]
        assert challenge.startswith("DPoP ") and 'acr_values="mfa"' in challenge
        assert record["decision"] == "step_up"
    else:
        assert record["decision"] == "deny"


async def test_dual_approval_needs_two_distinct_managers(broker: BrokerUnderTest) -> None:
    approval = await new_approval(broker, ("dual_approval",))
    carol = human(broker, "carol", MANAGER)
    first = await decide(carol, approval)
    assert (first.status, first.body["state"]) == (200, "pending")
    again = await decide(carol, approval)
    assert (again.status, again.error) == (403, "access_denied")
    assert last_approval_record(broker)["reason"] == "approval_already_decided"
    second = await decide(human(broker, "dave", MANAGER), approval)
    assert (second.status, second.body["state"]) == (200, "approved")
    assert [v["sub"] for v in second.body["approvals"]] == ["carol", "dave"]


async def test_a_deny_is_final(broker: BrokerUnderTest) -> None:
    approval = await new_approval(broker)
    denied = await decide(human(broker, "carol", MANAGER), approval, "deny")
    assert (denied.status, denied.body["state"]) == (200, "denied")
    late = await decide(human(broker, "dave", MANAGER), approval)
    assert (late.status, late.error) == (403, "access_denied")
    assert 'broker_approvals_total{state="denied"} 1.0' in await metrics_text(broker)


@pytest.mark.parametrize(
    "body",
    [{"decision": "maybe"}, {"decision": "approve", "extra": 1}, ["approve"], {}],
    ids=["unknown-decision", "extra-member", "array", "empty"],
)
async def test_a_malformed_decision_is_refused(broker: BrokerUnderTest, body: Any) -> None:
    approval = await new_approval(broker)
    reply = await human(broker, "carol", MANAGER).call("POST", f"/v1/approvals/{approval.id}", body)
    assert (reply.status, reply.error) == (400, "invalid_request")
    assert (await stored(broker, approval)).approvals == ()


# --- who may read ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make_caller", "status"),
    [
        (lambda b: b.caller("alice"), 200),
        (lambda b: human(b, "carol", {"groups": ["managers"]}), 200),
        (lambda b: human(b, "erin", ENGINEER), 404),
        (lambda b: human(b, "alice", ENGINEER), 404),
        (lambda b: b.caller("alice", agent="travel-bot"), 404),
        (lambda b: b.caller("bob"), 404),
    ],
    ids=["requester-agent", "approver", "unrelated-human", "requester-alone", "other-agent", "other-subject"],
)
async def test_who_may_read_an_approval(broker: BrokerUnderTest, make_caller: Any, status: int) -> None:
    approval = await new_approval(broker)
    reply = await make_caller(broker).call("GET", f"/v1/approvals/{approval.id}")
    assert reply.status == status, reply.body
    if status == 200:
        assert reply.body == approval.to_api(now=time.time())
    else:
        missing = await make_caller(broker).call("GET", "/v1/approvals/AAAAAAAAAAAAAAAAAAAAAA")
        assert missing.status == 404
        strip = {"request_id"}
        assert {k: v for k, v in reply.body.items() if k not in strip} == {
            k: v for k, v in missing.body.items() if k not in strip
        }


async def test_the_requester_is_its_issuers_subject(broker: BrokerUnderTest) -> None:
    """``alice`` of another issuer, through the same agent, is not the requester (its approval stays hidden)."""
    theirs = await new_approval(broker, issuer="https://other-issuer.example")
    ours = await new_approval(broker, issuer="https://idp.example.org")  # base_config's issuer: the caller's
    alice = broker.caller("alice")
    assert (await alice.call("GET", f"/v1/approvals/{theirs.id}")).status == 404
    assert (await alice.call("GET", f"/v1/approvals/{ours.id}")).status == 200


async def test_the_list_shows_what_the_caller_can_decide(broker: BrokerUnderTest) -> None:
    manager = await new_approval(broker)
    review = await new_approval(broker, ("security_review",))
    mine = await new_approval(broker, subject="carol")
    listed = await human(broker, "carol", MANAGER).call("GET", "/v1/approvals")
    assert listed.status == 200 and [a["id"] for a in listed.body["approvals"]] == [manager.id]
    for_sam = await human(broker, "sam", SECURITY).call("GET", "/v1/approvals")
    assert [a["id"] for a in for_sam.body["approvals"]] == [review.id]
    agent = await broker.caller("carol").call("GET", "/v1/approvals")
    assert (agent.status, agent.error) == (403, "access_denied")
    assert mine.id not in {a["id"] for a in listed.body["approvals"]}


# --- concurrency across replicas (Redis) -------------------------------------------------------------------


@pytest.mark.redis
async def test_concurrent_decisions_on_two_replicas_keep_one_record() -> None:
    eligibility = Eligibility.compile(Approvals())
    async with redis_stores() as stores:
        replicas: list[StateStore] = [stores.store(), stores.store()]
        books = [ApprovalBook(store, ttl_seconds=600) for store in replicas]
        now = time.time()
        approval, _ = await books[0].request(
            subject="alice",
            actor="spiffe://example.org/agents/expense-assistant",
            tool="approveExpense",
            arguments=INVOICE,
            args_digest=args_digest(INVOICE),
            required=("dual_approval",),
            reason="",
            policy_version="test",
            now=now,
        )
        approvers = [f"manager-{i}" for i in range(6)]
        results = await asyncio.gather(
            *(
                books[i % 2].decide(
                    approval.id,
                    approver_sub=sub,
                    approver_claims=MANAGER,
                    decision="approve",
                    eligible=eligibility.for_approval(approval),
                    now=now + 1,
                )
                for i, sub in enumerate(approvers)
            ),
            return_exceptions=True,
        )
        granted = [r for r in results if isinstance(r, Approval)]
        assert len(granted) == 2, results
        final = await books[1].get(approval.id, now + 2)
        assert final is not None and final.state == "approved" and len(final.approvals) == 2


# --- the CLI ----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def cli_broker(broker_factory: BrokerFactory, pki: Pki, tmp_path: Path) -> BrokerUnderTest:
    """A broker whose public_url is its real address: the CLI signs proofs for the URL it calls."""
    config = base_config(pki, tmp_path, upstream_url=NO_UPSTREAM)
    port = _free_port()
    config["server"] = {
        **config["server"],
        "listen": f"127.0.0.1:{port}",
        "public_url": f"https://localhost:{port}",
    }
    return await broker_factory(config)


async def run_cli(*argv: str) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="broker")
    add_approvals_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["approvals", *argv])
    result: int = await asyncio.to_thread(args.func, args)
    return result


async def test_cli_lists_shows_and_approves(
    cli_broker: BrokerUnderTest, capsys: pytest.CaptureFixture[str]
) -> None:
    approval = await new_approval(cli_broker)
    carol = human(cli_broker, "carol", MANAGER)
    common = ["--broker", cli_broker.public_url, "--certs", str(cli_broker.pki.root), "--human", "carol"]
    common += ["--token", carol.token]

    # the same default (a table: header, one row per approval) for every action; --format json the API's JSON
    assert await run_cli("list", *common) == 0
    header, *rows = capsys.readouterr().out.splitlines()
    assert tuple(header.split()) == COLUMNS
    assert [r.split()[:4] for r in rows] == [[approval.id, "pending", "approveExpense", "alice"]]

    assert await run_cli("show", approval.id, *common) == 0
    header, only = capsys.readouterr().out.splitlines()
    assert header.startswith("ID ") and only.split()[:2] == [approval.id, "pending"]

    assert await run_cli("list", *common, "--format", "json") == 0
    assert [a["id"] for a in json.loads(capsys.readouterr().out)["approvals"]] == [approval.id]
    assert await run_cli("show", approval.id, *common, "--json") == 0
    assert json.loads(capsys.readouterr().out)["id"] == approval.id

    assert await run_cli("approve", approval.id, *common) == 0
    header, only = capsys.readouterr().out.splitlines()
    assert header.startswith("ID ") and only.split()[:2] == [approval.id, "approved"]
    assert (await stored(cli_broker, approval)).state == "approved"
    assert await run_cli("show", approval.id, *common, "--format", "json") == 0
    assert json.loads(capsys.readouterr().out)["state"] == "approved"
    with pytest.raises(SystemExit):
        await run_cli("show", approval.id, *common, "--format", "yaml")


async def test_cli_exit_codes_for_refusals_and_usage(
    cli_broker: BrokerUnderTest, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    approval = await new_approval(cli_broker)
    sam = human(cli_broker, "sam", SECURITY)
    common = ["--broker", cli_broker.public_url, "--certs", str(cli_broker.pki.root), "--human", "sam"]

    monkeypatch.setenv("BROKER_TOKEN", sam.token)  # the token from the environment
    assert await run_cli("approve", approval.id, *common) == 1
    assert "403 access_denied" in capsys.readouterr().err
    assert (await stored(cli_broker, approval)).approvals == ()

    monkeypatch.delenv("BROKER_TOKEN")
    assert await run_cli("approve", approval.id, *common) == 2
    assert "BROKER_TOKEN" in capsys.readouterr().err
    wrong_human = [*common[:-1], "nobody", "--token", sam.token]
    assert await run_cli("show", approval.id, *wrong_human) == 2


# --- webhooks ---------------------------------------------------------------------------------------------------


@dataclass
class Receiver:
    """An HTTPS webhook receiver: fails the first ``failures`` deliveries (503), or never answers (``hang``)."""

    failures: int = 0
    hang: bool = False
    url: str = ""
    received: list[tuple[str, str]] = field(default_factory=list)
    succeeded: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.received.append((request.content_type, await request.text()))
        self.arrived.set()
        if self.hang:
            await self.release.wait()
        if len(self.received) <= self.failures:
            return web.Response(status=503)
        self.succeeded.set()
        return web.Response(status=204)


async def start_receiver(pki: Pki, receiver: Receiver, runners: list[web.AppRunner]) -> Receiver:
    app = web.Application()
    app.router.add_post("/hook", receiver.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki.backend), str(pki.backend_key))
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    receiver.url = f"https://127.0.0.1:{runner.addresses[0][1]}/hook"
    runners.append(runner)
    return receiver


@pytest.fixture
async def runners() -> AsyncIterator[list[web.AppRunner]]:
    started: list[web.AppRunner] = []
    yield started
    for runner in started:
        await runner.cleanup()


def verified_claims(token: str, public_jwk: Mapping[str, Any]) -> dict[str, Any]:
    header_b64, payload_b64, signature_b64 = token.split(".")
    header = json.loads(b64url_decode(header_b64))
    assert header["typ"] == ANNOUNCEMENT_TYP and header["kid"] == public_jwk["kid"]
    signing_input = f"{header_b64}.{payload_b64}".encode()
    key = public_key_from_jwk(public_jwk)
    assert verify_signature(key, header["alg"], signing_input, b64url_decode(signature_b64))
    claims: dict[str, Any] = json.loads(b64url_decode(payload_b64))
    return claims


async def test_a_failing_receiver_gets_the_signed_announcement_on_retry(
    pki: Pki, runners: list[web.AppRunner], broker: BrokerUnderTest
) -> None:
    receiver = await start_receiver(pki, Receiver(failures=2), runners)
    signer = Signer.from_jwk(generate_ec_jwk())
    results: list[str] = []
    approval = await new_approval(broker)
    async with aiohttp.ClientSession() as session:
        notifier = WebhookNotifier(
            session,
            signer,
            [Webhook(url=receiver.url, ca=pki.ca)],
            public_url="https://broker.example",
            base_delay=0.01,
            on_result=results.append,
        )
        notifier.start()
        notifier.announce(approval)
        await asyncio.wait_for(receiver.succeeded.wait(), WAIT)
        await notifier.close()
    assert len(receiver.received) == 3 and results == ["delivered"]
    assert {body for _, body in receiver.received} == {receiver.received[0][1]}  # the same JWS each time
    content_type, token = receiver.received[-1]
    assert content_type == "application/jose"
    claims = verified_claims(token, signer.public_jwk())
    assert (claims["approval_id"], claims["requester"], claims["tool"]) == (
        approval.id,
        "alice",
        "approveExpense",
    )
    assert claims["arguments"] == INVOICE and claims["reason"] == "amount above 5000"


async def test_a_silent_receiver_never_delays_the_request_path(
    broker_factory: BrokerFactory, pki: Pki, tmp_path: Path, runners: list[web.AppRunner]
) -> None:
    silent = await start_receiver(pki, Receiver(hang=True), runners)
    config = base_config(
        pki,
        tmp_path,
        upstream_url=NO_UPSTREAM,
        approvals={"webhooks": [{"url": silent.url, "ca": str(pki.ca), "timeout_seconds": 0.5}]},
    )
    broker = await broker_factory(config)
    # The receiver never answers: if announcing waited for it, this would not return.
    approval = await asyncio.wait_for(new_approval(broker), WAIT)
    await asyncio.wait_for(silent.arrived.wait(), WAIT)  # the announcement did go out
    status = await broker.caller("alice").call("GET", f"/v1/approvals/{approval.id}")
    assert (status.status, status.body["state"]) == (200, "pending")
    silent.release.set()


async def test_the_broker_announces_new_approvals_signed_with_its_key(
    broker_factory: BrokerFactory, pki: Pki, tmp_path: Path, runners: list[web.AppRunner]
) -> None:
    receiver = await start_receiver(pki, Receiver(), runners)
    config = base_config(
        pki,
        tmp_path,
        upstream_url=NO_UPSTREAM,
        approvals={"webhooks": [{"url": receiver.url, "ca": str(pki.ca)}]},
    )
    broker = await broker_factory(config)
    approval = await new_approval(broker, ("dual_approval",))
    await asyncio.wait_for(receiver.succeeded.wait(), WAIT)
    async with broker.session(agent=None) as s, s.get(f"{broker.url}/.well-known/jwks.json") as resp:
        [jwk, *_] = (await resp.json())["keys"]
    claims = verified_claims(receiver.received[0][1], jwk)
    assert claims["approval_url"] == f"{broker.public_url}/approvals/{approval.id}"
    assert claims["agent"] == pki.agent_id("expense-assistant") and claims["required"] == ["dual_approval"]
    assert claims["iss"] == broker.public_url and claims["exp"] == int(approval.expires_at)
