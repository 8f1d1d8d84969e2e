"""broker.policy.schemas: tools' input JSON Schemas with ECMA-262 ``pattern`` semantics (CONTRACT §12).

JSON Schema patterns are ECMA-262 regular expressions; Python's ``re`` answered differently on exactly the cases
an allow-list pattern relies on (``$`` before a trailing newline, Unicode digits for ``\\d``).
"""

from __future__ import annotations

from typing import Any

import pytest

from broker.policy.schemas import InvalidSchema, compile_schema

# (id, pattern, value, ECMA-262 answer)
ECMA_PATTERNS: list[tuple[str, str, str, bool]] = [
    ("dollar-at-end", "^abc$", "abc", True),
    ("dollar-before-trailing-newline", "^abc$", "abc\n", False),
    ("dollar-before-trailing-crlf", "^abc$", "abc\r\n", False),
    ("dollar-unanchored-suffix", "abc$", "xabc\n", False),
    ("digits-ascii", "^\\d+$", "123", True),
    ("digits-arabic-indic", "^\\d+$", "١٢٣", False),
    ("digits-fullwidth", "^\\d+$", "１２３", False),
    ("word-ascii", "^\\w+$", "abc_1", True),
    ("word-non-ascii-letter", "^\\w+$", "é", False),
    ("space-nbsp", "^\\s$", "\u00a0", True),
    ("space-bom-is-whitespace-in-ecma", "^\\s$", "\ufeff", True),
    ("dot-does-not-match-newline", "^a.c$", "a\nc", False),
    ("dot-matches-astral-char", "^.$", "😀", True),
    ("unanchored-is-a-search", "INV-", "xxINV-1", True),
    ("control-escape", "^\\cJ$", "\n", True),
    ("unicode-escape", "^\\u00e9$", "é", True),
    ("lookahead", "^(?!admin)[a-z]+$", "admin", False),
    ("lookbehind", "(?<=a)b", "ab", True),
]


@pytest.mark.parametrize(
    ("pattern", "value", "expected"),
    [row[1:] for row in ECMA_PATTERNS],
    ids=[row[0] for row in ECMA_PATTERNS],
)
def test_pattern_follows_ecma_262(pattern: str, value: str, expected: bool) -> None:
    schema = compile_schema({"type": "object", "properties": {"v": {"type": "string", "pattern": pattern}}})
    assert schema.is_valid({"v": value}) is expected
    assert (schema.error({"v": value}) is None) is expected


INVOICE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["invoice_id", "amount"],
    "properties": {
        "invoice_id": {"type": "string", "pattern": "^INV-[0-9]+$"},
        "amount": {"type": "number"},
        "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}},
    },
}

# (id, arguments, the error's "where" prefix; None: valid)
ERRORS: list[tuple[str, Any, str | None]] = [
    ("valid", {"invoice_id": "INV-1", "amount": 5}, None),
    ("valid-float", {"invoice_id": "INV-1", "amount": 5.5}, None),
    ("member-type", {"invoice_id": "INV-1", "amount": "5"}, "arguments.amount: "),
    ("member-pattern-trailing-newline", {"invoice_id": "INV-1\n", "amount": 5}, "arguments.invoice_id: "),
    ("missing-required", {"amount": 5}, "arguments: "),
    ("extra-member", {"invoice_id": "INV-1", "amount": 5, "admin": True}, "arguments: "),
    ("shallowest-error-first", {"invoice_id": 5, "amount": "x", "admin": 1}, "arguments: "),
    (
        "array-item",
        {"invoice_id": "INV-1", "amount": 5, "lines": [{"sku": "a"}, {"sku": 1}]},
        "arguments.lines[1].sku: ",
    ),
    ("bool-is-not-a-number", {"invoice_id": "INV-1", "amount": True}, "arguments.amount: "),
    ("not-an-object", [1], "arguments: "),
]


@pytest.mark.parametrize(("arguments", "where"), [row[1:] for row in ERRORS], ids=[row[0] for row in ERRORS])
def test_error_names_the_failing_place(arguments: Any, where: str | None) -> None:
    error = compile_schema(INVOICE_SCHEMA).error(arguments)
    if where is None:
        assert error is None
    else:
        assert error is not None and error.startswith(where), error
        assert len(error) <= 300


def test_error_message_says_what_is_wrong() -> None:
    error = compile_schema(INVOICE_SCHEMA).error({"invoice_id": "INV-1", "amount": "5"})
    assert error == 'arguments.amount: "5" is not of type "number"'


def test_long_values_are_cut_in_the_message() -> None:
    error = compile_schema(INVOICE_SCHEMA).error({"invoice_id": "x" * 10_000, "amount": 1})
    assert error is not None and error.startswith("arguments.invoice_id: ") and len(error) == 300


# (id, schema): not a schema the broker can check arguments against
INVALID: list[tuple[str, Any]] = [
    ("unknown-type", {"type": "strin"}),
    ("bad-regex", {"type": "string", "pattern": "(unclosed"}),
    ("dangling-local-ref", {"$ref": "#/$defs/missing"}),
    ("remote-ref-is-never-fetched", {"$ref": "https://schemas.example/s.json"}),
    ("file-ref-is-never-read", {"$ref": "file:///etc/hostname"}),
    ("unknown-metaschema", {"$schema": "https://unknown.example/schema"}),
    ("keyword-of-wrong-type", {"minimum": "x"}),
    ("not-an-object", ["type", "string"]),
]


@pytest.mark.parametrize("schema", [row[1] for row in INVALID], ids=[row[0] for row in INVALID])
def test_invalid_schemas_are_refused_with_a_reason(schema: Any) -> None:
    with pytest.raises(InvalidSchema) as caught:
        compile_schema(schema)
    assert str(caught.value) and "\n" not in str(caught.value)


def test_local_refs_and_older_drafts_compile() -> None:
    local = compile_schema({"$defs": {"id": {"type": "string"}}, "properties": {"a": {"$ref": "#/$defs/id"}}})
    assert local.error({"a": 1}) == 'arguments.a: 1 is not of type "string"'
    draft7 = compile_schema({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object"})
    assert draft7.error({}) is None


def test_format_is_an_annotation_as_before() -> None:
    assert (
        compile_schema({"properties": {"e": {"type": "string", "format": "email"}}}).error({"e": "x"}) is None
    )
