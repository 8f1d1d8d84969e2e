"""Responses fail closed (CONTRACT §12; HOSTILE 00 "shape drift", P26): broker.gateway.filters' response side.

The class under test: whatever shape the backend answers, a value a mask hides never leaves the broker — in any
member, key, casing or nesting — and a filter whose path does not match the answer refuses it. The tables below
are shapes; :func:`test_no_placement_of_a_hidden_value_survives` crosses every placement with every variant.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Callable
from typing import Any

import pytest

from broker.config.models import Tool
from broker.errors import UpstreamError
from broker.gateway.filters import ToolFilters, compile_tool_filters
from broker.policy.scrub import Scrubber

BANK = "DE89370400440532013000"
THEIRS = "FR7630006000011234567890189"  # another department's account
ALICE: dict[str, Any] = {"sub": "alice", "department": "42"}
AGENT = "spiffe://example.org/agents/expense-assistant"


def fullwidth(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)


#: the forms of a hidden value that must not survive (CONTRACT §12: "in any casing")
VARIANTS = {
    "as-is": BANK,
    "lower": BANK.lower(),
    "title": BANK.title(),
    "swapcase": BANK.swapcase(),
    "fullwidth": fullwidth(BANK),
}


def fold(text: str) -> str:
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())


def leaked(value: Any, secret: str = BANK) -> bool:
    """Whether ``secret`` (folded) is anywhere in ``value``: its JSON text, every string and every key."""
    needle = fold(secret)
    if needle in fold(json.dumps(value, ensure_ascii=False)):
        return True
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str) and needle in fold(node):
            return True
        if isinstance(node, dict):
            if any(needle in fold(key) for key in node):
                return True
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def make_filters(**response: Any) -> ToolFilters:
    return compile_tool_filters(
        Tool.model_validate(
            {"name": "tool", "upstream": {"url": "https://127.0.0.1:9/x"}, "response": response}
        )
    )


APPROVE = make_filters(mask=[{"path": "vendor.bank_account", "keep_last": 4}])
LIST = make_filters(
    filter_rows=[{"path": "invoices", "keep": "row.department == subject.department"}],
    mask=[{"path": "invoices.vendor.bank_account", "keep_last": 4}],
)


def approved(**changes: Any) -> dict[str, Any]:
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


def row(number: int, department: str = "42", bank: str = BANK) -> dict[str, Any]:
    return {
        "invoice_id": f"INV-{number}",
        "department": department,
        "vendor": {"name": "ACME GmbH", "bank_account": bank},
    }


def run(filters: ToolFilters, document: Any, *, status: int = 200) -> Any:
    out = filters.filter_answer(status, json.dumps(document).encode(), subject=ALICE, actor_id=AGENT)
    return json.loads(out)


def refusal(filters: ToolFilters, document: Any, *, status: int = 200) -> str:
    with pytest.raises(UpstreamError) as caught:
        run(filters, document, status=status)
    assert caught.value.status == 502
    assert caught.value.description == "the tool backend's answer could not be filtered"  # P27
    return caught.value.reason


# ---------------------------------------------------------------------------------------------------------
# shape: a path that does not match refuses (strict, 2xx)

SHAPE_DRIFT = [
    (APPROVE, {"data": approved()}, "wrapped"),
    (APPROVE, approved(vendor={"bankAccount": BANK}), "sibling-key"),
    (APPROVE, approved(vendor={"iban": BANK, "name": "x"}), "renamed-leaf"),
    (APPROVE, approved(vendor="ACME " + BANK), "scalar-parent"),
    (APPROVE, approved(vendor=None), "null-parent"),
    (APPROVE, {k: v for k, v in approved().items() if k != "vendor"} | {"payee": BANK}, "missing-parent"),
    (APPROVE, approved(vendor=[{"bank_account": BANK}, "x"]), "scalar-in-array"),
    (APPROVE, [approved(), {"other": BANK}], "array-element-without-path"),
    (LIST, {"data": {"invoices": [row(1), row(2, "7", THEIRS)]}}, "rows-wrapped"),
    (LIST, [row(1), row(2, "7", THEIRS)], "rows-top-level-array"),
    (LIST, {"items": [row(1), row(2, "7", THEIRS)]}, "rows-renamed"),
    (LIST, {"invoices": row(2, "7", THEIRS)}, "rows-path-holds-object"),
    (LIST, {"invoices": json.dumps([row(2, "7", THEIRS)])}, "rows-path-holds-string"),
    (LIST, {"invoices": [row(1)], "archive": [row(2, "7", THEIRS)]}, "rows-in-sibling-list"),
    (LIST, {"invoices": [row(1)], "latest": row(2, "7", THEIRS)}, "lone-row-elsewhere"),
    (LIST, {"invoices": [row(1)], "meta": {"by": [[{"Department": "7"}]]}}, "row-deep-in-arrays"),
    (LIST, {"invoices": [row(1)], "department": "7"}, "root-is-another-departments-row"),
    (LIST, {"invoices": [{"invoice_id": "INV-1", "department": "42"}]}, "kept-row-without-masked-field"),
    (LIST, {"invoices": [row(1) | {"related": [row(7, "7", THEIRS)]}]}, "row-nested-in-a-kept-row"),
    (LIST, {"invoices": [row(1) | {"approver": {"Department": "7"}}]}, "object-in-a-kept-row"),
    (LIST, {"invoices": [row(1) | {"a": [[{"b": {"department": None}}]]}]}, "deep-in-a-kept-row"),
]


@pytest.mark.parametrize(
    ("filters", "document"),
    [case[:2] for case in SHAPE_DRIFT],
    ids=[case[2] for case in SHAPE_DRIFT],
)
def test_shape_drift_is_refused(filters: ToolFilters, document: Any) -> None:
    assert refusal(filters, document) == "response_shape"


MATCHING = [
    (APPROVE, approved(), approved(vendor={"name": "ACME GmbH", "bank_account": "****3000"})),
    (
        APPROVE,
        [approved(), approved()],
        [approved(vendor={"name": "ACME GmbH", "bank_account": "****3000"})] * 2,
    ),
    (
        APPROVE,
        {"vendor": {"Bank_Account": BANK, "BANK_ACCOUNT": BANK.lower()}},
        {"vendor": {"Bank_Account": "****3000", "BANK_ACCOUNT": "****3000"}},
    ),
    (APPROVE, {"vendor": []}, {"vendor": []}),
    (LIST, {"invoices": []}, {"invoices": []}),
    (
        LIST,
        {"invoices": [row(1), row(2, "7", THEIRS), row(3)]},
        {"invoices": [row(1, bank="****3000"), row(3, bank="****3000")]},
    ),
    (
        LIST,
        {"invoices": [row(1) | {"approver": {"department": "42"}}]},
        {"invoices": [row(1, bank="****3000") | {"approver": {"department": "42"}}]},
    ),
    (LIST, {"invoices": [row(1)], "filter": {"department": "42"}}, None),
]


@pytest.mark.parametrize(
    ("filters", "document", "expected"),
    MATCHING,
    ids=[
        "reference",
        "top-level-array-of-answers",
        "case-variant-duplicates",
        "empty-array-holds-nothing",
        "no-rows",
        "other-departments-rows-removed",
        "objects-inside-a-kept-row-the-predicate-keeps",
        "row-like-object-the-predicate-keeps",
    ],
)
def test_matching_shapes_pass_filtered(filters: ToolFilters, document: Any, expected: Any) -> None:
    out = run(filters, document)
    if expected is not None:
        assert out == expected
    assert not leaked(out) and not leaked(out, THEIRS)


@pytest.mark.parametrize(
    ("path", "document", "expected"),
    [
        ("vendor?.bank_account", {"vendor": None}, {"vendor": None}),
        ("vendor?.bank_account", {"x": 1}, {"x": 1}),
        (
            "vendor?.bank_account",
            {"vendor": {"bank_account": BANK}},
            {"vendor": {"bank_account": "****3000"}},
        ),
        ("vendor.bank_account?", {"vendor": {"name": "x"}}, {"vendor": {"name": "x"}}),
        ("vendor.bank_account?", {"vendor": {"bank_account": None}}, {"vendor": {"bank_account": None}}),
    ],
    ids=["null-parent", "absent-parent", "present", "absent-leaf", "null-leaf"],
)
def test_optional_steps_are_declared(path: str, document: Any, expected: Any) -> None:
    assert run(make_filters(mask=[{"path": path, "keep_last": 4}]), document) == expected


@pytest.mark.parametrize(
    ("path", "document"),
    [
        ("vendor?.bank_account", {"vendor": {"name": "x"}}),
        ("vendor?.bank_account", {"vendor": "ACME"}),
        ("vendor.bank_account?", {"vendor": "ACME"}),
        ("vendor.bank_account?", {"payee": {}}),
    ],
    ids=["present-parent-missing-leaf", "present-parent-scalar", "scalar-parent", "missing-parent"],
)
def test_optional_covers_only_its_own_step(path: str, document: Any) -> None:
    assert refusal(make_filters(mask=[{"path": path}]), document) == "response_shape"


# ---------------------------------------------------------------------------------------------------------
# scrub: a hidden value is gone from the whole message


PLACEMENTS: dict[str, Callable[[str], Any]] = {
    "other-member": lambda v: approved(note=v),
    "free-text": lambda v: approved(note=f"paid to {v} on Monday"),
    "key-name": lambda v: approved(accounts={v: "primary"}),
    "nested-key": lambda v: approved(history=[{"by": {v: 1}}]),
    "arrays-of-arrays": lambda v: approved(history=[[[["x", v]]]]),
    "sibling-of-leaf": lambda v: approved(vendor={"name": "ACME", "bank_account": BANK, "iban": v}),
    "next-to-wrapped-copy": lambda v: approved(audit={"vendor": {"bank": v}}),
    "json-inside-string": lambda v: approved(raw=json.dumps({"bank_account": v})),
    "escaped-in-string": lambda v: approved(raw=json.dumps(json.dumps({"iban": v}))),
    "top-level-array-sibling": lambda v: [approved(), {"vendor": {"bank_account": "x"}, "copy": v}],
}


@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
@pytest.mark.parametrize("placement", list(PLACEMENTS), ids=list(PLACEMENTS))
def test_no_placement_of_a_hidden_value_survives(placement: str, variant: str) -> None:
    document = PLACEMENTS[placement](VARIANTS[variant])
    try:
        out = run(APPROVE, document)
    except UpstreamError as refused:  # refusing is fail-closed too; which reasons are expected is fixed
        assert refused.reason in {"response_shape", "response_mask_leak"}
        return
    assert not leaked(out), out
    assert "****3000" in json.dumps(out)  # the masked place still shows what the mask keeps


@pytest.mark.parametrize(
    "copy", [THEIRS, THEIRS.lower(), fullwidth(THEIRS)], ids=["as-is", "lower", "fullwidth"]
)
def test_a_removed_rows_hidden_value_is_scrubbed_everywhere(copy: str) -> None:
    document = {"invoices": [row(1), row(2, "7", THEIRS)], "summary": f"largest payee {copy}"}
    out = run(LIST, document)
    assert [r["invoice_id"] for r in out["invoices"]] == ["INV-1"]
    assert not leaked(out, THEIRS) and not leaked(out)


@pytest.mark.parametrize(
    ("masks", "document", "expected"),
    [
        (
            [{"path": "ssn", "keep_last": 0}],
            {"ssn": 123456789, "id": 123456789, "ref": "x-123456789"},
            {"ssn": "****", "id": "****", "ref": "x-****"},
        ),
        (
            [{"path": "vendor"}],
            {"vendor": {"name": "ACME GmbH", "bank_account": BANK}, "note": "ACME GmbH: " + BANK},
            {"vendor": "****", "note": "****: ****"},
        ),
        (
            [{"path": "accounts[]"}],
            {"accounts": [BANK, "-"], "x": "-"},
            {"accounts": ["****3000", "****"], "x": "-"},
        ),
        ([{"path": "flag"}], {"flag": True, "other": True}, {"flag": "****", "other": True}),
        (
            [{"path": "street"}],
            {"street": "Straße 12345", "copy": "STRASSE 12345"},
            {"street": "****2345", "copy": "****"},
        ),
    ],
    ids=[
        "numbers-and-their-digits",
        "masked-object-hides-every-value-in-it",
        "no-alphanumerics-nothing-to-hide",
        "booleans-carry-nothing",
        "case-folding-beyond-ignorecase",
    ],
)
def test_scrub_rules(masks: list[dict[str, Any]], document: Any, expected: Any) -> None:
    assert run(make_filters(mask=masks), document) == expected


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ({"pin": "42", "amount": 4200}, "response_mask_leak"),
        ({"pin": "42", "note": "room 42"}, "response_mask_leak"),
        ({"pin": "42", "k42": 1}, "response_mask_leak"),
        ({"pin": BANK, BANK: 1, "****": 2}, "response_mask_leak"),
    ],
    ids=[
        "short-value-in-a-number",
        "short-value-in-text",
        "short-value-in-a-key",
        "keys-collide-once-scrubbed",
    ],
)
def test_what_cannot_be_scrubbed_cleanly_is_refused(document: Any, reason: str) -> None:
    assert refusal(make_filters(mask=[{"path": "pin"}]), document) == reason


def test_a_short_hidden_value_alone_passes() -> None:
    assert run(make_filters(mask=[{"path": "pin"}]), {"pin": "42", "amount": 100}) == {
        "pin": "****",
        "amount": 100,
    }


@pytest.mark.parametrize(
    ("hidden", "value", "expected"),
    [
        ({BANK}, f"a {BANK.lower()} b {BANK}", "a **** b ****"),
        ({BANK}, {BANK.upper(): [BANK.title()]}, {"****": ["****"]}),
        ({BANK}, fullwidth(BANK), "****"),
        ({BANK}, "x" + fullwidth(BANK) + "y", "****"),
        ({BANK}, "nothing here", "nothing here"),
        ({BANK, "ACME GmbH"}, "ACME GMBH pays " + BANK, "**** pays ****"),
        ({"4800"}, [4800, 48000, 4800.0, 480, "4800"], ["****", "****", "****", 480, "****"]),
        ({BANK}, [True, None, 1.5], [True, None, 1.5]),
    ],
    ids=[
        "cases-in-text",
        "keys-and-values",
        "fullwidth-whole-string",
        "fullwidth-inside-text",
        "untouched",
        "several-values",
        "numbers",
        "scalars-without-text",
    ],
)
def test_scrubber(hidden: set[str], value: Any, expected: Any) -> None:
    assert Scrubber(hidden).scrub(value) == expected


# ---------------------------------------------------------------------------------------------------------
# a mask names a field wherever it appears: the same key with another value, anywhere, is masked too

OTHER = "GB29NWBK60161331926819"  # another account, under the masked key but not at the mask's path

NAMED_ELSEWHERE: dict[str, Callable[[str], Any]] = {
    "nested-copy-of-the-structure": lambda v: approved(
        history=[{"vendor": {"name": "old", "bank_account": v}}]
    ),
    "renamed-parent": lambda v: approved(Vendor2={"bank_account": v}),
    "at-the-root": lambda v: approved(bank_account=v),
    "case-variant-key": lambda v: approved(payee={"BANK_ACCOUNT": v}),
    "compatibility-form-of-the-key": lambda v: approved(payee={fullwidth("bank_account"): v}),
    "arrays-of-arrays": lambda v: approved(x=[[[{"y": {"bank_account": v}}]]]),
    "holding-an-object": lambda v: approved(payee={"bank_account": {"iban": v, "bic": "NWBKGB2L"}}),
    "holding-an-array": lambda v: approved(payee={"bank_account": [v, v.lower()]}),
    "in-a-top-level-array": lambda v: [approved(), approved(audit={"bank_account": v})],
}


@pytest.mark.parametrize("placement", list(NAMED_ELSEWHERE), ids=list(NAMED_ELSEWHERE))
def test_a_mask_names_its_field_wherever_it_appears(placement: str) -> None:
    document = NAMED_ELSEWHERE[placement](OTHER)
    quoted = (
        [{**document[0], "note": f"paid {OTHER.lower()}"}, document[1]]
        if isinstance(document, list)
        else {**document, "note": f"paid {OTHER.lower()}"}
    )
    for body in (document, quoted):
        out = run(APPROVE, body)
        assert not leaked(out, OTHER) and not leaked(out), out
        text = json.dumps(out)
        assert '"bank_account": "****3000"' in text  # the mask's own place keeps what it shows
        assert "****6819" in text or placement.startswith("holding")  # so do the others (keep_last 4)
    assert "paid ****" in json.dumps(run(APPROVE, quoted))  # and the value they hid is scrubbed elsewhere


@pytest.mark.parametrize(
    ("status", "document"),
    [
        (200, approved(detail={"bank_account": OTHER})),
        (404, {"error": "x", "detail": {"bank_account": OTHER}}),
    ],
    ids=["2xx", "4xx-of-another-shape"],
)
def test_a_named_field_is_masked_on_every_status(status: int, document: Any) -> None:
    assert run(APPROVE, document, status=status)["detail"] == {"bank_account": "****6819"}


@pytest.mark.parametrize(
    ("masks", "document", "expected"),
    [
        (
            [{"path": "ssns[]", "keep_last": 0}],
            {
                "ssns": ["123-45-6789", "987-65-4321"],
                "old": {"ssns": ["111-22-3333"]},
                "one": {"SSNs": "1-2-3-4"},
            },
            {"ssns": ["****", "****"], "old": {"ssns": ["****"]}, "one": {"SSNs": "****"}},
        ),
        (
            [
                {"path": "vendor.bank_account", "keep_last": 4},
                {"path": "payee?.bank_account", "keep_last": 0},
            ],
            {"vendor": {"bank_account": BANK}, "x": {"bank_account": OTHER}},
            {"vendor": {"bank_account": "****3000"}, "x": {"bank_account": "****"}},
        ),
        (
            [{"path": "accounts[]", "keep_last": 4}, {"path": "old.accounts", "keep_last": 4}],
            {"accounts": [BANK], "old": {"accounts": [OTHER]}, "x": {"accounts": [OTHER]}},
            {"accounts": ["****3000"], "old": {"accounts": "****"}, "x": {"accounts": "****"}},
        ),
        (
            [{"path": "vendor.bank_account", "keep_last": 4}],
            {"vendor": {"bank_account": BANK}, "x": {"bank_account": None}, "y": [{"bank_account": True}]},
            {
                "vendor": {"bank_account": "****3000"},
                "x": {"bank_account": None},
                "y": [{"bank_account": "****"}],
            },
        ),
    ],
    ids=[
        "ending-in-[]-masks-each-element",
        "strictest-keep-last",
        "whole-rather-than-elements",
        "null-stays-null",
    ],
)
def test_named_fields_elsewhere(masks: list[dict[str, Any]], document: Any, expected: Any) -> None:
    assert run(make_filters(mask=masks), document) == expected


def test_what_rows_and_drops_remove_still_hides_its_named_fields() -> None:
    removed = row(2, "7", THEIRS) | {"previous": {"bank_account": OTHER}}
    out = run(LIST, {"invoices": [row(1), removed], "summary": f"moved from {OTHER}"})
    assert out == {"invoices": [row(1, bank="****3000")], "summary": "moved from ****"}
    filters = make_filters(mask=[{"path": "vendor.bank_account"}], drop=["audit"])
    out = run(filters, approved(audit={"old": {"Bank_Account": OTHER}}, note=OTHER))
    assert "audit" not in out and out["note"] == "****"


def test_the_leaf_rule_does_not_make_a_field_required() -> None:
    assert run(APPROVE, approved(history=[{"vendor": {"name": "old"}}]))["history"] == [
        {"vendor": {"name": "old"}}
    ]


# ---------------------------------------------------------------------------------------------------------
# the /v1 status rules and the unfiltered fast path


@pytest.mark.parametrize("status", [500, 502, 503, 599])
@pytest.mark.parametrize("filters", [APPROVE, make_filters()], ids=["filtered", "unfiltered"])
def test_5xx_bodies_are_replaced_by_502(filters: ToolFilters, status: int) -> None:
    with pytest.raises(UpstreamError) as caught:
        filters.filter_answer(status, json.dumps({"e": BANK}).encode(), subject=ALICE, actor_id=AGENT)
    assert (caught.value.status, caught.value.reason) == (502, "upstream_status_5xx")


@pytest.mark.parametrize("status", [101, 302, 304])
def test_statuses_that_are_neither_2xx_nor_4xx_are_502(status: int) -> None:
    with pytest.raises(UpstreamError) as caught:
        make_filters().filter_answer(status, b"{}", subject=ALICE, actor_id=AGENT)
    assert caught.value.reason == "upstream_status"


def test_unfiltered_tools_are_not_parsed() -> None:
    body = b'{"not": "parsed", "not": "even once"} trailing'
    for status in (200, 404):
        assert make_filters().filter_answer(status, body, subject=ALICE, actor_id=AGENT) is body


ERROR_BODIES = [
    ({"error": "conflict", "detail": "not found"}, {"error": "conflict", "detail": "not found"}),
    (
        {"error": "conflict", "vendor": {"bank_account": BANK}, "detail": f"account {BANK.lower()} blocked"},
        {"error": "conflict", "vendor": {"bank_account": "****3000"}, "detail": "account **** blocked"},
    ),
]


@pytest.mark.parametrize(("document", "expected"), ERROR_BODIES, ids=["other-shape", "masked-and-scrubbed"])
@pytest.mark.parametrize("status", [400, 404, 409, 422])
def test_4xx_bodies_pass_masked(status: int, document: Any, expected: Any) -> None:
    assert run(APPROVE, document, status=status) == expected


@pytest.mark.parametrize(
    "document",
    [
        {"error": "x", "invoices": row(2, "7", THEIRS)},
        {"error": "x", "rows": [row(2, "7", THEIRS)]},
        "plain error text",
    ],
    ids=["rows-path-holds-object", "rows-elsewhere", "not-an-object"],
)
def test_4xx_bodies_still_refuse_what_cannot_be_filtered(document: Any) -> None:
    assert refusal(LIST, document, status=404) in {"response_shape", "response_unfilterable"}


# ---------------------------------------------------------------------------------------------------------
# the API the MCP layer uses: several documents, one sealed message


def test_a_message_is_sealed_around_its_documents() -> None:
    response = APPROVE.response_filter(subject=ALICE, actor_id=AGENT)
    structured = response.document(approved())
    text = response.document(approved(note="x"))
    message = {
        "structuredContent": structured,
        "content": [{"type": "text", "text": text, "annotations": {"audience": [BANK.lower()]}}],
        "_meta": {"trace": f"bank={BANK}", BANK: True},
        "isError": False,
    }
    assert response.hidden == {BANK}
    sealed = response.seal(message)
    assert not leaked(sealed)
    assert sealed["_meta"] == {"trace": "bank=****", "****": True}
    assert sealed["structuredContent"]["vendor"]["bank_account"] == "****3000"
    assert sealed["isError"] is False


def test_a_message_masks_the_named_fields_outside_its_documents() -> None:
    response = APPROVE.response_filter(subject=ALICE, actor_id=AGENT)
    structured = response.document(approved())
    item = {"text": structured, "annotations": {"vendor": {"bank_account": OTHER}}}
    message = {
        "structuredContent": structured,
        "content": [item],
        "_meta": {"vendor": {"BANK_ACCOUNT": OTHER}, "note": OTHER.lower()},
        "bank_account": OTHER,
    }
    sealed = response.seal(
        message, envelope={id(message): frozenset({"content", "structuredContent", "_meta"})}
    )
    assert not leaked(sealed, OTHER) and not leaked(sealed)
    assert sealed["_meta"] == {"vendor": {"BANK_ACCOUNT": "****6819"}, "note": "****"}
    assert sealed["content"][0]["annotations"] == {"vendor": {"bank_account": "****6819"}}
    assert sealed["bank_account"] == "****6819"
    assert sealed["structuredContent"]["vendor"]["bank_account"] == "****3000"


def test_an_envelopes_own_members_are_not_the_tools_fields() -> None:
    filters = make_filters(
        mask=[{"path": "doc.text", "keep_last": 0}, {"path": "doc.content", "keep_last": 0}]
    )
    response = filters.response_filter(subject=ALICE, actor_id=AGENT)
    document = response.document({"doc": {"text": "a secret", "content": "another secret"}})
    item = {"text": document, "annotations": {"text": "third secret"}}
    message = {"content": [item], "_meta": {"content": "fourth secret"}}
    envelope = {id(message): frozenset({"content", "_meta"}), id(item): frozenset({"text", "annotations"})}
    sealed = response.seal(message, envelope=envelope)
    assert sealed == {
        "content": [{"text": {"doc": {"text": "****", "content": "****"}}, "annotations": {"text": "****"}}],
        "_meta": {"content": "****"},
    }


def test_rows_outside_the_documents_are_refused_at_seal() -> None:
    response = LIST.response_filter(subject=ALICE, actor_id=AGENT)
    document = response.document({"invoices": [row(1), row(2, "7", THEIRS)]})
    with pytest.raises(UpstreamError) as caught:
        response.seal({"structuredContent": document, "_meta": {"rows": [row(2, "7", THEIRS)]}})
    assert caught.value.reason == "response_shape"


def test_an_unconvertible_subject_keeps_no_row_and_refuses_row_like_objects() -> None:
    class Unconvertible:
        pass

    subject = {"department": Unconvertible()}
    answer = {"invoices": [row(1)], "total": 1}
    out = LIST.filter_answer(200, json.dumps(answer).encode(), subject=subject, actor_id=AGENT)
    assert json.loads(out) == {"invoices": [], "total": 1}
    with pytest.raises(UpstreamError):
        LIST.filter_answer(
            200, json.dumps({**answer, "x": {"department": "42"}}).encode(), subject=subject, actor_id=AGENT
        )


def test_many_hidden_values_over_long_text_are_still_all_found() -> None:
    # 600 accounts × the long notes exceed the direct-search budget: the k-gram narrowing path runs
    rows = [
        row(n, bank=f"DE8937040044053201{n:04d}") | {"note": f"invoice {n} " + "x" * 40} for n in range(600)
    ]
    rows[17]["note"] = "pay to " + f"de8937040044053201{599:04d}"  # another row's account, lower case
    rows[18]["note"] = "pay to " + fullwidth(f"DE8937040044053201{3:04d}")
    out = run(LIST, {"invoices": rows})
    text = json.dumps(out, ensure_ascii=False)
    assert all(not leaked(out, f"DE8937040044053201{n:04d}") for n in range(600)), text[:200]
    assert out["invoices"][17]["note"] == "pay to ****" and out["invoices"][18]["note"] == "****"
