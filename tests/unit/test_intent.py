"""Structured intent (CONTRACT §17, RFC 9396): :mod:`broker.policy.intent`, a table of token entries × calls, the
claims it refuses to read, and the exchange's one ``tool_invocation`` entry."""

from __future__ import annotations

from typing import Any

import pytest

from broker.policy.intent import IntentError, parse_requested, parse_token_details

HERE = "https://broker.example.org"
INV = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}


def entry(tool: str = "approveExpense", **members: Any) -> dict[str, Any]:
    return {"type": "tool_invocation", "tool": tool, **members}


# (id, the token's authorization_details, tool, arguments, None when permitted else a part of the reason)
PERMITS = [
    ("listed-no-constraints", [entry()], "approveExpense", INV, None),
    ("within-amount-max", [entry(constraints={"amount_max": 5000})], "approveExpense", INV, None),
    ("at-amount-max", [entry(constraints={"amount_max": 4800})], "approveExpense", INV, None),
    (
        "above-amount-max",
        [entry(constraints={"amount_max": 1000})],
        "approveExpense",
        INV,
        "authorization_details[0] (approveExpense): amount must be a number at most amount_max 1000",
    ),
    ("float-max", [entry(constraints={"amount_max": 4800.5})], "approveExpense", INV, None),
    (
        "max-argument-absent",
        [entry(constraints={"amount_max": 5000})],
        "approveExpense",
        {"invoice_id": "INV-1"},
        "argument 'amount' is required by amount_max",
    ),
    (
        "max-argument-not-a-number",
        [entry(constraints={"amount_max": 5000})],
        "approveExpense",
        {**INV, "amount": "100"},
        "amount must be a number",
    ),
    (
        "max-argument-bool",
        [entry(constraints={"flag_max": 1})],
        "approveExpense",
        {**INV, "flag": True},
        "flag must be a number",
    ),
    ("exact-value", [entry(constraints={"department": "42"})], "approveExpense", INV, None),
    (
        "exact-value-differs",
        [entry(constraints={"department": "7"})],
        "approveExpense",
        INV,
        "department must equal the value of constraint 'department'",
    ),
    (
        "exact-value-type-differs",
        [entry(constraints={"department": 42})],
        "approveExpense",
        INV,
        "department must equal",
    ),
    (
        "exact-value-absent",
        [entry(constraints={"invoice_id": "INV-1"})],
        "approveExpense",
        {"amount": 1},
        "argument 'invoice_id' is required by invoice_id",
    ),
    ("exact-number-spelling", [entry(constraints={"amount": 4800.0})], "approveExpense", INV, None),
    (
        "exact-object",
        [entry(constraints={"meta": {"b": 1, "a": [2]}})],
        "approveExpense",
        {"meta": {"a": [2], "b": 1}},
        None,
    ),
    ("exact-arguments", [entry(arguments=INV)], "approveExpense", dict(reversed(INV.items())), None),
    (
        "exact-arguments-differ",
        [entry(arguments=INV)],
        "approveExpense",
        {**INV, "amount": 4801},
        "arguments must be exactly the entry's arguments",
    ),
    (
        "second-entry-permits",
        [entry(constraints={"amount_max": 10}), entry(constraints={"amount_max": 5000})],
        "approveExpense",
        INV,
        None,
    ),
    (
        "every-entry-named",
        [entry(constraints={"amount_max": 10}), entry("listInvoices"), entry(constraints={"amount_max": 20})],
        "approveExpense",
        INV,
        "authorization_details[0] (approveExpense): amount must be a number at most amount_max 10; "
        "authorization_details[2] (approveExpense): amount must be a number at most amount_max 20",
    ),
    ("unlisted-tool", [entry("listInvoices")], "approveExpense", INV, "no authorization_details entry"),
    ("entry-for-us", [entry(locations=[HERE])], "approveExpense", INV, None),
    ("entry-for-us-trailing-slash", [entry(locations=[HERE + "/"])], "approveExpense", INV, None),
    (
        "entry-for-another-server",
        [entry(locations=["https://other.example.org"])],
        "approveExpense",
        INV,
        "no authorization_details entry",
    ),
    ("other-types-ignored", [{"type": "payment_initiation", "x": 1}, entry()], "approveExpense", INV, None),
]


@pytest.mark.parametrize(
    ("details", "tool", "arguments", "expected"), [r[1:] for r in PERMITS], ids=[r[0] for r in PERMITS]
)
def test_permits(details: list[Any], tool: str, arguments: dict[str, Any], expected: str | None) -> None:
    intent = parse_token_details(details, public_url=HERE)
    assert intent is not None
    problem = intent.permits(tool, arguments)
    if expected is None:
        assert problem is None
        assert intent.visible(tool)
    else:
        assert problem is not None and expected in problem


def test_visible_lists_only_entries_that_apply_here() -> None:
    intent = parse_token_details(
        [entry(), entry("listInvoices", locations=["https://other.example.org"]), {"type": "other"}],
        public_url=HERE,
    )
    assert intent is not None
    assert [intent.visible(t) for t in ("approveExpense", "listInvoices", "purgeInvoices")] == [
        True,
        False,
        False,
    ]


@pytest.mark.parametrize(
    "details",
    [[], [{"type": "payment_initiation", "amount": 1}]],
    ids=["empty", "only-other-types"],
)
def test_a_token_without_tool_invocation_entries_is_not_bounded(details: list[Any]) -> None:
    assert parse_token_details(details, public_url=HERE) is None


def test_entries_only_for_other_servers_still_bound_the_token() -> None:
    intent = parse_token_details([entry(locations=["https://other.example.org"])], public_url=HERE)
    assert intent is not None and not intent.visible("approveExpense")


# bounds that cannot be read: the caller answers 401 invalid_token, never "unbounded"
UNREADABLE = [
    ("not-an-array", {"type": "tool_invocation", "tool": "x"}, "must be a JSON array"),
    ("entry-not-object", ["tool_invocation"], "[0] must be an object with a string type"),
    ("type-missing", [{"tool": "x"}], "[0] must be an object with a string type"),
    ("type-not-string", [entry(), {"type": 1}], "[1] must be an object with a string type"),
    ("tool-missing", [{"type": "tool_invocation"}], "[0].tool must be a non-empty string"),
    ("tool-empty", [entry("")], "[0].tool must be a non-empty string"),
    ("unknown-member", [entry(actions=["call"])], "[0] has unknown member 'actions'"),
    ("constraints-not-object", [entry(constraints=[1])], "[0].constraints must be a JSON object"),
    (
        "max-not-number",
        [entry(constraints={"amount_max": "5000"})],
        "constraints.amount_max must be a number",
    ),
    ("max-bool", [entry(constraints={"amount_max": True})], "constraints.amount_max must be a number"),
    ("max-nan", [entry(constraints={"amount_max": float("nan")})], "constraints.amount_max must be a number"),
    ("max-huge-int", [entry(constraints={"amount_max": 10**400})], "constraints.amount_max must be a number"),
    (
        "max-beyond-i-json",
        [entry(constraints={"amount_max": 2**53})],
        "constraints.amount_max must be a number",
    ),
    (
        "exact-value-not-json",
        [entry(constraints={"x": float("inf")})],
        "constraints.x has no exact JSON form",
    ),
    ("arguments-not-object", [entry(arguments=[1])], "[0].arguments must be a JSON object"),
    ("locations-empty", [entry(locations=[])], "[0].locations must be a non-empty array of strings"),
    ("locations-not-strings", [entry(locations=[1])], "[0].locations must be a non-empty array of strings"),
]


@pytest.mark.parametrize(("details", "message"), [r[1:] for r in UNREADABLE], ids=[r[0] for r in UNREADABLE])
def test_unreadable_token_details_raise(details: Any, message: str) -> None:
    with pytest.raises(IntentError) as refused:
        parse_token_details(details, public_url=HERE)
    assert message in str(refused.value) and refused.value.reason == "token_authorization_details"


# --- the exchange's authorization_details ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("details", "arguments"),
    [
        ([entry(arguments=INV)], INV),
        ([entry()], {}),
        ([entry(arguments=INV, locations=[HERE])], INV),
        ([entry(arguments=INV, locations=["https://other.example.org", HERE + "/"])], INV),
    ],
    ids=["arguments", "no-arguments", "locations", "locations-among-others"],
)
def test_requested_call(details: list[Any], arguments: dict[str, Any]) -> None:
    requested = parse_requested(details, public_url=HERE)
    assert (requested.tool, requested.arguments) == ("approveExpense", arguments)


REQUEST_REFUSED = [
    ("not-array", entry(arguments=INV), "details_not_array", "must be a JSON array"),
    ("no-entry", [], "details_entries", "exactly one entry, not 0"),
    ("several-entries", [entry(), entry()], "details_entries", "exactly one entry, not 2"),
    ("entry-not-object", ["x"], "details_entry", "[0] must be a JSON object"),
    ("wrong-type", [{**entry(), "type": "payment"}], "details_type", 'type must be "tool_invocation"'),
    ("unknown-member", [entry(constraints={})], "details_unknown_member", "unknown member 'constraints'"),
    ("tool-not-string", [entry(tool=1)], "details_tool", "tool must be a non-empty string"),
    ("arguments-not-object", [entry(arguments=[1])], "details_arguments", "arguments must be a JSON object"),
    ("arguments-null", [entry(arguments=None)], "details_arguments", "arguments must be a JSON object"),
    ("locations-elsewhere", [entry(locations=["https://o.example"])], "details_locations", f"include {HERE}"),
    ("locations-not-array", [entry(locations=HERE)], "details_locations", "non-empty array of strings"),
]


@pytest.mark.parametrize(
    ("details", "reason", "message"), [r[1:] for r in REQUEST_REFUSED], ids=[r[0] for r in REQUEST_REFUSED]
)
def test_requested_call_refusals(details: Any, reason: str, message: str) -> None:
    with pytest.raises(IntentError) as refused:
        parse_requested(details, public_url=HERE)
    assert refused.value.reason == reason and message in str(refused.value)
