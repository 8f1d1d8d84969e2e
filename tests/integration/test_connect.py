"""``broker connect`` (CONTRACT §13) between stock clients and a real broker, on real TLS and sockets.

The MCP client is the official ``mcp`` SDK with no auth configured, pointed at the connector's plain-HTTP URL;
the broker runs ``config/examples/expense.yaml`` in front of the demo MCP server (the stack of test_mcp.py), or
the conftest config in front of a recording REST backend. The connector runs as a real ``broker connect``
subprocess where the command line is the point, in-process (:func:`broker.sdk.connect.serving`) elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
import structlog.testing
import yaml
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from broker.config.loader import load_config
from broker.dev.idp import mint_access_token, x5t_of
from broker.jose import jwk_thumbprint
from broker.sdk.agent import AgentClient
from broker.sdk.connect import Connector, default_local_token_path, serving
from broker.sdk.credentials import CommandToken, StaticToken, TokenSource, unverified_claims
from broker.server import RunningBroker, start
from tests.certfactory import Pki
from tests.conftest import RecordingUpstream, base_config
from tests.integration.test_mcp import (
    ALICE,
    ALICE_MFA,
    INV_8831,
    McpStack,
    _allow_slow_report_unmasked,
    _slow_report,
    mcp_stack,
)

AGENT = "expense-assistant"
BROKER_CMD = str(Path(sys.executable).parent / "broker")
MODES = pytest.mark.parametrize("mode", ["legacy", "auto"], ids=["sessions-2025", "stateless-2026"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alice_token(pki: Pki, claims: dict[str, Any], sub: str = "alice", ttl: int = 3600) -> str:
    return mint_access_token(
        json.loads(pki.idp_jwk.read_text()),
        sub=sub,
        now=time.time(),
        ttl=ttl,
        claims=claims,
        cnf_jkt=jwk_thumbprint(json.loads(pki.agent(AGENT).dpop_jwk.read_text())),
        act_sub=pki.agent_id(AGENT),
    )


def rotate(path: Path, token: str) -> None:
    """Write the token the way a refresher should: a new file renamed over the old one."""
    fresh = path.with_suffix(".new")
    fresh.write_text(token + "\n")
    fresh.chmod(0o600)  # a token file that group or others can read is refused
    os.replace(fresh, path)


def private_certs(pki: Pki, tmp_path: Path) -> Path:
    """A copy of the session's certs folder: the connector generates its local token in it."""
    return Path(shutil.copytree(pki.root, tmp_path / "certs"))


@asynccontextmanager
async def connector(
    pki: Pki, broker_url: str, tokens: TokenSource, *, secret: bytes | None = None
) -> AsyncIterator[tuple[str, Connector]]:
    running = Connector.from_certs(broker_url, pki.root, AGENT, tokens, local_secret=secret)
    async with serving(running, ("127.0.0.1", 0)) as local:
        yield local, running


@asynccontextmanager
async def connect_subprocess(
    *args: str, stderr: Path, announced: list[str] | None = None
) -> AsyncIterator[str]:
    """``broker connect ARGS --listen 127.0.0.1:0``; yields the local URL it announces on stdout (and appends
    the announcement's lines to ``announced``)."""
    with stderr.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            BROKER_CMD,
            "connect",
            *args,
            "--listen",
            "127.0.0.1:0",
            stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(30):
            first = (await process.stdout.readline()).decode()
        assert first.startswith("broker connect: serving http://"), (first, stderr.read_text())
        if announced is not None:
            announced.append(first.rstrip("\n"))
            async with asyncio.timeout(30):
                while not announced[-1].startswith("  local token:"):  # the announcement's last line
                    announced.append((await process.stdout.readline()).decode().rstrip("\n"))
        yield first.split()[3]
    finally:
        if process.returncode is None:
            process.terminate()
        assert await process.wait() == 0, stderr.read_text()


# --- the MCP SDK, only the local token, through a real `broker connect` ------------------------------------------


@MODES
async def test_the_mcp_sdk_with_the_local_token_header_gets_every_guarantee_through_broker_connect(
    pki: Pki, tmp_path: Path, mode: str
) -> None:
    """Also shows the SDK sends neither ``Origin`` nor ``Sec-Fetch-Site``: the connector refuses both."""
    token_file = tmp_path / "token.jwt"
    rotate(token_file, alice_token(pki, ALICE))
    certs = private_certs(pki, tmp_path)
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
        httpx2.AsyncClient(  # the SDK's documented way to add a header; no auth, no TLS
            headers={"Authorization": f"Bearer {default_local_token_path(certs, AGENT).read_text().strip()}"},
            timeout=httpx2.Timeout(30, read=300),
        ) as http,
    ):
        async with Client(
            streamable_http_client(f"{local}/mcp/expenses", http_client=http), mode=mode
        ) as client:
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
            assert step_up.value.code == -32011 and step_up.value.data["acr_values"] == "mfa"

            rotate(token_file, alice_token(pki, ALICE_MFA))  # alice stepped up: the connector picks it up
            with pytest.raises(MCPError) as pending:
                await client.call_tool("approveExpense", invoice)
        assert pending.value.code == -32012
        data = pending.value.data
        assert data["error"] == "approval_required" and data["required"] == ["manager_approval"]
        assert (
            data["approval_url"].startswith(stack.public_url) and data["approval_id"] in data["approval_url"]
        )
        assert len(stack.calls_received()) == 1  # only the allowed call reached the MCP server
        forwarded = [r for r in stack.upstream.received if r.method == "POST"]
        assert all("authorization" not in r.headers and "dpop" not in r.headers for r in forwarded)
        if mode == "legacy":  # the session id went out and came back through the connector
            assert {r.headers.get("mcp-session-id") for r in forwarded} - {None}


def _mcp_decisions(stack: McpStack) -> list[str]:
    return [r["decision"] for r in stack.audit_records() if r["event"] == "mcp" and r["tool"]]


@MODES
async def test_an_sse_stream_is_relayed_live(pki: Pki, tmp_path: Path, mode: str) -> None:
    release, finished, seen = asyncio.Event(), [], []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        seen.append((progress, message, bool(finished)))
        release.set()  # the tool finishes only once the client has seen its first event

    async with (
        mcp_stack(
            pki, tmp_path, customize=_slow_report(release, finished), edit_config=_allow_slow_report_unmasked
        ) as stack,
        connector(pki, stack.public_url, StaticToken(alice_token(pki, ALICE))) as (local, _),
        Client(f"{local}/mcp/expenses", mode=mode) as client,
    ):
        async with asyncio.timeout(15):  # a buffering connector deadlocks here
            result = await client.call_tool("slowReport", {}, progress_callback=on_progress)
    assert seen == [(1, "half way", False)]
    assert finished == [True] and result.content[0].text == "done"  # type: ignore[union-attr]
    assert _mcp_decisions(stack) == ["allow"]


# --- REST, the local secret, the command line -------------------------------------------------------------------


def rest_config(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream, port: int, *, fsync: bool = True, **identity: Any
) -> Path:
    config = base_config(pki, tmp_path, upstream_url=upstream.url)
    config["audit"]["fsync"] = fsync
    config["server"]["listen"] = f"127.0.0.1:{port}"
    config["server"]["public_url"] = f"https://localhost:{port}"
    config["identity"].update(identity)
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@asynccontextmanager
async def rest_broker(config: Path) -> AsyncIterator[RunningBroker]:
    running = await start(load_config(config))
    try:
        yield running
    finally:
        await running.stop()


CALL = {"invoice_id": "INV-1", "amount": 5}


async def test_rest_through_the_connector_with_the_nonce_challenge_answered(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    port = free_port()
    config = rest_config(pki, tmp_path, upstream, port, dpop={"require_nonce": True})
    async with (
        rest_broker(config),
        connector(pki, f"https://localhost:{port}", StaticToken(alice_token(pki, ALICE))) as (local, running),
        aiohttp.ClientSession() as http,
    ):
        assert running.nonce is None
        async with http.post(f"{local}/v1/tools/approveExpense", json=CALL) as reply:
            assert reply.status == 200 and await reply.json() == {"echo": CALL}
            assert "DPoP-Nonce" not in reply.headers
        assert running.nonce is not None  # the first attempt was challenged, the retry carried the nonce
        async with http.get(f"{local}/v1/tools") as reply:
            assert reply.status == 200 and [t["name"] for t in (await reply.json())["tools"]] == [
                "approveExpense"
            ]
        async with http.get(f"{local}/.well-known/oauth-protected-resource") as reply:
            assert (await reply.json())["resource"] == f"https://localhost:{port}"
        async with http.get(f"{local}/admin/config") as reply:
            assert reply.status == 404
    (forwarded,) = upstream.received  # one execution: the challenged attempt never reached the backend
    assert "authorization" not in forwarded.headers and "txn-token" in forwarded.headers


async def test_the_local_secret_is_required_when_set(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    port = free_port()
    async with (
        rest_broker(rest_config(pki, tmp_path, upstream, port)),
        connector(
            pki, f"https://localhost:{port}", StaticToken(alice_token(pki, ALICE)), secret=b"local-secret-1"
        ) as (local, _),
        aiohttp.ClientSession() as http,
    ):
        for headers in (
            {},
            {"Authorization": "Bearer local-secret-2"},
            {"Authorization": "DPoP local-secret-1"},
        ):
            async with http.post(f"{local}/v1/tools/approveExpense", json=CALL, headers=headers) as reply:
                assert reply.status == 403 and (await reply.json())["error"] == "access_denied"
        assert upstream.received == []
        good = {"Authorization": "Bearer local-secret-1"}
        async with http.post(f"{local}/v1/tools/approveExpense", json=CALL, headers=good) as reply:
            assert reply.status == 200
    assert len(upstream.received) == 1


async def test_a_page_of_another_local_web_app_cannot_use_the_connector(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """Issue 12 C1: a page on http://localhost:3000 (a dev server, a notebook) is refused, even with the secret,
    and so is its CORS preflight; the same request without the browser's headers goes through."""
    port = free_port()
    good = {"Authorization": "Bearer local-secret-1"}
    page = {**good, "Origin": "http://localhost:3000"}
    async with (
        rest_broker(rest_config(pki, tmp_path, upstream, port)),
        connector(
            pki, f"https://localhost:{port}", StaticToken(alice_token(pki, ALICE)), secret=b"local-secret-1"
        ) as (local, _),
        aiohttp.ClientSession() as http,
    ):
        preflight = {
            **page,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        }
        async with http.options(f"{local}/v1/tools/approveExpense", headers=preflight) as reply:
            assert reply.status == 403 and "Access-Control-Allow-Origin" not in reply.headers
        for headers in (page, {**good, "Sec-Fetch-Site": "same-site"}, {**good, "Origin": local}):
            async with http.post(f"{local}/v1/tools/approveExpense", json=CALL, headers=headers) as reply:
                assert reply.status == 403 and (await reply.json())["error"] == "access_denied", headers
        async with http.get(f"{local}/healthz", headers={"Origin": "http://localhost:3000"}) as reply:
            assert reply.status == 403
        assert upstream.received == []  # nothing was forwarded
        async with http.post(f"{local}/v1/tools/approveExpense", json=CALL, headers=good) as reply:
            assert reply.status == 200
    assert len(upstream.received) == 1


async def test_a_failing_token_command_is_a_502_without_details(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """Issue 12 C2: the client learns only ``token_unavailable``; the log has the exit status and the helper's
    first stderr line, redacted; the command line (here with a secret argument) appears nowhere."""
    port = free_port()
    helper = CommandToken("echo 'refresh token revoked' >&2; exit 4; login --client-secret=hunter2-in-argv")
    with structlog.testing.capture_logs() as logs:
        async with (
            rest_broker(rest_config(pki, tmp_path, upstream, port)),
            connector(pki, f"https://localhost:{port}", helper) as (local, _),
            aiohttp.ClientSession() as http,
            http.get(f"{local}/v1/tools") as reply,
        ):
            assert reply.status == 502
            text = await reply.text()
    assert json.loads(text) == {
        "error": "token_unavailable",
        "error_description": "no access token available; see the connector's log",
    }
    (logged,) = [entry for entry in logs if entry["event"] == "connect.token_unavailable"]
    assert logged["error"] == "token command exited with status 4: refresh token revoked"
    assert "hunter2" not in repr(logs)


async def test_a_token_command_refreshes_the_agent_client_token(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """AgentClient shares the connector's token sources: a helper's new token is the next call's subject."""
    port = free_port()
    current = tmp_path / "current.jwt"
    # 30 s tokens: inside the refresh margin, so the helper runs before every request
    rotate(current, alice_token(pki, ALICE, sub="alice", ttl=30))
    helper = CommandToken(f"cat {current}")
    async with (
        rest_broker(rest_config(pki, tmp_path, upstream, port)),
        AgentClient.from_certs(
            f"https://localhost:{port}", pki.root, agent=AGENT, token_source=helper
        ) as agent,
    ):
        assert (await agent.call_tool("approveExpense", CALL)).status == 200
        rotate(current, alice_token(pki, ALICE, sub="dave", ttl=30))
        assert (await agent.call_tool("approveExpense", CALL)).status == 200
    subjects = [
        json.loads(line)["subject"]
        for line in (tmp_path / "audit.jsonl").read_text().splitlines()
        if json.loads(line)["event"] == "invocation"
    ]
    assert subjects == ["alice", "dave"] and helper.runs == 2


async def test_a_broker_restart_is_survived(pki: Pki, tmp_path: Path, upstream: RecordingUpstream) -> None:
    port = free_port()
    config = rest_config(pki, tmp_path, upstream, port)
    async with (
        connector(pki, f"https://localhost:{port}", StaticToken(alice_token(pki, ALICE))) as (local, _),
        aiohttp.ClientSession() as http,
    ):
        async with http.get(f"{local}/healthz") as reply:
            assert reply.status == 503  # nothing listens yet
        async with rest_broker(config):
            async with http.get(f"{local}/healthz") as reply:
                assert reply.status == 200
            for _ in range(3):  # leaves pooled connections to the first broker process
                async with http.post(f"{local}/v1/tools/approveExpense", json=CALL) as reply:
                    assert reply.status == 200
        async with http.post(f"{local}/v1/tools/approveExpense", json=CALL) as reply:
            assert reply.status == 502 and (await reply.json())["error"] == "broker_unreachable"
        async with rest_broker(config):
            for _ in range(3):
                async with http.post(f"{local}/v1/tools/approveExpense", json=CALL) as reply:
                    assert reply.status == 200, await reply.text()
    assert len(upstream.received) == 6  # nothing replayed, nothing lost


async def test_a_non_loopback_listen_is_refused_in_one_line(pki: Pki, tmp_path: Path) -> None:
    token_file = tmp_path / "token.jwt"
    rotate(token_file, alice_token(pki, ALICE))
    args = ["--broker", "https://localhost:1", "--certs", str(pki.root), "--agent", AGENT]
    result = await asyncio.create_subprocess_exec(
        BROKER_CMD,
        "connect",
        *args,
        "--token-file",
        str(token_file),
        "--listen",
        "0.0.0.0:8765",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await result.communicate()
    assert result.returncode == 2 and out == b""
    (line,) = err.decode().splitlines()
    assert line.startswith("broker connect: --listen 0.0.0.0:8765: not a loopback address")


@pytest.mark.parametrize("open_file", ["--local-token", "--token-file"])
async def test_a_secret_file_open_to_others_is_refused_in_one_line(
    pki: Pki, tmp_path: Path, open_file: str
) -> None:
    """Issue 12 C3: like ssh with a private key; nothing is served."""
    token_file, secret_file = tmp_path / "token.jwt", tmp_path / "local.token"
    rotate(token_file, alice_token(pki, ALICE))
    secret_file.write_text("local-secret-1\n")
    secret_file.chmod(0o600)
    shared = token_file if open_file == "--token-file" else secret_file
    shared.chmod(0o644)  # what `> file` makes under the usual umask 022
    args = ["--broker", "https://localhost:1", "--certs", str(pki.root), "--agent", AGENT]
    result = await asyncio.create_subprocess_exec(
        BROKER_CMD,
        "connect",
        *args,
        "--token-file",
        str(token_file),
        "--local-token",
        str(secret_file),
        "--listen",
        "127.0.0.1:0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await result.communicate()
    assert result.returncode == 2 and out == b""
    (line,) = err.decode().splitlines()
    what = "--local-token" if open_file == "--local-token" else "token file"
    assert line == (
        f"broker connect: {what} {shared}: permissions 0644 are too open (group or others have access); "
        f"chmod 600 {shared}"
    )


async def test_a_local_token_is_generated_by_default_and_kept(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """Issue 12 C1: without --local-token (and without --no-local-token) the connector makes a 0600 secret
    beside the agent's key, says where, requires it, and uses the same one on the next start."""
    port = free_port()
    token_file = tmp_path / "token.jwt"
    rotate(token_file, alice_token(pki, ALICE))
    certs = private_certs(pki, tmp_path)
    secret_path = default_local_token_path(certs, AGENT)
    args = ["--broker", f"https://localhost:{port}", "--certs", str(certs), "--agent", AGENT]
    secrets, announced = [], []
    async with rest_broker(rest_config(pki, tmp_path, upstream, port)), aiohttp.ClientSession() as http:
        for start in range(2):
            async with connect_subprocess(
                *args,
                "--token-file",
                str(token_file),
                stderr=tmp_path / f"connect-{start}.log",
                announced=announced,
            ) as local:
                assert stat.S_IMODE(secret_path.stat().st_mode) == 0o600
                secrets.append(secret_path.read_text().strip())
                async with http.post(f"{local}/v1/tools/approveExpense", json=CALL) as reply:
                    assert reply.status == 403 and (await reply.json())["error"] == "access_denied"
                good = {"Authorization": f"Bearer {secrets[-1]}"}
                async with http.post(f"{local}/v1/tools/approveExpense", json=CALL, headers=good) as reply:
                    assert reply.status == 200
    assert len(secrets[0]) >= 40 and secrets[0] == secrets[1]
    assert f"  local token:      send Authorization: Bearer <the secret in {secret_path}>" in announced
    assert len(upstream.received) == 2  # only the calls with the secret


# --- REST through the command ------------------------------------------------------------------------------------
# (what the connector adds to a call is measured by `make bench`: python -m broker.dev.bench.connector)


async def test_rest_through_a_broker_connect_subprocess_beside_a_direct_agent(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """The same token, from a ``--token-file`` through the command and in an AgentClient: both calls go through."""
    port = free_port()
    token = alice_token(pki, ALICE)
    token_file = tmp_path / "token.jwt"
    rotate(token_file, token)
    async with (
        rest_broker(rest_config(pki, tmp_path, upstream, port)),
        connect_subprocess(
            "--broker",
            f"https://localhost:{port}",
            "--certs",
            str(pki.root),
            "--agent",
            AGENT,
            "--token-file",
            str(token_file),
            "--no-local-token",  # the default (a generated secret) has its own test
            stderr=tmp_path / "connect.log",
        ) as local,
        AgentClient.from_certs(
            f"https://localhost:{port}", pki.root, agent=AGENT, access_token=token
        ) as agent,
        aiohttp.ClientSession() as http,
    ):
        assert (await agent.call_tool("approveExpense", CALL)).status == 200
        async with http.post(f"{local}/v1/tools/approveExpense", json=CALL) as reply:
            assert (reply.status, await reply.json()) == (200, {"echo": CALL})
    assert [r.json() for r in upstream.received] == [CALL, CALL]
    assert all("authorization" not in r.headers for r in upstream.received)


async def test_a_certificate_bound_token_from_broker_token_x5t_works_in_mtls_mode(
    pki: Pki, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """RFC 8705: ``broker token --x5t`` binds to the agent's certificate; the connector sends it as Bearer."""
    minted = await asyncio.create_subprocess_exec(
        BROKER_CMD,
        "token",
        "--certs",
        str(pki.root),
        "--sub",
        "alice",
        "--agent",
        AGENT,
        "--x5t",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await minted.communicate()
    assert minted.returncode == 0, err
    token = out.decode().strip()
    port = free_port()
    async with (
        rest_broker(rest_config(pki, tmp_path, upstream, port, proof="mtls")),
        connector(pki, f"https://localhost:{port}", StaticToken(token)) as (local, _),
        aiohttp.ClientSession() as http,
        http.post(f"{local}/v1/tools/approveExpense", json=CALL) as reply,
    ):
        assert reply.status == 200, await reply.text()
    cnf = unverified_claims(token)["cnf"]
    assert cnf == {"x5t#S256": x5t_of(pki.agent(AGENT).cert)}  # no cnf.jkt: the certificate is the proof
    (forwarded,) = upstream.received
    assert "authorization" not in forwarded.headers
