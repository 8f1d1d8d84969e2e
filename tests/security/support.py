"""Small shared pieces of the security suite (no fixtures here: the suite is conftest-free and each test module
declares the fixtures it needs; the broker fixtures come from ``tests/conftest.py``)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp

from broker.jose import b64url_decode
from tests.certfactory import client_ssl_context, der_of
from tests.conftest import BrokerUnderTest, Caller
from tests.tokenfactory import make_token

TOOL = "/v1/tools/approveExpense"
INVOICE = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}
INVOICE_BODY = b'{"amount":4800,"department":"42","invoice_id":"INV-8831"}'


def claims_of(token: str) -> dict[str, Any]:
    """The payload of a compact JWS, unverified (tests read what they themselves or the broker minted)."""
    payload: dict[str, Any] = json.loads(b64url_decode(token.split(".")[1]))
    return payload


def retoken(caller: Caller, *, header: dict[str, Any] | None = None, **claims: Any) -> Caller:
    """The same caller with a token from the dev IdP that differs in ``header`` members or ``claims`` only."""
    idp = json.loads(caller.broker.pki.idp_jwk.read_text())
    payload = {**claims_of(caller.token), **claims}
    token = make_token(idp, header=header, claims_value=payload)
    return dataclasses.replace(caller, token=token)


def x5t_s256(cert: Path) -> str:
    """RFC 8705 §3.1 ``x5t#S256`` of a PEM certificate file."""
    return base64.urlsafe_b64encode(hashlib.sha256(der_of(cert)).digest()).rstrip(b"=").decode()


def agent_tls(broker: BrokerUnderTest, agent: str | None = "expense-assistant") -> ssl.SSLContext:
    """A client TLS context presenting ``agent``'s SVID (none with ``agent=None``)."""
    if agent is None:
        return client_ssl_context(broker.pki)
    files = broker.pki.agent(agent)
    return client_ssl_context(broker.pki, files.cert, files.key)


def main_port(broker: BrokerUnderTest) -> int:
    return broker.running.main_address[1]


def auth_lines(
    caller: Caller, method: str, target: str, *, htu_path: str | None = None
) -> list[tuple[str, str]]:
    """``Authorization`` and ``DPoP`` header lines for a raw request; the proof's htu is the configured public
    URL plus ``htu_path`` (default: ``target`` without its query), i.e. what an honest client signs."""
    path = htu_path if htu_path is not None else target.split("?")[0]
    proof = caller.proof(method, path)
    return [("Authorization", f"DPoP {caller.token}"), ("DPoP", proof)]


async def exchange_txn_token(caller: Caller, arguments: dict[str, Any], tool: str = "approveExpense") -> str:
    """A txn token for ``arguments`` from ``POST /v1/token`` (RFC 8693 form, CONTRACT §5)."""
    form = urlencode(
        {
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "requested_token_type": "urn:ietf:params:oauth:token-type:txn_token",
            "audience": caller.broker.pki.trust_domain,
            "subject_token": caller.token,
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "scope": f"tool:{tool}",
            "request_details": json.dumps({"tool": tool, "arguments": arguments}),
        }
    ).encode()
    reply = await caller.call(
        "POST", "/v1/token", raw=form, headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert reply.status == 200, reply.body
    token: str = reply.body["access_token"]
    return token


async def admin(broker: BrokerUnderTest, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """One call to the broker's plain-HTTP admin listener (a POST always as JSON: CONTRACT §12)."""
    if body is None and method == "POST":
        body = {}
    async with aiohttp.ClientSession() as s, s.request(method, broker.admin_url + path, json=body) as resp:
        return resp.status, await resp.json()


async def metrics(broker: BrokerUnderTest) -> str:
    async with aiohttp.ClientSession() as s, s.get(f"{broker.admin_url}/metrics") as resp:
        return await resp.text()


def now() -> int:
    return int(time.time())
