"""Stock MCP clients through ``broker connect`` (CONTRACT §13): the README's configurations, run as written.

``mcp-remote`` (npm, pinned in ``tests/stock_clients/package.json`` + lock file, installed there with ``npm ci``
the first time) is what desktop MCP clients (Claude Desktop, Cursor, …) run to reach a remote server: the test
reads the README's ``claude_desktop_config.json`` block, starts its ``command`` and ``args`` with its ``env`` the
way a desktop client does (only the port of the URL and the secret's placeholder are filled in), and drives it
over stdio with the official MCP SDK's stdio client — the desktop client's side. Behind it: a real
``broker connect`` subprocess with its generated local token, and the broker of test_mcp.py in front of the demo
MCP server. Node or npm missing: skipped, or FAILS under ``CI=true``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, NoReturn

import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.shared.exceptions import MCPError

from broker.sdk.connect import default_local_token_path
from tests.certfactory import Pki
from tests.integration.test_connect import AGENT, alice_token, connect_subprocess, private_certs, rotate
from tests.integration.test_mcp import ALICE, ALICE_MFA, INV_8831, mcp_stack
from tests.nodepkg import ensure_npm_ci

ROOT = Path(__file__).resolve().parents[2]
STOCK_CLIENTS = ROOT / "tests" / "stock_clients"
README_URL = "http://127.0.0.1:8765"


def stock_client_missing(why: str) -> NoReturn:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{why} (CI=true: the stock-client tests are required, not optional)")
    pytest.skip(
        f"{why}; install Node >= 20 and npm to run this test (CI=true turns this skip into a failure)"
    )


def readme_desktop_config() -> dict[str, Any]:
    """The ``expenses`` server of the README's ``claude_desktop_config.json`` block (JSON after its comment)."""
    readme = (ROOT / "README.md").read_text()
    match = re.search(r"```jsonc\n// [^\n]*claude_desktop_config\.json\n(.*?)\n```", readme, re.DOTALL)
    assert match is not None, "the README's mcp-remote block is gone"
    return dict(json.loads(match.group(1))["mcpServers"]["expenses"])


async def test_mcp_remote_as_the_readme_configures_it_gets_every_guarantee_through_broker_connect(
    pki: Pki, tmp_path: Path
) -> None:
    ensure_npm_ci(STOCK_CLIENTS, "mcp-remote", stock_client_missing)
    server = readme_desktop_config()
    assert server["command"] == "npx"
    token_file = tmp_path / "token.jwt"
    rotate(token_file, alice_token(pki, ALICE))
    certs = private_certs(pki, tmp_path)
    home = tmp_path / "home"  # mcp-remote keeps OAuth state in ~/.mcp-auth: never the user's
    home.mkdir()
    mcp_remote_log = tmp_path / "mcp-remote.log"
    async with (
        mcp_stack(pki, tmp_path) as stack,
        connect_subprocess(
            "--broker",
            stack.public_url,
            "--certs",
            str(certs),
            "--agent",
            AGENT,
            "--token-file",
            str(token_file),
            stderr=tmp_path / "connect.log",
        ) as local,
    ):
        secret = default_local_token_path(certs, AGENT).read_text().strip()
        args = [arg.replace(README_URL, local) for arg in server["args"]]
        env = {name: value.replace("<the secret>", secret) for name, value in server["env"].items()}
        assert secret in env["AUTH_HEADER"] and secret not in " ".join(args)  # never in the process list
        params = StdioServerParameters(
            command=server["command"],
            args=[*args],
            # the pinned copy, and no registry: no download, no update check
            env={
                **env,
                "HOME": str(home),
                "npm_config_offline": "true",
                "npm_config_update_notifier": "false",
            },
            cwd=STOCK_CLIENTS,
        )
        with mcp_remote_log.open("w") as errlog:
            async with Client(stdio_client(params, errlog=errlog), mode="legacy") as client:
                assert sorted(t.name for t in (await client.list_tools()).tools) == [
                    "approveExpense",
                    "listInvoices",
                ]
                result = await client.call_tool("approveExpense", INV_8831)
                assert result.structured_content is not None
                assert result.structured_content["vendor"]["bank_account"] == "****3000"
                assert result.structured_content["approved_by"] == "alice"
                invoice = {"invoice_id": "INV-9001", "amount": 6000, "department": "42"}
                with pytest.raises(MCPError) as step_up:
                    await client.call_tool("approveExpense", invoice)
                rotate(token_file, alice_token(pki, ALICE_MFA))  # alice stepped up: the connector picks it up
                with pytest.raises(MCPError) as pending:
                    await client.call_tool("approveExpense", invoice)
    log = mcp_remote_log.read_text()
    # JSON-RPC errors with their code and data passed through unchanged: the remediation reaches the desktop client
    assert step_up.value.code == -32011, log
    assert step_up.value.data["error"] == "insufficient_user_authentication"
    assert step_up.value.data["acr_values"] == "mfa"
    assert pending.value.code == -32012
    data = pending.value.data
    assert data["error"] == "approval_required" and data["required"] == ["manager_approval"]
    assert data["approval_url"].startswith(stack.public_url) and data["approval_id"] in data["approval_url"]
    assert len(stack.calls_received()) == 1  # only the allowed call reached the MCP server
    # no OAuth: mcp-remote's discovery found nothing (the connector answers 401 to its header-less metadata
    # requests), its probe with the header was no 401, so no callback server, no browser, nothing stored
    for sign_in in ("OAuth callback server", "Authentication required", "open the browser", "To authorize"):
        assert sign_in not in log, log
    assert not [p.name for p in (home / ".mcp-auth").rglob("*") if re.search(r"client_info|tokens", p.name)]
