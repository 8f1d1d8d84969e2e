"""The broker's state store: replay, single use, revocations, counters and approvals behind one interface.

``make_store`` picks the backend named by ``state.backend``: ``memory`` (embedded, one process) or ``redis``
(shared by workers and replicas). The interface and its fail-closed contract live in :mod:`broker.state.base`.

``state.redis_url`` names one server (``redis://``, ``rediss://``), a Sentinel-managed master
(``redis+sentinel://host:port[,host:port...]/service_name[/db]``) or a Redis Cluster
(``redis+cluster://host:port[,host:port...]``); the formats are in :mod:`broker.state.redis_cluster`, whose
:func:`~broker.state.redis_cluster.parse_redis_url` a config check can call without connecting.
"""

from __future__ import annotations

from broker.state.base import OPS, ErrorCallback, StateStore, hash_key_part, hash_tag
from broker.state.memory import MemoryStore

__all__ = ["OPS", "ErrorCallback", "MemoryStore", "StateStore", "hash_key_part", "hash_tag", "make_store"]


def make_store(
    backend: str,
    *,
    redis_url: str | None,
    key_prefix: str,
    timeout_seconds: float,
    max_entries: int,
    on_error: ErrorCallback | None = None,
) -> StateStore:
    """Build the configured store. ``timeout_seconds`` applies to Redis, ``max_entries`` to memory.

    Raises ``ValueError`` for an unknown backend, a missing, unsupported or malformed Redis URL (the message
    lists the supported formats and never repeats the URL, which may hold a password), or a bad key prefix.
    Creating a Redis store does not connect: call :meth:`StateStore.ping` for readiness.
    """
    if backend == "memory":
        return MemoryStore(max_entries=max_entries, key_prefix=key_prefix, on_error=on_error)
    if backend == "redis":
        if not redis_url:
            raise ValueError("state backend 'redis' needs a redis_url")
        # Imported here so that a memory-only broker does not load redis-py.
        from broker.state.redis import RedisStore

        return RedisStore(
            redis_url, key_prefix=key_prefix, timeout_seconds=timeout_seconds, on_error=on_error
        )
    raise ValueError(f"unknown state backend {backend!r}: use 'memory' or 'redis'")
