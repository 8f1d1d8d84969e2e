"""Strict YAML loading with located errors (CONTRACT §2).

``load_config(path)`` returns a :class:`LoadedConfig` or raises :class:`ConfigError` listing every problem as
``FILE:LINE: message`` (an unknown key names the nearest known one: "did you mean `checkpoint_every`?").
``read_config`` and ``validate_config`` are its two halves, for ``broker check``, which goes on past the first
(:mod:`broker.config.check`). The YAML is composed into nodes (never constructed into arbitrary objects: no
``!!python/...`` tags), duplicate keys are errors, recursive aliases are refused and the node count and nesting
depth are capped with aliases expanded, before anything recursive runs (alias bombs, HOSTILE Y09;
:mod:`broker.config.yaml_bounds`), every string scalar gets ``${VAR}`` / ``${VAR:-default}`` expansion (``$$`` is
a literal ``$``), and paths are resolved relative to the config file's folder by the models' path fields.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from broker.config.models import Config
from broker.config.yaml_bounds import MAX_NODES, YamlBoundError, compose_bounded

MAX_CONFIG_BYTES = 4 * 1024 * 1024
_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})")
_TAG_PREFIX = "tag:yaml.org,2002:"
_TYPED_TAGS = {f"{_TAG_PREFIX}{t}" for t in ("int", "float", "bool")}
_SCALAR_TAGS = {f"{_TAG_PREFIX}{t}" for t in ("str", "int", "float", "bool", "null", "timestamp")}

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class ConfigProblem:
    file: str
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    path: Path
    #: SHA-256 (first 12 hex) of the canonical JSON of the validated config: in every decision and audit record
    policy_version: str
    #: YAML location of every key / sequence item, for errors found after validation (e.g. CEL compile errors)
    lines: Mapping[Loc, int] = field(repr=False)
    #: the environment variables each value was expanded from, e.g. ("server", "listen") -> ("BROKER_LISTEN",):
    #: an error about a value can then name the variable that moves it
    variables: Mapping[Loc, tuple[str, ...]] = field(default_factory=dict, repr=False)

    def line_of(self, loc: Loc) -> int:
        return _line_for(self.lines, loc)

    def problem(self, loc: Loc, message: str) -> ConfigProblem:
        """``message`` located at the line that sets ``loc`` (or its deepest present parent)."""
        return ConfigProblem(str(self.path), self.line_of(loc), message)


@dataclass(frozen=True)
class ParsedConfig:
    """A config file composed and expanded, not yet validated."""

    path: Path
    data: dict[str, Any]
    lines: Mapping[Loc, int] = field(repr=False)
    variables: Mapping[Loc, tuple[str, ...]] = field(repr=False)
    #: what building found (duplicate keys, unsupported tags, unset variables); ``data`` is still complete
    #: (an unset variable expands to ""), so ``broker check`` can go on and validate it
    problems: tuple[ConfigProblem, ...] = ()

    def line_of(self, loc: Loc) -> int:
        return _line_for(self.lines, loc)


def _line_for(lines: Mapping[Loc, int], loc: Loc) -> int:
    # The deepest known prefix: a missing key is reported at its parent's line.
    for end in range(len(loc), -1, -1):
        line = lines.get(tuple(loc[:end]))
        if line is not None:
            return line
    return 1


class _Builder:
    """Turns a composed YAML node tree into plain data, recording a line for each location."""

    def __init__(self, file: str, environ: Mapping[str, str]) -> None:
        self.file = file
        self.environ = environ
        self.lines: dict[Loc, int] = {(): 1}
        self.variables: dict[Loc, tuple[str, ...]] = {}
        self.problems: list[ConfigProblem] = []
        self.nodes = 0
        self._constructor = yaml.SafeLoader("")

    def problem(self, node: yaml.Node, message: str) -> None:
        self.problems.append(ConfigProblem(self.file, node.start_mark.line + 1, message))

    def build(self, node: yaml.Node, loc: Loc) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise ConfigError(
                [ConfigProblem(self.file, node.start_mark.line + 1, "document too large (alias bomb?)")]
            )
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            result: dict[str, Any] = {}
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == f"{_TAG_PREFIX}merge":
                    self.problem(key_node, "keys must be plain strings (no merge keys or complex keys)")
                    continue
                key = key_node.value
                if key in result:
                    self.problem(key_node, f"duplicate key {key!r}")
                    continue
                self.lines[(*loc, key)] = key_node.start_mark.line + 1
                result[key] = self.build(value_node, (*loc, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*loc, i)) for i, item in enumerate(node.value)]
        assert isinstance(node, yaml.ScalarNode)
        if node.tag not in _SCALAR_TAGS:
            self.problem(node, f"unsupported YAML tag {node.tag!r}")
            return None
        value = self._constructor.construct_object(node)
        if isinstance(value, str):
            names = tuple(m.group(1) for m in _VAR.finditer(value) if m.group(1))
            if names:
                self.variables[loc] = names
            return self.expand(node, value)
        return value

    def expand(self, node: yaml.ScalarNode, text: str) -> Any:
        missing: list[str] = []

        def substitute(match: re.Match[str]) -> str:
            if match.group(0) == "$$":
                return "$"
            name, default = match.group(1), match.group(2)
            value = self.environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    missing.append(name)
                    return ""
                return default
            return value

        expanded = _VAR.sub(substitute, text)
        for name in missing:
            self.problem(
                node, f"environment variable {name} is not set (use ${{{name}:-default}} for a default)"
            )
        if expanded != text and node.style is None and _VAR.fullmatch(text):
            # A plain scalar that is one whole reference takes the type of what it expands to, so
            # `checkpoint_every: ${N:-100}` is an int. Quote it ("${N}") to keep a string.
            # Resolved as one plain scalar, never parsed as a document: a value like `[[[...` or `&a [*a]` stays a
            # string (the model's type check reports it at this line) and cannot recurse (HOSTILE Y09).
            scalar = expanded.strip()
            tag = self._constructor.resolve(yaml.ScalarNode, scalar, (True, False))
            if tag in _TYPED_TAGS:
                typed = self._constructor.construct_object(yaml.ScalarNode(tag, scalar))
                if isinstance(typed, bool | int | float):
                    return typed
        return expanded


def parse_yaml(
    text: str, *, file: str, environ: Mapping[str, str] | None = None
) -> tuple[Any, dict[Loc, int]]:
    """Compose, build and expand one YAML document; raise ConfigError with located problems."""
    builder, data = _build(text, file=file, environ=environ)
    if builder.problems:
        raise ConfigError(builder.problems)
    return data, builder.lines


def _build(text: str, *, file: str, environ: Mapping[str, str] | None) -> tuple[_Builder, Any]:
    """Compose and build; raises ConfigError only when there is no document to go on with (syntax, size)."""
    try:
        node = compose_bounded(text)
    except YamlBoundError as exc:
        raise ConfigError([ConfigProblem(file, exc.line, exc.message)]) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([ConfigProblem(file, line, f"YAML syntax: {exc.problem or exc}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([ConfigProblem(file, 1, f"YAML: {exc}")]) from None
    if node is None:
        raise ConfigError([ConfigProblem(file, 1, "empty document")])
    builder = _Builder(file, os.environ if environ is None else environ)
    return builder, builder.build(node, ())


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _validation_problems(exc: ValidationError, file: str, lines: Mapping[Loc, int]) -> list[ConfigProblem]:
    problems = []
    for err in exc.errors(include_url=False):
        # pydantic adds the tag of a union/literal branch or 'function-after' steps to loc; keep real keys only
        loc: Loc = tuple(
            p for p in err["loc"] if isinstance(p, int) or not str(p).startswith(("function-", "tagged-"))
        )
        kind = err["type"]
        if kind == "extra_forbidden":
            message = f"{format_loc(loc)}: unknown key{_did_you_mean(loc)}"
        elif kind == "missing":
            message = f"{format_loc(loc)}: required key is missing"
        else:
            message = f"{format_loc(loc)}: {err['msg'].removeprefix('Value error, ')}"
        problems.append(ConfigProblem(file, _line_for(lines, loc), message))
    return problems


def _did_you_mean(loc: Loc) -> str:
    """ "; did you mean `checkpoint_every`?" for an unknown key close to a known one of the same model, else ""."""
    if not loc or not isinstance(loc[-1], str):
        return ""
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(loc[-1], list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean `{close[0]}`?" if close else ""


def _model_at(loc: Loc) -> type[BaseModel] | None:
    """The config model that validates the mapping at ``loc`` (following fields, lists and optionals)."""
    current: Any = Config
    for part in loc:
        current = _unwrap_optional(current)
        if isinstance(part, int):
            if get_origin(current) is not list:
                return None
            current = get_args(current)[0]
        elif isinstance(current, type) and issubclass(current, BaseModel) and part in current.model_fields:
            current = current.model_fields[part].annotation
        else:
            return None
    current = _unwrap_optional(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [a for a in get_args(annotation) if a is not type(None)]
        return rest[0] if len(rest) == 1 else annotation
    return annotation


def policy_version_of(config: Config) -> str:
    canonical = json.dumps(
        config.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:12]


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> LoadedConfig:
    """Load, expand and validate a config file. Raises ConfigError (each problem as FILE:LINE: message)."""
    parsed = read_config(path, environ=environ)
    if parsed.problems:
        raise ConfigError(list(parsed.problems))
    return validate_config(parsed)


def read_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> ParsedConfig:
    """Read, compose and expand a config file. Raises ConfigError only when nothing can be validated (unreadable,
    too large, YAML syntax, not a mapping); other problems are in ``ParsedConfig.problems``."""
    path = Path(path)
    file = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([ConfigProblem(file, 0, f"cannot read: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([ConfigProblem(file, 0, f"file larger than {MAX_CONFIG_BYTES} bytes")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError([ConfigProblem(file, 1, "not UTF-8")]) from None
    builder, data = _build(text, file=file, environ=environ)
    if not isinstance(data, dict):
        raise ConfigError([*builder.problems, ConfigProblem(file, 1, "the top level must be a mapping")])
    return ParsedConfig(
        path=path,
        data=data,
        lines=builder.lines,
        variables=builder.variables,
        problems=tuple(builder.problems),
    )


def validation_context(path: Path) -> dict[str, Any]:
    """What the models need to validate a file's data: its folder, for relative paths."""
    return {"base_dir": path.resolve().parent}


def validate_config(parsed: ParsedConfig) -> LoadedConfig:
    """Validate parsed data against the models. Raises ConfigError listing every problem found."""
    try:
        config = Config.model_validate(parsed.data, context=validation_context(parsed.path))
    except ValidationError as exc:
        raise ConfigError(_validation_problems(exc, str(parsed.path), parsed.lines)) from None
    return LoadedConfig(
        config=config,
        path=parsed.path,
        policy_version=policy_version_of(config),
        lines=parsed.lines,
        variables=parsed.variables,
    )
