"""``Mcp-Param-*`` headers (MCP 2026-07-28 transports, "Custom headers"): a tool's input schema may mark an argument
with ``x-mcp-header: <token>``; the client then mirrors that argument in ``Mcp-Param-<token>``, so intermediaries can
route on it. Pure, no I/O.

The broker checks what the agent sent against the agent's own arguments (present together and equal, else
``-32020``), then rebuilds the headers from the arguments it forwards (after server-side injection), so the
upstream never sees a header that disagrees with its body. Only annotations on a pure ``properties`` chain, with
an RFC 9110 token and a string/integer/boolean type, count (numbers are not portably renderable).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from broker.mcp.jsonrpc import decode_header_value, encode_header_value, mismatch

__all__ = ["check_param_headers", "param_headers"]

_TOKEN: Final = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

PARAM_PREFIX: Final = "mcp-param-"
_ANNOTATED_TYPES: Final = frozenset({"string", "integer", "boolean"})
_DECIMAL = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")


Annotation = tuple[tuple[str, ...], str, str]
#: annotations per schema object (pinned schemas are few and long-lived; the identity check guards id reuse)
_annotation_memo: dict[int, tuple[Any, tuple[Annotation, ...]]] = {}


def _annotations(schema: Any) -> tuple[Annotation, ...]:
    """(property path, header token, JSON type) of every ``x-mcp-header`` on a pure ``properties`` chain."""
    memo = _annotation_memo.get(id(schema))
    if memo is not None and memo[0] is schema:
        return memo[1]
    found: list[Annotation] = []
    stack: list[tuple[tuple[str, ...], Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        if not isinstance(node, dict):
            continue
        token = node.get("x-mcp-header")
        if (
            path
            and isinstance(token, str)
            and _TOKEN.fullmatch(token)
            and node.get("type") in _ANNOTATED_TYPES
        ):
            found.append((path, token, node["type"]))
        properties = node.get("properties")
        if isinstance(properties, dict):
            stack.extend(((*path, name), sub) for name, sub in properties.items())
    if len(_annotation_memo) >= 1024:
        _annotation_memo.clear()
    _annotation_memo[id(schema)] = (schema, tuple(found))
    return tuple(found)


def _value_at(arguments: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = arguments
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _render(value: Any) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return None


def param_headers(schema: Any, arguments: Mapping[str, Any]) -> dict[str, str]:
    """The ``Mcp-Param-*`` headers for ``arguments`` (what is forwarded, after injection)."""
    headers: dict[str, str] = {}
    for path, token, _ in _annotations(schema):
        rendered = _render(_value_at(arguments, path))
        if rendered is not None:
            headers[f"Mcp-Param-{token}"] = encode_header_value(rendered)
    return headers


def check_param_headers(
    schema: Any, arguments: Mapping[str, Any], headers: Iterable[tuple[str, str]]
) -> None:
    """Each annotated argument and its ``Mcp-Param-*`` header are present together and equal (-32020)."""
    annotations = _annotations(schema)
    if not annotations:  # the usual case: nothing mirrored, nothing to compare
        return
    sent: dict[str, list[str]] = {}
    for name, value in headers:
        if name.lower().startswith(PARAM_PREFIX):
            sent.setdefault(name.lower()[len(PARAM_PREFIX) :], []).append(value)
    for path, token, kind in annotations:
        values = sent.get(token.lower(), [])
        label = f"mcp-param-{token.lower()}"
        if len(values) > 1:
            raise mismatch(f"{label} (sent more than once)")
        value = _value_at(arguments, path)
        rendered = None if value is None else _render(value)
        if rendered is None:
            if values:
                raise mismatch(label)
            continue
        decoded = decode_header_value(values[0]) if values else None
        if decoded is None or not _param_matches(kind, value, rendered, decoded):
            raise mismatch(label)


def _param_matches(kind: str, value: Any, rendered: str, decoded: str) -> bool:
    # 2026-07-28: integer-typed values SHOULD compare numerically (42 equals 42.0), exactly, without floats
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if kind == "integer" and not isinstance(value, bool) and integral and _DECIMAL.fullmatch(decoded):
        whole, _, fraction = decoded.partition(".")
        return (not fraction or set(fraction) == {"0"}) and int(whole) == int(value)
    return decoded == rendered
