"""Approval announcements to Slack (CONTRACT §14: ``approvals.webhooks[].format: slack``), delivered for real.

The broker on real TLS creates an approval through the token exchange; two HTTPS receivers (certificates of the
test PKI, trusted through ``ca``) get the announcement: the Slack one exactly the incoming-webhook JSON (text,
blocks, the approval page's link; no argument value; ``&``, ``<``, ``>`` of requester and reason escaped for
Slack's mrkdwn), the default one the signed JWS, unchanged.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from aiohttp import web

from broker.resources import APPROVALS
from tests.certfactory import Pki
from tests.conftest import BrokerFactory, base_config
from tests.integration.test_approvals_api import (
    NO_UPSTREAM,
    WAIT,
    Receiver,
    metrics_text,
    start_receiver,
    verified_claims,
)

AGENT = "spiffe://example.org/agents/expense-assistant"
#: agent-chosen values that would be a channel mention and a disguised link if they reached the chat
INVOICE = {"invoice_id": "<!channel> & <https://evil.example|urgent>", "amount": 6000, "department": "42"}


@pytest.fixture
async def receivers(pki: Pki) -> AsyncIterator[tuple[Receiver, Receiver]]:
    runners: list[web.AppRunner] = []
    try:
        yield await start_receiver(pki, Receiver(), runners), await start_receiver(pki, Receiver(), runners)
    finally:
        for runner in runners:
            await runner.cleanup()


async def test_a_slack_webhook_gets_the_link_and_no_argument(
    broker_factory: BrokerFactory, pki: Pki, tmp_path: Path, receivers: tuple[Receiver, Receiver]
) -> None:
    slack, signed = receivers
    config = base_config(
        pki,
        tmp_path,
        upstream_url=NO_UPSTREAM,
        policies=[
            {"id": "agents", "tools": ["approveExpense"], "effect": "allow", "when": 'actor.id != ""'},
            {
                "id": "big",
                "tools": ["approveExpense"],
                "effect": "obligate",
                "when": "args.amount > 5000",
                "requires": ["mfa", "manager_approval"],
                "reason": "amount > 5000 & <a manager decides>",
            },
        ],
        approvals={
            "webhooks": [
                {"url": slack.url, "ca": str(pki.ca), "format": "slack"},
                {"url": signed.url, "ca": str(pki.ca)},
            ]
        },
    )
    broker = await broker_factory(config)
    requester = broker.caller("dana <ops> & co", claims={"acr": "mfa"})
    reply = await requester.exchange("approveExpense", INVOICE)
    assert (reply.status, reply.error) == (403, "approval_required"), reply.body
    approval_id = reply.body["approval_id"]
    await asyncio.wait_for(asyncio.gather(slack.succeeded.wait(), signed.succeeded.wait()), WAIT)
    # both deliveries were started before their receivers answered: once they end, both are counted
    notifier = broker.running.app[APPROVALS].notifier
    await asyncio.wait_for(asyncio.gather(*notifier._deliveries, return_exceptions=True), WAIT)
    assert 'broker_approval_announcements_total{result="delivered"} 2.0' in await metrics_text(broker)

    approval = await broker.running.app[APPROVALS].book.get(approval_id, 0)
    assert approval is not None
    expires = datetime.fromtimestamp(approval.expires_at, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    link = f"https://localhost:8443/approvals/{approval_id}"
    assert reply.body["approval_url"] == link
    summary = (
        "Approval needed (manager_approval): `approveExpense` requested by dana &lt;ops&gt; &amp; co "
        f"through {AGENT}"
    )
    [(content_type, body)] = slack.received
    assert content_type == "application/json"
    assert json.loads(body) == {
        "text": f"{summary}. Decide at {link}",
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": summary}},
            {
                "type": "section",
                "text": {
                    "type": "mrkdwn",
                    "text": f"*Why:* amount &gt; 5000 &amp; &lt;a manager decides&gt;\n*Expires:* {expires}\n"
                    f"<{link}|Review the arguments and decide>",
                },
            },
        ],
        "unfurl_links": False,
    }
    for argument in ("channel", "evil.example", "6000", "invoice", "department"):
        assert argument not in body  # the page shows the arguments after login, the chat never

    [(signed_type, token)] = signed.received  # the default format is unchanged beside it
    assert signed_type == "application/jose"
    async with broker.session(agent=None) as s, s.get(f"{broker.url}/.well-known/jwks.json") as resp:
        [jwk, *_] = (await resp.json())["keys"]
    claims = verified_claims(token, jwk)
    assert (claims["approval_id"], claims["arguments"], claims["approval_url"]) == (
        approval_id,
        INVOICE,
        link,
    )
