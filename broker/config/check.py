"""``broker check`` (and the start of ``broker run``): every problem of a config, in one pass (CONTRACT §1).

``load_config`` stops at the first stage that fails (YAML, then the models); an operator fixing a config wants the
whole list at once. :func:`check_config` goes on: the models' problems, then every file the config names
(:mod:`broker.config.files`), every tool's input schema and response filters, every policy's CEL and the approvers'
rules — of an invalid config, those parts that validate on their own. Only when all of that passes is the runtime
built as ``broker run`` builds it, so anything else it refuses is reported too, and nothing twice. Problems come
sorted by line.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter, ValidationError

from broker.config.files import Kind, file_fields, file_problems, named_files
from broker.config.loader import (
    ConfigError,
    ConfigProblem,
    LoadedConfig,
    Loc,
    ParsedConfig,
    format_loc,
    read_config,
    validate_config,
    validation_context,
)
from broker.config.models import Approvals, Config, ConfigPath, Policy, Tool

M = TypeVar("M", bound=BaseModel)
_PATH: TypeAdapter[Path] = TypeAdapter(ConfigPath)


@dataclass(frozen=True)
class CheckResult:
    #: the validated config when there is no problem at all, else None
    loaded: LoadedConfig | None
    problems: list[ConfigProblem]


@dataclass(frozen=True)
class _Sections:
    """What is compiled beyond the models: all of a valid config, or, of an invalid one, every tool, policy and
    approvals section that validates on its own (list items with their index in the file)."""

    tools: tuple[tuple[int, Tool], ...] = ()
    policies: Mapping[str, tuple[tuple[int, Policy], ...]] = field(default_factory=dict)
    approvals: Approvals | None = None
    tool_names: frozenset[str] = frozenset()
    counter_names: frozenset[str] = frozenset()

    @classmethod
    def of(cls, config: Config) -> _Sections:
        return cls(
            tools=tuple(enumerate(config.tools)),
            policies={
                "policies": tuple(enumerate(config.policies)),
                "shadow_policies": tuple(enumerate(config.shadow_policies or ())),
            },
            approvals=config.approvals,
            tool_names=frozenset(
                [t.name for t in config.tools] + [t.name for m in config.mcp_servers for t in m.tools]
            ),
            counter_names=frozenset(c.name for c in config.counters),
        )

    @classmethod
    def salvage(cls, parsed: ParsedConfig) -> _Sections:
        data, context = parsed.data, validation_context(parsed.path)

        def one(model: type[M], value: Any) -> M | None:
            try:
                return model.model_validate(value, context=context)
            except ValidationError:
                return None  # the whole config's validation reported it already

        def each(model: type[M], items: Any) -> tuple[tuple[int, M], ...]:
            return tuple((i, m) for i, item in enumerate(_list(items)) if (m := one(model, item)) is not None)

        mcp_tools = [name for m in _list(data.get("mcp_servers")) for name in _names(_dict(m).get("tools"))]
        return cls(
            tools=each(Tool, data.get("tools")),
            policies={
                "policies": each(Policy, data.get("policies")),
                "shadow_policies": each(Policy, data.get("shadow_policies")),
            },
            approvals=one(Approvals, data.get("approvals", {})),
            tool_names=frozenset(_names(data.get("tools")) + mcp_tools),
            counter_names=frozenset(_names(data.get("counters"))),
        )


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _names(items: Any) -> list[str]:
    """The ``name`` of every mapping in a raw list, valid or not: what policies may refer to."""
    return [i["name"] for i in _list(items) if isinstance(i, dict) and isinstance(i.get("name"), str)]


def check_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> CheckResult:
    """Every problem of the config at ``path``; ``loaded`` is set only when there is none."""
    try:
        parsed = read_config(path, environ=environ)
    except ConfigError as exc:
        return CheckResult(None, exc.problems)  # no document to go on with (unreadable, YAML syntax)
    loaded: LoadedConfig | None = None
    later: list[ConfigProblem] = []
    try:
        loaded = validate_config(parsed)
    except ConfigError as exc:
        later += exc.problems
    sections = _Sections.of(loaded.config) if loaded is not None else _Sections.salvage(parsed)
    later += _file_problems(parsed, loaded)
    later += _compile_problems(sections, parsed)
    if not later and not parsed.problems and loaded is not None:
        from broker.runtime import build_runtime  # the server's own compile step, as `broker run` does it

        try:
            build_runtime(loaded)
        except ConfigError as exc:
            later += exc.problems
    # an unset variable expands to "": what the models or the file check then say of that value is the same
    # problem a second time
    taken = {p.line for p in parsed.problems}
    problems = [*parsed.problems, *(p for p in later if p.line not in taken)]
    unique = list(dict.fromkeys(sorted(problems, key=lambda p: p.line)))
    return CheckResult(loaded if not unique else None, unique)


def _file_problems(parsed: ParsedConfig, loaded: LoadedConfig | None) -> list[ConfigProblem]:
    """Every file the config names: from the validated models, else each file field of the raw data that is a
    valid path on its own (so that a typo in ``server.listen`` does not hide a missing ``server.tls.cert``)."""
    context = validation_context(parsed.path)
    paths: list[tuple[Loc, Kind, Path]] = []
    if loaded is not None:
        paths = list(file_fields(loaded.config.model_dump()))
    else:
        for loc, kind, value in file_fields(parsed.data):
            with contextlib.suppress(ValidationError):  # the whole config's validation reported it already
                paths.append((loc, kind, _PATH.validate_python(value, context=context)))
    return file_problems(named_files(paths), file=str(parsed.path), line_of=parsed.line_of)


def _compile_problems(sections: _Sections, parsed: ParsedConfig) -> list[ConfigProblem]:
    """Tools' schemas and filters, policies' and approvers' CEL: the compile steps that need no file."""
    from broker.gateway.filters import FilterCompileError, compile_tool_filters
    from broker.policy.approvers import Eligibility
    from broker.policy.engine import PolicyCompileError, PolicySet
    from broker.policy.schemas import InvalidSchema, compile_schema

    found: list[tuple[Loc, str]] = []
    for index, tool in sections.tools:
        try:
            compile_schema(tool.input_schema)
        except InvalidSchema as exc:
            found.append((("tools", index, "input_schema"), str(exc)))
        try:
            compile_tool_filters(tool)
        except FilterCompileError as exc:
            found += [(("tools", index, *where), message) for where, message in exc.problems]
    for section, items in sections.policies.items():
        for index, policy in items:
            # one rule at a time, so that an invalid neighbour does not hide this one's problems
            try:
                PolicySet.compile(
                    [policy], tools=sections.tool_names, counters=sections.counter_names, section=section
                )
            except PolicyCompileError as exc:
                found += [((section, index, *where[2:]), message) for where, message in exc.problems]
    if sections.approvals is not None:
        try:
            Eligibility.compile(sections.approvals)
        except PolicyCompileError as exc:
            found += exc.problems
    # one line each, named like the models' problems (CEL adds a caret drawing below its first line)
    return [
        ConfigProblem(str(parsed.path), parsed.line_of(loc), f"{format_loc(loc)}: {message.splitlines()[0]}")
        for loc, message in found
    ]
