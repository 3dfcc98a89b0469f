"""``rediss://`` with a private CA and client certificates, on both Redis clients, against a real TLS redis-server."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time

import pytest

from proxy.core.settings import StoreSettings
from proxy.store.store import Script, Store
from tests.support import free_port, unique_prefix
from tests.support_tls import PrivateCA

INCR = Script("tls_incr", "return redis.call('INCR', KEYS[1])")


class TLSRedis:
    """A private redis-server that speaks only TLS, with a certificate of `ca`."""

    def __init__(self, tmp_path, ca: PrivateCA, auth_clients: str) -> None:
        cert, key = ca.issue(f"redis-{auth_clients}", ["localhost", "127.0.0.1"])
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--tls-port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca.ca_file),
             "--tls-auth-clients", auth_clients, "--dir", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if self.proc.poll() is not None:
                    output = self.proc.stdout.read().decode(errors="replace") if self.proc.stdout else ""
                    pytest.skip(f"redis-server has no TLS support here: {output[-300:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError("TLS redis-server did not start") from None
                time.sleep(0.05)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout:
            self.proc.stdout.close()


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    return PrivateCA(tmp_path_factory.mktemp("redis-pki"))


@pytest.fixture
def tls_redis(tmp_path, ca):
    server = TLSRedis(tmp_path, ca, "no")
    yield server
    server.kill()


@pytest.fixture
def mtls_redis(tmp_path, ca):
    server = TLSRedis(tmp_path, ca, "yes")
    yield server
    server.kill()


async def both_clients_count(store: Store) -> list[int]:
    """INCR once through the script client, once through redis-py; both must reach the same server."""
    key = f"{unique_prefix()}:n"
    assert store.script_client is not None  # the hot path's own client is in use
    counts = [await store.run(INCR, [key], []), await INCR(store.redis, [key], [])]
    await store.redis.delete(key)
    return counts


async def test_rediss_with_a_private_ca_works_on_both_clients(tls_redis, ca):
    store = Store(StoreSettings(url=f"rediss://localhost:{tls_redis.port}", tls={"ca_file": str(ca.ca_file)}))
    await store.connect()
    try:
        assert await both_clients_count(store) == [1, 2]
        assert await store.ping()
    finally:
        await store.close()


async def test_rediss_without_the_ca_fails_on_both_clients(tls_redis):
    store = Store(StoreSettings(url=f"rediss://localhost:{tls_redis.port}", timeout=2.0))
    await store.connect()
    try:
        assert not await store.ping()  # redis-py
        with pytest.raises(Exception) as raised:  # noqa: B017 - the store's own error, whatever its class
            await store.run(INCR, ["k"], [])  # the script client
        causes = []
        error: BaseException | None = raised.value
        while error is not None:
            causes.append(str(error))
            error = error.__cause__ or error.__context__
        assert any("certificate verify failed" in cause for cause in causes), causes
    finally:
        await store.close()


async def test_rediss_mtls_with_the_configured_client_certificate(mtls_redis, ca):
    cert, key = ca.issue("gateway-redis-client", client=True)
    tls = {"ca_file": str(ca.ca_file), "cert_file": str(cert), "key_file": str(key)}
    store = Store(StoreSettings(url=f"rediss://localhost:{mtls_redis.port}", tls=tls))
    await store.connect()
    try:
        assert await both_clients_count(store) == [1, 2]
    finally:
        await store.close()

    anonymous = Store(StoreSettings(url=f"rediss://localhost:{mtls_redis.port}", timeout=2.0, tls={"ca_file": str(ca.ca_file)}))
    await anonymous.connect()
    try:
        assert not await anonymous.ping()
        with pytest.raises(Exception):  # noqa: B017 - either client error type: the server refuses the handshake
            await anonymous.run(INCR, ["k"], [])
    finally:
        await anonymous.close()


def test_verify_false_is_the_same_on_both_clients():
    from proxy.core.tls import client_context
    from proxy.store.store import redis_tls_options

    tls = StoreSettings(url="rediss://x:1", tls={"verify": False}).tls
    assert redis_tls_options(tls)["ssl_cert_reqs"] == "none" and redis_tls_options(tls)["ssl_check_hostname"] is False
    context = client_context(tls)
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
