"""A loaded config compiled into what the request path uses: per-tool validators, TLS contexts, identity settings.

A :class:`Runtime` is immutable and built completely before it is used, so a reload can swap it atomically and a
bad config never half-replaces a good one (CONTRACT §2). Long-lived resources (sessions, audit log, state store)
are not here: they belong to the app and outlive reloads.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from yarl import URL

from broker.config.loader import ConfigError, ConfigProblem, LoadedConfig
from broker.config.models import Config, Limits, Tool
from broker.gateway.filters import FilterCompileError, ToolFilters, compile_tool_filters
from broker.gateway.forward import UpstreamTarget
from broker.identity.principal import Authenticator
from broker.policy.approvers import Eligibility
from broker.policy.counters import Counters
from broker.policy.engine import PolicyCompileError, PolicySet
from broker.policy.schemas import ArgumentSchema, InvalidSchema, compile_schema
from broker.tls import upstream_ssl_context, upstream_tls_files


@dataclass(frozen=True)
class ToolSpec:
    """What the authorization pipeline knows of one tool, whichever transport reaches it: its argument
    schemas (an MCP upstream's pinned one too), injection and response filters, how it takes txn tokens."""

    name: str
    #: argument validators (each ``.error(arguments) -> str | None``), all of which must accept the arguments
    schemas: tuple[Any, ...]
    filters: ToolFilters | None
    txn_token: Literal["required", "edge"] = "edge"
    audit_fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompiledTool:
    config: Tool
    validator: ArgumentSchema
    target: UpstreamTarget
    filters: ToolFilters

    @property
    def name(self) -> str:
        return self.config.name

    @cached_property
    def spec(self) -> ToolSpec:
        return ToolSpec(
            name=self.config.name,
            schemas=(self.validator,),
            filters=self.filters,
            txn_token=self.config.txn_token,
            audit_fields=tuple(self.config.audit_fields),
        )


@dataclass(frozen=True)
class Challenge:
    """The constant parameters of our ``WWW-Authenticate`` challenges (RFC 9449 §7.1, RFC 9728 §5.1)."""

    algs: str
    resource_metadata: str


@dataclass(frozen=True)
class Runtime:
    loaded: LoadedConfig
    tools: dict[str, CompiledTool]
    authenticator: Authenticator
    challenge: Challenge
    policies: PolicySet
    #: a candidate policy set evaluated beside the active one, never deciding (CONTRACT: shadow policies)
    shadow: PolicySet | None
    counters: Counters
    #: the pooled upstream TLS contexts by (ca, cert, key) files: rotation reloads them in place
    upstream_tls: dict[tuple[str, str, str], ssl.SSLContext]

    @property
    def config(self) -> Config:
        return self.loaded.config

    @property
    def policy_version(self) -> str:
        return self.loaded.policy_version

    @property
    def limits(self) -> Limits:
        return self.loaded.config.server.limits


def read_admin_token(path: Path) -> bytes:
    """The admin listener's bearer token (``server.admin_token_file``): at least 16 characters."""
    token = path.read_bytes().strip()
    if len(token) < 16:
        raise ValueError("the admin token must be at least 16 characters")
    return token


def build_runtime(loaded: LoadedConfig) -> Runtime:
    """Compile every tool; collect all problems (FILE:LINE) before failing, like ``broker check``."""
    config = loaded.config
    file = str(loaded.path)
    problems: list[ConfigProblem] = []
    contexts: dict[tuple[str, str, str], ssl.SSLContext] = {}
    tools: dict[str, CompiledTool] = {}
    for index, tool in enumerate(config.tools):
        loc: tuple[Any, ...] = ("tools", index)
        try:
            validator = compile_schema(tool.input_schema)
        except InvalidSchema as exc:
            problems.append(
                ConfigProblem(file, loaded.line_of((*loc, "input_schema")), f"input_schema: {exc}")
            )
            continue
        files = upstream_tls_files(tool.upstream, config)
        if files not in contexts:
            try:
                contexts[files] = upstream_ssl_context(ca=files[0], cert=files[1], key=files[2])
            except (OSError, ssl.SSLError) as exc:
                problems.append(
                    ConfigProblem(file, loaded.line_of((*loc, "upstream")), f"upstream TLS: {exc}")
                )
                continue
        target = UpstreamTarget(
            tool=tool.name,
            url=URL(tool.upstream.url),
            ssl_context=contexts[files],
            timeout_seconds=tool.upstream.timeout_seconds,
            connect_timeout_seconds=tool.upstream.connect_timeout_seconds,
        )
        try:
            filters = compile_tool_filters(tool)
        except FilterCompileError as exc:
            problems.extend(
                ConfigProblem(file, loaded.line_of((*loc, *where)), msg) for where, msg in exc.problems
            )
            continue
        tools[tool.name] = CompiledTool(config=tool, validator=validator, target=target, filters=filters)
    try:
        authenticator = Authenticator(
            config.identity,
            public_url=config.server.public_url,
            max_token_bytes=config.server.limits.max_token_bytes,
        )
    except ValueError as exc:  # an unreadable or empty jwks_file, an unusable algorithm list
        problems.append(ConfigProblem(file, loaded.line_of(("identity",)), f"identity: {exc}"))
    counters = [c.name for c in config.counters]
    tool_names = [t.name for t in config.tools] + [t.name for m in config.mcp_servers for t in m.tools]
    policies: PolicySet | None = None
    shadow: PolicySet | None = None
    for section, rules in (("policies", config.policies), ("shadow_policies", config.shadow_policies)):
        if rules is None:
            continue
        try:
            compiled = PolicySet.compile(rules, tools=tool_names, counters=counters, section=section)
        except PolicyCompileError as exc:
            problems.extend(ConfigProblem(file, loaded.line_of(where), msg) for where, msg in exc.problems)
            continue
        if section == "policies":
            policies = compiled
        else:
            shadow = compiled
    try:
        from broker.mcp.upstream import compile_servers

        compile_servers(config)  # MCP upstream TLS files: a bad path is a config error, not a 502 later
    except (OSError, ssl.SSLError, ValueError) as exc:
        problems.append(ConfigProblem(file, loaded.line_of(("mcp_servers",)), f"mcp_servers: {exc}"))
    if config.server.admin_token_file is not None:
        try:
            read_admin_token(config.server.admin_token_file)
        except (OSError, ValueError) as exc:
            where = loaded.line_of(("server", "admin_token_file"))
            problems.append(ConfigProblem(file, where, f"server.admin_token_file: {exc}"))
    try:
        Eligibility.compile(config.approvals)
    except PolicyCompileError as exc:
        problems.extend(ConfigProblem(file, loaded.line_of(where), msg) for where, msg in exc.problems)
    if problems:
        raise ConfigError(problems)
    assert policies is not None
    challenge = Challenge(
        algs=" ".join(config.identity.dpop.algorithms),
        resource_metadata=f"{config.server.public_url}/.well-known/oauth-protected-resource",
    )
    return Runtime(
        loaded=loaded,
        tools=tools,
        authenticator=authenticator,
        challenge=challenge,
        policies=policies,
        shadow=shadow,
        counters=Counters(tuple(config.counters)),
        upstream_tls=contexts,
    )
