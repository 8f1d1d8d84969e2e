"""The MCP gateway (CONTRACT §7 and the MCP part of §11; HOSTILE P20–P25) with the official ``mcp`` SDK.

The agent is the SDK's ``Client`` over ``streamable_http_client`` with an ``httpx2`` client that presents the
agent's SVID and adds a fresh DPoP proof per request (:class:`DpopAuth`); the upstream is the demo MCP server
(:mod:`broker.demo.mcp_server`, built with the SDK) on HTTPS with client-certificate verification; the broker runs
``config/examples/expense.yaml``. Everything in-process, on 127.0.0.1 ephemeral ports, real TLS.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator, Callable, Generator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
import yaml
from aiohttp import web
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError

from broker import server as server_module
from broker.app import build_admin_app, build_app
from broker.audit.verify import verify_log
from broker.client import DpopSigner
from broker.config.loader import load_config
from broker.demo import mcp_server
from broker.gateway import mcp
from broker.idp import mint_access_token
from broker.jose import jwk_thumbprint
from broker.resources import SIGNER
from broker.server import RunningBroker, start
from broker.txn.tokens import verify_txn_token
from tests.certfactory import Pki, client_ssl_context

ROOT = Path(__file__).resolve().parents[2]
AGENT = "spiffe://example.org/agents/expense-assistant"
ALICE = {"groups": ["finance-managers"], "department": "42", "approval_limit": 20000}
ALICE_MFA = {**ALICE, "acr": "mfa"}
BOB = {"groups": ["engineers"], "department": "42"}
CAROL = {"groups": ["managers"], "acr": "mfa"}
INV_8831 = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}
MODES = pytest.mark.parametrize("mode", ["legacy", "auto"], ids=["sessions-2025", "stateless-2026"])


# --- wiring (until broker.app registers the gateway itself: then these are no-ops) ---------------------------


def _wired_app(loaded: Any, **kwargs: Any) -> web.Application:
    app = build_app(loaded, **kwargs)
    if not any(getattr(r.resource, "canonical", "") == "/mcp/{server}" for r in app.router.routes()):
        app.router.add_route("*", "/mcp/{server}", mcp.mcp_endpoint)
        app.cleanup_ctx.append(mcp.mcp_resources)
    return app


def _wired_admin(main: web.Application) -> web.Application:
    admin = build_admin_app(main)
    if not any(getattr(r.resource, "canonical", "") == "/admin/mcp/pins" for r in admin.router.routes()):
        admin.router.add_get("/admin/mcp/pins", mcp.pins_endpoint)
        admin.router.add_post("/admin/mcp/pins/{server}/{tool}/accept", mcp.accept_pin_endpoint)
    return admin


@pytest.fixture
def wired(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server_module, "build_app", _wired_app)
    monkeypatch.setattr(server_module, "build_admin_app", _wired_admin)


# --- the agent's HTTP client: its SVID on TLS, a fresh DPoP proof per request ---------------------------------


class DpopAuth(httpx2.Auth):
    """``Authorization: DPoP <token>`` and a new proof for the exact request URL on every request (RFC 9449)."""

    def __init__(self, token: str, signer: DpopSigner) -> None:
        self.token = token
        self.signer = signer

    def auth_flow(self, request: httpx2.Request) -> Generator[httpx2.Request, httpx2.Response, None]:
        request.headers["Authorization"] = f"DPoP {self.token}"
        request.headers["DPoP"] = self.signer.proof(request.method, str(request.url), access_token=self.token)
        yield request


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class McpStack:
    pki: Pki
    running: RunningBroker
    upstream: mcp_server.RunningMcpServer
    public_url: str
    audit: Path
    admin_url: str
    clients: list[httpx2.AsyncClient] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"{self.public_url}/mcp/expenses"

    def token(self, sub: str, claims: dict[str, Any], agent: str = "expense-assistant") -> str:
        jkt = jwk_thumbprint(json.loads(self.pki.agent(agent).dpop_jwk.read_text()))
        return mint_access_token(
            json.loads(self.pki.idp_jwk.read_text()), sub=sub, now=time.time(), claims=claims, cnf_jkt=jkt,
            act_sub=f"spiffe://example.org/agents/{agent}",
        )  # fmt: skip

    def http(self, sub: str, claims: dict[str, Any], *, agent: str = "expense-assistant",
             cert_of: str | None = None) -> httpx2.AsyncClient:  # fmt: skip
        """An httpx2 client as the agent: ``cert_of`` presents another agent's certificate."""
        files = self.pki.agent(cert_of or agent)
        signer = DpopSigner(json.loads(self.pki.agent(agent).dpop_jwk.read_text()))
        client = httpx2.AsyncClient(
            verify=client_ssl_context(self.pki, files.cert, files.key),
            auth=DpopAuth(self.token(sub, claims, agent), signer),
            timeout=httpx2.Timeout(20.0),
        )
        self.clients.append(client)
        return client

    @asynccontextmanager
    async def client(self, sub: str, claims: dict[str, Any], *, mode: str = "auto", **kwargs: Any) -> AsyncIterator[Client]:
        http = self.http(sub, claims)
        async with Client(streamable_http_client(self.endpoint, http_client=http), mode=mode, **kwargs) as client:
            yield client

    async def post(self, client: httpx2.AsyncClient, body: Any, headers: dict[str, str] | None = None) -> httpx2.Response:
        hdrs = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream", **(headers or {})}
        return await client.post(self.endpoint, content=json.dumps(body).encode(), headers=hdrs)

    def calls_received(self) -> list[dict[str, Any]]:
        """The tools/call messages that reached the MCP server."""
        bodies = [r.json() for r in self.upstream.received if r.method == "POST" and r.body]
        return [b for b in bodies if isinstance(b, dict) and b.get("method") == "tools/call"]

    def audit_records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines() if line]


def expense_env(pki: Pki, tmp_path: Path, port: int, upstream_url: str) -> dict[str, str]:
    return {
        "BROKER_CERTS": str(pki.root),
        "BROKER_LISTEN": f"127.0.0.1:{port}",
        "BROKER_PUBLIC_URL": f"https://localhost:{port}",
        "BROKER_ADMIN_LISTEN": "127.0.0.1:0",
        "EXPENSE_UPSTREAM": "https://127.0.0.1:9",  # the REST backend: not used by these tests
        "EXPENSE_MCP_UPSTREAM": upstream_url,
        "BROKER_AUDIT_FILE": str(tmp_path / "audit.jsonl"),
    }


@asynccontextmanager
async def mcp_stack(
    pki: Pki, tmp_path: Path, *, customize: Callable[[MCPServer], None] | None = None,
    edit_config: Callable[[dict[str, Any]], None] | None = None,
) -> AsyncIterator[McpStack]:  # fmt: skip
    upstream = await mcp_server.serve("127.0.0.1:0", certs=pki.root, db_path=tmp_path / "expense.db", customize=customize)
    port = free_port()
    env = expense_env(pki, tmp_path, port, upstream.url)
    config_path = ROOT / "config/examples/expense.yaml"
    if edit_config is not None:
        document = yaml.safe_load(config_path.read_text())
        edit_config(document)
        config_path = tmp_path / "expense.yaml"
        config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    running = await start(load_config(config_path, environ=env))
    admin_host, admin_port = running.admin_address
    stack = McpStack(pki, running, upstream, f"https://localhost:{port}", tmp_path / "audit.jsonl",
                     f"http://{admin_host}:{admin_port}")  # fmt: skip
    try:
        yield stack
    finally:
        for client in stack.clients:
            await client.aclose()
        await running.stop()
        await upstream.stop()


@pytest.fixture
async def stack(pki: Pki, tmp_path: Path, wired: None) -> AsyncIterator[McpStack]:
    async with mcp_stack(pki, tmp_path) as running:
        yield running


def names(listing: Any) -> list[str]:
    return sorted(tool.name for tool in listing.tools)


# --- CONTRACT §11, MCP part --------------------------------------------------------------------------------


@MODES
async def test_alice_sees_approve_and_list_bob_list_only(stack: McpStack, mode: str) -> None:
    async with stack.client("alice", ALICE, mode=mode) as alice:
        assert names(await alice.list_tools()) == ["approveExpense", "listInvoices"]
    async with stack.client("bob", BOB, mode=mode) as bob:
        assert names(await bob.list_tools()) == ["listInvoices"]
