"""The edge hook of tracing: the outermost middleware opens each request's server span.

Installed by `create_app` only when tracing is on (`Gateway.tracing`, from
`proxy.core.telemetry`); this module itself imports nothing of OpenTelemetry.
The trace id goes on the request for the access log line.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from proxy.web.middlewares import CALL, PUBLIC_MODEL, REQUEST_ID, TRACE_ID


def tracing_middleware(tracing: Any) -> Any:
    """An aiohttp middleware that runs every request inside a server span of `tracing`."""

    @web.middleware
    async def traced(request: web.Request, handler: Any) -> web.StreamResponse:
        resource = request.match_info.route.resource
        name = f"{request.method} {resource.canonical if resource is not None else 'unmatched'}"
        with tracing.server_span(request.headers, name) as span:
            request[TRACE_ID] = tracing.trace_id(span)
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("url.path", request.path)
            response = await handler(request)
            call = request.get(CALL)
            if call is not None:
                # The settlement that fills usage and credits is spawned as the reply completes; one
                # loop turn lets it reach that point (it sets them before its first store call).
                await asyncio.sleep(0)
            tracing.end_request(span, response.status, request.get(REQUEST_ID), call, request.get(PUBLIC_MODEL))
            return response

    return traced


__all__ = ["tracing_middleware"]
