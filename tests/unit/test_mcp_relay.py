"""broker.mcp.relay: what of an upstream MCP answer reaches the agent (HOSTILE P16, P24).

A scripted upstream (real mTLS sockets, loopback) sends exactly the bytes of each row; a front handler asks it
through the broker's own client (the MCP gateway's :class:`~broker.gateway.http1.Http1Pool`) and relays the answer
with :func:`relay`; the test reads what the agent would get.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from broker.dev.demo.expense import server_ssl_context
from broker.errors import UpstreamError
from broker.gateway.http1 import Http1Pool
from broker.mcp import jsonrpc as rpc
from broker.mcp.relay import Relay, Transform, relay
from broker.mcp.sse import EVENT_IDS, SseParser, event_id_context
from broker.tls import upstream_ssl_context
from tests.certfactory import Pki

REQUEST_ID = 7
Script = tuple[int, str, list[bytes]]


def sse(message: Any, **fields: str) -> bytes:
    head = "".join(f"{k}: {v}\n" for k, v in fields.items())
    return f"{head}data: {json.dumps(message)}\n\n".encode()


ANSWER = {"jsonrpc": "2.0", "id": REQUEST_ID, "result": {"content": [{"type": "text", "text": "ok"}]}}
PROGRESS = {
    "jsonrpc": "2.0",
    "method": "notifications/progress",
    "params": {"progressToken": "p1", "progress": 1, "message": "acct 1234"},
}
SAMPLING = {"jsonrpc": "2.0", "id": 99, "method": "sampling/createMessage", "params": {}}
ELICIT = {"jsonrpc": "2.0", "id": 98, "method": "elicitation/create", "params": {"message": "password?"}}
OTHER_ANSWER = {"jsonrpc": "2.0", "id": 8, "result": {"stolen": True}}
ODD_NOTIFICATION = {"jsonrpc": "2.0", "method": "notifications/resources/updated", "params": {"uri": "x"}}


def make_plan(
    *,
    transform: Transform | None = None,
    masked: bool = False,
    max_event_bytes: int = 4096,
    request_id: int | None = REQUEST_ID,
) -> Relay:
    return Relay(
        request_id=request_id,
        transform=transform,
        masked=masked,
        id_context=event_id_context("expenses", "s1"),
        max_event_bytes=max_event_bytes,
        max_stream_bytes=8 * max_event_bytes,
        max_seconds=10.0,
    )


Relayed = Callable[[Script, Relay], Awaitable[tuple[int, str, list[dict[str, Any]]]]]
#: the bytes the agent got, per run of the ``relayed`` fixture
AGENT_BYTES: list[bytes] = []


@pytest.fixture
async def relayed(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    aiohttp_server: Callable[..., Awaitable[TestServer]],
    pki: Pki,
) -> AsyncIterator[Relayed]:
    """Run one scripted upstream answer through :func:`relay`: (status, content type, messages the agent got)."""
    script: dict[str, Any] = {}

    async def upstream(request: web.Request) -> web.StreamResponse:
        status, content_type, chunks = script["script"]
        out = web.StreamResponse(status=status, headers={"Content-Type": content_type})
        await out.prepare(request)
        for chunk in chunks:
            await out.write(chunk)
        await out.write_eof()
        return out

    upstream_app = web.Application()
    upstream_app.router.add_get("/", upstream)
    tls = server_ssl_context(pki.backend, pki.backend_key, ca=pki.ca)
    upstream_server = await aiohttp_server(upstream_app, ssl=tls)
    client_tls = upstream_ssl_context(ca=str(pki.ca), cert=str(pki.broker), key=str(pki.broker_key))
    pool = Http1Pool()

    async def front(request: web.Request) -> web.StreamResponse:
        url = upstream_server.make_url("/").with_scheme("https")
        async with pool.stream(
            "expenses", "GET", url, client_tls, None, {}, connect_seconds=5.0, read_seconds=5.0
        ) as answer:
            try:
                return await relay(request, answer, script["plan"], {"X-Request-Id": "r1"})
            except UpstreamError as exc:
                return web.json_response({"error": exc.reason}, status=502, headers={"X-Request-Id": "r1"})

    front_app = web.Application()
    front_app.router.add_get("/", front)
    front_client = await aiohttp_client(front_app)

    async def run(scripted: Script, plan: Relay) -> tuple[int, str, list[dict[str, Any]]]:
        script.update(script=scripted, plan=plan)
        async with front_client.get("/") as response:
            body = await response.read()
            AGENT_BYTES.append(body)
            assert response.headers.get("X-Request-Id") == "r1"
            if response.content_type == "text/event-stream":
                assert response.headers["X-Accel-Buffering"] == "no"
                events = SseParser(max_event_bytes=1 << 20).feed(body)
                return response.status, response.content_type, [json.loads(e.data) for e in events if e.data]
            return response.status, response.content_type, [json.loads(body)] if body else []

    yield run
    await pool.close()


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([sse(ANSWER)], [ANSWER]),
        ([sse(PROGRESS), sse(ANSWER)], [PROGRESS, ANSWER]),
        ([sse(OTHER_ANSWER), sse(ANSWER)], [ANSWER]),
        ([sse(SAMPLING), sse(ELICIT), sse(ANSWER)], [ANSWER]),
        ([sse(ODD_NOTIFICATION), sse(ANSWER)], [ANSWER]),
        ([b"data: not json\n\n", sse(ANSWER)], [ANSWER]),
        ([sse({**ANSWER, "id": str(REQUEST_ID)}), sse(ANSWER)], [ANSWER]),
        ([sse(ANSWER), sse({**ANSWER, "result": {"second": True}})], [ANSWER]),
    ],
    ids=[
        "answer",
        "notification-then-answer",
        "another-requests-id",
        "server-to-client-requests",
        "unlisted-notification",
        "not-json",
        "id-of-another-type",
        "second-answer",
    ],
)
async def test_p24_sse_events_reaching_the_agent(
    relayed: Relayed, chunks: list[bytes], expected: list[dict[str, Any]]
) -> None:
    status, content_type, messages = await relayed((200, "text/event-stream", chunks), make_plan())
    assert (status, content_type, messages) == (200, "text/event-stream", expected)


async def test_a_masked_call_gets_its_answer_without_progress_or_free_text(relayed: Relayed) -> None:
    chunks = [
        sse(PROGRESS),
        sse({"jsonrpc": "2.0", "method": "notifications/message", "params": {}}),
        sse(ANSWER),
    ]
    plan = make_plan(masked=True)
    _, _, messages = await relayed((200, "text/event-stream", chunks), plan)
    assert messages == [ANSWER]


@pytest.mark.parametrize(
    "chunks",
    [
        [sse(PROGRESS)],
        [b"data: " + b"x" * 5000],
        [sse(PROGRESS), b"data: \xff\n\n"],
    ],
    ids=["ended-without-answer", "oversized-event", "not-utf8"],
)
async def test_a_broken_stream_ends_with_an_error_for_the_request(
    relayed: Relayed, chunks: list[bytes]
) -> None:
    status, _, messages = await relayed((200, "text/event-stream", chunks), make_plan())
    assert status == 200
    assert messages[-1]["id"] == REQUEST_ID and messages[-1]["error"]["code"] == rpc.INTERNAL_ERROR


async def test_events_are_reencoded_one_data_line_per_line(relayed: Relayed) -> None:
    answer = {**ANSWER, "result": {"content": [{"type": "text", "text": "line1\nline2\n\ndata: fake"}]}}
    raw = f"data: {json.dumps(answer)}\n\n".encode()
    _status, _, messages = await relayed((200, "text/event-stream", [raw]), make_plan())
    assert messages == [answer]


async def test_the_transform_rewrites_the_answer_and_may_refuse_it(relayed: Relayed) -> None:
    async def mask(message: dict[str, Any]) -> dict[str, Any]:
        return {**message, "result": {"masked": True}}

    async def refuse(message: dict[str, Any]) -> dict[str, Any]:
        raise rpc.JsonRpcError(rpc.INTERNAL_ERROR, "cannot filter", "response_unfilterable", http_status=200)

    for content_type, chunks in (
        ("text/event-stream", [sse(ANSWER)]),
        ("application/json", [json.dumps(ANSWER).encode()]),
    ):
        _, _, masked = await relayed((200, content_type, chunks), make_plan(transform=mask))
        assert masked == [{**ANSWER, "result": {"masked": True}}]
        _, _, refused = await relayed((200, content_type, chunks), make_plan(transform=refuse))
        assert refused == [rpc.error_body(REQUEST_ID, rpc.INTERNAL_ERROR, "cannot filter")]


@pytest.mark.parametrize(
    ("script", "status", "expected"),
    [
        (
            (200, "application/json", [json.dumps(OTHER_ANSWER).encode()]),
            502,
            {"error": "upstream_no_answer"},
        ),
        ((200, "application/json", [json.dumps(SAMPLING).encode()]), 502, {"error": "upstream_no_answer"}),
        (
            (200, "application/json", [b'{"jsonrpc":"2.0","id":7,"id":7,"result":{}}']),
            502,
            {"error": "upstream_bad_json"},
        ),
        ((200, "application/json", [b"x" * 5000]), 502, {"error": "upstream_too_large"}),
        ((200, "text/html", [b"<html>"]), 502, {"error": "upstream_not_mcp"}),
        ((500, "application/json", [b"{}"]), 502, {"error": "upstream_status_5xx"}),
        (
            (
                404,
                "application/json",
                [json.dumps(rpc.error_body(None, -32600, "Session not found")).encode()],
            ),
            404,
            rpc.error_body(None, -32600, "Session not found"),
        ),
        (
            (405, "text/plain", [b"no"]),
            405,
            rpc.error_body(REQUEST_ID, -32600, "the MCP server refused the request"),
        ),
    ],
    ids=[
        "json-other-id",
        "json-request",
        "json-duplicate-member",
        "json-too-large",
        "html",
        "5xx",
        "404",
        "405",
    ],
)
async def test_other_answers(relayed: Relayed, script: Script, status: int, expected: dict[str, Any]) -> None:
    got_status, _, messages = await relayed(script, make_plan())
    assert (got_status, messages) == (status, [expected])


async def test_a_get_stream_passes_notifications_and_never_answers(relayed: Relayed) -> None:
    chunks = [
        sse(PROGRESS),
        sse(ANSWER),
        sse(SAMPLING),
        sse({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}),
    ]
    _, _, messages = await relayed((200, "text/event-stream", chunks), make_plan(request_id=None))
    assert messages == [PROGRESS, {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}]


# --- masked servers and the SSE fields (CONTRACT §12) ---------------------------------------------------------

SECRET = "DE89370400440532013000"
ACCOUNT_NUMBER = 4400532013000  # a masked value that is a number


def notification(method: str, params: Any = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return message


MASKED_NOTIFICATIONS = [
    # progress numbers arrive before the answer could be masked, and a number can be a masked value
    (notification("notifications/progress", {"progressToken": "p1", "progress": 1, "total": 2}), False),
    (notification("notifications/progress", {"progressToken": "p1", "progress": ACCOUNT_NUMBER}), False),
    (
        notification(
            "notifications/progress",
            {"progressToken": "p1", "progress": 1, "total": 2, "message": SECRET, "_meta": {"x": SECRET}},
        ),
        False,
    ),
    (notification("notifications/progress", {"progressToken": "p2", "progress": 1}), False),
    (notification("notifications/progress", {"progressToken": SECRET, "progress": 1}), False),
    (notification("notifications/progress", {"progressToken": 1, "progress": 1}), False),
    (notification("notifications/progress", {"progressToken": "p1", "progress": SECRET}), False),
    (notification("notifications/progress", {"progressToken": "p1", "progress": True}), False),
    (notification("notifications/message", {"level": "info", "data": SECRET}), False),
    (notification("notifications/cancelled", {"requestId": REQUEST_ID, "reason": SECRET}), False),
    (notification("notifications/resources/updated", {"uri": SECRET}), False),
    (notification("notifications/tools/list_changed", {"_meta": {"x": SECRET}}), True),
]


@pytest.mark.parametrize(
    ("message", "passes"),
    MASKED_NOTIFICATIONS,
    ids=[
        "progress-numbers",
        "progress-number-carrying-data",
        "progress-free-text",
        "progress-another-token",
        "progress-token-carrying-data",
        "progress-token-of-another-type",
        "progress-not-a-number",
        "progress-boolean",
        "log-message",
        "cancelled",
        "other-notification",
        "list-changed-bare",
    ],
)
async def test_a_masked_server_passes_only_harmless_notifications(
    relayed: Relayed, message: dict[str, Any], passes: bool
) -> None:
    plan = make_plan(masked=True)
    _, _, messages = await relayed((200, "text/event-stream", [sse(message), sse(ANSWER)]), plan)
    assert messages[-1] == ANSWER
    assert SECRET not in json.dumps(messages) and str(ACCOUNT_NUMBER) not in json.dumps(messages)
    assert messages[:-1] == ([{"jsonrpc": "2.0", "method": message["method"]}] if passes else [])


async def test_a_masked_get_stream_passes_no_progress_and_no_free_text(relayed: Relayed) -> None:
    chunks = [
        sse(notification("notifications/progress", {"progressToken": "p1", "progress": 1})),
        sse(notification("notifications/message", {"level": "info", "data": SECRET})),
        sse(notification("notifications/tools/list_changed")),
    ]
    plan = make_plan(masked=True, request_id=None)
    _, _, messages = await relayed((200, "text/event-stream", chunks), plan)
    assert messages == [notification("notifications/tools/list_changed")]


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
async def test_upstream_event_and_id_fields_never_reach_the_agent(relayed: Relayed, masked: bool) -> None:
    chunks = [
        f"id: {SECRET}\nretry: 3000\n\n".encode(),  # a priming event
        sse(notification("notifications/message", {"data": "x"}), id=f"{SECRET}-1", event=SECRET),
        sse(ANSWER, id=f"{SECRET}-2", event=f"msg-{SECRET}"),
    ]
    raw = await relayed_raw(relayed, (200, "text/event-stream", chunks), make_plan(masked=masked))
    assert SECRET.lower() not in raw.lower()
    events = SseParser(max_event_bytes=1 << 20).feed(raw.encode())
    assert {e.event for e in events if e.data} == {"message"}
    assert all(e.id for e in events)  # every upstream id has its broker id, dropped events' included
    assert [e.retry for e in events if e.retry is not None] == ([] if masked else [3000])
    ids = [EVENT_IDS.open(e.id or "", event_id_context("expenses", "s1")) for e in events]
    assert ids == [SECRET, f"{SECRET}-1", f"{SECRET}-2"]  # resumption opens them back


async def relayed_raw(relayed: Relayed, script: Script, plan: Relay) -> str:
    await relayed(script, plan)
    return AGENT_BYTES[-1].decode()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": SECRET, "data": SECRET}},
            rpc.error_body(REQUEST_ID, -32600, "Invalid Request"),
        ),
        (
            {"jsonrpc": "2.0", "id": 3, "error": {"code": SECRET, "message": "x"}},
            rpc.error_body(REQUEST_ID, rpc.INTERNAL_ERROR, "Internal error"),
        ),
    ],
    ids=["standard-code", "code-not-an-integer"],
)
async def test_a_masked_servers_4xx_error_keeps_its_code_only(
    relayed: Relayed, body: dict[str, Any], expected: dict[str, Any]
) -> None:
    script = (400, "application/json", [json.dumps(body).encode()])
    status, _, messages = await relayed(script, make_plan(masked=True))
    assert (status, messages) == (400, [expected])


async def test_answers_are_rebuilt_from_the_jsonrpc_members_only(relayed: Relayed) -> None:
    hostile = {**ANSWER, "leak": SECRET, "_meta": SECRET}
    for content_type, chunks in (
        ("text/event-stream", [sse(hostile)]),
        ("application/json", [json.dumps(hostile).encode()]),
    ):
        _, _, messages = await relayed((200, content_type, chunks), make_plan())
        assert messages == [ANSWER]


async def test_a_masked_servers_error_answers_keep_their_code_only(relayed: Relayed) -> None:
    error = {"jsonrpc": "2.0", "id": REQUEST_ID, "error": {"code": -32601, "message": SECRET, "data": SECRET}}
    expected = rpc.error_body(REQUEST_ID, -32601, "Method not found")
    for content_type, chunks in (
        ("text/event-stream", [sse(error)]),
        ("application/json", [json.dumps(error).encode()]),
    ):
        _, _, masked = await relayed((200, content_type, chunks), make_plan(masked=True))
        assert masked == [expected]
        _, _, unmasked = await relayed((200, content_type, chunks), make_plan())
        assert unmasked == [error]
