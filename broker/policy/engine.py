"""The policy decision point (CONTRACT §6, §8): CEL rules compiled at load, one decision path for discovery
and invocation, so that what ``/v1/tools`` shows is exactly what an invocation can reach.

Variables (present in every evaluation of a rule that may read them; one no rule of the set can read is left
out of the environment, see ``broker.policy.cel.Expression.needs``):
- ``subject``: the access token's claims (a map); ``actor``: ``{"id", "trust_domain", "path"}`` of the agent's
  SPIFFE ID (all ``""`` without one); ``tool``: ``{"name"}``; ``args``: the invocation's arguments (``{}`` at
  discovery); ``risk``: ``{"score"}`` = the ``risk_score`` claim, 0 when absent, **100 when present but not a
  finite number** (fail closed: an unreadable score is treated as the worst); ``counters``:
  ``{name: {"count", "sum"}}`` for the configured counters the tool's rules read; ``now``: int epoch seconds.

Rules apply to a tool when ``tools`` names it or contains ``"*"``. Load-time checks (all problems collected,
each located like ``("policies", 3, "when")``): CEL syntax, undeclared references, unknown tool or counter
names, ``counters`` read other than as ``counters.<name>``, and ``allow`` rules or constraints reading ``args``
(allow rules decide *who* may use a tool; discovery has no arguments).

Visibility (discovery, and the first half of every invocation): a tool is visible iff at least one applicable
``allow`` rule evaluates to exactly ``true`` and no applicable argument-free ``deny`` rule does. Any error or
non-bool result in one of those rules hides the tool. Rules reading ``args`` are not evaluated at discovery.

Decision (invocation): not visible → ``hidden`` (answered like a missing tool, 404). Then each applicable
``deny`` rule that reads ``args``, in config order: ``true`` → ``deny`` (first match wins); error or non-bool →
``deny`` ("policy evaluation failed in rule <id>"). Then every applicable ``obligate`` rule: ``true`` adds its
``requires``; an error denies likewise. A deny always beats obligations (CONTRACT §8). Otherwise ``allow`` with
the obligations in the stable order of :data:`OBLIGATION_ORDER`.

CEL ``&&``/``||`` absorb errors (cel-spec "Logical Operators"; HOSTILE §0.4): ``true || <error>`` is ``true`` and
``false && <error>`` is ``false``, so such a rule does *not* fail. Write ``a ? b : false`` where an error in
``b`` must propagate.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from broker.config.models import Obligation, Policy
from broker.policy.cel import (
    Env,
    Expression,
    ExpressionError,
    Needs,
    build_env,
    compile_expression,
    evaluate,
    to_json,
)

__all__ = [
    "OBLIGATION_ORDER",
    "Decision",
    "Env",
    "PolicyCompileError",
    "PolicyError",
    "PolicySet",
    "build_env",
]

#: the order obligations are reported and satisfied in (cheapest first).
OBLIGATION_ORDER: tuple[Obligation, ...] = ("mfa", "manager_approval", "dual_approval", "security_review")
Location = tuple[str | int, ...]

_ALLOW_READS_ARGS = "allow rules decide who may use a tool; put argument conditions in deny or obligate rules"
_CONSTRAINT_READS_ARGS = (
    "constraints are evaluated at discovery, where there are no arguments: they must not read args"
)
_NOT_PERMITTED = "not permitted"
_UNKNOWN = "unknown tool"


class PolicyCompileError(ValueError):
    """The policy set cannot be loaded; ``problems`` = every ``(location, message)`` found."""

    def __init__(self, problems: list[tuple[Location, str]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))
        self.problems = problems


class PolicyError(Exception):
    """A grant could not be described (a constraint failed): the caller hides the tool."""


@dataclass(frozen=True, slots=True)
class Decision:
    """One policy decision. ``reason`` is precise, for audit; ``message`` is what the client may be told (a
    rule's ``reason`` text or a generic phrase, never CEL or other rules). ``error`` is the failing rule's
    error class for audit, if any. ``obligation_reasons`` is aligned with ``obligation_rules``."""

    outcome: Literal["allow", "deny", "hidden"]
    rule: str | None
    reason: str
    message: str
    obligations: tuple[Obligation, ...] = ()
    obligation_rules: tuple[str, ...] = ()
    obligation_reasons: tuple[str, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Rule:
    id: str
    effect: Literal["allow", "deny", "obligate"]
    tools: frozenset[str] | None  # None: "*"
    when: Expression
    reason: str
    requires: tuple[Obligation, ...]
    constraints: tuple[tuple[str, Expression], ...]
    counters: frozenset[str]

    def applies_to(self, tool: str) -> bool:
        return self.tools is None or tool in self.tools


@dataclass(frozen=True, slots=True)
class _ToolRules:
    gate: tuple[_Rule, ...]  # allow + argument-free deny rules, config order
    deny: tuple[_Rule, ...]  # deny rules that read args
    obligate: tuple[_Rule, ...]
    counters: frozenset[str]


@dataclass(frozen=True, slots=True)
class Outline:
    """:meth:`PolicySet.outline`: ``visibility`` (the discovery decision); ``refused`` when every call is denied
    whatever the unknown variables (a rule that reads none of them denies or fails); else the obligations of
    the rules that fired, and the ``conditional`` rules (deny or obligate, config order) that read an unknown
    variable. ``visibility_conditions``: allow / argument-free deny rules that read an unknown variable (their
    value in the review's Env decided visibility)."""

    visibility: Decision
    refused: Decision | None = None
    obligations: tuple[Obligation, ...] = ()
    obligation_rules: tuple[str, ...] = ()
    conditional: tuple[_Rule, ...] = ()
    visibility_conditions: tuple[_Rule, ...] = ()


@dataclass(frozen=True, slots=True)
class _Gate:
    decision: Decision
    matched: tuple[_Rule, ...]  # allow rules that evaluated true


# A hidden tool is answered exactly like a missing one (404 unknown_tool): its message says nothing more.
def _failed(rule: _Rule, error: str, outcome: Literal["deny", "hidden"]) -> Decision:
    message = _UNKNOWN if outcome == "hidden" else _NOT_PERMITTED
    return Decision(outcome, rule.id, f"policy evaluation failed in rule {rule.id}", message, error=error)


def _refused(rule: _Rule, outcome: Literal["deny", "hidden"]) -> Decision:
    message = _UNKNOWN if outcome == "hidden" else rule.reason or _NOT_PERMITTED
    return Decision(outcome, rule.id, f"{rule.id}: {rule.reason or 'denied'}", message)


def _check(rule: _Rule, env: Env) -> tuple[bool, str | None]:
    """(result, error): a non-bool result is an error, like a failed evaluation."""
    assert env.context is not None
    value, error = evaluate(rule.when, env.context)
    if error is None and not isinstance(value, bool):
        error = f"non-bool result ({type(value).__name__})"
    return value is True, error


class PolicySet:
    """A compiled, immutable policy set. Build with :meth:`compile`."""

    def __init__(self, rules: tuple[_Rule, ...], tools: Collection[str]) -> None:
        self._rules = rules
        self._by_tool = {tool: self._index(tool) for tool in tools}
        needs: dict[str, frozenset[str] | None] = {}
        for rule in rules:
            for expr in (rule.when, *(e for _, e in rule.constraints)):
                for name, fields in expr.needs.items():
                    have = needs.get(name, frozenset())
                    needs[name] = None if have is None or fields is None else have | fields
        #: every variable any rule may read, with the fields of subject/actor/args/counters it may read (None:
        #: all of it); a variable missing here is not converted into the environment (``build_env``).
        self.needs: Needs = needs

    @property
    def rule_ids(self) -> tuple[str, ...]:
        return tuple(rule.id for rule in self._rules)

    @classmethod
    def compile(
        cls,
        policies: Sequence[Policy],
        *,
        tools: Collection[str],
        counters: Collection[str],
        section: str = "policies",
    ) -> PolicySet:
        """Compile every rule; raise :class:`PolicyCompileError` with *all* problems, each located as
        ``(section, index, field[, key])``."""
        problems: list[tuple[Location, str]] = []
        rules: list[_Rule] = []
        seen: set[str] = set()
        for index, policy in enumerate(policies):
            where: Location = (section, index)
            if policy.id in seen:
                problems.append(((*where, "id"), f"duplicate policy id {policy.id!r}"))
            seen.add(policy.id)
            for position, name in enumerate(policy.tools):
                if name != "*" and name not in tools:
                    problems.append(((*where, "tools", position), f"unknown tool {name!r}"))
            when = _compile_one(policy.when, (*where, "when"), counters, problems)
            if when is not None and policy.effect == "allow" and when.reads("args"):
                problems.append(((*where, "when"), _ALLOW_READS_ARGS))
            constraints: list[tuple[str, Expression]] = []
            for key, source in policy.constraints.items():
                expr = _compile_one(source, (*where, "constraints", key), counters, problems)
                if expr is not None and expr.reads("args"):
                    problems.append(((*where, "constraints", key), _CONSTRAINT_READS_ARGS))
                if expr is not None:
                    constraints.append((key, expr))
            if when is None:
                continue
            used: set[str] = set()
            for expr in (when, *(c for _, c in constraints)):
                used.update(expr.fields.get("counters") or ())
            rules.append(
                _Rule(
                    id=policy.id,
                    effect=policy.effect,
                    tools=None if "*" in policy.tools else frozenset(policy.tools),
                    when=when,
                    reason=policy.reason,
                    requires=tuple(policy.requires),
                    constraints=tuple(constraints),
                    counters=frozenset(used),
                )
            )
        if problems:
            raise PolicyCompileError(problems)
        return cls(tuple(rules), tools)

    def _index(self, tool: str) -> _ToolRules:
        rules = [rule for rule in self._rules if rule.applies_to(tool)]
        return _ToolRules(
            gate=tuple(
                r for r in rules if r.effect == "allow" or (r.effect == "deny" and not r.when.reads("args"))
            ),
            deny=tuple(r for r in rules if r.effect == "deny" and r.when.reads("args")),
            obligate=tuple(r for r in rules if r.effect == "obligate"),
            counters=frozenset(name for r in rules for name in r.counters),
        )

    def _rules_for(self, tool: str) -> _ToolRules:
        found = self._by_tool.get(tool)
        return found if found is not None else self._index(tool)

    def counters_needed(self, tool: str) -> frozenset[str]:
        """Counter names the tool's rules read (found as ``counters.<name>`` in their source; any other use of
        ``counters`` is a compile error, so this is complete): fetch only these from the state store, at
        discovery too (allow and argument-free deny rules may read counters). A missing one fails closed."""
        return self._rules_for(tool).counters

    def build_env(
        self,
        *,
        subject: Mapping[str, Any],
        actor_id: str | None,
        tool: str,
        args: Mapping[str, Any] | None,
        counters: Mapping[str, Mapping[str, Any]],
        now: int,
    ) -> Env:
        """:func:`build_env` converting only the fields this set's rules can read."""
        return build_env(
            subject=subject,
            actor_id=actor_id,
            tool=tool,
            args=args,
            counters=counters,
            now=now,
            needs=self.needs,
        )

    def _gate(self, tool: str, env: Env) -> _Gate:
        if not env.covers(self.needs):
            raise ValueError("this Env was built for another policy set: use PolicySet.build_env")
        cached: _Gate | None = env.cache.get((self, tool))
        if cached is not None:
            return cached
        gate = self._evaluate_gate(tool, env)
        env.cache[(self, tool)] = gate
        return gate

    def _evaluate_gate(self, tool: str, env: Env) -> _Gate:
        if env.error is not None:
            return _Gate(
                Decision("hidden", None, "policy environment invalid", _UNKNOWN, error=env.error), ()
            )
        env.bind_tool(tool)
        matched: list[_Rule] = []
        for rule in self._rules_for(tool).gate:
            result, error = _check(rule, env)
            if error is not None:
                return _Gate(_failed(rule, error, "hidden"), ())
            if result and rule.effect == "deny":
                return _Gate(_refused(rule, "hidden"), ())
            if result:
                matched.append(rule)
        if not matched:
            return _Gate(Decision("hidden", None, "no allow rule matched", _UNKNOWN), ())
        first = matched[0].id
        return _Gate(Decision("allow", first, f"allowed by {first}", ""), tuple(matched))

    def visibility(self, tool: str, env: Env) -> Decision:
        """The discovery decision: ``allow`` (``rule`` = first matching allow rule) or ``hidden`` with a reason."""
        return self._gate(tool, env).decision

    def visible(self, tool: str, env: Env) -> bool:
        return self._gate(tool, env).decision.outcome == "allow"

    def decide(self, tool: str, env: Env) -> Decision:
        """The invocation decision (``env`` built with the call's arguments; without them every rule that
        reads ``args`` fails, and denies); see the module docstring."""
        gate = self._gate(tool, env).decision
        if gate.outcome != "allow":
            return gate
        if (
            env.args_error is not None
        ):  # the arguments could not be bound (too large for evaluation, not CEL values)
            return Decision(
                "deny",
                None,
                f"policy environment invalid ({env.args_error})",
                "the arguments cannot be evaluated against policy",
                error=env.args_error,
            )
        env.bind_tool(tool)
        rules = self._rules_for(tool)
        for rule in rules.deny:
            result, error = _check(rule, env)
            if error is not None:
                return _failed(rule, error, "deny")
            if result:
                return _refused(rule, "deny")
        required: set[Obligation] = set()
        fired: list[_Rule] = []
        for rule in rules.obligate:
            result, error = _check(rule, env)
            if error is not None:
                return _failed(rule, error, "deny")
            if result:
                required.update(rule.requires)
                fired.append(rule)
        return Decision(
            "allow",
            gate.rule,
            gate.reason,
            "",
            obligations=tuple(o for o in OBLIGATION_ORDER if o in required),
            obligation_rules=tuple(r.id for r in fired),
            obligation_reasons=tuple(r.reason or f"policy requires {', '.join(r.requires)}" for r in fired),
        )

    def outline(self, tool: str, env: Env, *, unknown: frozenset[str]) -> Outline:
        """What :meth:`decide` would do for any call of ``tool`` in ``env`` whose variables in ``unknown`` (e.g.
        ``args``, ``counters``: per call, not per principal) are not known — an access review. Visibility as
        discovery decides it; the ``deny`` and ``obligate`` rules reading an unknown variable are returned
        unevaluated (``conditional``), the others evaluated exactly as :meth:`decide` does, in its order."""
        gate = self._gate(tool, env)
        rules = self._rules_for(tool)
        unsure = tuple(r for r in rules.gate if r.when.variables & unknown)
        if gate.decision.outcome != "allow":
            return Outline(gate.decision, visibility_conditions=unsure)
        assert env.context is not None
        env.bind_tool(tool)
        conditional: list[_Rule] = []
        required: set[Obligation] = set()
        fired: list[_Rule] = []
        for rule in (*rules.deny, *rules.obligate):
            if rule.when.variables & unknown:
                conditional.append(rule)
                continue
            result, error = _check(rule, env)
            if error is not None or (result and rule.effect == "deny"):
                refused = _failed(rule, error, "deny") if error is not None else _refused(rule, "deny")
                return Outline(gate.decision, refused, visibility_conditions=unsure)
            if result:
                required.update(rule.requires)
                fired.append(rule)
        return Outline(
            gate.decision,
            obligations=tuple(o for o in OBLIGATION_ORDER if o in required),
            obligation_rules=tuple(r.id for r in fired),
            conditional=tuple(conditional),
            visibility_conditions=unsure,
        )

    def grant_constraints(self, tool: str, env: Env) -> dict[str, Any]:
        """The constraints of the allow rules that matched, as JSON values; on a name given by several
        matching rules the first in config order wins. Raises :class:`PolicyError` if the tool is not visible
        or a constraint fails to evaluate or is not JSON (fail closed: the caller hides the tool)."""
        gate = self._gate(tool, env)
        if gate.decision.outcome != "allow":
            raise PolicyError(f"tool not visible: {gate.decision.reason}")
        assert env.context is not None
        env.bind_tool(tool)
        constraints: dict[str, Any] = {}
        for rule in gate.matched:
            for name, expr in rule.constraints:
                if name in constraints:
                    continue
                value, error = evaluate(expr, env.context)
                if error is not None:
                    raise PolicyError(f"constraint {name!r} of rule {rule.id} failed: {error}")
                try:
                    constraints[name] = to_json(value)
                except ValueError as exc:
                    raise PolicyError(f"constraint {name!r} of rule {rule.id}: {exc}") from exc
        return constraints


def _compile_one(
    source: str, where: Location, counters: Collection[str], problems: list[tuple[Location, str]]
) -> Expression | None:
    try:
        expr = compile_expression(source)
    except ExpressionError as exc:
        problems.extend((where, message) for message in exc.problems)
        return None
    if "counters" in expr.fields:
        names = expr.fields["counters"]
        if names is None:
            problems.append((where, "read counters as counters.<name>"))
            return None
        for name in sorted(names - set(counters)):
            problems.append((where, f"unknown counter {name!r}"))
    return expr
