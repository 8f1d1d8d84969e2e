"""One principal cannot hold the MCP gateway's upstream pool with GET streams (``max_streams_per_principal``).

A session's GET stream holds one of the broker process's upstream connections for up to an hour, and the pool is
shared by every agent. Past its budget a principal's next GET is refused with 429 before anything is claimed or
forwarded; other principals are not affected, and a stream that ends gives its place back. Real broker, real TLS,
the demo MCP server (official SDK) upstream."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx2
import pytest

from tests.certfactory import Pki
from tests.integration.test_mcp import ALICE, BOB, McpStack, mcp_stack

BUDGET = 2
PROTOCOL = "2025-11-25"
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": PROTOCOL,
        "capabilities": {},
        "clientInfo": {"name": "streams", "version": "1"},
    },
}


def budget_of(document: dict[str, Any]) -> None:
    document["mcp_servers"][0]["max_streams_per_principal"] = BUDGET


@pytest.fixture
async def stack(pki: Pki, tmp_path: Path) -> AsyncIterator[McpStack]:
    async with mcp_stack(pki, tmp_path, edit_config=budget_of) as running:
        yield running


async def session(stack: McpStack, client: httpx2.AsyncClient) -> dict[str, str]:
    opened = await stack.post(client, INITIALIZE)
    assert opened.status_code == 200, opened.text
    headers = {"Mcp-Session-Id": opened.headers["mcp-session-id"], "MCP-Protocol-Version": PROTOCOL}
    ready = await stack.post(client, {"jsonrpc": "2.0", "method": "notifications/initialized"}, headers)
    assert ready.status_code == 202, ready.text
    return headers


async def open_stream(
    stack: McpStack, client: httpx2.AsyncClient, headers: dict[str, str], exits: AsyncExitStack
) -> httpx2.Response:
    return await exits.enter_async_context(
        client.stream("GET", stack.endpoint, headers={**headers, "Accept": "text/event-stream"})
    )


def upstream_gets(stack: McpStack) -> int:
    return sum(1 for request in stack.upstream.received if request.method == "GET")


async def test_a_principal_past_its_stream_budget_is_refused_and_others_are_not(stack: McpStack) -> None:
    alice, bob = stack.http("alice", ALICE), stack.http("bob", BOB)
    sessions = [await session(stack, alice) for _ in range(BUDGET + 1)]
    async with AsyncExitStack() as exits:
        streams = [await open_stream(stack, alice, headers, exits) for headers in sessions[:BUDGET]]
        assert [stream.status_code for stream in streams] == [200] * BUDGET
        assert upstream_gets(stack) == BUDGET
        audited = len(stack.audit_records())

        refused = await alice.get(stack.endpoint, headers={**sessions[BUDGET], "Accept": "text/event-stream"})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"] == "rate_limited", refused.text
        assert upstream_gets(stack) == BUDGET  # nothing forwarded
        refusal = stack.audit_records()[audited:]
        assert [(r["decision"], r["reason"]) for r in refusal] == [("deny", "mcp_streams_exhausted")], refusal

        # another principal has a budget of its own
        assert (await open_stream(stack, bob, await session(stack, bob), exits)).status_code == 200

        # ending a session ends its stream upstream, which gives the principal's place back
        ended = await alice.delete(stack.endpoint, headers=sessions[0])
        assert ended.status_code in (200, 204), ended.text
        async with asyncio.timeout(15):
            async for _ in streams[0].aiter_bytes():
                pass
            while True:  # the place is back once the ended stream's handler returns, just after its end
                stream = await open_stream(stack, alice, sessions[BUDGET], exits)
                if stream.status_code != 429:
                    break
                await stream.aclose()
        assert stream.status_code == 200, stream.status_code
        assert upstream_gets(stack) == BUDGET + 2  # alice's two, bob's, alice's third session's
