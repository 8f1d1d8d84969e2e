"""Typed application state (``web.AppKey``): the long-lived resources and the swappable runtime."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from broker.audit.sink import AuditLog
from broker.gateway.forward import Forwarder
from broker.keys import KeyRing
from broker.observability import Metrics
from broker.runtime import Runtime
from broker.state.base import StateStore


@dataclass
class RuntimeHolder:
    """The config in force. Requests read ``current`` once at their start; a reload replaces it whole."""

    current: Runtime
    previous: Runtime | None = None

    def swap(self, new: Runtime) -> None:
        self.previous, self.current = self.current, new


RUNTIME = web.AppKey("runtime", RuntimeHolder)
METRICS = web.AppKey("metrics", Metrics)
AUDIT = web.AppKey("audit", AuditLog)
#: the broker's signing keys (current + still-published retired ones); signs like a Signer
SIGNER = web.AppKey("signer", KeyRing)
SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
FORWARDER = web.AppKey("forwarder", Forwarder)
STATE = web.AppKey("state_store", StateStore)


@dataclass
class Drain:
    """Graceful shutdown state: while ``draining``, new requests are refused (503 ``shutting_down``, Connection:
    close) and ``stop`` waits until ``in_flight`` reaches zero before the resources under them close."""

    draining: bool = False
    in_flight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


#: SIGTERM starts draining: /readyz turns 503 so load balancers drain us first
DRAINING = web.AppKey("draining", Drain)
