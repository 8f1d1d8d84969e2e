"""Hiding values: what a masked value becomes, and the scrub that removes every value a mask hid from a whole
outgoing message, in any casing or compatibility form (CONTRACT §12). Pure; used by
:mod:`broker.gateway.responses`."""

from __future__ import annotations

import re
from typing import Any, Final

from broker.policy.paths import fold_key, mask_leak

#: What a masked value becomes, followed by at most ``keep_last`` of its last characters.
MASK: Final = "****"


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


#: above this many (hidden value × text character) pairs, :func:`occurring` narrows the values by k-grams first
_DIRECT_SEARCH: Final = 1 << 22
_KGRAM: Final = 8


def occurring(hidden: set[str], message: Any) -> set[str]:
    """The hidden values that may occur in ``message`` (a superset, never less: what :class:`Scrubber` must see).

    Every string, key and number of the message that is at least as long (folded) as the shortest hidden value
    goes into one folded text; each hidden value is searched there. Many values over a long text are first
    narrowed to those whose first and last k-grams occur in it, so the cost stays near-linear in the answer."""
    folded: dict[str, list[str]] = {}
    for value in hidden:
        folded.setdefault(fold_key(value), []).append(value)
    shortest = min(len(value) for value in folded)
    texts: list[str] = []  # every string, key and number of the message, as it stands
    seen: set[int] = set()  # containers already read: an MCP result holds its document twice (one object)
    stack = [message]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is str:
            texts.append(node)
        elif kind is dict or kind is list:
            if id(node) in seen:
                continue
            seen.add(id(node))
            if kind is dict:
                texts.extend(node)
                stack.extend(node.values())
            else:
                stack.extend(node)
        elif kind is int or kind is float:
            texts.append(number_text(node))
    joined = "\x00".join(texts)
    if joined.isascii():  # the usual case: one lower() for all of it, short texts kept (a superset is fine)
        text = joined.lower()
    else:
        parts = [
            folded_text
            for folded_text in (text.lower() if text.isascii() else fold_key(text) for text in texts)
            if len(folded_text) >= shortest
        ]
        text = "\x00".join(parts)
    if len(text) < shortest:
        return set()
    candidates = list(folded)
    if len(candidates) * len(text) > _DIRECT_SEARCH:
        k = min(shortest, _KGRAM)
        grams = {text[index : index + k] for index in range(len(text) - k + 1)}
        candidates = [value for value in candidates if value[:k] in grams and value[-k:] in grams]
    return {original for value in candidates if value in text for original in folded[value]}


def number_text(value: int | float) -> str:
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
            raise mask_leak()
        return text

    def number(self, value: int | float) -> int | float | str:
        text = number_text(value)
        if self._long is not None and self._long.search(text):
            return MASK
        if self._short is not None and self._short.search(text):
            raise mask_leak()
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
                    raise mask_leak()  # two members that are one once scrubbed: neither can be passed as sent
                out[new_key] = self.scrub(item)
            return out
        if kind is list:
            return [self.scrub(item) for item in value]
        if kind is int or kind is float:
            return self.number(value)
        return value  # bool, null
