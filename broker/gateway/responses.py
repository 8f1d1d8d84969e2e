"""One answer's filtering for one caller (CONTRACT §12): row filters, drops and masks on each JSON document,
then the whole outgoing message sealed (the masks' fields wherever they appear, rows wherever they are, the scrub).
Pure; :meth:`broker.gateway.filters.ToolFilters.response_filter` starts one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import cel

from broker.gateway.filter_rules import MaskRule, RowRule
from broker.policy.paths import EACH, fold_key, reach, shape_mismatch, unfilterable, walk
from broker.policy.scrub import Scrubber, mask_value, number_text, occurring

if TYPE_CHECKING:
    from broker.gateway.filters import ToolFilters


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
            raise unfilterable()
        filters = self._filters
        holder = [document]  # the root's container, so that every place has one
        # 1 the shape (strict), and the values masks hide, in every row: rows filtered out below included
        for mask in filters.masks:
            for container, key in reach(holder, mask.path, strict):
                self._hide(container[key])
        if strict:
            for row_filter in filters.row_filters:
                reach(holder, row_filter.path, True)
            for path in filters.drops:
                reach(holder, path, True)
        # 2 row filters and drops; what they remove still hides the values of the members masks name
        gone: list[Any] = []
        kept: list[set[int]] = []
        for row_filter in filters.row_filters:
            kept.append(self._filter_rows(holder, row_filter, gone))
        for path in filters.drops:
            for container, key in reach(holder, path, False):
                if key in container:  # drops never end in [], so every container is an object
                    gone.append(container.pop(key))
        if gone and filters.leaves:
            self._hide_named(gone)
        # 3 what stays: every object a row predicate reads passes it, every member a mask names is masked —
        # its path's places by that mask (with its keep_last), the others by its name
        places: list[tuple[MaskRule, list[tuple[Any, Any]]]] = []
        rooted: dict[int, set[Any]] = {}
        for mask in filters.masks:
            members = reach(holder, mask.member, False)
            for container, key in members:
                rooted.setdefault(id(container), set()).add(key)
            if mask.trailing:
                ends: list[tuple[Any, Any]] = []
                for container, key in members:
                    walk(container, key, mask.trailing, 0, False, ends)
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
        present = occurring(self._hidden, holder[0])
        return Scrubber(present).scrub(holder[0]) if present else holder[0]

    def _row_context(self) -> cel.Context | None:
        if not self._context_ready:
            self._context_ready = True
            try:
                self._context = self._filters.row_reads.context(self._subject, self._actor_id)
            except Exception:  # an unconvertible claim: every predicate would error, so every row is dropped
                self._context = None
        return self._context

    def _filter_rows(self, holder: list[Any], row_filter: RowRule, gone: list[Any]) -> set[int]:
        """Keep the rows ``keep`` accepts at the row filter's path, the others go to ``gone``; the ids of the
        kept rows."""
        kept: set[int] = set()
        for container, key in reach(holder, row_filter.path, False):
            rows = container[key]
            if type(rows) is not list:
                raise shape_mismatch()  # an object here would be one unfiltered row
            context = self._row_context()
            remaining = []
            for row in rows:
                if context is not None and self._keeps(row_filter, context, row):
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
                    if context is None or not self._keeps(row_filter, context, node):
                        raise shape_mismatch()
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
            walk(node, member, ((EACH, False),) * each, 0, False, ends)
        for container, key in ends:
            value = container[key]
            if value is not None:
                self._hide(value)
                container[key] = mask_value(value, keep_last)

    def _keeps(self, row_filter: RowRule, context: cel.Context, row: Any) -> bool:
        """Whether ``row_filter`` keeps ``row``: exactly true, decided without CEL where that is certain."""
        equality = row_filter.equality
        if equality is not None:
            verdict = equality.decide(row, self._subject)
            if verdict is not None:
                return verdict
        return _cel_keeps(row_filter, context, row)

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
            self._hidden.add(number_text(value))
        elif kind is dict:
            for item in value.values():
                self._hide(item)
        elif kind is list:
            for item in value:
                self._hide(item)


def _cel_keeps(row_filter: RowRule, context: cel.Context, row: Any) -> bool:
    """CEL's verdict on ``row`` (the ``row`` variable of ``context`` replaced)."""
    fields = row_filter.fields
    if fields is not None and type(row) is dict:
        row = {name: row[name] for name in fields if name in row}
    try:
        # Replacing "row" on the one per-response context costs only the row's conversion (measured).
        context.add_variable("row", row)
        return row_filter.keep.execute(context) is True  # exactly true: not 1, "true" or [x]
    except Exception:  # the binding's conversion and evaluation errors: fail closed, drop the row
        return False
