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
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import cel

from broker.canonical import strict_loads
from broker.config.models import Tool
from broker.errors import InvalidRequest, UpstreamError
from broker.gateway.filter_rules import (
    INJECT_VARIABLES,
    ROW_VARIABLES,
    MaskRule,
    Reads,
    RowEquality,
    RowRule,
    compile_cel,
    inject_failed,
    is_json,
)
from broker.gateway.responses import ResponseFilter
from broker.policy.cel import referenced_fields
from broker.policy.paths import (
    EACH,
    NAME,
    CompiledPath,
    Step,
    compile_path,
    fold_key,
    parse_path,
    unfilterable,
)
from broker.policy.scrub import Scrubber

__all__ = ["FilterCompileError", "ResponseFilter", "Scrubber", "ToolFilters", "compile_tool_filters"]


Location = tuple[str | int, ...]
#: json.dumps(ensure_ascii=False, separators=(",", ":"), allow_nan=False), built once (not per answer)
_COMPACT_STRICT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class FilterCompileError(ValueError):
    """The tool's ``inject``/``response`` config does not compile; ``problems`` are (tool-relative location,
    message) pairs, e.g. ``(("response", "mask", 0, "path"), "…")``, for the loader to map to ``FILE:LINE``."""

    def __init__(self, problems: list[tuple[Location, str]]) -> None:
        super().__init__("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class ToolFilters:
    """One tool's compiled injection and response filters (immutable; shared by all requests)."""

    tool: str
    injections: tuple[tuple[str, cel.Program], ...]
    inject_reads: Reads
    masks: tuple[MaskRule, ...]
    drops: tuple[CompiledPath, ...]
    row_filters: tuple[RowRule, ...]
    row_reads: Reads
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
            raise inject_failed(self.injections[0][0]) from exc
        for name, program in self.injections:
            try:
                value = program.execute(context)
            # The binding raises KeyError, TypeError, RuntimeError, ZeroDivisionError, …: all fail closed.
            except Exception as exc:
                raise inject_failed(name) from exc
            if value is None or not is_json(value):  # null: the server-side constraint was not computed
                raise inject_failed(name)
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
            raise unfilterable() from exc
        response = self.response_filter(subject=subject, actor_id=actor_id)
        out = response.seal(response.document(document, strict=strict))
        return _COMPACT_STRICT.encode(out).encode()


def compile_tool_filters(tool: Tool) -> ToolFilters:
    """Compile ``tool.inject`` and ``tool.response``; raises FilterCompileError listing every problem.

    Checked: path syntax (and that drops do not end in ``[]``), CEL syntax, and references to undeclared
    variables (inject: ``subject``, ``actor``; row filters: ``row``, ``subject``, ``actor``).
    """
    problems: list[tuple[Location, str]] = []
    injections: list[tuple[str, cel.Program]] = []
    inject_sources: list[tuple[str, cel.Program]] = []
    for name, source in tool.inject.items():
        if re.fullmatch(NAME, name) is None:
            problems.append((("inject", name), f"argument name must match {NAME}"))
            continue
        program, problem = compile_cel(source, INJECT_VARIABLES)
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

    masks: list[MaskRule] = []
    leaves: dict[str, tuple[int, int]] = {}
    for index, mask in enumerate(tool.response.mask):
        compiled = compile_path(path(("response", "mask", index, "path"), mask.path))
        named = [position for position, (name, _) in enumerate(compiled) if name is not None]
        cut = named[-1] + 1 if named else 0
        masks.append(MaskRule(compiled, mask.keep_last, compiled[:cut], compiled[cut:]))
        if named:
            leaf, each = compiled[cut - 1][0], len(compiled) - cut
            assert leaf is not None
            # several masks naming one field: the whole value rather than its elements, the fewest shown
            previous = leaves.get(leaf, (each, mask.keep_last))
            leaves[leaf] = (min(previous[0], each), min(previous[1], mask.keep_last))
    drops: list[CompiledPath] = []
    for index, text in enumerate(tool.response.drop):
        steps = path(("response", "drop", index), text)
        if steps and steps[-1] is EACH:
            problems.append((("response", "drop", index), "a drop path cannot end in [] (drop the array)"))
        drops.append(compile_path(steps))
    row_filters: list[RowRule] = []
    row_sources: list[tuple[str, cel.Program]] = []
    for index, rule in enumerate(tool.response.filter_rows):
        steps = path(("response", "filter_rows", index, "path"), rule.path)
        program, problem = compile_cel(rule.keep, ROW_VARIABLES)
        if program is None:
            problems.append((("response", "filter_rows", index, "keep"), problem or "does not compile"))
        else:
            fields = referenced_fields(rule.keep, "row")
            folded = None if fields is None else frozenset(fold_key(name) for name in fields)
            row_filters.append(
                RowRule(compile_path(steps), program, fields, folded, RowEquality.of(rule.keep))
            )
            row_sources.append((rule.keep, program))
    if problems:
        raise FilterCompileError(problems)
    watched = set(leaves)
    for row_filter in row_filters:
        watched |= row_filter.folded_fields or frozenset()
    return ToolFilters(
        tool=tool.name,
        injections=tuple(injections),
        inject_reads=Reads.of(inject_sources),
        masks=tuple(masks),
        drops=tuple(drops),
        row_filters=tuple(row_filters),
        row_reads=Reads.of(row_sources),
        leaves=leaves,
        watched=frozenset(watched),
        watched_lengths=frozenset(len(name) for name in watched),
    )
