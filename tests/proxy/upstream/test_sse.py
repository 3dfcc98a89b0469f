"""Splitting an SSE body into events without changing a byte."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.call import SSEEvent
from proxy.upstream.sse import split_events


async def collect(chunks: list[bytes], redact: bytes | None = None) -> list[SSEEvent]:
    async def source():
        for chunk in chunks:
            yield chunk

    return [event async for event in split_events(source(), redact)]


async def test_events_split_across_reads_are_reassembled():
    body = b'data: {"a":1}\n\ndata: {"b":2}\r\n\r\n: comment\n\nevent: x\ndata: [DONE]\n\n'
    chunks = [body[i : i + 3] for i in range(0, len(body), 3)]
    events = await collect(chunks)
    assert [e.raw for e in events] == [
        b'data: {"a":1}\n\n',
        b'data: {"b":2}\r\n\r\n',
        b": comment\n\n",
        b"event: x\ndata: [DONE]\n\n",
    ]
    assert events[0].json() == {"a": 1}
    assert events[2].data is None
    assert events[3].is_done


async def test_trailing_bytes_without_blank_line_are_kept():
    events = await collect([b"data: 1\n\ndata: 2"])
    assert [e.raw for e in events] == [b"data: 1\n\n", b"data: 2"]


async def test_redaction_replaces_the_secret():
    events = await collect([b'data: {"k":"sk-SECRET"}\n\n'], b"sk-SECRET")
    assert events[0].raw == b'data: {"k":"[redacted]"}\n\n'


def test_multi_line_data_is_joined():
    assert SSEEvent(b"data: a\ndata: b\n\n").data == b"a\nb"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=20), st.data())
def test_concatenated_events_equal_the_input(parts, data):
    import asyncio

    body = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=8)))
    chunks, last = [], 0
    for cut in cuts + [len(body)]:
        chunks.append(body[last:cut])
        last = cut
    events = asyncio.run(collect([c for c in chunks if c]))
    assert b"".join(e.raw for e in events) == body
