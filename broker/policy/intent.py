"""Structured intent: RFC 9396 ``authorization_details`` of type ``tool_invocation`` (CONTRACT §17). Pure: JSON
values in, a frozen value (or a refusal reason) out.

**In an access token** (claim ``authorization_details``, read by :func:`parse_token_details` at identity time), the
``tool_invocation`` entries bound what the agent may do for the subject, whatever policy allows::

    {"type": "tool_invocation", "tool": <name>,
     "constraints"?: {<arg>_max: <number>, <arg>: <exact JSON value>, ...},
     "arguments"?: {<the exact arguments>}, "locations"?: [<resource server URL>, ...]}

- a tool is visible iff an entry names it (and, when the entry has ``locations``, lists this broker's public URL:
  an entry for another resource server bounds nothing here);
- a call is permitted iff one entry for its tool permits its arguments (the agent's, before server-side injection):
  every constraint holds — ``<arg>_max`` (a member whose name ends in ``_max`` and whose value is a number): the
  argument ``<arg>`` is present, a number and at most that value; any other member ``<arg>``: the argument is
  present and equal to the value (RFC 8785 equality: ``1`` = ``1.0``, ``"1"`` ≠ ``1``) — and, with
  ``arguments``, the call's arguments are exactly those;
- entries of any other ``type`` are ignored: they are another API's business (RFC 9396 §2: types are defined per
  resource). A token with no ``tool_invocation`` entry (``[]``, or only other types) is not bounded by this module.
- a claim that cannot be read — not an array, an entry that is not an object or has no string ``type``, a
  ``tool_invocation`` entry with an unknown member or a member of the wrong type — raises :class:`IntentError`:
  a token whose bounds cannot be read must not pass as unbounded (the caller answers ``401 invalid_token``).

**At the token exchange** (:func:`parse_requested`), the one entry an agent may send instead of
``request_details``: ``{"type": "tool_invocation", "tool": <name>, "arguments"?: {...}, "locations"?: [<url>]}``
(RFC 9396 §5: anything else is ``invalid_authorization_details``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from broker.canonical import canonicalize

__all__ = [
    "TOOL_INVOCATION",
    "Bound",
    "Entry",
    "Intent",
    "IntentError",
    "RequestedCall",
    "parse_requested",
    "parse_token_details",
]

TOOL_INVOCATION: Final = "tool_invocation"
_MAX_SUFFIX: Final = "_max"
_TOKEN_MEMBERS: Final = frozenset({"type", "tool", "constraints", "arguments", "locations"})
_REQUEST_MEMBERS: Final = frozenset({"type", "tool", "arguments", "locations"})
#: what a refusal quotes of a name (tool, argument) that comes from the token or the agent
_MAX_NAME: Final = 64


class IntentError(ValueError):
    """``authorization_details`` that cannot be read. ``reason`` is a stable code (audit, metrics label); the
    message says precisely what is wrong, for the client."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


_I_JSON_MAX: Final = 2**53 - 1


def _quote(name: str) -> str:
    return repr(name if len(name) <= _MAX_NAME else name[:_MAX_NAME] + "…")


def _is_number(value: Any) -> bool:
    """A JSON number in the I-JSON range (|x| ≤ 2^53−1): a bigger integer is no bound anyone meant (and
    ``math.isfinite`` would raise OverflowError on it)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    if isinstance(value, int):
        return abs(value) <= _I_JSON_MAX
    return math.isfinite(value) and abs(value) <= _I_JSON_MAX


def _canonical(value: Any, where: str, reason: str) -> bytes:
    try:
        return canonicalize(value)
    except (TypeError, ValueError):
        raise IntentError(f"{where} has no exact JSON form", reason) from None


@dataclass(frozen=True, slots=True)
class Bound:
    """One constraint on one argument: at most ``maximum``, or exactly the JSON value whose RFC 8785 bytes are
    ``exact``. ``member`` is the constraint's name in the token (``amount_max``, ``department``)."""

    member: str
    argument: str
    maximum: int | float | None = None
    exact: bytes | None = None

    def problem(self, arguments: Mapping[str, Any]) -> str | None:
        if self.argument not in arguments:
            return f"argument {_quote(self.argument)} is required by {self.member}"
        value = arguments[self.argument]
        if self.maximum is not None:
            if not _is_number(value) or value > self.maximum:
                return f"{self.argument} must be a number at most {self.member} {self.maximum}"
            return None
        try:
            same = canonicalize(value) == self.exact
        except (TypeError, ValueError):
            same = False
        return None if same else f"{self.argument} must equal the value of constraint {_quote(self.member)}"


@dataclass(frozen=True, slots=True)
class Entry:
    """One ``tool_invocation`` entry that applies here; ``index`` is its position in the token's array."""

    index: int
    tool: str
    bounds: tuple[Bound, ...] = ()
    #: RFC 8785 bytes of the exact arguments the entry allows, when it names them
    arguments: bytes | None = None

    @property
    def label(self) -> str:
        return f"authorization_details[{self.index}] ({self.tool})"

    def problem(self, arguments: Mapping[str, Any]) -> str | None:
        """Why this entry does not permit ``arguments`` (the first failing constraint), or None."""
        if self.arguments is not None:
            try:
                same = canonicalize(dict(arguments)) == self.arguments
            except (TypeError, ValueError):
                same = False
            if not same:
                return "arguments must be exactly the entry's arguments"
        for bound in self.bounds:
            problem = bound.problem(arguments)
            if problem is not None:
                return problem
        return None


@dataclass(frozen=True, slots=True)
class Intent:
    """The bounds an access token's ``tool_invocation`` entries set (only those that apply to this broker)."""

    entries: tuple[Entry, ...]

    def visible(self, tool: str) -> bool:
        """Whether an entry names ``tool``: discovery and the visibility stage show nothing else."""
        return any(entry.tool == tool for entry in self.entries)

    def permits(self, tool: str, arguments: Mapping[str, Any]) -> str | None:
        """None when one entry for ``tool`` permits ``arguments``; else why not, naming each entry tried
        (``authorization_details[0] (approveExpense): amount must be a number at most amount_max 5000``)."""
        problems = []
        for entry in self.entries:
            if entry.tool != tool:
                continue
            problem = entry.problem(arguments)
            if problem is None:
                return None
            problems.append(f"{entry.label}: {problem}")
        if not problems:
            return f"no authorization_details entry names {_quote(tool)}"
        return "; ".join(problems)


def _applies_here(locations: Any, public_url: str, where: str, reason: str) -> bool:
    if not isinstance(locations, list) or not locations or not all(isinstance(u, str) for u in locations):
        raise IntentError(f"{where}.locations must be a non-empty array of strings", reason)
    return any(url.rstrip("/") == public_url.rstrip("/") for url in locations)


def _bounds(constraints: Any, where: str) -> tuple[Bound, ...]:
    reason = "token_authorization_details"
    if not isinstance(constraints, dict):
        raise IntentError(f"{where}.constraints must be a JSON object", reason)
    bounds = []
    for member, value in constraints.items():
        argument = member.removesuffix(_MAX_SUFFIX)
        if argument != member and argument and _is_number(value):
            bounds.append(Bound(member=member, argument=argument, maximum=value))
        elif argument != member and argument:
            raise IntentError(f"{where}.constraints.{member} must be a number", reason)
        else:
            exact = _canonical(value, f"{where}.constraints.{member}", reason)
            bounds.append(Bound(member=member, argument=member, exact=exact))
    return tuple(bounds)


def parse_token_details(value: Any, *, public_url: str) -> Intent | None:
    """The bounds of an access token's ``authorization_details`` claim (its JSON value; absent: don't call).

    None when the claim has no ``tool_invocation`` entry (the token is not bounded by intent); raises
    :class:`IntentError` (reason ``token_authorization_details``) when it cannot be read."""
    reason = "token_authorization_details"
    if not isinstance(value, list):
        raise IntentError("authorization_details must be a JSON array (RFC 9396 §2)", reason)
    entries = []
    bounded = False
    for index, item in enumerate(value):
        where = f"authorization_details[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("type"), str):
            raise IntentError(f"{where} must be an object with a string type (RFC 9396 §2)", reason)
        if item["type"] != TOOL_INVOCATION:
            continue  # another API's type: not ours to interpret
        bounded = True
        unknown = sorted(set(item) - _TOKEN_MEMBERS)
        if unknown:
            raise IntentError(f"{where} has unknown member {_quote(unknown[0])}", reason)
        tool = item.get("tool")
        if not isinstance(tool, str) or not tool:
            raise IntentError(f"{where}.tool must be a non-empty string", reason)
        bounds = _bounds(item["constraints"], where) if "constraints" in item else ()
        exact = None
        if "arguments" in item:
            if not isinstance(item["arguments"], dict):
                raise IntentError(f"{where}.arguments must be a JSON object", reason)
            exact = _canonical(item["arguments"], f"{where}.arguments", reason)
        if "locations" in item and not _applies_here(item["locations"], public_url, where, reason):
            continue  # an entry for another resource server: it permits nothing here
        entries.append(Entry(index=index, tool=tool, bounds=bounds, arguments=exact))
    return Intent(tuple(entries)) if bounded else None


@dataclass(frozen=True, slots=True)
class RequestedCall:
    """The exchange's one ``tool_invocation`` entry: the tool and the exact arguments the txn token will lock."""

    tool: str
    arguments: dict[str, Any]


def parse_requested(value: Any, *, public_url: str) -> RequestedCall:
    """The token exchange's ``authorization_details`` (parsed JSON): exactly one ``tool_invocation`` entry with
    ``tool``, optional ``arguments`` (an object, default ``{}``) and optional ``locations`` (which must then list
    ``public_url``). Raises :class:`IntentError` with a precise message (RFC 9396 §5)."""
    if not isinstance(value, list):
        raise IntentError("authorization_details must be a JSON array (RFC 9396 §2)", "details_not_array")
    if len(value) != 1:
        raise IntentError(
            f"authorization_details must hold exactly one entry, not {len(value)}", "details_entries"
        )
    (item,) = value
    where = "authorization_details[0]"
    if not isinstance(item, dict):
        raise IntentError(f"{where} must be a JSON object", "details_entry")
    if item.get("type") != TOOL_INVOCATION:
        raise IntentError(f'{where}.type must be "{TOOL_INVOCATION}"', "details_type")
    unknown = sorted(set(item) - _REQUEST_MEMBERS)
    if unknown:
        raise IntentError(f"{where} has unknown member {_quote(unknown[0])}", "details_unknown_member")
    tool = item.get("tool")
    if not isinstance(tool, str) or not tool:
        raise IntentError(f"{where}.tool must be a non-empty string", "details_tool")
    arguments = item.get("arguments", {})
    if not isinstance(arguments, dict):
        raise IntentError(f"{where}.arguments must be a JSON object", "details_arguments")
    if "locations" in item and not _applies_here(item["locations"], public_url, where, "details_locations"):
        raise IntentError(f"{where}.locations must include {public_url}", "details_locations")
    return RequestedCall(tool=tool, arguments=arguments)
