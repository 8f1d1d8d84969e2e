"""Server-side argument injection and response filtering: never trust the client's filters (CONTRACT §8, §11, §12).

Both halves are pure and compiled once, at config load (:func:`compile_tool_filters`):

- :meth:`ToolFilters.inject` sets the tool's server-side arguments (``inject: {name: CEL}``) from the subject's
  claims and the actor, overriding whatever the agent sent. An expression that errors or yields no usable JSON
  value refuses the call (``403 access_denied``): a server-side constraint that cannot be computed is never
  silently left out.
- Responses fail closed (CONTRACT §12). :meth:`ToolFilters.response_filter` starts the filtering of one answer
  for one caller: :meth:`ResponseFilter.document` applies, to one parsed JSON document, row filters (their
  predicates see the backend's unaltered rows), drops, then masks; :meth:`ResponseFilter.seal` then finishes the
  whole outgoing message (a ``/v1`` body, or an MCP result holding several documents): the masks' fields and
  the row predicates' fields outside the documents, then the scrub. :meth:`ToolFilters.filter_answer` is the
  ``/v1`` form (status rules included). A filtered tool never passes a body it could not
  filter: anything unparseable is ``502 upstream_error`` (HOSTILE P26).

Paths (``mask``, ``drop``, ``filter_rows``) are dotted names; ``name[]`` walks every element of the array at
``name``, and a leading ``[]`` walks a top-level array. Names match object keys case-insensitively, after Unicode
compatibility folding (NFKC + casefold), so a mask on ``vendor.bank_account`` also covers ``Vendor.BANK_ACCOUNT``
and ``ｖｅｎｄｏｒ.bank_account`` (P26: ``SSN`` versus ``ssn``); every matching key is covered, so case-variant
duplicates cannot smuggle a second copy past the filter. A *name* applied to an array applies to each element
(recursively through nested arrays), so ``invoices.vendor.bank_account`` covers ``{"invoices": [...]}`` without
``[]`` (P26: masked field nested in arrays). The value found at the end of a path is what is masked: an object
or array there is replaced whole by ``"****"``; ``ssns[]`` instead masks each element of ``ssns``. ``[]`` applied to
a value that is not an array takes it as an array of itself.

**Shape.** A path must match the answer: a filter that does not find its data refuses instead of passing the
data wherever the backend put it (HOSTILE 00, "shape drift"). In a success answer (*strict*), every step of
every path must be found wherever the path walks: a name step needs an object holding that key (in any casing),
or an array all of whose elements do (an empty array holds nothing and is fine); a key that is absent or null, a
scalar where a key must be looked up, a row path that holds anything but an array — a wrapped answer
(``{"data": {"invoices": …}}``), a top-level array where an object was configured, a renamed or sibling key —
is ``502`` with reason ``response_shape``. Optional data is declared, never guessed: a name suffixed with ``?``
(``vendor.bank_account?``, ``vendor?.bank_account``) may be absent or null, and then nothing below it is
required. An error answer (``/v1`` 4xx) has no documented shape: its paths apply where they reach (*lenient*),
but a row path there that holds anything but an array still refuses.

**Rows outside the path.** When a row predicate reads named fields (``row.department``), any other object of the
answer that carries one of those keys (any casing) is a row too, and the answer is refused (``response_shape``)
unless the predicate keeps it: a sibling list (``{"invoices": […], "archive": […]}``), a lone row, a row in
``_meta`` or a row nested inside a kept row (``{"invoices": [{…, "related": [<dept 7>]}]}``) cannot carry other
departments' rows past the filter. The kept rows themselves are not evaluated twice; what they hold is checked
like everything else. A predicate that uses ``row`` other than as ``row.name`` (``size(row)``) has no such
fields to look for.

**A mask names a field wherever it appears** (the default is to hide). The mask's path says where the field must
be (its shape is checked there, and that place is masked with the mask's ``keep_last``); its last name says what
the field is called, and every member of that name (folded as keys are) anywhere in the outgoing message — at any
depth, under any parent, in any object: ``history[].vendor.bank_account``, ``Vendor2.bank_account``, an MCP
``_meta`` or content ``annotations`` — is masked too, and its value hidden (see "Scrub"). A renamed parent is
therefore covered; a renamed field (``bankAccount``) is not, except by value. Where several masks end in one
name, the strictest applies elsewhere (the fewest characters kept; the whole value rather than each element,
for ``name[]``). Such members are optional: nothing is refused for their absence; a null one stays null. A
protocol's own members around the documents (an MCP result's ``content``, a content item's ``type`` and
``text``) are not the tool's fields (:meth:`ResponseFilter.seal`).

**Scrub.** The values the masks hide are then removed from the whole outgoing message — every string, object key
and number, wherever it is (another member, a key name, free text, ``_meta``, an MCP error) — compared after the
same folding as keys, so case and compatibility variants are caught. Hidden values are the strings and numbers at
mask paths and in every member a mask names, every one inside a masked object or array, in the whole answer
*including rows the row filters remove and what drops remove*. A hidden value of four characters or more is
replaced by ``"****"`` wherever it occurs; a string that still holds it after a case-insensitive replacement (a
compatibility form such as fullwidth digits) becomes ``"****"`` whole, and so does a number whose digits hold it.
A shorter value (one to three characters) is the safe side of an ugly choice: replacing it inside other text would
rewrite unrelated words, numbers and member names (every ``42``), and passing it would leak it, so a message in
which it occurs outside its masked place is refused (``502``, reason ``response_mask_leak``), as is one whose keys
collide once scrubbed. Values without a letter or digit (``"-"``, ``"***"``), booleans and null carry nothing to
hide. Drops and removed rows are structure, not values: only the values of the fields masks name in them are
scrubbed elsewhere, so mask a value to hide it everywhere.

Out of scope, by design: JSON *inside a string* of a ``/v1`` body (``{"note": "{\\"ssn\\": …}"}``) is not
parsed — whether a string "is JSON" is a guess, and a guess would give a false sense of coverage; the scrub
still removes hidden values from it, and a field that carries embedded documents must be dropped. (MCP text
contents are parsed: the protocol defines them as the tool's answer, see :mod:`broker.mcp.answers`.) A value
the backend reformats (spaces inside an IBAN, another date format) is not recognised as the same value. Non-JSON
content types and compressed bodies are refused by the caller before this module is reached (P26).
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import cel

from broker.canonical import I_JSON_MAX_INT, strict_loads
from broker.config.models import Tool
from broker.errors import AccessDenied, InvalidRequest, UpstreamError
from broker.policy.cel import referenced_fields

__all__ = ["FilterCompileError", "ResponseFilter", "Scrubber", "ToolFilters", "compile_tool_filters"]

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

#: A path step as :func:`parse_path` gives it: a folded object key, that key followed by ``?`` (it may be absent
#: or null), or EACH (``[]``: every element of an array).
EACH: Final = None
Step = str | None
#: A compiled step: (folded key, optional), or (EACH, False).
_Step = tuple[str | None, bool]
_Path = tuple[_Step, ...]
_NAME = r"[A-Za-z0-9_-]+"
_PATH_PART = re.compile(rf"(?:({_NAME})(\?)?)?((?:\[\])*)")


def fold_key(key: str) -> str:
    """The form in which path names and object keys (and hidden values) are compared (P26): NFKC compatibility
    folding plus Unicode case folding, so ``SSN``, ``ssn``, ``ＳＳＮ`` and ``ſsn`` are one key. ASCII skips NFKC."""
    if key.isascii():
        return key.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", key).casefold())


def parse_path(path: str) -> tuple[Step, ...]:
    """Split ``a.b?[].c`` into steps ``("a", "b?", EACH, "c")``; raises ValueError on anything else."""
    steps: list[Step] = []
    for index, part in enumerate(path.split(".")):
        match = _PATH_PART.fullmatch(part)
        if match is None or not part or (match.group(1) is None and index > 0):
            raise ValueError(
                f"invalid path {path!r}: expected dotted names ({_NAME}), each optionally followed by ? "
                "(may be absent or null) and by [] (a leading [] walks a top-level array)"
            )
        if match.group(1) is not None:
            steps.append(fold_key(match.group(1)) + (match.group(2) or ""))
        steps.extend([EACH] * (len(match.group(3)) // 2))
    return tuple(steps)


def _compile_path(steps: tuple[Step, ...]) -> _Path:
    return tuple(
        (EACH, False) if step is None else (step.removesuffix("?"), step.endswith("?")) for step in steps
    )


def _key_matches(key: str, name: str) -> bool:
    # Config names are ASCII, and lower() keeps an ASCII key's length: most keys are ruled out by length.
    return key == name or ((len(key) == len(name) or not key.isascii()) and fold_key(key) == name)


def _walk(
    container: Any, key: Any, path: _Path, index: int, strict: bool, out: list[tuple[Any, Any]]
) -> None:
    """Append (container, key-or-index) for every place ``path[index:]`` reaches from ``container[key]``;
    ``strict``: raise ``response_shape`` where a step finds nothing (see the module docstring, "Shape").

    Recursion is bounded by the path length plus the answer's nesting (``strict_loads`` max_depth).
    """
    if index == len(path):
        out.append((container, key))
        return
    node = container[key]
    name, optional = path[index]
    if name is None:
        # A value that is not an array is taken as an array of itself, so ``ssns[]`` still masks a bare string
        # and ``invoices[].x`` still reaches a lone object.
        if type(node) is list:
            for position in range(len(node)):
                _walk(node, position, path, index + 1, strict, out)
        else:
            _walk(container, key, path, index + 1, strict, out)
    elif type(node) is dict:
        found = False
        for member in node:
            if _key_matches(member, name):
                found = True
                if not (optional and node[member] is None):
                    _walk(node, member, path, index + 1, strict, out)
        if strict and not found and not optional:
            raise _shape()
    elif type(node) is list:
        # A name applied to an array applies to each element (and through nested arrays): P26.
        for position in range(len(node)):
            _walk(node, position, path, index, strict, out)
    elif strict:
        raise _shape()  # null or a scalar where a key must be looked up


def _reach(holder: list[Any], path: _Path, strict: bool) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    _walk(holder, 0, path, 0, strict, out)
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
# scrubbing hidden values out of a whole message

#: Hidden values at least this long (folded) are replaced wherever they occur; shorter ones refuse the message.
MIN_REPLACED: Final = 4


#: above this many (hidden value × text character) pairs, :func:`_occurring` narrows the values by k-grams first
_DIRECT_SEARCH: Final = 1 << 22
_KGRAM: Final = 8


def _occurring(hidden: set[str], message: Any) -> set[str]:
    """The hidden values that may occur in ``message`` (a superset, never less: what :class:`Scrubber` must see).

    Every string, key and number of the message that is at least as long (folded) as the shortest hidden value
    goes into one folded text; each hidden value is searched there. Many values over a long text are first
    narrowed to those whose first and last k-grams occur in it, so the cost stays near-linear in the answer."""
    folded: dict[str, list[str]] = {}
    for value in hidden:
        folded.setdefault(fold_key(value), []).append(value)
    shortest = min(len(value) for value in folded)
    parts: list[str] = []

    def add(text: str) -> None:
        if text.isascii():
            if len(text) >= shortest:
                parts.append(text.lower())
        elif len(text := fold_key(text)) >= shortest:
            parts.append(text)

    stack = [message]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is str:
            add(node)
        elif kind is dict:
            for key in node:
                add(key)
            stack.extend(node.values())
        elif kind is list:
            stack.extend(node)
        elif kind is int or kind is float:
            add(_number_text(node))
    if not parts:
        return set()
    text = "\x00".join(parts)
    candidates = list(folded)
    if len(candidates) * len(text) > _DIRECT_SEARCH:
        k = min(shortest, _KGRAM)
        grams = {text[index : index + k] for index in range(len(text) - k + 1)}
        candidates = [value for value in candidates if value[:k] in grams and value[-k:] in grams]
    return {original for value in candidates if value in text for original in folded[value]}


def _number_text(value: int | float) -> str:
    if type(value) is float and value.is_integer():
        return str(int(value))
    return repr(value)


def _alternation(values: set[str], flags: int = 0) -> re.Pattern[str] | None:
    if not values:
        return None
    return re.compile("|".join(re.escape(value) for value in sorted(values, key=len, reverse=True)), flags)


class Scrubber:
    """Removes hidden values from every string, key and number of a JSON value (module docstring, "Scrub")."""

    __slots__ = ("_long", "_replace", "_short")

    def __init__(self, hidden: set[str]) -> None:
        folded = {value: fold_key(value) for value in hidden}
        self._long = _alternation({f for f in folded.values() if len(f) >= MIN_REPLACED})
        self._short = _alternation({f for f in folded.values() if 0 < len(f) < MIN_REPLACED})
        self._replace = _alternation(
            {value for value, f in folded.items() if len(f) >= MIN_REPLACED}, re.IGNORECASE
        )

    def text(self, text: str) -> str:
        if self._long is not None and self._replace is not None and self._long.search(fold_key(text)):
            text = self._replace.sub(MASK, text)
            if self._long.search(fold_key(text)):  # a form the case-insensitive replacement did not see
                text = MASK
        if self._short is not None and self._short.search(fold_key(text)):
            raise _leak()
        return text

    def number(self, value: int | float) -> int | float | str:
        text = _number_text(value)
        if self._long is not None and self._long.search(text):
            return MASK
        if self._short is not None and self._short.search(text):
            raise _leak()
        return value

    def scrub(self, value: Any) -> Any:
        """A scrubbed copy of ``value``; raises UpstreamError (``response_mask_leak``) as documented."""
        kind = type(value)
        if kind is str:
            return self.text(value)
        if kind is dict:
            out: dict[str, Any] = {}
            for key, item in value.items():
                new_key = self.text(key)
                if new_key in out:
                    raise _leak()  # two members that are one once scrubbed: neither can be passed as sent
                out[new_key] = self.scrub(item)
            return out
        if kind is list:
            return [self.scrub(item) for item in value]
        if kind is int or kind is float:
            return self.number(value)
        return value  # bool, null


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
class _Mask:
    path: _Path
    keep_last: int
    #: ``path`` up to its last name (``invoices.ssns`` of ``invoices.ssns[]``): the member the mask names
    member: _Path
    #: the ``[]`` steps after that name, walked from the member to the masked places
    trailing: _Path


@dataclass(frozen=True, slots=True)
class _RowFilter:
    path: _Path
    keep: cel.Program
    #: the row keys ``keep`` selects as ``row.name`` (None: the whole row). Rows are pruned to them before
    #: conversion, which halves the cost of a 50-row answer; ``!has(row.flag)`` still sees ``flag``.
    fields: frozenset[str] | None
    #: the same, folded: an object anywhere else that holds one of these keys is a row too (module docstring)
    folded_fields: frozenset[str] | None


@dataclass(frozen=True, slots=True)
class ToolFilters:
    """One tool's compiled injection and response filters (immutable; shared by all requests)."""

    tool: str
    injections: tuple[tuple[str, cel.Program], ...]
    inject_reads: _Reads
    masks: tuple[_Mask, ...]
    drops: tuple[_Path, ...]
    row_filters: tuple[_RowFilter, ...]
    row_reads: _Reads
    #: folded last name of each mask → (``[]`` steps after it, keep_last), the strictest of the masks naming it:
    #: the members masked wherever they are (module docstring, "A mask names a field wherever it appears")
    leaves: Mapping[str, tuple[int, int]] = field(default_factory=dict, compare=False)
    #: the folded names a walk of the answer looks for (leaves, the row predicates' fields), and their lengths
    watched: frozenset[str] = field(default=frozenset(), compare=False)
    watched_lengths: frozenset[int] = field(default=frozenset(), compare=False)

    @property
    def filters_response(self) -> bool:
        """Whether the tool's answers are filtered at all (else they pass unparsed)."""
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

    def response_filter(self, *, subject: Mapping[str, Any], actor_id: str | None) -> ResponseFilter:
        """The filtering of one answer (one ``/v1`` body, one MCP message) for this caller."""
        return ResponseFilter(self, subject, actor_id)

    def filter_answer(
        self,
        status: int,
        body: bytes,
        *,
        subject: Mapping[str, Any],
        actor_id: str | None,
        max_depth: int = 64,
    ) -> bytes:
        """What the agent gets of a ``/v1`` backend answer (CONTRACT §12), for every tool.

        A 5xx (or any status that is neither 2xx nor 4xx) raises UpstreamError: the agent gets ``502
        upstream_error``, never the backend's error body. A tool without response filters gets ``body`` itself
        (no parse). Otherwise a 2xx body is filtered strictly and a 4xx body leniently (module docstring).
        """
        if 200 <= status < 300 or 400 <= status < 500:
            if not self.filters_response:
                return body
            return self.filter_response(
                body, subject=subject, actor_id=actor_id, max_depth=max_depth, strict=status < 300
            )
        reason = "upstream_status_5xx" if status >= 500 else "upstream_status"
        raise UpstreamError("the tool backend failed", reason=reason)

    def filter_response(
        self,
        body: bytes,
        *,
        subject: Mapping[str, Any],
        actor_id: str | None,
        max_depth: int = 64,
        strict: bool = True,
    ) -> bytes:
        """The backend's JSON ``body`` filtered and sealed (module docstring), re-serialised compactly.

        Without response filters ``body`` itself is returned (no parse). Otherwise the body must be one strict
        JSON object or array (UTF-8, no duplicate members — P26: parsers disagree on which duplicate wins —,
        at most ``max_depth`` deep); anything else raises UpstreamError(reason ``response_unfilterable``); a
        path that does not match raises ``response_shape``, a short hidden value found elsewhere
        ``response_mask_leak``. Rows are kept only where ``keep`` is exactly true; an error or a non-boolean
        drops the row (fail closed).
        """
        if not self.filters_response:
            return body
        try:
            document = strict_loads(body, max_depth=max_depth)
        except InvalidRequest as exc:
            raise _unfilterable() from exc
        response = self.response_filter(subject=subject, actor_id=actor_id)
        out = response.seal(response.document(document, strict=strict))
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


class ResponseFilter:
    """One answer's filtering for one caller: :meth:`document` for each JSON document the answer holds, then
    :meth:`seal` once, on the whole message that will leave the broker. Not shared between requests."""

    __slots__ = ("_actor_id", "_context", "_context_ready", "_documents", "_filters", "_hidden", "_subject")

    def __init__(self, filters: ToolFilters, subject: Mapping[str, Any], actor_id: str | None) -> None:
        self._filters = filters
        self._subject = subject
        self._actor_id = actor_id
        self._context: cel.Context | None = None
        self._context_ready = False
        self._hidden: set[str] = set()
        #: the filtered documents (kept alive, so that their ids stay theirs until :meth:`seal`)
        self._documents: dict[int, Any] = {}

    @property
    def hidden(self) -> frozenset[str]:
        """The values the masks hid so far (what :meth:`seal` removes from the message)."""
        return frozenset(self._hidden)

    def document(self, document: Any, *, strict: bool = True) -> Any:
        """Filter one parsed JSON document in place and return it (a mask on ``[]`` may replace the root).

        Raises UpstreamError: ``response_unfilterable`` for a document that is not an object or array,
        ``response_shape`` for a path that does not match it (``strict``: every path; otherwise only a row path
        that holds a non-array) or an object carrying a row predicate's field that the predicate does not keep.
        """
        if type(document) is not dict and type(document) is not list:
            # A bare string may itself hold JSON (P26); filters are paths into a structure, so refuse.
            raise _unfilterable()
        filters = self._filters
        holder = [document]  # the root's container, so that every place has one
        # 1 the shape (strict), and the values masks hide, in every row: rows filtered out below included
        for mask in filters.masks:
            for container, key in _reach(holder, mask.path, strict):
                self._hide(container[key])
        if strict:
            for row_filter in filters.row_filters:
                _reach(holder, row_filter.path, True)
            for path in filters.drops:
                _reach(holder, path, True)
        # 2 row filters and drops; what they remove still hides the values of the members masks name
        gone: list[Any] = []
        kept: list[set[int]] = []
        for row_filter in filters.row_filters:
            kept.append(self._filter_rows(holder, row_filter, gone))
        for path in filters.drops:
            for container, key in _reach(holder, path, False):
                if key in container:  # drops never end in [], so every container is an object
                    gone.append(container.pop(key))
        if gone and filters.leaves:
            self._hide_named(gone)
        # 3 what stays: every object a row predicate reads passes it, every member a mask names is masked —
        # its path's places by that mask (with its keep_last), the others by its name
        places: list[tuple[_Mask, list[tuple[Any, Any]]]] = []
        rooted: dict[int, set[Any]] = {}
        for mask in filters.masks:
            members = _reach(holder, mask.member, False)
            for container, key in members:
                rooted.setdefault(id(container), set()).add(key)
            if mask.trailing:
                ends: list[tuple[Any, Any]] = []
                for container, key in members:
                    _walk(container, key, mask.trailing, 0, False, ends)
                places.append((mask, ends))
            else:
                places.append((mask, members))
        self._enforce(holder, 0, kept, rooted, None, None)
        for mask, ends in places:
            for container, key in ends:
                container[key] = mask_value(container[key], mask.keep_last)
        self._documents[id(holder[0])] = holder[0]
        return holder[0]

    def seal(self, message: Any, *, envelope: Mapping[int, frozenset[str]] | None = None) -> Any:
        """``message`` (holding the filtered documents, or being one) as it may leave the broker: outside the
        documents, objects carrying a row predicate's field checked and the members masks name masked as in
        :meth:`document`; then every hidden value scrubbed from all of it. Returns a new value (or ``message``
        itself when nothing was hidden).

        ``envelope`` maps the ids of a protocol's own objects around the documents (an MCP result, its content
        items) to their member names that are the protocol's, not the tool's (``content``, ``type``, ``text``):
        those names are not fields of the tool's data, their values are still walked and scrubbed.
        """
        holder = [message]
        self._enforce(holder, 0, None, None, self._documents, envelope)
        if not self._hidden:
            return holder[0]
        # only values that occur somewhere need the scrub's walk: usually none, their places were masked
        present = _occurring(self._hidden, holder[0])
        return Scrubber(present).scrub(holder[0]) if present else holder[0]

    def _row_context(self) -> cel.Context | None:
        if not self._context_ready:
            self._context_ready = True
            try:
                self._context = self._filters.row_reads.context(self._subject, self._actor_id)
            except Exception:  # an unconvertible claim: every predicate would error, so every row is dropped
                self._context = None
        return self._context

    def _filter_rows(self, holder: list[Any], row_filter: _RowFilter, gone: list[Any]) -> set[int]:
        """Keep the rows ``keep`` accepts at the row filter's path, the others go to ``gone``; the ids of the
        kept rows."""
        kept: set[int] = set()
        for container, key in _reach(holder, row_filter.path, False):
            rows = container[key]
            if type(rows) is not list:
                raise _shape()  # an object here would be one unfiltered row
            context = self._row_context()
            remaining = []
            for row in rows:
                if context is not None and _keeps(row_filter, context, row):
                    remaining.append(row)
                    kept.add(id(row))
                else:
                    gone.append(row)
            container[key] = remaining
        return kept

    def _enforce(
        self,
        container: Any,
        key: Any,
        kept: list[set[int]] | None,
        rooted: Mapping[int, set[Any]] | None,
        done: Mapping[int, Any] | None,
        envelope: Mapping[int, frozenset[str]] | None,
    ) -> None:
        """Walk ``container[key]`` as it will leave the broker (module docstring, "Rows outside the path", "A mask
        names a field wherever it appears"):

        - an object that carries a field a row predicate reads must be a row the predicate keeps (else
          ``response_shape``); the rows the row filter kept (``kept``, per row filter) are not evaluated again,
          but what they hold is walked like anything else;
        - a member a mask names (its last name, folded) is hidden and masked in place, unless it is one of
          ``rooted`` (``id(container)`` → keys: the places of the mask paths, masked afterwards) or holds a
          filtered document (``done``, by id); nothing below a masked member is walked;
        - the filtered documents ``done`` are not walked (they were, by :meth:`document`); the ``envelope``
          objects' protocol member names are neither fields nor named by masks (:meth:`seal`).
        """
        filters = self._filters
        watched, lengths, leaves = filters.watched, filters.watched_lengths, filters.leaves
        if not watched or (rooted is not None and key in rooted.get(id(container), ())):
            return
        row_filters = [
            (index, row_filter, row_filter.folded_fields)
            for index, row_filter in enumerate(filters.row_filters)
            if row_filter.folded_fields is not None
        ]
        stack = [container[key]]
        while stack:
            node = stack.pop()
            kind = type(node)
            if kind is list:
                if done is None or id(node) not in done:
                    stack.extend(node)  # mask places in arrays are below a member the walk does not enter
                continue
            if kind is not dict:
                continue
            node_id = id(node)
            if done is not None and node_id in done:
                continue
            exempt = envelope.get(node_id) if envelope is not None else None
            named: list[tuple[str, str]] | None = None  # (member, folded) of the watched members
            for member in node:
                if member.isascii():
                    if len(member) not in lengths:
                        continue
                    folded = member.lower()
                else:
                    folded = fold_key(member)
                if folded in watched and (exempt is None or member not in exempt):
                    if named is None:
                        named = []
                    named.append((member, folded))
            skipped: set[Any] | None = rooted.get(node_id) if rooted is not None else None
            if named is not None:
                # the row check first: its predicate sees the object as the backend sent it
                for index, row_filter, fields in row_filters:
                    if kept is not None and node_id in kept[index]:
                        continue
                    if all(folded not in fields for _, folded in named):
                        continue
                    context = self._row_context()
                    if context is None or not _keeps(row_filter, context, node):
                        raise _shape()
                for member, folded in named:
                    leaf = leaves.get(folded)
                    if leaf is None or (skipped is not None and member in skipped):
                        continue
                    if done is not None and id(node[member]) in done:
                        continue  # the member holding a filtered document (an MCP text content)
                    self._mask_member(node, member, leaf)
                    skipped = {member} if skipped is None else skipped | {member}
            if skipped is None:
                stack.extend(node.values())
            else:
                stack.extend(item for member, item in node.items() if member not in skipped)

    def _mask_member(self, node: dict[str, Any], member: str, leaf: tuple[int, int]) -> None:
        """Mask ``node[member]`` (or each of its elements, for a mask ending in ``[]``), hiding it first; null
        stays null, as a null at an optional path does."""
        each, keep_last = leaf
        ends: list[tuple[Any, Any]] = []
        if each == 0:
            ends.append((node, member))
        else:
            _walk(node, member, ((EACH, False),) * each, 0, False, ends)
        for container, key in ends:
            value = container[key]
            if value is not None:
                self._hide(value)
                container[key] = mask_value(value, keep_last)

    def _hide_named(self, values: list[Any]) -> None:
        """Hide the values of the members masks name anywhere in ``values`` (what row filters and drops
        removed: it never leaves, but its masked values must not leave elsewhere either)."""
        leaves, lengths = self._filters.leaves, self._filters.watched_lengths
        stack = list(values)
        while stack:
            node = stack.pop()
            kind = type(node)
            if kind is list:
                stack.extend(node)
            elif kind is dict:
                for member, value in node.items():
                    if member.isascii():
                        if len(member) not in lengths:
                            stack.append(value)
                            continue
                        folded = member.lower()
                    else:
                        folded = fold_key(member)
                    if folded in leaves:
                        self._hide(value)
                    else:
                        stack.append(value)

    def _hide(self, value: Any) -> None:
        kind = type(value)
        if kind is str:
            if any(character.isalnum() for character in value):
                self._hidden.add(value)
        elif kind is int or kind is float:
            self._hidden.add(_number_text(value))
        elif kind is dict:
            for item in value.values():
                self._hide(item)
        elif kind is list:
            for item in value:
                self._hide(item)


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


_NOT_FILTERED: Final = "the tool backend's answer could not be filtered"  # the agent's text; details: audit


def _unfilterable() -> UpstreamError:
    return UpstreamError(_NOT_FILTERED, reason="response_unfilterable")


def _shape() -> UpstreamError:
    return UpstreamError(_NOT_FILTERED, reason="response_shape")


def _leak() -> UpstreamError:
    return UpstreamError(_NOT_FILTERED, reason="response_mask_leak")


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

    masks: list[_Mask] = []
    leaves: dict[str, tuple[int, int]] = {}
    for index, mask in enumerate(tool.response.mask):
        compiled = _compile_path(path(("response", "mask", index, "path"), mask.path))
        named = [position for position, (name, _) in enumerate(compiled) if name is not None]
        cut = named[-1] + 1 if named else 0
        masks.append(_Mask(compiled, mask.keep_last, compiled[:cut], compiled[cut:]))
        if named:
            leaf, each = compiled[cut - 1][0], len(compiled) - cut
            assert leaf is not None
            # several masks naming one field: the whole value rather than its elements, the fewest shown
            previous = leaves.get(leaf, (each, mask.keep_last))
            leaves[leaf] = (min(previous[0], each), min(previous[1], mask.keep_last))
    drops: list[_Path] = []
    for index, text in enumerate(tool.response.drop):
        steps = path(("response", "drop", index), text)
        if steps and steps[-1] is EACH:
            problems.append((("response", "drop", index), "a drop path cannot end in [] (drop the array)"))
        drops.append(_compile_path(steps))
    row_filters: list[_RowFilter] = []
    row_sources: list[tuple[str, cel.Program]] = []
    for index, rule in enumerate(tool.response.filter_rows):
        steps = path(("response", "filter_rows", index, "path"), rule.path)
        program, problem = _compile_cel(rule.keep, ROW_VARIABLES)
        if program is None:
            problems.append((("response", "filter_rows", index, "keep"), problem or "does not compile"))
        else:
            fields = referenced_fields(rule.keep, "row")
            folded = None if fields is None else frozenset(fold_key(name) for name in fields)
            row_filters.append(_RowFilter(_compile_path(steps), program, fields, folded))
            row_sources.append((rule.keep, program))
    if problems:
        raise FilterCompileError(problems)
    watched = set(leaves)
    for row_filter in row_filters:
        watched |= row_filter.folded_fields or frozenset()
    return ToolFilters(
        tool=tool.name,
        injections=tuple(injections),
        inject_reads=_Reads.of(inject_sources),
        masks=tuple(masks),
        drops=tuple(drops),
        row_filters=tuple(row_filters),
        row_reads=_Reads.of(row_sources),
        leaves=leaves,
        watched=frozenset(watched),
        watched_lengths=frozenset(len(name) for name in watched),
    )
