"""HTTP-level concerns: request ids, error rendering, draining, and the access log.

Everything about the request *content* lives in the unit pipeline; this
module only makes sure every response carries an ``X-Request-ID`` (streams
included: `stamp_request_id` runs as each response is prepared), every
failure has the OpenAI error shape (never a traceback), a compressed body is
decoded (`proxy.web.body`) before any unit runs, a draining process refuses
new work, and one JSON log line per request is written after the response has
been sent (aiohttp's access-logger hook, off the hot path), or when its client
left (`gateway_middleware`, since aiohttp logs nothing for a cancelled handler).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from proxy.core.ids import unique_id
from proxy.core.errors import (
    SERVER,
    ApiError,
    CreditsExhausted,
    Draining,
    NotFound,
    RateLimited,
    RequestTooLarge,
    StoreUnavailable,
    UpstreamError,
)
from proxy.web.body import read_body
from proxy.core.gateway import GATEWAY
from proxy.core.pipeline import ErrorRenderer

log = structlog.get_logger("sovereign")

REQUEST_ID_HEADER = "X-Request-ID"
CLIENT_CLOSED = 499  # the status logged for a request whose client left before its response (nginx's)
SERVER_NAME = "sovereign"  # the Server header of every response (see stamp_request_id)

# Per-request storage, typed (aiohttp warns about plain string keys).
REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", float)
CALL = web.RequestKey("call", object)
PUBLIC_MODEL = web.RequestKey("public_model", str)
STREAM_OUTCOME = web.RequestKey("stream_outcome", str)
ERROR_CODE: web.RequestKey[str | None] = web.RequestKey("error_code", str)  # ApiError.code may be None
TRACE_ID = web.RequestKey("trace_id", str)  # set by proxy.core.telemetry when tracing is on
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_GATED_PREFIXES = ("/v1/", "/admin/")


def new_request_id() -> str:
    return unique_id("req_")


def _http_error(exc: web.HTTPException) -> ApiError:
    status = exc.status
    if status == 404:
        return NotFound("Unknown route.")
    if status == 405:
        allowed = getattr(exc, "allowed_methods", None) or ()
        headers = {"Allow": ", ".join(sorted(allowed))} if allowed else None
        return ApiError(405, "Method not allowed on this route.", code="method_not_allowed", headers=headers)
    if status == 413:
        return RequestTooLarge("The request body is larger than this gateway accepts.")
    return ApiError(status, exc.reason or "HTTP error", code="http_error")


def render(error: ApiError, request_id: str, renderer: ErrorRenderer | None = None) -> web.Response:
    headers = {REQUEST_ID_HEADER: request_id, **error.headers}
    status, body = renderer(error, request_id) if renderer is not None else (error.status, error.to_json())
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _renderer(gateway: Any, path: str) -> ErrorRenderer | None:
    """The error shape of this route's protocol (a unit provides it by path prefix), else None: OpenAI's."""
    for prefix, renderer in gateway.error_renderers.items():
        if path.startswith(prefix):
            return renderer
    return None


async def stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: the request id on every response, streams included.

    A stream's headers go out when the handler prepares it, before the
    middleware sees the response, so the middleware cannot add them itself.
    It also names the server without versions: aiohttp's default
    (``Python/3.11 aiohttp/3.x``) tells a scanner which releases to try.
    """
    headers = response.headers
    headers["Server"] = SERVER_NAME
    request_id = request.get(REQUEST_ID)
    if request_id is not None:
        headers[REQUEST_ID_HEADER] = request_id


def stamp_request_id_with(aliases: dict[str, str]) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """`stamp_request_id`, also setting each (path prefix -> header) alias of the request id
    (Gateway.request_id_headers); chosen at start-up, so an app without aliases pays nothing for them."""
    pairs = tuple(aliases.items())

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        await stamp_request_id(request, response)
        request_id = request.get(REQUEST_ID)
        if request_id is not None:
            path = request.path
            for prefix, header in pairs:
                if path.startswith(prefix):
                    response.headers[header] = request_id

    return stamp


@web.middleware
async def gateway_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    supplied = request.headers.get(REQUEST_ID_HEADER)
    request_id = supplied if supplied and _SAFE_REQUEST_ID.fullmatch(supplied) else new_request_id()
    request[REQUEST_ID] = request_id
    request[STARTED] = time.monotonic()
    gateway = request.app[GATEWAY]
    try:
        if gateway.draining and request.path.startswith(_GATED_PREFIXES):
            raise Draining()
        if request.body_exists and "Content-Encoding" in request.headers:
            # Decompress before auth or any unit, so a body that does not
            # decompress is a 400 on every route (the result is cached).
            await read_body(request, gateway)
        response = await handler(request)
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client goes away, and then writes
        # no access line: the request is logged and counted here instead, with
        # the status the client got (a stream's 200) or 499, nginx's "client
        # closed request".
        streamed = request.get(STREAM_OUTCOME) == "client_disconnected"
        request[STREAM_OUTCOME] = "client_disconnected"
        record_request(request, 200 if streamed else CLIENT_CLOSED, time.monotonic() - request[STARTED])
        raise
    except ApiError as error:
        request[ERROR_CODE] = error.code
        _count_refusal(gateway, error)
        response = render(error, request_id, _renderer(gateway, request.path))
        call = request.get(CALL)
        if call is not None and call.response_headers:  # e.g. the rate-limit headers of a refused request
            for name, value in call.response_headers.items():
                response.headers.setdefault(name, value)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        http_error = _http_error(exc)
        request[ERROR_CODE] = http_error.code
        return render(http_error, request_id, _renderer(gateway, request.path))
    except Exception:
        log.exception("request.crashed", request_id=request_id, path=request.path)
        request[ERROR_CODE] = "internal_error"
        crashed = ApiError(500, "The gateway failed to handle this request.", type=SERVER, code="internal_error")
        return render(crashed, request_id, _renderer(gateway, request.path))
    return response


def _count_refusal(gateway: Any, error: ApiError) -> None:
    if isinstance(error, CreditsExhausted):
        gateway.metrics.insufficient_credits.inc()
    elif isinstance(error, RateLimited):
        gateway.metrics.rate_limited.inc()
    elif isinstance(error, UpstreamError):
        gateway.metrics.upstream_errors.labels(error.upstream or "unknown").inc()
    elif isinstance(error, StoreUnavailable):
        gateway.metrics.store_errors.inc()


class AccessLogger(AbstractAccessLogger):
    """One structured line and the request metrics, after the response is sent (see `record_request`)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time_taken: float) -> None:
        # aiohttp's time_taken comes from the loop's clock, which under uvloop
        # counts whole milliseconds; the gateway's own start time is finer.
        started = request.get(STARTED)
        record_request(request, response.status, time.monotonic() - started if started is not None else time_taken)


def record_request(request: web.BaseRequest, status: int, time_taken: float) -> None:
    """The request metrics and, with `logging.access_log`, its line: by aiohttp's
    access logger once a response is sent, by `gateway_middleware` for a
    request whose client left (aiohttp logs none then)."""
    app = getattr(request, "match_info", None)
    app = app.apps[0] if app is not None and app.apps else None
    gateway = app.get(GATEWAY) if app is not None else None
    if gateway is None:
        return
    call = request.get(CALL)
    route = _route_name(request)
    public_model = request.get(PUBLIC_MODEL) or ("other" if call is not None else "")
    metrics = gateway.metrics
    labels = [route, public_model, str(status)]
    if metrics.tenant_labels:
        labels.append(call.principal.tenant if call is not None else "")
    metrics.child(metrics.requests, *labels).inc()
    metrics.child(metrics.duration, route).observe(time_taken)
    if call is not None and call.upstream is not None and call.upstream_latency is not None:
        metrics.child(metrics.upstream_latency, call.upstream).observe(call.upstream_latency)
    if gateway.settings.logging.access_log:
        _line(request, status, time_taken, call, public_model)


def _line(request: web.BaseRequest, status: int, time_taken: float, call: Any, model: str) -> None:
    fields: dict[str, Any] = {
        "request_id": request.get(REQUEST_ID),
        "method": request.method,
        "path": request.path,
        "status": status,
        "duration_ms": round(time_taken * 1000, 3),
    }
    if request.get(ERROR_CODE):
        fields["error_code"] = request[ERROR_CODE]
    if request.get(TRACE_ID):
        fields["trace_id"] = request[TRACE_ID]
    if call is not None:
        usage = call.usage or {}
        fields.update(
            tenant=call.principal.tenant,
            key_id=call.principal.key_id,
            model=model,
            stream=call.stream,
            upstream=call.upstream,
            upstream_latency_ms=round(call.upstream_latency * 1000, 3) if call.upstream_latency else None,
            input_tokens=usage.get("prompt_tokens"),
            output_tokens=usage.get("completion_tokens"),
            credits=call.credits,
            usage_source=call.usage_source,
            outcome=request.get(STREAM_OUTCOME),
        )
    log.info("request", **fields)


def _route_name(request: web.BaseRequest) -> str:
    info = getattr(request, "match_info", None)
    route = getattr(info, "route", None)
    resource = getattr(route, "resource", None)
    canonical = getattr(resource, "canonical", None)
    return canonical or "unmatched"
