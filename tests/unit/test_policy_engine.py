"""broker.policy: CEL rules compiled at load, one decision path for discovery and invocation.

CONTRACT §6 and §8 (deny beats obligation), §11 rows 1, 2, 6–12 (the expense scenario, as decisions);
HOSTILE §0.4 (error absorption) and §1.6 Y01, Y02, Y04, Y06, Y08. Y03/Y09 belong to the config loader, Y05 to
the runtime (keep the last good set); Y07 (cost limits) is not enforced by the CEL library (see report).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from broker.config.models import Obligation, Policy
from broker.policy.cel import actor_view, referenced_fields, risk_score
from broker.policy.engine import (
    OBLIGATION_ORDER,
    Decision,
    Env,
    PolicyCompileError,
    PolicyError,
    PolicySet,
    build_env,
)

ASSISTANT = "spiffe://example.org/agents/expense-assistant"
TRAVEL_BOT = "spiffe://example.org/agents/travel-bot"
TOOLS = ("approveExpense", "listInvoices", "purgeInvoices")
COUNTERS = ("approvals_10m",)
NOW = 1_760_000_000

EXPENSE_POLICIES = [
    Policy(
        id="expense-approvers",
        tools=["approveExpense"],
        effect="allow",
        when=f'has(subject.groups) && "finance-managers" in subject.groups && actor.id == "{ASSISTANT}"',
        constraints={
            "amount_max": "5000",
            "department": "subject.department",
            "step_up": '[{"above": 5000, "requires": ["mfa", "manager_approval"]},'
            ' {"above": 10000, "requires": ["mfa", "dual_approval"]}]',
        },
    ),
    Policy(
        id="invoice-readers",
        tools=["listInvoices"],
        effect="allow",
        when=f'has(subject.department) && actor.id == "{ASSISTANT}"',
    ),
    Policy(
        id="own-department-only",
        tools=["approveExpense", "listInvoices"],
        effect="deny",
        when="has(args.department) && args.department != subject.department",
        reason="department does not match yours",
    ),
    Policy(
        id="within-approval-limit",
        tools=["approveExpense"],
        effect="deny",
        when="!has(subject.approval_limit) || args.amount > subject.approval_limit",
        reason="amount exceeds approval_limit",
    ),
    Policy(
        id="large-needs-manager",
        tools=["approveExpense"],
        effect="obligate",
        when="args.amount > 5000 && args.amount <= 10000",
        requires=["mfa", "manager_approval"],
        reason="amounts above 5000 need MFA and a manager's approval",
    ),
    Policy(
        id="very-large-needs-two",
        tools=["approveExpense"],
        effect="obligate",
        when="args.amount > 10000",
        requires=["mfa", "dual_approval"],
    ),
    Policy(
        id="risky-session",
        tools=["approveExpense"],
        effect="obligate",
        when="risk.score > 80",
        requires=["manager_approval"],
    ),
    Policy(
        id="velocity",
        tools=["approveExpense"],
        effect="obligate",
        when="counters.approvals_10m.count >= 5",
        requires=["security_review"],
        reason="more than 5 approvals in 10 minutes",
    ),
]

ALICE: dict[str, Any] = {
    "iss": "https://idp.example.org",
    "sub": "alice",
    "aud": "https://broker.example.org",
    "groups": ["finance-managers"],
    "department": "42",
    "approval_limit": 20000,
}
ALICE_MFA = {**ALICE, "acr": "mfa", "amr": ["pwd", "otp"]}
BOB: dict[str, Any] = {"sub": "bob", "groups": ["engineers"], "department": "42"}
PRINCIPALS = {"alice": ALICE, "alice-mfa": ALICE_MFA, "bob": BOB}
QUIET = {"approvals_10m": {"count": 0, "sum": 0.0}}


def compile_set(policies: Sequence[Policy] = EXPENSE_POLICIES) -> PolicySet:
    return PolicySet.compile(policies, tools=TOOLS, counters=COUNTERS)


EXPENSE = compile_set()


def make_env(
    policies: PolicySet = EXPENSE,
    *,
    subject: Mapping[str, Any] = ALICE,
    actor: str | None = ASSISTANT,
    tool: str = "approveExpense",
    args: Mapping[str, Any] | None = None,
    counters: Mapping[str, Mapping[str, Any]] = QUIET,
) -> Env:
    return policies.build_env(
        subject=subject, actor_id=actor, tool=tool, args=args, counters=counters, now=NOW
    )


def decide(
    policies: PolicySet = EXPENSE, *, tool: str = "approveExpense", args: Mapping[str, Any], **env: Any
) -> Decision:
    return policies.decide(tool, make_env(policies, tool=tool, args=args, **env))


def allow(
    *, rule: str, obligations: tuple[Obligation, ...] = (), fired: tuple[str, ...] = ()
) -> dict[str, Any]:
    return {"outcome": "allow", "rule": rule, "obligations": obligations, "obligation_rules": fired}


def deny(rule: str, reason: str, message: str) -> dict[str, Any]:
    return {"outcome": "deny", "rule": rule, "reason": reason, "message": message, "obligations": ()}


def failed(rule: str, outcome: str = "deny") -> dict[str, Any]:
    reason = f"policy evaluation failed in rule {rule}"
    message = "unknown tool" if outcome == "hidden" else "not permitted"
    return {"outcome": outcome, "rule": rule, "reason": reason, "message": message}


def hidden(reason: str = "no allow rule matched", rule: str | None = None) -> dict[str, Any]:
    """Answered like a missing tool: the message says nothing about policy."""
    return {"outcome": "hidden", "rule": rule, "reason": reason, "message": "unknown tool"}


def assert_decision(decision: Decision, expected: Mapping[str, Any]) -> None:
    assert {key: getattr(decision, key) for key in expected} == dict(expected)


# --- CONTRACT §11: the expense scenario, as decisions -------------------------------------------------------

APPROVE_4800 = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}
SCENARIO: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("row3-within-limits", {"args": APPROVE_4800}, allow(rule="expense-approvers")),
    (
        "row2-bob-invokes-approve",
        {"subject": BOB, "args": APPROVE_4800},
        hidden(),
    ),
    (
        "row6-6000-no-mfa",
        {"args": {"invoice_id": "INV-1", "amount": 6000}},
        allow(
            rule="expense-approvers", obligations=("mfa", "manager_approval"), fired=("large-needs-manager",)
        ),
    ),
    (
        "row7-6000-with-mfa",
        {"subject": ALICE_MFA, "args": {"invoice_id": "INV-1", "amount": 6000}},
        allow(
            rule="expense-approvers", obligations=("mfa", "manager_approval"), fired=("large-needs-manager",)
        ),
    ),
    (
        "row8-12000",
        {"subject": ALICE_MFA, "args": {"invoice_id": "INV-1", "amount": 12000}},
        allow(
            rule="expense-approvers", obligations=("mfa", "dual_approval"), fired=("very-large-needs-two",)
        ),
    ),
    (
        "row9-other-department",
        {"args": {"invoice_id": "INV-7", "amount": 100, "department": "7"}},
        deny(
            "own-department-only",
            "own-department-only: department does not match yours",
            "department does not match yours",
        ),
    ),
    (
        "row9-list-other-department",
        {"tool": "listInvoices", "args": {"department": "7"}},
        deny(
            "own-department-only",
            "own-department-only: department does not match yours",
            "department does not match yours",
        ),
    ),
    (
        "row9-list-own-department",
        {"tool": "listInvoices", "args": {"department": "42"}},
        allow(rule="invoice-readers"),
    ),
    (
        "row10-over-limit-no-mfa",
        {"args": {"invoice_id": "INV-1", "amount": 999999}},
        deny(
            "within-approval-limit",
            "within-approval-limit: amount exceeds approval_limit",
            "amount exceeds approval_limit",
        ),
    ),
    (
        "row10-over-limit-with-mfa",
        {"subject": ALICE_MFA, "args": {"invoice_id": "INV-1", "amount": 999999}},
        deny(
            "within-approval-limit",
            "within-approval-limit: amount exceeds approval_limit",
            "amount exceeds approval_limit",
        ),
    ),
    (
        "row11-risky-session",
        {"subject": {**ALICE, "risk_score": 85}, "args": {"invoice_id": "INV-1", "amount": 100}},
        allow(rule="expense-approvers", obligations=("manager_approval",), fired=("risky-session",)),
    ),
    (
        "row11-risk-at-threshold",
        {"subject": {**ALICE, "risk_score": 80}, "args": {"invoice_id": "INV-1", "amount": 100}},
        allow(rule="expense-approvers"),
    ),
    (
        "row12-sixth-approval",
        {"args": APPROVE_4800, "counters": {"approvals_10m": {"count": 5, "sum": 24000.0}}},
        allow(rule="expense-approvers", obligations=("security_review",), fired=("velocity",)),
    ),
    (
        "row12-fifth-approval",
        {"args": APPROVE_4800, "counters": {"approvals_10m": {"count": 4, "sum": 19200.0}}},
        allow(rule="expense-approvers"),
    ),
    (
        "obligations-merge-in-stable-order",
        {
            "subject": {**ALICE, "risk_score": 99},
            "args": {"invoice_id": "INV-1", "amount": 12000},
            "counters": {"approvals_10m": {"count": 9, "sum": 0.0}},
        },
        allow(
            rule="expense-approvers",
            obligations=("mfa", "manager_approval", "dual_approval", "security_review"),
            fired=("very-large-needs-two", "risky-session", "velocity"),
        ),
    ),
    ("travel-bot-invokes-approve", {"actor": TRAVEL_BOT, "args": APPROVE_4800}, hidden()),
    ("no-actor-invokes-approve", {"actor": None, "args": APPROVE_4800}, hidden()),
    ("purge-visible-to-nobody", {"tool": "purgeInvoices", "args": {}}, hidden()),
    # HOSTILE Y02: a missing attribute is an error, and an error denies
    ("Y02-amount-missing", {"args": {"invoice_id": "INV-1"}}, failed("within-approval-limit")),
    # HOSTILE Y08: CEL does not convert "5000" to 5000; the comparison errors and the call is denied
    (
        "Y08-amount-as-string",
        {"args": {"invoice_id": "INV-1", "amount": "5000"}},
        {**failed("within-approval-limit"), "error": "TypeError"},
    ),
    (
        "no-approval-limit-claim",
        {"subject": {k: v for k, v in ALICE.items() if k != "approval_limit"}, "args": APPROVE_4800},
        deny(
            "within-approval-limit",
            "within-approval-limit: amount exceeds approval_limit",
            "amount exceeds approval_limit",
        ),
    ),
    (
        "missing-groups-claim",
        {"subject": {k: v for k, v in ALICE.items() if k != "groups"}, "args": APPROVE_4800},
        hidden(),
    ),
    (
        "missing-counter-fails-closed",
        {"args": APPROVE_4800, "counters": {}},
        {**failed("velocity"), "error": "KeyError"},
    ),
]


@pytest.mark.parametrize(("env", "expected"), [row[1:] for row in SCENARIO], ids=[row[0] for row in SCENARIO])
def test_expense_scenario(env: dict[str, Any], expected: dict[str, Any]) -> None:
    assert_decision(decide(**env), expected)


VISIBLE = [
    ("alice", ASSISTANT, {"approveExpense", "listInvoices"}),
    ("alice-mfa", ASSISTANT, {"approveExpense", "listInvoices"}),
    ("bob", ASSISTANT, {"listInvoices"}),
    ("alice", TRAVEL_BOT, set()),
    ("bob", TRAVEL_BOT, set()),
    ("alice", None, set()),
]


@pytest.mark.parametrize(
    ("who", "actor", "expected"), VISIBLE, ids=[f"row1-2-{r[0]}-{r[1]}" for r in VISIBLE]
)
def test_discovery(who: str, actor: str | None, expected: set[str]) -> None:
    """Rows 1 and 2: one Env (no args) serves the whole listing."""
    env = make_env(subject=PRINCIPALS[who], actor=actor, tool=TOOLS[0])
    assert {tool for tool in TOOLS if EXPENSE.visible(tool, env)} == expected


PAIRS = [
    (who, actor, tool) for who in PRINCIPALS for actor in (ASSISTANT, TRAVEL_BOT, None) for tool in TOOLS
]


@pytest.mark.parametrize(("who", "actor", "tool"), PAIRS, ids=[f"{w}-{a}-{t}" for w, a, t in PAIRS])
def test_discovery_equals_invocation(who: str, actor: str | None, tool: str) -> None:
    """What discovery hides, invocation hides (404), whatever the arguments; what it shows is never 'hidden'."""
    shown = EXPENSE.visible(tool, make_env(subject=PRINCIPALS[who], actor=actor, tool=tool))
    for args in ({}, APPROVE_4800, {"amount": "x"}, {"department": "7", "amount": 10**6}):
        outcome = decide(subject=PRINCIPALS[who], actor=actor, tool=tool, args=args).outcome
        assert (outcome != "hidden") == shown


def test_row1_grant_constraints() -> None:
    env = make_env()
    assert EXPENSE.grant_constraints("approveExpense", env) == {
        "amount_max": 5000,
        "department": "42",
        "step_up": [
            {"above": 5000, "requires": ["mfa", "manager_approval"]},
            {"above": 10000, "requires": ["mfa", "dual_approval"]},
        ],
    }
    assert EXPENSE.grant_constraints("listInvoices", env) == {}


def test_visibility_names_the_allow_rule() -> None:
    assert_decision(EXPENSE.visibility("approveExpense", make_env()), allow(rule="expense-approvers"))


# --- HOSTILE Y01/Y04/Y06: defaults, errors, absorption -----------------------------------------------------


def rule(
    id: str, effect: str = "allow", when: str = "true", tools: Sequence[str] = ("*",), **kw: Any
) -> Policy:
    return Policy(id=id, effect=effect, when=when, tools=list(tools), **kw)  # type: ignore[arg-type]


OPEN = rule("open")
RULES: list[tuple[str, list[Policy], dict[str, Any], dict[str, Any]]] = [
    ("Y04-empty-policy-set", [], {"args": {}}, hidden()),
    ("Y04-no-rule-for-tool", [rule("other", tools=["listInvoices"])], {"args": {}}, hidden()),
    ("allow-false", [rule("closed", when="false")], {"args": {}}, hidden()),
    ("star-allow", [OPEN], {"tool": "purgeInvoices", "args": {}}, allow(rule="open")),
    (
        "Y06-allow-and-deny-match",
        [OPEN, rule("stop", "deny", "args.amount > 1")],
        {"args": {"amount": 2}},
        deny("stop", "stop: denied", "not permitted"),
    ),
    (
        "star-deny-reads-args",
        [OPEN, rule("stop", "deny", "args.amount > 1", reason="too much")],
        {"args": {"amount": 2}},
        deny("stop", "stop: too much", "too much"),
    ),
    (
        "argument-free-deny-hides",
        [OPEN, rule("lockout", "deny", "risk.score > 90", reason="risky")],
        {"subject": {"risk_score": 95}, "args": {}},
        hidden("lockout: risky", "lockout"),
    ),
    (
        "first-deny-in-config-order-wins",
        [OPEN, rule("a", "deny", "args.x > 0", reason="A"), rule("b", "deny", "args.x > 0", reason="B")],
        {"args": {"x": 1}},
        deny("a", "a: A", "A"),
    ),
    (
        "Y01-deny-divides-by-zero",
        [OPEN, rule("ratio", "deny", "args.a / args.b > 2")],
        {"args": {"a": 1, "b": 0}},
        {**failed("ratio"), "error": "ZeroDivisionError"},
    ),
    (
        "Y01-allow-no-such-key",
        [rule("groupy", when='"x" in subject.groups')],
        {"subject": {}, "args": {}},
        {**failed("groupy", "hidden"), "error": "KeyError"},
    ),
    (
        "Y01-error-in-any-allow-hides",
        [OPEN, rule("groupy", when='"x" in subject.groups')],
        {"subject": {}, "args": {}},
        failed("groupy", "hidden"),
    ),
    (
        "non-bool-allow-hides",
        [rule("number", when="1")],
        {"args": {}},
        {**failed("number", "hidden"), "error": "non-bool result (int)"},
    ),
    ("non-bool-deny-denies", [OPEN, rule("text", "deny", "args.x")], {"args": {"x": "yes"}}, failed("text")),
    (
        "obligation-error-denies",
        [OPEN, rule("ob", "obligate", "args.n > 1", requires=["mfa"])],
        {"args": {"n": "2"}},
        failed("ob"),
    ),
    (
        "deny-beats-obligation",
        [OPEN, rule("ob", "obligate", "true", requires=["mfa"]), rule("stop", "deny", "args.n > 1")],
        {"args": {"n": 2}},
        deny("stop", "stop: denied", "not permitted"),
    ),
    (
        "obligations-deduplicated-and-ordered",
        [
            OPEN,
            rule("o1", "obligate", "args.n > 0", requires=["security_review", "mfa"]),
            rule("o2", "obligate", "true", requires=["mfa"]),
        ],
        {"args": {"n": 1}},
        allow(rule="open", obligations=("mfa", "security_review"), fired=("o1", "o2")),
    ),
    # HOSTILE §0.4 / Y01: CEL's logical operators absorb errors. Documented behaviour, not a bug:
    (
        "Y01-absorb-allow-true-or-error",
        [rule("lenient", when="true || subject.nope")],
        {"args": {}},
        allow(rule="lenient"),
    ),
    (
        "Y01-absorb-allow-error-or-true",
        [rule("lenient", when="subject.nope || true")],
        {"args": {}},
        allow(rule="lenient"),
    ),
    (
        "Y01-absorb-deny-false-and-error",
        [OPEN, rule("d", "deny", "false && args.nope")],
        {"args": {}},
        allow(rule="open"),
    ),
    (
        "Y01-absorb-deny-error-and-false",
        [OPEN, rule("d", "deny", "args.nope && false")],
        {"args": {}},
        allow(rule="open"),
    ),
    (
        "Y01-no-absorb-allow-error-or-false",
        [rule("strict", when="subject.nope || false")],
        {"args": {}},
        failed("strict", "hidden"),
    ),
    (
        "Y01-mccarthy-conditional-propagates",
        [OPEN, rule("d", "deny", "true ? args.nope : false")],
        {"args": {}},
        failed("d"),
    ),
]


@pytest.mark.parametrize(("policies", "env", "expected"), [r[1:] for r in RULES], ids=[r[0] for r in RULES])
def test_rules(policies: list[Policy], env: dict[str, Any], expected: dict[str, Any]) -> None:
    assert_decision(decide(compile_set(policies), **env), expected)


def test_decision_messages_never_show_policy() -> None:
    for _, env, _ in SCENARIO:
        decision = decide(**env)
        assert "subject." not in decision.message and "args." not in decision.message
        assert "within-approval-limit" not in decision.message


# --- grant constraints ---------------------------------------------------------------------------------------

CONSTRAINTS = [
    ("error", {"limit": "subject.nope"}),
    ("bytes", {"raw": "b'x'"}),
    ("timestamp", {"at": "timestamp('2020-01-01T00:00:00Z')"}),
    ("non-finite", {"ratio": "1.0 / 0.0"}),
    ("int-map-key", {"map": "{1: 2}"}),
]


@pytest.mark.parametrize("constraints", [c[1] for c in CONSTRAINTS], ids=[c[0] for c in CONSTRAINTS])
def test_grant_constraint_failure_raises(constraints: dict[str, str]) -> None:
    policies = compile_set([rule("open", constraints=constraints)])
    with pytest.raises(PolicyError):
        policies.grant_constraints("approveExpense", make_env(policies))


def test_grant_constraints_of_hidden_tool_raise() -> None:
    with pytest.raises(PolicyError):
        EXPENSE.grant_constraints("approveExpense", make_env(subject=BOB))


def test_grant_constraints_first_matching_rule_wins() -> None:
    policies = compile_set(
        [
            rule("never", when="false", constraints={"cap": "1"}),
            rule("a", constraints={"cap": "2", "only_a": "'a'"}),
            rule("b", constraints={"cap": "3", "only_b": "[1, 2.5, null, true, {'k': 'v'}]"}),
        ]
    )
    assert policies.grant_constraints("listInvoices", make_env(policies)) == {
        "cap": 2,
        "only_a": "a",
        "only_b": [1, 2.5, None, True, {"k": "v"}],
    }


# --- load-time checks ----------------------------------------------------------------------------------------

COMPILE_ERRORS: list[tuple[str, list[Policy], list[tuple[tuple[Any, ...], str]]]] = [
    (
        "undeclared-reference",
        [rule("r", when='"x" in subjct.groups')],
        [(("policies", 0, "when"), "undeclared reference 'subjct'")],
    ),
    (
        "undeclared-function-namespace",
        [rule("r", when="cel.bind(x, 1, x > 0)")],
        [
            (("policies", 0, "when"), "undeclared reference 'cel'"),
            (("policies", 0, "when"), "undeclared reference 'x'"),
        ],
    ),
    (
        "allow-reads-args",
        [rule("r", when="args.amount < 5")],
        [
            (
                ("policies", 0, "when"),
                "allow rules decide who may use a tool; put argument conditions in deny or obligate rules",
            )
        ],
    ),
    (
        "constraint-reads-args",
        [rule("r", constraints={"cap": "args.amount"})],
        [
            (
                ("policies", 0, "constraints", "cap"),
                "constraints are evaluated at discovery, where there are no arguments: they must not read args",
            )
        ],
    ),
    (
        "unknown-tool",
        [rule("r", tools=["listInvoices", "approveExpens"])],
        [(("policies", 0, "tools", 1), "unknown tool 'approveExpens'")],
    ),
    (
        "unknown-counter",
        [rule("r", "deny", "counters.approvals_1h.count > 1")],
        [(("policies", 0, "when"), "unknown counter 'approvals_1h'")],
    ),
    (
        "counters-by-index",
        [rule("r", "deny", 'counters["approvals_10m"].count > 1')],
        [(("policies", 0, "when"), "read counters as counters.<name>")],
    ),
    ("duplicate-id", [rule("r"), rule("r")], [(("policies", 1, "id"), "duplicate policy id 'r'")]),
]


@pytest.mark.parametrize(
    ("policies", "problems"), [c[1:] for c in COMPILE_ERRORS], ids=[c[0] for c in COMPILE_ERRORS]
)
def test_compile_errors(policies: list[Policy], problems: list[tuple[tuple[Any, ...], str]]) -> None:
    with pytest.raises(PolicyCompileError) as caught:
        compile_set(policies)
    assert caught.value.problems == problems


def test_syntax_error_is_located() -> None:
    with pytest.raises(PolicyCompileError) as caught:
        compile_set([rule("r", when="subject.groups &&")])
    [(location, message)] = caught.value.problems
    assert location == ("policies", 0, "when") and message.startswith("invalid CEL:") and "1:" in message


def test_all_problems_are_collected() -> None:
    with pytest.raises(PolicyCompileError) as caught:
        PolicySet.compile(
            [
                rule("ok"),
                rule("a", when="subjct.x && actr.y", tools=["nope"]),
                rule("b", "deny", "(", constraints={}),
                rule("c", when="true", constraints={"k": "args.x", "j": "1 +"}),
            ],
            tools=TOOLS,
            counters=COUNTERS,
            section="shadow_policies",
        )
    assert [location for location, _ in caught.value.problems] == [
        ("shadow_policies", 1, "tools", 0),
        ("shadow_policies", 1, "when"),
        ("shadow_policies", 1, "when"),
        ("shadow_policies", 2, "when"),
        ("shadow_policies", 3, "constraints", "k"),
        ("shadow_policies", 3, "constraints", "j"),
    ]


def test_macro_variables_are_not_undeclared() -> None:
    compile_set([rule("r", when='subject.groups.exists(g, g == "x") && [1, 2].all(n, n > 0)')])


def test_counters_needed() -> None:
    assert EXPENSE.counters_needed("approveExpense") == frozenset({"approvals_10m"})
    assert EXPENSE.counters_needed("listInvoices") == frozenset()


# --- the environment -----------------------------------------------------------------------------------------

RISK = [
    ("absent", {}, 0),
    ("int", {"risk_score": 85}, 85),
    ("float", {"risk_score": 85.5}, 85.5),
    ("string-counts-as-worst", {"risk_score": "10"}, 100),
    ("bool-counts-as-worst", {"risk_score": False}, 100),
    ("null-counts-as-worst", {"risk_score": None}, 100),
    ("nan-counts-as-worst", {"risk_score": math.nan}, 100),
    ("infinity-counts-as-worst", {"risk_score": -math.inf}, 100),
]


@pytest.mark.parametrize(("claims", "score"), [r[1:] for r in RISK], ids=[r[0] for r in RISK])
def test_risk_score(claims: dict[str, Any], score: float) -> None:
    assert risk_score(claims) == score


ACTORS = [
    (
        "spiffe",
        ASSISTANT,
        {"id": ASSISTANT, "trust_domain": "example.org", "path": "/agents/expense-assistant"},
    ),
    ("none", None, {"id": "", "trust_domain": "", "path": ""}),
    ("empty", "", {"id": "", "trust_domain": "", "path": ""}),
]


@pytest.mark.parametrize(("actor", "view"), [a[1:] for a in ACTORS], ids=[a[0] for a in ACTORS])
def test_actor_view(actor: str | None, view: dict[str, str]) -> None:
    assert actor_view(actor) == view


FIELDS = [
    ("selects", "has(subject.a) && subject.b.c > 1", frozenset({"a", "b"})),
    ("spaces", "subject . a", frozenset({"a"})),
    ("index-means-whole", 'subject["a"]', None),
    ("macro-on-variable-means-whole", "subject.all(k, k != '')", None),
    ("bare-means-whole", '"a" in subject', None),
    ("word-in-string-means-whole", '"subject" == args.x', None),
    ("other-words-ignored", "my_subject.a || subjects.b", frozenset()),
    # a comment between a name and its call: CEL calls size()/exists() on the whole subject (review finding)
    ("comment-then-call-means-whole", "subject.size // why\n() > 1", None),
    ("comment-then-macro-means-whole", "subject.exists // why\n(k, k == 'x')", None),
    ("comment-after-field-means-whole", "subject.a // just a note\n== 'x'", None),
]


@pytest.mark.parametrize(("source", "fields"), [f[1:] for f in FIELDS], ids=[f[0] for f in FIELDS])
def test_referenced_fields(source: str, fields: frozenset[str] | None) -> None:
    assert referenced_fields(source, "subject") == fields


def test_expense_needs_are_trimmed() -> None:
    assert EXPENSE.needs == {
        "subject": frozenset({"groups", "department", "approval_limit"}),
        "actor": frozenset({"id"}),
        "args": frozenset({"department", "amount"}),
        "risk": None,
        "counters": frozenset({"approvals_10m"}),
    }  # no rule reads tool or now: they are left out of the environment


@pytest.mark.parametrize(("env", "expected"), [row[1:] for row in SCENARIO], ids=[row[0] for row in SCENARIO])
def test_trimmed_env_decides_like_full_env(env: dict[str, Any], expected: dict[str, Any]) -> None:
    args = env.pop("args")
    tool = env.pop("tool", "approveExpense")
    full = build_env(
        subject=env.get("subject", ALICE),
        actor_id=env.get("actor", ASSISTANT),
        tool=tool,
        args=args,
        counters=env.get("counters", QUIET),
        now=NOW,
    )
    assert EXPENSE.decide(tool, full) == decide(tool=tool, args=args, **env)


def test_env_of_another_policy_set_is_refused() -> None:
    wider = compile_set([rule("r", when='subject.tenant == "t"')])
    with pytest.raises(ValueError, match="another policy set"):
        wider.visible("listInvoices", make_env(EXPENSE))


def test_unconvertible_variable_fails_closed() -> None:
    env = make_env(subject={**ALICE, "department": {"a", "set"}})
    assert_decision(EXPENSE.decide("listInvoices", env), hidden("policy environment invalid"))


def test_now_is_an_int() -> None:
    policies = compile_set(
        [
            rule(
                "r",
                when=f"now == {NOW} && tool.name == 'listInvoices' && actor.path == '/agents/expense-assistant'",
            )
        ]
    )
    assert policies.visible("listInvoices", make_env(policies, tool="listInvoices"))
    assert not policies.visible("approveExpense", make_env(policies, tool="listInvoices"))


def test_bind_now_replaces_now_and_drops_the_cached_visibility() -> None:
    """An invocation decides at the time its body was complete (broker.gateway.pipeline stage 2)."""
    policies = compile_set([rule("r", when=f"now == {NOW} && tool.name == 'listInvoices'")])
    env = make_env(policies, tool="listInvoices")
    assert policies.visible("listInvoices", env)  # cached for this Env
    env.bind_now(NOW + 30)
    assert not policies.visible("listInvoices", env)


def test_obligation_order_covers_the_schema() -> None:
    from typing import get_args

    assert set(OBLIGATION_ORDER) == set(get_args(Obligation))
