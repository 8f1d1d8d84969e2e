"""Operators' controls: hot reload, rollback, the loaded config, revocations (CONTRACT §2, §9).

Reload compiles the new config completely (schemas, TLS contexts, policies, filters, issuer keys) before it
replaces the old one, so a bad file leaves the old config serving and says why — in the log, in
``broker_config_reloads_total{result}``, in the HTTP answer and in the audit log. Requests in flight keep the
runtime they started with; the swap is one reference assignment. Settings that need new sockets or files
(listeners, server TLS, state store, audit file, signing key) are refused on reload: restart for those.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from broker.config.check import check_config
from broker.config.loader import ConfigError, ConfigProblem
from broker.config.models import Config
from broker.errors import (
    AccessDenied,
    AuditUnavailable,
    BrokerError,
    InvalidToken,
    MethodNotAllowed,
    NotFound,
    StateUnavailable,
    UnsupportedMediaType,
)
from broker.observability import new_request_id
from broker.resources import APPROVALS, AUDIT, MAIN, METRICS, RELOAD, RUNTIME, SESSION, STATE
from broker.runtime import Runtime, build_runtime

log = structlog.get_logger("broker.admin")

#: sections whose change needs a restart (new sockets, files or keys), as (section, attribute) paths
RESTART_ONLY = (
    ("server", "listen"),
    ("server", "admin_listen"),
    ("server", "tls"),
    ("server", "admin_token_file"),
    # the HTTP parser's line limit is set when the listener starts
    ("server", "limits", "max_header_line_bytes"),
    ("server", "limits", "max_header_bytes"),
    ("state",),
    ("audit",),
    ("signing",),
    ("observability",),  # the tracer and its export thread are built at start
)
REVOCATION_KINDS = ("txn", "jti", "sub", "act", "grant", "policy_version")
_POLICY_VERSION = re.compile(r"[0-9a-f]{12}")
DEFAULT_REVOCATION_TTL = 86_400


@dataclass
class ReloadState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loaded_at: float = field(default_factory=time.time)
    previous_loaded_at: float | None = None


def _get(config: Config, path: tuple[str, ...]) -> Any:
    value: Any = config
    for name in path:
        value = getattr(value, name)
    return value


def restart_needed(old: Config, new: Config) -> list[str]:
    return [".".join(path) for path in RESTART_ONLY if _get(old, path) != _get(new, path)]


def config_load_record(runtime: Runtime, *, decision: str, reason: str, source: str) -> dict[str, Any]:
    return {
        "event": "config_load",
        "decision": decision,
        "reason": reason,
        "request_id": None,
        "subject": None,
        "actor": None,
        "tool": None,
        "args_digest": None,
        "txn": None,
        "policy_version": runtime.policy_version,
        "status": None,
        "config_file": str(runtime.loaded.path),
        "source": source,
    }


async def _audit(app: web.Application, record: dict[str, Any]) -> None:
    try:
        await app[AUDIT].commit(record)
        app[METRICS].audit_records.inc()
    except AuditUnavailable:
        app[METRICS].audit_errors.inc()
        log.error("config change could not be audited", source=record.get("source"))


async def reload_config(app: web.Application, *, source: str) -> tuple[bool, list[str], str]:
    """Load, compile and swap in the config file again. Returns (ok, problems, policy_version in force)."""
    holder, metrics, state = app[RUNTIME], app[METRICS], app[RELOAD]
    async with state.lock:
        current = holder.current
        try:
            # the whole of `broker check` (every file the config names, every policy, FILE:LINE each), so that a
            # refused reload says exactly what `broker check -c FILE` says of the same file
            checked = check_config(current.loaded.path)
            if checked.loaded is None:
                raise ConfigError(checked.problems)
            loaded = checked.loaded
            changed = restart_needed(current.config, loaded.config)
            if changed:
                raise ConfigError(
                    [
                        ConfigProblem(
                            str(loaded.path),
                            loaded.line_of((p.split(".")[0],)),
                            f"{p} changed: restart "
                            "the broker to apply it (a reload cannot move listeners, stores or keys)",
                        )
                        for p in changed
                    ]
                )
            runtime = build_runtime(loaded)
            await runtime.authenticator.start(now=time.time(), session=app[SESSION])
        except ConfigError as exc:
            problems = [str(p) for p in exc.problems]
            metrics.config_reloads.labels(result="failure").inc()
            log.error(
                "config reload refused; the loaded config stays in force", source=source, problems=problems
            )
            await _audit(
                app,
                config_load_record(
                    current, decision="error", reason="; ".join(problems)[:500], source=source
                ),
            )
            return False, problems, current.policy_version
        holder.swap(runtime)
        app[APPROVALS].reconfigure(runtime.config.approvals)
        state.previous_loaded_at, state.loaded_at = state.loaded_at, time.time()
        metrics.config_reloads.labels(result="success").inc()
        metrics.set_policy_version(runtime.policy_version)
        metrics.bind_mcp_servers(server.name for server in runtime.config.mcp_servers)
        log.info("config reloaded", source=source, policy_version=runtime.policy_version)
        await _audit(app, config_load_record(runtime, decision="allow", reason="", source=source))
        return True, [], runtime.policy_version


async def rollback_config(app: web.Application) -> tuple[bool, str]:
    holder, state = app[RUNTIME], app[RELOAD]
    async with state.lock:
        if holder.previous is None:
            return False, holder.current.policy_version
        holder.swap(holder.previous)
        app[APPROVALS].reconfigure(holder.current.config.approvals)
        state.previous_loaded_at, state.loaded_at = state.loaded_at, time.time()
        runtime = holder.current
        app[METRICS].config_reloads.labels(result="rollback").inc()
        app[METRICS].set_policy_version(runtime.policy_version)
        app[METRICS].bind_mcp_servers(server.name for server in runtime.config.mcp_servers)
        log.info("config rolled back", policy_version=runtime.policy_version)
        await _audit(app, config_load_record(runtime, decision="allow", reason="rollback", source="admin"))
        return True, runtime.policy_version


def _admin_main(request: web.Request) -> web.Application:

    return request.app[MAIN]


async def reload_endpoint(request: web.Request) -> web.StreamResponse:
    ok, problems, version = await reload_config(_admin_main(request), source="admin")
    body = {"result": "success" if ok else "failure", "policy_version": version, "problems": problems}
    return web.json_response(body, status=200 if ok else 422)


async def rollback_endpoint(request: web.Request) -> web.StreamResponse:
    ok, version = await rollback_config(_admin_main(request))
    if not ok:
        return web.json_response({"error": "no_previous_config", "policy_version": version}, status=409)
    return web.json_response({"result": "rolled_back", "policy_version": version})


async def config_endpoint(request: web.Request) -> web.StreamResponse:
    main = _admin_main(request)
    holder, state = main[RUNTIME], main[RELOAD]
    config = holder.current.config
    return web.json_response(
        {
            "policy_version": holder.current.policy_version,
            "config_file": str(holder.current.loaded.path),
            "loaded_at": state.loaded_at,
            "previous_policy_version": holder.previous.policy_version if holder.previous else None,
            "tools": [t.name for t in config.tools],
            "mcp_servers": [m.name for m in config.mcp_servers],
            "policies": [{"id": p.id, "effect": p.effect, "tools": p.tools} for p in config.policies],
            "shadow_policies": [p.id for p in config.shadow_policies] if config.shadow_policies else None,
        }
    )


async def revocations_endpoint(request: web.Request) -> web.StreamResponse:
    """``{"kind": txn|jti|sub|act|grant|policy_version, "value": "...", "ttl_seconds": 86400}`` → revoked on
    every replica."""
    main = _admin_main(request)
    try:
        body = await request.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return _bad("send a JSON object {kind, value, ttl_seconds}")
    kind, value, ttl = body.get("kind"), body.get("value"), body.get("ttl_seconds", DEFAULT_REVOCATION_TTL)
    if kind not in REVOCATION_KINDS:
        return _bad(f"kind must be one of {', '.join(REVOCATION_KINDS)}")
    if not isinstance(value, str) or not value or len(value) > 4096:
        return _bad("value must be a non-empty string")
    if kind == "policy_version" and not _POLICY_VERSION.fullmatch(value):
        return _bad("a policy_version is 12 lowercase hex digits (GET /admin/config shows the one in force)")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= 366 * 86400:
        return _bad("ttl_seconds must be a number of seconds up to 366 days")
    try:
        await main[STATE].revoke(kind, value, float(ttl))
    except StateUnavailable as exc:
        return web.json_response({"error": exc.code, "error_description": exc.description}, status=exc.status)
    record = config_load_record(
        main[RUNTIME].current, decision="allow", reason=f"revoked {kind}", source="admin"
    )
    record.update(event="revocation", revoked_kind=kind, revoked_value=value, ttl_seconds=ttl)
    record.pop("config_file")
    await _audit(main, record)
    log.info("revoked", kind=kind, ttl_seconds=ttl)
    return web.json_response({"revoked": {"kind": kind, "value": value, "ttl_seconds": ttl}})


def _bad(description: str) -> web.Response:
    return web.json_response({"error": "invalid_request", "error_description": description}, status=400)


class MisdirectedRequest(BrokerError):
    """RFC 9110 §15.5.20: the ``Host`` is not a name of this listener (DNS rebinding, HOSTILE P12)."""

    status = 421
    code = "misdirected_request"


#: the only admin endpoints open without the admin token (probes; CONTRACT §12)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # a dual-stack socket's ::ffff:a.b.c.d
    return address


def host_of(value: str) -> str | None:
    """The host of a ``Host`` header value (``name``, ``name:port``, ``[v6]``, ``[v6]:port``), lowercased; None
    when it is not one of those forms."""
    if value.startswith("["):
        host, closed, rest = value[1:].partition("]")
        if not closed:
            return None
    else:
        host, colon, port = value.partition(":")
        rest = f":{port}" if colon else ""
    if rest and not (rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit()):
        return None
    return host.lower() if host else None


def is_own_host(value: str, configured: str, local_address: str | None) -> bool:
    """Whether a ``Host`` value names this listener: ``localhost``, a loopback address, the configured host of
    ``server.admin_listen``, or the address the connection arrived at (the pod IP the kubelet and Prometheus use
    on a wildcard bind), each with or without a port. A DNS-rebinding page's ``Host`` is the attacker's name."""
    host = host_of(value)
    if host is None:
        return False
    configured = configured.lower().strip("[]")
    configured_ip = _ip(configured)
    wildcard = configured_ip is not None and configured_ip.is_unspecified  # 0.0.0.0 / :: bind, not a name
    if host == "localhost" or (host == configured and not wildcard):
        return True
    address = _ip(host)
    if address is None:
        return False
    if address.is_loopback:
        return True
    local = _ip(local_address) if local_address else None
    return local is not None and address == local


def _refusal(error: BrokerError, headers: dict[str, str] | None = None) -> web.Response:
    request_id = new_request_id()
    log.info("admin request refused", code=error.code, reason=error.reason, request_id=request_id)
    return web.json_response(
        error.body(request_id),
        status=error.status,
        headers={"X-Request-Id": request_id, "Cache-Control": "no-store", **(headers or {})},
    )


def _admin_check(request: web.Request, configured_host: str, token: bytes | None) -> None:
    """CONTRACT §12 "The admin listener cannot be driven by a browser"; raises the BrokerError to answer."""
    hosts = request.headers.getall("Host", [])
    sockname = request.transport.get_extra_info("sockname") if request.transport is not None else None
    local = str(sockname[0]) if sockname else None
    if len(hosts) != 1 or not is_own_host(hosts[0], configured_host, local):
        raise MisdirectedRequest("this listener does not serve that host", reason="admin_host")
    if request.method not in _SAFE_METHODS:
        # a page can make a browser send a "simple" cross-site POST, but never without Origin, never as JSON
        fetch_site = request.headers.get("Sec-Fetch-Site", "").lower()
        if "Origin" in request.headers or fetch_site in ("cross-site", "same-site"):
            raise AccessDenied("admin endpoints do not take browser requests", reason="admin_cross_origin")
        if request.content_type != "application/json":
            raise UnsupportedMediaType(
                "admin POSTs need Content-Type: application/json", reason="admin_content_type"
            )
    if token is not None and request.path not in OPEN_PATHS:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), token):
            raise InvalidToken("admin endpoints need the admin bearer token", reason="admin_token")


def admin_guard(configured_host: str, token: bytes | None) -> Any:
    """The admin listener's one middleware: :func:`_admin_check` first (``Host`` 421, browser requests 403,
    non-JSON POST 415, the ``server.admin_token_file`` bearer token 401 on all but ``/healthz``/``/readyz``),
    then the endpoint; aiohttp's own 404/405 become JSON too."""

    @web.middleware
    async def guard(request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            _admin_check(request, configured_host, token)
            response: web.StreamResponse = await handler(request)
        except InvalidToken as error:
            return _refusal(error, {"WWW-Authenticate": 'Bearer realm="broker-admin"'})
        except BrokerError as error:
            return _refusal(error)
        except web.HTTPException as exc:
            if exc.status == 404:
                return _refusal(NotFound("no such endpoint", reason="no_route"))
            if exc.status == 405:
                return _refusal(MethodNotAllowed("method not allowed here", reason="method_not_allowed"))
            raise
        return response

    return guard


def add_admin_routes(admin: web.Application) -> None:
    admin.router.add_post("/admin/reload", reload_endpoint)
    admin.router.add_post("/admin/rollback", rollback_endpoint)
    admin.router.add_get("/admin/config", config_endpoint)
    admin.router.add_post("/admin/revocations", revocations_endpoint)
