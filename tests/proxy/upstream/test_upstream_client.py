"""The provider-hop HTTP/1.1 client against raw loopback servers that write exact bytes.

Each server is a plain ``asyncio.start_server`` whose handler writes the response
bytes itself, so a test controls the framing (Content-Length, chunked,
close-delimited, gzip), the pauses and the connection drops, and it counts the
connections it accepted, holds at once and saw the client close.
"""

from __future__ import annotations

import asyncio
import gc
import gzip
import random
import socket
import ssl
import struct
import time
import zlib
from collections.abc import Awaitable, Callable

import pytest

from proxy.upstream.client import HIGH_WATER, MAX_HEAD_BYTES, ConnectionPool, UpstreamConnectionError, UpstreamResponse, encode_head
from tests.support import free_port, self_signed_certificate, until

Handler = Callable[["RawServer", asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class RawServer:
    """A loopback server whose handler writes raw bytes; it counts its connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.accepted = 0  # connections accepted so far
        self.active = 0  # connections open right now
        self.max_active = 0
        self.eofs = 0  # connections on which the client closed its side
        self.requests: list[bytes] = []  # every request, head and body, as received
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self, tls: ssl.SSLContext | None = None) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        return self

    async def close(self) -> None:
        self.server.close()
        for writer in self._writers:
            writer.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())
        self._writers.append(writer)
        index = self.accepted
        self.accepted += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        self._notify()
        try:
            await self.handler(self, reader, writer, index)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.active -= 1
            writer.close()
            self._notify()

    def _notify(self) -> None:
        self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 2.0) -> None:
        """Wait (event-driven) until the server's counters satisfy ``predicate``."""
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def read_request(self, reader: asyncio.StreamReader) -> bytes | None:
        """One request (head and body), or None when the client closed the connection."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            self._saw_eof()
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        request = head + await reader.readexactly(length)
        self.requests.append(request)
        self._notify()
        return request

    async def until_eof(self, reader: asyncio.StreamReader) -> None:
        """Hold the connection open until the client closes it."""
        while await reader.read(65536):
            pass
        self._saw_eof()

    def _saw_eof(self) -> None:
        self.eofs += 1
        self._notify()


def reply(body: bytes, *headers: str, status: str = "200 OK", version: str = "HTTP/1.1") -> bytes:
    """A response with a Content-Length body."""
    head = f"{version} {status}\r\nContent-Length: {len(body)}\r\n" + "".join(f"{h}\r\n" for h in headers)
    return head.encode() + b"\r\n" + body


def chunked(*parts: bytes, headers: tuple[str, ...] = ()) -> bytes:
    """A chunked response carrying ``parts`` as its chunks."""
    head = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n"
    return head.encode() + b"".join(encode_chunk(part) for part in parts) + b"0\r\n\r\n"


def encode_chunk(part: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(part), part)


def keepalive(respond: Callable[[bytes, int], bytes]) -> Handler:
    """A handler answering every request on its connection with ``respond(request, n)``."""

    async def handler(server: RawServer, reader, writer, index: int) -> None:
        n = 0
        while (request := await server.read_request(reader)) is not None:
            writer.write(respond(request, n))
            await writer.drain()
            n += 1

    return handler


def body_of(request: bytes) -> bytes:
    return request.partition(b"\r\n\r\n")[2]


async def post(
    pool: ConnectionPool,
    path: str = "/chat/completions",
    body: bytes = b'{"q": 1}',
    headers: list[tuple[str, str]] | tuple = (),
    header: float = 2.0,
    idle: float = 2.0,
    total: float = 5.0,
) -> UpstreamResponse:
    return await pool.post(path, headers, body, header, idle, total)


@pytest.fixture
async def serve():
    """Start raw servers from handlers; all are closed after the test."""
    servers: list[RawServer] = []

    async def start(handler: Handler) -> RawServer:
        server = await RawServer(handler).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def pools():
    """Make connection pools; all are closed after the test."""
    made: list[ConnectionPool] = []

    def make(url: str, limit: int = 10, connect_timeout: float = 2.0, **kwargs) -> ConnectionPool:
        pool = ConnectionPool(url, limit, connect_timeout, **kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close()


# -- framing, status and headers -------------------------------------------------------


async def test_content_length_body_status_and_headers(serve, pools):
    body = '{"id": "cmpl-1", "text": "héllo"}'.encode()

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(
            reply(body, "Content-Type: Application/JSON; charset=utf-8", "X-Request-Id: abc", "set-cookie: a=1", "Set-Cookie: b=2", status="201 Created")
        )
        await server.until_eof(reader)

    server = await serve(handler)
    response = await post(pools(server.url))
    assert response.status == 201
    assert response.headers["x-request-id"] == response.headers["X-REQUEST-ID"] == "abc"
    assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]
    assert response.headers["content-length"] == str(len(body))
    assert response.content_type == "application/json"
    assert await response.read() == body
    response.release()


async def test_chunked_body_of_several_chunks(serve, pools):
    parts = [b"data: one\n\n", b"x" * 1000, b"", b"data: [DONE]\n\n"]

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n")
        for part in parts:
            if part:
                writer.write(encode_chunk(part))
                await writer.drain()
        writer.write(b"0\r\n\r\n")
        await server.until_eof(reader)

    server = await serve(handler)
    response = await post(pools(server.url))
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    assert await response.read() == b"".join(parts)
    response.release()


async def test_close_delimited_body(serve, pools):
    """No Content-Length, not chunked: the body is everything until the server closes."""

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nfirst part, ")
        await writer.drain()
        writer.write(b"second part")
        await writer.drain()
        writer.close()

    server = await serve(handler)
    response = await post(pools(server.url))
    assert response.content_type == "text/plain"
    assert response.headers.get("Content-Length") is None
    assert await response.read() == b"first part, second part"
    response.release()


async def test_informational_response_is_skipped(serve, pools):
    """A 100 Continue before the real response is not the response."""

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + reply(b"ok", "X-Final: yes"))
        await server.until_eof(reader)

    server = await serve(handler)
    response = await post(pools(server.url))
    assert response.status == 200
    assert response.headers["x-final"] == "yes"
    assert await response.read() == b"ok"
    response.release()


# -- keep-alive --------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(serve, pools):
    def respond(request: bytes, n: int) -> bytes:
        text = b"reply %d to %s" % (n, body_of(request))
        return reply(text) if n % 2 == 0 else chunked(text[:5], text[5:])

    server = await serve(keepalive(respond))
    pool = pools(server.url)
    for n in range(6):
        response = await post(pool, body=b"req-%d" % n)
        if n % 3 == 2:
            data = b"".join([chunk async for chunk in response.chunks()])
        else:
            data = await response.read()
        assert data == b"reply %d to req-%d" % (n, n)
        response.release()
    assert server.accepted == 1
    assert len(server.requests) == 6


@pytest.mark.parametrize("how", ["release", "close"])
async def test_a_finished_response_leaves_nothing_for_the_cyclic_collector(serve, pools, how):
    """Released or closed, a response and its parser are freed by reference counting.

    They refer to each other (the parser calls the response back); left as a
    cycle, every request's response, parser, headers and buffers waited for the
    collector, whose runs were a measurable cost per request (bench/RESULTS.md).
    """
    server = await serve(keepalive(lambda request, n: reply(b"a reply")))
    pool = pools(server.url)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)  # what the collector finds unreachable stays in gc.garbage
    try:
        for _ in range(5):
            response = await post(pool)
            assert await response.read() == b"a reply"
            getattr(response, how)()
            del response
        gc.collect()
        left = [type(obj).__name__ for obj in gc.garbage if isinstance(obj, UpstreamResponse) or "Parser" in type(obj).__name__]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


@pytest.mark.parametrize(
    "kind",
    ["connection-close", "http/1.0", "close-delimited"],
)
async def test_response_that_ends_the_connection_is_not_reused(serve, pools, kind):
    """`Connection: close`, an HTTP/1.0 reply or a close-delimited body: the next request opens a new connection."""

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        if kind == "connection-close":
            writer.write(reply(b"bye", "Connection: close"))
        elif kind == "http/1.0":
            writer.write(reply(b"bye", version="HTTP/1.0"))
        else:
            writer.write(b"HTTP/1.1 200 OK\r\n\r\nbye")
            writer.close()
            return
        await server.until_eof(reader)  # the server would keep it open: the client must not

    server = await serve(handler)
    pool = pools(server.url)
    for _ in range(2):
        response = await post(pool)
        assert await response.read() == b"bye"
        response.release()
    assert server.accepted == 2
    if kind != "close-delimited":
        await server.wait_for(lambda: server.eofs >= 1)  # the client closed the first one


@pytest.mark.parametrize("how", ["close", "release"])
async def test_response_abandoned_early_closes_its_connection(serve, pools, how):
    """close() (or release() before the end) closes the connection: the server sees EOF; the next request opens a new one."""

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        if index == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100)
            await server.until_eof(reader)
        else:
            writer.write(reply(b"fresh"))
            await server.until_eof(reader)

    server = await serve(handler)
    pool = pools(server.url)
    response = await post(pool)
    chunks = response.chunks()
    assert await anext(chunks) == b"a" * 100
    getattr(response, how)()
    await server.wait_for(lambda: server.eofs == 1)
    response = await post(pool)
    assert await response.read() == b"fresh"
    response.release()
    assert server.accepted == 2


async def test_connection_closed_by_server_while_idle_is_not_reused(serve, pools):
    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(reply(b"conn %d" % index))
        await writer.drain()
        if index == 0:
            writer.close()  # the provider's keep-alive expired
            return
        await server.until_eof(reader)

    server = await serve(handler)
    pool = pools(server.url)
    response = await post(pool)
    assert await response.read() == b"conn 0"
    response.release()
    await server.wait_for(lambda: server.active == 0)
    await until(lambda: not pool._idle)  # the client saw the FIN and dropped the idle connection
    response = await post(pool)
    assert await response.read() == b"conn 1"
    response.release()
    assert server.accepted == 2


async def test_idle_connection_older_than_keepalive_is_not_reused(serve, pools):
    server = await serve(keepalive(lambda request, n: reply(b"ok")))
    pool = pools(server.url, keepalive=0.0)
    for _ in range(2):
        response = await post(pool)
        assert await response.read() == b"ok"
        response.release()
    assert server.accepted == 2
    await server.wait_for(lambda: server.eofs >= 1)


async def test_pool_limit_holds_under_concurrency(serve, pools):
    """200 concurrent requests through limit=4: all answered correctly, never more than 4 connections."""

    async def handler(server, reader, writer, index):
        while (request := await server.read_request(reader)) is not None:
            await asyncio.sleep(0.002)
            writer.write(reply(b"echo:" + body_of(request)))
            await writer.drain()

    server = await serve(handler)
    pool = pools(server.url, limit=4)

    async def one(n: int) -> bytes:
        response = await post(pool, body=b"%d" % n)
        try:
            return await response.read()
        finally:
            response.release()

    results = await asyncio.gather(*(one(n) for n in range(200)))
    assert results == [b"echo:%d" % n for n in range(200)]
    assert server.max_active <= 4
    assert server.accepted == 4
    assert len(server.requests) == 200


# -- timeouts ------------------------------------------------------------------------------


async def test_no_headers_within_header_timeout(serve, pools):
    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        await server.until_eof(reader)  # never answers

    server = await serve(handler)
    pool = pools(server.url, limit=1)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no response headers"):
        await post(pool, header=0.2, idle=5.0)
    assert 0.15 <= time.monotonic() - started < 1.0
    await server.wait_for(lambda: server.eofs == 1)  # the connection was closed
    assert pool._open == 0


@pytest.mark.parametrize(
    ("first", "then"),
    [(b"HTTP/1.1 200 OK\r\n", b"X-Slow: y\r\n"), (b"", b"HTTP/1.1 100 Continue\r\n\r\n")],
    ids=["header-lines", "informational-responses"],
)
async def test_header_timeout_counts_from_the_request_not_from_the_last_byte(serve, pools, first, then):
    """A provider that keeps sending header bytes (or 1xx responses) still times out at the header deadline."""

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(first)
        while True:  # each gap is far shorter than the header timeout
            writer.write(then)
            await writer.drain()
            await asyncio.sleep(0.02)

    server = await serve(handler)
    pool = pools(server.url, limit=1)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="no response headers within 0.3 s"):
        await post(pool, header=0.3, idle=5.0, total=10.0)
    assert 0.25 <= time.monotonic() - started < 2.0
    assert pool._open == 0


async def test_body_gap_longer_than_idle_timeout(serve, pools):
    """Headers and part of the body, then silence: TimeoutError after idle, even with a longer header timeout."""

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        await server.until_eof(reader)

    server = await serve(handler)
    response = await post(pools(server.url), header=5.0, idle=0.2, total=10.0)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="sent nothing more"):
        await response.read()
    assert time.monotonic() - started < 1.0
    await server.wait_for(lambda: server.eofs == 1)


async def test_total_timeout_cuts_a_trickling_body(serve, pools):
    """Each gap is well under idle, but the whole request is over total."""

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            writer.write(b"y")
            await writer.drain()
            await asyncio.sleep(0.03)

    server = await serve(handler)
    started = time.monotonic()
    response = await post(pools(server.url), header=1.0, idle=0.5, total=0.4)
    received = b""
    with pytest.raises(TimeoutError, match="total"):
        async for chunk in response.chunks():
            received += chunk
    assert 0.35 <= time.monotonic() - started < 1.0
    assert 0 < len(received) < 100


async def test_waiting_for_a_pool_slot_is_bounded_by_connect_timeout(serve, pools):
    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        if index == 0:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")  # holds the only slot
            await server.until_eof(reader)
        else:
            writer.write(reply(b"next"))
            await server.until_eof(reader)

    server = await serve(handler)
    pool = pools(server.url, limit=1, connect_timeout=0.2)
    busy = await post(pool)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await post(pool)
    assert 0.15 <= time.monotonic() - started < 1.0
    assert server.accepted == 1
    busy.close()
    response = await post(pool)  # the timed-out waiter left nothing behind
    assert await response.read() == b"next"
    response.release()


# -- errors --------------------------------------------------------------------------------


async def test_connection_refused(pools):
    pool = pools(f"http://127.0.0.1:{free_port()}", limit=1)
    for _ in range(2):  # the failed connect gave its slot back
        with pytest.raises(UpstreamConnectionError, match="could not connect"):
            await post(pool)
    assert pool._open == 0


@pytest.mark.parametrize(
    "sent",
    [
        b"HTTP/1.1 200 OK\r\nContent-Len",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"z" * 40,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["mid-head", "content-length-short", "chunked-mid-body", "chunked-no-body"],
)
async def test_server_drops_the_connection_mid_response(serve, pools, sent):
    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(sent)
        await writer.drain()
        writer.close()

    server = await serve(handler)
    pool = pools(server.url, limit=1)
    with pytest.raises(UpstreamConnectionError, match="closed the connection"):
        response = await post(pool)
        await response.read()
    await until(lambda: pool._open == 0)


@pytest.mark.parametrize(
    ("sent", "message"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "malformed"),
        (b"HTTP/1.1 OK\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", "malformed"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "malformed"),
        (b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n", "malformed"),
        (b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", "switch protocols"),
    ],
    ids=["not-http", "no-status-code", "bad-length", "two-lengths", "bad-chunk-size", "bad-header-line", "upgrade"],
)
async def test_malformed_response(serve, pools, sent, message):
    """Bytes that are not a valid response fail the request (the server keeps the connection open)."""

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(sent)
        await server.until_eof(reader)

    server = await serve(handler)
    pool = pools(server.url, limit=1)
    with pytest.raises(UpstreamConnectionError, match=message):
        response = await post(pool)
        await response.read()
    await server.wait_for(lambda: server.eofs == 1)  # the untrustworthy connection was closed
    assert pool._open == 0


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * (MAX_HEAD_BYTES + 1),  # one header, never finished
        b"HTTP/1.1 200 OK\r\n" + b"X-Many: 0123456789abcdef\r\n" * (MAX_HEAD_BYTES // 26 + 10),
        b"HTTP/1.1 100 Continue\r\nX-Pad: " + b"p" * 1000 + b"\r\n\r\n",
    ],
    ids=["one-endless-header", "many-headers", "informational-responses"],
)
async def test_response_heads_over_the_bound_are_refused(serve, pools, head):
    """Header bytes past MAX_HEAD_BYTES fail the request at once, not at the header deadline."""

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        if head.startswith(b"HTTP/1.1 100"):
            for _ in range(MAX_HEAD_BYTES // len(head) + 2):  # 1xx after 1xx, each small
                writer.write(head)
                await writer.drain()
        else:
            writer.write(head)
        await server.until_eof(reader)

    server = await serve(handler)
    pool = pools(server.url, limit=1)
    started = time.monotonic()
    with pytest.raises(UpstreamConnectionError, match="response headers over 64 KiB"):
        await post(pool, header=10.0, idle=10.0, total=10.0)
    assert time.monotonic() - started < 5.0
    await server.wait_for(lambda: server.eofs == 1)  # the connection was closed
    assert pool._open == 0


async def test_a_large_head_under_the_bound_with_its_body_in_the_same_read(serve, pools):
    """Body bytes arriving with the end of the headers do not count against the header bound."""
    padding = [f"X-Pad-{i}: {'v' * 200}" for i in range((MAX_HEAD_BYTES - 4096) // 212)]
    body = b"b" * (3 * MAX_HEAD_BYTES)

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(reply(body, *padding))  # one write: head and body together
        await server.until_eof(reader)

    server = await serve(handler)
    response = await post(pools(server.url))
    assert response.status == 200
    assert response.headers["X-Pad-0"] == "v" * 200
    assert await response.read() == body
    response.release()


@pytest.mark.parametrize(
    ("headers", "body", "message"),
    [
        (("Content-Encoding: br",), b"\x1b\x03\x00", "unsupported Content-Encoding"),
        (("Content-Encoding: gzip",), b"definitely not gzip", "does not decompress"),
    ],
    ids=["br", "bad-gzip"],
)
async def test_undecodable_body(serve, pools, headers, body, message):
    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(reply(body, *headers))
        await server.until_eof(reader)

    server = await serve(handler)
    with pytest.raises(UpstreamConnectionError, match=message):
        response = await post(pools(server.url))
        await response.read()
    await server.wait_for(lambda: server.eofs == 1)


# -- decoding, streaming and back-pressure ---------------------------------------------------

PAYLOAD = b"".join(b'data: {"n": %d, "text": "%s"}\n\n' % (n, b"abc" * (n % 7)) for n in range(3000))


@pytest.mark.parametrize("encoding", ["gzip", "x-gzip", "deflate"])
@pytest.mark.parametrize("mode", ["read", "chunks"])
async def test_compressed_body_is_decoded(serve, pools, encoding, mode):
    compressed = gzip.compress(PAYLOAD) if "gzip" in encoding else zlib.compress(PAYLOAD)
    pieces = [compressed[i : i + 97] for i in range(0, len(compressed), 97)]

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(chunked(*pieces, headers=(f"Content-Encoding: {encoding}",)))
        await server.until_eof(reader)

    server = await serve(handler)
    response = await post(pools(server.url))
    if mode == "read":
        data = await response.read()
    else:
        data = b"".join([chunk async for chunk in response.chunks()])
    assert data == PAYLOAD
    response.release()


BIG = random.Random(7).randbytes(4 * 1024 * 1024)


def big_handler():
    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(reply(BIG))
        await writer.drain()
        await server.until_eof(reader)

    return handler


async def test_back_pressure_pauses_reading_for_a_slow_consumer(serve, pools):
    """A 4 MB body: reading pauses at HIGH_WATER; the paused time is no provider gap; the body arrives byte-exact."""
    server = await serve(big_handler())
    response = await post(pools(server.url), idle=0.2, total=10.0)
    await until(lambda: response._buffered >= HIGH_WATER)
    await asyncio.sleep(0.5)  # the consumer lags well past idle: no timeout while paused
    assert not response._conn.transport.is_reading()
    assert response._buffered < HIGH_WATER + 512 * 1024  # it stopped reading, not buffered the lot
    received = []
    async for chunk in response.chunks():
        received.append(chunk)
        await asyncio.sleep(0.005)
    assert b"".join(received) == BIG
    assert len(received) > 4  # delivered in pieces, not all at once
    response.release()


async def test_read_of_a_body_larger_than_high_water(serve, pools):
    """read() (no consumer between reads) still gets a body well over HIGH_WATER."""
    server = await serve(big_handler())
    response = await post(pools(server.url), idle=1.0, total=3.0)
    assert await response.read() == BIG
    response.release()


async def test_chunks_yield_data_as_it_arrives(serve, pools):
    go_on = asyncio.Event()

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + encode_chunk(b"part one"))
        await writer.drain()
        await go_on.wait()
        writer.write(encode_chunk(b"part two") + b"0\r\n\r\n")
        await server.until_eof(reader)

    server = await serve(handler)
    response = await post(pools(server.url))
    chunks = response.chunks()
    assert await anext(chunks) == b"part one"  # before the server may send more
    go_on.set()
    assert [chunk async for chunk in chunks] == [b"part two"]
    response.release()


# -- the request -----------------------------------------------------------------------------


def test_encode_head_drops_header_lines_with_cr_or_lf():
    head = encode_head(
        "/v1/chat/completions",
        "api.example.com",
        [("Authorization", "Bearer k"), ("X-Evil", "a\r\nInjected: yes"), ("X-Lf", "a\nb"), ("X-Cr", "a\rb"), ("Bad\r\nName", "v"), ("X-Ok", "é")],
        12,
    )
    assert head == (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: api.example.com\r\nContent-Length: 12\r\n"
        "Accept-Encoding: identity\r\nAuthorization: Bearer k\r\nX-Ok: é\r\n\r\n"
    ).encode()


@pytest.mark.parametrize(
    ("url", "host_header", "base_path"),
    [
        ("http://example.com", "example.com", ""),
        ("http://example.com:80/v1/", "example.com", "/v1"),
        ("https://example.com/v1", "example.com", "/v1"),
        ("https://example.com:8443/api/v1", "example.com:8443", "/api/v1"),
        ("http://example.com:443", "example.com:443", ""),
        ("http://[::1]:8080/v1", "[::1]:8080", "/v1"),
    ],
)
async def test_pool_host_header_and_base_path(url, host_header, base_path):
    pool = ConnectionPool(url, 1, 1.0)
    assert (pool.host_header, pool.base_path) == (host_header, base_path)
    await pool.close()


async def test_a_provider_named_by_hostname_is_looked_up_once_for_a_burst_of_connections(serve, pools):
    """New connections go through the pool's Connector: one shared lookup, then the cache."""
    server = await serve(keepalive(lambda request, n: reply(b"ok")))
    pool = pools(f"http://localhost:{server.port}", limit=8)
    assert pool.host_header == f"localhost:{server.port}"
    loop = asyncio.get_running_loop()
    lookups = []

    async def counted_getaddrinfo(*args, **kwargs):  # the loop's real resolver, counted
        lookups.append(args[0])
        return await loop.getaddrinfo(*args, **kwargs)

    pool.connector._resolve = counted_getaddrinfo
    responses = await asyncio.gather(*(post(pool) for _ in range(8)))
    for response in responses:
        assert await response.read() == b"ok"
        response.release()
    assert server.accepted == 8 and lookups == ["localhost"]


def test_pool_refuses_non_http_urls():
    with pytest.raises(ValueError):
        ConnectionPool("ftp://example.com", 1, 1.0)


@pytest.mark.parametrize("size", [20, 200_000], ids=["small-body", "large-body"])
async def test_request_on_the_wire(serve, pools, size):
    """Target is base path + path, Host carries the port, CR/LF headers are dropped, the body is exact."""
    server = await serve(keepalive(lambda request, n: reply(b"ok")))
    payload = bytes(range(256)) * (size // 256) + b"!" * (size % 256)
    pool = pools(server.url + "/v1/")
    response = await post(pool, "/chat/completions", payload, [("Authorization", "Bearer sk-x"), ("X-Evil", "1\r\nInjected: yes")])
    assert await response.read() == b"ok"
    response.release()
    (request,) = server.requests
    head, _, body = request.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/chat/completions HTTP/1.1"
    assert b"Host: 127.0.0.1:%d" % server.port in lines
    assert b"Content-Length: %d" % size in lines
    assert b"Authorization: Bearer sk-x" in lines
    assert not any(b"Injected" in line or b"X-Evil" in line for line in lines)
    assert body == payload


# -- cancellation ----------------------------------------------------------------------------


async def test_cancelled_post_closes_its_connection_and_frees_the_slot(serve, pools):
    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        if index == 0:
            await server.until_eof(reader)  # headers never come
        else:
            writer.write(reply(b"after"))
            await server.until_eof(reader)

    server = await serve(handler)
    pool = pools(server.url, limit=1, connect_timeout=0.5)
    task = asyncio.create_task(post(pool, header=10.0, idle=10.0, total=10.0))
    await server.wait_for(lambda: len(server.requests) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await server.wait_for(lambda: server.eofs == 1)  # the provider sees the cancellation
    response = await post(pool)
    assert await response.read() == b"after"
    response.release()


async def test_cancelled_wait_for_a_slot_leaves_no_waiter(serve, pools):
    """A request cancelled while queued for a slot does not take the slot that frees up later."""

    async def handler(server, reader, writer, index):
        n = 0
        while await server.read_request(reader) is not None:
            if index == 0 and n == 0:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbu")
            else:
                writer.write(reply(b"free"))
            n += 1

    server = await serve(handler)
    pool = pools(server.url, limit=1, connect_timeout=1.0)
    busy = await post(pool)
    queued = asyncio.create_task(post(pool))
    await until(lambda: len(pool._waiters) == 1)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    assert not pool._waiters
    busy.close()
    response = await post(pool)
    assert await response.read() == b"free"
    response.release()


async def test_cancellation_at_any_point_frees_exactly_one_slot(serve, pools):
    """Cancel post() after 0, 1, 2, … loop iterations (connect, write, header wait): the slot count returns to zero."""

    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        await server.until_eof(reader)

    server = await serve(handler)
    pool = pools(server.url, limit=1, connect_timeout=1.0)
    for spins in range(12):
        task = asyncio.create_task(post(pool, header=10.0, idle=10.0, total=10.0))
        for _ in range(spins):
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: pool._open <= 0 and not pool._idle)
        for _ in range(5):
            await asyncio.sleep(0)  # let any late connection_lost run
        assert pool._open == 0, f"cancelled after {spins} iterations"


# -- TLS ----------------------------------------------------------------------------------


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for 127.0.0.1 and its key."""
    return self_signed_certificate(tmp_path, "127.0.0.1")


async def test_https_provider_with_a_trusted_certificate(certificate, monkeypatch):
    """TLS with certificate and host verification; the connection is kept alive across requests."""
    cert, key = certificate
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the system trust store, as the pool loads it
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    server = await RawServer(keepalive(lambda request, n: reply(b"secure %d" % n))).start(tls)
    pool = ConnectionPool(server.url + "/v1", 4, 2.0)
    try:
        for n in range(3):
            response = await post(pool)
            assert (response.status, await response.read()) == (200, b"secure %d" % n)
            response.release()
        assert server.accepted == 1
        assert server.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    finally:
        await pool.close()
        await server.close()


async def test_https_provider_with_an_untrusted_certificate_is_a_connection_error(certificate):
    cert, key = certificate
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    server = await RawServer(keepalive(lambda request, n: reply(b"never"))).start(tls)
    pool = ConnectionPool(server.url, 1, 2.0)
    try:
        with pytest.raises(UpstreamConnectionError, match="certificate"):
            await post(pool)
        assert pool._open == 0  # the slot came back
    finally:
        await pool.close()
        await server.close()


# -- regressions found in review ------------------------------------------------------------


async def test_a_reset_during_a_close_delimited_body_is_an_error_not_its_end(serve, pools):
    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: {\"partial\": 1}\n\n")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        writer.transport.abort()

    pool = pools((await serve(handler)).url)
    response = await post(pool)
    received = []
    with pytest.raises(UpstreamConnectionError, match="reset"):
        async for chunk in response.chunks():
            received.append(chunk)
    assert b"".join(received) == b'data: {"partial": 1}\n\n'


async def test_a_connect_timeout_is_a_timeout(pools):
    """TCP accepted, TLS never answered: TimeoutError (a 504 upstream), and the slot comes back."""
    async def silent(reader, writer):
        await reader.read()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        pool = pools(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}", 1, 0.2)
        with pytest.raises(TimeoutError):
            await post(pool)
        assert pool._open == 0
    finally:
        server.close()


async def test_waiting_requests_are_served_first_come_first_served(serve, pools):
    """With every slot busy and newcomers arriving as each request finishes, an early waiter is not starved."""
    pool = pools((await serve(keepalive(lambda request, n: reply(b"ok")))).url, 2, 1.0)
    stop = False

    async def one() -> None:
        response = await post(pool)
        await response.read()
        response.release()

    async def busy() -> None:  # a newcomer arrives in the very iteration each request finishes
        while not stop:
            await one()
            asyncio.ensure_future(one())

    load = [asyncio.ensure_future(busy()) for _ in range(2)]
    await asyncio.sleep(0.05)
    started = asyncio.get_running_loop().time()
    try:
        await one()  # queued behind the two busy slots, competing with the newcomers
        assert asyncio.get_running_loop().time() - started < 0.5
    finally:
        stop = True
        await asyncio.gather(*load)
        await until(lambda: not pool._waiters and pool._open <= 2)


async def test_closing_a_response_wakes_a_reader_waiting_on_it(serve, pools):
    async def handler(server, reader, writer, index):
        await server.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
        await writer.drain()
        await server.until_eof(reader)

    pool = pools((await serve(handler)).url)
    response = await post(pool)
    reading = asyncio.ensure_future(response.read())
    await asyncio.sleep(0.05)
    response.close()
    with pytest.raises(UpstreamConnectionError):
        await asyncio.wait_for(reading, 1)
