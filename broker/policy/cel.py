"""CEL compile and evaluate wrappers for broker policy (CONTRACT §6), over ``common-expression-language``.

Compilation happens once, at config load: :func:`compile_expression` parses the source, refuses references to
any top-level variable outside :data:`VARIABLES` (``undeclared reference 'subjct'``) and records, from the source
text, which fields of ``subject``/``actor``/``args``/``counters`` the expression can read (:func:`referenced_fields`).
Evaluation never raises: :func:`evaluate` returns ``(value, None)`` or ``(None, error_kind)`` so the engine can
turn every error into a refusal (HOSTILE §0.4, Y01: fail closed). :func:`build_env` converts one request's
variables into a single reusable :class:`Env` (their meaning is documented in ``broker.policy.engine``).

Limits of the text analysis, all in the safe direction:
- Macro-bound names (``g`` in ``groups.exists(g, …)``) are found with a regex, because ``Program.variables()``
  lists them as if they were top-level. A bound-looking name inside a string literal can hide a typo from the
  load-time check; that typo still fails at run time, and failures deny.
- :func:`referenced_fields` scans the raw text, string literals included, so it can only over-report fields.
  Any use of the variable other than ``name.field`` (``name["f"]``, ``size(name)``, ``name.all(…)``, a comment
  between them, …) reports ``None``: "the whole value may be read".
- :attr:`Expression.needs` (what the environment must hold for it) counts a variable as read when the program
  references it *or* its name appears as a word anywhere in the text (strings and comments included). A CEL
  expression can name a variable only by an identifier token spelled exactly like it (there is no lookup by
  string, and identifiers are ASCII words), so a variable absent from ``needs`` cannot be read: :func:`build_env`
  leaves it out of the context.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cel

#: the only top-level variables a policy expression may reference (CONTRACT §6).
VARIABLES = frozenset({"subject", "actor", "tool", "args", "risk", "counters", "now"})
#: variables whose referenced fields are tracked (to trim what is converted into CEL, and to know which
#: counters to fetch from the state store).
TRACKED = ("subject", "actor", "args", "counters")
#: each declared variable as a whole word (what :attr:`Expression.needs` looks for in the source text).
_WORDS = {name: re.compile(rf"(?<![A-Za-z0-9_]){name}(?![A-Za-z0-9_])") for name in VARIABLES}

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
# Comprehension macros bind their first argument (cel-spec langdef "Macros"); two-variable forms bind two.
# Comments count as the whitespace they are (``// …`` to the end of the line). Possessive: a comment runs to the end
# of its line, as in CEL, never split — a run of ``//`` splits in exponentially many ways (a 55-byte expression took
# 0.5 s, each further ``// `` three times longer) before a failing match gives up.
_GAP = r"(?:\s|//[^\n]*+)*+"
_MACRO_BINDING = re.compile(
    rf"\.{_GAP}(?:all|exists|exists_one|existsOne|map|filter|transformList|transformMap){_GAP}\({_GAP}"
    rf"({_IDENT}){_GAP},(?:{_GAP}({_IDENT}){_GAP},)?"
)
# `.field` right after a variable, not followed by `(` (a method or macro call on the variable itself) nor by a
# comment, after which a `(` may follow on the next line: `args.size // why\n()` calls size() on all of args.
_SELECT = re.compile(rf"\s*\.\s*({_IDENT})(?![A-Za-z0-9_])(?!\s*(?:\(|//))")


class ExpressionError(ValueError):
    """The expression cannot be used; ``problems`` are short human messages (the caller adds the location)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Expression:
    """A compiled CEL expression and what it reads.

    ``variables``: the declared top-level variables it references. ``fields``: for each tracked variable it
    references, the field names it reads as ``var.field``, or ``None`` if it may read the whole value.
    ``needs``: what the evaluation environment must hold for it, a superset of ``variables`` (see the module
    docstring): every declared variable it may read, with ``fields`` for tracked ones (``None`` otherwise).
    """

    source: str
    program: cel.Program
    variables: frozenset[str]
    fields: Mapping[str, frozenset[str] | None]
    needs: Mapping[str, frozenset[str] | None]

    def reads(self, variable: str) -> bool:
        return variable in self.variables


def macro_bound(source: str) -> set[str]:
    """The names comprehension macros bind in ``source`` (``list.exists(x, …)``): the library's
    ``program.variables()`` reports them beside the real variables."""
    return {name for match in _MACRO_BINDING.finditer(source) for name in match.groups() if name}


def referenced_fields(source: str, variable: str) -> frozenset[str] | None:
    """Field names read as ``variable.NAME`` in ``source``; ``None`` if ``variable`` is used any other way.

    A superset by construction (see the module docstring): a word ``variable`` anywhere, even in a string or as
    a field of something else, either adds its ``.NAME`` or makes the answer ``None``.
    """
    fields: set[str] = set()
    for occurrence in re.finditer(rf"(?<![A-Za-z0-9_]){re.escape(variable)}(?![A-Za-z0-9_])", source):
        select = _SELECT.match(source, occurrence.end())
        if select is None:
            return None
        fields.add(select.group(1))
    return frozenset(fields)


def compile_expression(source: str) -> Expression:
    """Compile ``source``; raise :class:`ExpressionError` listing every problem found.

    Problems: a syntax error (the library's message, with its line:column and caret), and one
    ``undeclared reference 'NAME'`` per top-level name outside :data:`VARIABLES`.
    """
    try:
        program = cel.compile(source)
    except ValueError as exc:
        raise ExpressionError([f"invalid CEL: {exc}"]) from exc
    bound = macro_bound(source)
    referenced = set(program.variables())
    undeclared = sorted(referenced - VARIABLES - bound)
    if undeclared:
        raise ExpressionError([f"undeclared reference {name!r}" for name in undeclared])
    variables = frozenset(referenced & VARIABLES)
    fields = {name: referenced_fields(source, name) for name in TRACKED if name in variables}
    mentioned = variables | {name for name, word in _WORDS.items() if word.search(source)}
    needs = {name: referenced_fields(source, name) if name in TRACKED else None for name in mentioned}
    return Expression(source=source, program=program, variables=variables, fields=fields, needs=needs)


def evaluate(expression: Expression, context: cel.Context) -> tuple[Any, str | None]:
    """Run the program: ``(value, None)``, or ``(None, kind)`` when evaluation failed.

    ``kind`` is the exception's class name only (``KeyError``, ``TypeError``…): library messages can echo
    argument values, which must not reach the audit log beyond the configured audit fields (CONTRACT §9).
    """
    try:
        return expression.program.execute(context), None
    # Fail closed (HOSTILE Y01): the evaluator reports no-such-key, no-overload, overflow, division by zero,
    # undefined functions and regex errors through several exception classes; every one of them is a
    # failed evaluation, which the engine turns into a refusal. Nothing is swallowed.
    except Exception as exc:
        return None, type(exc).__name__


def to_json(value: Any) -> Any:
    """A CEL result as plain JSON-able Python (dict with str keys, list, str, int, float, bool, None).

    Raises ``ValueError`` for anything else (bytes, timestamps, durations, optionals, non-finite floats,
    non-string map keys): grant constraints are JSON, and guessing an encoding would be a silent choice.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("non-finite number")
        return value
    if isinstance(value, list | tuple):
        return [to_json(item) for item in value]
    if isinstance(value, dict):
        converted: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"map key of type {type(key).__name__}")
            converted[key] = to_json(item)
        return converted
    raise ValueError(f"value of type {type(value).__name__} is not JSON")


# --- the evaluation environment ---------------------------------------------------------------------------

#: every variable any rule may read (:attr:`Expression.needs`), with the fields it may read (``None``: the whole
#: value). A variable missing here is read by no rule: it is not converted into the context at all.
Needs = Mapping[str, frozenset[str] | None]


def _reads(needs: Needs | None, variable: str) -> bool:
    return needs is None or variable in needs


class Env:
    """The evaluation environment of one request: one ``cel.Context``, converted once and reused by every rule
    (building a context costs ~15 µs per claim-laden subject, running a compiled rule ~1 µs).

    Not shared across requests or threads. ``bind_tool`` re-points ``tool`` so one Env serves a whole
    discovery listing. ``cache`` belongs to the engine (visibility per policy set and tool, which does not
    depend on ``args``). ``error`` is set when the variables could not be converted: every decision fails.
    ``args_error`` is set when the arguments could not be (too large for evaluation, or not CEL values): the
    visibility gate, whose rules never read ``args`` (a load-time check), still decides; every decision denies.
    The ``bind_*`` methods leave out a variable ``needs`` says no rule reads, as :func:`build_env` does (each
    ``add_variable`` also makes the library rebuild its environment at the next evaluation, ~2.5 µs).
    """

    __slots__ = ("args_error", "cache", "context", "error", "needs", "tool")

    def __init__(
        self,
        context: cel.Context | None,
        tool: str,
        needs: Needs | None,
        error: str | None,
        args_error: str | None = None,
    ) -> None:
        self.context = context
        self.tool = tool
        self.needs = needs
        self.error = error
        self.args_error = args_error
        self.cache: dict[Any, Any] = {}

    def bind_tool(self, tool: str) -> None:
        if tool != self.tool and self.context is not None:
            if _reads(self.needs, "tool"):
                self.context.add_variable("tool", {"name": tool})
            self.tool = tool

    def bind_args(self, args: Mapping[str, Any]) -> None:
        """Set ``args`` after the visibility check: an invocation checks that its tool is visible *before* it
        reads its arguments (a hidden tool must answer like a missing one, not with a schema error), then
        decides with them — one Env, one context. The engine's visibility cache does not depend on ``args``."""
        if self.context is not None and _reads(self.needs, "args"):
            try:
                self.context.add_variable("args", bounded_args(_only(args, self.needs, "args")))
            except ValueError as exc:
                self.args_error = type(exc).__name__

    def bind_counters(self, counters: Mapping[str, Mapping[str, Any]]) -> None:
        """Replace ``counters``: a call that reserved its place decides on the counts it reserved against
        (``broker.gateway.pipeline`` stage 3). The cached visibility read the old ones, so it is dropped."""
        if self.context is not None and _reads(self.needs, "counters"):
            self.context.add_variable("counters", _counters(counters, self.needs))
            self.cache.clear()

    def bind_now(self, now: int) -> None:
        """Replace ``now``: an invocation decides at the time its body was complete, not when its headers came
        (``broker.gateway.pipeline`` stage 2). The cached visibility read the old one, so it is dropped."""
        if self.context is not None and _reads(self.needs, "now"):
            self.context.add_variable("now", int(now))
            self.cache.clear()

    def covers(self, needs: Needs) -> bool:
        """True if every variable and field ``needs`` may read was converted into this Env."""
        if self.needs is None or needs is self.needs:
            return True
        for name, theirs in needs.items():
            if name not in self.needs:
                return False
            mine = self.needs[name]
            if mine is not None and (theirs is None or not theirs <= mine):
                return False
        return True


def risk_score(claims: Mapping[str, Any]) -> int | float:
    """``risk_score`` claim: 0 when absent; 100 when present but not a finite number (fail closed)."""
    if "risk_score" not in claims:
        return 0
    score = claims["risk_score"]
    if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
        return 100
    return score


def actor_view(actor_id: str | None) -> dict[str, str]:
    """``{"id", "trust_domain", "path"}`` of a SPIFFE ID already validated by the identity stage."""
    if not actor_id:
        return {"id": "", "trust_domain": "", "path": ""}
    if actor_id.startswith("spiffe://"):
        trust_domain, slash, path = actor_id[len("spiffe://") :].partition("/")
        return {"id": actor_id, "trust_domain": trust_domain, "path": slash + path}
    return {"id": actor_id, "trust_domain": "", "path": ""}


#: HOSTILE Y07: CEL has no cost limit, and a comprehension nested in another over request data costs n**2 (about
#: 30 s for 10,000 items). Arguments the rules read are bounded before conversion: a longer list, or more values in
#: all, makes every decision of the request fail — a deny — instead of a stall of the event loop.
MAX_POLICY_LIST = 1000
MAX_POLICY_VALUES = 10_000


def bounded_args(args: dict[str, Any]) -> dict[str, Any]:
    """``args`` if it is small enough to evaluate rules over, else ValueError (the Env then denies)."""
    budget = MAX_POLICY_VALUES
    stack: list[Any] = list(args.values())
    while stack:
        value = stack.pop()
        budget -= 1
        if budget < 0:
            raise ValueError("arguments too large for policy evaluation")
        if isinstance(value, list):
            if len(value) > MAX_POLICY_LIST:
                raise ValueError("an argument list is too long for policy evaluation")
            stack.extend(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
    return args


def _only(value: Mapping[str, Any], needs: Needs | None, variable: str) -> dict[str, Any]:
    """The part of ``value`` the rules can read: all of it without ``needs``; nothing if no rule reads it."""
    fields = None if needs is None else needs.get(variable, frozenset())
    if fields is None:
        return dict(value)
    return {name: value[name] for name in fields if name in value}


def _counters(counters: Mapping[str, Mapping[str, Any]], needs: Needs | None) -> dict[str, dict[str, Any]]:
    """The counters the rules can read (``counters.<name>``), each as a fresh dict."""
    names = None if needs is None else needs.get("counters", frozenset())
    return {name: dict(value) for name, value in counters.items() if names is None or name in names}


def build_env(
    *,
    subject: Mapping[str, Any],
    actor_id: str | None,
    tool: str,
    args: Mapping[str, Any] | None,
    counters: Mapping[str, Mapping[str, Any]],
    now: int,
    needs: Needs | None = None,
) -> Env:
    """Prepare the variables once (see ``broker.policy.engine`` for their meaning).

    ``needs`` (``PolicySet.needs``) limits the conversion to the variables the rules can read, and of
    ``subject``/``actor``/``args``/``counters`` to the fields they can read: converting costs ~2–4 µs per map,
    string or key (a flat number ~0.5 µs) and dominates the cost of a decision, and trimming ``args`` keeps a
    large request body from being converted at all. A variable no rule reads is left out, not bound empty:
    no rule can reference it (:attr:`Expression.needs`). Without ``needs`` everything is converted. Prefer
    ``PolicySet.build_env``, which passes it. A value CEL cannot hold makes every decision in this Env fail.
    """
    variables: dict[str, Any] = {}
    if _reads(needs, "subject"):
        variables["subject"] = _only(subject, needs, "subject")
    if _reads(needs, "actor"):
        variables["actor"] = _only(actor_view(actor_id), needs, "actor")
    if _reads(needs, "tool"):
        variables["tool"] = {"name": tool}
    if _reads(needs, "risk"):
        variables["risk"] = {"score": risk_score(subject)}
    if _reads(needs, "counters"):
        variables["counters"] = _counters(counters, needs)
    if _reads(needs, "now"):
        variables["now"] = int(now)
    if _reads(needs, "args"):
        variables["args"] = {}
    try:
        env = Env(cel.Context(variables), tool, needs, None)
    except ValueError as exc:
        return Env(None, tool, needs, type(exc).__name__)
    # bound as the pipeline binds them: arguments policy cannot hold deny every decision, never hide the tool
    if args:
        env.bind_args(args)
    return env
