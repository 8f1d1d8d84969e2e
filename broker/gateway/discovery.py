"""Which tools a (subject, actor) may see: one decision for ``/v1/tools``, MCP ``tools/list`` and the pipeline's
visibility stage, and the evaluation environment (with the counters its rules read) that decision runs in."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from broker.gateway.guard import grant_id
from broker.gateway.services import Services
from broker.identity.principal import Principal
from broker.policy.engine import Env
from broker.runtime import Runtime

if TYPE_CHECKING:  # the approvals service (aiohttp handlers) imports this module
    pass


async def policy_env(
    services: Services, runtime: Runtime, principal: Principal, names: Sequence[str], now: float
) -> tuple[Env, dict[str, dict[str, Any]]]:
    """One evaluation environment (and the counters in it) for deciding on ``names``: the counters their rules
    read come from the state store once; the Env re-points ``tool`` per name (``Env.bind_tool``)."""
    policies = runtime.policies
    needed = frozenset().union(*(policies.counters_needed(name) for name in names))
    counters = await runtime.counters.fetch(
        services.store, needed, subject=principal.subject, actor_id=principal.actor_id, now=now
    )
    env = policies.build_env(
        subject=principal.claims,
        actor_id=principal.actor_id,
        tool=next(iter(names), ""),
        args=None,
        counters=counters,
        now=int(now),
    )
    return env, counters


async def visible_names(
    services: Services, runtime: Runtime, principal: Principal, names: Sequence[str], env: Env
) -> list[str]:
    """Discovery: the names policy lets this (subject, actor) see, minus revoked grants (a revoked grant hides
    its tool at once, as invocation refuses it) and, for a token with intent (CONTRACT §17), those it lists."""
    seen = []
    intent = principal.intent
    for name in names:
        if intent is not None and not intent.visible(name):
            continue
        env.bind_tool(name)
        if runtime.policies.visible(name, env):
            seen.append(name)
    store = services.store
    revoked = await asyncio.gather(
        *(store.is_revoked({"grant": grant_id(principal.subject, principal.actor_id, n)}) for n in seen)
    )
    return [name for name, hit in zip(seen, revoked, strict=True) if hit is None]


async def discover(
    services: Services, runtime: Runtime, principal: Principal, names: Sequence[str], now: float
) -> tuple[Env, list[str]]:
    """The names of ``names`` this (subject, actor) may see (``/v1/tools`` and MCP ``tools/list`` alike), under
    ``runtime``: the caller's, read once, so that a reload landing while it awaits never mixes two policy sets in
    one answer (the Env is built for ``runtime.policies``; the caller's grant constraints use the same set)."""
    if not names:
        env, _ = await policy_env(services, runtime, principal, [], now)
        return env, []
    env, _ = await policy_env(services, runtime, principal, names, now)
    return env, await visible_names(services, runtime, principal, names, env)
