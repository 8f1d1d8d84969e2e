"""``broker policy test FILE -c CONFIG``: operators' policy tests, runnable in their CI before a change ships.

A fixture file is YAML::

    cases:
      - name: alice may approve a small expense
        subject: {sub: alice, groups: [finance-managers], department: "42", approval_limit: 20000}
        actor: spiffe://example.org/agents/expense-assistant     # optional ("" = no agent)
        tool: approveExpense
        args: {invoice_id: INV-1, amount: 4800, department: "42"}  # absent: a discovery (visibility) check
        counters: {approvals_10m: {count: 0, sum: 0}}              # optional; missing counters count as 0
        expect:
          decision: allow          # allow | deny | hidden
          obligations: []          # optional: exactly these obligations, in order
          rule: within-approval-limit   # optional: the deciding rule
          reason: approval_limit   # optional: a substring of the precise reason

Only the config's policies are compiled (no certificates or keys are needed), with the same engine the broker
runs. Exit 0 when every case matches, 1 listing each mismatch as ``FILE:LINE: case name: expected …, got …``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.config.loader import ConfigError, ConfigProblem, load_config, parse_yaml
from broker.policy.engine import PolicyCompileError, PolicySet

_CASE_KEYS = frozenset({"name", "subject", "actor", "tool", "args", "counters", "now", "expect"})
_EXPECT_KEYS = frozenset({"decision", "obligations", "rule", "reason"})


@dataclass(frozen=True)
class Outcome:
    name: str
    line: int
    ok: bool
    detail: str


def compile_policies(config_path: Path) -> tuple[PolicySet, list[str]]:
    """The config's policy set and its counter names."""
    loaded = load_config(config_path)
    config = loaded.config
    tools = [t.name for t in config.tools] + [t.name for m in config.mcp_servers for t in m.tools]
    counters = [c.name for c in config.counters]
    try:
        return PolicySet.compile(config.policies, tools=tools, counters=counters), counters
    except PolicyCompileError as exc:
        raise ConfigError(
            [
                ConfigProblem(str(config_path), loaded.line_of(where), message)
                for where, message in exc.problems
            ]
        ) from None


def _problem(file: str, line: int, message: str) -> ConfigError:
    return ConfigError([ConfigProblem(file, line, message)])


def run_fixtures(fixture_path: Path, policies: PolicySet, *, counters: list[str]) -> list[Outcome]:
    file = str(fixture_path)
    try:
        text = fixture_path.read_text(encoding="utf-8")
    except OSError as exc:
        raise _problem(file, 0, f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise _problem(file, 1, "not UTF-8") from None
    data, lines = parse_yaml(text, file=file)
    cases = data.get("cases") if isinstance(data, dict) else None
    if not isinstance(cases, list) or not cases:
        raise _problem(file, 1, "a fixture file needs a non-empty 'cases' list")
    outcomes = []
    for index, case in enumerate(cases):
        line = lines.get(("cases", index), 1)
        if (
            not isinstance(case, dict)
            or set(case) - _CASE_KEYS
            or not {"name", "subject", "tool", "expect"} <= set(case)
        ):
            raise _problem(
                file, line, f"case {index}: needs name, subject, tool, expect (keys: {sorted(_CASE_KEYS)})"
            )
        expect = case["expect"]
        if not isinstance(expect, dict) or set(expect) - _EXPECT_KEYS or "decision" not in expect:
            raise _problem(
                file, line, f"case {case['name']!r}: expect needs decision (allow, deny or hidden)"
            )
        outcomes.append(_run_case(case, expect, policies, counters=counters, line=line))
    return outcomes


def _run_case(
    case: Mapping[str, Any], expect: Mapping[str, Any], policies: PolicySet, *, counters: list[str], line: int
) -> Outcome:
    subject = dict(case["subject"])
    tool = str(case["tool"])
    provided = case.get("counters") or {}
    counter_values = {name: dict(provided.get(name, {"count": 0, "sum": 0})) for name in counters}
    env = policies.build_env(
        subject=subject,
        actor_id=case.get("actor") or None,
        tool=tool,
        args=case.get("args"),
        counters=counter_values,
        now=int(case.get("now", time.time())),
    )
    # with arguments: the invocation decision; without: what discovery decides (visibility)
    decision = policies.decide(tool, env) if "args" in case else policies.visibility(tool, env)
    obligations = list(decision.obligations)
    problems = []
    if expect["decision"] != decision.outcome:
        problems.append(f"decision {expect['decision']}, got {decision.outcome} ({decision.reason})")
    if "obligations" in expect and list(expect["obligations"]) != obligations:
        problems.append(f"obligations {list(expect['obligations'])}, got {obligations}")
    if "rule" in expect and expect["rule"] != decision.rule:
        problems.append(f"rule {expect['rule']}, got {decision.rule}")
    if "reason" in expect and str(expect["reason"]) not in decision.reason:
        problems.append(f"reason containing {expect['reason']!r}, got {decision.reason!r}")
    return Outcome(str(case["name"]), line, not problems, "; ".join(problems))


def main(fixture: str, config: str) -> int:
    try:
        policies, counters = compile_policies(Path(config))
        outcomes = run_fixtures(Path(fixture), policies, counters=counters)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    failed = [o for o in outcomes if not o.ok]
    for outcome in failed:
        print(f"{fixture}:{outcome.line}: {outcome.name}: expected {outcome.detail}")
    print(f"{len(outcomes) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
