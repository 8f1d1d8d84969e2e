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
import time
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiohttp import web

from broker.config.loader import ConfigError, ConfigProblem, load_config
from broker.config.models import Config
from broker.errors import AuditUnavailable, StateUnavailable
from broker.gateway.approvals import APPROVALS
from broker.resources import AUDIT, METRICS, RUNTIME, SESSION, STATE
from broker.runtime import Runtime, build_runtime

log = structlog.get_logger("broker.admin")

#: sections whose change needs a restart (new sockets, files or keys), as (section, attribute) paths
RESTART_ONLY = (
    ("server", "listen"),
    ("server", "admin_listen"),
    ("server", "tls"),
    ("server", "admin_token_file"),
    ("state",),
    ("audit",),
    ("signing",),
)
REVOCATION_KINDS = ("txn", "jti", "sub", "act", "grant")
DEFAULT_REVOCATION_TTL = 86_400


@dataclass
class ReloadState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    loaded_at: float = field(default_factory=time.time)
    previous_loaded_at: float | None = None


RELOAD = web.AppKey("reload_state", ReloadState)


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


def _audit(app: web.Application, record: dict[str, Any]) -> None:
    try:
        app[AUDIT].append(record)
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
            loaded = load_config(current.loaded.path)
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
            _audit(
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
        log.info("config reloaded", source=source, policy_version=runtime.policy_version)
        _audit(app, config_load_record(runtime, decision="allow", reason="", source=source))
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
        log.info("config rolled back", policy_version=runtime.policy_version)
        _audit(app, config_load_record(runtime, decision="allow", reason="rollback", source="admin"))
        return True, runtime.policy_version


def _admin_main(request: web.Request) -> web.Application:
    from broker.app import MAIN

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
    """``{"kind": txn|jti|sub|act|grant, "value": "...", "ttl_seconds": 86400}`` → revoked on every replica."""
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
    _audit(main, record)
    log.info("revoked", kind=kind, ttl_seconds=ttl)
    return web.json_response({"revoked": {"kind": kind, "value": value, "ttl_seconds": ttl}})


def _bad(description: str) -> web.Response:
    return web.json_response({"error": "invalid_request", "error_description": description}, status=400)


def admin_token_middleware(token: bytes) -> Any:
    """``/admin/*`` needs ``Authorization: Bearer <token>`` (constant-time compare); probes and metrics do not."""

    @web.middleware
    async def check(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith("/admin/"):
            scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(presented.encode(), token):
                return web.json_response(
                    {
                        "error": "invalid_token",
                        "error_description": "admin endpoints need the admin bearer token",
                    },
                    status=401,
                    headers={"WWW-Authenticate": 'Bearer realm="broker-admin"'},
                )
        response: web.StreamResponse = await handler(request)
        return response

    return check


def add_admin_routes(admin: web.Application) -> None:
    admin.router.add_post("/admin/reload", reload_endpoint)
    admin.router.add_post("/admin/rollback", rollback_endpoint)
    admin.router.add_get("/admin/config", config_endpoint)
    admin.router.add_post("/admin/revocations", revocations_endpoint)
