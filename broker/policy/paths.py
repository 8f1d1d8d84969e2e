"""Paths into JSON answers (``mask``, ``drop``, ``filter_rows``): dotted names, ``[]`` for every element, ``?``
for an optional step; keys compared after Unicode compatibility folding (HOSTILE P26). Pure; the rules they
serve are in :mod:`broker.gateway.filters`."""

from __future__ import annotations

import re
import unicodedata
from typing import Any, Final

from broker.errors import UpstreamError

#: what the agent is told when an answer cannot be filtered; the precise reason goes to audit
NOT_FILTERED: Final = "the tool backend's answer could not be filtered"


def unfilterable() -> UpstreamError:
    return UpstreamError(NOT_FILTERED, reason="response_unfilterable")


def shape_mismatch() -> UpstreamError:
    return UpstreamError(NOT_FILTERED, reason="response_shape")


def mask_leak() -> UpstreamError:
    return UpstreamError(NOT_FILTERED, reason="response_mask_leak")


#: A path step as :func:`parse_path` gives it: a folded object key, that key followed by ``?`` (it may be absent
#: or null), or EACH (``[]``: every element of an array).
EACH: Final = None
Step = str | None
#: A compiled step: (folded key, optional), or (EACH, False).
CompiledStep = tuple[str | None, bool]
CompiledPath = tuple[CompiledStep, ...]
NAME = r"[A-Za-z0-9_-]+"
_PATH_PART = re.compile(rf"(?:({NAME})(\?)?)?((?:\[\])*)")


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
                f"invalid path {path!r}: expected dotted names ({NAME}), each optionally followed by ? "
                "(may be absent or null) and by [] (a leading [] walks a top-level array)"
            )
        if match.group(1) is not None:
            steps.append(fold_key(match.group(1)) + (match.group(2) or ""))
        steps.extend([EACH] * (len(match.group(3)) // 2))
    return tuple(steps)


def compile_path(steps: tuple[Step, ...]) -> CompiledPath:
    return tuple(
        (EACH, False) if step is None else (step.removesuffix("?"), step.endswith("?")) for step in steps
    )


def walk(
    container: Any, key: Any, path: CompiledPath, index: int, strict: bool, out: list[tuple[Any, Any]]
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
                walk(node, position, path, index + 1, strict, out)
        else:
            walk(container, key, path, index + 1, strict, out)
    elif type(node) is dict:
        found = False
        for member in node:
            # Config names are ASCII, and lower() keeps an ASCII key's length: most keys are ruled out by length.
            if member == name or (
                (len(member) == len(name) or not member.isascii()) and fold_key(member) == name
            ):
                found = True
                if not (optional and node[member] is None):
                    walk(node, member, path, index + 1, strict, out)
        if strict and not found and not optional:
            raise shape_mismatch()
    elif type(node) is list:
        # A name applied to an array applies to each element (and through nested arrays): P26.
        for position in range(len(node)):
            walk(node, position, path, index, strict, out)
    elif strict:
        raise shape_mismatch()  # null or a scalar where a key must be looked up


def reach(holder: list[Any], path: CompiledPath, strict: bool) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    walk(holder, 0, path, 0, strict, out)
    return out
