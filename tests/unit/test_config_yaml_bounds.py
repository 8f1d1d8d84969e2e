"""YAML bounds (broker.config.yaml_bounds, HOSTILE Y09): recursive aliases, alias bombs and deep nesting are one
located ``ConfigError`` from every YAML reader of operator input (config, policy fixtures), never a RecursionError."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from broker.config.loader import ConfigError, load_config, parse_yaml
from broker.config.yaml_bounds import MAX_DEPTH, MAX_NODES, YamlBoundError, check_events
from broker.policy.engine import PolicySet
from broker.policy.fixtures import run_fixtures


def laughs(levels: int, width: int = 9) -> str:
    """The billion-laughs shape: each level is ``width`` aliases of the one before."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


def nested(depth: int) -> str:
    return "x: " + "[" * depth + "]" * depth + "\n"


def stacked(levels: int) -> str:
    """Aliases of a 20-deep anchor nested in each other: deep only once expanded."""
    inner = "[" * 20 + "]" * 20
    lines = [f"d0: &d0 {inner}"] + [f"d{i}: &d{i} [[[[[*d{i - 1}]]]]]" for i in range(1, levels + 1)]
    return "\n".join(lines) + "\n"


REFUSED = [
    ("x: &a [*a]\n", 1, "recursive YAML alias *a: it is inside its own anchor &a (line 1)"),
    ("- &a [*a]\n", 1, "recursive YAML alias *a"),
    ("a: &a\n  b:\n    - 1\n    - c: *a\n", 4, "recursive YAML alias *a: it is inside its own anchor &a (line 1)"),
    ("a: &a {b: &b [*a]}\n", 1, "recursive YAML alias *a"),
    ("a: &a [1]\nb: &b [*a, [*b]]\n", 2, "recursive YAML alias *b"),
    (laughs(9), 6, "document too large: alias *a4 takes it past 200000 nodes (alias bomb?)"),
    (laughs(30, width=2), 15, "document too large: alias *a13 takes it past"),
    (nested(5000), 1, f"document too deep: a collection nests it past {MAX_DEPTH} levels"),
    (stacked(12), 10, f"document too deep: alias *d8 nests it past {MAX_DEPTH} levels"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "line", "message"),
    REFUSED,
    ids=[
        "Y09-recursive-alias",
        "Y09-recursive-alias-top-level-sequence",
        "Y09-recursive-alias-block-nested",
        "Y09-recursive-alias-through-a-mapping",
        "Y09-recursive-alias-inner-anchor",
        "Y09-billion-laughs",
        "Y09-binary-laughs",
        "Y09-deep-nesting",
        "Y09-deep-through-aliases",
    ],
)
def test_hostile_documents_are_one_located_problem(text: str, line: int, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_yaml(text, file="h.yaml", environ={})
    [problem] = caught.value.problems
    assert (problem.file, problem.line) == ("h.yaml", line)
    assert problem.message.startswith(message), problem.message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "a: &a [1, {b: 2}]\nb: *a\nc: [*a, *a]\n",
            {"a": [1, {"b": 2}], "b": [1, {"b": 2}], "c": [[1, {"b": 2}]] * 2},
        ),
        ("s: &s text\nt: [*s, *s]\n", {"s": "text", "t": ["text", "text"]}),
        (
            "a: &a [x]\nb: &b [*a, *a]\nc: &c [*b, *b]\n",
            {"a": ["x"], "b": [["x"]] * 2, "c": [[["x"]] * 2] * 2},
        ),
        (nested(MAX_DEPTH - 2), {"x": yaml.safe_load(nested(MAX_DEPTH - 2))["x"]}),
        (laughs(4), yaml.safe_load(laughs(4))),
    ],
    ids=["shared-anchor", "scalar-anchor", "aliases-of-aliases", "deep-within-bound", "small-laugh"],
)
def test_aliases_within_the_bounds_load_as_plain_yaml(text: str, expected: object) -> None:
    assert parse_yaml(text, file="ok.yaml", environ={})[0] == expected


def flat_list(values: int) -> list[yaml.Event]:
    """The events of a top-level list of ``values`` scalars: 1 + ``values`` nodes."""
    return [
        yaml.StreamStartEvent(),
        yaml.DocumentStartEvent(),
        yaml.SequenceStartEvent(None, None, True),
        *(yaml.ScalarEvent(None, None, (True, False), "1") for _ in range(values)),
        yaml.SequenceEndEvent(),
        yaml.DocumentEndEvent(),
        yaml.StreamEndEvent(),
    ]


def test_the_node_bound_counts_nodes_exactly() -> None:
    check_events(flat_list(MAX_NODES - 1))
    with pytest.raises(YamlBoundError, match="too large"):
        check_events(flat_list(MAX_NODES))


def test_undefined_and_duplicate_anchors_stay_the_composers_located_errors() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_yaml("a: [1]\nb: *nope\n", file="u.yaml", environ={})
    assert [(p.line, p.message.split(":")[0]) for p in caught.value.problems] == [(2, "YAML syntax")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7", 7), (" 7 ", 7), ("1.5", 1.5), ("true", True),
        ("[" * 5000, "[" * 5000), ("&a [*a]", "&a [*a]"), ("!!int 7", "!!int 7"),
    ],
    ids=["int", "padded-int", "float", "bool", "Y09-env-deep-nesting", "Y09-env-recursive-alias", "Y09-env-tag"],
)  # fmt: skip
def test_a_whole_value_reference_is_resolved_as_one_scalar_never_parsed(value: str, expected: object) -> None:
    data, _ = parse_yaml("v: ${V}\n", file="e.yaml", environ={"V": value})
    assert data == {"v": expected}


def test_load_config_and_policy_fixtures_refuse_a_recursive_alias(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text("version: 1\nserver: &s\n  extra: [*s]\n")
    with pytest.raises(ConfigError) as caught:
        load_config(config, environ={})
    assert [str(p) for p in caught.value.problems] == [
        f"{config}:3: recursive YAML alias *s: it is inside its own anchor &s (line 2)"
    ]
    fixture = tmp_path / "cases.policy-tests.yaml"
    fixture.write_text("cases:\n  - &c {name: x, more: [*c]}\n")
    with pytest.raises(ConfigError) as caught:
        run_fixtures(fixture, PolicySet.compile([], tools=[], counters=[]), counters=[])
    assert [str(p) for p in caught.value.problems] == [
        f"{fixture}:2: recursive YAML alias *c: it is inside its own anchor &c (line 2)"
    ]
