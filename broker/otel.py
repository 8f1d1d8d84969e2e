"""OpenTelemetry tracing over OTLP/HTTP (CONTRACT §16), imported by ``build_app`` only when
``observability.tracing`` is configured: without it nothing here, and nothing of OpenTelemetry, is loaded.

One server span per request (:meth:`OtelTracer.middleware`, outside the broker middleware, so it covers the
whole request: refusals, audit and the access line included) continuing the caller's ``traceparent``; the
stages open child spans through the :class:`broker.tracing.Tracer` seam. The request record's ``traceparent``
— the audit record's and the access line's ``trace_id`` — is the server span's, so an audit record finds its
trace. Sampling is ``ParentBased(TraceIdRatioBased(sample_ratio))`` (``parent_sampling: false``: the ratio alone,
whatever the caller's flag): a caller's sampled flag is honoured, a
new trace is kept with probability ``sample_ratio``; an unsampled span still has its ids (trace ids in audit
and logs never depend on sampling). Spans leave in batches from the SDK's worker thread
(``BatchSpanProcessor``): a slow or unreachable collector never delays a request — spans beyond its queue are
dropped — and shutdown flushes what is queued (bounded by the export timeout).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Final

from aiohttp import web
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from broker.config.models import Tracing
from broker.context import CTX, TRACEPARENT
from broker.resources import RUNTIME
from broker.tracing import Span, format_traceparent, parse_traceparent, server_attributes, server_span_name

#: seconds one export may take, retries included (the SDK's default is 10); also bounds the flush at shutdown
EXPORT_TIMEOUT: Final = 5.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def traces_url(endpoint: str) -> str:
    """The collector's base URL (``http://collector:4318``) gets the OTLP/HTTP traces path; a URL that has a path
    is used as it is."""
    rest = endpoint.partition("://")[2]
    return endpoint.rstrip("/") + "/v1/traces" if "/" not in rest.rstrip("/") else endpoint


class OtelTracer:
    """The :class:`broker.tracing.Tracer` on the OpenTelemetry SDK: its own provider (never the process-global
    one, so several apps in one process — the tests — keep their spans apart)."""

    def __init__(self, settings: Tracing) -> None:
        self._provider = TracerProvider(
            sampler=(
                ParentBased(TraceIdRatioBased(settings.sample_ratio))
                if settings.parent_sampling
                else TraceIdRatioBased(settings.sample_ratio)
            ),
            resource=Resource.create({SERVICE_NAME: settings.service_name}),
            shutdown_on_exit=False,  # the app's cleanup shuts it down (flushing) before the loop closes
        )
        exporter = OTLPSpanExporter(endpoint=traces_url(settings.otlp_endpoint), timeout=EXPORT_TIMEOUT)
        self._provider.add_span_processor(
            BatchSpanProcessor(exporter, export_timeout_millis=EXPORT_TIMEOUT * 1000)
        )
        self._tracer = self._provider.get_tracer("broker")
        #: the configured tool names of the config in force, recomputed when a reload swaps the runtime
        self._tools: tuple[object, frozenset[str]] = (None, frozenset())

    def server_span(self, traceparent: str | None) -> AbstractContextManager[Span]:
        parent = parse_traceparent(traceparent)
        context = Context()  # never whatever the connection's task inherited: a root or the caller's span
        if parent is not None:
            trace_id, span_id, flags = parent
            remote = trace.SpanContext(trace_id, span_id, is_remote=True, trace_flags=trace.TraceFlags(flags))
            context = trace.set_span_in_context(trace.NonRecordingSpan(remote), context)
        return self._tracer.start_as_current_span(
            "request",
            context=context,
            kind=trace.SpanKind.SERVER,
            # an exception's message is free text: it never becomes a span event or status description
            record_exception=False,
            set_status_on_exception=False,
        )

    def span(self, name: str) -> AbstractContextManager[Span]:
        return self._tracer.start_as_current_span(name, record_exception=False, set_status_on_exception=False)

    def traceparent(self) -> str | None:
        context = trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return format_traceparent(context.trace_id, context.span_id, int(context.trace_flags))

    def shutdown(self) -> None:
        """Flush the queued spans (bounded by EXPORT_TIMEOUT) and stop the export thread."""
        self._provider.shutdown()

    def configured_tools(self, app: web.Application) -> frozenset[str]:
        runtime = app[RUNTIME].current
        seen, names = self._tools
        if seen is not runtime:
            config = runtime.config
            names = frozenset(
                [t.name for t in config.tools] + [t.name for s in config.mcp_servers for t in s.tools]
            )
            self._tools = (runtime, names)
        return names

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The server span around the broker middleware; its attributes are read from the request record when
        the request is answered (the broker middleware never raises: it renders every refusal itself)."""
        with self.server_span(request.headers.get("traceparent")) as span:
            request[TRACEPARENT] = self.traceparent() or ""
            response: web.StreamResponse | None = None
            try:
                response = await handler(request)
                return response
            finally:
                ctx = request.get(CTX)
                attributes = server_attributes(
                    method=request.method,
                    route=ctx.route if ctx is not None else "other",
                    tool=ctx.tool if ctx is not None else None,
                    configured_tools=self.configured_tools(request.app),
                    decision=ctx.decision if ctx is not None else None,
                    code=ctx.code if ctx is not None else "shutting_down",
                    status=ctx.status if ctx is not None and ctx.status else _status(response),
                    mcp_method=ctx.mcp_method if ctx is not None else None,
                )
                _finish(span, server_span_name(request.method, str(attributes["broker.route"])), attributes)

    async def lifetime(self, app: web.Application) -> AsyncIterator[None]:
        """``cleanup_ctx``, first in: shut down last, after every request (and its spans) ended."""
        yield
        await asyncio.to_thread(self.shutdown)  # the flush is a blocking HTTP export


def _status(response: web.StreamResponse | None) -> int | None:
    return response.status if response is not None else None


def _finish(span: Span, name: str, attributes: dict[str, str | int]) -> None:
    for key, value in attributes.items():
        span.set_attribute(key, value)
    if isinstance(span, trace.Span):
        span.update_name(name)
        status = attributes.get("http.response.status_code")
        if isinstance(status, int) and status >= 500:  # OpenTelemetry HTTP conventions: 5xx is a server error
            span.set_status(trace.StatusCode.ERROR)
