"""The floor: the barest aiohttp pass-through, the reference the gateway's ratios are against.

One pooled ``ClientSession``, the request body forwarded as the bytes received,
JSON replies relayed whole and SSE bytes relayed as they arrive. No auth, no
metering, no parsing: whatever the gateway does beyond this is its overhead.

    python -m bench.floor --port 9300 --upstream http://127.0.0.1:9100
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

import aiohttp
from aiohttp import web

# Request headers that describe this hop, not the request; aiohttp sets its own.
_HOP_HEADERS = frozenset(
    {"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te", "upgrade", "proxy-connection"}
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def make_app(upstream: str) -> web.Application:
    """The floor app relaying ``POST /v1/*`` to ``upstream`` (``http://host:port``, no /v1)."""
    upstream = upstream.rstrip("/").removesuffix("/v1")
    app = web.Application(client_max_size=32 * 1024 * 1024)

    async def relay(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_HEADERS}
        async with app[SESSION].post(upstream + request.path, data=body, headers=headers) as resp:
            if resp.content_type != "text/event-stream":
                return web.Response(status=resp.status, body=await resp.read(), content_type=resp.content_type)
            out = web.StreamResponse(status=resp.status, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await out.prepare(request)
            async for chunk in resp.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def open_session(app: web.Application) -> None:
        # auto_decompress off: bytes go through untouched.
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

    async def close_session(app: web.Application) -> None:
        await app[SESSION].close()

    app.router.add_post("/v1/{tail:.*}", relay)
    app.router.add_get("/healthz", healthz)
    app.on_startup.append(open_session)
    app.on_cleanup.append(close_session)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="bare aiohttp pass-through (benchmark floor)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="provider base URL, e.g. http://127.0.0.1:9100")
    args = parser.parse_args()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        uvloop = None
    with contextlib.suppress(KeyboardInterrupt):
        web.run_app(
            make_app(args.upstream),
            host=args.host,
            port=args.port,
            access_log=None,
            handler_cancellation=True,
            print=None,
            loop=uvloop.new_event_loop() if uvloop else asyncio.new_event_loop(),
            shutdown_timeout=1.0,
        )


if __name__ == "__main__":
    main()
