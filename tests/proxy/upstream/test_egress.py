"""The provider hop in corporate networks: egress proxies (settings and env), private CAs, mTLS, server names.

A real forward proxy (tests.support_proxy, on its own thread) and real TLS
providers (the mock provider's app behind TLS with certificates of a private
CA from tests.support_tls) on loopback sockets.
"""

from __future__ import annotations

import ssl
from contextlib import asynccontextmanager

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from proxy.core.settings import UpstreamSettings
from proxy.devtools.mock_upstream import MockUpstream
from proxy.upstream.egress import Proxy, egress_proxy
from tests.support import free_port, make_settings
from tests.support_proxy import ForwardProxy
from tests.support_tls import PrivateCA

BODY = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "hello"}]}
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No proxy variables but the test's own (the clients here are aiohttp's, which ignore them)."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca = PrivateCA(directory)
    server = ca.issue("provider", ["localhost", "provider.internal"])
    client = ca.issue("gateway-client", client=True)
    return ca, server, client


async def post(url: str, body: dict = BODY) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:  # trust_env is off: the test's own request goes direct
        async with session.post(url + "/chat/completions", json=body) as resp:
            return resp.status, await resp.json()


@asynccontextmanager
async def tls_provider(cert, key, client_ca=None):
    """The mock provider behind TLS on localhost; with `client_ca`, it requires a client certificate."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(client_ca)
    mock = MockUpstream()
    runner = web.AppRunner(mock.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    mock.port = runner.addresses[0][1]
    try:
        yield mock
    finally:
        await runner.cleanup()


def one_try(url: str, **upstream) -> dict:
    return {"routing": {"attempts": 1}, "upstreams": {"default": {"url": url, **upstream}}}


# -- proxies from the environment -------------------------------------------------------------


async def test_http_proxy_from_the_environment_carries_plain_http_requests(mock, gateway_factory, monkeypatch):
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        gateway = await gateway_factory(make_settings(mock.url, admin_token=None))
        for _ in range(2):
            status, body = await post(gateway.v1)
            assert status == 200, body
    assert len(mock.requests) == 2
    # Absolute-form (RFC 9112 §3.2.2), pooled: one proxied connection carried both.
    assert [r.target for r in proxy.requests] == [f"{mock.url}/chat/completions"]
    assert proxy.requests[0].method == "POST"
    assert proxy.requests[0].headers["host"] == mock.url.split("/")[2]


async def test_no_proxy_matching_the_provider_host_goes_direct(mock, gateway_factory, monkeypatch):
    with ForwardProxy() as proxy:
        monkeypatch.setenv("http_proxy", proxy.url)  # lowercase works too
        monkeypatch.setenv("NO_PROXY", "example.com,127.0.0.1")
        gateway = await gateway_factory(make_settings(mock.url, admin_token=None))
        status, _ = await post(gateway.v1)
    assert status == 200
    assert len(mock.requests) == 1
    assert proxy.requests == []


async def test_trust_env_false_ignores_the_environment(mock, gateway_factory, monkeypatch):
    with ForwardProxy() as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        gateway = await gateway_factory(make_settings(mock.url, admin_token=None, upstreams={"default": {"trust_env": False}}))
        status, _ = await post(gateway.v1)
    assert status == 200 and proxy.requests == []


async def test_https_proxy_tunnels_tls_to_a_provider_of_a_private_ca(pki, gateway_factory, monkeypatch):
    ca, (cert, key), _ = pki
    async with tls_provider(cert, key) as provider:
        url = f"https://localhost:{provider.port}/v1"
        with ForwardProxy() as proxy:
            monkeypatch.setenv("HTTPS_PROXY", proxy.url)
            monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # the wrong variable for https: unused
            gateway = await gateway_factory(make_settings(url, admin_token=None, **one_try(url, tls={"ca_file": str(ca.ca_file)})))
            status, body = await post(gateway.v1)
            assert status == 200, body
            assert [(r.method, r.target) for r in proxy.requests] == [("CONNECT", f"localhost:{provider.port}")]
            assert len(provider.requests) == 1  # the provider saw the request, through the tunnel

            # The same without the private CA: the provider's certificate is not trusted.
            untrusting = await gateway_factory(make_settings(url, admin_token=None, **one_try(url)))
            status, body = await post(untrusting.v1)
    assert status == 502
    assert body["error"]["code"] == "upstream_error"
    assert "TLS with the provider failed" in body["error"]["message"]
    assert "certificate" in body["error"]["message"]
    assert len(provider.requests) == 1


# -- a configured proxy with credentials -------------------------------------------------------


async def test_a_configured_proxy_gets_its_credentials_and_the_provider_does_not(mock, gateway_factory):
    with ForwardProxy(credentials="egress:s3cret-pass") as proxy:
        settings = make_settings(mock.url, admin_token=None, upstreams={"default": {"proxy": f"http://egress:s3cret-pass@127.0.0.1:{proxy.port}"}})
        assert "s3cret" not in str(settings.masked()) and "s3cret" not in repr(settings)
        gateway = await gateway_factory(settings)
        status, _ = await post(gateway.v1)
    assert status == 200
    assert proxy.requests[0].authorization == proxy.expected
    assert "proxy-authorization" not in mock.requests[0]["headers"]


async def test_a_proxy_refusing_the_tunnel_is_an_upstream_error_naming_it_without_credentials(pki, gateway_factory):
    ca, (cert, key), _ = pki
    async with tls_provider(cert, key) as provider:
        url = f"https://localhost:{provider.port}/v1"
        with ForwardProxy(credentials="egress:right") as proxy:
            with capture_logs() as logs:
                gateway = await gateway_factory(
                    make_settings(url, admin_token=None, **one_try(url, proxy=f"http://egress:wrong-s3cret@127.0.0.1:{proxy.port}", tls={"ca_file": str(ca.ca_file)}))
                )
                status, body = await post(gateway.v1)
    assert status == 502
    message = body["error"]["message"]
    assert body["error"]["code"] == "upstream_error"
    assert f"egress proxy 127.0.0.1:{proxy.port} refused the tunnel" in message and "407" in message
    assert "wrong-s3cret" not in message and "egress:" not in message
    assert "wrong-s3cret" not in str(logs)
    assert provider.requests == []


async def test_a_proxy_refusing_a_plain_http_request_is_an_upstream_error_and_fails_over(mock, gateway_factory):
    """In absolute form (an http:// provider) the proxy's 407 is a response, not the provider's: 502 naming it."""
    with ForwardProxy(credentials="egress:right") as proxy:
        upstreams = {"viaproxy": {"url": mock.url + "/v1", "proxy": f"http://egress:wrong-s3cret@127.0.0.1:{proxy.port}"},
                     "default": {}}
        alone = await gateway_factory(make_settings(
            mock.url, admin_token=None, routing={"attempts": 1}, upstreams=upstreams,
            models={"sovereign-alpha": {"upstream": "viaproxy", "free": True}}))
        status, body = await post(alone.v1)
        assert status == 502 and body["error"]["code"] == "upstream_error"
        message = body["error"]["message"]
        assert f"egress proxy 127.0.0.1:{proxy.port} refused" in message and "407" in message
        assert "wrong-s3cret" not in message
        failover = await gateway_factory(make_settings(
            mock.url, admin_token=None, routing={"attempts": 2, "backoff_ms": 0}, upstreams=upstreams,
            models={"sovereign-alpha": {"upstream": ["viaproxy", "default"], "free": True}}))
        status, _ = await post(failover.v1)
    assert status == 200 and len(mock.requests) == 1  # the next target served it


async def test_failover_passes_a_refusing_proxy_and_a_dead_one(mock, gateway_factory):
    dead = free_port()
    with ForwardProxy(refuse=503) as refusing:
        settings = make_settings(
            mock.url,
            admin_token=None,
            routing={"attempts": 3, "backoff_ms": 0},
            upstreams={
                "dead": {"url": "https://localhost:1/v1", "proxy": f"http://u:p@127.0.0.1:{dead}"},
                "refusing": {"url": "https://localhost:1/v1", "proxy": refusing.url},
                "default": {},
            },
            models={"sovereign-alpha": {"upstream": ["dead", "refusing", "default"], "free": True}},
        )
        gateway = await gateway_factory(settings)
        status, _ = await post(gateway.v1)
        assert status == 200
        assert len(mock.requests) == 1 and len(refusing.requests) == 1

        # Each alone: the error names the proxy that failed.
        for name, where in (("dead", f"127.0.0.1:{dead}"), ("refusing", f"127.0.0.1:{refusing.port}")):
            single = await gateway_factory(
                make_settings(mock.url, admin_token=None, routing={"attempts": 1}, upstreams=settings.model_dump()["upstreams"],
                              models={"sovereign-alpha": {"upstream": name, "free": True}})
            )
            status, body = await post(single.v1)
            assert status == 502 and body["error"]["code"] == "upstream_error"
            assert f"egress proxy {where}" in body["error"]["message"], body


# -- TLS options -------------------------------------------------------------------------------


async def test_mtls_the_provider_accepts_the_configured_client_certificate_and_refuses_none(pki, gateway_factory):
    ca, (cert, key), (client_cert, client_key) = pki
    async with tls_provider(cert, key, client_ca=ca.ca_file) as provider:
        url = f"https://localhost:{provider.port}/v1"
        tls = {"ca_file": str(ca.ca_file), "cert_file": str(client_cert), "key_file": str(client_key)}
        gateway = await gateway_factory(make_settings(url, admin_token=None, **one_try(url, tls=tls)))
        status, body = await post(gateway.v1)
        assert status == 200, body
        assert len(provider.requests) == 1

        anonymous = await gateway_factory(make_settings(url, admin_token=None, **one_try(url, tls={"ca_file": str(ca.ca_file)})))
        with capture_logs() as logs:
            status, body = await post(anonymous.v1)
    # Under TLS 1.3 the refusal comes after the client's handshake is done: the provider just closes.
    assert status == 502
    assert body["error"]["code"] == "upstream_error"
    assert len(provider.requests) == 1
    # The operator's log says what happened, and where; the client's message does not.
    (why,) = [entry for entry in logs if entry["event"] == "upstream.unreachable"]
    assert why["upstream"] == "default" and why["error"] == "the provider closed the connection"
    assert body["error"]["message"] == "Could not reach the upstream provider."


async def test_server_name_is_sent_and_verified_instead_of_the_url_host(pki, gateway_factory):
    ca, (cert, key), _ = pki
    async with tls_provider(cert, key) as provider:
        url = f"https://127.0.0.1:{provider.port}/v1"  # the certificate has no IP address
        named = await gateway_factory(
            make_settings(url, admin_token=None, **one_try(url, tls={"ca_file": str(ca.ca_file), "server_name": "provider.internal"}))
        )
        status, body = await post(named.v1)
        assert status == 200, body
        unnamed = await gateway_factory(make_settings(url, admin_token=None, **one_try(url, tls={"ca_file": str(ca.ca_file)})))
        status, body = await post(unnamed.v1)
        assert status == 502 and "TLS with the provider failed" in body["error"]["message"]


async def test_verify_false_connects_to_an_untrusted_provider_with_a_startup_warning(pki, gateway_factory):
    _, (cert, key), _ = pki
    async with tls_provider(cert, key) as provider:
        url = f"https://localhost:{provider.port}/v1"
        with capture_logs() as logs:
            gateway = await gateway_factory(make_settings(url, admin_token=None, **one_try(url, tls={"verify": False})))
        status, _ = await post(gateway.v1)
    assert status == 200
    assert any(entry["event"] == "upstream.tls_unverified" and entry["log_level"] == "warning" for entry in logs)


async def test_keepalive_dns_cache_and_stagger_are_settings(mock, gateway_factory, monkeypatch):
    with ForwardProxy() as proxy:  # one recorded entry per connection: it counts them
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        tuned = {"keepalive_seconds": 0, "dns_cache_seconds": 0, "connect_stagger_seconds": 0.1}
        running = await gateway_factory(make_settings(mock.url, admin_token=None, upstreams={"default": tuned}))
        for _ in range(2):
            status, _ = await post(running.v1)
            assert status == 200
    assert len(proxy.requests) == 2  # keep-alive 0: the second request opened a new connection
    connector = running.gateway.router.upstreams["default"].pool.connector
    assert (connector.ttl, connector.stagger) == (0, 0.1)


# -- resolution rules ------------------------------------------------------------------------


def test_proxy_resolution_follows_the_scheme_and_no_proxy(monkeypatch):
    monkeypatch.setenv("HTTPS_PROXY", "http://corp:pw@proxy.corp:3128")
    monkeypatch.setenv("HTTP_PROXY", "proxy.corp:8080")  # scheme-less, as curl allows
    monkeypatch.setenv("NO_PROXY", ".internal,localhost")
    assert egress_proxy(UpstreamSettings(url="https://api.openai.com/v1")) == Proxy("proxy.corp", 3128, "Basic Y29ycDpwdw==")
    assert egress_proxy(UpstreamSettings(url="http://vllm.example:8000/v1")) == Proxy("proxy.corp", 8080)
    assert egress_proxy(UpstreamSettings(url="https://vllm.internal/v1")) is None
    assert egress_proxy(UpstreamSettings(url="https://api.openai.com/v1", trust_env=False)) is None
    own = UpstreamSettings(url="http://localhost:9/v1", proxy="http://own:9999")
    assert egress_proxy(own) == Proxy("own", 9999)  # a configured proxy wins, NO_PROXY or not
    assert "Basic" not in repr(egress_proxy(UpstreamSettings(url="https://api.openai.com/v1")))


def test_a_bad_proxy_setting_names_the_field_without_echoing_it():
    from proxy.core.settings import ConfigError, load_settings

    with pytest.raises(ConfigError) as raised:
        load_settings(env={}, overrides={"upstreams": {"default": {"proxy": "socks5://user:hunter2@proxy:1080"}}})
    assert "upstreams.default.proxy" in str(raised.value)
    assert "hunter2" not in str(raised.value)
