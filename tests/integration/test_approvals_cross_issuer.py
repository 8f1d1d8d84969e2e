"""Four eyes across issuers: the API and the approvals page trust two issuers for the same people.

Agents and the approvals API present access tokens of ``https://idp.example.org``; the approvals page signs people
in at the development OpenID Provider (``approvals.ui.issuer``, another issuer), so one person reaches an approval
as (API issuer, sub) and as (page issuer, sub). The self-approval and distinct-approver rules compare ``sub`` across
issuers: voting once through each channel never lets a requester approve their own request nor one approver
count twice. Real parts: the broker and the IdP on real TLS, a hand-driven sign-in (``Stack`` of the hostile page
tests), the memory state store and the broker's audit file.
"""

from __future__ import annotations

import time
from typing import Any

from broker.canonical import args_digest
from broker.jose import generate_ec_jwk
from broker.resources import APPROVALS
from broker.txn.approval_rules import Approval
from tests.integration.test_approvals_page_hostile import INVOICE, Jar, Stack, stack

__all__ = ["stack"]  # the fixture, imported to be used here

API_ISSUER = "https://idp.example.org"  # base_config's issuer: the callers' access tokens
MANAGER = {"groups": ["managers"], "department": "42", "acr": "mfa"}


async def _approval(stack: Stack, approval_id: str) -> Approval:
    approval = await stack.broker.running.app[APPROVALS].book.get(approval_id, time.time())
    assert approval is not None
    return approval


async def _csrf(stack: Stack, client: Any, jar: Jar) -> tuple[str, str]:
    """The list page of the signed-in person: (its HTML, the session's CSRF token from the sign-out form)."""
    status, page, _ = await stack.get(client, "/approvals/", jar)
    assert status == 200, page
    return page, page.split('name="csrf" value="', 1)[1].split('"', 1)[0]


async def _decide_on_page(stack: Stack, client: Any, jar: Jar, approval_id: str, csrf: str) -> int:
    status, _ = await stack.post(
        client, f"/approvals/{approval_id}", jar, {"csrf": csrf, "decision": "approve"}
    )
    return status


async def test_a_requester_cannot_approve_their_own_request_through_the_page_issuer(stack: Stack) -> None:
    # carol, a manager, asks through her agent with an access token of the API issuer
    reply = await stack.broker.caller("carol", claims=MANAGER).exchange("approveExpense", INVOICE)
    assert reply.status == 403 and reply.error == "approval_required", reply.body
    approval_id = str(reply.body["approval_id"])
    assert (await _approval(stack, approval_id)).issuer == API_ISSUER
    async with stack.client() as client:
        jar = await stack.sign_in(client, "carol")  # the same carol at the page's issuer: the same person
        listed, csrf = await _csrf(stack, client, jar)
        assert approval_id not in listed and "INV-9001" not in listed
        status, page, _ = await stack.get(client, f"/approvals/{approval_id}", jar)
        assert status == 404 and "INV-9001" not in page
        assert await _decide_on_page(stack, client, jar, approval_id, csrf) == 403
    approval = await _approval(stack, approval_id)
    assert approval.state == "pending" and approval.approvals == ()  # nothing recorded
    assert [(r["reason"], r["subject"]) for r in stack.web_records()] == [("approval_self", "carol")]


async def test_one_approver_voting_through_the_api_and_the_page_counts_once(stack: Stack) -> None:
    approval, created = await stack.broker.running.app[APPROVALS].request(
        subject="alice",
        actor=stack.broker.pki.agent_id("expense-assistant"),
        tool="approveExpense",
        arguments=INVOICE,
        args_digest=args_digest(INVOICE),
        required=("dual_approval",),
        reason="above 10000 two managers approve",
        policy_version="test",
        now=time.time(),
        issuer=API_ISSUER,
    )
    assert created
    carol_api = stack.broker.caller("carol", agent=None, claims=MANAGER, dpop_jwk=generate_ec_jwk())
    reply = await carol_api.call("POST", f"/v1/approvals/{approval.id}", {"decision": "approve"})
    assert reply.status == 200 and reply.body["state"] == "pending", reply.body
    async with stack.client() as client:
        carol = await stack.sign_in(client, "carol")  # carol again, at the page's issuer
        listed, csrf = await _csrf(stack, client, carol)
        assert approval.id not in listed
        assert await _decide_on_page(stack, client, carol, approval.id, csrf) == 403
        after = await _approval(stack, approval.id)
        assert after.state == "pending" and [(v.iss, v.sub) for v in after.approvals] == [
            (API_ISSUER, "carol")
        ]
        assert after.unsatisfied() == ("dual_approval",)
        assert [(r["reason"], r["subject"]) for r in stack.web_records()] == [
            ("approval_already_decided", "carol")
        ]
        # a second person through the page is the second approver
        dave = await stack.sign_in(client, "dave")
        listed, csrf = await _csrf(stack, client, dave)
        assert approval.id in listed
        assert await _decide_on_page(stack, client, dave, approval.id, csrf) == 200
    approved = await _approval(stack, approval.id)
    assert approved.state == "approved" and [v.sub for v in approved.approvals] == ["carol", "dave"]
