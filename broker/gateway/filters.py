"""Server-side argument injection and response filtering: never trust the client's filters (CONTRACT §8, §11).

Both halves are pure and compiled once, at config load (:func:`compile_tool_filters`):

- :meth:`ToolFilters.inject` sets the tool's server-side arguments (``inject: {name: CEL}``) from the subject's
  claims and the actor, overriding whatever the agent sent. An expression that errors or yields no usable JSON
  value refuses the call (``403 access_denied``): a server-side constraint that cannot be computed is never
  silently left out.
- :meth:`ToolFilters.filter_response` parses the backend's JSON strictly and applies, in this order, row filters
  (their predicates see the backend's unaltered rows), drops, then masks. A filtered tool never passes a body it
  could not filter: anything unparseable is ``502 upstream_error`` (HOSTILE P26: fail closed).

Paths (``mask``, ``drop``, ``filter_rows``) are dotted names; ``name[]`` walks every element of the array at
``name``, and a leading ``[]`` walks a top-level array. Names match object keys case-insensitively, after Unicode
compatibility folding (NFKC + casefold), so a mask on ``vendor.bank_account`` also covers ``Vendor.BANK_ACCOUNT``
and ``ｖｅｎｄｏｒ.bank_account`` (P26: ``SSN`` versus ``ssn``); every matching key is covered, so case-variant
duplicates cannot smuggle a second copy past the filter. A *name* applied to an array applies to each element
(recursively through nested arrays), so ``invoices.vendor.bank_account`` covers ``{"invoices": [...]}`` without
``[]`` (P26: masked field nested in arrays). The value found at the end of a path is what is masked: an object
or array there is replaced whole by ``"****"``; ``ssns[]`` instead masks each element of ``ssns``. ``[]`` applied to
a value that is not an array takes it as an array of itself, so shape drift (a lone object or string where an
array was documented) is still masked, and a row filter there refuses the body.

Out of scope, by design: JSON *inside a string* (``{"note": "{\\"ssn\\": …}"}``) is not parsed. Whether a
string "is JSON" is a guess (partial, escaped, base64-wrapped and other-format payloads defeat any heuristic),
and a guess would give a false sense of coverage; masking is defined over the parsed structure only, and a field
that carries embedded documents must be dropped instead. Likewise a path that matches nothing (the backend sent
another shape) filters nothing: filters are deny-lists over the documented response shape. Non-JSON content types
and compressed bodies are refused by the caller before this module is reached (P26).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import cel

from broker.canonical import I_JSON_MAX_INT, strict_loads
from broker.config.models import Tool
from broker.errors import AccessDenied, InvalidRequest, UpstreamError
from broker.policy.cel import referenced_fields

__all__ = ["FilterCompileError", "ToolFilters", "compile_tool_filters"]

#: What a masked value becomes, followed by at most ``keep_last`` of its last characters.
MASK: Final = "****"

INJECT_VARIABLES: Final = frozenset({"subject", "actor"})
ROW_VARIABLES: Final = frozenset({"row", "subject", "actor"})

Location = tuple[str | int, ...]


class FilterCompileError(ValueError):
    """The tool's ``inject``/``response`` config does not compile; ``problems`` are (tool-relative location,
    message) pairs, e.g. ``(("response", "mask", 0, "path"), "…")``, for the loader to map to ``FILE:LINE``."""

    def __init__(self, problems: list[tuple[Location, str]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))
        self.problems = problems


# ---------------------------------------------------------------------------------------------------------
# paths

#: A path step: a folded object key, or EACH ("[]": every element of an array).
EACH: Final = None
Step = str | None
_NAME = r"[A-Za-z0-9_-]+"
_PATH_PART = re.compile(rf"({_NAME})?((?:\[\])*)")


def fold_key(key: str) -> str:
    """The form in which path names and object keys are compared (P26): NFKC compatibility folding plus Unicode
    case folding, so ``SSN``, ``ssn``, ``ＳＳＮ`` and ``ſsn`` are one key. ASCII keys (the usual case) skip NFKC."""
    if key.isascii():
        return key.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", key).casefold())


def parse_path(path: str) -> tuple[Step, ...]:
    """Split ``a.b[].c`` into steps ``("a", "b", EACH, "c")``; raises ValueError on anything else."""
    steps: list[Step] = []
    for index, part in enumerate(path.split(".")):
        match = _PATH_PART.fullmatch(part)
        if match is None or not part or (match.group(1) is None and index > 0):
            raise ValueError(
                f"invalid path {path!r}: expected dotted names ({_NAME}), each optionally "
                "followed by [] (a leading [] walks a top-level array)"
            )
        if match.group(1) is not None:
            steps.append(fold_key(match.group(1)))
        steps.extend([EACH] * (len(match.group(2)) // 2))
    return tuple(steps)


def _slots(container: Any, key: Any, steps: tuple[Step, ...], index: int, out: list[tuple[Any, Any]]) -> None:
    """Append (container, key-or-index) for every place ``steps[index:]`` reaches from ``container[key]``.

    Recursion is bounded by the path length plus the response's nesting (``strict_loads`` max_depth).
    """
    node = container[key]
    step = steps[index]
    last = index == len(steps) - 1
    if step is EACH:
        # Fail closed on shape drift: a value that is not an array is taken as an array of itself, so
        # ``ssns[]`` still masks a bare string and ``invoices[].x`` still reaches a lone object.
        places = (
            [(node, position) for position in range(len(node))] if type(node) is list else [(container, key)]
        )
        if last:
            out.extend(places)
        else:
            for inner, position in places:
                _slots(inner, position, steps, index + 1, out)
    elif type(node) is dict:
        for name in node:
            # Config names are ASCII, and lower() keeps an ASCII key's length: most keys are ruled out by length.
            if name == step or ((len(name) == len(step) or not name.isascii()) and fold_key(name) == step):
                if last:
                    out.append((node, name))
                else:
                    _slots(node, name, steps, index + 1, out)
    elif type(node) is list:
        # A name applied to an array applies to each element (and through nested arrays): P26.
        for position in range(len(node)):
            _slots(node, position, steps, index, out)


def _places(holder: list[Any], steps: tuple[Step, ...]) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    _slots(holder, 0, steps, 0, out)
    return out


def mask_value(value: Any, keep_last: int) -> str:
    """``"****"`` plus the last ``keep_last`` characters of ``value``'s string form — but only when more characters
    stay hidden than are shown: a short value (``"1234"`` with ``keep_last=4``) would otherwise be revealed whole.
    Objects and arrays become ``"****"``: their string form is not a value anyone meant to show."""
    if type(value) is dict or type(value) is list:
        return MASK
    text = value if type(value) is str else str(value)
    if keep_last == 0 or len(text) <= 2 * keep_last:
        return MASK
    return MASK + text[-keep_last:]


# ---------------------------------------------------------------------------------------------------------
# CEL

# Names bound by CEL comprehension macros (``list.exists(x, …)``); program.variables() reports them too.
_BOUND = re.compile(r"\.\s*(?:all|exists|exists_one|map|filter)\s*\(\s*([A-Za-z_][A-Za-z0-9_]*)\s*,")


def _compile_cel(source: str, allowed: frozenset[str]) -> tuple[cel.Program | None, str | None]:
    try:
        program = cel.compile(source)
    except ValueError as exc:  # the binding's compile error; keep its "ERROR: <input>:L:C: …" lines
        lines = [line for line in str(exc).splitlines() if line.startswith("ERROR:")]
        return None, "CEL: " + ("; ".join(lines) if lines else str(exc).splitlines()[0])
    undeclared = sorted(set(program.variables()) - allowed - set(_BOUND.findall(source)))
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
class _Reads:
    """What a group of expressions reads of the per-request variables: only that is converted into CEL."""

    subject: bool
    subject_fields: frozenset[str] | None  # None: the whole subject
    actor: bool

    @classmethod
    def of(cls, expressions: list[tuple[str, cel.Program]]) -> _Reads:
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


def _is_json(value: Any) -> bool:
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
        return all(_is_json(item) for item in value)
    if kind is dict:
        return all(type(key) is str and _is_json(item) for key, item in value.items())
    return False  # bytes, timestamps, durations, optionals, …


# ---------------------------------------------------------------------------------------------------------
# compiled filters


@dataclass(frozen=True, slots=True)
class _RowFilter:
    steps: tuple[Step, ...]
    keep: cel.Program
    #: the row keys ``keep`` selects as ``row.name`` (None: the whole row). Rows are pruned to them before
    #: conversion, which halves the cost of a 50-row answer; ``!has(row.flag)`` still sees ``flag``.
    fields: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class ToolFilters:
    """One tool's compiled injection and response filters (immutable; shared by all requests)."""

    tool: str
    injections: tuple[tuple[str, cel.Program], ...]
    inject_reads: _Reads
    masks: tuple[tuple[tuple[Step, ...], int], ...]
    drops: tuple[tuple[Step, ...], ...]
    row_filters: tuple[_RowFilter, ...]
    row_reads: _Reads

    @property
    def filters_response(self) -> bool:
        """Whether :meth:`filter_response` does anything (the caller must then hand it JSON only)."""
        return bool(self.masks or self.drops or self.row_filters)

    def inject(
        self, arguments: Mapping[str, Any], *, subject: Mapping[str, Any], actor_id: str | None
    ) -> dict[str, Any]:
        """A new dict: ``arguments`` with every server-side argument set from its expression.

        The agent's value under that name is overridden, and so is any key that folds to it (``Department``,
        ``ＤＥＰＡＲＴＭＥＮＴ``): a case-insensitive backend must not be able to pick the agent's copy.
        Raises AccessDenied(reason ``inject_failed:<name>``) when an expression errors or yields null or a
        non-JSON value: the call is refused, never forwarded without its constraint.
        """
        result = dict(arguments)
        if not self.injections:
            return result
        try:
            context = self.inject_reads.context(subject, actor_id)
        except Exception as exc:  # an unconvertible claim: no expression can be computed (fail closed)
            raise _inject_failed(self.injections[0][0]) from exc
        for name, program in self.injections:
            try:
                value = program.execute(context)
            # The binding raises KeyError, TypeError, RuntimeError, ZeroDivisionError, …: all fail closed.
            except Exception as exc:
                raise _inject_failed(name) from exc
            if value is None or not _is_json(value):  # null: the server-side constraint was not computed
                raise _inject_failed(name)
            folded = fold_key(name)
            for key in [key for key in result if key != name and fold_key(key) == folded]:
                del result[key]
            result[name] = value
        return result

    def filter_response(
        self, body: bytes, *, subject: Mapping[str, Any], actor_id: str | None, max_depth: int = 64
    ) -> bytes:
        """The backend's JSON ``body`` with row filters, drops and masks applied, re-serialised compactly.

        Without response filters ``body`` itself is returned (no parse). Otherwise the body must be one strict
        JSON object or array (UTF-8, no duplicate members — P26: parsers disagree on which duplicate wins —,
        at most ``max_depth`` deep); anything else raises UpstreamError(reason ``response_unfilterable``), as
        does a row-filter path that holds something other than an array. Rows are kept only where ``keep`` is
        exactly true; an error or a non-boolean drops the row (fail closed).
        """
        if not self.filters_response:
            return body
        try:
            document = strict_loads(body, max_depth=max_depth)
        except InvalidRequest as exc:
            raise _unfilterable() from exc
        if type(document) is not dict and type(document) is not list:
            # A bare string may itself hold JSON (P26); filters are paths into a structure, so refuse.
            raise _unfilterable()
        holder = [document]  # the root's container, so that every place has one
        if self.row_filters:
            self._filter_rows(holder, subject, actor_id)
        for steps in self.drops:
            for container, key in _places(holder, steps):
                container.pop(key, None)  # drops never end in [], so every container is an object
        for steps, keep_last in self.masks:
            for container, key in _places(holder, steps):
                container[key] = mask_value(container[key], keep_last)
        return json.dumps(holder[0], ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()

    def _filter_rows(self, holder: list[Any], subject: Mapping[str, Any], actor_id: str | None) -> None:
        context: cel.Context | None
        try:
            context = self.row_reads.context(subject, actor_id)
        except Exception:  # an unconvertible claim: every predicate would error, so every row is dropped
            context = None
        for row_filter in self.row_filters:
            for container, key in _places(holder, row_filter.steps):
                rows = container[key]
                if type(rows) is not list:
                    raise _unfilterable()  # an object here would be one unfiltered row
                container[key] = (
                    [] if context is None else [row for row in rows if _keeps(row_filter, context, row)]
                )


def _keeps(row_filter: _RowFilter, context: cel.Context, row: Any) -> bool:
    fields = row_filter.fields
    if fields is not None and type(row) is dict:
        row = {name: row[name] for name in fields if name in row}
    try:
        # Replacing "row" on the one per-response context costs only the row's conversion (measured).
        context.add_variable("row", row)
        return row_filter.keep.execute(context) is True  # exactly true: not 1, "true" or [x]
    except Exception:  # the binding's conversion and evaluation errors: fail closed, drop the row
        return False


def _inject_failed(name: str) -> AccessDenied:
    return AccessDenied("required server-side argument could not be computed", reason=f"inject_failed:{name}")


def _unfilterable() -> UpstreamError:
    return UpstreamError("the tool backend's answer could not be filtered", reason="response_unfilterable")


def compile_tool_filters(tool: Tool) -> ToolFilters:
    """Compile ``tool.inject`` and ``tool.response``; raises FilterCompileError listing every problem.

    Checked: path syntax (and that drops do not end in ``[]``), CEL syntax, and references to undeclared
    variables (inject: ``subject``, ``actor``; row filters: ``row``, ``subject``, ``actor``).
    """
    problems: list[tuple[Location, str]] = []
    injections: list[tuple[str, cel.Program]] = []
    inject_sources: list[tuple[str, cel.Program]] = []
    for name, source in tool.inject.items():
        if re.fullmatch(_NAME, name) is None:
            problems.append((("inject", name), f"argument name must match {_NAME}"))
            continue
        program, problem = _compile_cel(source, INJECT_VARIABLES)
        if program is None:
            problems.append((("inject", name), problem or "does not compile"))
        else:
            injections.append((name, program))
            inject_sources.append((source, program))

    def path(location: Location, text: str) -> tuple[Step, ...]:
        try:
            return parse_path(text)
        except ValueError as exc:
            problems.append((location, str(exc)))
            return ()

    masks: list[tuple[tuple[Step, ...], int]] = []
    for index, mask in enumerate(tool.response.mask):
        masks.append((path(("response", "mask", index, "path"), mask.path), mask.keep_last))
    drops: list[tuple[Step, ...]] = []
    for index, text in enumerate(tool.response.drop):
        steps = path(("response", "drop", index), text)
        if steps and steps[-1] is EACH:
            problems.append((("response", "drop", index), "a drop path cannot end in [] (drop the array)"))
        drops.append(steps)
    row_filters: list[_RowFilter] = []
    row_sources: list[tuple[str, cel.Program]] = []
    for index, rule in enumerate(tool.response.filter_rows):
        steps = path(("response", "filter_rows", index, "path"), rule.path)
        program, problem = _compile_cel(rule.keep, ROW_VARIABLES)
        if program is None:
            problems.append((("response", "filter_rows", index, "keep"), problem or "does not compile"))
        else:
            row_filters.append(_RowFilter(steps, program, referenced_fields(rule.keep, "row")))
            row_sources.append((rule.keep, program))
    if problems:
        raise FilterCompileError(problems)
    return ToolFilters(
        tool=tool.name,
        injections=tuple(injections),
        inject_reads=_Reads.of(inject_sources),
        masks=tuple(masks),
        drops=tuple(drops),
        row_filters=tuple(row_filters),
        row_reads=_Reads.of(row_sources),
    )
