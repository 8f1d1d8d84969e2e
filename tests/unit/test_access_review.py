"""broker.policy.review: the access review of CONTRACT §15 over the reference scenario's policies (§11), decided
by the policy engine itself. Expected values come from the scenario's text, not from the review's output."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from broker.config.loader import ConfigError, load_config
from broker.policy.fixtures import compile_policies
from broker.policy.review import (
    PrincipalSpec,
    ReviewRow,
    diff_reviews,
    load_principals,
    parse_principals,
    review,
    tool_transports,
)

ROOT = Path(__file__).resolve().parents[2]
EXPENSE = ROOT / "config/examples/expense.yaml"
AGENT = "spiffe://example.org/agents/expense-assistant"
TRAVEL = "spiffe://example.org/agents/travel-bot"
ALICE = PrincipalSpec(
    "alice",
    {"sub": "alice", "groups": ["finance-managers"], "department": "42", "approval_limit": 20000},
    (AGENT, TRAVEL),
)
BOB = PrincipalSpec("bob", {"sub": "bob", "groups": ["engineers"], "department": "42"}, (AGENT,))


def reviewed(config: Path, *principals: PrincipalSpec) -> dict[tuple[str, str, str], ReviewRow]:
    policies, counters = compile_policies(config)
    rows = review(policies, tool_transports(load_config(config).config), counters, principals, now=0)
    return {row.key: row for row in rows}


def test_row1_alice_through_the_expense_assistant_sees_and_may_call_both_tools() -> None:
    rows = reviewed(EXPENSE, ALICE)
    approve, listing = rows["alice", AGENT, "approveExpense"], rows["alice", AGENT, "listInvoices"]
    assert approve.visible and listing.visible
    assert approve.rule == "expense-approvers"
    assert approve.transports == ("v1", "mcp:expenses")
    # row 1: the grant's constraints
    assert approve.constraints["amount_max"] == 5000 and approve.constraints["department"] == "42"
    # no obligation for every call; rows 6-8, 11, 12: obligations that depend on the call
    assert approve.obligations == ()
    when = {c.rule: c.requires for c in approve.obligations_when}
    assert when == {
        "large-needs-manager": ("mfa", "manager_approval"),
        "very-large-needs-two": ("mfa", "dual_approval"),
        "risky-session": ("manager_approval",),  # alice's claims carry no risk_score: a condition
        "velocity": ("security_review",),
    }
    assert {c.rule: c.when for c in approve.obligations_when}["large-needs-manager"] == (
        "args.amount > 5000 && args.amount <= 10000"
    )
    # rows 9 and 10: argument conditions that deny, shown as the rules say them
    assert approve.callable == "conditional"
    assert [c.rule for c in approve.deny_when] == ["own-department-only", "within-approval-limit"]
    assert listing.callable == "conditional" and [c.rule for c in listing.deny_when] == [
        "own-department-only"
    ]


def test_row2_bob_sees_list_invoices_only() -> None:
    rows = reviewed(EXPENSE, BOB)
    assert not rows["bob", AGENT, "approveExpense"].visible
    assert rows["bob", AGENT, "approveExpense"].callable == "no"
    assert rows["bob", AGENT, "listInvoices"].visible


def test_travel_bot_may_use_neither_tool_and_purge_is_visible_to_nobody() -> None:
    rows = reviewed(EXPENSE, ALICE, BOB)
    assert not any(rows["alice", TRAVEL, tool].visible for tool in ("approveExpense", "listInvoices"))
    assert not any(row.visible for (_, _, tool), row in rows.items() if tool == "purgeInvoices")
    assert rows["alice", AGENT, "purgeInvoices"].transports == ("mcp:expenses",)


def test_row11_a_risky_session_needs_a_manager_for_every_call() -> None:
    risky = PrincipalSpec("alice", {**ALICE.claims, "risk_score": 85}, (AGENT,))
    row = reviewed(EXPENSE, risky)["alice", AGENT, "approveExpense"]
    assert row.obligations == ("manager_approval",) and row.obligation_rules == ("risky-session",)
    assert "risky-session" not in {c.rule for c in row.obligations_when}  # evaluated, not a condition


def test_a_rule_failing_for_every_call_makes_the_tool_uncallable(tmp_path: Path) -> None:
    config = yaml.safe_load(EXPENSE.read_text())
    config["policies"].append(
        {
            "id": "broken",
            "tools": ["listInvoices"],
            "effect": "obligate",
            "when": "subject.nope > 1",
            "requires": ["mfa"],
        }
    )
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(config))
    row = reviewed(path, BOB)["bob", AGENT, "listInvoices"]
    assert row.visible and row.callable == "no"
    assert row.rule == "broken" and "policy evaluation failed" in row.reason


def test_against_a_candidate_config_lists_what_each_principal_gains_and_loses(tmp_path: Path) -> None:
    config = yaml.safe_load(EXPENSE.read_text())
    policies = {p["id"]: p for p in config["policies"]}
    policies["expense-approvers"]["when"] = policies["expense-approvers"]["when"].replace(
        '"finance-managers" in subject.groups',
        '("finance-managers" in subject.groups || "engineers" in subject.groups)',
    )
    policies["large-needs-manager"]["requires"] = ["mfa", "dual_approval"]
    del policies["velocity"]
    config["policies"] = list(policies.values())
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(yaml.safe_dump(config))
    before = list(reviewed(EXPENSE, ALICE, BOB).values())
    after = list(reviewed(candidate, ALICE, BOB).values())
    changes = {(c.subject, c.tool, c.aspect, c.effect) for c in diff_reviews(before, after)}
    assert ("bob", "approveExpense", "visible", "gains") in changes
    assert ("bob", "approveExpense", "callable", "gains") in changes
    assert ("alice", "approveExpense", "obligations_when", "changes") in changes  # manager → dual
    assert ("alice", "approveExpense", "obligations_when", "gains") in changes  # velocity gone
    assert not any(c[0] == "alice" and c[1] == "listInvoices" for c in changes)
    assert diff_reviews(before, before) == []


def test_the_shipped_example_principals_file_loads() -> None:
    principals = load_principals(ROOT / "config/examples/expense.principals.yaml")
    assert [p.sub for p in principals] == ["alice", "bob", "carol"]
    assert principals[2].agents == (None,)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{sub: alice}", "1: a principals file is a non-empty YAML list"),
        ("- sub: alice\n  claims: {}\n  agent: [x]\n", "1: [0]: unknown key 'agent'"),
        (
            "- sub: alice\n- sub: bob\n  agents: [https://example.org/x]\n",
            "3: [1].agents[0]: invalid SPIFFE ID",
        ),
        ("- sub: alice\n- sub: alice\n", "2: [1].sub: principal 'alice' is listed twice"),
        ("- sub: ''\n", "[0].sub: sub must be a non-empty string"),
        ("- sub: a\n  claims: [x]\n", "[0].claims: claims must be a mapping"),
        ("- sub: a\n  claims: {sub: b}\n", "[0].claims: claims.sub differs from sub"),
        ("- sub: a\n  agents: []\n", "[0].agents: agents must be a non-empty list"),
        ("- &a [*a]\n", "YAML"),
    ],
    ids=[
        "not-a-list",
        "unknown-key",
        "bad-spiffe-id",
        "duplicate",
        "empty-sub",
        "claims-not-map",
        "sub-mismatch",
        "no-agents",
        "recursive-alias",
    ],
)
def test_bad_principals_files_are_located_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_principals(text, file="p.yaml")
    assert any(message in str(problem) for problem in caught.value.problems), caught.value.problems
