"""Access review (CONTRACT §15): for each listed principal and each agent acting for it, which tools the active
policies let it see and call, under which obligations and conditions — decided by the policy engine itself
(:meth:`PolicySet.outline`), never by a second reading of the rules.

A principals file is YAML, a list of humans::

    - sub: alice                                   # required: the token's subject
      claims: {groups: [finance-managers], department: "42", approval_limit: 20000}   # the token's other claims
      agents:                                      # SPIFFE IDs acting for them; null = the human, directly
        - spiffe://example.org/agents/expense-assistant
        - spiffe://example.org/agents/travel-bot

``agents`` absent means the human calling directly (no agent). ``${VAR}`` is not expanded (``$$`` is a ``$``).

What is known and what is not: the claims are taken as given (``acr: mfa`` in them means the session has done
MFA; ``risk_score`` the session's risk). A rule reading something a principal does not fix — ``args`` (each
call's arguments), ``counters`` (the usage history), ``risk`` when the claims carry no ``risk_score`` — is not
evaluated: it is listed with its rule id and expression (``deny_when``, ``obligations_when``). Counters are zero
where visibility reads them (a fresh window); ``now`` is the review's time.

``callable``: ``no`` (hidden, or every call denied: a rule that reads nothing unknown denies or fails),
``conditional`` (some calls denied: a deny rule reads the arguments or counters, see ``deny_when``), ``yes``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

from broker.config.loader import ConfigError, ConfigProblem, parse_yaml
from broker.config.models import Config
from broker.errors import BrokerError
from broker.identity.spiffe import parse_spiffe_id
from broker.policy.engine import Decision, Outline, PolicyError, PolicySet

__all__ = [
    "PRINCIPAL_KEYS",
    "Change",
    "Condition",
    "PrincipalSpec",
    "ReviewRow",
    "diff_reviews",
    "load_principals",
    "parse_principals",
    "review",
    "tool_transports",
]

PRINCIPAL_KEYS: Final = frozenset({"sub", "claims", "agents"})
#: per-call facts no principal fixes (``risk`` joins them when the claims carry no ``risk_score``)
PER_CALL: Final = frozenset({"args", "counters"})
Callable_ = Literal["yes", "conditional", "no"]


@dataclass(frozen=True)
class PrincipalSpec:
    sub: str
    claims: Mapping[str, Any]
    #: SPIFFE IDs acting for this human; ``None`` = the human calling directly
    agents: tuple[str | None, ...]


@dataclass(frozen=True)
class Condition:
    """A rule the review could not evaluate for lack of per-call facts: shown as written."""

    rule: str
    when: str
    requires: tuple[str, ...] = ()
    reason: str = ""

    def text(self) -> str:
        needs = f" requires {'+'.join(self.requires)}" if self.requires else ""
        return f"{self.rule}: {self.when}{needs}"


@dataclass(frozen=True)
class ReviewRow:
    subject: str
    agent: str | None
    tool: str
    #: where the tool is reachable: ``v1`` and/or ``mcp:<server>``
    transports: tuple[str, ...]
    visible: bool
    callable: Callable_
    #: the deciding rule (the allow rule that made it visible) or why not
    rule: str | None
    reason: str
    obligations: tuple[str, ...] = ()
    obligation_rules: tuple[str, ...] = ()
    obligations_when: tuple[Condition, ...] = ()
    deny_when: tuple[Condition, ...] = ()
    #: the grant's constraints (CONTRACT §6), as JSON values
    constraints: Mapping[str, Any] = field(default_factory=dict)
    #: rules deciding visibility that read per-call facts (evaluated with counters at zero)
    visibility_when: tuple[Condition, ...] = ()

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.subject, self.agent or "", self.tool)

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "agent": self.agent,
            "tool": self.tool,
            "transports": list(self.transports),
            "visible": self.visible,
            "callable": self.callable,
            "rule": self.rule,
            "reason": self.reason,
            "obligations": list(self.obligations),
            "obligation_rules": list(self.obligation_rules),
            "obligations_when": [_condition_json(c) for c in self.obligations_when],
            "deny_when": [_condition_json(c) for c in self.deny_when],
            "constraints": dict(self.constraints),
            "visibility_when": [_condition_json(c) for c in self.visibility_when],
        }


def _condition_json(condition: Condition) -> dict[str, Any]:
    out: dict[str, Any] = {"rule": condition.rule, "when": condition.when}
    if condition.requires:
        out["requires"] = list(condition.requires)
    if condition.reason:
        out["reason"] = condition.reason
    return out


# --- the principals file ----------------------------------------------------------------------------------------


def parse_principals(text: str, *, file: str) -> list[PrincipalSpec]:
    """The principals of a YAML document; :class:`ConfigError` listing every problem as ``FILE:LINE``."""
    try:
        data, lines = parse_yaml(text, file=file, environ={})
    except RecursionError:  # a recursive alias (&a [*a]): the shared loader does not refuse it itself
        raise ConfigError([ConfigProblem(file, 1, "YAML: recursive alias")]) from None
    if not isinstance(data, list) or not data:
        raise ConfigError(
            [ConfigProblem(file, 1, "a principals file is a non-empty YAML list of principals")]
        )
    problems: list[ConfigProblem] = []
    found: list[PrincipalSpec] = []
    seen: set[str] = set()
    for index, entry in enumerate(data):

        def problem(message: str, *where: str | int, index: int = index) -> None:
            line = lines.get((index, *where)) or lines.get((index,), 1)
            problems.append(
                ConfigProblem(
                    file,
                    line,
                    f"[{index}]{''.join(f'[{w}]' if isinstance(w, int) else f'.{w}' for w in where)}: {message}",
                )
            )

        if not isinstance(entry, dict):
            problem("a principal is a mapping with sub, claims, agents")
            continue
        unknown = sorted(set(entry) - PRINCIPAL_KEYS)
        if unknown:
            problem(f"unknown key {unknown[0]!r} (keys: sub, claims, agents)")
        sub, claims, agents = entry.get("sub"), entry.get("claims", {}), entry.get("agents", [None])
        if not isinstance(sub, str) or not sub:
            problem("sub must be a non-empty string", "sub")
            continue
        if sub in seen:
            problem(f"principal {sub!r} is listed twice", "sub")
        seen.add(sub)
        if not isinstance(claims, dict) or not all(isinstance(k, str) for k in claims):
            problem("claims must be a mapping of claim names to values", "claims")
            continue
        if "sub" in claims and claims["sub"] != sub:
            problem("claims.sub differs from sub", "claims")
        if not isinstance(agents, list) or not agents:
            problem("agents must be a non-empty list of SPIFFE IDs (null: the human directly)", "agents")
            continue
        checked: list[str | None] = []
        for position, agent in enumerate(agents):
            if agent is None:
                checked.append(None)
                continue
            try:
                checked.append(str(parse_spiffe_id(str(agent))))
            except (BrokerError, ValueError) as exc:  # the identity stage's own parser: InvalidClient
                problem(str(exc), "agents", position)
        found.append(PrincipalSpec(sub, {**claims, "sub": sub}, tuple(checked)))
    if problems:
        raise ConfigError(problems)
    return found


def load_principals(path: Path) -> list[PrincipalSpec]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([ConfigProblem(str(path), 0, f"cannot read principals file: {exc}")]) from None
    return parse_principals(text, file=str(path))


# --- the review (pure) ------------------------------------------------------------------------------------------


def tool_transports(config: Config) -> dict[str, tuple[str, ...]]:
    """Every tool name the policies govern, with where it is reachable (``v1``, ``mcp:<server>``), in config
    order."""
    found: dict[str, list[str]] = {}
    for tool in config.tools:
        found.setdefault(tool.name, []).append("v1")
    for server in config.mcp_servers:
        for entry in server.tools:
            found.setdefault(entry.name, []).append(f"mcp:{server.name}")
    return {name: tuple(places) for name, places in found.items()}


def _conditions(rules: Iterable[Any]) -> tuple[Condition, ...]:
    return tuple(Condition(r.id, r.when.source.strip(), tuple(r.requires), r.reason) for r in rules)


def _row(
    principal: PrincipalSpec,
    agent: str | None,
    tool: str,
    transports: tuple[str, ...],
    outline: Outline,
    constraints: Mapping[str, Any],
) -> ReviewRow:
    visibility = outline.visibility
    hidden = ReviewRow(
        subject=principal.sub,
        agent=agent,
        tool=tool,
        transports=transports,
        visible=False,
        callable="no",
        rule=visibility.rule,
        reason=visibility.reason,
        visibility_when=_conditions(outline.visibility_conditions),
    )
    if visibility.outcome != "allow":
        return hidden
    refused = outline.refused
    if refused is not None:
        return replace(
            hidden, visible=True, rule=refused.rule, reason=refused.reason, constraints=constraints
        )
    denies = _conditions(r for r in outline.conditional if r.effect == "deny")
    return replace(
        hidden,
        visible=True,
        callable="conditional" if denies else "yes",
        obligations=tuple(outline.obligations),
        obligation_rules=outline.obligation_rules,
        obligations_when=_conditions(r for r in outline.conditional if r.effect == "obligate"),
        deny_when=denies,
        constraints=constraints,
    )


def review(
    policies: PolicySet,
    tools: Mapping[str, tuple[str, ...]],
    counters: Sequence[str],
    principals: Sequence[PrincipalSpec],
    *,
    now: int,
) -> list[ReviewRow]:
    """One row per (principal, agent, tool), in the order given."""
    zero = {name: {"count": 0, "sum": 0} for name in counters}
    rows: list[ReviewRow] = []
    for principal in principals:
        unknown = PER_CALL if "risk_score" in principal.claims else PER_CALL | {"risk"}
        for agent in principal.agents:
            env = policies.build_env(
                subject=principal.claims, actor_id=agent, tool="", args=None, counters=zero, now=now
            )
            for tool, transports in tools.items():
                outline = policies.outline(tool, env, unknown=unknown)
                constraints: Mapping[str, Any] = {}
                if outline.visibility.outcome == "allow":
                    try:
                        constraints = policies.grant_constraints(tool, env)
                    except PolicyError as exc:  # discovery hides such a tool: so does the review
                        outline = Outline(Decision("hidden", None, str(exc), ""))
                rows.append(_row(principal, agent, tool, transports, outline, constraints))
    return rows


# --- two configs compared ---------------------------------------------------------------------------------------

_CALLABLE_RANK = {"no": 0, "conditional": 1, "yes": 2}


@dataclass(frozen=True)
class Change:
    """One difference for one (subject, agent, tool): ``effect`` is ``gains`` (more access or fewer
    obligations), ``loses`` (the reverse) or ``changes`` (a constraint or condition reads differently)."""

    subject: str
    agent: str | None
    tool: str
    aspect: str
    before: str
    after: str
    effect: Literal["gains", "loses", "changes"]

    def to_json(self) -> dict[str, Any]:
        return {
            "subject": self.subject,
            "agent": self.agent,
            "tool": self.tool,
            "aspect": self.aspect,
            "before": self.before,
            "after": self.after,
            "effect": self.effect,
        }


def _absent(key: tuple[str, str, str]) -> ReviewRow:
    subject, agent, tool = key
    return ReviewRow(subject, agent or None, tool, (), False, "no", None, "tool not in this config")


def diff_reviews(before: Sequence[ReviewRow], after: Sequence[ReviewRow]) -> list[Change]:
    """What each (principal, agent) gains or loses per tool going from ``before`` to ``after``."""
    old = {row.key: row for row in before}
    new = {row.key: row for row in after}
    keys = list(old) + [k for k in new if k not in old]
    changes: list[Change] = []
    for key in keys:
        a, b = old.get(key) or _absent(key), new.get(key) or _absent(key)

        def add(aspect: str, was: str, now: str, effect: Literal["gains", "loses", "changes"]) -> None:
            changes.append(Change(key[0], key[1] or None, key[2], aspect, was, now, effect))  # noqa: B023

        if a.visible != b.visible:
            add("visible", _yes(a.visible), _yes(b.visible), "gains" if b.visible else "loses")
        if a.callable != b.callable:
            up = _CALLABLE_RANK[b.callable] > _CALLABLE_RANK[a.callable]
            add("callable", a.callable, b.callable, "gains" if up else "loses")
        if not (a.visible and b.visible):
            continue  # obligations and conditions of a tool one side hides say nothing more
        for obligation in sorted(set(a.obligations) - set(b.obligations)):
            add("obligation", obligation, "", "gains")
        for obligation in sorted(set(b.obligations) - set(a.obligations)):
            add("obligation", "", obligation, "loses")
        for aspect, was, now in (
            ("deny_when", a.deny_when, b.deny_when),
            ("obligations_when", a.obligations_when, b.obligations_when),
        ):
            was_by, now_by = {c.rule: c for c in was}, {c.rule: c for c in now}
            for rule in [*was_by, *(r for r in now_by if r not in was_by)]:
                left, right = was_by.get(rule), now_by.get(rule)
                if left == right:
                    continue
                effect: Literal["gains", "loses", "changes"] = (
                    "loses" if left is None else "gains" if right is None else "changes"
                )
                add(aspect, left.text() if left else "", right.text() if right else "", effect)
        for name in sorted(set(a.constraints) | set(b.constraints)):
            if a.constraints.get(name) != b.constraints.get(name):
                add(
                    f"constraint {name}",
                    _json_text(a.constraints.get(name)),
                    _json_text(b.constraints.get(name)),
                    "changes",
                )
    return changes


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _json_text(value: Any) -> str:
    return "" if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))
