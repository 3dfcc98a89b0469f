"""Split a provider's SSE body into events without changing a byte.

Each yielded `SSEEvent` holds exactly the bytes the provider sent, including
the blank line that ends it, so concatenating the events gives back the body.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterable, AsyncIterator

from proxy.core.call import SSEEvent

# An event ends at the first blank line, whichever line ending the provider uses.
EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")


async def split_events(chunks: AsyncIterable[bytes], redact: bytes | None = None) -> AsyncIterator[SSEEvent]:
    """Yield one event per blank-line-terminated block as soon as it is complete.

    `redact`, when given, is replaced by ``[redacted]`` wherever it appears (the
    upstream key must never reach a client, even if the provider echoes it).
    Bytes after the last blank line are yielded as a final event at EOF.
    """
    buffer = b""
    async for chunk in chunks:
        buffer = buffer + chunk if buffer else chunk
        start = 0
        while True:
            match = EVENT_END.search(buffer, start)
            if match is None:
                break
            yield _event(buffer[start : match.end()], redact)
            start = match.end()
        buffer = buffer[start:]
    if buffer:
        yield _event(buffer, redact)


def _event(raw: bytes, redact: bytes | None) -> SSEEvent:
    if redact is not None and raw.find(redact) != -1:  # (not `in`: see Upstream.redact)
        raw = raw.replace(redact, b"[redacted]")
    return SSEEvent(raw)
