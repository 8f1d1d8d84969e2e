"""The one authorization pipeline (broker.gateway.pipeline), without sockets: the reference scenario's policies
(config/examples/expense.yaml), a real MemoryStore, real signatures, a real audit file.

Every refusal row also asserts what must NOT have happened: the DPoP proof is not burnt (except by a refusal
that filed an approval: that one burns it), no txn token consumed, no counter place kept, no allow record
written. The same table runs for each step that reaches the pipeline
(the exchange and an MCP ``tools/call``), because one pipeline must give one answer.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from broker.audit.sink import AuditLog
from broker.canonical import args_digest
from broker.config.loader import load_config
from broker.config.models import Policy
from broker.context import RequestContext
from broker.errors import (
    AccessDenied,
    ApprovalRequired,
    BrokerError,
    InsufficientUserAuthentication,
    InvalidRequest,
    InvalidToken,
    InvalidTxnToken,
    TxnTokenMismatch,
    UnknownTool,
)
from broker.gateway.approvals import ApprovalService
from broker.gateway.discovery import discover
from broker.gateway.forward import Forwarder
from broker.gateway.http1 import Http1Pool
from broker.gateway.pipeline import Authorized, ToolCall, authorize, given
from broker.gateway.services import Services
from broker.identity.principal import Principal
from broker.identity.spiffe import parse_spiffe_id
from broker.identity.tokens import AccessToken
from broker.jose import Signer
from broker.keys import KeyRing
from broker.observability import Metrics
from broker.policy.engine import PolicySet
from broker.resources import RuntimeHolder
from broker.runtime import build_runtime
from broker.state.memory import MemoryStore
from broker.txn.tokens import txn_replay_key, verify_txn_token
from tests.certfactory import Pki

ROOT = Path(__file__).resolve().parents[2]
AGENT = "spiffe://example.org/agents/expense-assistant"
ALICE = {"groups": ["finance-managers"], "department": "42", "approval_limit": 20000}
ALICE_MFA = {**ALICE, "acr": "mfa"}
BOB = {"groups": ["engineers"], "department": "42"}
INV = {"invoice_id": "INV-8831", "amount": 100, "department": "42"}
PUBLIC_URL = "https://localhost:8443"


@dataclass
class Harness:
    services: Services
    store: MemoryStore
    audit_path: Path
    jtis: int = 0

    def principal(self, sub: str = "alice", claims: dict[str, Any] | None = None) -> Principal:
        """A verified caller with a fresh DPoP proof (its jti is what the guard claims)."""
        self.jtis += 1
        claims = dict(ALICE if claims is None else claims)
        token = AccessToken(
            claims={"sub": sub, **claims},
            sub=sub,
            iss="https://idp.example.org",
            jti=f"tok-{sub}",
            exp=int(time.time()) + 3600,
            iat=int(time.time()),
            nbf=None,
            cnf_jkt="jkt-alice-agent",
            cnf_x5t=None,
            act_sub=AGENT,
            client_id=None,
            token_hash="ath",
            leeway=30,
        )
        return Principal(
            subject=sub,
            claims={"sub": sub, **claims},
            actor=parse_spiffe_id(AGENT),
            token=token,
            jkt="jkt-alice-agent",
            replay=(f"dpop:proof-{self.jtis}", 300.0),
        )

    async def decide(self, call: ToolCall) -> tuple[RequestContext, Authorized | BrokerError]:
        record = RequestContext(request_id=f"r{self.jtis}", route="invoke")
        try:
            return record, await authorize(call, self.services, record, time.time())
        except BrokerError as error:
            return record, error

    async def proof_unburnt(self, principal: Principal) -> bool:
        assert principal.replay is not None
        return await self.store.claim(principal.replay[0], 60)

    async def counted(self) -> int:
        runtime = self.services.runtime.current
        stats = await runtime.counters.fetch(
            self.store, {"approvals_10m"}, subject="alice", actor_id=AGENT, now=time.time()
        )
        return int(stats["approvals_10m"]["count"])

    def allow_records(self) -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines()
        return [r for r in map(json.loads, lines) if r.get("decision") == "allow" and r.get("tool")]


@pytest.fixture
async def harness(pki: Pki, tmp_path: Path) -> AsyncIterator[Harness]:
    env = {
        "BROKER_CERTS": str(pki.root),
        "BROKER_PUBLIC_URL": PUBLIC_URL,
        "EXPENSE_UPSTREAM": "https://127.0.0.1:9",
        "EXPENSE_MCP_UPSTREAM": "https://127.0.0.1:9/mcp",
        "BROKER_AUDIT_FILE": str(tmp_path / "audit.jsonl"),
    }
    loaded = load_config(ROOT / "config/examples/expense.yaml", environ=env)
    runtime = build_runtime(loaded)
    store = MemoryStore()
    signer = KeyRing(Signer.from_file(loaded.config.signing.key_file))
    metrics = Metrics()
    audit = AuditLog(tmp_path / "audit.jsonl", signer=signer, checkpoint_every=100)
    audit.open()
    async with aiohttp.ClientSession() as session:
        approvals = ApprovalService.create(
            loaded.config.approvals, store, signer, session, metrics, PUBLIC_URL
        )
        services = Services(
            runtime=RuntimeHolder(runtime),
            store=store,
            signer=signer,
            metrics=metrics,
            audit=audit,
            approvals=approvals,
            forwarder=Forwarder(Http1Pool(), metrics, max_response_bytes=1 << 20),
        )
        yield Harness(services, store, tmp_path / "audit.jsonl")
    audit.close()


def call(
    harness: Harness,
    step: str,
    *,
    tool: str = "approveExpense",
    arguments: Any = None,
    principal: Principal | None = None,
    **kw: Any,
) -> ToolCall:
    runtime = harness.services.runtime.current
    compiled = runtime.tools.get(tool)
    spec = compiled.spec if compiled is not None else None
    if spec is not None and step == "mcp":  # an MCP tool takes edge tokens; same schemas, filters, policies
        spec = type(spec)(spec.name, spec.schemas, spec.filters, "edge", spec.audit_fields)
    return ToolCall(
        step=step,  # type: ignore[arg-type]
        name=tool,
        arguments=given(INV if arguments is None else arguments),
        principal=principal or harness.principal(),
        tool=spec,
        **kw,
    )


# (id, tool, arguments, claims, expected error class, expected audit reason prefix)
REFUSALS = [
    ("unknown-tool", "noSuchTool", INV, ALICE, UnknownTool, "unknown_tool"),
    ("row2-hidden-for-bob", "approveExpense", INV, BOB, UnknownTool, "hidden: "),
    ("arguments-not-object", "approveExpense", [1], ALICE, InvalidRequest, "arguments_not_object"),
    (
        "schema-string-amount",
        "approveExpense",
        {**INV, "amount": "100"},
        ALICE,
        InvalidRequest,
        "arguments_schema",
    ),
    (
        "row9-other-department",
        "approveExpense",
        {**INV, "department": "7"},
        ALICE,
        AccessDenied,
        "own-department-only: ",
    ),
    (
        "row10-over-limit-mfa",
        "approveExpense",
        {**INV, "amount": 999999},
        ALICE_MFA,
        AccessDenied,
        "within-approval-limit: ",
    ),
    (
        "row6-mfa",
        "approveExpense",
        {**INV, "amount": 6000},
        ALICE,
        InsufficientUserAuthentication,
        "mfa_required",
    ),
    (
        "row7-manager",
        "approveExpense",
        {**INV, "amount": 6000},
        ALICE_MFA,
        ApprovalRequired,
        "approval_required: manager_approval",
    ),
    (
        "row8-dual",
        "approveExpense",
        {**INV, "amount": 12000},
        ALICE_MFA,
        ApprovalRequired,
        "approval_required: dual_approval",
    ),
    (
        "row11-risk",
        "approveExpense",
        INV,
        {**ALICE, "risk_score": 85},
        ApprovalRequired,
        "approval_required: manager_approval",
    ),
]


@pytest.mark.parametrize("step", ["exchange", "mcp"])
@pytest.mark.parametrize(
    ("tool", "arguments", "claims", "error", "reason"),
    [r[1:] for r in REFUSALS],
    ids=[r[0] for r in REFUSALS],
)
async def test_each_refusal_consumes_nothing(
    harness: Harness, step: str, tool: str, arguments: Any, claims: dict[str, Any], error: type, reason: str
) -> None:
    principal = harness.principal(claims=claims)
    record, outcome = await harness.decide(
        call(harness, step, tool=tool, arguments=arguments, principal=principal)
    )
    assert isinstance(outcome, error), outcome
    assert outcome.reason.startswith(reason)
    rule = reason.split(":")[0]
    assert outcome.reason.count(f"{rule}:") <= 1  # the rule id appears once in the reason
    # the guard never ran — but approval_required filed an approval, so its guard ran first and took the proof
    assert await harness.proof_unburnt(principal) == (error is not ApprovalRequired)
    assert await harness.counted() == 0  # no counter place kept
    assert harness.allow_records() == []
    assert record.txn is None


@pytest.mark.parametrize("step", ["exchange", "mcp"])
async def test_an_allowed_call_is_audited_with_its_token_and_injected_arguments(
    harness: Harness, step: str
) -> None:
    principal = harness.principal()
    record, outcome = await harness.decide(
        call(harness, step, arguments={"invoice_id": "INV-1", "amount": 10}, principal=principal)
    )
    assert isinstance(outcome, Authorized), outcome
    assert outcome.forwarded["department"] == "42"  # injected from the subject
    (allowed,) = harness.allow_records()
    assert allowed["txn"] == outcome.txn == record.txn and allowed["args"] == {
        "invoice_id": "INV-1",
        "amount": 10,
    }
    claims = verify_txn_token(
        outcome.txn_token,
        keys=harness.services.signer.verification_keys(time.time()),
        issuer=PUBLIC_URL,
        audience="example.org",
        now=time.time(),
    )
    assert claims.injected == {"department": "42"}
    # the token's digest is stage 2's, shared with mint: the very digest of the agent's arguments
    assert claims.args_digest == record.args_digest == args_digest({"invoice_id": "INV-1", "amount": 10})
    assert not await harness.store.claim(principal.replay[0], 60)  # type: ignore[index]  # the proof is burnt
    assert await harness.counted() == (0 if step == "exchange" else 1)  # the exchange executes nothing


async def _exchange(harness: Harness, arguments: dict[str, Any]) -> str:
    _, outcome = await harness.decide(call(harness, "exchange", arguments=arguments))
    assert isinstance(outcome, Authorized), outcome
    return outcome.txn_token


def _invoke(harness: Harness, token: str, arguments: dict[str, Any] = INV, **kw: Any) -> ToolCall:
    return call(harness, "invoke", arguments=arguments, txn_token=token, **{"txn_tokens_presented": 1, **kw})


async def test_row4_a_txn_token_is_single_use(harness: Harness) -> None:
    token = await _exchange(harness, INV)
    _, first = await harness.decide(_invoke(harness, token))
    assert isinstance(first, Authorized)
    principal = harness.principal()
    _, second = await harness.decide(_invoke(harness, token, principal=principal))
    assert isinstance(second, InvalidTxnToken) and second.reason == "txn_replayed"
    assert await harness.counted() == 1  # the refused replay released its place


async def test_row5_changed_arguments_are_refused_before_anything_is_consumed(harness: Harness) -> None:
    token = await _exchange(harness, INV)
    principal = harness.principal()
    _, outcome = await harness.decide(_invoke(harness, token, {**INV, "amount": 101}, principal=principal))
    assert isinstance(outcome, TxnTokenMismatch)
    assert await harness.proof_unburnt(principal) and await harness.counted() == 0
    _, retry = await harness.decide(_invoke(harness, token))  # the token was not consumed
    assert isinstance(retry, Authorized)


async def test_a_required_token_is_required_and_only_one(harness: Harness) -> None:
    _, missing = await harness.decide(call(harness, "invoke"))
    assert isinstance(missing, InvalidTxnToken) and missing.reason == "txn_missing"
    token = await _exchange(harness, INV)
    _, two = await harness.decide(_invoke(harness, token, txn_tokens_presented=2))
    assert isinstance(two, InvalidTxnToken) and two.reason == "txn_multiple"


async def test_tokens_minted_ahead_cannot_exceed_the_velocity_limit(harness: Harness) -> None:
    """Row 12 across steps: six exchanges pass (nothing executed yet), the sixth invocation meets the limit."""
    tokens = [await _exchange(harness, {**INV, "invoice_id": f"INV-{i}"}) for i in range(6)]
    assert await harness.counted() == 0  # exchanges that are never invoked do not count
    outcomes = [
        (await harness.decide(_invoke(harness, t, {**INV, "invoice_id": f"INV-{i}"})))[1]
        for i, t in enumerate(tokens)
    ]
    assert all(isinstance(o, Authorized) for o in outcomes[:5])
    assert isinstance(outcomes[5], ApprovalRequired)
    assert outcomes[5].extra["required"] == ["security_review"]
    assert await harness.counted() == 5


@pytest.mark.parametrize("step", ["mcp", "invoke-with-tokens"])
async def test_twenty_parallel_calls_admit_exactly_five(harness: Harness, step: str) -> None:
    arguments = [{**INV, "invoice_id": f"INV-{i}"} for i in range(20)]
    if step == "mcp":
        calls = [call(harness, "mcp", arguments=a) for a in arguments]
    else:
        calls = [_invoke(harness, await _exchange(harness, a), a) for a in arguments]
    outcomes = await asyncio.gather(*(harness.decide(c) for c in calls))
    allowed = [o for _, o in outcomes if isinstance(o, Authorized)]
    refused = [o for _, o in outcomes if isinstance(o, ApprovalRequired)]
    assert (len(allowed), len(refused)) == (5, 15)
    assert await harness.counted() == 5
    assert len(harness.allow_records()) == 5 + (20 if step != "mcp" else 0)


async def test_a_revoked_policy_version_refuses_its_txn_tokens(harness: Harness) -> None:
    token = await _exchange(harness, INV)
    version = harness.services.runtime.current.policy_version
    await harness.store.revoke("policy_version", version, 60)
    principal = harness.principal()
    _, outcome = await harness.decide(_invoke(harness, token, principal=principal))
    assert isinstance(outcome, InvalidTxnToken) and outcome.reason == "revoked_policy_version"
    assert await harness.proof_unburnt(principal) and await harness.counted() == 0


async def _approve(harness: Harness, approval_id: str) -> None:
    book = harness.services.approvals.book
    for approver in ("carol", "dave"):
        approval = await book.get(approval_id, time.time())
        assert approval is not None
        eligible = harness.services.approvals.eligibility.for_approval(approval)
        claims = {"sub": approver, "groups": ["managers"], "acr": "mfa"}
        await book.decide(
            approval_id,
            approver_sub=approver,
            approver_claims=claims,
            decision="approve",
            eligible=eligible,
            now=time.time(),
        )
        if (await book.get(approval_id, time.time())).state == "approved":  # type: ignore[union-attr]
            return


@pytest.mark.parametrize("step", ["mcp", "invoke-with-tokens"])
async def test_one_approval_authorises_one_execution(harness: Harness, step: str) -> None:
    """Review finding: an approval found by its binding covered every later call with the same arguments."""
    big = {**INV, "amount": 6000}
    _, first = await harness.decide(
        call(harness, "exchange", arguments=big, principal=harness.principal(claims=ALICE_MFA))
    )
    assert isinstance(first, ApprovalRequired)
    await _approve(harness, first.extra["approval_id"])

    if step == "mcp":
        calls = [
            call(harness, "mcp", arguments=big, principal=harness.principal(claims=ALICE_MFA))
            for _ in range(3)
        ]
    else:  # three tokens minted while the approval is unused: exchanges do not spend it
        calls = []
        for _ in range(3):
            principal = harness.principal(claims=ALICE_MFA)
            _, exchanged = await harness.decide(call(harness, "exchange", arguments=big, principal=principal))
            assert isinstance(exchanged, Authorized), exchanged
            calls.append(
                _invoke(harness, exchanged.txn_token, big, principal=harness.principal(claims=ALICE_MFA))
            )
    outcomes = [o for _, o in await asyncio.gather(*(harness.decide(c) for c in calls))]
    outcomes.sort(key=lambda o: not isinstance(o, Authorized))
    assert isinstance(outcomes[0], Authorized)
    assert all(isinstance(o, ApprovalRequired) for o in outcomes[1:])
    assert outcomes[1].extra["approval_id"] != first.extra["approval_id"]  # a new approval to ask for
    _, later = await harness.decide(
        call(harness, "exchange", arguments=big, principal=harness.principal(claims=ALICE_MFA))
    )
    assert isinstance(later, ApprovalRequired)  # spent: the next exchange needs a new approval too
    assert await harness.counted() == 1


async def test_nothing_is_minted_under_a_revoked_policy_version(harness: Harness) -> None:
    version = harness.services.runtime.current.policy_version
    await harness.store.revoke("policy_version", version, 60)
    for step in ("exchange", "mcp"):
        principal = harness.principal()
        _, outcome = await harness.decide(call(harness, step, principal=principal))
        assert isinstance(outcome, AccessDenied) and outcome.reason == "revoked_policy_version"
        assert await harness.proof_unburnt(principal)
    assert harness.allow_records() == [] and await harness.counted() == 0


# --- review finding: a slow body decides at the time it was complete, not when the headers came ------------


@dataclass
class Clock:
    """The transport's clock (ToolCall.clock); the arguments reader moves it, as a trickled body takes time."""

    now: float

    def __call__(self) -> float:
        return self.now


def trickled(clock: Clock, arrives_at: float, arguments: Any) -> Any:
    async def read() -> Any:
        clock.now = arrives_at  # the body is complete only now
        return arguments

    return read


def _expiry(harness: Harness, token: str) -> int:
    keys = harness.services.signer.verification_keys(time.time())
    return verify_txn_token(token, keys=keys, issuer=PUBLIC_URL, audience="example.org", now=time.time()).exp


async def test_a_body_complete_after_its_txn_token_expired_is_refused(harness: Harness) -> None:
    token = await _exchange(harness, INV)
    started = time.time()  # headers sent while the token is valid
    clock = Clock(started)
    principal = harness.principal()
    late = replace(
        _invoke(harness, token, principal=principal, clock=clock),
        arguments=trickled(clock, _expiry(harness, token) + 6, INV),  # past exp and the 5 s leeway
    )
    record = RequestContext(request_id="slow-body", route="invoke")
    with pytest.raises(InvalidTxnToken) as refused:
        await authorize(late, harness.services, record, started)
    assert refused.value.reason == "txn_expired"
    assert await harness.proof_unburnt(principal) and await harness.counted() == 0
    _, in_time = await harness.decide(_invoke(harness, token))  # not consumed: still good before its expiry
    assert isinstance(in_time, Authorized)


async def test_counter_events_and_minted_tokens_carry_the_time_the_body_was_complete(
    harness: Harness,
) -> None:
    started = time.time()
    arrived = started + 30
    clock = Clock(started)
    token = await _exchange(harness, INV)
    counted = replace(_invoke(harness, token, clock=clock), arguments=trickled(clock, arrived, INV))
    assert isinstance(
        await authorize(counted, harness.services, RequestContext(request_id="r-c", route="invoke"), started),
        Authorized,
    )
    # a window ending just before the event: an event stamped at the headers' time would be out of it
    stats = await harness.services.runtime.current.counters.fetch(
        harness.store, {"approvals_10m"}, subject="alice", actor_id=AGENT, now=arrived + 599
    )
    assert stats["approvals_10m"]["count"] == 1

    clock = Clock(started)
    listing = replace(
        call(harness, "invoke", tool="listInvoices", clock=clock), arguments=trickled(clock, arrived, {})
    )
    minted = await authorize(
        listing, harness.services, RequestContext(request_id="r-l", route="invoke"), started
    )
    keys = harness.services.signer.verification_keys(arrived)
    claims = verify_txn_token(
        minted.txn_token, keys=keys, issuer=PUBLIC_URL, audience="example.org", now=arrived
    )
    assert claims.iat == int(arrived)


# --- review finding: the approval path is guarded (revocations, the proof's single use) ----------------------


async def test_a_revoked_principal_files_no_approval(harness: Harness) -> None:
    await harness.store.revoke("sub", "alice", 60)
    book = harness.services.approvals.book
    for step in ("exchange", "mcp"):
        principal = harness.principal(claims=ALICE_MFA)
        _, outcome = await harness.decide(
            call(harness, step, arguments={**INV, "amount": 6000}, principal=principal)
        )
        assert isinstance(outcome, InvalidToken) and outcome.reason == "revoked_sub"
        assert await harness.proof_unburnt(principal)  # refused by a revocation: like the final guard
    assert await book.pending(time.time()) == [] and await harness.counted() == 0


async def test_an_approval_found_by_its_binding_claims_the_proof_once_and_consumes_the_token(
    harness: Harness,
) -> None:
    """The one allowed path that runs the approval guard: a txn token whose own approval no longer covers the
    call, while another approval of the same binding was granted since."""
    big = {**INV, "amount": 6000}
    _, first = await harness.decide(
        call(harness, "exchange", arguments=big, principal=harness.principal(claims=ALICE_MFA))
    )
    assert isinstance(first, ApprovalRequired)
    await _approve(harness, first.extra["approval_id"])
    tokens = []
    for _ in range(2):  # exchanges do not spend the approval
        _, exchanged = await harness.decide(
            call(harness, "exchange", arguments=big, principal=harness.principal(claims=ALICE_MFA))
        )
        assert isinstance(exchanged, Authorized), exchanged
        tokens.append(exchanged.txn_token)
    _, spent = await harness.decide(
        _invoke(harness, tokens[0], big, principal=harness.principal(claims=ALICE_MFA))
    )
    assert isinstance(spent, Authorized)
    _, refused = await harness.decide(
        _invoke(harness, tokens[1], big, principal=harness.principal(claims=ALICE_MFA))
    )
    assert isinstance(refused, ApprovalRequired)  # its approval is spent: a new one is filed
    await _approve(harness, refused.extra["approval_id"])

    principal = harness.principal(claims=ALICE_MFA)
    _, through = await harness.decide(_invoke(harness, tokens[1], big, principal=principal))
    assert isinstance(through, Authorized), through  # found by its binding; the proof is not claimed twice
    assert not await harness.proof_unburnt(principal)
    assert not await harness.store.claim(txn_replay_key(through.txn), 60)  # the token is consumed


async def test_discovery_decides_under_the_runtime_it_is_given_not_the_current_one(harness: Harness) -> None:
    # /v1/tools reads the runtime once and hands it down: a reload landing while it awaits (authentication, the
    # guard) must not make discovery build its Env for the new policy set and the grants use the old one
    current = harness.services.runtime.current
    everything_hidden = replace(
        current,
        policies=PolicySet.compile(
            [Policy(id="nobody", tools=["*"], effect="allow", when="false")],
            tools=list(current.tools),
            counters=[],
        ),
    )
    principal = harness.principal()
    names = list(current.tools)
    _, under_current = await discover(harness.services, current, principal, names, time.time())
    env, under_given = await discover(harness.services, everything_hidden, principal, names, time.time())
    assert "approveExpense" in under_current and under_given == []
    assert env.covers(everything_hidden.policies.needs)
