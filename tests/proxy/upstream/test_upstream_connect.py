"""The provider-hop connector against real loopback sockets: lookups, Happy Eyeballs, cancellation, TLS.

Lookups of "localhost" go through the loop's real ``getaddrinfo``, wrapped to
count its calls. The staggered cases need several addresses with different
behaviour, so their ``resolve`` hands out real addrinfo tuples for 127.0.0.1 on
several ports. A "blackhole" is a listener whose accept queue is full: the
kernel drops further SYNs, so a connect to it neither succeeds nor fails, as
with a broken IPv6 route. Socket leaks are counted in /proc/self/fd; besides,
every test fails on a loop error (a task destroyed while pending, an exception
nobody retrieved) or an unclosed-socket ResourceWarning. The key cases run
under uvloop (production's loop) too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import select
import socket
import ssl
import warnings
from collections.abc import AsyncIterator, Iterator

import pytest

from proxy.upstream.connect import Connector, interleave
from tests.support import free_port, self_signed_certificate, until


class Client(asyncio.Protocol):
    """Collects what the server sends; `lost` resolves when the connection is gone."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.changed = asyncio.Event()
        self.lost = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.data += data
        self.changed.set()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)

    async def read(self, size: int) -> bytes:
        async with asyncio.timeout(2.0):
            while len(self.data) < size:
                self.changed.clear()
                await self.changed.wait()
        return bytes(self.data)


class EchoServer:
    """A loopback server echoing what it reads; it counts the connections it accepted."""

    def __init__(self) -> None:
        self.accepted = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        try:
            while data := await reader.read(65536):
                writer.write(data)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def echo_server(host: str = "127.0.0.1", tls: ssl.SSLContext | None = None) -> AsyncIterator[tuple[EchoServer, int]]:
    echo = EchoServer()
    server = await asyncio.start_server(echo._serve, host, 0, ssl=tls)
    try:
        yield echo, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in echo._writers:
            writer.close()
        await server.wait_closed()


@contextlib.contextmanager
def idle_listener() -> Iterator[int]:
    """A live port that completes TCP handshakes but never accepts: no server-side fd in this process."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


class RealLookups:
    """The running loop's real getaddrinfo, counting its calls (optionally slower, or numeric-only)."""

    def __init__(self, delay: float = 0.0, numeric_only: bool = False) -> None:
        self.calls = 0
        self.delay = delay
        self.flags = socket.AI_NUMERICHOST if numeric_only else 0  # numeric-only: a name fails locally, no DNS

    async def __call__(self, host: str, port: int, **kwargs) -> list:
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)  # keeps the lookup in flight while the test acts
        return await asyncio.get_running_loop().getaddrinfo(host, port, flags=self.flags, **kwargs)


class Addresses:
    """A `resolve` handing out real addrinfo tuples for 127.0.0.1 on each port, in order; counts its calls."""

    def __init__(self, *ports: int) -> None:
        self.calls = 0
        self.infos = [info for port in ports for info in socket.getaddrinfo("127.0.0.1", port, type=socket.SOCK_STREAM)]

    async def __call__(self, host: str, port: int, **kwargs) -> list:
        self.calls += 1
        return list(self.infos)


def open_sockets() -> set[int]:
    """The process's file descriptors that are sockets, from /proc/self/fd.

    Sockets only: uvloop opens /dev/null once, lazily; and the descriptor listing
    the directory is gone by the time its link is read.
    """
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.add(int(name))
    return fds


async def connect_and_close(connector: Connector) -> None:
    transport, client = await connector.connect(Client)
    transport.close()
    await client.lost


def ipv6_loopback() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.fixture(autouse=True)
async def clean_loop():
    """Fail a test on a loop error (a task destroyed while pending...) or an unclosed-socket ResourceWarning."""
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    # Garbage that earlier tests of the suite left (their clients, transports)
    # is collected now, so that only what this test leaves is recorded.
    gc.collect()
    loop.set_exception_handler(lambda loop, context: errors.append(context))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        yield
        gc.collect()
    loop.set_exception_handler(None)
    assert errors == []
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


@pytest.fixture
def blackhole():
    """Make blackholed ports on 127.0.0.1; skips when the kernel does not drop SYNs to a full accept queue."""
    made: list[socket.socket] = []

    def make() -> int:
        listener = socket.socket()
        made.append(listener)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)  # Linux: room for one connection in the accept queue
        port = listener.getsockname()[1]
        made.append(socket.create_connection(("127.0.0.1", port), timeout=2.0))  # fills it; never accepted
        with socket.socket() as probe:  # a plain connect now must hang
            probe.setblocking(False)
            probe.connect_ex(("127.0.0.1", port))
            _, writable, _ = select.select([], [probe], [], 0.3)
        if writable:
            pytest.skip("this kernel completes or refuses connects to a full accept queue: no blackhole on loopback")
        return port

    yield make
    for sock in made:
        sock.close()


@pytest.fixture
def certificate(tmp_path):
    """A self-signed certificate for localhost and its key."""
    return self_signed_certificate(tmp_path, "localhost")


# -- connecting and looking up ------------------------------------------------------------


async def test_connects_by_hostname():
    lookups = RealLookups()
    async with echo_server() as (echo, port):
        transport, client = await Connector("localhost", port, resolve=lookups).connect(Client)
        try:
            transport.write(b"ping")
            assert await client.read(4) == b"ping"
            assert transport.get_extra_info("peername")[:2] == ("127.0.0.1", port)
            assert (echo.accepted, lookups.calls) == (1, 1)
        finally:
            transport.close()
            await client.lost


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_an_ip_literal_is_never_looked_up(host):
    if host == "::1" and not ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    lookups = RealLookups()
    async with echo_server(host) as (echo, port):
        connector = Connector(host, port, resolve=lookups)
        for _ in range(2):
            transport, client = await connector.connect(Client)
            transport.write(b"literal")
            assert await client.read(7) == b"literal"
            assert transport.get_extra_info("peername")[0] == host
            transport.close()
            await client.lost
        assert (echo.accepted, lookups.calls) == (2, 0)


async def test_lookups_are_cached_for_ttl():
    async with echo_server() as (echo, port):
        lookups = RealLookups()
        connector = Connector("localhost", port, resolve=lookups, ttl=10.0)
        await connect_and_close(connector)
        await connect_and_close(connector)
        assert lookups.calls == 1

        lookups = RealLookups()
        connector = Connector("localhost", port, resolve=lookups, ttl=0.05)
        await connect_and_close(connector)
        assert lookups.calls == 1
        await asyncio.sleep(0.1)  # the ttl passes
        await connect_and_close(connector)
        assert lookups.calls == 2
        assert echo.accepted == 4


async def test_ttl_zero_looks_up_every_time():
    lookups = RealLookups()
    async with echo_server() as (echo, port):
        connector = Connector("localhost", port, resolve=lookups, ttl=0)
        for _ in range(3):
            await connect_and_close(connector)
        assert (echo.accepted, lookups.calls) == (3, 3)


async def test_concurrent_connects_share_one_lookup():
    """Single flight: 50 connects, one lookup; the caller that started it gives up and the others still connect."""
    lookups = RealLookups(delay=0.1)
    async with echo_server() as (echo, port):
        connector = Connector("localhost", port, resolve=lookups)
        tasks = [asyncio.create_task(connector.connect(Client)) for _ in range(50)]
        await until(lambda: lookups.calls == 1)
        tasks[0].cancel()  # the first caller, which started the lookup
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(results[0], asyncio.CancelledError)
        connected = results[1:]
        assert all(isinstance(result, tuple) for result in connected), [r for r in connected if not isinstance(r, tuple)]
        assert lookups.calls == 1
        await until(lambda: echo.accepted == 49)
        for transport, client in connected:
            transport.close()
            await client.lost


async def test_a_failed_lookup_propagates_and_is_not_cached():
    lookups = RealLookups(numeric_only=True)  # "provider.test" fails at once, without DNS
    connector = Connector("provider.test", 443, resolve=lookups)
    for calls in (1, 2):
        with pytest.raises(socket.gaierror):
            await connector.connect(Client)
        assert lookups.calls == calls


def test_addresses_are_interleaved_by_family():
    def info(host: str, port: int):
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)[0]

    v6a, v6b, v6c = info("::1", 1), info("::1", 2), info("::1", 3)
    v4a, v4b = info("127.0.0.1", 1), info("127.0.0.1", 2)
    assert interleave([v6a, v6b, v6a, v4a, v4b, v6c, v4a]) == [v6a, v4a, v6b, v4b, v6c]
    assert interleave([v4a, v6a, v6b]) == [v4a, v6a, v6b]


# -- Happy Eyeballs -------------------------------------------------------------------------


async def test_a_blackholed_first_address_gives_way_after_the_stagger(blackhole):
    loop = asyncio.get_running_loop()
    with idle_listener() as live:
        resolve = Addresses(blackhole(), live)
        connector = Connector("provider.test", 443, resolve=resolve, stagger=0.25)
        before = open_sockets()
        started = loop.time()
        async with asyncio.timeout(4.0):  # without Happy Eyeballs: hung on the blackhole
            transport, client = await connector.connect(Client)
        elapsed = loop.time() - started
        try:
            assert 0.2 <= elapsed < 1.0
            assert transport.get_extra_info("peername")[1] == live
            # The blackholed attempt's socket is closed: the winner's is the only new fd.
            assert open_sockets() - before == {transport.get_extra_info("socket").fileno()}
        finally:
            transport.close()
            await client.lost
        assert open_sockets() == before


async def test_a_refused_first_address_starts_the_next_at_once():
    loop = asyncio.get_running_loop()
    with idle_listener() as live:
        connector = Connector("provider.test", 443, resolve=Addresses(free_port(), live), stagger=5.0)
        started = loop.time()
        async with asyncio.timeout(4.0):
            transport, client = await connector.connect(Client)
        assert loop.time() - started < 2.5  # well under the 5 s stagger
        assert transport.get_extra_info("peername")[1] == live
        transport.close()
        await client.lost


async def test_every_address_refused_is_an_error_naming_the_host_and_drops_the_cache():
    resolve = Addresses(free_port(), free_port())
    connector = Connector("provider.test", 8443, resolve=resolve, stagger=5.0)
    before = open_sockets()
    with pytest.raises(ConnectionRefusedError, match=r"provider\.test:8443") as raised:
        async with asyncio.timeout(4.0):
            await connector.connect(Client)
    assert raised.value.strerror == "Connection refused (connecting to provider.test:8443)"
    assert open_sockets() == before
    assert resolve.calls == 1
    with pytest.raises(OSError, match="Connection refused"):
        await connector.connect(Client)
    assert resolve.calls == 2  # looked up again: the provider may have moved


async def test_a_cancelled_connect_cancels_every_attempt_and_closes_their_sockets(blackhole):
    connector = Connector("provider.test", 443, resolve=Addresses(blackhole(), blackhole()), stagger=0.05)
    before = open_sockets()

    async def connect() -> set[int]:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.6):
                await connector.connect(Client)
        return open_sockets()  # as connect() gave up, before any other task ran

    task = asyncio.create_task(connect())
    await until(lambda: len(open_sockets() - before) == 2)  # both attempts under way
    assert await task == before


async def test_a_protocol_factory_that_fails_leaves_no_socket_open():
    def broken() -> asyncio.Protocol:
        raise RuntimeError("no protocol")

    with idle_listener() as live:
        before = open_sockets()
        with pytest.raises(RuntimeError, match="no protocol"):
            await Connector("127.0.0.1", live).connect(broken)
        assert open_sockets() == before


# -- TLS -------------------------------------------------------------------------------------


async def test_tls_by_hostname_verifies_the_name(certificate):
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))
    async with echo_server(tls=server_tls) as (echo, port):
        transport, client = await Connector("localhost", port, ssl=client_tls).connect(Client)
        try:
            transport.write(b"secure")
            assert await client.read(6) == b"secure"
            assert transport.get_extra_info("peercert")["subjectAltName"] == (("DNS", "localhost"),)
        finally:
            transport.close()
            await client.lost

        # The same server under a name its certificate does not carry: refused, and the socket closed.
        before = open_sockets()
        other = Connector("provider.test", port, ssl=client_tls, resolve=Addresses(port))
        with pytest.raises(ssl.SSLCertVerificationError, match="provider.test"):
            await other.connect(Client)
        await until(lambda: open_sockets() == before)


async def test_a_tls_connect_cancelled_after_the_handshake_leaves_its_socket_to_the_transport(certificate):
    """Cancelled just as TLS is up; the next connection still works, and the socket is closed in the end.

    The transport owns the socket by then and holds it through the TLS shutdown
    (the server here never answers the close_notify): closing it under the
    transport would let the next socket reuse its fd number while asyncio's
    selector still thinks it is watching the old one, so that one never reads.
    """
    cert, key = certificate
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    held: list[asyncio.BaseTransport] = []

    class Mute(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transport.pause_reading()  # TLS is up; the client's close_notify is never read
            held.append(transport)

    class CancelsWhenConnected(Client):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            connecting.cancel()  # the caller's timeout, at the worst moment

    before = open_sockets()
    server = await asyncio.get_running_loop().create_server(Mute, "127.0.0.1", 0, ssl=server_tls)
    try:
        connector = Connector("localhost", server.sockets[0].getsockname()[1], ssl=ssl.create_default_context(cafile=str(cert)))
        connecting = asyncio.create_task(connector.connect(CancelsWhenConnected))
        with pytest.raises(asyncio.CancelledError):
            await connecting
        async with echo_server() as (echo, port):
            transport, client = await Connector("127.0.0.1", port).connect(Client)
            transport.write(b"after")
            assert await client.read(5) == b"after"
            transport.close()
            await client.lost
    finally:
        server.close()
        for transport in held:
            transport.abort()  # the client's transport sees the end and closes its socket
        await server.wait_closed()
    await until(lambda: open_sockets() == before)


# -- the same under uvloop (production's loop) ---------------------------------------------

UVLOOP_CASES = [
    test_a_blackholed_first_address_gives_way_after_the_stagger,
    test_a_refused_first_address_starts_the_next_at_once,
    test_every_address_refused_is_an_error_naming_the_host_and_drops_the_cache,
    test_a_cancelled_connect_cancels_every_attempt_and_closes_their_sockets,
    test_a_protocol_factory_that_fails_leaves_no_socket_open,
    test_concurrent_connects_share_one_lookup,
    test_tls_by_hostname_verifies_the_name,
    test_a_tls_connect_cancelled_after_the_handshake_leaves_its_socket_to_the_transport,
]


@pytest.mark.parametrize("case", UVLOOP_CASES, ids=[case.__name__.removeprefix("test_") for case in UVLOOP_CASES])
def test_under_uvloop(case, request):
    uvloop = pytest.importorskip("uvloop")
    fixtures = {name: request.getfixturevalue(name) for name in inspect.signature(case).parameters}
    errors: list[dict] = []
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.get_loop().set_exception_handler(lambda loop, context: errors.append(context))
        runner.run(case(**fixtures))
        gc.collect()
    assert errors == []
