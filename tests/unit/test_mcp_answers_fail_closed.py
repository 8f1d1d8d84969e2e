"""tools/call answers of a response-filtered tool fail closed (CONTRACT §12): every member of the message.

Each row places the masked bank account (or another department's row) somewhere in a JSON-RPC answer; the agent
gets either the answer with the value gone from every member, or a JSON-RPC error — never the value.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.config.models import Tool
from broker.gateway.filters import compile_tool_filters
from broker.mcp import jsonrpc as rpc
from broker.mcp.answers import call_transform, initialize_answer
from tests.unit.test_filters_fail_closed import BANK, OTHER, THEIRS, VARIANTS, leaked
from tests.unit.test_mcp_answers import make_principal, recorder

APPROVE = compile_tool_filters(
    Tool.model_validate(
        {
            "name": "approveExpense",
            "upstream": {"url": "https://127.0.0.1:9/approve"},
            "response": {"mask": [{"path": "vendor.bank_account", "keep_last": 4}]},
        }
    )
)
LIST = compile_tool_filters(
    Tool.model_validate(
        {
            "name": "listInvoices",
            "upstream": {"url": "https://127.0.0.1:9/invoices"},
            "response": {
                "filter_rows": [{"path": "invoices", "keep": "row.department == subject.department"}],
                "mask": [{"path": "invoices.vendor.bank_account", "keep_last": 4}],
            },
        }
    )
)
INVOICE = {"invoice_id": "INV-8831", "department": "42", "vendor": {"name": "Acme", "bank_account": BANK}}


def mine() -> dict[str, Any]:
    return {"invoice_id": "INV-1", "department": "42", "vendor": {"name": "Acme", "bank_account": BANK}}


def theirs() -> dict[str, Any]:
    return {"invoice_id": "INV-7", "department": "7", "vendor": {"name": "Other", "bank_account": THEIRS}}


def text(value: Any, **extra: Any) -> dict[str, Any]:
    body = value if isinstance(value, str) else json.dumps(value, indent=2)
    return {"type": "text", "text": body, **extra}


def usual(**extra: Any) -> dict[str, Any]:
    """What the SDKs send: structuredContent and the same value as JSON text."""
    return {"content": [text(INVOICE)], "structuredContent": json.loads(json.dumps(INVOICE)), **extra}


async def agent_gets(filters: Any, message: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    message = json.loads(json.dumps(message))
    failures: list[str] = []
    transform = call_transform(filters, make_principal(), recorder(failures))
    try:
        return await transform(message), failures
    except rpc.JsonRpcError as error:
        assert (error.jsonrpc_code, error.http_status) == (rpc.INTERNAL_ERROR, 200)
        assert error.message == "the tool's answer could not be filtered" and error.data is None
        assert failures == [error.reason]
        return error.jsonrpc_body(message.get("id")), failures


def answer(result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": 1, "result": result}


def placements(value: str) -> dict[str, dict[str, Any]]:
    """Every member of a tools/call answer that could carry ``value`` to the agent (fresh copies: the filters
    work in place on what the relay parsed)."""
    cases = {
        "result-_meta": answer(usual(_meta={"trace": f"paid {value}"})),
        "result-_meta-key": answer(usual(_meta={value: "x"})),
        "result-other-member": answer(usual(debug={"rows": [[value]]})),
        "isError-result": answer(usual(isError=True, _meta={"why": value})),
        "content-annotations": answer(
            {**usual(), "content": [text(INVOICE, annotations={"audience": ["user"], "note": value})]}
        ),
        "content-_meta": answer({**usual(), "content": [text(INVOICE, _meta={"raw": value})]}),
        "content-other-member": answer({**usual(), "content": [text(INVOICE, extra=value)]}),
        "structured-sibling": answer(usual(structuredContent={**INVOICE, "iban": value})),
        "structured-in-key": answer(usual(structuredContent={**INVOICE, "by_account": {value: 1}})),
        "json-text-other-member": answer({**usual(), "content": [text({**INVOICE, "note": f"to {value}"})]}),
        "json-text-only": answer({"content": [text({**INVOICE, "copy": value})]}),
        "json-text-array": answer({"content": [text([INVOICE, {"vendor": {"bank_account": value}}])]}),
        "second-json-text": answer(
            {**usual(), "content": [text(INVOICE), text({"vendor": {"bank_account": "x"}, "c": value})]}
        ),
        "extra-top-level-member": {**answer(usual()), "leak": value},
        "error-message": {"jsonrpc": "2.0", "id": 1, "error": {"code": -32000, "message": f"bad {value}"}},
        "error-data": {"jsonrpc": "2.0", "id": 1, "error": {"code": 5, "message": "x", "data": {"a": value}}},
        "error-code-not-int": {"jsonrpc": "2.0", "id": 1, "error": {"code": value, "message": value}},
        "plain-text-content": answer({**usual(), "content": [text(f"account {value}")]}),
        "json-string-text": answer({"content": [text(json.dumps(value))]}),
        "image-content": answer(
            {**usual(), "content": [{"type": "image", "data": value, "mimeType": "image/png"}]}
        ),
        "resource-content": answer(
            {**usual(), "content": [{"type": "resource", "resource": {"uri": "x:", "text": value}}]}
        ),
        "resource-link": answer(
            {**usual(), "content": [{"type": "resource_link", "uri": f"x:{value}", "name": "n"}]}
        ),
        "structured-wrapped": answer({"content": [], "structuredContent": {"data": {**INVOICE, "x": value}}}),
        "structured-not-object": answer({"content": [], "structuredContent": value}),
        "no-document": answer({"content": [], "_meta": {"x": value}}),
        "result-not-object": answer(value),
    }
    return json.loads(json.dumps(cases))


CASES = [(p, v) for p in placements("x") for v in VARIANTS]


@pytest.mark.parametrize(("placement", "variant"), CASES, ids=[f"{p}-{v}" for p, v in CASES])
async def test_no_member_carries_a_masked_value_to_the_agent(placement: str, variant: str) -> None:
    message = placements(VARIANTS[variant])[placement]
    got, failures = await agent_gets(APPROVE, message)
    assert not leaked(got), got
    assert got["id"] == 1 and set(got) <= {"jsonrpc", "id", "result", "error"}
    if "result" in got:
        assert failures == []
        assert "****3000" in json.dumps(got)  # the masked place is there, masked
        for item in got["result"]["content"]:
            assert item["type"] == "text" and isinstance(json.loads(item["text"]), dict | list)
    else:
        assert set(got["error"]) == {"code", "message"}


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (answer({**usual(), "content": [text("plain")]}), "response_unfilterable"),
        (
            answer({"content": [{"type": "image", "data": "aGk=", "mimeType": "image/png"}]}),
            "response_unfilterable",
        ),
        (answer({"content": [], "structuredContent": {"data": INVOICE}}), "response_shape"),
        (answer({"content": []}), "response_shape"),
        (answer({"content": [text({"vendor": {"iban": BANK}})]}), "response_shape"),
        (answer(usual(_meta={"pin": "30"}, structuredContent={**INVOICE, "pin": "30"})), None),
    ],
    ids=["plain-text", "image", "wrapped", "no-document", "sibling-key", "nothing-hidden-is-short"],
)
async def test_refusal_reasons_are_audited(message: dict[str, Any], reason: str | None) -> None:
    _, failures = await agent_gets(APPROVE, message)
    assert failures == ([] if reason is None else [reason])


async def test_the_usual_answer_is_rendered_from_the_filtered_structured_content() -> None:
    got, _ = await agent_gets(APPROVE, answer(usual(isError=False)))
    result = got["result"]
    assert result["structuredContent"]["vendor"]["bank_account"] == "****3000"
    assert json.loads(result["content"][0]["text"]) == result["structuredContent"]
    assert result["isError"] is False


@pytest.mark.parametrize(
    "result",
    [
        {
            "content": [text({"invoices": [mine(), theirs()]})],
            "structuredContent": {"invoices": [mine(), theirs()]},
        },
        {"content": [text({"invoices": [mine(), theirs()], "note": THEIRS.lower()})]},
        {"content": [], "structuredContent": {"invoices": [mine()]}, "_meta": {"rows": [theirs()]}},
        {
            "content": [text({"invoices": [mine()]}, annotations={"x": theirs()})],
            "structuredContent": {"invoices": [mine()]},
        },
        {"content": [text({"invoices": [mine()], "archive": [theirs()]})]},
        {"content": [text([mine(), theirs()])]},
        {"content": [text({"invoices": theirs()})]},
    ],
    ids=[
        "other-department-row-removed",
        "removed-rows-account-scrubbed-from-text",
        "row-in-result-_meta",
        "row-in-annotations",
        "sibling-list",
        "top-level-array",
        "rows-path-holds-object",
    ],
)
async def test_other_departments_rows_never_reach_the_agent(result: dict[str, Any]) -> None:
    got, failures = await agent_gets(LIST, answer(result))
    assert not leaked(got, THEIRS) and "INV-7" not in json.dumps(got) and not leaked(got)
    if "result" in got:
        rows = json.loads(got["result"]["content"][0]["text"])["invoices"]
        assert [row["invoice_id"] for row in rows] == ["INV-1"]
    else:
        assert failures == ["response_shape"]


NAMED = {"vendor": {"bank_account": OTHER}}  # the masked field, with another value, outside the documents


@pytest.mark.parametrize(
    "result",
    [
        usual(_meta=NAMED),
        usual(_meta={"trace": [{"x": {"Bank_Account": OTHER}}]}),
        {**usual(), "content": [text(INVOICE, annotations=NAMED)]},
        {**usual(), "content": [text(INVOICE, _meta=NAMED)]},
        usual(bank_account=OTHER),
        usual(debug=NAMED),
        {"content": [text({**INVOICE, "history": [NAMED]})]},
        usual(structuredContent={**INVOICE, "Vendor2": {"bank_account": OTHER}}),
    ],
    ids=[
        "result-_meta",
        "deep-in-result-_meta",
        "content-annotations",
        "content-_meta",
        "result-member",
        "result-other-member",
        "in-the-json-text",
        "renamed-parent-in-structured",
    ],
)
async def test_a_masked_field_is_masked_wherever_it_appears(result: dict[str, Any]) -> None:
    got, failures = await agent_gets(APPROVE, answer({**result, "note": f"paid {OTHER}"}))
    assert failures == [] and not leaked(got, OTHER) and not leaked(got)
    text_ = json.dumps(got)
    assert "****6819" in text_ and "****3000" in text_ and '"note": "paid ****"' in text_
    for item in got["result"]["content"]:
        assert item["type"] == "text" and isinstance(json.loads(item["text"]), dict)


async def test_the_results_own_members_are_not_the_tools_fields() -> None:
    filters = compile_tool_filters(
        Tool.model_validate(
            {
                "name": "t",
                "upstream": {"url": "https://127.0.0.1:9/t"},
                "response": {
                    "mask": [{"path": f"doc.{name}", "keep_last": 0} for name in ("type", "text", "content")]
                },
            }
        )
    )
    document = {"doc": {"type": "memo", "text": "first secret", "content": "second secret"}}
    got, failures = await agent_gets(
        filters, answer({"content": [text(document, annotations={"text": "third secret"})], "isError": False})
    )
    assert failures == []
    (item,) = got["result"]["content"]
    assert item["type"] == "text" and item["annotations"] == {"text": "****"}
    assert json.loads(item["text"]) == {"doc": {"type": "****", "text": "****", "content": "****"}}
    assert got["result"]["isError"] is False


async def test_rows_nested_in_a_kept_row_are_rows_too() -> None:
    nested = {**mine(), "related": [theirs()]}
    got, failures = await agent_gets(LIST, answer({"content": [text({"invoices": [nested]})]}))
    assert failures == ["response_shape"] and not leaked(got, THEIRS)
    kept = {**mine(), "related": [mine()]}
    got, failures = await agent_gets(LIST, answer({"content": [text({"invoices": [kept]})]}))
    assert failures == [] and json.loads(got["result"]["content"][0]["text"])["invoices"][0]["related"]


# --- initialize -------------------------------------------------------------------------------------------------

INITIALIZED = {
    "jsonrpc": "2.0",
    "id": 1,
    "leak": BANK,
    "result": {
        "protocolVersion": "2025-11-25",
        "capabilities": {
            "tools": {"listChanged": True, "x": BANK},
            "logging": {},
            "experimental": {"a": BANK},
        },
        "serverInfo": {"name": "expenses", "version": "1.0", "title": "Expenses", "icons": [BANK], "x": BANK},
        "instructions": "Use listInvoices first.",
        "_meta": {"x": BANK},
        "extra": BANK,
    },
}


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
async def test_the_initialize_answer_is_rebuilt(masked: bool) -> None:
    got = initialize_answer(json.loads(json.dumps(INITIALIZED)), 1, masked=masked)
    expected = {
        "protocolVersion": "2025-11-25",
        "capabilities": {"tools": {"listChanged": True}},
        "serverInfo": {"name": "expenses", "title": "Expenses", "version": "1.0"},
    }
    if not masked:
        expected["instructions"] = "Use listInvoices first."
    assert got == {"jsonrpc": "2.0", "id": 1, "result": expected}


@pytest.mark.parametrize(
    "result",
    [
        {"capabilities": "all", "serverInfo": {"name": 1, "version": None}, "instructions": 7},
        {"protocolVersion": 2025, "capabilities": {"tools": True}, "serverInfo": "x"},
    ],
    ids=["wrong-types", "more-wrong-types"],
)
async def test_the_initialize_answer_keeps_only_well_typed_members(result: dict[str, Any]) -> None:
    got = initialize_answer({"jsonrpc": "2.0", "id": 1, "result": result}, 1, masked=False)
    assert got["result"] in ({"capabilities": {}, "serverInfo": {}}, {"capabilities": {}})


@pytest.mark.parametrize("masked", [True, False], ids=["masked", "unmasked"])
async def test_an_initialize_error_is_rebuilt(masked: bool) -> None:
    error = {"code": -32602, "message": f"bad {BANK}", "data": {"x": BANK}}
    got = initialize_answer({"jsonrpc": "2.0", "id": 1, "error": error, "leak": BANK}, 1, masked=masked)
    assert got == (
        rpc.error_body(1, -32602, "Invalid params") if masked else {"jsonrpc": "2.0", "id": 1, "error": error}
    )


async def test_a_filtered_tools_error_keeps_its_code_only() -> None:
    error = {"jsonrpc": "2.0", "id": 1, "error": {"code": -32602, "message": BANK, "data": BANK}}
    got, failures = await agent_gets(APPROVE, error)
    assert got == rpc.error_body(1, -32602, "Invalid params") and failures == []
    error["error"]["code"] = -32001
    got, _ = await agent_gets(APPROVE, error)
    assert got == rpc.error_body(1, -32001, "the MCP server reported an error")
