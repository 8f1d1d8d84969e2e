"""Tampering that always changes a value (a fixed suffix like ``+ "AA"`` equals the original now and then)."""

from __future__ import annotations


def flip_char(text: str, index: int = -2) -> str:
    """``text`` with the character at ``index`` replaced by a different one of the base64url alphabet.

    The default, the second-last character, carries six significant bits in any base64url string, so the
    decoded bytes change too (the last character may carry only padding bits)."""
    position = index % len(text)
    replacement = "B" if text[position] == "A" else "A"
    return text[:position] + replacement + text[position + 1 :]
