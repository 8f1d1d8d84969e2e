"""Responses of the approvals page: HTML with the headers every page carries, and the page's refusals.

The page decides nothing itself, so its refusals are the broker's: a :class:`~broker.errors.BrokerError` is
recorded like on every route (:func:`broker.gateway.middleware.record_refusal`: decision, reason, audit on the
approval route) and then rendered as HTML instead of JSON. A refusal before anyone signed in (no session, a
login that cannot be completed) is ``anonymous``: counted in a ``summary`` record per reason and client network
(CONTRACT §15, bounded noise), not one audit record per request.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web

from broker.context import CTX
from broker.errors import BrokerError
from broker.gateway.middleware import record_refusal
from broker.web.views import render_message

__all__ = ["SECURITY_HEADERS", "html_response", "refuse"]

#: no script, no frame, no form to elsewhere, nothing remote; the stylesheet is ours (CONTRACT §14)
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; "
    "base-uri 'none'"
)
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    # the page is only served over TLS (server.public_url is https): browsers must never try it in clear
    "Strict-Transport-Security": "max-age=31536000",
}


def html_response(body: str, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    response = web.Response(text=body, status=status, content_type="text/html", charset="utf-8")
    response.headers.update(SECURITY_HEADERS)
    for name, value in (headers or {}).items():
        response.headers.add(name, value)
    return response


async def refuse(
    request: web.Request,
    error: BrokerError,
    *,
    title: str,
    text: str,
    link: tuple[str, str] | None = ("/approvals/", "Back to approvals"),
    headers: dict[str, str] | None = None,
    anonymous: bool = False,
) -> web.Response:
    """Record ``error`` as this request's refusal and answer an HTML page saying ``text`` (never its reason).
    ``anonymous``: nobody is signed in — counted as noise, not audited one by one (module docstring)."""
    ctx = request[CTX]
    ctx.status = error.status
    written = await record_refusal(
        request.app, ctx, error, anonymous=anonymous, client_address=request.remote if anonymous else None
    )
    if written is not error:  # the refusal could not be audited: that, not the refusal, is the answer
        return html_response(
            render_message("Try again later", ["The broker cannot record decisions right now."]),
            status=written.status,
        )
    return html_response(render_message(title, [text], link=link), status=error.status, headers=headers)
