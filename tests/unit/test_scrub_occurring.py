"""``occurring`` (broker.policy.scrub) may return more hidden values than occur, never fewer: every hidden value
found (folded) inside any string, key or number of a message is in its answer. Checked against a brute force
over generated messages (ASCII and not, nested, numbers, short texts), so a faster walk cannot drop one."""

from __future__ import annotations

import random
from typing import Any

import pytest

from broker.policy.paths import fold_key
from broker.policy.scrub import number_text, occurring

ALPHABET = ["a", "B", "7", "-", "ſ", "Ｓ", "é", "ß", "\u0130", "\x00", " "]


def _text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 8)))


def _message(rng: random.Random, depth: int = 0) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.3:
        return rng.choice([_text(rng), rng.randint(-(10**6), 10**6), rng.random() * 1000, True, None])
    if roll < 0.65:
        return {_text(rng): _message(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return [_message(rng, depth + 1) for _ in range(rng.randint(0, 4))]


def _texts(value: Any) -> list[str]:
    if type(value) is str:
        return [value]
    if type(value) is dict:
        return [text for key, item in value.items() for text in (key, *_texts(item))]
    if type(value) is list:
        return [text for item in value for text in _texts(item)]
    if type(value) is int or type(value) is float:
        return [number_text(value)]
    return []


def _brute_force(hidden: set[str], message: Any) -> set[str]:
    folded = [fold_key(text) for text in _texts(message)]
    return {value for value in hidden if any(fold_key(value) in text for text in folded)}


@pytest.mark.parametrize("seed", range(400))
def test_occurring_never_misses_a_hidden_value(seed: int) -> None:
    rng = random.Random(seed)
    message = _message(rng)
    texts = _texts(message)
    # hidden values: pieces of the message's own texts (so they do occur), and unrelated ones
    hidden = {text[rng.randint(0, len(text) // 2) :] for text in texts if text and rng.random() < 0.5}
    hidden |= {_text(rng) or "x" for _ in range(3)}
    hidden.discard("")
    if not hidden:
        hidden = {"zz"}
    assert _brute_force(hidden, message) <= occurring(hidden, message)


@pytest.mark.parametrize("seed", range(100))
def test_a_value_held_twice_is_read_once_and_still_found(seed: int) -> None:
    # an MCP result holds its document as structuredContent and as its text content: one object, twice
    rng = random.Random(seed)
    document = _message(rng)
    message = {"content": [{"type": "text", "text": document}], "structuredContent": document}
    texts = _texts(document)
    hidden = {text for text in texts if text and rng.random() < 0.5} | {"absent-value"}
    assert _brute_force(hidden, message) <= occurring(hidden, message)
    assert "absent-value" not in occurring(hidden, message)
