"""broker.canonical: RFC 8785 (JCS) vectors, args_digest invariants (HOSTILE T04–T08) and strict parsing
refusals (T06, T08, T10, T11, P17, P18)."""

from __future__ import annotations

import base64
import enum
import hashlib
import itertools
import json
import struct
import unicodedata
from typing import Any

import pytest

from broker.canonical import I_JSON_MAX_INT, args_digest, canonicalize, strict_loads
from broker.errors import InvalidRequest

# ---------------------------------------------------------------------------------------------------------
# factories


def from_bits(hex_bits: str) -> float:
    """The IEEE 754 double with these 64 bits (how RFC 8785 Appendix B states its samples)."""
    return float(struct.unpack(">d", bytes.fromhex(hex_bits))[0])


def digest_of(body: bytes) -> str:
    """args_digest of a request body as the broker computes it: strict parse, then JCS."""
    return args_digest(strict_loads(body))


def nested(depth: int, *, opener: str = "[", closer: str = "]") -> bytes:
    return (opener * depth + closer * depth).encode()


def nested_objects(depth: int) -> bytes:
    return ('{"a":' * depth + "1" + "}" * depth).encode()


# ---------------------------------------------------------------------------------------------------------
# RFC 8785 Appendix B: number serialization samples (ECMAScript Number.prototype.toString)

APPENDIX_B = [
    ("0000000000000000", "0", "zero"),
    ("8000000000000000", "0", "minus-zero"),
    ("0000000000000001", "5e-324", "min-pos"),
    ("8000000000000001", "-5e-324", "min-neg"),
    ("7fefffffffffffff", "1.7976931348623157e+308", "max-pos"),
    ("ffefffffffffffff", "-1.7976931348623157e+308", "max-neg"),
    ("4340000000000000", "9007199254740992", "max-pos-int"),
    ("c340000000000000", "-9007199254740992", "max-neg-int"),
    ("4430000000000000", "295147905179352830000", "2**68"),
    ("44b52d02c7e14af5", "9.999999999999997e+22", "below-1e23"),
    ("44b52d02c7e14af6", "1e+23", "1e23"),
    ("44b52d02c7e14af7", "1.0000000000000001e+23", "above-1e23"),
    ("444b1ae4d6e2ef4e", "999999999999999700000", "below-1e21-a"),
    ("444b1ae4d6e2ef4f", "999999999999999900000", "below-1e21-b"),
    ("444b1ae4d6e2ef50", "1e+21", "1e21-switches-to-exponent"),
    ("3eb0c6f7a0b5ed8c", "9.999999999999997e-7", "below-1e-6"),
    ("3eb0c6f7a0b5ed8d", "0.000001", "1e-6-stays-decimal"),
    ("41b3de4355555553", "333333333.3333332", "third-a"),
    ("41b3de4355555554", "333333333.33333325", "third-b"),
    ("41b3de4355555555", "333333333.3333333", "third-c"),
    ("41b3de4355555556", "333333333.3333334", "third-d"),
    ("41b3de4355555557", "333333333.33333343", "third-e"),
    ("becbf647612f3696", "-0.0000033333333333333333", "small-negative"),
    ("43143ff3c1cb0959", "1424953923781206.2", "round-to-even"),
]


@pytest.mark.parametrize(("bits", "expected"), [r[:2] for r in APPENDIX_B], ids=[r[2] for r in APPENDIX_B])
def test_rfc8785_appendix_b_number(bits: str, expected: str) -> None:
    assert canonicalize(from_bits(bits)) == expected.encode()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(4800.0, "4800", id="integral-double-no-fraction"),
        pytest.param(4.8e3, "4800", id="exponent-literal"),
        pytest.param(1e21, "1e+21", id="1e21"),
        pytest.param(1e20, "100000000000000000000", id="1e20"),
        pytest.param(1e-7, "1e-7", id="1e-7"),
        pytest.param(1e-6, "0.000001", id="1e-6"),
        pytest.param(0.1, "0.1", id="0.1"),
        pytest.param(-1.5, "-1.5", id="negative"),
        pytest.param(123.456, "123.456", id="fraction"),
        pytest.param(1.5e300, "1.5e+300", id="large-exponent"),
        pytest.param(2.5e-300, "2.5e-300", id="small-exponent"),
        pytest.param(-0.0, "0", id="negative-zero-double"),
        pytest.param(0, "0", id="int-zero"),
        pytest.param(-I_JSON_MAX_INT, "-9007199254740991", id="int-min"),
        pytest.param(I_JSON_MAX_INT, "9007199254740991", id="int-max"),
    ],
)
def test_es_number_forms(value: float, expected: str) -> None:
    assert canonicalize(value) == expected.encode()


@pytest.mark.parametrize(
    "value",
    [float("nan"), float("inf"), float("-inf"), 2**53, -(2**53), 10**400],
    ids=["nan", "inf", "minus-inf", "int-2**53", "int-minus-2**53", "int-huge"],
)
def test_canonicalize_refuses_numbers_without_exact_form(value: float) -> None:
    with pytest.raises(ValueError):
        canonicalize(value)


# ---------------------------------------------------------------------------------------------------------
# RFC 8785 §3.2.2 / §3.2.3 examples and the reference implementation's test data (cyberphone)

VECTORS = [
    (
        # RFC 8785 §3.2.2 sample
        b'{"numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],'
        b' "string": "\\u20ac$\\u000F\\u000aA\'\\u0042\\u0022\\u005c\\\\\\"\\/",'
        b' "literals": [null, true, false]}',
        '{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],'
        '"string":"\u20ac$\\u000f\\nA\'B\\"\\\\\\\\\\"/"}',
    ),
    (
        # RFC 8785 §3.2.3 sorting: UTF-16 code units put the emoji (D83D) before U+FB33
        b'{"\\u20ac": "Euro Sign", "\\r": "Carriage Return", "\\ufb33": "Hebrew Letter Dalet With Dagesh",'
        b' "1": "One", "\\ud83d\\ude00": "Emoji: Grinning Face", "\\u0080": "Control",'
        b' "\\u00f6": "Latin Small Letter O With Diaeresis"}',
        '{"\\r":"Carriage Return","1":"One","\u0080":"Control",'
        '"\u00f6":"Latin Small Letter O With Diaeresis","\u20ac":"Euro Sign",'
        '"\U0001f600":"Emoji: Grinning Face","\ufb33":"Hebrew Letter Dalet With Dagesh"}',
    ),
    (
        b'{"1": {"f": {"f": "hi","F": 5} ,"\\n": 56.0}, "10": { }, "": "empty", "a": { }, "111": [ { } ],'
        b' "A": { }}',
        '{"":"empty","1":{"\\n":56,"f":{"F":5,"f":"hi"}},"10":{},"111":[{}],"A":{},"a":{}}',
    ),
    (
        '{"peach": "This sorting order", "péché": "is wrong according to French",'
        ' "pêche": "but canonicalization MUST", "sin": "ingnore locale"}'.encode(),
        '{"peach":"This sorting order","péché":"is wrong according to French",'
        '"pêche":"but canonicalization MUST","sin":"ingnore locale"}',
    ),
    (b'[56, {"d": true, "10": null, "1": [ ]}]', '[56,{"1":[],"10":null,"d":true}]'),
    (b'{"Unnormalized Unicode":"\\u1e0d\\u0307"}', '{"Unnormalized Unicode":"\u1e0d\u0307"}'),
    (
        b'{"\\u20ac": "Euro Sign", "1": "One", "\\u0080": "Control\\u007f", "\\ud83d\\ude02": "Smiley",'
        b' "\\u00f6": "Latin Small Letter O With Diaeresis", "\\ufb33": "Hebrew Letter Dalet With Dagesh",'
        b' "</script>": "Browser Challenge"}',
        '{"1":"One","</script>":"Browser Challenge","\u0080":"Control\u007f",'
        '"\u00f6":"Latin Small Letter O With Diaeresis","\u20ac":"Euro Sign","\U0001f602":"Smiley",'
        '"\ufb33":"Hebrew Letter Dalet With Dagesh"}',
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"),
    VECTORS,
    ids=[
        "rfc8785-3.2.2-values",
        "rfc8785-3.2.3-sorting",
        "structures",
        "french",
        "arrays",
        "unicode",
        "weird",
    ],
)
def test_rfc8785_vectors(body: bytes, expected: str) -> None:
    # the RFC's values include 1e30, beyond what strict_loads admits (I-JSON, T11): parse with plain json here
    assert canonicalize(json.loads(body)) == expected.encode("utf-8")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\x00\x01\x1f", "\\u0000\\u0001\\u001f"),
        ("\b\f\n\r\t", "\\b\\f\\n\\r\\t"),
        ('"\\', '\\"\\\\'),
        ("/", "/"),
        ("\x7f", "\x7f"),
        ("\u2028\u2029", "\u2028\u2029"),
        ("é€😀", "é€😀"),
    ],
    ids=["controls-lowercase-hex", "short-escapes", "quote-backslash", "solidus-literal", "del-literal",
         "line-separators-literal", "non-ascii-literal"],
)  # fmt: skip
def test_string_escapes_are_jcs_minimal(text: str, expected: str) -> None:
    assert canonicalize(text) == ('"' + expected + '"').encode("utf-8")


class _Colour(enum.StrEnum):
    RED = "red"


class _Level(enum.IntEnum):
    HIGH = 3


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ((1, "a"), b'[1,"a"]'),
        ([True, False, None], b"[true,false,null]"),
        ({"b": 1, "a": [1, {"d": 0, "c": 0}]}, b'{"a":[1,{"c":0,"d":0}],"b":1}'),
        ({"c": _Colour.RED, "l": _Level.HIGH}, b'{"c":"red","l":3}'),
    ],
    ids=["tuple-is-array", "literals-not-ints", "nested-sorting", "enum-subclasses"],
)
def test_canonicalize_python_values(value: Any, expected: bytes) -> None:
    assert canonicalize(value) == expected


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({1: "a"}, TypeError),
        ({"a": 1, 2: "b"}, TypeError),
        ({"a": {1, 2}}, TypeError),
        (b"bytes", TypeError),
        ("\ud800", ValueError),
        ({"\udc00": 1}, ValueError),
    ],
    ids=["int-key", "mixed-keys", "set-value", "bytes", "lone-surrogate-value", "lone-surrogate-key"],
)
def test_canonicalize_refuses_non_json(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        canonicalize(value)


# ---------------------------------------------------------------------------------------------------------
# args_digest (CONTRACT §5) and the HOSTILE T04–T08 invariants


def test_args_digest_is_unpadded_base64url_sha256_of_jcs() -> None:
    arguments = {"invoice_id": "INV-8831", "amount": 4800, "department": "42"}
    jcs = b'{"amount":4800,"department":"42","invoice_id":"INV-8831"}'
    expected = base64.urlsafe_b64encode(hashlib.sha256(jcs).digest()).rstrip(b"=").decode()
    assert canonicalize(arguments) == jcs
    assert args_digest(arguments) == expected
    assert len(expected) == 43 and "=" not in expected


def _permutations_of_nested() -> list[bytes]:
    """The same arguments written with every key order at the top level and inside the nested object."""
    inner = [("currency", '"EUR"'), ("value", "4800"), ("tags", '["a","b"]')]
    outer_rest = [("invoice_id", '"INV-8831"'), ("department", '"42"')]
    bodies = []
    for inner_order in itertools.permutations(inner):
        amount = "{" + ",".join(f'"{k}":{v}' for k, v in inner_order) + "}"
        for outer_order in itertools.permutations([*outer_rest, ("amount", amount)]):
            bodies.append(("{" + ", ".join(f'"{k}": {v}' for k, v in outer_order) + "}").encode())
    return bodies


def test_t07_key_order_permutations_nested_same_digest() -> None:
    bodies = _permutations_of_nested()
    assert len(bodies) == 36 and len(set(bodies)) == 36
    assert len({digest_of(body) for body in bodies}) == 1


@pytest.mark.parametrize(
    "spelling",
    [b"4800", b"4800.0", b"4.8e3", b"4.8E+3", b"48e2", b"4800.000", b"480000e-2"],
    ids=["int", "fraction", "exponent", "exponent-upper-plus", "int-mantissa", "trailing-zeros", "neg-exp"],
)
def test_t04_number_spellings_share_one_digest(spelling: bytes) -> None:
    assert digest_of(b'{"amount":' + spelling + b"}") == digest_of(b'{"amount":4800}')
    # and the canonical bytes (what is forwarded, HOSTILE T04 option A) are the integer form
    assert canonicalize(strict_loads(b'{"amount":' + spelling + b"}")) == b'{"amount":4800}'


@pytest.mark.parametrize("spelling", [b"-0", b"-0.0", b"0.0", b"0e5"], ids=["-0", "-0.0", "0.0", "0e5"])
def test_t04_zero_spellings_share_one_digest(spelling: bytes) -> None:
    assert digest_of(b'{"n":' + spelling + b"}") == digest_of(b'{"n":0}')


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (b'{"amount":"4800"}', b'{"amount":4800}'),
        (b'{"flag":true}', b'{"flag":"true"}'),
        (b'{"dept":null}', b"{}"),
        (b'{"x":[]}', b'{"x":{}}'),
        (b'{"amount":4800}', b'{"amount":4801}'),
        (b'{"amount":4800}', b'{"amount":4800,"extra":1}'),
        (b'{"a":1}', b'{"A":1}'),
    ],
    ids=["string-vs-number", "bool-vs-string", "null-vs-absent", "array-vs-object", "changed-amount",
         "extra-field", "key-case"],
)  # fmt: skip
def test_t05_different_values_differ(left: bytes, right: bytes) -> None:
    assert digest_of(left) != digest_of(right)


def test_t08_nfc_and_nfd_differ() -> None:
    nfc = unicodedata.normalize("NFC", "café")
    nfd = unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    assert args_digest({"vendor": nfc}) != args_digest({"vendor": nfd})
    assert digest_of(b'{"vendor":"caf\\u00e9"}') != digest_of(b'{"vendor":"cafe\\u0301"}')


@pytest.mark.parametrize(
    "body",
    [
        pytest.param('{"vendor":"café"}'.encode(), id="literal"),
        pytest.param(b'{"vendor":"caf\\u00e9"}', id="escaped-lower"),
        pytest.param(b'{"vendor":"caf\\u00E9"}', id="escaped-upper"),
        pytest.param(b'{"vend\\u006fr":"caf\xc3\xa9"}', id="escaped-key"),
    ],
)
def test_t08_escaped_and_literal_hash_the_same(body: bytes) -> None:
    assert digest_of(body) == args_digest({"vendor": "café"})


# ---------------------------------------------------------------------------------------------------------
# strict_loads: what it refuses, with which reason

REFUSED = [
    # T06 duplicate members, any depth, also when only the escapes differ
    ("t06-duplicate-top", b'{"amount":1,"amount":1000000}', "json_duplicate_member"),
    ("t06-duplicate-nested", b'{"a":{"b":1,"b":2}}', "json_duplicate_member"),
    ("t06-duplicate-in-array", b'[{"x":1},{"y":1,"y":1}]', "json_duplicate_member"),
    ("t06-duplicate-escaped", b'{"amount":1,"\\u0061mount":2}', "json_duplicate_member"),
    # T10 non-finite numbers
    ("t10-nan", b'{"amount":NaN}', "json_non_finite_number"),
    ("t10-infinity", b'{"amount":Infinity}', "json_non_finite_number"),
    ("t10-minus-infinity", b'{"amount":-Infinity}', "json_non_finite_number"),
    ("t10-overflow", b'{"amount":1e400}', "json_number_out_of_range"),
    ("t11-float-beyond-2-53", b"[1e16]", "json_number_out_of_range"),
    ("t11-inexact-double", b"[9007199254740993.0]", "json_number_out_of_range"),
    ("t11-big-double", b"[1.7976931348623157e308]", "json_number_out_of_range"),
    ("t10-overflow-negative", b'{"amount":-1e400}', "json_number_out_of_range"),
    ("t10-overflow-exponent-plus", b"[1E+400]", "json_number_out_of_range"),
    ("t10-overflow-fraction", b"[0.5e309]", "json_number_out_of_range"),
    ("t10-overflow-long-mantissa", b"[" + b"9" * 400 + b".0]", "json_number_out_of_range"),
    # T11 integers outside the I-JSON range (RFC 7493 §2.2), including the 4300-digit int() limit
    ("t11-2**53", b'{"amount":9007199254740992}', "json_number_out_of_range"),
    ("t11-minus-2**53", b'{"amount":-9007199254740992}', "json_number_out_of_range"),
    ("t11-16-digits", b"[9999999999999999]", "json_number_out_of_range"),
    ("t11-20-digits", b'{"amount":12345678901234567890}', "json_number_out_of_range"),
    ("t11-5000-digits", b'{"amount":' + b"7" * 5000 + b"}", "json_number_out_of_range"),
    # T11 in every notation (CONTRACT §12): the exact value of the literal counts, however it is spelled
    ("t11-fraction-times-one-digit-exponent", b"[99999999999.99999e9]", "json_number_out_of_range"),
    ("t11-one-digit-exponent", b"[9007199254740.992e3]", "json_number_out_of_range"),
    ("t11-2**53-in-exponent-form", b"[9.007199254740992e15]", "json_number_out_of_range"),
    ("t11-minus-2**53-in-exponent-form", b"[-9.007199254740992E+15]", "json_number_out_of_range"),
    ("t11-exponent-with-leading-zeros", b"[1e0000000000000000016]", "json_number_out_of_range"),
    ("t11-exponent-with-many-leading-zeros", b"[1e" + b"0" * 5000 + b"16]", "json_number_out_of_range"),
    ("t11-fraction-just-above-max", b"[9007199254740991.4]", "json_number_out_of_range"),
    ("t11-negative-fraction-just-below-min", b"[-9007199254740991.000001]", "json_number_out_of_range"),
    ("t11-small-mantissa-big-exponent", b"[0.0000001e23]", "json_number_out_of_range"),
    ("t11-inside-a-string-key-does-not-hide-it", b'{"1e5":99999999999.99999e9}', "json_number_out_of_range"),
    ("t10-overflow-capital-e", b"[1E400]", "json_number_out_of_range"),
    # T08 lone surrogates
    ("t08-lone-high", b'{"v":"\\ud800"}', "json_lone_surrogate"),
    ("t08-lone-low", b'{"v":"\\udc00"}', "json_lone_surrogate"),
    ("t08-high-then-text", b'{"v":"\\ud83da"}', "json_lone_surrogate"),
    ("t08-reversed-pair", b'{"v":"\\ude00\\ud83d"}', "json_lone_surrogate"),
    ("t08-in-key", b'{"\\uD800":1}', "json_lone_surrogate"),
    ("t08-in-nested-array", b'{"v":[["ok","\\udfff"]]}', "json_lone_surrogate"),
    # P17 nesting (default limit 32, CONTRACT §8)
    ("p17-arrays-33", nested(33), "json_too_deep"),
    ("p17-objects-33", nested_objects(33), "json_too_deep"),
    ("p17-mixed-33", ('[{"a":' * 16 + "[1]" + "}]" * 16).encode(), "json_too_deep"),
    ("p17-100k-deep", nested(100_000), "json_too_deep"),
    ("p17-deep-after-escaped-quote", b'["\\"]]]]",' + nested(32) + b"]", "json_too_deep"),
    ("p17-deep-brackets-hidden-by-string-closers", b'["]]]]",' + nested(32) + b"]", "json_too_deep"),
    ("p17-100k-deep-unclosed", b"[" * 100_000, "json_too_deep"),
    # P18 encodings and framing
    ("p18-utf16le", '{"a":1}'.encode("utf-16-le"), "json_not_utf8"),
    ("p18-utf16be", '{"a":1}'.encode("utf-16-be"), "json_not_utf8"),
    ("p18-utf16-bom", '{"a":1}'.encode("utf-16"), "json_not_utf8"),
    ("p18-utf32", '{"a":1}'.encode("utf-32"), "json_not_utf8"),
    ("p18-utf8-bom", b'\xef\xbb\xbf{"a":1}', "json_not_utf8"),
    ("p18-invalid-byte", b'{"a":"\xff"}', "json_not_utf8"),
    ("p18-overlong-slash", b'{"a":"\xc0\xaf"}', "json_not_utf8"),
    ("p18-encoded-surrogate", b'{"a":"\xed\xa0\x80"}', "json_not_utf8"),
    ("p18-latin1", '{"a":"café"}'.encode("latin-1"), "json_not_utf8"),
    ("p18-raw-nul", b'{"a":"\x00"}', "json_not_utf8"),
    ("p18-trailing-garbage", b'{"a":1} x', "json_syntax"),
    ("p18-two-values", b'{"a":1}{"a":2}', "json_syntax"),
    ("p18-two-scalars", b"1 2", "json_syntax"),
    ("p18-block-comment", b'{/* c */"a":1}', "json_syntax"),
    ("p18-line-comment", b'{"a":1} // c', "json_syntax"),
    ("p18-hash-comment", b'# c\n{"a":1}', "json_syntax"),
    # other syntax
    ("empty", b"", "json_syntax"),
    ("whitespace-only", b" \n", "json_syntax"),
    ("single-quotes", b"{'a':1}", "json_syntax"),
    ("trailing-comma", b'{"a":1,}', "json_syntax"),
    ("raw-newline-in-string", b'{"a":"x\ny"}', "json_syntax"),
    ("unterminated-string", b'{"a":"x', "json_syntax"),
    ("leading-zero", b'{"a":01}', "json_syntax"),
    ("plus-sign", b'{"a":+1}', "json_syntax"),
    ("hex-number", b'{"a":0x10}', "json_syntax"),
]


@pytest.mark.parametrize(("body", "reason"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_strict_loads_refuses(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        strict_loads(body)
    assert caught.value.reason == reason
    assert caught.value.status == 400


ACCEPTED = [
    ("depth-32-arrays", nested(32), None),
    ("depth-32-objects", nested_objects(32), None),
    ("brackets-inside-strings", b'{"a":"' + b"[{" * 100 + b'"}', {"a": "[{" * 100}),
    ("escaped-quote-then-brackets", b'["\\"[[[[", 1]', ['"[[[[', 1]),
    ("surrogate-pair", b'{"e":"\\ud83d\\ude00"}', {"e": "\U0001f600"}),
    ("i-json-max", b"[9007199254740991,-9007199254740991]", [I_JSON_MAX_INT, -I_JSON_MAX_INT]),
    ("15-digit-ints", b"[999999999999999,-999999999999999]", [999999999999999, -999999999999999]),
    ("two-digit-exponent", b"[9e15, 1.5e-10]", [9e15, 1.5e-10]),
    ("long-digits-inside-strings", b'["12345678901234567890","1e400"]', ["12345678901234567890", "1e400"]),
    ("largest-exact-double", b"[9007199254740991.0]", [9007199254740991.0]),
    ("underflow-to-zero", b"[1e-400]", [0.0]),
    ("minus-zero-int", b"-0", 0),
    ("minus-zero-float", b"[-0.0, -0e5]", [0.0, 0.0]),
    ("zero-with-huge-exponent", b"[0e999999999, 0.0E+400]", [0.0, 0.0]),
    (
        "i-json-max-in-exponent-form",
        b"[9.007199254740991e15, -9007199254740991E0]",
        [I_JSON_MAX_INT, -I_JSON_MAX_INT],
    ),
    ("exponent-with-leading-zeros-in-range", b"[1e000000000000000015]", [1e15]),
    ("fraction-just-below-max", b"[9007199254740990.9]", [9007199254740991.0]),
    ("one-digit-exponent-in-range", b"[123456789012345.6e1]", [1234567890123456.0]),
    ("exponent-spelled-in-strings-only", b'{"id":"INV-1e99","n":5}', {"id": "INV-1e99", "n": 5}),
    ("surrounding-whitespace", b' \t\r\n{"a":1} \n', {"a": 1}),
    ("scalar-top-level", b'"x"', "x"),
    ("escaped-control", b'"\\u0000\\u001b"', "\x00\x1b"),
    ("escaped-backslash-u-text", b'["\\\\ud800"]', ["\\ud800"]),
]


@pytest.mark.parametrize(("body", "expected"), [r[1:] for r in ACCEPTED], ids=[r[0] for r in ACCEPTED])
def test_strict_loads_accepts(body: bytes, expected: Any) -> None:
    value = strict_loads(body)
    if expected is not None:
        assert value == expected
    assert type(value) is type(json.loads(body))


def test_depth_limit_is_configurable() -> None:
    strict_loads(nested(5), max_depth=5)
    with pytest.raises(InvalidRequest) as caught:
        strict_loads(nested(6), max_depth=5)
    assert caught.value.reason == "json_too_deep"


def test_strict_loads_numbers_keep_their_kind() -> None:
    value = strict_loads(b'{"i":1000,"f":1e3,"g":1000.0}')
    assert value == {"i": 1000, "f": 1000.0, "g": 1000.0}
    assert [type(value[k]) for k in ("i", "f", "g")] == [int, float, float]


def test_strict_loads_takes_only_bytes() -> None:
    with pytest.raises(TypeError):
        strict_loads('{"a":1}')  # type: ignore[arg-type]
