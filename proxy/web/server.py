"""Running the gateway: event loop, listeners, signals and graceful drain.

On SIGTERM (or SIGINT) readiness turns false and new `/v1` and `/admin`
requests get 503 at once; open requests and streams get up to
``server.drain_seconds`` to finish; then pending settlements are flushed and
the process exits 0.

Under ``--workers N`` (N > 1) each worker process runs this same path, given
a `WorkerRole`: its sites bind with ``SO_REUSEPORT`` and it tells the
supervisor when it listens (see `proxy.web.workers`).
"""

from __future__ import annotations

import asyncio
import errno
import gc
import signal
from typing import Any

import structlog
from aiohttp import web

from proxy.web.app import create_app
from proxy.web.body import RUNNER_OPTIONS
from proxy.core.gateway import GATEWAY
from proxy.core.loop import run
from proxy.web.middlewares import AccessLogger
from proxy.core.settings import Settings
from proxy.web.workers import WorkerRole, announce_ready, prepare_app

log = structlog.get_logger("sovereign")

# Growth of live container objects between young collections (CPython's default: 700).
YOUNG_GC_THRESHOLD = 10_000


def cannot_listen(exc: OSError, host: str, port: int, change: str) -> SystemExit:
    """A one-line exit (status 1) for a port that cannot be bound, naming how to choose another."""
    if exc.errno == errno.EADDRINUSE:
        reason = f"port {port} is already in use"
    elif exc.errno == errno.EACCES:
        reason = f"permission denied for port {port}"
    else:
        reason = exc.strerror or str(exc)
    return SystemExit(f"sovereign: cannot listen on {host}:{port}: {reason}; {change}")


async def listen(
    runner: web.AppRunner, host: str, port: int, change: str, *,
    reuse_address: bool | None = None, reuse_port: bool | None = None,
) -> None:
    """Start a TCP site of `runner`; a port that cannot be bound ends the process with one line, not a traceback."""
    site = web.TCPSite(runner, host, port, reuse_address=reuse_address, reuse_port=reuse_port)
    try:
        await site.start()
    except OSError as exc:
        raise cannot_listen(exc, host, port, change) from None


def runner_for(
    app: web.Application, *, handler_cancellation: bool = True, **options: Any
) -> web.AppRunner:
    """The runner of a gateway app (the gateway's own, its admin app's, the demo's).

    `options` go to aiohttp as they are (timeouts); aiohttp's defaults otherwise.
    """
    return web.AppRunner(
        app,
        # A client that goes away cancels its request, upstream included.
        handler_cancellation=handler_cancellation,
        access_log_class=AccessLogger,
        **options,
        **RUNNER_OPTIONS,  # request bodies are decoded by proxy.web.body, not by aiohttp
    )


async def serve_async(settings: Settings, ready: asyncio.Event | None = None, worker: WorkerRole | None = None) -> None:
    app = create_app(settings)
    gateway = app[GATEWAY]
    if worker is not None:
        prepare_app(app)
    # Several workers listen on one port, each with its own socket.
    reuse_port = True if worker is not None else None
    runner = runner_for(
        app,
        keepalive_timeout=settings.server.keepalive_timeout,
        shutdown_timeout=1.0,  # open requests were already given drain_seconds before cleanup runs
    )
    await runner.setup()
    server = settings.server
    admin_runner = None
    admin_port = settings.admin.port
    if settings.admin.token is not None and admin_port is not None:
        from proxy.admin.api import create_admin_app

        admin_runner = runner_for(create_admin_app(gateway, standalone=True), handler_cancellation=False)
        await admin_runner.setup()
    try:
        await listen(runner, server.host, server.port, "choose another with server.port in the config or SOVEREIGN_PORT",
                     reuse_address=True, reuse_port=reuse_port)
        if admin_runner is not None and admin_port is not None:
            await listen(admin_runner, settings.admin.host, admin_port,
                         "choose another with admin.port in the config or SOVEREIGN_ADMIN__PORT", reuse_port=reuse_port)
    except SystemExit:
        if admin_runner is not None:
            await admin_runner.cleanup()
        await runner.cleanup()
        raise
    # Everything built so far (settings, schemas, units) lives as long as the
    # process: moving it out of the collector's reach keeps each full
    # collection from walking ~70k objects (~15 ms, a stall every few hundred
    # requests) for objects that are never garbage.
    gc.collect()
    gc.freeze()
    # A young collection runs whenever live container objects grew by the
    # first threshold since the last one. With nothing cyclic left per request
    # (see UpstreamResponse), only the objects of the requests in flight grow
    # it: at CPython's 700 a few dozen concurrent requests crossed it every
    # few dozen requests, each run walking them all (−25k instructions per
    # governed request at 10,000: bench/RESULTS.md). Above the in-flight set,
    # a run is rare and walks no more than that set.
    gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])
    log.info(
        "gateway.listening",
        address=f"http://{settings.server.host}:{settings.server.port}",
        admin="off" if settings.admin.token is None else f"port {settings.admin.port}" if settings.admin.port else "/admin",
        store="durable" if gateway.store.durable else "memory (not durable)",
        pipeline=settings.pipeline,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    if worker is not None:
        announce_ready(worker)
    await stop.wait()
    # Keep listening while draining: new requests get a clean 503 (and
    # /readyz fails) instead of a refused connection, while open streams finish.
    gateway.draining = True
    log.info("gateway.draining", grace_seconds=settings.server.drain_seconds, in_flight=gateway.in_flight)
    if not await gateway.wait_idle(settings.server.drain_seconds):
        log.warning("gateway.drain_timeout", cut_requests=gateway.in_flight)
        await gateway.cut_streams(timeout=1.0)  # an error event and a clean end rather than a broken transfer
    # cleanup closes the listeners and connections, then runs on_cleanup,
    # which flushes pending settlements before the process exits.
    if admin_runner is not None:
        await admin_runner.cleanup()
    await runner.cleanup()
    log.info("gateway.stopped")


def serve(settings: Settings, worker: WorkerRole | None = None) -> None:
    run(serve_async(settings, worker=worker))
