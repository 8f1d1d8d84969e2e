"""Tool-definition pinning: a defence against tool-definition swaps ("rug pulls") behind an MCP server.

The digest of a tool is the hex SHA-256 of the RFC 8785 bytes of ``{name, description, inputSchema}`` as the
upstream lists it (members it leaves out are left out). Each configured tool of each MCP server has a pin:

- the digest an operator accepted (``POST /admin/mcp/pins/{server}/{tool}/accept``) while the config named the
  digest it names now (or none), else
- from config (``mcp_servers[].tools[].digest``), else
- the digest of the definition first seen by ANY replica (first sight).

**Pins are shared.** Accepted and first-sight pins live in the state store (``mcp_pin:<H(server, tool)>``, one
JSON record per tool, kept :data:`PIN_TTL_SECONDS` and renewed while the tool is listed), so every worker and
replica holds the same pins and a restart does not forget them: a definition swapped while the broker was down
is a drift, not a first sight. First sight is a compare-and-set on an absent record: two replicas that see two
different definitions first agree on ONE winner (the other definition is hidden where it was seen). An accept
overwrites the record. A configured digest is not copied to the store (every replica reads it from its config).
An accept remembers the configured digest in force when it was made: once the config names another digest,
the config wins again (the operator changed the config after accepting).

Every listing the broker sees (its own catalog fetch or an agent's ``tools/list`` passing through) is compared
with the pin. A definition that differs makes the tool **drifted**: hidden from ``tools/list`` and refused in
``tools/call`` exactly like an unknown tool, logged, counted in ``broker_mcp_tool_drift_total{server,tool}`` and
shown by ``GET /admin/mcp/pins`` — until an operator accepts the new definition or the upstream reverts it.
A pinned input schema that is not a valid JSON Schema makes the tool unusable likewise (fail closed), and so
does a stored pin record this module cannot read (an accept overwrites it).

Cost on the hot path: :meth:`PinBook.usable` (every ``tools/call``) never touches the store; it answers from a
per-process cache of the stored pin, filled by :meth:`PinBook.observe`. ``observe`` re-reads the store whenever
the definition it sees differs from the cached pin (it may have been accepted elsewhere), when no pin is cached,
and otherwise at most every :data:`PIN_CACHE_SECONDS`; so a drift is never accepted because of the cache — a
definition that differs from the store's pin is hidden. ``usable`` reports a tool as seen at the older of its
last listing and its last store read, so the endpoint re-lists (and re-reads the pin) once that is older than
``MAX_CATALOG_AGE``: a replica trusts a cached pin for at most that long, the same bound as for the definition
itself. The one case this bound matters: an operator accepts a new definition on replica B and the upstream
reverts to the previously pinned one within that window; replica A may still serve the old one until its next
listing (B, the replica the accept went through, follows at once).

A store failure on the pin path (first sight, re-read, accept, report) raises
:class:`~broker.errors.StateUnavailable` (503 ``state_unavailable``; in a ``tools/list`` answer, which may already
be streaming, :func:`broker.mcp.answers.listing_transform` turns it into a JSON-RPC error); nothing is ever pinned
locally instead.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

import structlog
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from broker.canonical import canonicalize
from broker.policy.schemas import ArgumentSchema, InvalidSchema, compile_schema
from broker.resources import MAIN, MCP_PINS, RUNTIME
from broker.state.base import StateStore, hash_key_part

log = structlog.get_logger("broker.mcp.pins")

__all__ = [
    "MCP_PINS",
    "PIN_CACHE_SECONDS",
    "PIN_TTL_SECONDS",
    "PinBook",
    "accept_pin_endpoint",
    "definition_digest",
    "drift_counter",
    "pin_key",
    "pins_endpoint",
]

DEFINITION_MEMBERS: Final = ("name", "description", "inputSchema")
Source = Literal["config", "first_sight", "accepted", "unreadable"]
#: how long a stored pin lives without being renewed (a tool not listed for that long is pinned anew)
PIN_TTL_SECONDS: Final = 365 * 86_400.0
#: a stored pin read (or written) longer ago than this is renewed on its next read
PIN_RENEW_SECONDS: Final = 86_400.0
#: how long a cached pin that matches what is listed is trusted by ``observe`` without re-reading the store
PIN_CACHE_SECONDS: Final = 5.0
_HEX_DIGEST: Final = re.compile(r"[0-9a-f]{64}")
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


def pin_key(server: str, tool: str) -> str:
    """State-store key of the pin of (server, tool); both names are hashed (HOSTILE S08)."""
    return f"mcp_pin:{hash_key_part(server + chr(10) + tool)}"


def _compile(schema: Any) -> ArgumentSchema | None:
    if not isinstance(schema, dict):
        return None
    try:
        return compile_schema(schema)
    except InvalidSchema:
        return None


@dataclass(frozen=True, slots=True)
class StoredPin:
    """A pin record of the state store. ``digest`` is empty for a record this module cannot read (it matches
    no definition: the tool stays hidden until an operator accepts one, which overwrites the record)."""

    digest: str
    source: Literal["first_sight", "accepted", "unreadable"]
    #: the configured digest in force when an operator accepted this one (accepted pins only)
    config: str | None
    pinned_at: float
    renewed_at: float
    version: int

    def to_record(self, server: str, tool: str) -> dict[str, Any]:
        return {
            "server": server,
            "tool": tool,
            "digest": self.digest,
            "source": self.source,
            "config": self.config,
            "pinned_at": self.pinned_at,
            "renewed_at": self.renewed_at,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, Any], server: str, tool: str) -> StoredPin:
        version = int(record.get("version", 0))
        try:
            digest, source, config = record["digest"], record["source"], record.get("config")
            pinned_at, renewed_at = float(record["pinned_at"]), float(record["renewed_at"])
            valid = (
                record.get("server") == server
                and record.get("tool") == tool
                and isinstance(digest, str)
                and _HEX_DIGEST.fullmatch(digest) is not None
                and source in ("first_sight", "accepted")
                and (config is None or (isinstance(config, str) and _HEX_DIGEST.fullmatch(config)))
            )
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            log.error("unreadable mcp pin record; tool hidden until accepted", server=server, tool=tool)
            return cls("", "unreadable", None, 0.0, 0.0, version)
        return cls(digest, source, config, pinned_at, renewed_at, version)


def effective_pin(stored: StoredPin | None, configured: str | None) -> tuple[str | None, Source | None]:
    """The pin in force: an accept made under the configured digest in force now, else the configured digest,
    else the stored pin (first sight or accepted). ``(None, None)``: nothing pinned yet."""
    config = configured.lower() if configured is not None else None
    if config is not None and not (
        stored is not None and stored.source == "accepted" and stored.config == config
    ):
        return config, "config"
    if stored is None:
        return None, None
    return stored.digest, stored.source


@dataclass
class PinState:
    """What this process knows about one configured tool: the definition it saw last, and its cache of the
    stored pin."""

    current: str | None = None
    definition: dict[str, Any] | None = None
    validator: ArgumentSchema | None = None
    seen_at: float = 0.0
    #: the store's pin record as last read or written (None: the store had none)
    stored: StoredPin | None = None
    #: when ``stored`` was last read from or written to the store (None: never)
    checked_at: float | None = None
    #: the last digest counted as a drift (each new differing definition is counted once)
    drift_reported: str | None = None

    def pin(self, configured: str | None) -> tuple[str | None, Source | None]:
        return effective_pin(self.stored, configured)


@dataclass(frozen=True)
class Usable:
    """A tool whose current definition matches its pin, with its compiled input-schema validator.

    ``seen_at`` is the older of the last listing and the last store read of the pin."""

    definition: dict[str, Any]
    validator: ArgumentSchema
    seen_at: float


class PinBook:
    """Pins of every (server, tool), shared through the state store, with a per-process cache (module docstring).

    ``store`` is the broker's state store; without one (unit tests) the book gets a private in-memory store,
    which makes its pins per process.
    """

    def __init__(
        self,
        drift: Counter,
        store: StateStore | None = None,
        *,
        cache_seconds: float = PIN_CACHE_SECONDS,
    ) -> None:
        if store is None:
            from broker.state.memory import MemoryStore

            store = MemoryStore()
        self._drift = drift
        self._store = store
        self._cache_seconds = cache_seconds
        self._states: dict[tuple[str, str], PinState] = {}

    def state(self, server: str, tool: str) -> PinState:
        return self._states.setdefault((server, tool), PinState())

    async def _load(self, server: str, tool: str, now: float) -> StoredPin | None:
        """Read the stored pin into the cache (renewing it when due); StateUnavailable propagates."""
        record = await self._store.get_json(pin_key(server, tool))
        stored = None if record is None else StoredPin.from_record(record, server, tool)
        if (
            stored is not None
            and stored.source != "unreadable"
            and now - stored.renewed_at >= PIN_RENEW_SECONDS
        ):
            renewed = StoredPin(
                stored.digest, stored.source, stored.config, stored.pinned_at, now, stored.version + 1
            )
            key = pin_key(server, tool)
            if await self._store.compare_and_set_json(
                key, stored.version, renewed.to_record(server, tool), PIN_TTL_SECONDS
            ):
                stored = renewed
        state = self.state(server, tool)
        state.stored, state.checked_at = stored, now
        return stored

    async def _first_sight(self, server: str, tool: str, digest: str, now: float) -> None:
        """Pin ``digest`` if no replica pinned anything yet (compare-and-set on an absent record)."""
        pinned = StoredPin(digest, "first_sight", None, now, now, 1)
        if await self._store.compare_and_set_json(
            pin_key(server, tool), 0, pinned.to_record(server, tool), PIN_TTL_SECONDS
        ):
            state = self.state(server, tool)
            state.stored, state.checked_at = pinned, now
            log.info("mcp tool pinned at first sight", server=server, tool=tool, digest=digest)
            return
        await self._load(server, tool, now)  # another replica got there first: its pin is ours

    async def observe(
        self, server: str, tool: str, configured: str | None, entry: Mapping[str, Any], now: float
    ) -> bool:
        """Record a definition seen upstream; True when it matches the pin (the tool may be shown and called).

        Raises :class:`~broker.errors.StateUnavailable` when the store must be read or written and cannot be.
        """
        state = self.state(server, tool)
        digest = definition_digest(entry)
        if digest == state.current:
            definition, validator = state.definition, state.validator
        else:
            definition = pinned_definition(entry)
            validator = _compile(definition.get("inputSchema")) if digest is not None else None
            # recorded before the store is asked: if it cannot answer, ``usable`` must not keep serving the
            # definition seen before (a swap during an outage hides the tool, it is not missed)
            state.current, state.definition, state.validator = digest, definition, validator
        pin, _ = state.pin(configured)
        fresh = state.checked_at is not None and 0 <= now - state.checked_at < self._cache_seconds
        if pin is None or digest != pin or not fresh:
            stored = await self._load(server, tool, now)
            if stored is None and configured is None and digest is not None:
                await self._first_sight(server, tool, digest, now)
            pin, _ = state.pin(configured)
        # no await below: the cached definition and its time change together
        state.current, state.definition, state.validator = digest, definition, validator
        state.seen_at = now
        ok = digest is not None and digest == pin and validator is not None
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
                schema_valid=validator is not None,
            )
        return ok

    def usable(self, server: str, tool: str, configured: str | None) -> Usable | None:
        """The tool's definition if it matches the cached pin (no store access: the ``tools/call`` hot path)."""
        state = self._states.get((server, tool))
        if state is None or state.current is None or state.definition is None or state.validator is None:
            return None
        pin, _ = state.pin(configured)
        if state.current != pin or state.checked_at is None:
            return None
        return Usable(state.definition, state.validator, min(state.seen_at, state.checked_at))

    def current(self, server: str, tool: str) -> str | None:
        """The digest of the definition this process saw last (None: not seen)."""
        state = self._states.get((server, tool))
        return None if state is None else state.current

    async def accept(
        self, server: str, tool: str, configured: str | None = None, *, now: float | None = None
    ) -> str | None:
        """Pin the definition this process saw last, for every replica (overwrites the stored pin); returns its
        digest, None when none was seen here (nothing to accept). StateUnavailable propagates."""
        state = self._states.get((server, tool))
        if state is None or state.current is None:
            return None
        now = time.time() if now is None else now
        digest = state.current
        config = configured.lower() if configured is not None else None
        accepted = StoredPin(digest, "accepted", config, now, now, 0)
        key = pin_key(server, tool)
        await self._store.put_json(key, accepted.to_record(server, tool), PIN_TTL_SECONDS)
        state.stored, state.checked_at = accepted, now
        state.drift_reported = None
        log.warning("mcp tool definition accepted by an operator", server=server, tool=tool, digest=digest)
        return digest

    async def report(
        self, server: str, tool: str, configured: str | None, *, now: float | None = None
    ) -> dict[str, Any]:
        """The stored pin (read now) beside the definition this process saw last."""
        now = time.time() if now is None else now
        await self._load(server, tool, now)
        state = self.state(server, tool)
        pin, source = state.pin(configured)
        if state.current is None:
            status = "unseen"
        elif state.current == pin and state.validator is not None:
            status = "ok"
        else:
            status = "drifted"
        return {
            "pinned": pin or None,
            "source": source,
            "current": state.current,
            "status": status,
            "seen_at": state.seen_at or None,
            "definition": state.definition if status == "drifted" else None,
        }


def _configured(app: web.Application) -> dict[str, dict[str, str | None]]:
    config = app[RUNTIME].current.config
    return {server.name: {t.name: t.digest for t in server.tools} for server in config.mcp_servers}


def _main_app(request: web.Request) -> web.Application:
    return request.app[MAIN]


async def pins_endpoint(request: web.Request) -> web.StreamResponse:
    """``GET /admin/mcp/pins``: every configured MCP tool's pin (read from the store), the digest this replica
    saw last, and its status."""
    main = _main_app(request)
    book = main[MCP_PINS]
    servers: dict[str, dict[str, Any]] = {}
    for server, tools in _configured(main).items():
        servers[server] = {tool: await book.report(server, tool, digest) for tool, digest in tools.items()}
    return web.json_response({"servers": servers, "time": time.time()}, headers={"Cache-Control": "no-store"})


def _error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


async def _expected_digest(request: web.Request) -> str | web.Response | None:
    """The optional ``{"digest": "<hex>"}`` of an accept: the definition the operator reviewed."""
    text = await request.text()
    if not text.strip():
        return None
    try:
        body = json.loads(text)
    except ValueError:
        return _error(400, "invalid_request", "the body must be a JSON object")
    if not isinstance(body, dict):
        return _error(400, "invalid_request", "the body must be a JSON object")
    digest = body.get("digest")
    if digest is None:
        return None
    if not isinstance(digest, str) or not _HEX_DIGEST.fullmatch(digest.lower()):
        return _error(400, "invalid_request", "digest must be a hex SHA-256")
    return digest.lower()


async def accept_pin_endpoint(request: web.Request) -> web.StreamResponse:
    """``POST /admin/mcp/pins/{server}/{tool}/accept``: pin the definition this replica saw last, for every
    replica. With ``{"digest": …}`` only if that is the definition seen here (409 otherwise)."""
    main = _main_app(request)
    server, tool = request.match_info["server"], request.match_info["tool"]
    configured = _configured(main)
    if tool not in configured.get(server, {}):
        return _error(404, "not_found", "no such configured MCP tool")
    expected = await _expected_digest(request)
    if isinstance(expected, web.Response):
        return expected
    book = main[MCP_PINS]
    if expected is not None and book.current(server, tool) != expected:
        return _error(409, "digest_mismatch", "this replica sees another definition of this tool")
    digest = await book.accept(server, tool, configured[server][tool])
    if digest is None:
        return _error(409, "nothing_to_accept", "this tool's definition has not been seen yet")
    return web.json_response({"accepted": {"server": server, "tool": tool, "digest": digest}})
