"""``make demo``: an agent walks the expense scenario (CONTRACT §11) against a running ``make run``.

    python -m broker.demo.agent --certs certs [--broker https://localhost:8443]

Tokens come from the development IdP (:mod:`broker.idp`, the certs folder's ``idp.jwk``); calls go through
:class:`broker.client.AgentClient` with the agents' X.509-SVIDs and DPoP keys. Each step prints one line::

    ok    1    alice lists tools                          -> 200 approveExpense, listInvoices

and the exit status is 0 when every step got the expected status and error code, else 1 with the mismatches
listed. ``--broker`` must be the broker's ``server.public_url``: DPoP proofs are bound to that URL (``htu``).

Steps are data (:data:`STEPS`, a list of :class:`Step`); later rows of the §11 table are added by appending.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from broker.client import AgentClient, ClientReply
from broker.idp import (
    DEFAULT_TRUST_DOMAIN,
    agent_spiffe_id,
    jkt_of,
    mint_access_token,
    read_jwk,
    trust_domain_of,
)
from broker.jose import generate_ec_jwk

__all__ = ["AGENT", "OTHER_AGENT", "STEPS", "USERS", "Demo", "Expect", "Outcome", "Step", "main", "run_steps"]

AGENT = "expense-assistant"  #: may use both tools (§11)
OTHER_AGENT = "travel-bot"  #: may use neither
#: the IdP claims of the scenario's users (CONTRACT §11 "Claims"); steps add acr / risk_score as they need
USERS: Mapping[str, Mapping[str, Any]] = {
    "alice": {"groups": ["finance-managers"], "department": "42", "approval_limit": 20000},
    "bob": {"groups": ["engineers"], "department": "42"},
}
_AGENT_KEY: Any = object()  #: sentinel: sign proofs with the agent's own DPoP key (the normal case)


@dataclass
class Demo:
    """What steps need: the broker URL, the certs folder, token minting and clients (closed at the end)."""

    base_url: str
    certs: Path
    stack: AsyncExitStack
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    idp_jwk: dict[str, Any] = field(default_factory=dict)

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

    def agent_dpop_jwk(self, agent: str) -> dict[str, Any]:
        return read_jwk(self.certs / "agents" / f"{agent}-dpop.jwk")

    def token(self, user: str, *, agent: str = AGENT, **claims: Any) -> str:
        """``user``'s access token for ``agent``: bound to the agent's DPoP key, ``act.sub`` = its SPIFFE ID.

        ``claims`` are added to (and override) the user's claims from :data:`USERS`.
        """
        return mint_access_token(
            self.idp_jwk,
            sub=user,
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


@dataclass(frozen=True)
class Expect:
    """The expected HTTP status and, for refusals, the error code (JSON ``error`` / ``WWW-Authenticate``)."""

    status: int
    error: str | None = None

    def __str__(self) -> str:
        return f"{self.status} {self.error}" if self.error else str(self.status)

    def matches(self, reply: ClientReply) -> bool:
        return reply.status == self.status and (self.error is None or reply.error == self.error)


Run = Callable[[Demo], Awaitable[ClientReply]]


@dataclass(frozen=True)
class Step:
    """One row of the walk: ``run`` makes the call(s) and returns the reply that ``expect`` judges.

    ``check`` may add expectations beyond status and error (returns a mismatch description or None);
    ``summary`` renders a successful reply in a few words.
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


# --- the steps ------------------------------------------------------------------------------------------


async def _alice_lists_tools(demo: Demo) -> ClientReply:
    return await (await demo.alice()).list_tools()


async def _alice_lists_invoices(demo: Demo) -> ClientReply:
    return await (await demo.alice()).call_tool("listInvoices", {"department": "42"})


async def _replayed_proof(demo: Demo) -> ClientReply:
    # RFC 9449 §11.1: the same proof twice. The first use must be accepted, or the second proves nothing.
    client = await demo.alice()
    proof = client.proof_for("GET", "/v1/tools")
    first = await client.request("GET", "/v1/tools", headers={"DPoP": proof})
    if first.status != 200:
        return first
    return await client.request("GET", "/v1/tools", headers={"DPoP": proof})


async def _token_with_other_certificate(demo: Demo) -> ClientReply:
    # Everything genuine but the TLS identity: travel-bot's SVID with a token whose act.sub is the assistant.
    client = await demo.client(demo.token("alice"), certificate_of=OTHER_AGENT)
    return await client.list_tools()


async def _no_proof(demo: Demo) -> ClientReply:
    client = await demo.client(demo.token("alice"), proof_key=None)
    return await client.list_tools()


async def _proof_with_other_key(demo: Demo) -> ClientReply:
    # A well-formed proof by a key that is not the token's cnf.jkt (RFC 9449 §4.3 check 12).
    client = await demo.client(demo.token("alice"), proof_key=generate_ec_jwk())
    return await client.list_tools()


def _tool_names(reply: ClientReply) -> str:
    tools = reply.json().get("tools", [])
    return ", ".join(str(tool.get("name")) for tool in tools) or "no tools"


def _invoice_count(reply: ClientReply) -> str:
    invoices = reply.json().get("invoices", [])
    departments = sorted({str(row.get("department")) for row in invoices})
    return f"{len(invoices)} invoices (department {', '.join(departments) or '-'})"


STEPS: list[Step] = [
    Step("1", "alice lists tools", _alice_lists_tools, Expect(200), summary=_tool_names),
    Step(
        "1b",
        "alice lists invoices of department 42",
        _alice_lists_invoices,
        Expect(200),
        summary=_invoice_count,
    ),
    Step("14c", "the same DPoP proof sent twice", _replayed_proof, Expect(401, "invalid_dpop_proof")),
    Step(
        "13",
        "alice's token with travel-bot's certificate",
        _token_with_other_certificate,
        Expect(401, "invalid_token"),
    ),
    Step("14b", "alice's token without a DPoP proof", _no_proof, Expect(401, "invalid_dpop_proof")),
    Step(
        "14a",
        "alice's token, proof by another key",
        _proof_with_other_key,
        Expect(401, "invalid_dpop_proof"),
    ),
]


# --- running --------------------------------------------------------------------------------------------


def _describe(reply: ClientReply, step: Step) -> str:
    text = str(reply.status)
    if reply.error:
        text += f" {reply.error}"
    if step.summary is not None and step.expect.matches(reply):
        try:
            text += f" {step.summary(reply)}"
        except (ValueError, AttributeError, TypeError) as exc:  # a 200 whose body is not the expected shape
            text += f" (unreadable body: {type(exc).__name__})"
    return text


async def _run_step(demo: Demo, step: Step) -> Outcome:
    label = f"{step.name:<5}{step.what:<46}"
    try:
        reply = await step.run(demo)
    except (aiohttp.ClientError, TimeoutError) as exc:  # connection refused, TLS failure, timeout
        failure = f"no answer: {type(exc).__name__}: {exc} (is `make run` serving {demo.base_url}?)"
        return Outcome(step, False, f"FAIL  {label}-> {failure}", failure)
    described = _describe(reply, step)
    if not step.expect.matches(reply):
        return Outcome(
            step,
            False,
            f"FAIL  {label}-> {described}   (expected {step.expect})",
            f"got {described}, expected {step.expect}",
        )
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
    """Run ``steps`` in order against the broker at ``base_url``, printing one line per step via ``out``."""
    async with AsyncExitStack() as stack:
        demo = Demo.open(base_url.rstrip("/"), certs, stack)
        outcomes = []
        for step in steps:
            outcome = await _run_step(demo, step)
            out(outcome.line)
            outcomes.append(outcome)
        return outcomes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m broker.demo.agent",
        description="Walk the expense scenario (CONTRACT §11) against a running broker (`make run`), "
        "one line per step; exit 0 when every step had the expected outcome, else 1.",
        epilog="example:\n  python -m broker.demo.agent --certs certs --broker https://localhost:8443",
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
