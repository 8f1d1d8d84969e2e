"""The HTTP/1.1 edge of both listeners: aiohttp's protocol, with the HTTP parser's own refusals in JSON.

aiohttp answers what its parser refuses — a bad method, a request or header line over the limit, conflicting or
malformed framing (``Content-Length`` with ``Transfer-Encoding``, a bad chunk size), too many headers — before
any application code runs: ``web_protocol.RequestHandler.handle_error`` writes a ``text/plain`` body that quotes
the offending bytes (which may hold a token) and logs a traceback per request. CONTRACT §8/§12 want every error
as ``{"error","error_description","request_id"}``; :class:`JsonErrorRequestHandler` overrides that one method,
and :class:`JsonErrorRunner` makes the listener use it. The refusal itself is unchanged — aiohttp's 400 (431,
``request_header_fields_too_large``, for an over-long line, like the middleware's total-size check), no request
reaches the app (nothing decided, forwarded or audited: CONTRACT §15 lets pre-identity noise go unrecorded; it is
counted), and the connection is closed.

Every answer of both listeners, these included, says ``Server: broker``: aiohttp's default names the Python and
aiohttp versions (RFC 9110 §10.2.4: a detailed ``Server`` value helps attackers find known holes), and aiohttp
adds its own whenever a response has none, so the runner sets ours on each response as it is prepared.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any, Final

import structlog
from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_request import BaseRequest

from broker.errors import BrokerError, HeadersTooLarge, InvalidRequest
from broker.observability import new_request_id

__all__ = ["SERVER_HEADER", "JsonErrorRequestHandler", "JsonErrorRunner", "JsonErrorServer", "parser_error"]

log = structlog.get_logger("broker.listener")

#: the ``Server`` header of every answer, on both listeners: a constant, no software or version
SERVER_HEADER: Final = "broker"

#: called with each refusal the parser made (metrics); set per listener by :class:`JsonErrorRunner`
OnRefusal = Callable[[BrokerError], None]


def _snake(name: str) -> str:
    """``InvalidURLError`` -> ``invalid_url_error`` (a log reason from aiohttp's exception class)."""
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)).lower()


def parser_error(status: int, exc: BaseException | None) -> BrokerError:
    """The BrokerError for what aiohttp's protocol would answer with ``status`` (never quoting the request)."""
    if isinstance(exc, LineTooLong):
        return HeadersTooLarge("request line or header field too large", reason="header_line_too_long")
    if isinstance(exc, HttpProcessingError) or 400 <= status < 500:
        reason = f"http_{_snake(type(exc).__name__)}" if exc is not None else f"http_{status}"
        return InvalidRequest("the request is not valid HTTP/1.1", reason=reason[:64])
    return BrokerError("internal error", reason="internal_error")


class JsonErrorRequestHandler(web.RequestHandler):
    """aiohttp's connection protocol, except that its own error answers are CONTRACT §8 JSON."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # as aiohttp: once bytes of a response went out, the connection is broken and there is nothing to send
        if request.writer.output_size > 0:
            raise ConnectionError("a response was sent already; the connection is closed")
        error = parser_error(status, exc)
        request_id = new_request_id()
        if error.status >= 500:
            log.error("unhandled error", request_id=request_id, exc_info=exc)
        else:
            log.info(
                "refused", code=error.code, reason=error.reason, status=error.status, request_id=request_id
            )
        server = self._manager
        if isinstance(server, JsonErrorServer) and server.on_refusal is not None:
            server.on_refusal(error)
        response = web.json_response(
            error.body(request_id),
            status=error.status,
            headers={"X-Request-Id": request_id, "Cache-Control": "no-store", hdrs.SERVER: SERVER_HEADER},
        )
        response.force_close()
        return response


class JsonErrorServer(web.Server):
    """A ``web.Server`` whose connections are :class:`JsonErrorRequestHandler` protocols."""

    on_refusal: OnRefusal | None = None

    def __call__(self) -> web.RequestHandler:
        return JsonErrorRequestHandler(self, loop=self._loop, **self._kwargs)


class JsonErrorRunner(web.AppRunner):
    """``web.AppRunner`` serving its application through a :class:`JsonErrorServer`."""

    def __init__(self, app: web.Application, *, on_refusal: OnRefusal | None = None, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self._on_refusal = on_refusal
        app.on_response_prepare.append(_server_header)

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()  # app start-up, freezing, handler arguments: as aiohttp does them
        server = JsonErrorServer(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **made._kwargs,
        )
        server.on_refusal = self._on_refusal
        return server


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    # on_response_prepare runs before aiohttp fills in its defaults, which keep a Server header already set
    response.headers[hdrs.SERVER] = SERVER_HEADER
