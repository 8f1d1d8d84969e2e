"""Tool-definition pinning: a defence against tool-definition swaps ("rug pulls") behind an MCP server.

The digest of a tool is the hex SHA-256 of the RFC 8785 bytes of ``{name, description, inputSchema}`` as the
upstream lists it (members it leaves out are left out). Each configured tool of each MCP server has a pin:

- from config (``mcp_servers[].tools[].digest``), else
- recorded the first time this broker process sees the tool (**per process**: every worker and every restart
  pins afresh, unless the digest is in the config — which is what production should do), or
- accepted by an operator (``POST /admin/mcp/pins/{server}/{tool}/accept``, also per process).

Every listing the broker sees (its own catalog fetch or an agent's ``tools/list`` passing through) is compared
with the pin. A definition that differs makes the tool **drifted**: hidden from ``tools/list`` and refused in
``tools/call`` exactly like an unknown tool, logged, counted in ``broker_mcp_tool_drift_total{server,tool}`` and
shown by ``GET /admin/mcp/pins`` — until an operator accepts the new definition or the upstream reverts it.
A pinned input schema that is not a valid JSON Schema makes the tool unusable likewise (fail closed).
"""

from __future__ import annotations

import hashlib
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import jsonschema
import structlog
from aiohttp import web
from jsonschema.protocols import Validator
from prometheus_client import CollectorRegistry, Counter

from broker.canonical import canonicalize
from broker.resources import RUNTIME

log = structlog.get_logger("broker.mcp.pins")

__all__ = [
    "MCP_PINS",
    "PinBook",
    "accept_pin_endpoint",
    "definition_digest",
    "drift_counter",
    "pins_endpoint",
]

DEFINITION_MEMBERS: Final = ("name", "description", "inputSchema")
Source = Literal["config", "first_sight", "accepted"]
_drift_counters: weakref.WeakKeyDictionary[CollectorRegistry, Counter] = weakref.WeakKeyDictionary()


def drift_counter(registry: CollectorRegistry) -> Counter:
    """``broker_mcp_tool_drift_total{server,tool}`` on ``registry`` (defined once per registry)."""
    counter = _drift_counters.get(registry)
    if counter is None:
        counter = Counter(
            "broker_mcp_tool_drift_total",
            "MCP tool definitions seen differing from their pin (the tool is hidden until accepted)",
            ["server", "tool"],
            registry=registry,
        )
        _drift_counters[registry] = counter
    return counter


def pinned_definition(entry: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an upstream tool entry the pin covers."""
    return {k: entry[k] for k in DEFINITION_MEMBERS if k in entry}


def definition_digest(entry: Mapping[str, Any]) -> str | None:
    """Hex SHA-256 of the RFC 8785 form of :func:`pinned_definition`; None when it has no exact JSON form."""
    try:
        return hashlib.sha256(canonicalize(pinned_definition(entry))).hexdigest()
    except (ValueError, TypeError, UnicodeEncodeError):
        return None


def _compile(schema: Any) -> Validator | None:
    if not isinstance(schema, dict):
        return None
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError:
        return None
    validator: Validator = cls(schema)
    return validator


@dataclass
class PinState:
    """What this process knows about one configured tool."""

    first_sight: str | None = None
    accepted: str | None = None
    current: str | None = None
    definition: dict[str, Any] | None = None
    validator: Validator | None = None
    seen_at: float = 0.0
    #: the last digest counted as a drift (each new differing definition is counted once)
    drift_reported: str | None = None

    def pin(self, configured: str | None) -> tuple[str | None, Source | None]:
        if self.accepted is not None:
            return self.accepted, "accepted"
        if configured is not None:
            return configured.lower(), "config"
        return self.first_sight, ("first_sight" if self.first_sight is not None else None)


@dataclass(frozen=True)
class Usable:
    """A tool whose current definition matches its pin, with its compiled input-schema validator."""

    definition: dict[str, Any]
    validator: Validator
    seen_at: float


class PinBook:
    """Per-process pins for every (server, tool). Synchronous and in-memory: cheap on the hot path."""

    def __init__(self, drift: Counter) -> None:
        self._drift = drift
        self._states: dict[tuple[str, str], PinState] = {}

    def state(self, server: str, tool: str) -> PinState:
        return self._states.setdefault((server, tool), PinState())

    def observe(
        self, server: str, tool: str, configured: str | None, entry: Mapping[str, Any], now: float
    ) -> bool:
        """Record a definition seen upstream; True when it matches the pin (the tool may be shown and called)."""
        state = self.state(server, tool)
        digest = definition_digest(entry)
        if digest != state.current:
            definition = pinned_definition(entry)
            state.current, state.definition = digest, definition
            state.validator = _compile(definition.get("inputSchema")) if digest is not None else None
        state.seen_at = now
        pin, _ = state.pin(configured)
        if pin is None and digest is not None:
            state.first_sight = pin = digest
            log.info("mcp tool pinned at first sight", server=server, tool=tool, digest=digest)
        ok = digest is not None and digest == pin and state.validator is not None
        if ok:
            state.drift_reported = None  # reverted: a later swap is counted again
        elif state.drift_reported != (digest or "-"):  # "-": a definition without an exact JSON form
            state.drift_reported = digest or "-"
            self._drift.labels(server=server, tool=tool).inc()
            log.warning(
                "mcp tool definition differs from its pin; tool hidden until accepted",
                server=server,
                tool=tool,
                pinned=pin,
                seen=digest,
                schema_valid=state.validator is not None,
            )
        return ok

    def usable(self, server: str, tool: str, configured: str | None) -> Usable | None:
        state = self._states.get((server, tool))
        if state is None or state.current is None or state.definition is None or state.validator is None:
            return None
        pin, _ = state.pin(configured)
        if state.current != pin:
            return None
        return Usable(state.definition, state.validator, state.seen_at)

    def accept(self, server: str, tool: str) -> str | None:
        """Pin the definition seen last; returns its digest, None when none was seen (nothing to accept)."""
        state = self._states.get((server, tool))
        if state is None or state.current is None:
            return None
        state.accepted = state.current
        state.drift_reported = None
        log.warning(
            "mcp tool definition accepted by an operator", server=server, tool=tool, digest=state.current
        )
        return state.current

    def report(self, server: str, tool: str, configured: str | None) -> dict[str, Any]:
        state = self._states.get((server, tool)) or PinState()
        pin, source = state.pin(configured)
        if state.current is None:
            status = "unseen"
        elif state.current == pin and state.validator is not None:
            status = "ok"
        else:
            status = "drifted"
        return {
            "pinned": pin,
            "source": source,
            "current": state.current,
            "status": status,
            "seen_at": state.seen_at or None,
            "definition": state.definition if status == "drifted" else None,
        }


MCP_PINS = web.AppKey("mcp_pins", PinBook)


def _configured(app: web.Application) -> dict[str, dict[str, str | None]]:
    config = app[RUNTIME].current.config
    return {server.name: {t.name: t.digest for t in server.tools} for server in config.mcp_servers}


def _main_app(request: web.Request) -> web.Application:
    from broker.app import MAIN  # the admin app holds the main one; app.py imports this module

    return request.app[MAIN]


async def pins_endpoint(request: web.Request) -> web.StreamResponse:
    """``GET /admin/mcp/pins``: every configured MCP tool's pin, last seen digest and status."""
    main = _main_app(request)
    book = main[MCP_PINS]
    servers = {
        server: {tool: book.report(server, tool, digest) for tool, digest in tools.items()}
        for server, tools in _configured(main).items()
    }
    return web.json_response({"servers": servers, "time": time.time()}, headers={"Cache-Control": "no-store"})


async def accept_pin_endpoint(request: web.Request) -> web.StreamResponse:
    """``POST /admin/mcp/pins/{server}/{tool}/accept``: pin the definition last seen (this process only)."""
    main = _main_app(request)
    server, tool = request.match_info["server"], request.match_info["tool"]
    configured = _configured(main)
    if tool not in configured.get(server, {}):
        return web.json_response(
            {"error": "not_found", "error_description": "no such configured MCP tool"}, status=404
        )
    digest = main[MCP_PINS].accept(server, tool)
    if digest is None:
        return web.json_response(
            {
                "error": "nothing_to_accept",
                "error_description": "this tool's definition has not been seen yet",
            },
            status=409,
        )
    return web.json_response({"accepted": {"server": server, "tool": tool, "digest": digest}})
