"""A REST invocation is decided at the time its body was complete, not when its headers came (review finding:
``time.time()`` was taken before the body, which may take ``request_timeout_seconds`` to arrive — a trickled body
made an expired txn token, or approval, pass and back-dated counter events).

Real broker on real TLS with DPoP; the txn token is signed with the broker's own key with a 1-second lifetime,
and the body is sent once that token is past its expiry and the verifier's leeway — a deadline computed from the
token, not a guess. The pipeline-level checks (counters, minted tokens) are in tests/unit/test_pipeline.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlencode

from broker.canonical import canonicalize
from broker.jose import jwk_thumbprint
from broker.resources import RUNTIME, SIGNER
from broker.txn.tokens import mint_txn_token
from tests.certfactory import Pki
from tests.conftest import BrokerFactory, BrokerUnderTest, Caller, RecordingUpstream, base_config

TOOL = "/v1/tools/approveExpense"
INVOICE = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}
#: ``verify_txn_token``'s default leeway
LEEWAY = 5


def short_token(broker: BrokerUnderTest, caller: Caller) -> tuple[str, int]:
    """A txn token for alice's INVOICE call, signed by the broker, that lives one second: (token, exp)."""
    runtime = broker.running.app[RUNTIME].current
    minted = mint_txn_token(
        broker.running.app[SIGNER],
        issuer=runtime.config.server.public_url,
        audience=runtime.config.identity.trust_domain,
        subject="alice",
        scope="tool:approveExpense",
        actor_id=broker.pki.agent_id("expense-assistant"),
        tool="approveExpense",
        arguments=INVOICE,
        policy_version=runtime.policy_version,
        cnf_jkt=jwk_thumbprint(caller.dpop_jwk),
        req_ip="127.0.0.1",
        authn="dpop",
        now=time.time(),
        lifetime=1,
    )
    return minted.token, minted.exp


async def invoke(broker: BrokerUnderTest, caller: Caller, token: str, body_after: float | None) -> int:
    """POST the invocation; its headers (fresh DPoP proof included) go now, its body at ``body_after``."""

    async def body() -> AsyncIterator[bytes]:
        payload = canonicalize(INVOICE)
        if body_after is not None:
            yield payload[:1]  # with the headers: the handler starts and waits for the rest of the body
            await asyncio.sleep(max(0.0, body_after - time.time()))  # until the token's deadline
            payload = payload[1:]
        yield payload

    headers = {
        **caller.auth_headers("POST", TOOL),
        "Txn-Token": token,
        "Content-Type": "application/json",
    }
    async with (
        broker.session(agent=None, cert=caller.cert, key=caller.key) as session,
        session.post(broker.url + TOOL, data=body(), headers=headers) as resp,
    ):
        await resp.read()
        return resp.status


async def test_a_body_complete_after_the_txn_token_expired_is_refused(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["tools"][0]["txn_token"] = "required"
    broker = await broker_factory(config)
    caller = broker.caller()

    token, _ = short_token(broker, caller)
    assert await invoke(broker, caller, token, body_after=None) == 200  # control: in time, it passes
    assert len(upstream.received) == 1

    token, exp = short_token(broker, caller)
    status = await invoke(broker, caller, token, body_after=exp + LEEWAY + 1)
    assert status == 403
    refusal = [r for r in broker.audit_records() if r["event"] == "invocation"][-1]
    assert (refusal["decision"], refusal["reason"]) == ("deny", "txn_expired"), json.dumps(refusal)
    assert len(upstream.received) == 1  # nothing more was forwarded


#: the access-token verifier's default leeway (``identity.leeway_seconds``)
TOKEN_LEEWAY = 30


async def trickle(
    broker: BrokerUnderTest, caller: Caller, path: str, payload: bytes, content_type: str, body_after: float
) -> tuple[int, str | None]:
    """POST ``payload`` to ``path``: the headers (a fresh DPoP proof) now, all but its first byte at ``body_after``."""

    async def body() -> AsyncIterator[bytes]:
        yield payload[:1]
        await asyncio.sleep(max(0.0, body_after - time.time()))  # until the access token's deadline
        yield payload[1:]

    headers = {**caller.auth_headers("POST", path), "Content-Type": content_type}
    async with (
        broker.session(agent=None, cert=caller.cert, key=caller.key) as session,
        session.post(broker.url + path, data=body(), headers=headers) as resp,
    ):
        answer = await resp.json(content_type=None)
        return resp.status, answer.get("error") if isinstance(answer, dict) else None


async def test_an_access_token_that_expires_while_the_body_arrives_is_refused(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> None:
    """The token is verified when the headers come; the call is decided when its arguments are complete, so the
    token's window is checked again then — on invocation and on the exchange alike (review finding)."""
    broker = await broker_factory(base_config(pki, tmp_path, upstream_url=upstream.url))
    now = int(time.time())
    exp = now - TOKEN_LEEWAY + 2  # accepted for two more seconds (the leeway), then expired
    invoker = broker.caller(claims={"iat": now - 200, "exp": exp})
    exchanger = broker.caller(claims={"iat": now - 200, "exp": exp})
    form = urlencode(
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "requested_token_type": "urn:ietf:params:oauth:token-type:txn_token",
            "audience": pki.trust_domain,
            "subject_token": exchanger.token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "scope": "tool:approveExpense",
            "request_details": json.dumps({"tool": "approveExpense", "arguments": INVOICE}),
        }
    ).encode()
    deadline = exp + TOKEN_LEEWAY + 1
    invoked, exchanged = await asyncio.gather(
        trickle(broker, invoker, TOOL, canonicalize(INVOICE), "application/json", deadline),
        trickle(broker, exchanger, "/v1/token", form, "application/x-www-form-urlencoded", deadline),
    )
    assert invoked == (401, "invalid_token") and exchanged == (401, "invalid_token")
    assert upstream.received == []
    reasons = [r["reason"] for r in broker.audit_records() if r["event"] in ("invocation", "exchange")]
    assert reasons.count("token_expired") == 2, reasons
