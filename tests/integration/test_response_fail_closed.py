"""Responses fail closed, end to end (CONTRACT §12; HOSTILE 00 "every channel a byte can take to the agent").

A real broker on real sockets; a hostile upstream (``conftest.recording_upstream``, HTTPS with client
certificates) answers crafted bytes — every shape and every channel we could think of, on ``/v1`` and on
``/mcp`` (POST answers in JSON and SSE, the GET stream). The assertion is the same everywhere: the masked bank
account, in any casing or Unicode form, and other departments' rows are nowhere in the bytes the agent receives
(body, headers, SSE fields); where the broker cannot filter, the agent gets 502 / a JSON-RPC error instead.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from broker.audit.outcome import response_digest
from broker.mcp.sse import SseParser
from broker.resources import MCP_PINS
from tests.certfactory import Pki
from tests.conftest import BrokerFactory, BrokerUnderTest, Caller, Recorded, RecordingUpstream, base_config
from tests.integration.test_shared_state_quotas import Switchable
from tests.tamper import flip_char

BANK = "DE89370400440532013000"
THEIRS = "FR7630006000011234567890189"


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


VARIANTS = [BANK, BANK.lower(), BANK.swapcase(), fullwidth(BANK)]
SECRETS = (BANK, THEIRS, "INV-7")


def fold(text: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def assert_clean(headers: CIMultiDict[str], body: bytes) -> None:
    """No secret in the headers or the bytes, raw or after JSON decoding (``\\u`` escapes), in any form."""
    texts = [f"{k}: {v}" for k, v in headers.items()]
    raw = body.decode("utf-8")
    texts.append(raw)
    if headers.get("Content-Type", "").startswith("text/event-stream"):
        for event in SseParser(max_event_bytes=1 << 24).feed(body):
            texts += [event.event or "", event.id or ""]
            if event.data:
                texts.append(json.dumps(json.loads(event.data), ensure_ascii=False))
    elif raw:
        texts.append(json.dumps(json.loads(raw), ensure_ascii=False))
    for text in texts:
        for secret in SECRETS:
            assert fold(secret) not in fold(text), (secret, text)


# --- the hostile upstream --------------------------------------------------------------------------------------

Answer = Callable[[Recorded], Awaitable[web.StreamResponse]]


def raw_answer(status: int, body: bytes | str, content_type: str = "application/json") -> Answer:
    async def answer(_: Recorded) -> web.StreamResponse:
        data = body.encode() if isinstance(body, str) else body
        return web.Response(status=status, body=data, headers={"Content-Type": content_type})

    return answer


def sse_answer(*events: bytes | dict[str, Any], status: int = 200) -> Answer:
    async def answer(request: Recorded) -> web.StreamResponse:
        return web.Response(
            status=status,
            body=b"".join(e if isinstance(e, bytes) else sse(e) for e in events),
            headers={"Content-Type": "text/event-stream"},
        )

    return answer


def sse(message: dict[str, Any], **fields: str) -> bytes:
    head = "".join(f"{k}: {v}\n" for k, v in fields.items())
    return f"{head}data: {json.dumps(message, ensure_ascii=False)}\n\n".encode()


@dataclass
class Hostile:
    """Speaks enough MCP for the broker's catalog and sessions; everything else is scripted per test."""

    v1: Answer = field(default_factory=lambda: raw_answer(200, "{}"))
    call: Answer = field(default_factory=lambda: raw_answer(200, "{}"))
    stream: Answer = field(default_factory=lambda: sse_answer())
    tools: tuple[str, ...] = ("approveExpense", "listInvoices", "plainTool")
    #: the initialize answer (its id is set to the request's)
    initialize: dict[str, Any] = field(
        default_factory=lambda: {
            "jsonrpc": "2.0",
            "result": {
                "protocolVersion": "2025-11-25",
                "capabilities": {"tools": {}, "logging": {}},
                "serverInfo": {"name": "hostile", "version": "1"},
            },
        }
    )

    async def respond(self, request: Recorded) -> web.StreamResponse:
        if not request.path.startswith("/mcp"):
            return await self.v1(request)
        if request.method == "GET":
            return await self.stream(request)
        if request.method == "DELETE":
            return web.Response(status=200)
        message = request.json()
        if "id" not in message:
            return web.Response(status=202)
        if message["method"] == "initialize":
            return web.json_response(
                {**self.initialize, "id": message["id"]}, headers={"Mcp-Session-Id": "sess-1"}
            )
        if message["method"] == "tools/list":
            tools = [{"name": n, "inputSchema": {"type": "object"}} for n in self.tools]
            return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {"tools": tools}})
        return await self.call(request)


def tool(name: str, url: str, response: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "input_schema": {"type": "object"},
        "upstream": {"url": f"{url}/{name}", "timeout_seconds": 5},
        **({"response": response} if response else {}),
    }


@pytest.fixture
async def setup(
    broker_factory: BrokerFactory, upstream: RecordingUpstream, pki: Pki, tmp_path: Path
) -> tuple[BrokerUnderTest, Hostile, RecordingUpstream]:
    hostile = Hostile()
    upstream.respond = hostile.respond
    config = base_config(
        pki,
        tmp_path,
        upstream_url=upstream.url,
        tools=[
            tool("approveExpense", upstream.url, {"mask": [{"path": "vendor.bank_account", "keep_last": 4}]}),
            tool(
                "listInvoices",
                upstream.url,
                {
                    "filter_rows": [{"path": "invoices", "keep": "row.department == subject.department"}],
                    "mask": [{"path": "invoices.vendor.bank_account", "keep_last": 4}],
                },
            ),
            tool("plainTool", upstream.url),
        ],
        mcp_servers=[
            {
                "name": "hostile",
                "upstream": {"url": f"{upstream.url}/mcp"},
                "tools": [{"name": "approveExpense"}, {"name": "listInvoices"}, {"name": "plainTool"}],
            },
            {
                "name": "plain",
                "upstream": {"url": f"{upstream.url}/mcp-plain"},
                "tools": [{"name": "plainTool"}],
            },
        ],
    )
    return await broker_factory(config), hostile, upstream


def alice(broker: BrokerUnderTest) -> Caller:
    return broker.caller("alice", claims={"department": "42"})


async def request(
    caller: Caller, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    hdrs = {**caller.auth_headers(method, path), **(headers or {})}
    data = None
    if body is not None:
        hdrs["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    async with (
        caller.broker.session(agent=None, cert=caller.cert, key=caller.key) as session,
        session.request(method, caller.broker.url + path, data=data, headers=hdrs) as resp,
    ):
        return resp.status, CIMultiDict(resp.headers), await resp.read()


# --- /v1 -------------------------------------------------------------------------------------------------------


def approved(**changes: Any) -> dict[str, Any]:
    return {
        "invoice_id": "INV-8831",
        "status": "approved",
        "amount": 4800,
        "department": "42",
        "vendor": {"name": "ACME GmbH", "bank_account": BANK},
        **changes,
    }


def row(number: int, department: str = "42", bank: str = BANK) -> dict[str, Any]:
    return {"invoice_id": f"INV-{number}", "department": department, "vendor": {"bank_account": bank}}


V1_APPROVE = [
    ("reference", 200, approved(), 200),
    ("wrapped-object", 200, {"data": approved()}, 502),
    ("top-level-array", 200, [approved(), approved()], 200),
    ("sibling-key", 200, approved(vendor={"name": "x", "bankAccount": BANK}), 502),
    ("value-duplicated", 200, approved(note=BANK, payee={"iban": BANK.lower()}), 200),
    ("in-a-key-name", 200, approved(accounts={BANK: "primary"}, by={fullwidth(BANK): 1}), 200),
    ("keys-colliding-once-scrubbed", 200, approved(accounts={BANK: "primary", fullwidth(BANK): 1}), 502),
    ("arrays-of-arrays", 200, approved(history=[[[BANK.swapcase()]], [[{"x": [BANK]}]]]), 200),
    ("json-inside-a-string", 200, approved(raw=json.dumps(approved())), 200),
    (
        "4xx-body",
        409,
        {"error": "conflict", "vendor": {"bank_account": BANK}, "detail": f"{BANK} blocked"},
        409,
    ),
    ("4xx-other-shape", 404, {"error": "not_found", "detail": "no such invoice"}, 404),
    ("5xx-body", 500, {"error": "db", "detail": BANK}, 502),
    ("503-body", 503, {"detail": BANK}, 502),
]


@pytest.mark.parametrize(
    ("status", "body", "expected"), [c[1:] for c in V1_APPROVE], ids=[c[0] for c in V1_APPROVE]
)
async def test_v1_bodies_never_carry_a_masked_value(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream], status: int, body: Any, expected: int
) -> None:
    broker, hostile, _ = setup
    hostile.v1 = raw_answer(status, json.dumps(body))
    got, headers, raw = await request(alice(broker), "POST", "/v1/tools/approveExpense", {})
    assert got == expected, raw
    assert_clean(headers, raw)
    if expected == 502:
        assert json.loads(raw)["error"] == "upstream_error"
    elif "vendor" in json.dumps(body):
        assert "****3000" in raw.decode()


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", '{"vendor": {"bank_account": "x", "bank_account": "' + BANK + '"}}'),
        (
            "application/json",
            '{"vendor": {"bank_account": "\\u0044\\u0045' + BANK[2:] + '"}, "n": "\\u0064e' + BANK[2:] + '"}',
        ),
        ("text/plain", json.dumps(approved())),
        ("application/json", json.dumps(json.dumps(approved()))),
    ],
    ids=["duplicate-members", "unicode-escapes", "text-plain", "json-in-a-top-level-string"],
)
async def test_v1_bodies_the_broker_cannot_read_plainly(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream], content_type: str, body: str
) -> None:
    broker, hostile, _ = setup
    hostile.v1 = raw_answer(200, body, content_type)
    status, headers, raw = await request(alice(broker), "POST", "/v1/tools/approveExpense", {})
    assert status in (200, 502)
    assert_clean(headers, raw)


LIST_SHAPES = [
    ("reference", {"invoices": [row(1), row(7, "7", THEIRS), row(2)]}, 200),
    ("wrapped-object", {"data": {"invoices": [row(1), row(7, "7", THEIRS)]}}, 502),
    ("top-level-array", [row(1), row(7, "7", THEIRS)], 502),
    ("renamed-key", {"items": [row(1), row(7, "7", THEIRS)]}, 502),
    ("sibling-list", {"invoices": [row(1)], "archive": [row(7, "7", THEIRS)]}, 502),
    ("lone-row-elsewhere", {"invoices": [row(1)], "latest": row(7, "7", THEIRS)}, 502),
    ("rows-path-holds-an-object", {"invoices": row(7, "7", THEIRS)}, 502),
    ("removed-rows-account-quoted", {"invoices": [row(1), row(7, "7", THEIRS)], "top": THEIRS.lower()}, 200),
    ("4xx-with-rows-elsewhere", {"error": "x", "rows": [row(7, "7", THEIRS)]}, 502),
]


@pytest.mark.parametrize(("body", "expected"), [c[1:] for c in LIST_SHAPES], ids=[c[0] for c in LIST_SHAPES])
async def test_v1_row_filters_never_pass_other_departments_rows(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream], body: Any, expected: int
) -> None:
    broker, hostile, _ = setup
    hostile.v1 = raw_answer(404 if "error" in body else 200, json.dumps(body))
    status, headers, raw = await request(alice(broker), "POST", "/v1/tools/listInvoices", {})
    assert status == expected, raw
    assert_clean(headers, raw)
    if status == 200:
        assert [r["invoice_id"] for r in json.loads(raw)["invoices"]] == ["INV-1", "INV-2"][
            : len(body["invoices"]) - 1
        ]


OTHER = "GB29NWBK60161331926819"  # another account, under the masked key elsewhere in the answer


@pytest.mark.parametrize("status", [200, 409])
async def test_v1_a_mask_names_its_field_wherever_it_appears(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream], status: int
) -> None:
    broker, hostile, _ = setup
    body = approved(
        history=[{"vendor": {"name": "old", "bank_account": OTHER}}],
        Vendor2={"BANK_ACCOUNT": OTHER.lower()},
        note=f"moved from {fullwidth(OTHER)}",
    )
    hostile.v1 = raw_answer(status, json.dumps(body))
    got, headers, raw = await request(alice(broker), "POST", "/v1/tools/approveExpense", {})
    assert got == status, raw
    assert fold(OTHER) not in fold(raw.decode()) and fold(OTHER) not in fold(json.dumps(json.loads(raw)))
    assert_clean(headers, raw)
    out = json.loads(raw)
    assert out["history"][0]["vendor"]["bank_account"] == "****6819"
    assert out["Vendor2"] == {"BANK_ACCOUNT": "****6819"} and out["vendor"]["bank_account"] == "****3000"


async def test_v1_rows_nested_in_a_kept_row_are_rows_too(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream],
) -> None:
    broker, hostile, _ = setup
    nested = {**row(1), "related": [{"invoice_id": "INV-7", "department": "7", "amount": 99999}]}
    hostile.v1 = raw_answer(200, json.dumps({"invoices": [nested]}))
    status, headers, raw = await request(alice(broker), "POST", "/v1/tools/listInvoices", {})
    assert status == 502 and json.loads(raw)["error"] == "upstream_error"
    assert_clean(headers, raw)
    kept = {**row(1), "related": [{"invoice_id": "INV-2", "department": "42"}]}
    hostile.v1 = raw_answer(200, json.dumps({"invoices": [kept]}))
    status, _, raw = await request(alice(broker), "POST", "/v1/tools/listInvoices", {})
    assert status == 200 and json.loads(raw)["invoices"][0]["related"] == [
        {"invoice_id": "INV-2", "department": "42"}
    ]


async def test_v1_unfiltered_tools_pass_their_body_unparsed_but_not_5xx(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream],
) -> None:
    broker, hostile, _ = setup
    odd = b'{"a": 1, "a": 2, "note": "kept as sent"}'
    hostile.v1 = raw_answer(200, odd)
    status, _, raw = await request(alice(broker), "POST", "/v1/tools/plainTool", {})
    assert (status, raw) == (200, odd)
    hostile.v1 = raw_answer(500, '{"trace": "internal"}')
    status, _, raw = await request(alice(broker), "POST", "/v1/tools/plainTool", {})
    assert status == 502 and b"internal" not in raw


# --- /mcp ------------------------------------------------------------------------------------------------------

META = {
    "io.modelcontextprotocol/protocolVersion": "2026-07-28",
    "io.modelcontextprotocol/clientCapabilities": {},
}


async def mcp_call(
    caller: Caller,
    name: str,
    *,
    server: str = "hostile",
    progress_token: str | None = "p1",  # noqa: S107 (an MCP progress token)
) -> tuple[int, CIMultiDict[str], bytes]:
    meta = {**META, **({"progressToken": progress_token} if progress_token else {})}
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "tools/call",
        "params": {"name": name, "arguments": {}, "_meta": meta},
    }
    headers = {
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/call",
        "Mcp-Name": name,
        "Accept": "application/json, text/event-stream",
    }
    return await request(caller, "POST", f"/mcp/{server}", body, headers)


def messages_of(headers: CIMultiDict[str], raw: bytes) -> list[dict[str, Any]]:
    if headers["Content-Type"].startswith("text/event-stream"):
        return [json.loads(e.data) for e in SseParser(max_event_bytes=1 << 24).feed(raw) if e.data]
    return [json.loads(raw)]


def result(**members: Any) -> dict[str, Any]:
    structured = approved()
    return {
        "content": [{"type": "text", "text": json.dumps(structured)}],
        "structuredContent": structured,
        **members,
    }


def answer(value: Any = None, **members: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "result": result(**members) if value is None else value, **({})}


def progress(**params: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "method": "notifications/progress",
        "params": {"progressToken": "p1", "progress": 1, **params},
    }


def channels(secret: str) -> dict[str, Answer]:
    """Every channel of an MCP answer that could carry ``secret`` (the tool's own masked value) to the agent."""
    error = {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": -32000, "message": f"failed for {secret}", "data": {"account": secret}},
    }
    return {
        "json-error-message-and-data": raw_answer(200, json.dumps(error)),
        "sse-error-message-and-data": sse_answer(error),
        "http-400-error-body": raw_answer(400, json.dumps({**error, "id": None})),
        "http-500-body": raw_answer(500, json.dumps(error)),
        "result-_meta": raw_answer(200, json.dumps(answer(_meta={"trace": secret, secret: 1}))),
        "result-other-member": raw_answer(200, json.dumps(answer(debug=[[secret]]))),
        "content-annotations-and-_meta": raw_answer(
            200,
            json.dumps(
                answer(
                    {
                        **result(),
                        "content": [
                            {
                                "type": "text",
                                "text": json.dumps(approved()),
                                "annotations": {"note": secret},
                                "_meta": {secret: True},
                            }
                        ],
                    }
                )
            ),
        ),
        "structured-sibling": raw_answer(200, json.dumps(answer(structuredContent=approved(iban=secret)))),
        "json-text-other-member": raw_answer(
            200,
            json.dumps(
                answer({"content": [{"type": "text", "text": json.dumps(approved(note=f"to {secret}"))}]})
            ),
        ),
        "plain-text-content": raw_answer(
            200, json.dumps(answer({**result(), "content": [{"type": "text", "text": f"paid {secret}"}]}))
        ),
        "image-content": raw_answer(
            200,
            json.dumps(
                answer({**result(), "content": [{"type": "image", "data": secret, "mimeType": "x/y"}]})
            ),
        ),
        "wrapped-structured": raw_answer(
            200, json.dumps(answer({"content": [], "structuredContent": {"data": approved()}}))
        ),
        "extra-top-level-member": raw_answer(200, json.dumps({**answer(), "leak": secret})),
        "progress-message": sse_answer(progress(message=f"reading {secret}", total=2), answer()),
        "progress-another-token": sse_answer(progress(progressToken=secret), answer()),
        "log-notification": sse_answer(
            {
                "jsonrpc": "2.0",
                "method": "notifications/message",
                "params": {"level": "info", "data": secret},
            },
            answer(),
        ),
        "server-to-client-request": sse_answer(
            {"jsonrpc": "2.0", "id": 5, "method": "elicitation/create", "params": {"message": secret}},
            answer(),
        ),
        "another-requests-answer": sse_answer({"jsonrpc": "2.0", "id": 2, "result": {"x": secret}}, answer()),
        "sse-event-and-id-fields": sse_answer(
            f"id: {secret}\nretry: 1\n\n".encode(),
            sse(answer(), id=f"{secret}-1", event=secret),
        ),
        "sse-broken-after-secret-progress": sse_answer(progress(message=secret)),
        "progress-numbers": sse_answer(progress(total=2), answer()),
    }


CHANNELS = list(channels("x"))


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=["as-is", "lower", "swapcase", "fullwidth"])
@pytest.mark.parametrize("channel", CHANNELS)
async def test_mcp_no_channel_carries_a_masked_value(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream], channel: str, variant: int
) -> None:
    broker, hostile, _ = setup
    hostile.call = channels(VARIANTS[variant])[channel]
    status, headers, raw = await mcp_call(alice(broker), "approveExpense")
    assert_clean(headers, raw)
    if status == 200:
        messages = messages_of(headers, raw)
        final = messages[-1]
        assert final["id"] == 1 and set(final) <= {"jsonrpc", "id", "result", "error"}
        assert messages[:-1] == []  # a masked server relays no progress: its numbers could carry data
    else:
        assert status in (400, 502)


def named_channels() -> dict[str, Answer]:
    """Every member outside the tool's documents where the masked field could appear with another value."""
    named = {"vendor": {"bank_account": OTHER}}
    annotated = result()
    annotated["content"][0]["annotations"] = named
    in_meta = result()
    in_meta["content"][0]["_meta"] = {"x": [named]}
    return {
        "result-_meta": raw_answer(200, json.dumps(answer(_meta=named))),
        "content-annotations": raw_answer(200, json.dumps(answer(annotated))),
        "content-_meta": sse_answer(answer(in_meta)),
        "result-member": raw_answer(200, json.dumps(answer(bank_account=OTHER))),
        "structured-renamed-parent": sse_answer(
            answer(structuredContent=approved(Vendor2={"Bank_Account": OTHER}))
        ),
    }


@pytest.mark.parametrize("channel", list(named_channels()))
async def test_mcp_a_mask_names_its_field_wherever_it_appears(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream], channel: str
) -> None:
    broker, hostile, _ = setup
    hostile.call = named_channels()[channel]
    status, headers, raw = await mcp_call(alice(broker), "approveExpense")
    assert status == 200
    assert_clean(headers, raw)
    (final,) = messages_of(headers, raw)
    text = json.dumps(final, ensure_ascii=False)
    assert fold(OTHER) not in fold(text) and fold(OTHER) not in fold(raw.decode())
    assert "****6819" in text and "****3000" in text


async def test_mcp_a_masked_number_never_travels_as_progress(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream],
) -> None:
    broker, hostile, _ = setup
    number = 4400532013000
    body = approved(vendor={"name": "ACME GmbH", "bank_account": number})
    final = {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": json.dumps(body)}]}}
    hostile.call = sse_answer(progress(progress=number, total=number), final)
    status, headers, raw = await mcp_call(alice(broker), "approveExpense")
    assert status == 200 and str(number) not in raw.decode()
    (answered,) = messages_of(headers, raw)
    assert json.loads(answered["result"]["content"][0]["text"])["vendor"]["bank_account"] == "****3000"


async def test_mcp_a_refused_answer_leaves_an_outcome_record_with_decision_error(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream],
) -> None:
    broker, hostile, _ = setup
    hostile.call = raw_answer(
        200, json.dumps(answer({"content": [], "structuredContent": {"data": approved()}}))
    )
    status, _, raw = await mcp_call(alice(broker), "approveExpense")
    assert status == 200 and json.loads(raw)["error"]["code"] == -32603
    records = [
        r
        for r in broker.audit_records()
        if r["event"] in ("mcp", "outcome") and r["tool"] == "approveExpense"
    ]
    assert [(r["event"], r["decision"]) for r in records][-2:] == [("mcp", "allow"), ("outcome", "error")]
    assert (records[-1]["reason"], records[-1]["status"]) == ("response_shape", 200)
    assert records[-1]["response_digest"] == response_digest(raw)  # the error the agent got, not the answer


MCP_ROWS = [
    ("reference", {"invoices": [row(1), row(7, "7", THEIRS)]}, True),
    ("nested-in-a-kept-row", {"invoices": [{**row(1), "related": [row(7, "7", THEIRS)]}]}, False),
    ("sibling-list", {"invoices": [row(1)], "archive": [row(7, "7", THEIRS)]}, False),
    ("top-level-array", [row(1), row(7, "7", THEIRS)], False),
    ("wrapped", {"data": {"invoices": [row(7, "7", THEIRS)]}}, False),
]


@pytest.mark.parametrize(("document", "passes"), [c[1:] for c in MCP_ROWS], ids=[c[0] for c in MCP_ROWS])
async def test_mcp_row_filters_never_pass_other_departments_rows(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream], document: Any, passes: bool
) -> None:
    broker, hostile, _ = setup
    hostile.call = sse_answer(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "result": {"content": [{"type": "text", "text": json.dumps(document)}], "_meta": {"rows": 2}},
        }
    )
    status, headers, raw = await mcp_call(alice(broker), "listInvoices")
    assert status == 200
    assert_clean(headers, raw)
    (final,) = messages_of(headers, raw)
    assert ("result" in final) == passes


async def test_mcp_an_unmasked_server_still_relays_notifications_but_never_upstream_ids(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream],
) -> None:
    broker, hostile, _ = setup
    log = {"jsonrpc": "2.0", "method": "notifications/message", "params": {"level": "info", "data": "hello"}}
    plain = {"jsonrpc": "2.0", "id": 1, "result": {"content": [{"type": "text", "text": "free text"}]}}
    hostile.call = sse_answer(sse(log, id="up-1", event="weird"), sse(plain, id="up-2"))
    status, headers, raw = await mcp_call(alice(broker), "plainTool", server="plain")
    assert status == 200 and messages_of(headers, raw) == [log, plain]
    events = SseParser(max_event_bytes=1 << 20).feed(raw)
    assert {e.event for e in events} == {"message"} and not {"up-1", "up-2"} & {e.id for e in events}


# --- the GET stream and resumption -------------------------------------------------------------------------------


async def open_session(caller: Caller) -> str:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    status, headers, raw = await request(
        caller, "POST", "/mcp/hostile", body, {"Accept": "application/json, text/event-stream"}
    )
    assert status == 200, raw
    return headers["Mcp-Session-Id"]


async def get_stream(
    caller: Caller, session_id: str, last_event_id: str | None = None
) -> tuple[int, CIMultiDict[str], bytes]:
    headers = {
        "Mcp-Session-Id": session_id,
        "MCP-Protocol-Version": "2025-11-25",
        "Accept": "text/event-stream",
    }
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    return await request(caller, "GET", "/mcp/hostile", headers=headers)


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=["as-is", "lower", "swapcase", "fullwidth"])
async def test_mcp_the_get_stream_of_a_masked_server_passes_nothing_but_harmless_events(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream], variant: int
) -> None:
    broker, hostile, _ = setup
    secret = VARIANTS[variant]
    hostile.stream = sse_answer(
        f"id: {secret}\nretry: 10\n\n".encode(),
        sse(
            {"jsonrpc": "2.0", "method": "notifications/message", "params": {"data": secret}},
            id=f"{secret}-1",
        ),
        sse(progress(message=secret), event=secret),
        sse(
            {"jsonrpc": "2.0", "id": 1, "result": {"structuredContent": {"vendor": {"bank_account": secret}}}}
        ),
        sse({"jsonrpc": "2.0", "id": 9, "method": "sampling/createMessage", "params": {"x": secret}}),
        sse(
            {
                "jsonrpc": "2.0",
                "method": "notifications/tools/list_changed",
                "params": {"_meta": {"x": secret}},
            }
        ),
    )
    caller = alice(broker)
    session_id = await open_session(caller)
    status, headers, raw = await get_stream(caller, session_id)
    assert status == 200
    assert_clean(headers, raw)
    assert messages_of(headers, raw) == [{"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}]


async def test_mcp_resumption_opens_the_brokers_id_back_into_the_upstreams(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream],
) -> None:
    broker, hostile, upstream = setup
    hostile.stream = sse_answer(
        b"id: upstream-event-41\n\n",
        sse({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"}, id="upstream-event-42"),
    )
    caller = alice(broker)
    session_id = await open_session(caller)
    _, _, raw = await get_stream(caller, session_id)
    broker_ids = [e.id for e in SseParser(max_event_bytes=1 << 20).feed(raw) if e.id]
    assert len(broker_ids) == 2 and "upstream-event" not in raw.decode()
    await get_stream(caller, session_id, broker_ids[-1])
    assert [r for r in upstream.received if r.method == "GET"][-1].headers[
        "Last-Event-ID"
    ] == "upstream-event-42"
    for forged in ("upstream-event-42", flip_char(broker_ids[-1])):
        await get_stream(caller, session_id, forged)
        assert "Last-Event-ID" not in [r for r in upstream.received if r.method == "GET"][-1].headers


# --- initialize and tools/list -----------------------------------------------------------------------------------


async def initialize(caller: Caller, server: str) -> tuple[int, CIMultiDict[str], bytes]:
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    headers = {"Accept": "application/json, text/event-stream"}
    return await request(caller, "POST", f"/mcp/{server}", body, headers)


HOSTILE_INITIALIZE = {
    "jsonrpc": "2.0",
    "leak": BANK,
    "result": {
        "protocolVersion": "2025-11-25",
        "capabilities": {"tools": {"listChanged": True, "x": BANK}, "logging": {}, "experimental": {BANK: 1}},
        "serverInfo": {
            "name": "hostile",
            "version": "1",
            "title": "Hostile",
            "websiteUrl": f"https://{BANK}",
        },
        "instructions": "Call listInvoices first.",
        "_meta": {"x": BANK},
        "extra": BANK,
    },
}


@pytest.mark.parametrize("server", ["hostile", "plain"], ids=["masked", "unmasked"])
async def test_mcp_the_initialize_answer_is_rebuilt(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream], server: str
) -> None:
    broker, hostile, _ = setup
    hostile.initialize = HOSTILE_INITIALIZE
    status, headers, raw = await initialize(alice(broker), server)
    assert status == 200 and headers["Mcp-Session-Id"]
    assert_clean(headers, raw)
    expected: dict[str, Any] = {
        "protocolVersion": "2025-11-25",
        "capabilities": {"tools": {"listChanged": True}},
        "serverInfo": {"name": "hostile", "title": "Hostile", "version": "1"},
    }
    if (
        server == "plain"
    ):  # instructions are free text: only a server none of whose tools is masked gives them
        expected["instructions"] = "Call listInvoices first."
    assert json.loads(raw) == {"jsonrpc": "2.0", "id": 1, "result": expected}


@pytest.mark.parametrize("variant", range(len(VARIANTS)), ids=["as-is", "lower", "swapcase", "fullwidth"])
async def test_mcp_an_initialize_error_of_a_masked_server_keeps_its_code_only(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream], variant: int
) -> None:
    broker, hostile, _ = setup
    secret = VARIANTS[variant]
    error = {"code": -32602, "message": f"no {secret}", "data": {"x": secret}}
    hostile.initialize = {"jsonrpc": "2.0", "error": error, "leak": secret}
    status, headers, raw = await initialize(alice(broker), "hostile")
    assert status == 200 and "Mcp-Session-Id" not in headers
    assert_clean(headers, raw)
    assert json.loads(raw) == {
        "jsonrpc": "2.0",
        "id": 1,
        "error": {"code": -32602, "message": "Invalid params"},
    }


async def test_mcp_a_listing_whose_pins_cannot_be_read_leaves_a_second_audit_record(
    setup: tuple[BrokerUnderTest, Hostile, RecordingUpstream],
) -> None:
    broker, _, _ = setup
    pins = broker.running.app[MCP_PINS]
    failing = Switchable(pins._store)
    failing.down = True
    pins._store = failing  # only the pins' store fails: identity, audit and the rest still work
    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": META}}
    headers = {
        "MCP-Protocol-Version": "2026-07-28",
        "Mcp-Method": "tools/list",
        "Accept": "application/json, text/event-stream",
    }
    status, _, raw = await request(alice(broker), "POST", "/mcp/hostile", body, headers)
    assert status == 200 and json.loads(raw)["error"]["code"] == -32603
    records = [r for r in broker.audit_records() if r["event"] == "mcp"]
    assert [r["decision"] for r in records][-2:] == ["allow", "error"]
    assert (
        records[-1]["reason"].startswith("state_") and records[-1]["request_id"] == records[-2]["request_id"]
    )
