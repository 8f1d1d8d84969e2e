"""TLS towards upstreams (tools and MCP servers): which files, and the client context built from them."""

from __future__ import annotations

import ssl

from broker.config.models import Config, Upstream


def upstream_tls_files(upstream: Upstream, config: Config) -> tuple[str, str, str]:
    """(CA, certificate, key) towards an upstream: its own, else the server's trust bundle and certificate."""
    tls = upstream.tls
    return (
        str(tls.ca or config.server.tls.client_ca),
        str(tls.cert or config.server.tls.cert),
        str(tls.key or config.server.tls.key),
    )


def upstream_ssl_context(*, ca: str, cert: str, key: str) -> ssl.SSLContext:
    """Client-side TLS towards a backend: verify it against ``ca``, present the broker's own certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # as the listener (HOSTILE M17): a backend cannot renegotiate either
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    ctx.load_cert_chain(cert, key)
    return ctx
