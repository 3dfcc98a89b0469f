"""One way to wrap a reply's event stream: `EventStream`.

A unit that watches or changes a streamed reply wraps ``reply.events`` in an
`EventStream` (``reply.wrap(...)``) instead of writing its own iterator class
or generator. A layer takes the events under it (``source``) and any of:

- ``observe(event)``: cheap per-event work; returns the event to pass on
  (the same object keeps its bytes) or None to drop it;
- ``transform(source)``: an async generator over the source, for translators
  that turn one event into several or add events at the end (Responses);
- ``on_close(completed)``: runs exactly once, however the stream ends —
  exhausted (``True``), failed, closed by the relay when the client left, or
  dropped before its first event was asked for (``False``).

Closing a layer closes the one under it, so the relay closes only the
outermost layer and the close reaches the provider connection; a layer that
fails (its source or its transform raised) closes the ones under it too. That holds
even for a layer that was never iterated, which a bare async generator does
not guarantee (closing a generator that never started skips its ``finally``).

Two options exist for metering's ``on_disconnect: drain`` (read the provider
to its end after the client left, for its exact usage): ``shield_reads`` runs
each read of the source in its own task, so the handler's cancellation does
not reach the provider connection, and ``on_abandon(source)`` receives the
source instead of closing it when the stream is closed early.

`keepalive(events, interval, ping)` is the other stream helper: it adds a
ping (an SSE comment, an Anthropic ``ping`` event) after every ``interval``
seconds without an event, until the first event or until ``until()`` says
the stream is under way; from then on it relays without any timer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from proxy.core.call import SSEEvent

Observer = Callable[[SSEEvent], SSEEvent | None]
Transform = Callable[[AsyncIterator[SSEEvent]], AsyncIterator[SSEEvent]]
OnClose = Callable[[bool], Awaitable[None] | None]
OnAbandon = Callable[[AsyncIterator[SSEEvent]], None]
T = TypeVar("T")
P = TypeVar("P")


class EventStream:
    """An async iterator of events over a source, with an observer and a close hook (see the module)."""

    __slots__ = ("source", "_events", "_observe", "_on_close", "_on_abandon", "_shield", "_pending", "_closed")

    def __init__(
        self,
        source: AsyncIterator[SSEEvent],
        *,
        observe: Observer | None = None,
        transform: Transform | None = None,
        on_close: OnClose | None = None,
        on_abandon: OnAbandon | None = None,
        shield_reads: bool = False,
    ) -> None:
        self.source = source
        self._events: AsyncIterator[SSEEvent] = transform(source) if transform is not None else source
        self._observe = observe
        self._on_close = on_close
        self._on_abandon = on_abandon
        self._shield = shield_reads
        self._pending: asyncio.Future[Any] | None = None
        self._closed = False

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> SSEEvent:
        if self._closed:
            raise StopAsyncIteration
        observe = self._observe
        while True:
            try:
                event = await (self._shielded_next() if self._shield else self._events.__anext__())
            except StopAsyncIteration:
                await self._finish(True)
                raise
            except BaseException:
                if not isinstance(self._pending, asyncio.Future) or self._pending.done():
                    # A failure of the source (the provider broke off) or of this
                    # layer's transform (a translator meeting the provider's error
                    # event): the layers under it are closed as `aclose` would, so
                    # their `on_close` runs (metering settles there) and the relay's
                    # later `aclose`, a no-op on a closed layer, is not needed for it.
                    # A cancelled shielded read leaves the read running instead.
                    try:
                        with contextlib.suppress(Exception):  # the failure raised here matters more
                            await self._close_below()
                    finally:
                        await self._finish(False)
                raise
            if observe is None:
                return event
            kept = observe(event)
            if kept is not None:
                return kept

    async def _shielded_next(self) -> SSEEvent:
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._events.__anext__())
        pending = self._pending
        event = await asyncio.shield(pending)
        self._pending = None
        return event

    async def aclose(self) -> None:
        """Close this layer and the ones under it (or hand the source to `on_abandon`)."""
        if self._closed:
            return
        if self._on_abandon is not None:
            self._closed = True
            self._on_abandon(self._resume())
            return
        try:
            await self._close_below()
        finally:
            await self._finish(False)

    async def _close_below(self) -> None:
        if self._events is not self.source:
            await self._events.aclose()  # type: ignore[attr-defined]
        await _aclose(self.source)

    async def _resume(self) -> AsyncIterator[SSEEvent]:
        """The rest of the source for `on_abandon`: a read under way first, then the others."""
        pending, self._pending = self._pending, None
        try:
            if pending is not None:
                try:
                    yield await pending
                except StopAsyncIteration:
                    return
            async for event in self._events:
                yield event
        finally:
            await _aclose(self._events)
            if self._events is not self.source:
                await _aclose(self.source)

    async def _finish(self, completed: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            done = self._on_close(completed)
            if done is not None:
                await done


async def _aclose(events: AsyncIterator[SSEEvent]) -> None:
    aclose = getattr(events, "aclose", None)
    if aclose is not None:
        await aclose()


async def keepalive(
    events: AsyncIterator[T], interval: float, ping: P, until: Callable[[], bool] | None = None
) -> AsyncIterator[T | P]:
    """`events`, with `ping` after every `interval` seconds without one, while the stream is starting.

    Without `until` the timer stops at the first event; with it, once
    ``until()`` is true (checked before each read). After that each event is
    relayed as it comes, with no timer and no check. The caller closes
    `events`: this generator only ever reads it.
    """
    iterator = events.__aiter__()
    timed = until is None or not until()
    while timed:
        pending = asyncio.ensure_future(iterator.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({pending}, timeout=interval)
                if done:
                    break
                yield ping
        finally:
            if not pending.done():
                pending.cancel()
                # Let the cancellation land before anyone closes the iterator it is running.
                with contextlib.suppress(BaseException):
                    await pending
        try:
            yield pending.result()
        except StopAsyncIteration:
            return
        timed = until is not None and not until()
    async for event in iterator:
        yield event
