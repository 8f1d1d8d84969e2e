"""Property-based tests of RFC 8785 canonicalisation (broker.canonical): the bytes behind ``args_digest``.

The properties that make a parameter lock sound (HOSTILE T04–T11, P17, P18):
- one meaning, one byte string: key order, whitespace, escaping and number spelling never change the canonical
  bytes (T04, T07, T08), while any change of value does;
- the canonical bytes are JSON that parses back to the same value, and canonicalising them again is a no-op;
- member order is RFC 8785 §3.2.3 (UTF-16 code units), numbers are ECMAScript's shortest round-trip form;
- ``strict_loads`` is total: for any bytes it returns a value or raises ``InvalidRequest``, never anything else.

Hypothesis runs a bounded number of examples (``max_examples``) with no example database, so the suite stays
fast and leaves nothing behind in the tree.
"""

from __future__ import annotations

import json
import math
import random
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from broker.canonical import I_JSON_MAX_INT, args_digest, canonicalize, strict_loads
from broker.errors import BrokerError, InvalidRequest

SETTINGS = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

# Text without lone surrogates (they have no UTF-8 form and are refused: T08) — everything else is fair game,
# including controls, quotes, backslashes, astral characters and U+FFFF.
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
i_json_ints = st.integers(min_value=-I_JSON_MAX_INT, max_value=I_JSON_MAX_INT)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
# Doubles from 2**53 up to 1e21 are integers whose canonical form is a long integer literal, which strict_loads
# refuses (see test_t11_large_numbers_spelled_as_floats_are_consistent below); elsewhere the round trip holds.
# strict_loads admits the I-JSON range only (RFC 7493 §2.2): beyond 2**53 a float is refused (T11)
round_trip_floats = finite_floats.filter(lambda f: abs(f) <= I_JSON_MAX_INT)
scalars = st.none() | st.booleans() | i_json_ints | round_trip_floats | text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(text, inner, max_size=5),
    max_leaves=15,
)


def _same(left: Any, right: Any) -> bool:
    """JSON equality: numbers compare by value (1 == 1.0; JCS writes both as ``1``), containers structurally."""
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_same(left[k], right[k]) for k in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(_same(a, b) for a, b in zip(left, right, strict=True))
    if isinstance(left, bool) or isinstance(right, bool):
        return left is right
    return bool(left == right)


def _shuffled(value: Any, rng: random.Random) -> Any:
    """The same JSON value with every object's members inserted in another order."""
    if isinstance(value, dict):
        items = [(k, _shuffled(v, rng)) for k, v in value.items()]
        rng.shuffle(items)
        return dict(items)
    if isinstance(value, list):
        return [_shuffled(v, rng) for v in value]
    return value


@SETTINGS
@given(json_values)
def test_canonical_bytes_parse_back_to_the_same_value(value: Any) -> None:
    canonical = canonicalize(value)
    parsed = strict_loads(canonical, max_depth=64)
    assert _same(parsed, value)
    assert canonicalize(parsed) == canonical  # idempotent
    assert json.loads(canonical.decode("utf-8")) == parsed  # plain JSON, readable by any parser


@SETTINGS
@given(json_values, st.randoms(use_true_random=False))
def test_t07_member_order_never_changes_the_bytes(value: Any, rng: random.Random) -> None:
    assert canonicalize(_shuffled(value, rng)) == canonicalize(value)
    assert args_digest(_shuffled(value, rng)) == args_digest(value)


@SETTINGS
@given(
    json_values,
    st.sampled_from([None, 0, 2, "\t"]),
    st.booleans(),
    st.sampled_from([(",", ":"), (", ", ": "), (" ,", " : ")]),
)
def test_t08_whitespace_and_escaping_never_change_the_bytes(
    value: Any, indent: int | str | None, ascii_only: bool, separators: tuple[str, str]
) -> None:
    """Any JSON spelling of a value (indentation, ``\\u00e9`` versus ``é``) has the same canonical bytes."""
    spelled = json.dumps(value, indent=indent, ensure_ascii=ascii_only, separators=separators).encode("utf-8")
    assert canonicalize(strict_loads(spelled, max_depth=64)) == canonicalize(value)


@SETTINGS
@given(i_json_ints)
def test_t04_integer_spellings_share_one_form(number: int) -> None:
    """``1000``, ``1000.0``, ``1e3``: the same number, the same bytes (when the double is exact)."""
    spellings = [
        str(number).encode(),
        f"{number}.0".encode(),
        f"{number}e0".encode(),
        f"{number}E+0".encode(),
    ]
    if abs(number) < 2**53 and number % 1000 == 0 and number:
        spellings.append(f"{number // 1000}e3".encode())
    forms = {canonicalize(strict_loads(s)) for s in spellings}
    assert len(forms) == 1
    if abs(number) < 10**21:
        assert forms == {str(number).encode()}


@SETTINGS
@given(finite_floats)
@example(5e-324)
@example(1e21)
@example(1e-7)
@example(-0.0)
@example(9007199254740993.0)
def test_t04_numbers_are_the_shortest_ecmascript_round_trip(number: float) -> None:
    """RFC 8785 §3.2.2.3: parsing the form gives back the same double; the digits are the shortest that do."""
    form = canonicalize(number).decode()
    assert float(form) == number
    if number == 0:
        assert form == "0"  # -0 too (ECMA-262: "0")
    if "e" in form:
        mantissa, _, exponent = form.partition("e")
        assert exponent[0] in "+-" and exponent[1:] == str(int(exponent[1:]))
        assert 1 <= abs(float(mantissa)) < 10
        assert not 1e-6 <= abs(number) < 1e21  # ECMA-262 Number::toString: positional for 1e-6 <= |x| < 1e21
    else:
        assert not form.endswith(".0") and "E" not in form
    digits = form.lstrip("-").partition("e")[0].replace(".", "").strip("0")
    assert len(digits) <= len(repr(abs(number)).partition("e")[0].replace(".", "").strip("0"))


@SETTINGS
@given(
    st.dictionaries(
        st.text(st.characters(exclude_categories=["Cs"]), max_size=4), st.integers(0, 9), max_size=8
    )
)
def test_t07_members_are_sorted_by_utf16_code_units(members: dict[str, int]) -> None:
    parsed = json.loads(canonicalize(members))
    assert list(parsed) == sorted(members, key=lambda name: name.encode("utf-16-be"))


@SETTINGS
@given(json_values)
def test_canonical_text_has_no_raw_control_characters(value: Any) -> None:
    text = canonicalize(value).decode("utf-8")  # valid UTF-8
    assert not any(ord(c) < 0x20 for c in text)
    assert "\\u00" not in text.replace("\\u000", "").replace("\\u001", "")  # only controls are \\u-escaped


@SETTINGS
@given(json_values, json_values)
def test_t05_different_values_have_different_digests(left: Any, right: Any) -> None:
    assume(not _same(left, right))
    assert args_digest(left) != args_digest(right)


@SETTINGS
@given(st.binary(max_size=200))
def test_p18_strict_loads_is_total_on_arbitrary_bytes(data: bytes) -> None:
    try:
        value = strict_loads(data, max_depth=8)
    except InvalidRequest:
        return
    assert canonicalize(value)  # whatever it accepts has a canonical form


_JSONISH = st.lists(
    st.sampled_from(
        [
            "{",
            "}",
            "[",
            "]",
            ",",
            ":",
            '"a"',
            '"a"',
            '"\\ud800"',
            '"\\u00e9"',
            "1",
            "-0",
            "1e400",
            "1e3",
            "NaN",
            "Infinity",
            "true",
            "null",
            " ",
            "\ufeff",
            "9" * 20,
            '"\x00"',
            "0x1",
            ".5",
            '"\\x"',
            "\u2028",
        ]
    ),
    max_size=40,
)


@SETTINGS
@given(_JSONISH)
def test_t06_t10_t11_strict_loads_refuses_or_accepts_one_meaning(tokens: list[str]) -> None:
    """Token soup near the hostile rows: duplicate members, NaN, 1e400, 20-digit integers, lone surrogates, BOM.
    Anything accepted is unambiguous: no duplicates, every number finite and (if integral) within I-JSON."""
    data = "".join(tokens).encode("utf-8")
    try:
        value = strict_loads(data, max_depth=16)
    except InvalidRequest as refusal:
        assert refusal.reason.startswith("json_")
        return
    except BrokerError as other:  # pragma: no cover - a failure message, not a branch
        raise AssertionError(f"unexpected refusal class {type(other).__name__}") from other
    canonicalize(value)
    objects: list[list[tuple[str, Any]]] = []

    def remember(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        objects.append(pairs)
        return dict(pairs)

    json.loads(data, object_pairs_hook=remember)  # a lenient second parser: did any object repeat a member?
    assert all(len({k for k, _ in pairs}) == len(pairs) for pairs in objects)


@SETTINGS
@given(
    st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda f: f != int(f) if math.isfinite(f) else False
    )
)
def test_t04_non_integral_numbers_keep_their_value(number: float) -> None:
    assert float(canonicalize(strict_loads(repr(number).encode()))) == number


_BIG_DIGITS = st.tuples(st.sampled_from(["", "-"]), st.text("0123456789", min_size=16, max_size=6000))


@SETTINGS
@given(_BIG_DIGITS.filter(lambda t: abs(int(t[0] + "1" + t[1])) > I_JSON_MAX_INT))
def test_t11_integers_outside_i_json_are_refused(sign_digits: tuple[str, str]) -> None:
    """Integer literals beyond ±(2**53-1), up to 6000 digits (past Python's 4300-digit int() limit): 400."""
    text = (sign_digits[0] + "1" + sign_digits[1]).encode()
    try:
        strict_loads(text)
    except InvalidRequest as refusal:
        assert refusal.reason == "json_number_out_of_range"
    else:  # pragma: no cover
        raise AssertionError("accepted an integer outside the I-JSON range")


@pytest.mark.parametrize(
    "spelling",
    [b"1e16", b"9007199254740993.0", b"-9.007199254740993e15", b"12345678901234567890.5"],
    ids=["T11-1e16", "T11-2**53+1-as-float", "T11-negative-exponent-form", "T11-20-digit-float"],
)
def test_t11_large_numbers_spelled_as_floats_are_consistent(spelling: bytes) -> None:
    """Either refused like the integer spelling (T11), or canonical bytes that strict_loads accepts back.

    Today neither: ``strict_loads`` refuses integer literals beyond ±(2**53-1) but accepts the same magnitude as a
    float (``1e16``, ``9007199254740993.0``, which silently becomes 9007199254740992), and ``canonicalize`` then
    writes it as an integer literal (ECMAScript form below 1e21) that ``strict_loads`` refuses. The broker forwards
    those bytes, so a backend that checks the body with ``broker.sdk.backend`` (strict_loads) refuses an allowed call,
    and T11's range rule depends on how the number is spelled."""
    try:
        value = strict_loads(spelling)
    except InvalidRequest as refusal:
        assert refusal.reason == "json_number_out_of_range"
        return
    canonical = canonicalize(value)
    try:
        assert strict_loads(canonical) == value
    except InvalidRequest as refusal:
        raise AssertionError(
            f"strict_loads refuses its own canonical bytes {canonical!r} ({refusal.reason})"
        ) from None


def test_t04_every_double_bit_pattern_sample_round_trips() -> None:
    """A fixed, seeded sample of raw bit patterns (subnormals, huge exponents) on top of the strategies above."""
    rng = random.Random(8785)
    for _ in range(2000):
        number = struct.unpack(">d", rng.getrandbits(64).to_bytes(8, "big"))[0]
        if math.isfinite(number):
            assert float(canonicalize(number)) == number
