"""Strict JSON in, RFC 8785 canonical JSON out: the bytes behind ``args_digest`` and the audit hash chain.

Two halves, both pure:

- :func:`strict_loads` is the only way request JSON enters the broker. It refuses everything on which two
  parsers could disagree (HOSTILE.md T06, T08, T10, T11, P17, P18): bytes that are not UTF-8, duplicate
  members, non-finite numbers, integers outside the I-JSON range, lone surrogates, excessive nesting and
  trailing data. What it accepts has exactly one meaning, so hashing it is safe.
- :func:`canonicalize` is RFC 8785 (JCS): sorted members (UTF-16 code units), no whitespace, minimal string
  escapes, ECMAScript number formatting. :func:`args_digest` hashes it (CONTRACT §5 parameter lock).

Speed matters (every request body goes through here): both use the C-accelerated stdlib ``json`` pieces and
only drop to Python for the hooks and for the rare slow paths (deep or surrogate-bearing input).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from decimal import Decimal
from json.encoder import encode_basestring  # the C encoder when available; ensure_ascii=False escaping
from typing import Any

from broker.errors import InvalidRequest
from broker.jose import b64url_encode

__all__ = ["I_JSON_MAX_INT", "args_digest", "canonicalize", "strict_loads"]

#: RFC 7493 §2.2: integers a receiver may rely on being exact (IEEE 754 binary64 safe range).
I_JSON_MAX_INT = 2**53 - 1
# len("-9007199254740991"): a longer digit string is out of range without converting it, which also keeps us
# clear of the 4300-digit int() limit (CVE-2020-10735) and its ValueError.
_MAX_INT_CHARS = len(str(-I_JSON_MAX_INT))

# A JSON string, as bytes: the unrolled form is linear (no catastrophic backtracking) on a 1 MiB string.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Depth scan: delete everything but the four bracket bytes, and fold "{" "}" onto "[" "]".
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_FOLD_BRACES = bytes.maketrans(b"{}", b"[]")
# A \uD800-\uDFFF escape somewhere (maybe a valid pair): only then do we walk the result for lone surrogates.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_ABOVE_SURROGATE_START = re.compile("[\ud800-\U0010ffff]")


def _refuse(description: str, reason: str) -> InvalidRequest:
    return InvalidRequest(description, reason=reason)


def _pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # HOSTILE T06: Python keeps the last duplicate, other parsers the first; refuse rather than pick one.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _refuse("duplicate member in JSON object", "json_duplicate_member")
    return result


def _parse_constant(name: str) -> Any:
    # HOSTILE T10: json accepts NaN, Infinity and -Infinity by default; none of them is JSON (RFC 8259 §6).
    raise _refuse("non-finite number in JSON", "json_non_finite_number")


def _parse_int(text: str) -> int:
    if len(text) < 16:  # at most 15 digits: below 10**15 < 2**53, no range check needed
        return int(text)
    if len(text) > _MAX_INT_CHARS:
        raise _refuse("integer out of range", "json_number_out_of_range")
    value = int(text)
    if not -I_JSON_MAX_INT <= value <= I_JSON_MAX_INT:
        raise _refuse("integer out of range", "json_number_out_of_range")
    return value


def _parse_float(text: str) -> float:
    value = float(text)
    # 1e400 overflows to inf (HOSTILE T10); at or beyond 2**53 a double no longer holds every integer, so
    # 9007199254740993.0 silently becomes ...992 and 1e16 canonicalises to a 17-digit integer this parser
    # refuses: the same I-JSON range as integers (RFC 7493 §2.2, HOSTILE T11), on the number's exact value.
    # Rounding to a double is monotonic, so a value whose double is below the bound is inside it; only at
    # or above it (or inf) can the exact decimal lie outside (9007199254740991.4 rounds to ...991.0).
    if abs(value) >= I_JSON_MAX_INT and (math.isinf(value) or abs(Decimal(text)) > I_JSON_MAX_INT):
        raise _refuse("number out of range", "json_number_out_of_range")
    return value


# strict=True: raw control characters inside strings are a syntax error (RFC 8259 §7).
_CHECKED_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs_to_dict,
    parse_constant=_parse_constant,
    parse_int=_parse_int,
    parse_float=_parse_float,
    strict=True,
)
# For text in which no number can be out of range: C-speed int and float parsing, no per-number hook.
_FAST_DECODER = json.JSONDecoder(
    object_pairs_hook=_pairs_to_dict, parse_constant=_parse_constant, strict=True
)
# Number shape: digits -> "0", exponent marks -> "e". A number without an exponent whose digit runs are all
# shorter than 16 is below 10**15 < 2**53, inside the I-JSON range; any exponent, whatever its digits
# (99999999999.99999e9 is 1e20), and any run of 16 digits go to the checked path, which refuses what is
# beyond ±(2**53-1).
_NUMBER_SHAPE = bytes.maketrans(b"0123456789E", b"0000000000e")
_SIXTEEN_DIGITS = b"0" * 16


def _decoder_for(data: bytes) -> json.JSONDecoder:
    shape = data.translate(_NUMBER_SHAPE)
    if _SIXTEEN_DIGITS in shape or b"0e" in shape:
        return _CHECKED_DECODER  # also taken for such text inside strings: slower, never wrong
    return _FAST_DECODER


def _nests_deeper_than(data: bytes, max_depth: int) -> bool:
    """Whether containers in ``data`` nest more than ``max_depth`` deep; iterative, never recursive.

    Strings are cut out first (on the UTF-8 bytes: multi-byte sequences never contain ASCII bytes, so no
    quote or bracket is mistaken), leaving only brackets. Each ``replace("[]", "")`` pass then removes
    exactly the innermost level (replace does not rescan what it produced), so what survives ``max_depth``
    passes is deeper than allowed. Every pass runs at C speed (a few ms per MiB of brackets). On input that
    is not JSON the answer is merely some answer; the parser reports the syntax error.
    """
    # Without a backslash no string holds an escaped quote, so quotes alone delimit strings (and splitting
    # on them is several times faster than the regex).
    outside = b"".join(data.split(b'"')[::2]) if b"\\" not in data else _STRING.sub(b"", data)
    brackets = outside.translate(_FOLD_BRACES, _NOT_BRACKETS)
    too_many_openers = b"[" * (max_depth + 1)  # the usual attack shape, found in one C-speed search
    for _ in range(max_depth):
        if not brackets:
            return False
        if too_many_openers in brackets:
            return True
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)


def _has_lone_surrogate(value: Any) -> bool:
    # Only reached when the text holds a surrogate escape; depth is already bounded, so recursion is safe.
    if isinstance(value, str):
        return _LONE_SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(_has_lone_surrogate(k) or _has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(v) for v in value)
    return False


def strict_loads(data: bytes, *, max_depth: int = 32) -> Any:
    """Parse one JSON value from UTF-8 ``data``, refusing anything ambiguous; raises InvalidRequest.

    ``reason`` codes: ``json_not_utf8`` (invalid UTF-8, a BOM, UTF-16/32 bytes), ``json_syntax`` (including
    trailing data and a second top-level value), ``json_duplicate_member``, ``json_non_finite_number``
    (NaN, Infinity), ``json_number_out_of_range``, ``json_lone_surrogate``, ``json_too_deep`` (more than
    ``max_depth`` nested arrays/objects). Numbers with a fraction or exponent become ``float``, others
    ``int``; objects are ``dict``, arrays ``list``.

    Numbers (RFC 7493 §2.2, I-JSON; HOSTILE T10, T11): the *exact decimal value* of the literal, whatever
    its spelling (fraction, exponent of any length, leading zeros in the exponent, ``E`` or ``e``), must lie
    within ±(2**53-1), else ``json_number_out_of_range``: ``9007199254740992``, ``9.007199254740992e15``,
    ``99999999999.99999e9``, ``9007199254740991.4``, ``1E400`` and ``1e0000000000000000016`` are all refused.
    Inside the range a non-integer becomes the nearest double, as in every JSON parser: ``0.1`` is the double
    0.1, and ``1e-400`` underflows to ``0.0`` (accepted: what is hashed, audited and forwarded is the
    RFC 8785 form of that double, so the value executed is the value decided on). ``-0`` and ``-0.0`` are
    accepted and are zero (RFC 8785 serialises them as ``0``).
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("strict_loads takes bytes")
    data = bytes(data)
    # P18: json.loads(bytes) would sniff UTF-16/32 and skip a BOM; we take UTF-8 only. UTF-16/32 text of
    # ASCII is valid UTF-8 full of NULs, which JSON never contains outside strings (and never raw inside).
    if data.startswith(b"\xef\xbb\xbf") or b"\x00" in data:
        raise _refuse("JSON body must be UTF-8 without BOM", "json_not_utf8")
    try:
        text = data.decode("utf-8")  # strict: also refuses encoded surrogates (ED A0 80) and overlongs
    except UnicodeDecodeError:
        raise _refuse("JSON body must be UTF-8", "json_not_utf8") from None
    # P17: measure depth before the C scanner recurses. Fewer opening brackets than the limit (the common
    # case, counted even inside strings) cannot nest deeper than it, so most bodies skip the scan.
    if text.count("[") + text.count("{") > max_depth and _nests_deeper_than(data, max_depth):
        raise _refuse(f"JSON nested deeper than {max_depth}", "json_too_deep")
    try:
        value = _decoder_for(data).decode(text)
    except json.JSONDecodeError:
        raise _refuse("malformed JSON", "json_syntax") from None
    except RecursionError:  # second line of defence only: the depth scan above is the guard
        raise _refuse(f"JSON nested deeper than {max_depth}", "json_too_deep") from None
    # T08: "\ud800" escapes decode to a lone surrogate, which is not Unicode text and cannot be canonicalized.
    if _SURROGATE_ESCAPE.search(text) is not None and _has_lone_surrogate(value):
        raise _refuse("lone surrogate in JSON string", "json_lone_surrogate")
    return value


# ---------------------------------------------------------------------------------------------------------
# RFC 8785 serialization


def _es_number(value: float) -> str:
    """ECMAScript Number.prototype.toString (ECMA-262 §7.1.12.1; RFC 8785 §3.2.2.3) of a finite double.

    Python's ``repr`` yields the shortest digit string that round-trips (correctly rounded, as ES requires);
    only the layout differs, so we take repr's digits and exponent and lay them out the ES way.
    """
    if value == 0:
        return "0"  # covers -0: ES prints "0"
    if math.isinf(value) or math.isnan(value):
        raise ValueError("RFC 8785 §3.2.2.2: NaN and Infinity have no JSON form")
    shortest = repr(value)
    if "e" not in shortest:
        # repr is positional only for 1e-4 <= |value| < 1e16, inside ES's positional range (1e-7, 1e21):
        # the same digits in the same layout, except repr's ".0" on integral values.
        return shortest[:-2] if shortest.endswith(".0") else shortest
    sign = "-" if value < 0 else ""
    mantissa, _, exp_text = shortest.lstrip("-").partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = int_part + frac_part
    # value = 0.digits × 10**point; normalise so digits has no leading or trailing zeros
    point = len(int_part) + (int(exp_text) if exp_text else 0)
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    k, n = len(digits), point
    if k <= n <= 21:
        return sign + digits + "0" * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + "." + digits[n:]
    if -6 < n <= 0:
        return sign + "0." + "0" * -n + digits
    exponent = f"e{'+' if n - 1 >= 0 else '-'}{abs(n - 1)}"
    if k == 1:
        return sign + digits + exponent
    return sign + digits[0] + "." + digits[1:] + exponent


def _utf16_key(name: str) -> bytes:
    # RFC 8785 §3.2.3: members sort by UTF-16 code units; big-endian UTF-16 bytes compare the same way.
    return name.encode("utf-16-be")


def _serialize(value: Any, out: list[str]) -> None:
    # Exact type checks first, most frequent first: this runs for every audit record and every digest.
    kind = type(value)
    if kind is str:
        # encode_basestring escapes exactly JCS's set (RFC 8785 §3.2.2.2): \" \\ \b \f \n \r \t, other
        # controls as lowercase \u00xx, everything else literal.
        out.append(encode_basestring(value))
    elif kind is dict:
        names = sorted(value)  # TypeError for non-string names (they cannot be compared or joined)
        joined = "".join(names)
        # RFC 8785 §3.2.3 sorts by UTF-16 code units, which differs from code-point order only once a name
        # holds a character at or above U+D800; ASCII names (the usual case) skip the check.
        if not joined.isascii() and _ABOVE_SURROGATE_START.search(joined) is not None:
            names.sort(key=_utf16_key)
        out.append("{")
        separator = ""
        for name in names:
            out.append(separator)
            out.append(encode_basestring(name))
            out.append(":")
            _serialize(value[name], out)
            separator = ","
        out.append("}")
    elif kind is int:
        if not -I_JSON_MAX_INT <= value <= I_JSON_MAX_INT:
            # A JCS number is a double: a larger int would be silently rounded, so the digest would lie.
            raise ValueError("integer outside the I-JSON range has no exact RFC 8785 form")
        out.append(str(value))
    elif kind is float:
        out.append(_es_number(value))
    elif value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif kind is list or kind is tuple:
        out.append("[")
        separator = ""
        for item in value:
            out.append(separator)
            _serialize(item, out)
            separator = ","
        out.append("]")
    # Subclasses (StrEnum, IntEnum, OrderedDict, ...) serialise as their JSON base type.
    elif isinstance(value, str):
        _serialize(str.__str__(value), out)
    elif isinstance(value, int):
        _serialize(int(value), out)
    elif isinstance(value, float):
        _serialize(float(value), out)
    elif isinstance(value, dict):
        _serialize(dict(value), out)
    elif isinstance(value, list | tuple):
        _serialize(list(value), out)
    else:
        raise TypeError(f"{kind.__name__} is not a JSON value")


def canonicalize(value: Any) -> bytes:
    """RFC 8785 canonical UTF-8 bytes of a JSON value (dict/list/tuple/str/int/float/bool/None).

    Raises ValueError for NaN/Infinity, for ints outside ±(2**53-1), and (UnicodeEncodeError) for strings
    holding lone surrogates; TypeError for anything that is not a JSON value.
    """
    out: list[str] = []
    _serialize(value, out)
    return "".join(out).encode("utf-8")


def args_digest(arguments: Any) -> str:
    """CONTRACT §5: base64url (no padding) of SHA-256 over the JCS bytes of the tool arguments."""
    return b64url_encode(hashlib.sha256(canonicalize(arguments)).digest())
