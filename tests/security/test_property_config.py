"""Property-based tests of config loading (broker.config.loader): strict, located, injection-free.

- ``parse_yaml`` and ``load_config`` are total: any text gives data or a ``ConfigError``, nothing else (Y09);
- anchors and aliases of any shape load exactly as ``yaml.safe_load`` reads them, except a recursive alias, which
  is refused exactly when ``safe_load`` would build a structure that contains itself (Y09);
- an unknown key anywhere is an error located at that key's line (Y03), and so is a duplicate key;
- ``${VAR}`` expansion substitutes text after parsing: whatever an environment value holds (newlines, ``: ``,
  ``{``, ``&anchor``, ``!!python/object``) it stays one string and can never add structure;
- ``policy_version`` is a function of the validated content: key order, flow/block style and comments do not
  change it, while any change of a policy does.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.config.loader import ConfigError, load_config, parse_yaml
from tests.certfactory import Pki
from tests.conftest import base_config

SETTINGS = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

YAML_TOKENS = [
    "a", "b", ":", ": ", "- ", "\n", "  ", "{", "}", "[", "]", ",", "&x ", "*x", "!!python/object:os.system ",
    "!!binary ", "!custom ", "<<: ", "? ", "|", ">", "'", '"', "#", "${A}", "${B:-d}", "$$", "---", "...", "%YAML 1.2",
    "1e3", "0x1f", "~", "null", "yes", "\t", "\ufeff", "\x00",
]  # fmt: skip


@pytest.fixture(scope="module")
def valid(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return base_config(pki, tmp_path_factory.mktemp("cfg"), upstream_url="https://127.0.0.1:1")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("property-config")


def _load(workdir: Path, text: str, environ: dict[str, str] | None = None) -> Any:
    path = workdir / "broker.yaml"
    path.write_text(text, encoding="utf-8")
    return load_config(path, environ=environ or {})


@SETTINGS
@given(st.lists(st.sampled_from(YAML_TOKENS), max_size=30).map("".join) | st.text(max_size=120))
def test_y09_parsing_is_total(text: str) -> None:
    try:
        parse_yaml(text, file="fuzz.yaml", environ={"A": "1"})
    except ConfigError as error:
        assert error.problems and all(p.file == "fuzz.yaml" and p.line >= 0 for p in error.problems)


@settings(SETTINGS, max_examples=15)
@given(st.integers(1, 8), st.integers(2, 10))
def test_y09_alias_expansion_is_bounded(depth: int, width: int) -> None:
    """Billion laughs of any shape: loads (small) or is refused as too large; never expands without bound."""
    lines = ["l0: &l0 [x]"] + [
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, depth + 1)
    ]
    try:
        parse_yaml("\n".join(lines) + "\n", file="bomb.yaml", environ={})
    except ConfigError as error:
        assert any("too large" in p.message for p in error.problems)
    else:
        assert width**depth <= 200_000


def _aliased_document(data: st.DataObject) -> str:
    """A flow-style tree where every collection has an anchor and a leaf may alias any anchor already started:
    a closed one (a shared subtree) or one still open around it (a recursive alias)."""
    started: list[str] = []

    def node(depth: int) -> str:
        if depth < 4 and data.draw(st.booleans()):
            anchor = f"n{len(started)}"
            started.append(anchor)
            items = [node(depth + 1) for _ in range(data.draw(st.integers(0, 3)))]
            if data.draw(st.booleans()):
                return f"&{anchor} {{" + ", ".join(f"k{i}: {item}" for i, item in enumerate(items)) + "}"
            return f"&{anchor} [" + ", ".join(items) + "]"
        if started and data.draw(st.booleans()):
            return "*" + data.draw(st.sampled_from(started))
        return data.draw(st.sampled_from(["x", "1", "true"]))

    return node(0)


def _contains_itself(value: Any, path: frozenset[int] = frozenset()) -> bool:
    if not isinstance(value, dict | list):
        return False
    if id(value) in path:
        return True
    inner = path | {id(value)}
    return any(_contains_itself(v, inner) for v in (value.values() if isinstance(value, dict) else value))


@SETTINGS
@given(st.data())
def test_y09_aliases_load_as_safe_load_reads_them_and_a_recursive_one_is_refused(data: st.DataObject) -> None:
    text = _aliased_document(data)
    reference = yaml.safe_load(text)
    recursive = _contains_itself(reference)
    try:
        loaded, _ = parse_yaml(text, file="alias.yaml", environ={})
    except ConfigError as error:
        [problem] = error.problems
        assert problem.file == "alias.yaml" and problem.line == 1
        assert problem.message.startswith("recursive YAML alias") == recursive, (text, problem)
        assert recursive or "too " in problem.message, (text, problem)  # else only a bound
    else:
        assert not recursive and loaded == reference, text


def _mappings(node: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _mappings(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _mappings(value, (*path, index))


def _yaml_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


# free-form sections (JSON Schema, arbitrary-name maps) where any key is legal by design
_OPEN = ("input_schema", "inject", "constraints")


@SETTINGS
@given(st.data(), st.from_regex(r"[a-z][a-z_]{2,12}", fullmatch=True))
def test_y03_an_unknown_key_anywhere_is_located_at_its_line(
    valid: dict[str, Any], workdir: Path, data: st.DataObject, name: str
) -> None:
    config = copy.deepcopy(valid)
    places = [(p, m) for p, m in _mappings(config) if not any(o in p for o in _OPEN)]
    path, mapping = data.draw(st.sampled_from(places))
    key = f"zz_{name}"
    mapping[key] = data.draw(st.sampled_from([1, "x", [1], {"a": 1}, None, True]))
    text = yaml.safe_dump(config, sort_keys=data.draw(st.booleans()))
    line = next(i for i, text_line in enumerate(text.splitlines(), 1) if f"{key}:" in text_line)
    with pytest.raises(ConfigError) as caught:
        _load(workdir, text)
    assert any(p.line == line and "unknown key" in p.message for p in caught.value.problems), (
        path,
        caught.value.problems,
    )


@SETTINGS
@given(st.data(), st.sampled_from([1, "x", "[]", "{}", "null"]))
def test_y03_a_duplicate_key_anywhere_is_refused(
    valid: dict[str, Any], workdir: Path, data: st.DataObject, value: Any
) -> None:
    """Any key of the block-style config repeated in its own mapping (inserted just before it, same indent)."""
    lines = yaml.safe_dump(valid, sort_keys=False).splitlines()
    keyed = [i for i, line in enumerate(lines) if ":" in line and not line.lstrip().startswith("-")]
    index = data.draw(st.sampled_from(keyed))
    indent = len(lines[index]) - len(lines[index].lstrip())
    name = lines[index].lstrip().split(":")[0]
    lines.insert(index, f"{' ' * indent}{name}: {value}")
    with pytest.raises(ConfigError) as caught:
        _load(workdir, "\n".join(lines) + "\n")
    assert any(
        p.line == index + 2 and f"duplicate key {name!r}" in p.message for p in caught.value.problems
    ), (
        lines[index : index + 2],
        caught.value.problems,
    )


def _yaml_readable(text: str) -> bool:
    try:
        yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    return True


@SETTINGS
@given(st.text(max_size=60).filter(_yaml_readable))
def test_environment_values_never_add_structure(valid: dict[str, Any], workdir: Path, value: str) -> None:
    """A ``${VAR}`` reference becomes exactly the variable's text, whatever YAML it looks like."""
    config = copy.deepcopy(valid)
    config["tools"][0]["description"] = "${TOOL_DESCRIPTION}"
    config["policies"][0]["reason"] = "prefix ${TOOL_DESCRIPTION:-unset} suffix"
    text = yaml.safe_dump(config, sort_keys=False)
    typed = _yaml_scalar(value)
    try:
        loaded = _load(workdir, text, {"TOOL_DESCRIPTION": value})
    except ConfigError as error:
        # A whole-value plain reference takes the type of a number or boolean (documented: quote it to keep a
        # string), so `description` then fails its type check, located at its line. Nothing else may fail.
        assert isinstance(typed, bool | int | float), error.problems
        assert [p.message for p in error.problems] == ["tools[0].description: Input should be a valid string"]
        return
    assert loaded.config.tools[0].description == value
    assert loaded.config.policies[0].reason == f"prefix {value or 'unset'} suffix"
    assert [t.name for t in loaded.config.tools] == ["approveExpense"]
    assert len(loaded.config.policies) == len(valid["policies"])


@SETTINGS
@given(st.randoms(use_true_random=False), st.booleans())
def test_policy_version_is_a_function_of_the_content(
    valid: dict[str, Any], workdir: Path, rng: random.Random, flow: bool
) -> None:
    def shuffled(node: Any) -> Any:
        if isinstance(node, dict):
            items = [(k, shuffled(v)) for k, v in node.items()]
            rng.shuffle(items)
            return dict(items)
        if isinstance(node, list):
            return [shuffled(v) for v in node]
        return node

    first = _load(workdir, yaml.safe_dump(valid, sort_keys=True)).policy_version
    respelled = "# operators' comment\n" + yaml.safe_dump(
        shuffled(valid), sort_keys=False, default_flow_style=flow
    )
    assert _load(workdir, respelled).policy_version == first
    changed = copy.deepcopy(valid)
    changed["policies"][0]["when"] += f" && {rng.randint(0, 9)} == {rng.randint(0, 9)}"
    assert _load(workdir, yaml.safe_dump(changed)).policy_version != first


@pytest.mark.parametrize(
    "value",
    ["[", "\x1b", "a: b: c", "'"],
    ids=["Y09-open-bracket", "Y09-control-character", "Y09-nested-colon", "Y09-quote"],
)
def test_y09_an_environment_value_that_is_not_yaml_is_a_located_error(
    valid: dict[str, Any], workdir: Path, value: str
) -> None:
    config = copy.deepcopy(valid)
    text = yaml.safe_dump(config, sort_keys=False).replace(
        "checkpoint_every: 5", "checkpoint_every: ${EVERY}"
    )
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "${EVERY}" in t)
    with pytest.raises(ConfigError) as caught:
        _load(workdir, text, {"EVERY": value})
    assert [p.line for p in caught.value.problems] == [line]
