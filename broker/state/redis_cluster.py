"""Where the Redis state store connects: one server, a Sentinel-managed master, or a Redis Cluster.

``state.redis_url`` formats (``[...]`` optional; user and password are percent-decoded)::

    redis://[[user]:password@]host[:port][/db][?option=value...]          one server (redis-py's URL)
    rediss://...                                                           the same over TLS
    redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db][?option=value...]
    rediss+sentinel://...                                                  TLS to the Sentinels and the master
    redis+cluster://[[user]:password@]host[:port][,host[:port]...][?option=value...]
    rediss+cluster://...                                                   TLS to every node

- ``redis://``/``rediss://`` go to redis-py's ``from_url`` unchanged, with all its query options (e.g.
  ``?ssl_ca_certs=/path/ca.pem``).
- Sentinel: the hosts are Sentinels (default port 26379); the store talks to the master of ``service_name``
  (redis-py ``Sentinel.master_for``), asks the Sentinels again after a connection error, and follows a
  failover without a restart. The password is the master's; the Sentinels' own is the option
  ``sentinel_password`` (and ``sentinel_username``).
- Cluster: the hosts are startup nodes (default port 6379; one is enough, list several so that startup
  survives one being down); the topology is discovered with ``CLUSTER SLOTS`` and followed on ``MOVED``.
  A cluster has only database 0.
- Options of ``+sentinel``/``+cluster`` URLs: ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` (``rediss+``
  schemes only), ``sentinel_username``, ``sentinel_password`` (Sentinel only). Anything else is refused.

Parsing is pure (:func:`parse_redis_url`, no redis-py import) so that a config check can call it; no error
message repeats the URL, which may hold a password. :func:`open_client` builds the client without connecting.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import parse_qs, unquote, urlsplit

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.asyncio.cluster import RedisCluster

Topology = Literal["single", "sentinel", "cluster"]

URL_FORMATS: Final = (
    "redis://[[user]:password@]host[:port][/db], rediss://... (TLS), "
    "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db], "
    "redis+cluster://[[user]:password@]host[:port][,host[:port]...] "
    "(rediss+sentinel:// and rediss+cluster:// for TLS)"
)
_SCHEMES: Final[dict[str, tuple[Topology, bool]]] = {
    "redis": ("single", False),
    "rediss": ("single", True),
    "redis+sentinel": ("sentinel", False),
    "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False),
    "rediss+cluster": ("cluster", True),
}
_DEFAULT_PORT: Final[dict[Topology, int]] = {"single": 6379, "sentinel": 26379, "cluster": 6379}
_TLS_OPTIONS: Final = frozenset({"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"})
_SENTINEL_OPTIONS: Final = frozenset({"sentinel_username", "sentinel_password"})
_SERVICE_NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_NODES: Final = 64


@dataclass(frozen=True)
class RedisTarget:
    """A parsed ``state.redis_url``. For ``single`` only ``url`` matters (redis-py parses it)."""

    topology: Topology
    url: str = field(repr=False)  # may hold a password
    tls: bool = False
    nodes: tuple[tuple[str, int], ...] = ()
    service_name: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    options: dict[str, str] = field(default_factory=dict, repr=False)


def _bad(what: str) -> ValueError:
    return ValueError(f"Redis URL: {what}; formats: {URL_FORMATS}")


def _nodes(hosts: str, default_port: int) -> tuple[tuple[str, int], ...]:
    parts = hosts.split(",")
    if not 1 <= len(parts) <= MAX_NODES:
        raise _bad(f"list 1 to {MAX_NODES} host:port pairs")
    nodes = []
    for part in parts:
        # "//" makes urlsplit read the part as a network location: it handles "[::1]:6379" and bad ports
        try:
            location = urlsplit("//" + part)
            host, port = location.hostname, location.port
        except ValueError:
            raise _bad("a host:port has an invalid port") from None
        if not host or location.username is not None or location.path:
            raise _bad("every comma-separated entry must be host[:port]")
        nodes.append((host, port if port is not None else default_port))
    return tuple(nodes)


def _options(query: str, topology: Topology, tls: bool) -> dict[str, str]:
    try:
        parsed = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _bad("malformed query string") from None
    allowed = (_TLS_OPTIONS if tls else frozenset()) | (
        _SENTINEL_OPTIONS if topology == "sentinel" else frozenset()
    )
    options = {}
    for name, values in parsed.items():
        if name not in allowed:
            raise _bad(
                f"option {name!r} is not supported here (allowed: {', '.join(sorted(allowed)) or 'none'})"
            )
        if len(values) != 1 or not values[0]:
            raise _bad(f"option {name!r} needs exactly one non-empty value")
        options[name] = values[0]
    return options


def parse_redis_url(url: str) -> RedisTarget:
    """Parse ``state.redis_url`` (formats in the module docstring); ``ValueError`` names what is wrong."""
    if not isinstance(url, str):
        raise _bad("must be a string")
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise _bad("unsupported scheme")
    topology, tls = _SCHEMES[scheme.lower()]
    if topology == "single":
        return RedisTarget("single", url, tls=tls)
    parts = urlsplit(url)
    if parts.fragment:
        raise _bad("no #fragment allowed")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon and secret else None
    nodes = _nodes(hosts, _DEFAULT_PORT[topology])
    segments = [unquote(s) for s in parts.path.split("/")[1:]] if parts.path not in ("", "/") else []
    service_name, db = None, 0
    if topology == "sentinel":
        if not 1 <= len(segments) <= 2 or not _SERVICE_NAME.fullmatch(segments[0]):
            raise _bad("a Sentinel URL needs /service_name[/db] (service name: letters, digits, . _ -)")
        service_name = segments[0]
        if len(segments) == 2:
            if not segments[1].isdigit():
                raise _bad("db must be a non-negative integer")
            db = int(segments[1])
    elif segments not in ([], ["0"]):
        raise _bad("a Cluster URL has no path (a cluster has database 0 only)")
    options = _options(parts.query, topology, tls)
    return RedisTarget(topology, url, tls, nodes, service_name, db, username, password, options)


@dataclass(frozen=True)
class RedisClient:
    """An unconnected redis-py asyncio client, the coroutine that releases everything it opened, and the one
    to await before each operation (None: nothing to do)."""

    client: Redis | RedisCluster
    close: Callable[[], Awaitable[None]]
    prepare: Callable[[], Awaitable[object]] | None = None


def open_client(target: RedisTarget, *, timeout_seconds: float, max_connections: int) -> RedisClient:
    """Build the client for ``target``. Every socket operation is bounded by ``timeout_seconds``; the caller
    bounds whole operations (retries included) on top. Connection errors are retried once, immediately
    (a pooled connection left over from before an outage or a failover fails on first use).

    ``max_connections`` caps each pool: for a single server a blocking pool waits for a free connection (up to
    ``timeout_seconds``); Sentinel and Cluster pools refuse instead of waiting, so the store bounds its own
    concurrency to ``max_connections`` for them (see :class:`broker.state.redis.RedisStore`).
    """
    from redis.asyncio import BlockingConnectionPool, Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    def retry() -> Retry:
        return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))

    timeouts: dict[str, Any] = {"socket_timeout": timeout_seconds, "socket_connect_timeout": timeout_seconds}
    if target.topology == "single":
        pool = BlockingConnectionPool.from_url(
            target.url, max_connections=max_connections, timeout=timeout_seconds, retry=retry(), **timeouts
        )
        single = Redis.from_pool(pool)
        return RedisClient(single, single.aclose)
    tls: dict[str, Any] = {}
    if target.tls:
        tls = {"ssl": True, **{k: v for k, v in target.options.items() if k in _TLS_OPTIONS}}
    auth: dict[str, Any] = {"username": target.username, "password": target.password}
    if target.topology == "cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        cluster = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in target.nodes],
            max_connections=max_connections,
            # the cluster client's own retry loop also refreshes the slot map (a failover moves slots)
            retry=Retry(NoBackoff(), 1),
            **auth,
            **timeouts,
            **tls,
        )
        # redis-py (8.1) chooses a command's routing BEFORE it discovers the topology, so a burst of commands on
        # a client that has not discovered it yet (first use, or after an error reset the slot map) is sent to
        # the wrong nodes and fails. Discovering first (no I/O once done; concurrent callers share one
        # discovery) avoids it: 50 concurrent claims on a fresh client fail without this, never with it.
        return RedisClient(cluster, cluster.aclose, cluster.initialize)
    from redis.asyncio.sentinel import Sentinel

    sentinel_auth: dict[str, Any] = {
        "username": target.options.get("sentinel_username"),
        "password": target.options.get("sentinel_password"),
    }
    sentinels = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
        list(target.nodes), sentinel_kwargs={**timeouts, **tls, **sentinel_auth}, **timeouts, **tls
    )
    assert target.service_name is not None  # parse_redis_url guarantees it for Sentinel URLs
    master: Redis = sentinels.master_for(
        target.service_name, db=target.db, max_connections=max_connections, retry=retry(), **auth
    )

    async def close() -> None:
        try:
            await master.aclose()
        finally:
            await sentinels.aclose()

    return RedisClient(master, close)
