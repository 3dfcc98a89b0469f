"""The asyncio load clients: per-request latency, a fallback load generator, paced and open streams.

Each client measures with ``time.perf_counter`` around real HTTP exchanges and
returns plain results; deciding what passed is the caller's job. SSE replies
are split into events on the blank line; an `SSEKind` says which events are
the chunks a workload counts (chat: every ``data:`` event but ``[DONE]``;
Responses: the non-empty ``response.output_text.delta`` events).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class SSEKind:
    """How to recognise a counted chunk and the end of a stream of one endpoint."""

    chunk_marker: bytes  # an event is a chunk when it starts with this
    end_marker: bytes  # the event that ends a complete stream
    skip_marker: bytes | None  # a chunk containing this is not counted (empty delta)
    extra_chunks: int  # chunks beyond the content chunks (chat: role + finish deltas)

    def expected(self, content_chunks: int) -> int:
        return content_chunks + self.extra_chunks

    def is_chunk(self, event: bytes) -> bool:
        if not event.startswith(self.chunk_marker) or event.startswith(self.end_marker):
            return False
        return self.skip_marker is None or self.skip_marker not in event


CHAT_SSE = SSEKind(chunk_marker=b"data: ", end_marker=b"data: [DONE]", skip_marker=None, extra_chunks=2)
# Agent mode: the first provider call's role chunk and the tool call's delta come before the answer's chunks.
AGENT_SSE = SSEKind(chunk_marker=b"data: ", end_marker=b"data: [DONE]", skip_marker=None, extra_chunks=4)
RESPONSES_SSE = SSEKind(
    chunk_marker=b"event: response.output_text.delta",
    end_marker=b"event: response.completed",
    skip_marker=b'"delta":""',
    extra_chunks=0,
)


MESSAGES_SSE = SSEKind(
    chunk_marker=b"event: content_block_delta",
    end_marker=b"event: message_stop",
    skip_marker=None,
    extra_chunks=0,
)


def session(connections: int) -> aiohttp.ClientSession:
    """A client session with at most ``connections`` keep-alive connections (0: unbounded)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, force_close=False),
        timeout=aiohttp.ClientTimeout(total=120),
        auto_decompress=False,
    )


# -- JSON requests -------------------------------------------------------------------


@dataclass
class RequestStats:
    """Latencies (seconds) of successful requests and the failures seen."""

    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    first_failure: str = ""

    def fail(self, what: str) -> None:
        self.failures += 1
        self.first_failure = self.first_failure or what


async def _post_json(client: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str], stats: RequestStats) -> None:
    start = time.perf_counter()
    try:
        async with client.post(url, data=body, headers=headers) as resp:
            data = await resp.read()
            if resp.status != 200:
                stats.fail(f"HTTP {resp.status}: {data[:200]!r}")
                return
    except (aiohttp.ClientError, TimeoutError) as exc:
        stats.fail(f"{type(exc).__name__}: {exc}")
        return
    stats.latencies.append(time.perf_counter() - start)


async def sequential(url: str, body: bytes, headers: dict[str, str], duration: float, warmup: int = 50) -> RequestStats:
    """One connection, one request at a time, for ``duration`` seconds (after ``warmup`` requests)."""
    headers = {**JSON_HEADERS, **headers}
    async with session(1) as client:
        for _ in range(warmup):
            await _post_json(client, url, body, headers, RequestStats())
        stats = RequestStats()
        deadline = time.perf_counter() + duration
        while time.perf_counter() < deadline:
            await _post_json(client, url, body, headers, stats)
    return stats


async def concurrent_load(url: str, body: bytes, headers: dict[str, str], connections: int, duration: float) -> RequestStats:
    """``connections`` workers posting back to back for ``duration`` seconds (the wrk fallback)."""
    headers = {**JSON_HEADERS, **headers}
    stats = RequestStats()
    async with session(connections) as client:
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await _post_json(client, url, body, headers, stats)

        await asyncio.gather(*(worker() for _ in range(connections)))
    return stats


# -- streams ---------------------------------------------------------------------------


@dataclass
class StreamResult:
    """One stream as the client saw it (times in seconds from sending the request)."""

    status: int = 0
    chunks: int = 0
    complete: bool = False
    first_chunk: float | None = None
    done: float | None = None
    gaps: list[float] = field(default_factory=list)
    error: str = ""


async def _events(resp: aiohttp.ClientResponse):
    """Yield complete SSE events (without the blank line) as their bytes arrive."""
    buffer = b""
    async for data in resp.content.iter_any():
        buffer += data
        *events, buffer = buffer.split(b"\n\n")
        for event in events:
            yield event


async def one_stream(
    client: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    kind: SSEKind,
    opened: Callable[[], None] | None = None,
    hold: Awaitable[None] | None = None,
) -> StreamResult:
    """Read one stream to its end; with ``hold``, call ``opened`` at the first event, await ``hold``, then close."""
    result = StreamResult()
    start = time.perf_counter()
    last = 0.0
    try:
        async with client.post(url, data=body, headers={**JSON_HEADERS, **headers}) as resp:
            result.status = resp.status
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                return result
            async for event in _events(resp):
                if hold is not None:
                    # Open-stream mode: the first event of any kind means the stream is open.
                    if opened is not None:
                        opened()
                    await hold
                    resp.close()  # leave mid-stream: the target sees a client disconnect
                    return result
                now = time.perf_counter() - start
                if event.startswith(kind.end_marker):
                    result.complete, result.done = True, now
                    break
                if not kind.is_chunk(event):
                    continue
                result.chunks += 1
                if result.first_chunk is None:
                    result.first_chunk = now
                else:
                    result.gaps.append(now - last)
                last = now
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def paced_streams(url: str, body: bytes, headers: dict[str, str], streams: int, kind: SSEKind) -> list[StreamResult]:
    """``streams`` concurrent streams, each read to its end."""
    async with session(0) as client:
        return list(await asyncio.gather(*(one_stream(client, url, body, headers, kind) for _ in range(streams))))


async def open_streams(
    url: str,
    body: bytes,
    headers: dict[str, str],
    streams: int,
    kind: SSEKind,
    sample: Callable[[], Awaitable[object]],
    open_timeout: float,
) -> tuple[int, object, list[StreamResult]]:
    """Open ``streams`` streams, call ``sample()`` once all have sent an event (or at ``open_timeout``), then close them.

    Returns (streams open at the sample, what ``sample`` returned, every stream's result).
    """
    settled = asyncio.Event()  # every stream has either opened or ended
    release = asyncio.get_running_loop().create_future()
    count = ended = 0

    def check() -> None:
        if count + ended == streams:
            settled.set()

    def opened() -> None:
        nonlocal count
        count += 1
        check()

    def finished(task: asyncio.Future[StreamResult]) -> None:
        nonlocal ended
        if not release.done():  # ended before the sample: it failed or the reply was short
            ended += 1
            check()

    async with session(0) as client:
        tasks = [asyncio.ensure_future(one_stream(client, url, body, headers, kind, opened, release)) for _ in range(streams)]
        for task in tasks:
            task.add_done_callback(finished)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(settled.wait(), open_timeout)
        at_sample = count
        sampled = await sample()
        release.set_result(None)
        # Streams that never opened would wait for the provider: cancel them (closes their connections).
        _, late = await asyncio.wait(tasks, timeout=5)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        results = [StreamResult(error="not open at the sample") if t.cancelled() else t.result() for t in tasks]
    return at_sample, sampled, results
