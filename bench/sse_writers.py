"""Does aiohttp-sse cost the gateway's own event streams? A same-run A/B of two SSE writers.

The gateway writes the streams it makes itself (Responses, Messages, agent
steps) as `SSEEvent` objects whose bytes are built once, and the relay hands
each one to ``StreamResponse.write``. aiohttp-sse's ``EventSourceResponse``
instead builds every event from a str (a StringIO, a regex split of the data,
an encode) and arms an ``asyncio.timeout`` per ``send``, plus a ping task per
response. This script serves the same events both ways from one process and
reads them from another, interleaving the two, and prints the server's CPU
per event for each (median of the rounds) and their ratio.

    python -m bench.sse_writers [--events 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import time

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from proxy.core.call import SSEEvent

EVENT = {"type": "response.output_text.delta", "item_id": "msg_1", "output_index": 0, "content_index": 0, "delta": "word "}

READER = r"""
import socket, sys
port, path, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    while s.recv(65536):
        pass
    s.close()
"""


def _events(count: int) -> list[SSEEvent]:
    return [SSEEvent.from_json({**EVENT, "sequence_number": i}, event=EVENT["type"]) for i in range(count)]


async def raw_writer(request: web.Request) -> web.StreamResponse:
    """What the relay does: prepared bytes, one write each."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for event in request.app["events"]:
        await response.write(event.raw)
    await response.write_eof()
    return response


async def sse_writer(request: web.Request) -> web.StreamResponse:
    """The same events through aiohttp-sse."""
    async with EventSourceResponse() as response:
        await response.prepare(request)
        for event in request.app["events"]:
            await response.send(event.data.decode(), event=EVENT["type"])  # the cheapest str it accepts
    return response


async def measure(events: int, rounds: int, requests: int) -> dict[str, list[float]]:
    app = web.Application()
    app["events"] = _events(events)
    app.router.add_get("/raw", raw_writer)
    app.router.add_get("/sse", sse_writer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    results: dict[str, list[float]] = {"/raw": [], "/sse": []}
    try:
        for _ in range(rounds):
            for path in ("/raw", "/sse"):
                started = time.process_time()
                reader = await asyncio.create_subprocess_exec(sys.executable, "-c", READER, str(port), path, str(requests))
                await reader.wait()
                results[path].append((time.process_time() - started) / (events * requests) * 1e6)
    finally:
        await runner.cleanup()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5)
    args = parser.parse_args()
    results = asyncio.run(measure(args.events, args.rounds, args.requests))
    raw, sse = (statistics.median(results[p]) for p in ("/raw", "/sse"))
    print(f"server CPU per event, median of {args.rounds} rounds × {args.requests} streams × {args.events} events")
    print(f"  StreamResponse.write (the relay):  {raw:6.2f} µs  [{min(results['/raw']):.2f}–{max(results['/raw']):.2f}]")
    print(f"  EventSourceResponse.send:          {sse:6.2f} µs  [{min(results['/sse']):.2f}–{max(results['/sse']):.2f}]")
    print(f"  aiohttp-sse / relay:               {sse / raw:6.2f}×")


if __name__ == "__main__":
    main()
