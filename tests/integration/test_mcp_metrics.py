"""MCP metrics labels are closed sets (CONTRACT §16): ``mcp_server`` is a configured server name (``-`` for a path
that names none), ``mcp_method`` a known MCP method, ``GET``/``DELETE`` or ``other`` — never a string a client
chose. Scraped from ``/metrics`` of a running broker (real TLS, the demo MCP server upstream)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker.observability import MCP_METHOD_LABELS
from tests.certfactory import Pki
from tests.integration.test_mcp import ALICE, META, McpStack, mcp_stack

LIST = {"jsonrpc": "2.0", "id": 7, "method": "tools/list"}
MODERN_LIST = {**LIST, "params": {"_meta": META}}
MODERN_HEADERS = {"MCP-Protocol-Version": "2026-07-28", "Mcp-Method": "tools/list"}
ACCEPT = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
FAMILIES = ("broker_mcp_requests", "broker_mcp_request_duration_seconds")


@pytest.fixture
async def stack(pki: Pki, tmp_path: Path) -> AsyncIterator[McpStack]:
    async with mcp_stack(pki, tmp_path) as running:
        yield running


async def mcp_label_sets(stack: McpStack) -> dict[str, set[tuple[str, str]]]:
    """family -> every (mcp_server, mcp_method) pair it exports."""
    async with httpx2.AsyncClient() as admin:
        text = (await admin.get(f"{stack.admin_url}/metrics")).text
    found: dict[str, set[tuple[str, str]]] = {family: set() for family in FAMILIES}
    for family in text_string_to_metric_families(text):
        if family.name in found:
            for sample in family.samples:
                found[family.name].add((sample.labels["mcp_server"], sample.labels["mcp_method"]))
    return found


def hostile_bodies() -> list[Any]:
    return [
        {**LIST, "method": "Tools/List"},
        {**LIST, "method": "tools/list\u0000"},
        {**LIST, "method": "x" * 2000},
        {**LIST, "method": "notifications/../../evil"},
        {"jsonrpc": "2.0", "method": "notifications/made-up"},
        [LIST, LIST],
        "not an object",
    ]


HOSTILE_SERVERS = ["nope", "Expenses", "expenses.", "x" * 200, quote("expenses\u0000", safe="")]


async def test_configured_server_children_exist_before_any_request(stack: McpStack) -> None:
    labels = await mcp_label_sets(stack)
    for family in FAMILIES:
        assert ("expenses", "tools/call") in labels[family]
        assert ("expenses", "tools/list") in labels[family]
        assert {server for server, _ in labels[family]} == {"expenses"}


async def test_hostile_methods_and_unknown_servers_create_no_new_label_values(stack: McpStack) -> None:
    before = await mcp_label_sets(stack)
    alice = stack.http("alice", ALICE)
    answer = await stack.post(alice, MODERN_LIST, MODERN_HEADERS)
    assert answer.status_code == 200 and "result" in answer.json(), answer.text
    for body in hostile_bodies():
        answer = await stack.post(alice, body, {"Mcp-Method": "evil/method", "Mcp-Name": "x"})
        assert answer.status_code == 400, (body, answer.text)
    for server in HOSTILE_SERVERS:
        url = f"{stack.public_url}/mcp/{server}"
        answer = await alice.post(url, content=json.dumps(LIST).encode(), headers=ACCEPT)
        assert answer.status_code == 404, (server, answer.text)
    async with httpx2.AsyncClient(verify=False) as anonymous:  # no credentials at all: refused first
        answer = await anonymous.post(f"{stack.public_url}/mcp/evil-{'y' * 50}", json=LIST)
        assert answer.status_code in (400, 401), answer.text
    after = await mcp_label_sets(stack)
    for family in FAMILIES:
        # the allowed listing, the hostile bodies on the configured server, every unknown or anonymous path
        assert after[family] - before[family] == {("expenses", "other"), ("-", "other")}, family
        assert {method for _, method in after[family]} <= MCP_METHOD_LABELS
        assert {server for server, _ in after[family]} <= {"expenses", "-"}
    assert len(stack.upstream.received) == 1  # only the allowed listing was forwarded


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-11-25",
        "capabilities": {},
        "clientInfo": {"name": "metrics-test", "version": "1"},
    },
}
SESSION_METHODS = ("initialize", "notifications/initialized", "GET", "DELETE")


async def mcp_request_counts(stack: McpStack) -> dict[tuple[str, str, str], float]:
    """(mcp_method, decision, code) -> count on ``broker_mcp_requests_total`` for the ``expenses`` server."""
    async with httpx2.AsyncClient() as admin:
        text = (await admin.get(f"{stack.admin_url}/metrics")).text
    counts: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "broker_mcp_requests":
            for sample in family.samples:
                labels = sample.labels
                if sample.name.endswith("_total") and labels["mcp_server"] == "expenses":
                    counts[(labels["mcp_method"], labels["decision"], labels["code"])] = sample.value
    return counts


def grown(
    before: dict[tuple[str, str, str], float], after: dict[tuple[str, str, str], float]
) -> dict[Any, float]:
    return {
        key: value - before.get(key, 0.0) for key, value in after.items() if value != before.get(key, 0.0)
    }


async def test_a_live_session_counts_its_stream_and_its_end_as_get_and_delete(stack: McpStack) -> None:
    """initialize, the session's GET stream, DELETE (ending the session closes the stream), then /metrics."""
    before = await mcp_request_counts(stack)
    alice = stack.http("alice", ALICE)
    opened = await stack.post(alice, INITIALIZE)
    assert opened.status_code == 200, opened.text
    session = {"Mcp-Session-Id": opened.headers["mcp-session-id"], "MCP-Protocol-Version": "2025-11-25"}
    ready = await stack.post(alice, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    assert ready.status_code == 202, ready.text
    async with alice.stream(
        "GET", stack.endpoint, headers={**session, "Accept": "text/event-stream"}
    ) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("text/event-stream")
        ended = await alice.delete(stack.endpoint, headers=session)
        assert ended.status_code in (200, 204), ended.text
        async with asyncio.timeout(15):  # the upstream ends the session's stream with the session
            async for _ in stream.aiter_bytes():
                pass
    deadline = asyncio.get_running_loop().time() + 15
    while True:  # the GET is counted when its handler returns, just after the client saw the stream end
        added = grown(before, await mcp_request_counts(stack))
        if any(method == "GET" for method, _, _ in added) or asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)
    assert {method: count for (method, _, _), count in added.items()} == dict.fromkeys(SESSION_METHODS, 1.0)
    assert {decision for _, decision, _ in added} == {"allow"}, added
    assert [r.method for r in stack.upstream.received] == ["POST", "POST", "GET", "DELETE"]
