"""The per-process gateway: the shared services, then the units, then the pipeline.

One `Gateway` lives on the aiohttp application. It is built in that order, so a
unit never sees it half-made:

1. the shared services: settings, the store, the upstream router, the metrics,
   and the background tasks (`spawn`, awaited by `drain` at shutdown);
2. the units, each handed the gateway (its services) and its own settings;
3. the pipeline: the units chained around the terminal `Forwarder`.

Seams the units use instead of reaching into each other:

- `principal(headers)`: authentication for routes outside the pipeline, by
  the unit that provides it (`Unit.authenticator`);
- `submit(call, after=unit)`: a provider call the gateway makes on its own
  behalf (a session title, an agent step in the background) through the units
  after `unit` (so it is metered like any request) and the forwarder.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

import structlog
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.core.call import ANONYMOUS, Call, Next, Principal, Reply
from proxy.upstream.forward import Forwarder
from proxy.core.metrics import Metrics
from proxy.core.pipeline import Authenticator, ErrorRenderer, Unit, build_units, chain
from proxy.core.settings import ConfigError, Settings
from proxy.store.store import Store
from proxy.upstream.router import UpstreamRouter

log = structlog.get_logger("sovereign")


def _tracing(settings: Settings) -> Any:
    try:
        from proxy.core.telemetry import Tracing
    except ImportError as exc:
        raise ConfigError(
            f"telemetry.otlp_endpoint needs OpenTelemetry: pip install 'sovereign[otel]' ({exc.name} is missing)"
        ) from None
    return Tracing(settings)


class Gateway:
    """Everything the request path shares within one process."""

    def __init__(self, settings: Settings, store: Store | None = None) -> None:
        # 1. shared services
        self.settings = settings
        self.store = store or Store(settings.store)
        # Tracing is imported only when configured: off, no OpenTelemetry module is loaded.
        self.tracing: Any = None
        if settings.telemetry.otlp_endpoint:
            self.tracing = _tracing(settings)
            self.tracing.instrument_store(self.store)
        self.router = UpstreamRouter(settings.upstreams, settings.routing, self.tracing)
        self.metrics = Metrics(tenant_labels=settings.metrics.tenant_labels)
        self.draining = False
        self.started = False
        self.in_flight = 0  # pipeline requests being served now (drain waits for them)
        self.relays: set[asyncio.Task[Any]] = set()  # the tasks relaying a stream now (cut_streams ends them)
        self._background: set[asyncio.Task[Any]] = set()
        # 2. units
        self.units: list[Unit] = build_units(self)
        self.authenticator: Authenticator | None = next(
            (found for found in (unit.authenticator() for unit in self.units) if found is not None), None
        )
        # Errors of the routes of another protocol (the messages unit: Anthropic's shape under /v1/messages).
        self.error_renderers: dict[str, ErrorRenderer] = {
            prefix: render for unit in self.units for prefix, render in unit.error_renderers().items()
        }
        # ... and the request id under the header name that protocol's SDKs read (Anthropic's `request-id`).
        self.request_id_headers: dict[str, str] = {
            prefix: header for unit in self.units for prefix, header in unit.request_id_headers().items()
        }
        # 3. the pipeline: _entries[i] starts at unit i; the last one is the forwarder alone.
        self._entries: list[Next] = chain(self.units, Forwarder(self))
        self.handler: Next = self._entries[0]

    def unit(self, name: str) -> Unit | None:
        for unit in self.units:
            if unit.name == name:
                return unit
        return None

    # -- lifecycle -------------------------------------------------------
    async def start(self) -> None:
        await self.store.connect()
        await self.router.start()
        for unit in self.units:
            await unit.startup()
        self.started = True
        if not self.store.durable:
            log.warning(
                "store.embedded",
                message="memory:// store: tenants, keys, credits and sessions live in this process only and are lost at exit",
            )

    async def close(self) -> None:
        await self.drain()
        for unit in reversed(self.units):
            await unit.shutdown()
        await self.router.close()
        await self.store.close()
        if self.tracing is not None:
            await self.tracing.shutdown()

    # -- background work -------------------------------------------------
    def spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> asyncio.Task[Any]:
        """Run work that must outlive the request; `drain` waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(lambda t: self._finished(t, what))
        return task

    def _finished(self, task: asyncio.Task[Any], what: str) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background.failed", task=what, error=repr(task.exception()))

    @property
    def pending_background(self) -> int:
        return len(self._background)

    async def drain(self, timeout: float | None = None) -> None:
        """Write what units batch, then wait for background work (settlements, titles) to finish."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for unit in self.units:
            await unit.drain()
        while self._background:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            await asyncio.wait(set(self._background), timeout=remaining)
            if deadline is not None and time.monotonic() >= deadline:
                break

    # -- seams -----------------------------------------------------------
    async def principal(self, headers: CIMultiDictProxy[str]) -> Principal:
        """Authenticate a request outside the pipeline (models, credits, sessions, …)."""
        if self.authenticator is None:
            return ANONYMOUS
        return await self.authenticator(headers)

    def handle(self, call: Call) -> Awaitable[Reply]:
        """Serve a client's call through the whole pipeline (the caller awaits it)."""
        return self.handler(call)

    def forwards_directly(self, unit: Unit) -> bool:
        """True when `unit` hands its calls straight to the forwarder: no unit after it acts on them."""
        return bool(self.units) and self.units[-1] is unit

    async def submit(self, call: Call, after: Unit) -> Reply:
        """Serve a call the gateway makes itself through the units after `after` and the forwarder.

        The caller sets `call.principal` (whom to bill) and, for the ledger,
        `call.ledger_kind`; the units before `after` (auth, rate limits, …) do
        not see it.
        """
        return await self._entries[self.units.index(after) + 1](call)

    async def cut_streams(self, timeout: float) -> None:
        """At the end of a drain that ran out: end every open stream with the in-band `draining` error, not a cut.

        Each relay, cancelled with `CUT_AT_SHUTDOWN`, writes its protocol's
        error event and the end of the body; this waits for them at most `timeout`.
        """
        relays = list(self.relays)
        for task in relays:
            task.cancel(CUT_AT_SHUTDOWN)
        if relays:
            await asyncio.wait(relays, timeout=timeout)

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no pipeline request is in flight; False if the grace ran out."""
        deadline = time.monotonic() + timeout
        while self.in_flight > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.in_flight == 0


# The cancellation message of a relay that `Gateway.cut_streams` ends.
CUT_AT_SHUTDOWN = "sovereign: stream cut at shutdown"

# The application key under which the gateway lives.
GATEWAY = web.AppKey("gateway", Gateway)
