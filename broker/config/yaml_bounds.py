"""Bounds on a YAML document before it is composed (HOSTILE Y09): no recursive alias, no alias bomb, no deep nesting.

PyYAML's composer and our builder both recurse once per nesting level and follow aliases, so three inputs would end
in a ``RecursionError`` or an unbounded expansion instead of a located error:

- a recursive alias (``x: &a [*a]``): the anchor is registered before its content is composed, so an alias inside
  it builds a node that contains itself;
- an alias bomb ("billion laughs"): each level of aliases multiplies the nodes the builder walks;
- deep nesting (``[[[[...`` or aliases of deep anchors stacked on each other).

:func:`check_events` walks the parser's event stream (the parser itself keeps an explicit stack and never recurses)
and measures each of these with the aliases expanded, so ``x: &a [*a]`` or a 10-level laugh is refused at the line of
the alias that crosses the bound, before anything recursive runs. A pure function of the events: no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import yaml

#: nodes of the document once every alias is expanded (the builder walks each of them)
MAX_NODES: Final = 200_000
#: nesting levels once every alias is expanded; a config is ~10 deep, a tool's JSON Schema a few more
MAX_DEPTH: Final = 64


class YamlBoundError(Exception):
    """The document crosses a bound; ``line`` (1-based) is where."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


@dataclass
class _Open:
    """A collection whose end event has not come yet."""

    anchor: str | None
    line: int
    nodes: int = 1  # itself, then its content, expanded
    height: int = 1  # levels below and including itself, expanded


def check_events(events: Iterable[yaml.Event]) -> None:
    """Raise :class:`YamlBoundError` at the first event that makes the document recursive, too large or too deep.

    An undefined or duplicate anchor is left to the composer, which reports it with its own located message.
    """
    stack: list[_Open] = []
    done: dict[str, tuple[int, int]] = {}  # anchor -> (expanded nodes, expanded height) of a closed anchor
    total = 0

    def add(nodes: int, height: int, line: int, what: str) -> None:
        nonlocal total
        total += nodes
        if total > MAX_NODES:
            raise YamlBoundError(
                line, f"document too large: {what} takes it past {MAX_NODES} nodes (alias bomb?)"
            )
        if len(stack) + height > MAX_DEPTH:
            raise YamlBoundError(line, f"document too deep: {what} nests it past {MAX_DEPTH} levels")
        if stack:
            stack[-1].nodes += nodes
            stack[-1].height = max(stack[-1].height, height + 1)

    for event in events:
        line = event.start_mark.line + 1 if event.start_mark is not None else 1
        if isinstance(event, yaml.ScalarEvent):
            add(1, 1, line, "a value")
            if event.anchor is not None:
                done[event.anchor] = (1, 1)
        elif isinstance(event, yaml.AliasEvent):
            anchor = event.anchor
            opened = next((o for o in reversed(stack) if o.anchor == anchor), None)
            if opened is not None:
                raise YamlBoundError(
                    line,
                    f"recursive YAML alias *{anchor}: it is inside its own anchor &{anchor} "
                    f"(line {opened.line})",
                )
            nodes, height = done.get(anchor, (1, 1))
            add(nodes, height, line, f"alias *{anchor}")
        elif isinstance(event, yaml.CollectionStartEvent):
            # counted as one node now; its content is added to it (and to the total) as it comes
            add(1, 1, line, "a collection")
            if stack:
                stack[-1].nodes -= 1  # the parent gets this collection's whole count at its end instead
            stack.append(_Open(event.anchor, line))
        elif isinstance(event, yaml.CollectionEndEvent) and stack:
            closed = stack.pop()
            if closed.anchor is not None:
                done[closed.anchor] = (closed.nodes, closed.height)
            if stack:
                stack[-1].nodes += closed.nodes
                stack[-1].height = max(stack[-1].height, closed.height + 1)


def compose_bounded(text: str) -> yaml.Node | None:
    """``yaml.compose`` of one document after :func:`check_events`; YAML errors propagate as ``yaml.YAMLError``."""
    check_events(yaml.parse(text, Loader=yaml.SafeLoader))
    return yaml.compose(text, Loader=yaml.SafeLoader)
