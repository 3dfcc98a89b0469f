"""OpenTelemetry traces: a server span per request, child spans for the provider call and the store scripts.

Imported only when ``telemetry.otlp_endpoint`` is set (see `Gateway`): with
tracing off no OpenTelemetry module is loaded and the request path runs no
tracing code at all. When on, three hooks install it:

- `Tracing.server_span` / `end_request`, used by the outermost aiohttp
  middleware (`proxy.web.tracing`): continues an incoming W3C
  ``traceparent`` (else starts a new trace), the span named after the route;
  on the way out the request's attributes: status, public model, upstream,
  tokens, credits and, only when ``metrics.tenant_labels`` is on (the same
  privacy and cardinality switch), the tenant;
- `Tracing.provider_call`, around each provider attempt of the router: a
  client span whose context goes to the provider as ``traceparent``
  (replacing the caller's, which is this span's ancestor);
- `Tracing.instrument_store`: wraps the store's ``run`` so each Lua script
  is a client span.

Spans are batched to the OTLP/HTTP exporter in the SDK's background thread.
The provider is the gateway's own (not the process-global one), so several
gateways in one process (tests) never share spans.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from proxy.core.settings import Settings

if TYPE_CHECKING:
    from proxy.core.call import Reply
    from proxy.store.store import Store

_TRACE_HEADERS = ("traceparent", "tracestate")


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL: a bare collector address gets the standard ``/v1/traces`` path."""
    return endpoint.rstrip("/") + "/v1/traces" if urlsplit(endpoint).path in ("", "/") else endpoint


class Tracing:
    """The gateway's tracer provider and its three hooks (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        telemetry = settings.telemetry
        assert telemetry.otlp_endpoint, "tracing is off"
        self.provider = TracerProvider(resource=Resource.create({"service.name": telemetry.service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=traces_url(telemetry.otlp_endpoint))))
        self.tracer = self.provider.get_tracer("sovereign")
        self.propagator = TraceContextTextMapPropagator()
        self.tenant_attribute = settings.metrics.tenant_labels

    def add_exporter(self, exporter: SpanExporter) -> None:
        """Also send every span to `exporter`, synchronously (tests use the SDK's in-memory exporter)."""
        self.provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def shutdown(self) -> None:
        # Flushing may wait on the collector: off the event loop.
        await asyncio.to_thread(self.provider.shutdown)

    # -- the edge (installed by proxy.web.tracing) -------------------------------------------
    def server_span(self, headers: Mapping[str, str], name: str) -> Any:
        """The request's server span (a context manager): continues the caller's ``traceparent``, else a new trace."""
        return self.tracer.start_as_current_span(name, context=self.propagator.extract(headers), kind=SpanKind.SERVER)

    @staticmethod
    def trace_id(span: Any) -> str:
        return format(span.get_span_context().trace_id, "032x")

    def end_request(self, span: Any, status: int, request_id: str | None, call: Any, model: str | None) -> None:
        """The request's outcome as attributes of its server span."""
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        if request_id:
            span.set_attribute("sovereign.request_id", request_id)
        if call is not None:
            self._call_attributes(span, call, model)

    def _call_attributes(self, span: Any, call: Any, model: str | None) -> None:
        if model:
            span.set_attribute("gen_ai.request.model", model)
        if self.tenant_attribute:
            span.set_attribute("sovereign.tenant", call.principal.tenant)
        if call.upstream:
            span.set_attribute("sovereign.upstream", call.upstream)
        usage = call.usage or {}
        for key, attribute in (("prompt_tokens", "gen_ai.usage.input_tokens"), ("completion_tokens", "gen_ai.usage.output_tokens")):
            if isinstance(usage.get(key), int):
                span.set_attribute(attribute, usage[key])
        if call.credits is not None:
            span.set_attribute("sovereign.credits", call.credits)

    # -- the provider hop -------------------------------------------------------------
    async def provider_call(
        self,
        post: Callable[[Any, bytes, dict[str, str], bool], Awaitable[Reply]],
        upstream: Any,
        body: bytes,
        headers: dict[str, str],
        stream: bool,
    ) -> Reply:
        """One provider attempt as a client span; the provider gets this span as its ``traceparent``."""
        attributes = {"sovereign.upstream": upstream.name, "server.address": upstream.settings.url}
        with self.tracer.start_as_current_span(f"chat {upstream.name}", kind=SpanKind.CLIENT, attributes=attributes) as span:
            headers = {k: v for k, v in headers.items() if k.lower() not in _TRACE_HEADERS}
            self.propagator.inject(headers)
            reply = await post(upstream, body, headers, stream)
            span.set_attribute("http.response.status_code", reply.status)
            return reply

    # -- the store --------------------------------------------------------------------
    def instrument_store(self, store: Store) -> None:
        """Each `Store.run` (one Lua script) becomes a client span."""
        run = store.run
        tracer = self.tracer

        async def traced_run(script: Any, keys: list[str], args: list[Any], deferred: bool = False) -> Any:
            attributes = {"db.system": "redis", "db.operation.name": "EVALSHA", "sovereign.script": script.name}
            with tracer.start_as_current_span(f"store {script.name}", kind=SpanKind.CLIENT, attributes=attributes):
                return await run(script, keys, args, deferred)

        store.run = traced_run  # type: ignore[method-assign]


__all__ = ["Tracing", "traces_url"]
