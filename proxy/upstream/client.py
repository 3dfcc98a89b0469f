"""A lean HTTP/1.1 client for the provider hop: a keep-alive pool, timeouts, streamed bodies.

Why not aiohttp's ``ClientSession``: on the gateway's hot path it cost ~65 µs of
CPU per request (URL objects, cookie and tracing hooks, the payload registry, a
timer per read), more than all the gateway's own units together; this client
does the same hop for ~20 µs. It does only what the provider hop needs:

- ``POST`` over pooled keep-alive connections, plain or TLS, at most
  ``limit`` connections per pool (further requests wait for one), opened by
  `proxy.upstream.connect.Connector` (cached lookups, Happy Eyeballs);
- through an egress proxy when one is given: an ``https://`` provider in a
  ``CONNECT`` tunnel (TLS inside it), an ``http://`` one with absolute-form
  request targets and ``Proxy-Authorization``. All of it is decided when the
  pool is made: a request through it costs what a direct one does;
- responses parsed by llhttp (``httptools``), content-length, chunked or
  close-delimited, gzip/deflate decoded (the gateway asks for identity);
- the body delivered as it arrives, with back-pressure (reading pauses while
  the consumer lags ``HIGH_WATER`` bytes behind);
- ``upstreams.*.timeouts``: connect (including the wait for a pool slot), the
  time from sending the request to the end of the response headers, the
  largest gap between two body reads, and the whole request. One timer per
  request keeps all of them: it is armed for the nearest deadline and, when it
  fires early (data came in meanwhile), moves itself on instead of being
  cancelled and re-created on every read;
- response heads (informational responses included) of at most
  ``MAX_HEAD_BYTES``: llhttp buffers a header until it is complete, so a
  provider sending endless header bytes would otherwise grow memory for as
  long as the header deadline lasts.

A connection goes back to the pool only when its response was read to the
end and the provider did not ask to close it; a response closed early (client
gone, timeout) closes its connection, so the provider sees the cancellation.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterable
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.upstream.connect import Connector, ProxyError
from proxy.upstream.egress import Proxy

HIGH_WATER = 256 * 1024  # buffered body bytes at which reading pauses
LOW_WATER = 64 * 1024  # ... and below which it resumes
KEEPALIVE_SECONDS = 15.0  # an idle pooled connection older than this is not reused
MAX_HEAD_BYTES = 64 * 1024  # response bytes before the end of the headers (aiohttp allows 8 KiB per line)


class UpstreamConnectionError(Exception):
    """The provider could not be reached, broke the connection, or sent no valid HTTP."""


class UpstreamSetupError(UpstreamConnectionError):
    """The way to the provider failed, not the provider: the egress proxy, or the TLS handshake.

    Its message is the operator's to act on (it names the proxy ``host:port``,
    never its credentials), so the router passes it on in the error.
    """


class UpstreamResponse:
    """One response: status and headers once they arrived, then the body as it comes.

    Read it with `read` (whole body) or `chunks` (as it arrives), then `release`
    it; `close` abandons it (and its connection) at any point.
    """

    __slots__ = (
        "status",
        "headers",
        "_conn",
        "_loop",
        "_parser",
        "_raw_headers",
        "_header_waiter",
        "_body_waiter",
        "_buffer",
        "_buffered",
        "_decoder",
        "_until_eof",
        "_keep_alive",
        "_complete",
        "_error",
        "_done",
        "_paused",
        "_last_read",
        "_head_bytes",
        "_header_limit",
        "_header_deadline",
        "_idle",
        "_deadline",
        "_timer",
    )

    def __init__(self, conn: _Connection, header_limit: float, idle: float, total: float) -> None:
        loop = conn.loop
        now = loop.time()
        self.status = 0
        self.headers: CIMultiDictProxy[str] = _NO_HEADERS
        self._conn = conn
        self._loop = loop
        # The parser holds this response (its callbacks) and this response the
        # parser: `release`/`close` cut the cycle, so both are freed by reference
        # counting at once instead of by the cyclic collector (GC runs are a
        # measurable cost per request: bench/RESULTS.md).
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._header_waiter: asyncio.Future[None] | None = loop.create_future()
        self._body_waiter: asyncio.Future[None] | None = None
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._decoder: zlib._Decompress | None = None
        self._until_eof = False  # no length, not chunked: the body ends when the connection does
        self._keep_alive = False  # the provider lets the connection carry another request
        self._complete = False  # the whole message arrived
        self._error: BaseException | None = None
        self._done = False  # released or closed
        self._paused = False
        self._last_read = now
        self._head_bytes = 0  # received while the headers were not complete
        self._header_limit = header_limit
        # From the request, not from the last byte: a provider trickling header
        # bytes (or 1xx responses) must not hold the request open until `total`.
        self._header_deadline = now + header_limit
        self._idle = idle
        self._deadline = now + total
        self._timer: asyncio.TimerHandle | None = loop.call_at(min(self._deadline, self._header_deadline), self._on_timer)

    # -- consumer side -----------------------------------------------------------
    @property
    def content_type(self) -> str:
        value = self.headers.get("Content-Type", "")
        return value.partition(";")[0].strip().lower()

    async def _wait_headers(self) -> None:
        waiter = self._header_waiter
        if waiter is not None:
            try:
                await waiter
            except BaseException:
                self.close()
                raise

    async def read(self) -> bytes:
        """The whole body (decoded); raises `TimeoutError` or `UpstreamConnectionError`."""
        parts: list[bytes] = []
        while not self._complete:
            if self._error is not None:
                raise self._error
            if self._paused:
                parts.append(self._take())  # reading paused at HIGH_WATER: take the buffer so it resumes
            await self._wait_body()
        if self._error is not None:
            raise self._error
        data = self._take()
        if parts:
            parts.append(data)
            data = b"".join(parts)
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, in the pieces the network delivered (decoded)."""
        while True:
            if self._buffer:
                yield self._take()
                continue
            if self._complete:
                return
            if self._error is not None:
                raise self._error
            await self._wait_body()

    def release(self) -> None:
        """Done with this response: its connection goes back to the pool if it can be reused."""
        if not self._complete:
            self.close()  # released early: the same as abandoned
            return
        if self._done:
            return
        self._done = True
        self._parser = None
        self._stop_timer()
        if self._error is None and self._keep_alive:
            self._conn.pool._put_back(self._conn)
        else:
            self._conn.discard()

    def close(self) -> None:
        """Abandon the response: its connection is closed, so the provider sees it."""
        if self._done:
            return
        self._done = True
        self._parser = None
        if not self._complete:
            # A reader still waiting (another task) gets an error, not a hang.
            self._fail(UpstreamConnectionError("the response was closed"))
        self._stop_timer()
        self._conn.discard()

    def _take(self) -> bytes:
        buffer = self._buffer
        data = buffer[0] if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._buffered = 0
        if self._paused and not self._done:
            self._paused = False
            self._last_read = self._loop.time()  # the wait was the consumer's, not the provider's
            self._conn.transport.resume_reading()
        return data

    async def _wait_body(self) -> None:
        waiter = self._body_waiter = self._loop.create_future()
        try:
            await waiter
        except BaseException:
            self.close()
            raise
        finally:
            self._body_waiter = None

    def _wake(self) -> None:
        waiter = self._header_waiter
        if waiter is not None and self.status:
            self._header_waiter = None
            if not waiter.done():
                waiter.set_result(None)
        waiter = self._body_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: BaseException) -> None:
        if self._complete or self._error is not None:
            return
        self._error = error
        self._stop_timer()
        for waiter in (self._header_waiter, self._body_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
        self._header_waiter = None
        self._conn.discard()

    # -- timeouts ----------------------------------------------------------------
    def _on_timer(self) -> None:
        self._timer = None
        if self._complete or self._error is not None or self._done:
            return
        now = self._loop.time()
        if now >= self._deadline:
            self._fail(TimeoutError("the provider request exceeded its total time"))
            return
        if not self.status:
            if now >= self._header_deadline:
                self._fail(TimeoutError(f"the provider sent no response headers within {self._header_limit:g} s"))
                return
            self._timer = self._loop.call_at(min(self._deadline, self._header_deadline), self._on_timer)
            return
        if self._paused:
            self._last_read = now  # reading is paused for the consumer: not the provider's gap
        elif now - self._last_read >= self._idle:
            self._fail(TimeoutError(f"the provider sent nothing more within {self._idle:g} s"))
            return
        self._timer = self._loop.call_at(min(self._deadline, self._last_read + self._idle), self._on_timer)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- connection side (called by _Connection and the parser) ------------------
    def _feed(self, data: bytes) -> None:
        parser = self._parser
        if parser is None:
            return  # released or closed: nothing reads this response any more
        self._last_read = self._loop.time()
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamConnectionError("the provider tried to switch protocols"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamConnectionError(f"the provider sent malformed HTTP ({exc})"))
            return
        if not self.status and self._error is None:
            # Counted after parsing, so a read that completes the headers (and
            # carries body bytes) is never refused; the bound is this plus one read.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._fail(UpstreamConnectionError(f"the provider sent response headers over {MAX_HEAD_BYTES // 1024} KiB"))

    def _connection_lost(self, exc: BaseException | None) -> None:
        if self._complete or self._error is not None:
            return
        if self._until_eof and self.status and exc is None:
            self.on_message_complete()  # a close-delimited body ends with a clean close, not a reset
            return
        if isinstance(exc, ssl.SSLError):  # e.g. TLS 1.3: a refused client certificate shows on the first read
            self._fail(UpstreamSetupError(f"TLS with the provider failed ({exc.reason or exc})"))
            return
        reason = f": {exc}" if exc else ""
        self._fail(UpstreamConnectionError(f"the provider closed the connection{reason}"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # called by the parser itself, while it reads
        status = parser.get_status_code()
        if self._error is not None:
            return
        if 100 <= status < 200:
            self._raw_headers = []  # informational: the real response follows
            return
        headers: CIMultiDict[str] = CIMultiDict()
        for name, value in self._raw_headers:
            headers.add(name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
        self._raw_headers = []
        self.headers = CIMultiDictProxy(headers)
        encoding = headers.get("Content-Encoding", "identity").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = zlib.decompressobj()
        elif encoding not in ("identity", ""):
            self._fail(UpstreamConnectionError(f"the provider sent an unsupported Content-Encoding ({encoding})"))
            return
        self._until_eof = "Content-Length" not in headers and "chunked" not in headers.get("Transfer-Encoding", "").lower()
        # Read here: llhttp resets its keep-alive flag once the message is complete.
        self._keep_alive = parser.should_keep_alive() and not self._until_eof
        self.status = status
        if self._last_read + self._idle < self._header_deadline and self._timer is not None:
            # The timer is armed for the header deadline and only ever moves
            # later: bring it forward to the (nearer) first idle deadline.
            self._timer.cancel()
            self._timer = self._loop.call_at(min(self._deadline, self._last_read + self._idle), self._on_timer)
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self._error is not None:
            return
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error:
                self._fail(UpstreamConnectionError("the provider sent a body that does not decompress"))
                return
            if not body:
                return
        self._buffer.append(body)
        self._buffered += len(body)
        if self._buffered >= HIGH_WATER and not self._paused:
            self._paused = True
            self._conn.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.status or self._error is not None:
            return  # the end of an informational response
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self._buffer.append(rest)
        self._complete = True
        self._stop_timer()
        self._conn.response = None
        self._wake()


_NO_HEADERS: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict())


class _Connection(asyncio.Protocol):
    """One TCP (or TLS) connection of a pool; carries one response at a time."""

    __slots__ = ("pool", "loop", "transport", "response", "idle_since", "closed", "counted")

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.response: UpstreamResponse | None = None
        self.idle_since = 0.0
        self.closed = False
        self.counted = True  # holds one of the pool's `limit` slots

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:
            # Bytes nobody asked for (or after the end of a response): the
            # connection's framing can no longer be trusted.
            self.discard()
            return
        response._feed(data)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: BaseException | None) -> None:
        self.closed = True
        self.pool._forget(self)
        response, self.response = self.response, None
        if response is not None:
            response._connection_lost(exc)

    def discard(self) -> None:
        """Close the connection and give its pool slot back."""
        self.closed = True
        self.response = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.pool._forget(self)


class ConnectionPool:
    """Keep-alive connections to one provider origin (scheme, host and port of ``url``)."""

    def __init__(
        self,
        url: str,
        limit: int,
        connect_timeout: float,
        keepalive: float = KEEPALIVE_SECONDS,
        *,
        ssl_context: ssl.SSLContext | None = None,
        server_name: str | None = None,
        proxy: Proxy | None = None,
        dns_ttl: float = 10.0,
        stagger: float = 0.25,
    ) -> None:
        """`ssl_context` for an https URL (default: the system's); `proxy`: the egress proxy, if any."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        self.loop = asyncio.get_running_loop()
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = (parts.scheme == "https" and self.port == 443) or (parts.scheme == "http" and self.port == 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.base_path = parts.path.rstrip("/")
        self.proxy = proxy
        # Added to every request head (an http:// provider's proxy credentials); empty: nothing added.
        self.extra_head = ""
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl_context or ssl.create_default_context()
        if proxy is None:
            self.connector = Connector(
                self.host, self.port, ssl=self.ssl, server_hostname=server_name, ttl=dns_ttl, stagger=stagger
            )
        elif self.ssl is not None:  # TLS end to end, inside a CONNECT tunnel
            self.connector = Connector(
                proxy.host,
                proxy.port,
                ssl=self.ssl,
                server_hostname=server_name or self.host,
                ttl=dns_ttl,
                stagger=stagger,
                tunnel=(self.host, self.port),
                proxy_authorization=proxy.authorization,
            )
        else:  # plain HTTP through the proxy: absolute-form request targets (RFC 9112 §3.2.2)
            self.connector = Connector(proxy.host, proxy.port, ttl=dns_ttl, stagger=stagger)
            self.base_path = f"http://{self.host_header}{self.base_path}"
            if proxy.authorization:
                self.extra_head = f"Proxy-Authorization: {proxy.authorization}\r\n"
        self.limit = limit
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self._idle: list[_Connection] = []
        self._open = 0  # connections holding a slot: idle, busy or being opened
        # Requests queued for a slot; each is handed a connection, or None (a slot to connect in).
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._closed = False

    async def post(
        self,
        path: str,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        header_timeout: float,
        idle_timeout: float,
        total_timeout: float,
    ) -> UpstreamResponse:
        """Send ``POST base_path + path``; returns once the response headers arrived.

        Raises `TimeoutError` (connect or headers too slow) or
        `UpstreamConnectionError` (refused, reset, malformed).
        """
        head = encode_head(self.base_path + path, self.host_header, headers, len(body), self.extra_head)
        conn = await self._acquire()
        response = conn.response = UpstreamResponse(conn, header_timeout, idle_timeout, total_timeout)
        if len(body) < 65536:
            conn.transport.write(head + body)  # one write
        else:
            conn.transport.write(head)
            conn.transport.write(body)  # no copy of a large body
        await response._wait_headers()
        if response.status == 407 and self.proxy is not None:
            # Only a proxy answers 407: in absolute form (an http:// provider) the
            # refusal comes as a response, which is the way failing, not the
            # provider (a 502 naming the proxy, and failover), as with CONNECT.
            response.close()
            raise UpstreamSetupError(
                f"the egress proxy {self.proxy.host}:{self.proxy.port} refused the request to {self.host_header} "
                "(HTTP 407 Proxy Authentication Required)"
            )
        return response

    async def close(self) -> None:
        self._closed = True
        for conn in self._idle:
            conn.discard()
        self._idle.clear()
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(UpstreamConnectionError("the connection pool is closed"))

    # -- slots and connections ------------------------------------------------------
    async def _acquire(self) -> _Connection:
        if self._closed:
            raise UpstreamConnectionError("the connection pool is closed")
        if self._waiters:
            # First come, first served: while requests wait, connections and
            # slots are handed to them in order (see _put_back, _free_slot).
            return await self._wait_for_slot()
        idle = self._idle
        if idle:
            now = self.loop.time()
            while idle:
                conn = idle.pop()
                if not conn.closed and now - conn.idle_since < self.keepalive:
                    return conn
                conn.discard()
        if self._open >= self.limit:
            return await self._wait_for_slot()
        self._open += 1
        return await self._connect(self.connect_timeout)

    async def _wait_for_slot(self) -> _Connection:
        """Queue for a connection or a free slot; the connect timeout covers the wait too (as with aiohttp)."""
        deadline = self.loop.time() + self.connect_timeout
        waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                handed = await waiter
        except BaseException:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed something, but this request is gone: pass it on.
                handed = waiter.result()
                if handed is None:
                    self._open -= 1
                    self._free_slot()
                else:
                    self._put_back(handed)
            raise
        if handed is None:  # a slot, already counted for this request
            return await self._connect(max(0.0, deadline - self.loop.time()))
        if handed.closed:  # the provider closed it after the hand-over: start again
            return await self._acquire()
        return handed

    async def _connect(self, timeout: float) -> _Connection:
        """Open a connection in a slot the caller has already counted in `_open`."""
        conn = _Connection(self)
        try:
            async with asyncio.timeout(timeout):
                await self.connector.connect(lambda: conn)
        except BaseException as exc:
            # Cancelled after connection_made: asyncio closes the transport and
            # connection_lost -> _forget would free this slot a second time.
            conn.counted = False
            conn.closed = True
            self._open -= 1
            self._free_slot()
            # TimeoutError is an OSError too: it stays a timeout (504, not 502).
            if isinstance(exc, ProxyError):
                raise UpstreamSetupError(str(exc.strerror or exc)) from None
            if isinstance(exc, ssl.SSLError):
                reason = exc.verify_message if isinstance(exc, ssl.SSLCertVerificationError) else exc.reason
                raise UpstreamSetupError(f"TLS with the provider failed ({reason or exc})") from None
            if isinstance(exc, OSError) and not isinstance(exc, TimeoutError):
                raise UpstreamConnectionError(f"could not connect to the provider ({exc.strerror or exc})") from None
            raise
        return conn

    def _put_back(self, conn: _Connection) -> None:
        """A finished connection: to the first waiting request, else to the idle list."""
        if conn.closed or self._closed:
            conn.discard()
            return
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)

    def _forget(self, conn: _Connection) -> None:
        """A connection closed: free its slot (once) and drop it from the idle list."""
        if conn.counted:
            conn.counted = False
            self._open -= 1
            self._free_slot()
        if self._idle and conn in self._idle:
            self._idle.remove(conn)

    def _free_slot(self) -> None:
        """A slot came free: give it to the first waiting request, which opens a connection in it."""
        while self._waiters and self._open < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._open += 1  # counted for that request, so no newcomer can take it meanwhile
                waiter.set_result(None)
                return


def encode_head(target: str, host: str, headers: Iterable[tuple[str, str]], length: int, extra: str = "") -> bytes:
    """The request line and headers of a POST with a body of ``length`` bytes (`extra`: pre-encoded header lines)."""
    lines = [f"POST {target} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {length}\r\nAccept-Encoding: identity\r\n{extra}"]
    for name, value in headers:
        # aiohttp's server already refuses CR/LF in client headers; this keeps
        # any other source from splitting the request.
        if "\n" in value or "\r" in value or "\n" in name or "\r" in name:
            continue
        lines.append(f"{name}: {value}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")


__all__ = ["MAX_HEAD_BYTES", "ConnectionPool", "UpstreamConnectionError", "UpstreamResponse", "UpstreamSetupError", "encode_head"]
