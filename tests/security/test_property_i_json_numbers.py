"""HOSTILE T10/T11, CONTRACT §12 "Numbers outside the I-JSON range are refused in every notation": a property
over every spelling of a JSON number (sign, integer digits, fraction, exponent mark, exponent sign, leading
zeros in the exponent). The oracle is the literal's exact decimal value (``decimal.Decimal``): inside
±(2**53-1) the number is accepted as the nearest double (an integer literal as that int), outside it is
``json_number_out_of_range`` — never a silently rounded or infinite value, never another error.
"""

from __future__ import annotations

from decimal import Decimal

from hypothesis import example, given, settings
from hypothesis import strategies as st

from broker.canonical import I_JSON_MAX_INT, canonicalize, strict_loads
from broker.errors import InvalidRequest

SETTINGS = settings(max_examples=2000, deadline=None, database=None)

digits = st.text("0123456789", min_size=1, max_size=22)
integer_parts = st.one_of(
    st.just("0"),
    st.builds(lambda d, rest: d + rest, st.sampled_from("123456789"), st.text("0123456789", max_size=21)),
)
exponents = st.builds(
    lambda mark, sign, zeros, value: f"{mark}{sign}{'0' * zeros}{value}",
    st.sampled_from("eE"),
    st.sampled_from(["", "+", "-"]),
    st.integers(0, 30),
    st.integers(0, 420),
)
json_numbers = st.builds(
    lambda sign, whole, fraction, exponent: (
        f"{sign}{whole}{'.' + fraction if fraction else ''}{exponent or ''}"
    ),
    st.sampled_from(["", "-"]),
    integer_parts,
    st.one_of(st.none(), digits),
    st.one_of(st.none(), exponents),
)


@SETTINGS
@given(json_numbers)
@example("99999999999.99999e9")
@example("9007199254740991.4")
@example("9.007199254740991e15")
@example("1e-400")
@example("-0")
@example("1E400")
@example("1e0000000000000000016")
def test_t11_every_notation_is_judged_by_its_exact_value(literal: str) -> None:
    exact = Decimal(literal)
    in_range = abs(exact) <= I_JSON_MAX_INT
    for body in (f"[{literal}]", f'{{"amount":{literal}}}', f'{{"id":"x","amount":{literal},"n":1}}'):
        try:
            parsed = strict_loads(body.encode())
        except InvalidRequest as refused:
            assert not in_range, (literal, refused.reason)
            assert refused.reason == "json_number_out_of_range"
            continue
        assert in_range, literal
        value = parsed[0] if isinstance(parsed, list) else parsed["amount"]
        if any(c in literal for c in ".eE"):
            assert type(value) is float and value == float(literal)
        else:
            assert type(value) is int and value == int(literal)
        canonicalize(parsed)  # everything accepted has an RFC 8785 form (no inf, no int beyond 2**53)
