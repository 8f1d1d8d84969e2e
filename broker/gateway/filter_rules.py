"""The compiled parts of a tool's filters, shared by injection (:mod:`broker.gateway.filters`) and response
filtering (:mod:`broker.gateway.responses`): CEL programs and what they read, mask and row rules, and the errors
a filter answers with."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import cel

from broker.canonical import I_JSON_MAX_INT
from broker.errors import AccessDenied
from broker.policy.cel import macro_bound, referenced_fields
from broker.policy.paths import CompiledPath

INJECT_VARIABLES: Final = frozenset({"subject", "actor"})
ROW_VARIABLES: Final = frozenset({"row", "subject", "actor"})


# ---------------------------------------------------------------------------------------------------------
# CEL


def compile_cel(source: str, allowed: frozenset[str]) -> tuple[cel.Program | None, str | None]:
    try:
        program = cel.compile(source)
    except ValueError as exc:  # the binding's compile error; keep its "ERROR: <input>:L:C: …" lines
        lines = [line for line in str(exc).splitlines() if line.startswith("ERROR:")]
        return None, "CEL: " + ("; ".join(lines) if lines else str(exc).splitlines()[0])
    undeclared = sorted(set(program.variables()) - allowed - macro_bound(source))
    if undeclared:
        names = ", ".join(repr(name) for name in undeclared)
        return None, f"undeclared reference {names} (declared: {', '.join(sorted(allowed))})"
    return program, None


def _actor_value(actor_id: str | None) -> dict[str, str] | None:
    """``actor`` as CEL sees it: ``{"id", "trust_domain", "path"}`` of the SPIFFE ID, as in policy
    (``broker.policy.cel.actor_view``) — but null without an actor, so that ``actor.id`` fails (closed) rather than
    injecting an empty string."""
    if actor_id is None:
        return None
    _, _, rest = actor_id.partition("://")
    trust_domain, slash, path = rest.partition("/")
    return {"id": actor_id, "trust_domain": trust_domain, "path": slash + path}


@dataclass(frozen=True, slots=True)
class Reads:
    """What a group of expressions reads of the per-request variables: only that is converted into CEL."""

    subject: bool
    subject_fields: frozenset[str] | None  # None: the whole subject
    actor: bool

    @classmethod
    def of(cls, expressions: list[tuple[str, cel.Program]]) -> Reads:
        """Converting a map costs ~2 µs per member, evaluating ~0.4 µs: ``subject`` is pruned to the claims
        the expressions select as ``subject.name`` (:func:`broker.policy.cel.referenced_fields`; any other use
        means the whole subject). A pruned map answers every ``subject.name`` and ``has()`` exactly as the full
        one."""
        variables: set[str] = set()
        fields: set[str] | None = set()
        for source, program in expressions:
            variables.update(program.variables())
            selected = referenced_fields(source, "subject")
            fields = None if fields is None or selected is None else fields | selected
        return cls(
            "subject" in variables, None if fields is None else frozenset(fields), "actor" in variables
        )

    def context(self, subject: Mapping[str, Any], actor_id: str | None) -> cel.Context:
        """One context per request (a new one costs ~0.2 µs; converting a full claim set ~15 µs). Raises
        whatever the binding raises for an unconvertible value: the callers fail closed."""
        context = cel.Context()
        if self.subject:
            fields = self.subject_fields
            value = (
                dict(subject)
                if fields is None
                else {name: subject[name] for name in fields if name in subject}
            )
            context.add_variable("subject", value)
        if self.actor:
            context.add_variable("actor", _actor_value(actor_id))
        return context


def is_json(value: Any) -> bool:
    """A JSON value the forwarded body and its RFC 8785 digest can carry exactly (CEL strings are Rust strings:
    no lone surrogates)."""
    kind = type(value)
    if kind is str or kind is bool or value is None:
        return True
    if kind is int:
        return bool(-I_JSON_MAX_INT <= value <= I_JSON_MAX_INT)
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(is_json(item) for item in value)
    if kind is dict:
        return all(type(key) is str and is_json(item) for key, item in value.items())
    return False  # bytes, timestamps, durations, optionals, …


# ---------------------------------------------------------------------------------------------------------
# compiled filters


@dataclass(frozen=True, slots=True)
class MaskRule:
    path: CompiledPath
    keep_last: int
    #: ``path`` up to its last name (``invoices.ssns`` of ``invoices.ssns[]``): the member the mask names
    member: CompiledPath
    #: the ``[]`` steps after that name, walked from the member to the masked places
    trailing: CompiledPath


@dataclass(frozen=True, slots=True)
class RowRule:
    path: CompiledPath
    keep: cel.Program
    #: the row keys ``keep`` selects as ``row.name`` (None: the whole row). Rows are pruned to them before
    #: conversion, which halves the cost of a 50-row answer; ``!has(row.flag)`` still sees ``flag``.
    fields: frozenset[str] | None
    #: the same, folded: an object anywhere else that holds one of these keys is a row too (module docstring)
    folded_fields: frozenset[str] | None
    #: ``keep`` decided without CEL where it can be (:class:`RowEquality`); None: always by CEL
    equality: RowEquality | None = None


# The predicate almost every row filter is (a tenant, department or owner column against the caller's claim),
# with the CEL whitespace set only: a comment, a literal, a macro or any other operator is not this shape.
_CEL_SPACE = r"[ \t\n\r\f]*"
_OPERAND = r"(row|subject)\.([A-Za-z_][A-Za-z0-9_]*)"
_EQUALITY = re.compile(rf"{_CEL_SPACE}{_OPERAND}{_CEL_SPACE}(==|!=){_CEL_SPACE}{_OPERAND}{_CEL_SPACE}")


@dataclass(frozen=True, slots=True)
class RowEquality:
    """``row.a == subject.b`` (each side ``row.NAME`` or ``subject.NAME``; ``==`` or ``!=``) decided in Python.

    Converting each row into CEL costs ~5 µs, the comparison itself nothing. :meth:`decide` answers only where
    CEL's answer is certain — both members present and ASCII strings, whose CEL equality is code-point equality
    — and None for everything else (a missing member, a number, a lone surrogate, a row that is not an object),
    which the caller hands to CEL unchanged. Equivalence with CEL is a property test
    (tests/unit/test_row_equality.py)."""

    left_row: bool
    left: str
    right_row: bool
    right: str
    equal: bool

    @classmethod
    def of(cls, source: str) -> RowEquality | None:
        match = _EQUALITY.fullmatch(source)
        if match is None:
            return None
        left_var, left, operator, right_var, right = match.groups()
        if left_var != "row" and right_var != "row":
            return None  # no row member: constant over the rows, CEL's (and rare)
        if referenced_fields(source, "row") is None:
            # ``row.row``: the row is converted into CEL whole (not pruned to the members compared), and CEL could
            # fail on a member the comparison never reads — not certain, so CEL's
            return None
        return cls(left_var == "row", left, right_var == "row", right, operator == "==")

    def decide(self, row: Any, subject: Mapping[str, Any]) -> bool | None:
        if type(row) is not dict:
            return None
        a = (row if self.left_row else subject).get(self.left)
        b = (row if self.right_row else subject).get(self.right)
        if type(a) is not str or type(b) is not str or not a.isascii() or not b.isascii():
            return None
        return (a == b) is self.equal


def inject_failed(name: str) -> AccessDenied:
    return AccessDenied("required server-side argument could not be computed", reason=f"inject_failed:{name}")
