"""broker.gateway.filters: server-side argument injection and response filtering (CONTRACT §8, §11; HOSTILE P26)."""

from __future__ import annotations

import gzip
import json
from typing import Any

import pytest

from broker.config.models import Tool
from broker.errors import AccessDenied, UpstreamError
from broker.gateway.filters import FilterCompileError, ToolFilters, compile_tool_filters
from broker.policy.paths import EACH, fold_key, parse_path
from broker.policy.scrub import mask_value

# ---------------------------------------------------------------------------------------------------------
# factories

ALICE: dict[str, Any] = {
    "sub": "alice",
    "department": "42",
    "groups": ["finance-managers"],
    "approval_limit": 20000,
}
AGENT = "spiffe://example.org/agents/expense-assistant"
BANK = "DE89370400440532013000"


def make_tool(
    *,
    inject: dict[str, str] | None = None,
    mask: list[dict[str, Any]] | None = None,
    drop: list[str] | None = None,
    filter_rows: list[dict[str, str]] | None = None,
) -> Tool:
    return Tool.model_validate(
        {
            "name": "tool",
            "upstream": {"url": "https://127.0.0.1:9443/tool"},
            "inject": inject or {},
            "response": {"mask": mask or [], "drop": drop or [], "filter_rows": filter_rows or []},
        }
    )


def make_filters(**config: Any) -> ToolFilters:
    return compile_tool_filters(make_tool(**config))


def approve_answer(**changes: Any) -> dict[str, Any]:
    """The reference approveExpense backend answer (CONTRACT §11)."""
    answer: dict[str, Any] = {
        "invoice_id": "INV-8831",
        "status": "approved",
        "amount": 4800,
        "department": "42",
        "vendor": {"name": "ACME GmbH", "bank_account": BANK},
        "approved_by": "alice",
    }
    answer.update(changes)
    return answer


def invoice(number: int, department: Any = "42", **extra: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "invoice_id": f"INV-{number}",
        "status": "open",
        "amount": 100.5 + number,
        "vendor": {"name": "ACME GmbH", "bank_account": BANK},
        **extra,
    }
    if department is not None:
        row["department"] = department
    return row


def run(filters: ToolFilters, document: Any, *, subject: dict[str, Any] | None = None) -> Any:
    body = json.dumps(document).encode()
    out = filters.filter_response(body, subject=ALICE if subject is None else subject, actor_id=AGENT)
    return json.loads(out)


APPROVE_EXPENSE = {"inject": {"department": "subject.department"}, "mask": [{"path": "vendor.bank_account"}]}
LIST_INVOICES = {"filter_rows": [{"path": "invoices", "keep": "row.department == subject.department"}]}
DEPARTMENT_ROWS = [{"path": "invoices", "keep": "row.department == subject.department"}]

# ---------------------------------------------------------------------------------------------------------
# injection


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ({"invoice_id": "INV-7", "department": "7"}, {"invoice_id": "INV-7", "department": "42"}),
        ({"invoice_id": "INV-7"}, {"invoice_id": "INV-7", "department": "42"}),
        ({"invoice_id": "INV-7", "Department": "7"}, {"invoice_id": "INV-7", "department": "42"}),
        (
            {"invoice_id": "INV-7", "ＤＥＰＡＲＴＭＥＮＴ": "7", "department": "7"},
            {"invoice_id": "INV-7", "department": "42"},
        ),
        ({"department": {"$ne": "42"}}, {"department": "42"}),
    ],
    ids=[
        "forged_department_overridden",
        "absent_department_added",
        "case_variant_removed",
        "fullwidth_variant_removed",
        "structured_forgery_overridden",
    ],
)
def test_inject_sets_department_from_the_subject(arguments: dict[str, Any], expected: dict[str, Any]) -> None:
    sent = dict(arguments)
    result = make_filters(**APPROVE_EXPENSE).inject(arguments, subject=ALICE, actor_id=AGENT)
    assert result == expected
    assert arguments == sent  # a new dict: the agent's arguments are not mutated


@pytest.mark.parametrize(
    ("expression", "actor_id", "expected"),
    [
        ("actor.id", AGENT, AGENT),
        ("actor.path", AGENT, "/agents/expense-assistant"),
        ("actor.trust_domain", AGENT, "example.org"),
        ("subject.groups", AGENT, ["finance-managers"]),
        (
            '{"dept": subject.department, "limit": subject.approval_limit}',
            AGENT,
            {"dept": "42", "limit": 20000},
        ),
        ('subject.groups.exists(g, g == "finance-managers")', None, True),
        ("size(subject)", AGENT, len(ALICE)),
        ("has(subject.nickname) ? 1 : 2", AGENT, 2),
        ('subject["department"]', AGENT, "42"),
    ],
    ids=[
        "actor_id",
        "actor_path",
        "actor_trust_domain",
        "list_claim",
        "map_value",
        "comprehension",
        "whole_subject_unpruned",
        "absent_claim_stays_absent",
        "index_syntax_unpruned",
    ],
)
def test_inject_values(expression: str, actor_id: str | None, expected: Any) -> None:
    filters = make_filters(inject={"x": expression})
    assert filters.inject({}, subject=ALICE, actor_id=actor_id) == {"x": expected}


class Unconvertible:
    """A claim value CEL cannot take (never produced by a JWT, but the failure must still close)."""


@pytest.mark.parametrize(
    ("expression", "subject", "actor_id"),
    [
        ("subject.department", {"sub": "alice"}, AGENT),
        ("subject.department", {"sub": "alice", "department": None}, AGENT),
        ("actor.id", ALICE, None),
        ("subject.approval_limit / 0", ALICE, AGENT),
        ("int(subject.sub)", ALICE, AGENT),
        ('timestamp("2025-01-01T00:00:00Z")', ALICE, AGENT),
        ('b"42"', ALICE, AGENT),
        ('duration("1s")', ALICE, AGENT),
        ("9007199254740993", ALICE, AGENT),
        ("0.0 / 0.0", ALICE, AGENT),
        ('[subject.department, b"x"]', ALICE, AGENT),
        ("{1: subject.department}", ALICE, AGENT),
        ("subject.department", {"department": Unconvertible()}, AGENT),
    ],
    ids=[
        "claim_missing",
        "claim_null",
        "no_actor",
        "division_by_zero",
        "conversion_error",
        "timestamp",
        "bytes",
        "duration",
        "int_beyond_i_json",
        "nan",
        "bytes_in_list",
        "non_string_key",
        "unconvertible_subject",
    ],
)
def test_inject_failure_refuses_the_call(
    expression: str, subject: dict[str, Any], actor_id: str | None
) -> None:
    filters = make_filters(inject={"department": expression})
    with pytest.raises(AccessDenied) as caught:
        filters.inject({"department": "42"}, subject=subject, actor_id=actor_id)
    assert caught.value.reason == "inject_failed:department"
    assert caught.value.status == 403
    assert "42" not in caught.value.description and "alice" not in caught.value.description  # P27


def test_inject_without_injections_copies() -> None:
    arguments = {"a": 1}
    result = make_filters().inject(arguments, subject=ALICE, actor_id=AGENT)
    assert result == arguments and result is not arguments


# ---------------------------------------------------------------------------------------------------------
# masking and dropping

MASKED = "****3000"


@pytest.mark.parametrize(
    ("config", "document", "expected"),
    [
        (
            APPROVE_EXPENSE,
            approve_answer(),
            approve_answer(vendor={"name": "ACME GmbH", "bank_account": MASKED}),
        ),
        (
            {"mask": [{"path": "vendor.bank_account"}]},
            {"Vendor": {"Bank_Account": BANK}},
            {"Vendor": {"Bank_Account": MASKED}},
        ),
        (
            {"mask": [{"path": "vendor.bank_account"}]},
            {"VENDOR": {"BANK_ACCOUNT": BANK}},
            {"VENDOR": {"BANK_ACCOUNT": MASKED}},
        ),
        ({"mask": [{"path": "ssn"}]}, {"ＳＳＮ": "123-45-6789"}, {"ＳＳＮ": "****6789"}),
        ({"mask": [{"path": "ssn"}]}, {"ſsn": "123-45-6789"}, {"ſsn": "****6789"}),
        (
            {"mask": [{"path": "ssn"}]},
            {"ssn": "123-45-6789", "SSN": "987-65-4321"},
            {"ssn": "****6789", "SSN": "****4321"},
        ),
        (
            {"mask": [{"path": "invoices.vendor.bank_account"}]},
            {"invoices": [invoice(1), invoice(2)]},
            {
                "invoices": [
                    invoice(1, vendor={"name": "ACME GmbH", "bank_account": MASKED}),
                    invoice(2, vendor={"name": "ACME GmbH", "bank_account": MASKED}),
                ]
            },
        ),
        (
            {"mask": [{"path": "invoices[].vendor.bank_account"}]},
            {"invoices": [{"vendor": {"bank_account": BANK}}]},
            {"invoices": [{"vendor": {"bank_account": MASKED}}]},
        ),
        (
            {"mask": [{"path": "vendor.bank_account"}]},
            {"vendor": [[{"bank_account": BANK}], {"bank_account": BANK}]},
            {"vendor": [[{"bank_account": MASKED}], {"bank_account": MASKED}]},
        ),
        ({"mask": [{"path": "[].ssn"}]}, [{"ssn": "123-45-6789"}], [{"ssn": "****6789"}]),
        ({"mask": [{"path": "ssn"}]}, [{"ssn": "123-45-6789"}], [{"ssn": "****6789"}]),
        ({"mask": [{"path": "vendor"}]}, approve_answer(), approve_answer(vendor="****")),
        ({"mask": [{"path": "ssns"}]}, {"ssns": ["123-45-6789", "987-65-4321"]}, {"ssns": "****"}),
        ({"mask": [{"path": "ssns[]"}]}, {"ssns": ["123-45-6789", {"a": 1}]}, {"ssns": ["****6789", "****"]}),
        ({"mask": [{"path": "ssns[]"}]}, {"ssns": "123-45-6789"}, {"ssns": "****6789"}),
        (
            {"mask": [{"path": "invoices[].vendor.bank_account"}]},
            {"invoices": {"vendor": {"bank_account": BANK}}},
            {"invoices": {"vendor": {"bank_account": MASKED}}},
        ),
        ({"mask": [{"path": "[]"}]}, {"ssn": "123-45-6789"}, "****"),
        ({"mask": [{"path": "pin"}]}, {"pin": 123456789}, {"pin": "****6789"}),
        ({"mask": [{"path": "pin"}]}, {"pin": "1234"}, {"pin": "****"}),
        ({"mask": [{"path": "pin", "keep_last": 0}]}, {"pin": "123456789"}, {"pin": "****"}),
        ({"mask": [{"path": "pin"}]}, {"pin": None}, {"pin": "****"}),
        ({"mask": [{"path": "vendor?.bank_account"}]}, {"vendor": None}, {"vendor": None}),
        ({"mask": [{"path": "vendor.bank_account?"}]}, {"vendor": {"name": "x"}}, {"vendor": {"name": "x"}}),
        (
            {"drop": ["approved_by"]},
            approve_answer(),
            {k: v for k, v in approve_answer().items() if k != "approved_by"},
        ),
        (
            {"drop": ["vendor.bank_account"]},
            {"VENDOR": {"Bank_Account": BANK, "name": "x"}},
            {"VENDOR": {"name": "x"}},
        ),
        (
            {"drop": ["invoices.vendor"]},
            {"invoices": [{"vendor": 1, "a": 1}, {"Vendor": 2}]},
            {"invoices": [{"a": 1}, {}]},
        ),
        (
            {"drop": ["vendor.bank_account"], "mask": [{"path": "vendor.bank_account"}]},
            {"vendor": {"bank_account": BANK}},
            {"vendor": {}},
        ),
        (
            {"mask": [{"path": "note"}]},
            {"note": json.dumps({"ssn": "123-45-6789"})},
            {"note": "****" + json.dumps({"ssn": "123-45-6789"})[-4:]},
        ),
        (
            {"mask": [{"path": "ssn?"}]},
            {"note": json.dumps({"ssn": "123-45-6789"})},
            {"note": json.dumps({"ssn": "123-45-6789"})},
        ),
    ],
    ids=[
        "reference_approve_expense",
        "title_case_keys",
        "upper_case_keys",
        "fullwidth_key",
        "long_s_key",
        "case_variant_duplicates_both_masked",
        "arrays_walked_without_brackets",
        "arrays_walked_with_brackets",
        "nested_arrays_walked",
        "top_level_array_brackets",
        "top_level_array_plain",
        "object_masked_whole",
        "array_masked_whole",
        "each_element_masked",
        "brackets_on_scalar_mask_it",
        "brackets_on_object_walk_it",
        "brackets_on_root_object_mask_it",
        "number_masked_via_str",
        "short_value_fully_hidden",
        "keep_last_zero",
        "null_masked",
        "optional_null_parent_untouched",
        "optional_absent_leaf_untouched",
        "drop_top_level",
        "drop_case_variant",
        "drop_inside_arrays",
        "drop_wins_over_mask",
        "string_with_json_masked_as_a_whole",
        "json_inside_string_is_opaque_by_design",
    ],
)
def test_mask_and_drop(config: dict[str, Any], document: Any, expected: Any) -> None:
    assert run(make_filters(**config), document) == expected


@pytest.mark.parametrize(
    ("value", "keep_last", "expected"),
    [
        (BANK, 4, MASKED),
        ("123456789", 4, "****6789"),
        ("12345678", 4, "****"),
        (True, 1, "****e"),
        (1.5, 1, "****5"),
        ([1, 2], 0, "****"),
        ("ü" * 9, 4, "****üüüü"),
    ],
    ids=[
        "bank_account",
        "just_longer_than_twice",
        "exactly_twice_hidden",
        "bool",
        "float",
        "array",
        "non_ascii",
    ],
)
def test_mask_value(value: Any, keep_last: int, expected: str) -> None:
    assert mask_value(value, keep_last) == expected


def test_output_is_compact_utf8() -> None:
    filters = make_filters(mask=[{"path": "iban"}])
    out = filters.filter_response(
        '{ "name" : "Müller",  "iban": "DE89370400440532013000" }'.encode(), subject=ALICE, actor_id=AGENT
    )
    assert out == '{"name":"Müller","iban":"****3000"}'.encode()


# ---------------------------------------------------------------------------------------------------------
# row filters


@pytest.mark.parametrize(
    ("rows", "document", "expected"),
    [
        (
            DEPARTMENT_ROWS,
            {"invoices": [invoice(1), invoice(2, "7"), invoice(3)]},
            {"invoices": [invoice(1), invoice(3)]},
        ),
        (DEPARTMENT_ROWS, {"invoices": [invoice(1, None), invoice(2)]}, {"invoices": [invoice(2)]}),
        (DEPARTMENT_ROWS, {"invoices": [invoice(1, 42), invoice(2)]}, {"invoices": [invoice(2)]}),
        (
            DEPARTMENT_ROWS,
            {"invoices": ["INV-1", 42, None, [invoice(1)], invoice(2)]},
            {"invoices": [invoice(2)]},
        ),
        (
            DEPARTMENT_ROWS,
            {"INVOICES": [invoice(1, "7")], "invoices": [invoice(2, "7")]},
            {"INVOICES": [], "invoices": []},
        ),
        (DEPARTMENT_ROWS, {"invoices": []}, {"invoices": []}),
        (
            [{"path": "pages[].invoices", "keep": "row.department == subject.department"}],
            {"pages": {"invoices": [invoice(1, "7"), invoice(2)]}},
            {"pages": {"invoices": [invoice(2)]}},
        ),
        (
            [{"path": "invoices?", "keep": "row.department == subject.department"}],
            {"count": 0},
            {"count": 0},
        ),
        (DEPARTMENT_ROWS, [{"invoices": [invoice(1, "7"), invoice(2)]}], [{"invoices": [invoice(2)]}]),
        (
            [{"path": "pages[].invoices", "keep": "row.department == subject.department"}],
            {"pages": [{"invoices": [invoice(1, "7")]}, {"invoices": [invoice(2)]}]},
            {"pages": [{"invoices": []}, {"invoices": [invoice(2)]}]},
        ),
        (
            [{"path": "invoices", "keep": "int(row.department) == 42"}],
            {"invoices": [invoice(1, "x"), invoice(2)]},
            {"invoices": [invoice(2)]},
        ),
        (
            [{"path": "invoices", "keep": "row.missing > 1 || row.department == '42'"}],
            {"invoices": [invoice(1)]},
            {"invoices": [invoice(1)]},
        ),
        ([{"path": "invoices", "keep": "row.department"}], {"invoices": [invoice(1)]}, {"invoices": []}),
        ([{"path": "invoices", "keep": "1"}], {"invoices": [invoice(1)]}, {"invoices": []}),
        ([{"path": "invoices", "keep": "[true]"}], {"invoices": [invoice(1)]}, {"invoices": []}),
        (
            [{"path": "invoices", "keep": "!has(row.secret)"}],
            {"invoices": [invoice(1, secret=1), invoice(2)]},
            {"invoices": [invoice(2)]},
        ),
        (
            [{"path": "invoices", "keep": 'row["department"] == subject.department'}],
            {"invoices": [invoice(1, "7"), invoice(2)]},
            {"invoices": [invoice(2)]},
        ),
        (
            [{"path": "invoices", "keep": "size(row) == 1"}],
            {"invoices": [{"a": 1}, {"a": 1, "b": 2}]},
            {"invoices": [{"a": 1}]},
        ),
        (
            [{"path": "invoices", "keep": 'actor.path.startsWith("/agents/") && row.department == "42"'}],
            {"invoices": [invoice(1, "7"), invoice(2)]},
            {"invoices": [invoice(2)]},
        ),
        (
            [{"path": "invoices", "keep": "true"}],
            {"invoices": [invoice(1, "7")]},
            {"invoices": [invoice(1, "7")]},
        ),
        (  # a comment between a name and its call: size() of the whole row, not of a field "size"
            [{"path": "invoices", "keep": "row.size // small rows only\n() < 3"}],
            {"invoices": [{"a": 1}, {"a": 1, "b": 2, "ssn": "x"}]},
            {"invoices": [{"a": 1}]},
        ),
        (  # ... and a macro over the whole row's keys
            [{"path": "invoices", "keep": "!row.exists // no secrets\n(k, k == 'ssn')"}],
            {"invoices": [{"a": 1}, {"a": 2, "ssn": "x"}]},
            {"invoices": [{"a": 1}]},
        ),
    ],
    ids=[
        "other_department_dropped",
        "missing_department_dropped",
        "int_department_dropped",
        "non_object_rows_dropped",
        "case_variant_arrays_both_filtered",
        "empty_array",
        "brackets_on_lone_object_walk_it",
        "optional_absent_path",
        "walks_top_level_array",
        "bracket_path",
        "erroring_predicate_drops_row",
        "error_absorbed_by_or_as_in_cel",
        "string_result_not_true",
        "int_result_not_true",
        "list_result_not_true",
        "negated_has_sees_pruned_field",
        "index_syntax_full_row",
        "size_of_row_full_row",
        "actor_in_predicate",
        "constant_true_keeps",
        "comment_before_call_whole_row",
        "comment_before_macro_whole_row",
    ],
)
def test_row_filters(rows: list[dict[str, str]], document: Any, expected: Any) -> None:
    assert run(make_filters(filter_rows=rows), document) == expected


def test_row_filter_on_fifty_rows_keeps_only_the_subjects_department() -> None:
    document = {"invoices": [invoice(n, "42" if n % 3 else "7") for n in range(50)]}
    result = run(make_filters(**LIST_INVOICES), document)
    assert [row["department"] for row in result["invoices"]] == ["42"] * 33


def test_row_filter_drops_every_row_when_the_subject_cannot_be_converted() -> None:
    subject = {"department": Unconvertible(), "other": "x"}
    result = run(make_filters(**LIST_INVOICES), {"invoices": [invoice(1)], "total": 1}, subject=subject)
    assert result == {"invoices": [], "total": 1}


def test_row_filter_then_mask_in_one_response() -> None:
    filters = make_filters(
        filter_rows=DEPARTMENT_ROWS,
        mask=[{"path": "invoices.vendor.bank_account"}],
        drop=["invoices.department"],
    )
    result = run(filters, {"invoices": [invoice(1, "7"), invoice(2)]})
    expected = invoice(2, None, vendor={"name": "ACME GmbH", "bank_account": MASKED})
    assert result == {"invoices": [expected]}  # the predicate saw department before it was dropped


# ---------------------------------------------------------------------------------------------------------
# refusals: a filtered tool never passes an unfiltered body (502)


@pytest.mark.parametrize(
    "body",
    [
        b'{"vendor":{"bank_account":"DE89370400440532013000","bank_account":"x"}}',
        b'{"vendor":{},"vendor":{"bank_account":"DE89370400440532013000"}}',
        b'{"vendor":',
        b'{"vendor":{}} {"vendor":{}}',
        b"",
        b"\xef\xbb\xbf{}",
        '{"a":1}'.encode("utf-16-le"),
        b'{"a":"\xff"}',
        b'{"a":NaN}',
        b'{"a":"\\ud800"}',
        b'{"a":9007199254740993}',
        json.dumps(json.dumps({"vendor": {"bank_account": BANK}})).encode(),
        b"42",
        b"null",
        gzip.compress(b'{"vendor":{"bank_account":"DE89370400440532013000"}}'),
        b"[" * 65 + b"]" * 65,
    ],
    ids=[
        "duplicate_key",
        "duplicate_parent_key",
        "truncated",
        "two_documents",
        "empty",
        "bom",
        "utf16",
        "invalid_utf8",
        "nan",
        "lone_surrogate",
        "int_out_of_range",
        "json_inside_top_level_string",
        "bare_number",
        "bare_null",
        "gzip",
        "too_deep",
    ],
)
def test_unfilterable_body_is_refused(body: bytes) -> None:
    filters = make_filters(mask=[{"path": "vendor.bank_account"}], filter_rows=DEPARTMENT_ROWS)
    with pytest.raises(UpstreamError) as caught:
        filters.filter_response(body, subject=ALICE, actor_id=AGENT)
    assert caught.value.reason == "response_unfilterable"
    assert caught.value.status == 502
    assert (
        caught.value.description == "the tool backend's answer could not be filtered"
    )  # P27: nothing echoed


def test_max_depth_is_configurable() -> None:
    filters = make_filters(drop=["x?"])
    body = b"[" * 10 + b"]" * 10
    assert filters.filter_response(body, subject=ALICE, actor_id=AGENT, max_depth=10) == body
    with pytest.raises(UpstreamError):
        filters.filter_response(body, subject=ALICE, actor_id=AGENT, max_depth=9)


@pytest.mark.parametrize(
    "body",
    [json.dumps(approve_answer()).encode(), b"not json at all", b'{"a":1,"a":2}', gzip.compress(b"{}")],
    ids=["json", "not_json", "duplicate_keys", "gzip"],
)
def test_no_filters_fast_path_returns_the_same_object(body: bytes) -> None:
    filters = make_filters(inject={"department": "subject.department"})
    assert not filters.filters_response
    assert filters.filter_response(body, subject=ALICE, actor_id=AGENT) is body


# ---------------------------------------------------------------------------------------------------------
# compilation


@pytest.mark.parametrize(
    ("config", "location"),
    [
        ({"inject": {"department": "subject."}}, ("inject", "department")),
        ({"inject": {"department": "subjct.department"}}, ("inject", "department")),
        ({"inject": {"department": "row.department"}}, ("inject", "department")),
        ({"inject": {"department": "cel.bind(d, subject.department, d)"}}, ("inject", "department")),
        ({"inject": {"dep artment": "subject.department"}}, ("inject", "dep artment")),
        ({"inject": {"": "subject.department"}}, ("inject", "")),
        ({"mask": [{"path": "vendor..bank_account"}]}, ("response", "mask", 0, "path")),
        ({"mask": [{"path": "vendor.bank account"}]}, ("response", "mask", 0, "path")),
        ({"mask": [{"path": ""}]}, ("response", "mask", 0, "path")),
        ({"mask": [{"path": "a[]b"}]}, ("response", "mask", 0, "path")),
        ({"mask": [{"path": "a.[]"}]}, ("response", "mask", 0, "path")),
        ({"mask": [{"path": "a[0]"}]}, ("response", "mask", 0, "path")),
        ({"mask": [{"path": "a[]?"}]}, ("response", "mask", 0, "path")),
        ({"mask": [{"path": "?"}]}, ("response", "mask", 0, "path")),
        ({"mask": [{"path": "a??"}]}, ("response", "mask", 0, "path")),
        ({"mask": [{"path": "ok"}, {"path": "vendor.*"}]}, ("response", "mask", 1, "path")),
        ({"drop": ["invoices[]"]}, ("response", "drop", 0)),
        ({"drop": ["a", "b/c"]}, ("response", "drop", 1)),
        ({"filter_rows": [{"path": "invoices.", "keep": "true"}]}, ("response", "filter_rows", 0, "path")),
        (
            {"filter_rows": [{"path": "invoices", "keep": "row.department =="}]},
            ("response", "filter_rows", 0, "keep"),
        ),
        (
            {"filter_rows": [{"path": "invoices", "keep": "rw.department == subject.department"}]},
            ("response", "filter_rows", 0, "keep"),
        ),
        (
            {"filter_rows": [{"path": "invoices", "keep": "args.department == row.department"}]},
            ("response", "filter_rows", 0, "keep"),
        ),
    ],
    ids=[
        "inject_syntax",
        "inject_undeclared",
        "inject_row_undeclared",
        "inject_cel_bind_unsupported",
        "inject_bad_name",
        "inject_empty_name",
        "mask_empty_segment",
        "mask_space",
        "mask_empty",
        "mask_text_after_brackets",
        "mask_bare_brackets_mid_path",
        "mask_index",
        "mask_optional_after_brackets",
        "mask_bare_optional",
        "mask_double_optional",
        "mask_second_entry_located",
        "drop_ending_in_brackets",
        "drop_second_entry_located",
        "rows_path_trailing_dot",
        "rows_keep_syntax",
        "rows_keep_undeclared",
        "rows_keep_args_undeclared",
    ],
)
def test_compile_errors_are_located(config: dict[str, Any], location: tuple[Any, ...]) -> None:
    with pytest.raises(FilterCompileError) as caught:
        make_filters(**config)
    assert [loc for loc, _ in caught.value.problems] == [location]
    assert all(message for _, message in caught.value.problems)


def test_every_problem_is_reported() -> None:
    with pytest.raises(FilterCompileError) as caught:
        make_filters(
            inject={"a": "nope.x", "b": "subject.x"},
            mask=[{"path": "a..b"}],
            drop=["x[]"],
            filter_rows=[{"path": "", "keep": "1 +"}],
        )
    assert [loc for loc, _ in caught.value.problems] == [
        ("inject", "a"),
        ("response", "mask", 0, "path"),
        ("response", "drop", 0),
        ("response", "filter_rows", 0, "path"),
        ("response", "filter_rows", 0, "keep"),
    ]
    assert "'nope'" in caught.value.problems[0][1]


@pytest.mark.parametrize(
    ("path", "steps"),
    [
        ("ssn", ("ssn",)),
        ("Vendor.Bank_Account", ("vendor", "bank_account")),
        ("invoices[].vendor", ("invoices", EACH, "vendor")),
        ("[].ssn", (EACH, "ssn")),
        ("[]", (EACH,)),
        ("grid[][].x", ("grid", EACH, EACH, "x")),
        ("a-b.c_d.9", ("a-b", "c_d", "9")),
        ("Vendor?.bank_account?", ("vendor?", "bank_account?")),
        ("tags?[]", ("tags?", EACH)),
    ],
    ids=[
        "name",
        "folded",
        "brackets",
        "leading_brackets",
        "bare_brackets",
        "double_brackets",
        "name_alphabet",
        "optional",
        "optional_then_brackets",
    ],
)
def test_parse_path(path: str, steps: tuple[Any, ...]) -> None:
    assert parse_path(path) == steps


@pytest.mark.parametrize(
    ("key", "folded"),
    [
        ("SSN", "ssn"),
        ("ＳＳＮ", "ssn"),
        ("ſsn", "ssn"),
        ("Bank_Account", "bank_account"),
        ("\u212aey", "key"),
    ],
    ids=["upper", "fullwidth", "long_s", "mixed", "kelvin_sign"],
)
def test_fold_key(key: str, folded: str) -> None:
    assert fold_key(key) == folded
