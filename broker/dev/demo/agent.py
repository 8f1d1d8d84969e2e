"""``make demo``: an agent walks the expense scenario (CONTRACT §11, rows 1-14) against a running ``make run``.

    python -m broker.dev.demo.agent --certs certs [--broker https://localhost:8443]

Tokens come from the development IdP (:mod:`broker.dev.idp`, the certs folder's ``idp.jwk``); calls go through
:class:`broker.sdk.agent.AgentClient` with the agents' X.509-SVIDs and DPoP keys, and approvers (carol, dave, sam)
decide with their own DPoP-bound MFA tokens and no client certificate. Each step prints one line: the stages of
a multi-call step, then its final answer::

    ok    6    alice, no MFA, exchanges for 6000             -> 401 insufficient_user_authentication acr_values="mfa"
    ok    7    alice (MFA) approves 6000: one manager        -> exchange 403 approval_required manager_approval;
               carol approves: approved; exchange with approval_id 200; invoke 200 INV-9001 approved ...  (one line)

and the exit status is 0 when every stage of every step got the expected status and error code, else 1 with
the mismatches listed. ``--broker`` must be the broker's ``server.public_url``: DPoP proofs are bound to it.

Fresh subjects per run: the broker keeps velocity counters (allowed approvals per subject over 10 minutes) and
approvals (per subject and arguments) in its state store, so a second walk as plain "alice" would find her
earlier approvals and a 6th one would need a security review. Each run therefore mints its tokens for
``alice-<run id>`` and ``bob-<run id>`` with exactly the §11 claims, and the velocity step (row 12) uses its own
subject ``alice-<run id>-velocity`` so that it starts from zero whatever earlier steps did. Approvers keep their
names. The walk is thus deterministic on a fresh ``make run`` and repeatable against the same running broker.

Steps are data (:data:`STEPS`, a list of :class:`Step`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from broker.dev.idp import (
    DEFAULT_TRUST_DOMAIN,
    agent_spiffe_id,
    jkt_of,
    mint_access_token,
    read_jwk,
    trust_domain_of,
)
from broker.jose import JoseError, b64url_decode, generate_ec_jwk, public_key_from_jwk, verify_signature
from broker.sdk.agent import AgentClient, ClientReply

__all__ = [
    "AGENT",
    "APPROVERS",
    "OTHER_AGENT",
    "STEPS",
    "USERS",
    "Demo",
    "Expect",
    "Mismatch",
    "Outcome",
    "Step",
    "main",
    "run_steps",
]

AGENT = "expense-assistant"  #: may use both tools (§11)
OTHER_AGENT = "travel-bot"  #: may use neither
TOOL = "approveExpense"
#: the IdP claims of the scenario's users (CONTRACT §11 "Claims"); steps add acr / risk_score as they need
USERS: Mapping[str, Mapping[str, Any]] = {
    "alice": {"groups": ["finance-managers"], "department": "42", "approval_limit": 20000},
    "bob": {"groups": ["engineers"], "department": "42"},
}
#: approvers: humans calling the approvals API with their own DPoP key (``humans/NAME-dpop.jwk``) and MFA
APPROVERS: Mapping[str, Mapping[str, Any]] = {
    "carol": {"groups": ["managers"], "acr": "mfa"},
    "dave": {"groups": ["managers"], "acr": "mfa"},
    "sam": {"groups": ["security"], "acr": "mfa"},
}
#: approveExpense's grant constraints for alice (CONTRACT §11 row 1)
ALICE_CONSTRAINTS: Mapping[str, Any] = {
    "amount_max": 5000,
    "department": "42",
    "step_up": [
        {"above": 5000, "requires": ["mfa", "manager_approval"]},
        {"above": 10000, "requires": ["mfa", "dual_approval"]},
    ],
}
# the dev backend's invoices (broker.dev.demo.expense.SEED_INVOICES): the backend refuses any other amount (409)
INV_8831 = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}
INV_9001 = {"invoice_id": "INV-9001", "amount": 6000, "department": "42"}
INV_9002 = {"invoice_id": "INV-9002", "amount": 12000, "department": "42"}
INV_9003 = {"invoice_id": "INV-9003", "amount": 999999, "department": "42"}
INV_9004 = {"invoice_id": "INV-9004", "amount": 100, "department": "42"}
INV_7 = {"invoice_id": "INV-7", "amount": 350, "department": "7"}
VELOCITY_LIMIT = 5  #: expense.yaml ``velocity``: counters.approvals_10m.count >= 5 needs a security review
_AGENT_KEY: Any = object()  #: sentinel: sign proofs with the agent's own DPoP key (the normal case)


class Mismatch(Exception):
    """A stage of a step did not get the expected answer; the step stops there and fails."""


@dataclass(frozen=True)
class Expect:
    """The expected HTTP status and, for refusals, the error code (JSON ``error`` / ``WWW-Authenticate``)."""

    status: int
    error: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.error}" if self.error else str(self.status)

    def matches(self, reply: ClientReply) -> bool:
        return reply.status == self.status and (self.error is None or reply.error == self.error)


def _brief(reply: ClientReply) -> str:
    return f"{reply.status} {reply.error}" if reply.error else str(reply.status)


def body_of(reply: ClientReply) -> dict[str, Any]:
    """The reply's JSON object; :class:`Mismatch` when it is none."""
    try:
        body = reply.json()
    except ValueError:
        raise Mismatch(f"the {reply.status} answer is not JSON") from None
    if not isinstance(body, dict):
        raise Mismatch(f"the {reply.status} answer is not a JSON object")
    return body


@dataclass
class Demo:
    """What steps need: the broker URL, the certs folder, token minting, clients (closed at the end), this run's
    subjects, the notes of the current step, and what one step leaves for the next (``spent_txn``)."""

    base_url: str
    certs: Path
    stack: AsyncExitStack
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    idp_jwk: dict[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    notes: list[str] = field(default_factory=list)
    #: what the current step's final call is, when it has stages before it ("invoke")
    final: str = ""
    #: step 3's txn token, already consumed (step 4 presents it again)
    spent_txn: str | None = None

    @classmethod
    def open(cls, base_url: str, certs: Path, stack: AsyncExitStack) -> Demo:
        """Read the IdP key and trust domain from ``certs``; ValueError naming a missing file."""
        return cls(
            base_url=base_url,
            certs=certs,
            stack=stack,
            trust_domain=trust_domain_of(certs / "ca.pem") or DEFAULT_TRUST_DOMAIN,
            idp_jwk=read_jwk(certs / "idp.jwk"),
        )

    def subject(self, user: str) -> str:
        """``user``'s token subject in this run (module docstring: fresh counters and approvals per run)."""
        return f"{user}-{self.run_id}"

    def agent_dpop_jwk(self, agent: str) -> dict[str, Any]:
        return read_jwk(self.certs / "agents" / f"{agent}-dpop.jwk")

    def token(self, user: str, *, agent: str = AGENT, sub: str | None = None, **claims: Any) -> str:
        """``user``'s access token for ``agent``: bound to the agent's DPoP key, ``act.sub`` = its SPIFFE ID.

        ``sub`` defaults to :meth:`subject`; ``claims`` are added to (and override) the user's :data:`USERS`.
        """
        return mint_access_token(
            self.idp_jwk,
            sub=sub or self.subject(user),
            now=time.time(),
            act_sub=agent_spiffe_id(self.trust_domain, agent),
            cnf_jkt=jkt_of(self.agent_dpop_jwk(agent)),
            claims={**USERS[user], **claims},
        )

    async def client(
        self,
        token: str,
        *,
        certificate_of: str = AGENT,
        proof_key: Mapping[str, Any] | None = _AGENT_KEY,
        dpop_agent: str = AGENT,
    ) -> AgentClient:
        """An entered client presenting ``certificate_of``'s SVID and ``token``.

        Proofs are signed with ``dpop_agent``'s DPoP key, or with ``proof_key`` when given (None: no proof).
        """
        folder = self.certs / "agents"
        client = AgentClient(
            self.base_url,
            ca=self.certs / "ca.pem",
            cert=folder / f"{certificate_of}.pem",
            key=folder / f"{certificate_of}-key.pem",
            dpop_jwk=self.agent_dpop_jwk(dpop_agent) if proof_key is _AGENT_KEY else proof_key,
            access_token=token,
            trust_domain=self.trust_domain,
        )
        return await self.stack.enter_async_context(client)

    async def alice(self, **claims: Any) -> AgentClient:
        """alice through the expense assistant, everything genuine."""
        return await self.client(self.token("alice", **claims))

    async def approver(self, name: str) -> AgentClient:
        """An approver of :data:`APPROVERS` calling directly: own DPoP key, MFA, no ``act``, no certificate."""
        key = read_jwk(self.certs / "humans" / f"{name}-dpop.jwk")
        token = mint_access_token(
            self.idp_jwk, sub=name, now=time.time(), cnf_jkt=jkt_of(key), claims=APPROVERS[name]
        )
        client = AgentClient.from_certs(self.base_url, self.certs, human=name, access_token=token)
        return await self.stack.enter_async_context(client)

    def expect(self, reply: ClientReply, expected: Expect, doing: str, detail: str = "") -> ClientReply:
        """Judge an intermediate stage: note ``doing <status> <detail>``, or raise :class:`Mismatch`."""
        if not expected.matches(reply):
            raise Mismatch(f"{doing}: got {_brief(reply)}, expected {expected}")
        self.notes.append(f"{doing} {_brief(reply)}{' ' + detail if detail else ''}")
        return reply


Run = Callable[[Demo], Awaitable[ClientReply]]


@dataclass(frozen=True)
class Step:
    """One row of the walk: ``run`` makes the call(s) and returns the reply that ``expect`` judges.

    ``run`` judges its intermediate stages itself (:meth:`Demo.expect`, :class:`Mismatch`); ``check`` may add
    expectations on the final reply (returns a mismatch description or None); ``summary`` renders a
    successful final reply in a few words.
    """

    name: str
    what: str
    run: Run
    expect: Expect
    summary: Callable[[ClientReply], str] | None = None
    check: Callable[[ClientReply], str | None] | None = None


@dataclass(frozen=True)
class Outcome:
    step: Step
    ok: bool
    line: str
    problem: str | None = None


# --- stages shared by steps -----------------------------------------------------------------------------


async def _txn_token(
    demo: Demo, client: AgentClient, arguments: Mapping[str, Any], doing: str, approval_id: str | None = None
) -> str:
    """Exchange for a txn token (must answer 200) and return it."""
    reply = demo.expect(await client.exchange(TOOL, arguments, approval_id=approval_id), Expect(200), doing)
    token = body_of(reply).get("access_token")
    if not isinstance(token, str):
        raise Mismatch(f"{doing}: no access_token in the 200 answer")
    return token


async def _approval_needed(
    demo: Demo, client: AgentClient, arguments: Mapping[str, Any], required: list[str]
) -> str:
    """Exchange where policy obligates approvals: must be ``403 approval_required`` naming ``required``."""
    reply = await client.exchange(TOOL, arguments)
    got = body_of(reply).get("required") if reply.status == 403 else None
    shown = "+".join(str(name) for name in got) if isinstance(got, list) else ""
    demo.expect(reply, Expect(403, "approval_required"), "exchange", shown)
    if got != required:
        raise Mismatch(f"exchange: approval requires {got}, expected {required}")
    approval_id = body_of(reply).get("approval_id")
    if not isinstance(approval_id, str):
        raise Mismatch("exchange: approval_required without an approval_id")
    return approval_id


async def _approve(demo: Demo, approval_id: str, approver: str, state: str) -> None:
    """``approver`` approves; the approval must then be in ``state`` (pending until every vote is in)."""
    reply = await (await demo.approver(approver)).decide(approval_id, "approve")
    if reply.status != 200:
        raise Mismatch(f"{approver} approves: got {_brief(reply)}, expected 200")
    got = body_of(reply).get("state")
    demo.notes.append(f"{approver} approves: {got}")
    if got != state:
        raise Mismatch(f"after {approver}'s approval the state is {got}, expected {state}")


def _check_approved(reply: ClientReply, invoice: Mapping[str, Any]) -> None:
    """A backend answer for ``invoice``: approved, in department 42, bank account masked to ``****`` + 4."""
    body = body_of(reply)
    vendor = body.get("vendor")
    account = str(vendor.get("bank_account", "")) if isinstance(vendor, dict) else ""
    if body.get("invoice_id") != invoice["invoice_id"] or body.get("status") != "approved":
        raise Mismatch(f"the backend answered {body.get('invoice_id')} {body.get('status')}")
    if body.get("department") != "42":
        raise Mismatch(
            f"the backend approved for department {body.get('department')!r}, not the subject's 42"
        )
    if not (account.startswith("****") and len(account) == 8):
        raise Mismatch(f"bank account {account!r} is not masked to its last 4 characters")


async def _exchange_and_invoke(
    demo: Demo, client: AgentClient, invoice: Mapping[str, Any], approval_id: str | None = None
) -> ClientReply:
    doing = "exchange with approval_id" if approval_id else "exchange"
    token = await _txn_token(demo, client, invoice, doing, approval_id)
    demo.final = "invoke"
    reply = await client.call_tool(TOOL, invoice, txn_token=token)
    if reply.status == 200:
        _check_approved(reply, invoice)
    return reply


def _approved(reply: ClientReply) -> str:
    body = reply.json()
    vendor = body.get("vendor", {})
    return (
        f"{body.get('invoice_id')} {body.get('status')} (amount {body.get('amount')}, department "
        f"{body.get('department')}, {vendor.get('name')} bank {vendor.get('bank_account')})"
    )


# --- the steps ------------------------------------------------------------------------------------------


def _grant_claims(grant: str, jwks: Mapping[str, Any]) -> dict[str, Any]:
    """The claims of a ``grant+jwt``, verified with the broker's JWKS; :class:`Mismatch` if it does not verify."""
    try:
        header_b64, payload_b64, signature_b64 = grant.split(".")
        header = json.loads(b64url_decode(header_b64))
        [jwk] = [k for k in jwks.get("keys", []) if k.get("kid") == header.get("kid")]
        signed = verify_signature(
            public_key_from_jwk(jwk),
            str(header.get("alg")),
            f"{header_b64}.{payload_b64}".encode("ascii"),
            b64url_decode(signature_b64),
        )
        claims = json.loads(b64url_decode(payload_b64))
    except (ValueError, JoseError, AttributeError) as exc:
        raise Mismatch(f"the approveExpense grant is unreadable: {type(exc).__name__}") from None
    if not signed or header.get("typ") != "grant+jwt" or not isinstance(claims, dict):
        raise Mismatch("the approveExpense grant does not verify with /.well-known/jwks.json")
    return claims


async def _alice_lists_tools(demo: Demo) -> ClientReply:
    alice = await demo.alice()
    reply = await alice.list_tools()
    if reply.status != 200:
        return reply
    tools = {str(t.get("name")): t for t in body_of(reply).get("tools", [])}
    if sorted(tools) != ["approveExpense", "listInvoices"]:
        raise Mismatch(f"alice sees {sorted(tools)}, expected approveExpense and listInvoices")
    keys = await alice.request("GET", "/.well-known/jwks.json")
    if keys.status != 200:
        raise Mismatch(f"GET /.well-known/jwks.json: got {_brief(keys)}")
    grant = _grant_claims(str(tools["approveExpense"].get("grant")), body_of(keys))
    expected_act = {"sub": agent_spiffe_id(demo.trust_domain, AGENT)}
    if grant.get("sub") != demo.subject("alice") or grant.get("act") != expected_act:
        raise Mismatch(f"the grant is for sub {grant.get('sub')!r}, act {grant.get('act')}")
    if grant.get("constraints") != ALICE_CONSTRAINTS:
        raise Mismatch(f"grant constraints {grant.get('constraints')}, expected {dict(ALICE_CONSTRAINTS)}")
    return reply


def _tools_and_constraints(reply: ClientReply) -> str:
    tools = reply.json()["tools"]
    names = ", ".join(str(tool.get("name")) for tool in tools)
    [grant] = [str(t["grant"]) for t in tools if t.get("name") == TOOL]
    constraints = json.loads(b64url_decode(grant.split(".")[1]))["constraints"]
    steps = ", ".join(f">{s['above']} {'+'.join(s['requires'])}" for s in constraints["step_up"])
    return (
        f"{names}; signed grant: amount_max {constraints['amount_max']}, department "
        f"{constraints['department']}, step_up {steps}"
    )


async def _alice_lists_invoices(demo: Demo) -> ClientReply:
    return await (await demo.alice()).call_tool("listInvoices", {"department": "42"})


def _invoice_count(reply: ClientReply) -> str:
    invoices = reply.json().get("invoices", [])
    departments = sorted({str(row.get("department")) for row in invoices})
    return f"{len(invoices)} invoices (department {', '.join(departments) or '-'})"


async def _bob(demo: Demo) -> ClientReply:
    bob = await demo.client(demo.token("bob"))
    listed = demo.expect(await bob.list_tools(), Expect(200), "list")
    names = [str(t.get("name")) for t in body_of(listed).get("tools", [])]
    demo.notes[-1] += f" {', '.join(names) or 'no tools'}"
    if names != ["listInvoices"]:
        raise Mismatch(f"bob sees {names}, expected listInvoices only")
    demo.final = "exchange"
    return await bob.exchange(TOOL, INV_8831)


async def _approve_8831(demo: Demo) -> ClientReply:
    alice = await demo.alice()
    token = await _txn_token(demo, alice, INV_8831, "exchange")
    demo.final = "invoke"
    reply = await alice.call_tool(TOOL, INV_8831, txn_token=token)
    if reply.status == 200:
        _check_approved(reply, INV_8831)
        demo.spent_txn = token
    return reply


async def _replayed_txn_token(demo: Demo) -> ClientReply:
    if demo.spent_txn is None:  # step 3 failed: spend one here, so that this step still shows its own point
        demo.expect(await _approve_8831(demo), Expect(200), "first use")
    if demo.spent_txn is None:
        raise Mismatch("no txn token was spent")
    demo.final = "step 3's txn token again"
    return await (await demo.alice()).call_tool(TOOL, INV_8831, txn_token=demo.spent_txn)


async def _changed_amount(demo: Demo) -> ClientReply:
    alice = await demo.alice()
    token = await _txn_token(demo, alice, INV_8831, "exchange for 4800")
    demo.final = "invoke with 4900"
    return await alice.call_tool(TOOL, {**INV_8831, "amount": 4900}, txn_token=token)


async def _6000_without_mfa(demo: Demo) -> ClientReply:
    reply = await (await demo.alice()).exchange(TOOL, INV_9001)
    challenge = ", ".join(reply.headers.getall("WWW-Authenticate", []))
    if reply.status == 401 and 'acr_values="mfa"' not in challenge:
        raise Mismatch(f'the challenge does not ask for acr_values="mfa": {challenge!r}')
    return reply


def _challenge(reply: ClientReply) -> str:
    challenge = str(reply.headers.get("WWW-Authenticate", ""))
    acr = (
        "acr_values=" + challenge.split("acr_values=", 1)[1].split(",", 1)[0]
        if "acr_values=" in challenge
        else ""
    )
    return f"{acr} ({reply.json().get('error_description')})"


async def _6000_with_manager(demo: Demo) -> ClientReply:
    alice = await demo.alice(acr="mfa")
    approval_id = await _approval_needed(demo, alice, INV_9001, ["manager_approval"])
    await _approve(demo, approval_id, "carol", "approved")
    return await _exchange_and_invoke(demo, alice, INV_9001, approval_id)


async def _12000_with_two_managers(demo: Demo) -> ClientReply:
    alice = await demo.alice(acr="mfa")
    approval_id = await _approval_needed(demo, alice, INV_9002, ["dual_approval"])
    await _approve(demo, approval_id, "carol", "pending")
    one = await alice.exchange(TOOL, INV_9002, approval_id=approval_id)
    demo.expect(one, Expect(403, "approval_required"), "exchange with one approval:")
    await _approve(demo, approval_id, "dave", "approved")
    return await _exchange_and_invoke(demo, alice, INV_9002, approval_id)


async def _other_department(demo: Demo) -> ClientReply:
    return await (await demo.alice()).exchange(TOOL, INV_7)


async def _over_the_limit(demo: Demo) -> ClientReply:
    # CONTRACT §8: a deny beats an obligation, so MFA changes nothing
    demo.expect(await (await demo.alice()).exchange(TOOL, INV_9003), Expect(403, "access_denied"), "no MFA:")
    demo.final = "with MFA:"
    return await (await demo.alice(acr="mfa")).exchange(TOOL, INV_9003)


def _description(reply: ClientReply) -> str:
    return f"({reply.json().get('error_description')})"


async def _risky_session(demo: Demo) -> ClientReply:
    reply = await (await demo.alice(risk_score=85)).exchange(TOOL, INV_9004)
    required = body_of(reply).get("required") if reply.status == 403 else None
    if reply.status == 403 and required != ["manager_approval"]:
        raise Mismatch(f"approval requires {required}, expected ['manager_approval']")
    return reply


def _required(reply: ClientReply) -> str:
    return "+".join(str(name) for name in reply.json().get("required", []))


async def _velocity(demo: Demo) -> ClientReply:
    # Its own subject (module docstring): the 5 approvals in the window are exactly these 5.
    alice = await demo.client(demo.token("alice", sub=f"{demo.subject('alice')}-velocity"))
    for number in range(1, VELOCITY_LIMIT + 1):
        token = await _txn_token(demo, alice, INV_8831, f"exchange {number}")
        demo.notes.pop()  # one line per step: the five rounds are summarised below
        invoked = await alice.call_tool(TOOL, INV_8831, txn_token=token)
        demo.expect(invoked, Expect(200), f"invoke {number}")
        demo.notes.pop()
    demo.notes.append(f"{VELOCITY_LIMIT} approvals invoked")
    approval_id = await _approval_needed(demo, alice, INV_8831, ["security_review"])
    await _approve(demo, approval_id, "sam", "approved")
    return await _exchange_and_invoke(demo, alice, INV_8831, approval_id)


async def _token_with_other_certificate(demo: Demo) -> ClientReply:
    # Everything genuine but the TLS identity: travel-bot's SVID with a token whose act.sub is the assistant.
    client = await demo.client(demo.token("alice"), certificate_of=OTHER_AGENT)
    return await client.list_tools()


async def _proof_with_other_key(demo: Demo) -> ClientReply:
    # A well-formed proof by a key that is not the token's cnf.jkt (RFC 9449 §4.3 check 12).
    client = await demo.client(demo.token("alice"), proof_key=generate_ec_jwk())
    return await client.list_tools()


async def _no_proof(demo: Demo) -> ClientReply:
    client = await demo.client(demo.token("alice"), proof_key=None)
    return await client.list_tools()


async def _replayed_proof(demo: Demo) -> ClientReply:
    # RFC 9449 §11.1: the same proof twice. The first use must be accepted, or the second proves nothing.
    client = await demo.alice()
    proof = client.proof_for("GET", "/v1/tools")
    demo.expect(await client.request("GET", "/v1/tools", headers={"DPoP": proof}), Expect(200), "first use")
    demo.final = "again"
    return await client.request("GET", "/v1/tools", headers={"DPoP": proof})


STEPS: list[Step] = [
    Step("1", "alice lists tools", _alice_lists_tools, Expect(200), summary=_tools_and_constraints),
    Step("1b", "alice lists invoices of department 42", _alice_lists_invoices, Expect(200), _invoice_count),
    Step("2", "bob lists tools, exchanges for approveExpense", _bob, Expect(404, "unknown_tool")),
    Step("3", "alice approves INV-8831 (4800, dept 42)", _approve_8831, Expect(200), summary=_approved),
    Step("4", "the same txn token a second time", _replayed_txn_token, Expect(403, "invalid_txn_token")),
    Step("5", "a txn token for 4800 invoked with 4900", _changed_amount, Expect(403, "txn_token_mismatch")),
    Step(
        "6",
        "alice, no MFA, exchanges for 6000",
        _6000_without_mfa,
        Expect(401, "insufficient_user_authentication"),
        summary=_challenge,
    ),
    Step("7", "alice (MFA) approves 6000: one manager", _6000_with_manager, Expect(200), summary=_approved),
    Step("8", "alice (MFA) approves 12000: two managers", _12000_with_two_managers, Expect(200), _approved),
    Step(
        "9",
        "alice approves INV-7 of department 7",
        _other_department,
        Expect(403, "access_denied"),
        _description,
    ),
    Step(
        "10",
        "alice approves 999999, without/with MFA",
        _over_the_limit,
        Expect(403, "access_denied"),
        _description,
    ),
    Step(
        "11",
        "alice, risk_score 85, approves 100",
        _risky_session,
        Expect(403, "approval_required"),
        _required,
    ),
    Step("12", "a 6th approval within 10 minutes", _velocity, Expect(200), summary=_approved),
    Step(
        "13",
        "alice's token, travel-bot's certificate",
        _token_with_other_certificate,
        Expect(401, "invalid_token"),
    ),
    Step(
        "14a", "alice's token, proof by another key", _proof_with_other_key, Expect(401, "invalid_dpop_proof")
    ),
    Step("14b", "alice's token without a DPoP proof", _no_proof, Expect(401, "invalid_dpop_proof")),
    Step("14c", "the same DPoP proof sent twice", _replayed_proof, Expect(401, "invalid_dpop_proof")),
]


# --- running --------------------------------------------------------------------------------------------


def _describe(reply: ClientReply, step: Step) -> str:
    text = _brief(reply)
    if step.summary is not None and step.expect.matches(reply):
        try:
            text += f" {step.summary(reply)}"
        except (ValueError, AttributeError, TypeError, KeyError, IndexError) as exc:  # unexpected body shape
            text += f" (unreadable body: {type(exc).__name__})"
    return text


async def _run_step(demo: Demo, step: Step) -> Outcome:
    label = f"{step.name:<5}{step.what:<46}"
    demo.notes, demo.final = [], ""
    try:
        reply = await step.run(demo)
    except (aiohttp.ClientError, TimeoutError) as exc:  # connection refused, TLS failure, timeout
        failure = f"no answer: {type(exc).__name__}: {exc} (is `make run` serving {demo.base_url}?)"
        return Outcome(step, False, f"FAIL  {label}-> {failure}", failure)
    except Mismatch as exc:
        done = "; ".join([*demo.notes, str(exc)])
        return Outcome(step, False, f"FAIL  {label}-> {done}", str(exc))
    except (AttributeError, TypeError, KeyError) as exc:  # a JSON answer of an unexpected shape
        failure = f"unexpected answer: {type(exc).__name__}: {exc}"
        return Outcome(step, False, f"FAIL  {label}-> {'; '.join([*demo.notes, failure])}", failure)
    described = "; ".join([*demo.notes, f"{demo.final} {_describe(reply, step)}".lstrip()])
    if not step.expect.matches(reply):
        mismatch = f"got {_brief(reply)}, expected {step.expect}"
        return Outcome(step, False, f"FAIL  {label}-> {described}   (expected {step.expect})", mismatch)
    problem = step.check(reply) if step.check is not None else None
    if problem is not None:
        return Outcome(step, False, f"FAIL  {label}-> {described}   ({problem})", problem)
    return Outcome(step, True, f"ok    {label}-> {described}")


async def run_steps(
    base_url: str,
    certs: Path,
    steps: Sequence[Step] = STEPS,
    *,
    out: Callable[[str], None] = print,
) -> list[Outcome]:
    """Run ``steps`` in order against the broker at ``base_url``, printing one line per step via ``out``
    (after a first line naming this run's subjects)."""
    async with AsyncExitStack() as stack:
        demo = Demo.open(base_url.rstrip("/"), certs, stack)
        out(
            f"run {demo.run_id}: alice is {demo.subject('alice')} and bob is {demo.subject('bob')} "
            f"(fresh subjects: counters and approvals of earlier runs do not apply)"
        )
        outcomes = []
        for step in steps:
            outcome = await _run_step(demo, step)
            out(outcome.line)
            outcomes.append(outcome)
        if steps is STEPS:
            await _leave_one_for_the_browser(demo, out)
        return outcomes


async def _leave_one_for_the_browser(demo: Demo, out: Callable[[str], None]) -> None:
    """Row 7 once more, left pending: its approval page link, for a manager to decide in a browser
    (CONTRACT §14; `make run` serves the development IdP the page signs in with)."""
    invoice = {"invoice_id": "INV-9005", "amount": 6000, "department": "42"}
    try:
        reply = await (await demo.alice(acr="mfa")).exchange(TOOL, invoice)
        url = body_of(reply).get("approval_url")
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
        return
    if reply.status == 403 and isinstance(url, str):
        out(
            f"\nin a browser: {url}\n  sign in as carol (or dave) with MFA and approve INV-9005 "
            f"(6000) for {demo.subject('alice')}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.dev.demo.agent",
        description="Walk the expense scenario (CONTRACT §11) against a running broker (`make run`), "
        "one line per step; exit 0 when every step had the expected outcome, else 1.",
        epilog="example:\n  python -m broker.dev.demo.agent --certs certs --broker https://localhost:8443",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--certs", type=Path, default=Path("certs"), metavar="DIR", help="the `broker certs` folder"
    )
    parser.add_argument(
        "--broker",
        default="https://localhost:8443",
        metavar="URL",
        help="the broker's server.public_url (DPoP proofs are bound to it; default https://localhost:8443)",
    )
    args = parser.parse_args(argv)
    try:
        outcomes = asyncio.run(run_steps(args.broker, args.certs))
    except (ValueError, OSError) as exc:  # a missing or unreadable certs folder (keys, certificates)
        print(f"demo agent: {exc} (run `make certs` first?)", file=sys.stderr)
        return 2
    failed = [outcome for outcome in outcomes if not outcome.ok]
    if not failed:
        print(f"\nall {len(outcomes)} steps matched the expected outcome")
        return 0
    print(f"\n{len(failed)} of {len(outcomes)} steps did not match:")
    for outcome in failed:
        print(f"  {outcome.step.name} {outcome.step.what}: {outcome.problem}")
    return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
