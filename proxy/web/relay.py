"""Write a `Reply` to the client.

JSON replies go out in one piece. Streams go out event by event, each written
as it arrives (aiohttp hands every write to the transport; nothing is
coalesced). The relay owns what can go wrong on the client side of a stream:
a client that disconnects (the reply iterator is closed, which closes the
provider connection) and a provider that fails mid-stream (one
``data: {"error": …}`` event, then the stream ends).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import suppress

from aiohttp import web

from proxy.core.call import Call, Reply, SSEEvent
from proxy.core.errors import ApiError, Draining
from proxy.core.gateway import CUT_AT_SHUTDOWN, GATEWAY
from proxy.core.streams import keepalive as keepalive_pings
from proxy.web.middlewares import STREAM_OUTCOME

try:  # aiohttp >= 3.10 raises its own subclass
    from aiohttp.client_exceptions import ClientConnectionResetError as _ResetError
except ImportError:  # pragma: no cover
    _ResetError = ConnectionResetError  # type: ignore[misc,assignment]

CLIENT_GONE = (ConnectionResetError, _ResetError)
KEEPALIVE_COMMENT = b": keep-alive\n\n"

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # Tells nginx-style proxies in front of the gateway not to buffer the stream.
    "X-Accel-Buffering": "no",
}


def _headers(reply: Reply, call: Call) -> dict[str, str]:
    headers = dict(reply.headers)
    headers.update(call.response_headers)
    return headers


async def send_json(reply: Reply, call: Call) -> web.Response:
    headers = _headers(reply, call)
    headers["Content-Type"] = "application/json"
    return web.Response(status=reply.status, body=reply.body_bytes(), headers=headers)


async def send_stream(
    request: web.Request,
    reply: Reply,
    call: Call,
    keepalive: float | None = None,
    on_first_byte: Callable[[], None] | None = None,
) -> web.StreamResponse:
    assert reply.events is not None
    headers = _headers(reply, call)
    headers.update(SSE_HEADERS)
    response = web.StreamResponse(status=reply.status, headers=headers)
    events: AsyncIterator[SSEEvent | bytes] = reply.events
    request[STREAM_OUTCOME] = "completed"
    gateway = request.app.get(GATEWAY)
    task = asyncio.current_task()
    if gateway is not None and task is not None:
        gateway.relays.add(task)
    try:
        await response.prepare(request)
        if keepalive:
            # A comment line is the only addition SSE clients are guaranteed to ignore.
            events = keepalive_pings(events, keepalive, KEEPALIVE_COMMENT)
        async for event in events:
            await response.write(event.raw if isinstance(event, SSEEvent) else event)
            if on_first_byte is not None:
                on_first_byte()
                on_first_byte = None
    except ApiError as error:
        # The provider failed after the stream started: tell the client in-band.
        request[STREAM_OUTCOME] = "upstream_error"
        await _write_error(response, reply, error)
    except CLIENT_GONE:
        request[STREAM_OUTCOME] = "client_disconnected"
    except asyncio.CancelledError as cancelled:
        if cancelled.args != (CUT_AT_SHUTDOWN,):
            # aiohttp cancels the handler when the client goes away.
            request[STREAM_OUTCOME] = "client_disconnected"
            raise
        # Gateway.cut_streams: the drain ran out. Say so in-band, as for a provider failure, and end cleanly.
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()
        request[STREAM_OUTCOME] = "cut_at_shutdown"
        await _write_error(response, reply, Draining())
    finally:
        if events is not reply.events:
            await events.aclose()  # type: ignore[attr-defined]  # Reply.events is typed AsyncIterator; every stream is an async generator or has aclose
        await reply.events.aclose()  # type: ignore[attr-defined]  # Reply.events is typed AsyncIterator; every stream is an async generator or has aclose
        if gateway is not None and task is not None:
            gateway.relays.discard(task)
    if request[STREAM_OUTCOME] != "client_disconnected":
        with suppress(*CLIENT_GONE):
            await response.write_eof()
    return response


async def _write_error(response: web.StreamResponse, reply: Reply, error: ApiError) -> None:
    """The in-band error event of the stream's protocol (chat's `data: {"error": …}` unless the reply says otherwise)."""
    with suppress(*CLIENT_GONE):
        render = reply.stream_error
        await response.write(render(error) if render is not None else b"data: " + error.to_json() + b"\n\n")
