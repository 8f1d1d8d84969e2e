"""Typed application state (``web.AppKey``): the long-lived resources and the swappable runtime."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from broker.audit.sink import AuditLog
from broker.gateway.forward import Forwarder
from broker.identity.jwks import KeyEntry
from broker.jose import Signer
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
SIGNER = web.AppKey("signer", Signer)
SESSION = web.AppKey("upstream_session", aiohttp.ClientSession)
FORWARDER = web.AppKey("forwarder", Forwarder)
STATE = web.AppKey("state_store", StateStore)
#: the broker's public keys (current and previous) by kid: verifies txn tokens agents present
TXN_KEYS: web.AppKey[Mapping[str, KeyEntry]] = web.AppKey("txn_keys")
#: set when SIGTERM starts a graceful shutdown: /readyz turns 503 so load balancers drain us first
DRAINING = web.AppKey("draining", dict)
