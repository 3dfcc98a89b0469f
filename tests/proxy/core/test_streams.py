"""EventStream: observe, transform, and a close hook that runs once however the stream ends."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.core.call import SSEEvent
from proxy.core.errors import UpstreamError
from proxy.core.streams import EventStream, keepalive


class Source:
    """A provider-like stream that records whether it was closed."""

    def __init__(self, count: int = 3, fail_after: int | None = None, gate: asyncio.Event | None = None) -> None:
        self.count, self.fail_after, self.gate = count, fail_after, gate
        self.sent = 0
        self.closed = False

    def __aiter__(self) -> Source:
        return self

    async def __anext__(self) -> SSEEvent:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_after is not None and self.sent == self.fail_after:
            raise UpstreamError("broke off")
        if self.sent == self.count:
            raise StopAsyncIteration
        self.sent += 1
        return SSEEvent.from_json({"n": self.sent})

    async def aclose(self) -> None:
        self.closed = True


def recorder() -> tuple[list[bool], object]:
    seen: list[bool] = []

    async def on_close(completed: bool) -> None:
        seen.append(completed)

    return seen, on_close


async def test_exhausted_stream_closes_once_as_completed() -> None:
    seen, on_close = recorder()
    stream = EventStream(Source(), on_close=on_close)
    assert [e.json()["n"] async for e in stream] == [1, 2, 3]
    await stream.aclose()
    assert seen == [True]


async def test_a_failing_source_closes_as_not_completed_and_the_error_passes() -> None:
    seen, on_close = recorder()
    stream = EventStream(Source(fail_after=1), on_close=on_close)
    with pytest.raises(UpstreamError):
        async for _ in stream:
            pass
    assert seen == [False]


async def test_a_failing_transform_closes_the_layers_under_it() -> None:
    """A translator that raises (the provider's in-band error) still lets the inner layer's on_close run."""
    source = Source(count=5)
    seen, on_close = recorder()

    async def translate(events: AsyncIterator[SSEEvent]) -> AsyncIterator[SSEEvent]:
        async for event in events:
            if event.json()["n"] == 2:
                raise UpstreamError("the provider sent an error event")
            yield event

    inner = EventStream(source, on_close=on_close)  # metering's layer: it settles in on_close
    outer_seen, outer_close = recorder()
    outer = EventStream(inner, transform=translate, on_close=outer_close)
    with pytest.raises(UpstreamError):
        async for _ in outer:
            pass
    assert source.closed and seen == [False] and outer_seen == [False]
    await outer.aclose()  # the relay's close afterwards changes nothing
    assert seen == [False] and outer_seen == [False]


async def test_closing_before_the_first_event_still_reaches_the_source_and_the_hook() -> None:
    source = Source()
    seen, on_close = recorder()

    async def translate(events: AsyncIterator[SSEEvent]) -> AsyncIterator[SSEEvent]:
        async for event in events:  # a generator that is never started
            yield event

    inner = EventStream(source, on_close=on_close)
    outer = EventStream(inner, transform=translate)
    await outer.aclose()  # dropped before anyone asked for an event
    assert source.closed and seen == [False]


async def test_observe_keeps_replaces_or_drops_events() -> None:
    def observe(event: SSEEvent) -> SSEEvent | None:
        n = event.json()["n"]
        if n == 2:
            return None
        return event if n == 1 else SSEEvent.from_json({"n": n * 10})

    kept: list[SSEEvent] = []

    class Recording(Source):
        async def __anext__(self) -> SSEEvent:
            event = await super().__anext__()
            kept.append(event)
            return event

    out = [event async for event in EventStream(Recording(), observe=observe)]
    assert [e.json()["n"] for e in out] == [1, 30]
    assert out[0] is kept[0]  # an event passed on unchanged is the same object, bytes and all


async def test_transform_adds_events_and_closing_mid_stream_closes_the_source() -> None:
    source = Source(count=10)

    async def doubled(events: AsyncIterator[SSEEvent]) -> AsyncIterator[SSEEvent]:
        async for event in events:
            yield event
            yield event

    stream = EventStream(source, transform=doubled)
    got = [await stream.__anext__() for _ in range(3)]
    assert [e.json()["n"] for e in got] == [1, 1, 2]
    await stream.aclose()
    assert source.closed


async def test_shielded_reads_survive_a_cancelled_reader_and_are_handed_to_on_abandon() -> None:
    gate = asyncio.Event()
    source = Source(count=2, gate=gate)
    handed: list[AsyncIterator[SSEEvent]] = []
    stream = EventStream(source, shield_reads=True, on_abandon=handed.append)
    reader = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0.01)
    reader.cancel()  # the client went away while a provider read was under way
    with pytest.raises(asyncio.CancelledError):
        await reader
    await stream.aclose()
    assert len(handed) == 1 and not source.closed
    gate.set()
    assert [e.json()["n"] async for e in handed[0]] == [1, 2]  # the read under way is not lost
    assert source.closed


# -- keepalive: pings while a stream is starting -------------------------------------

PING = b": ping\n\n"


async def _paced(*items: tuple[float, str]) -> AsyncIterator[str]:
    """Yields each item after its pause (seconds)."""
    for pause, item in items:
        await asyncio.sleep(pause)
        yield item


async def test_keepalive_pings_until_the_first_event_then_relays_without_a_timer() -> None:
    out = [e async for e in keepalive(_paced((0.2, "a"), (0.2, "b"), (0, "c")), 0.02, PING)]
    first = out.index("a")
    assert first >= 2 and set(out[:first]) == {PING}
    assert out[first:] == ["a", "b", "c"]  # no ping in the 0.2 s before "b"


async def test_keepalive_with_until_pings_between_events_until_it_says_stop() -> None:
    seen: list[str] = []
    out = []
    async for event in keepalive(_paced((0, "quiet"), (0.2, "talks"), (0.2, "more")), 0.02, PING, until=lambda: "talks" in seen):
        out.append(event)
        if event != PING:
            seen.append(event)
    talks = out.index("talks")
    assert out[0] == "quiet" and PING in out[1:talks]  # still pinging after an event until() did not accept
    assert out[talks:] == ["talks", "more"]


async def test_keepalive_of_an_empty_stream_ends() -> None:
    assert [e async for e in keepalive(_paced(), 0.02, PING)] == []


async def test_closing_keepalive_mid_wait_lets_the_cancelled_read_land_before_the_source_is_closed() -> None:
    finished: list[bool] = []

    async def silent() -> AsyncIterator[str]:
        try:
            await asyncio.sleep(30)
            yield "never"
        finally:
            finished.append(True)

    source = silent()
    stream = keepalive(source, 0.01, PING)
    assert await stream.__anext__() == PING  # a read of `source` is now pending
    await stream.aclose()  # type: ignore[attr-defined]
    assert finished == [True]  # the pending read was cancelled and ran to its end
    await source.aclose()  # a read still running would make this raise RuntimeError
