"""The transport's identity: the agent's X.509-SVID on this TLS connection → its SPIFFE ID (the actor).

Read per request from the connection itself (HOSTILE M17: never from a header such as X-Forwarded-Client-Cert,
which is never trusted and never forwarded). The TLS layer already verified the chain and validity against the
trust bundle; ``actor_from_certificate`` adds the SVID rules and caches what does not depend on the clock.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web

from broker.errors import InvalidClient
from broker.identity.spiffe import SpiffeId, actor_from_certificate


@dataclass(frozen=True, slots=True)
class RequestView:
    """What identity reads of a request, and nothing else: the method and raw target (for ``htm``/``htu``), the
    ``Authorization`` and ``DPoP`` header values, whether the query carries a token, and the certificate this
    connection presented. A value: identity is decided (and tested) without sockets."""

    method: str
    raw_path: str
    authorization: Sequence[str]
    dpop: Sequence[str]
    token_in_query: bool
    peer_der: bytes | None

    @classmethod
    def of(cls, request: web.Request) -> RequestView:
        return cls(
            method=request.method,
            raw_path=request.raw_path,
            authorization=tuple(request.headers.getall("Authorization", [])),
            dpop=tuple(request.headers.getall("DPoP", [])),
            token_in_query="access_token" in request.query,
            peer_der=peer_certificate(request),
        )


def peer_certificate(request: web.Request) -> bytes | None:
    """DER of the client certificate presented on this connection, if any."""
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    return ssl_object.getpeercert(binary_form=True)


def peer_actor(der: bytes | None, trust_domain: str) -> SpiffeId:
    """The actor of the certificate this connection presented (``peer_certificate``), or InvalidClient."""
    if der is None:
        raise InvalidClient("a client certificate (X.509-SVID) is required", reason="svid_missing")
    return actor_from_certificate(der, trust_domain=trust_domain, now=datetime.now(UTC))
