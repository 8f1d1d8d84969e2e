"""MCP session bindings (2025-03-26 … 2025-11-25 era): which (subject, actor) opened which upstream session.

An ``Mcp-Session-Id`` is a routing handle, never a credential: every request still authenticates on its own
(CONTRACT §7), and a session id is accepted only from the (subject, actor) that opened it through the broker,
on the same MCP server (HOSTILE P25). Anyone else presenting it is answered exactly as for an unknown session
(``404``), so session ids of other agents cannot even be confirmed.

Bindings live in the state store (shared by every worker and replica; created with compare-and-set, so an
upstream that hands out an id already bound to someone else is refused) with a small per-process cache in
front: a binding never changes once written, so a cached one is as good as the stored one until it is closed.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Final

from broker.identity.principal import Principal
from broker.state.base import StateStore, hash_key_part

__all__ = ["SessionBinding", "SessionStore"]

#: how long a binding is kept (an upstream session idle that long is gone anyway: the SDK reaps at 30 min)
BINDING_TTL_SECONDS: Final = 24 * 3600.0
CLOSED_TTL_SECONDS: Final = 3600.0
CACHE_ENTRIES: Final = 10_000


@dataclass(frozen=True, slots=True)
class SessionBinding:
    server: str
    subject: str
    actor: str | None
    #: the protocol version the upstream negotiated at initialize
    version: str
    #: the client declared URL-mode elicitation at initialize (capabilities.elicitation.url)
    url_elicitation: bool

    def belongs_to(self, server: str, principal: Principal) -> bool:
        return (
            self.server == server and self.subject == principal.subject and self.actor == principal.actor_id
        )


def _key(server: str, session_id: str) -> str:
    return f"mcp_session:{hash_key_part(server + chr(10) + session_id)}"


class SessionStore:
    """Bindings in the state store; every store failure propagates (``StateUnavailable``: fail closed)."""

    def __init__(self, store: StateStore, *, cache_entries: int = CACHE_ENTRIES) -> None:
        self._store = store
        self._cache: OrderedDict[str, SessionBinding] = OrderedDict()
        self._cache_entries = cache_entries

    async def bind(self, session_id: str, binding: SessionBinding) -> bool:
        """Record a new session; False if the id is already bound (an upstream reusing ids: refuse it)."""
        key = _key(binding.server, session_id)
        created = await self._store.compare_and_set_json(key, 0, asdict(binding), BINDING_TTL_SECONDS)
        if created:
            self._remember(key, binding)
        return created

    async def lookup(self, server: str, session_id: str) -> SessionBinding | None:
        key = _key(server, session_id)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        record = await self._store.get_json(key)
        if record is None or record.get("closed"):
            return None
        binding = SessionBinding(
            server=str(record["server"]),
            subject=str(record["subject"]),
            actor=None if record.get("actor") is None else str(record["actor"]),
            version=str(record["version"]),
            url_elicitation=bool(record.get("url_elicitation")),
        )
        self._remember(key, binding)
        return binding

    async def close(self, server: str, session_id: str) -> None:
        """Forget a session the agent ended (DELETE): later presentations are unknown sessions."""
        key = _key(server, session_id)
        self._cache.pop(key, None)
        await self._store.put_json(key, {"closed": True}, CLOSED_TTL_SECONDS)

    def _remember(self, key: str, binding: SessionBinding) -> None:
        self._cache[key] = binding
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)
