"""HTTP edges every route shares: request ids on every response, compressed bodies, 405 `Allow`."""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import aiohttp
import brotli
import orjson
import pytest
from aiohttp.test_utils import TestServer

from proxy.admin.api import create_admin_app
from proxy.core.gateway import Gateway
from proxy.web.body import RUNNER_OPTIONS
from tests.support import ADMIN_TOKEN, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
CHAT = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "hello"}]}
RESPONSE = {"model": "sovereign-alpha", "input": "hello"}
COMPRESS = {"gzip": gzip.compress, "deflate": zlib.compress, "br": brotli.compress}


@pytest.fixture
async def full(mock, gateway_factory):
    """A gateway with the Responses unit, metrics and the admin API on the client port."""
    return await gateway_factory(make_settings(mock.url, pipeline=["responses"]))


@pytest.mark.parametrize(
    "method, path, body, headers, status",
    [
        ("POST", "/v1/chat/completions", {**CHAT, "stream": True}, {}, 200),
        ("POST", "/v1/responses", {**RESPONSE, "stream": True}, {}, 200),
        ("POST", "/v1/chat/completions", CHAT, {}, 200),
        ("POST", "/v1/responses", RESPONSE, {}, 200),
        ("POST", "/v1/chat/completions", {"model": "nope", "messages": []}, {}, 404),
        ("GET", "/v1/models", None, {}, 200),
        ("GET", "/healthz", None, {}, 200),
        ("GET", "/readyz", None, {}, 200),
        ("GET", "/metrics", None, {}, 200),
        ("GET", "/openapi.json", None, {}, 200),
        ("GET", "/nowhere", None, {}, 404),
        ("GET", "/v1/chat/completions", None, {}, 405),
        ("GET", "/admin/tenants/nobody", None, AUTH, 404),
        ("GET", "/admin/keys", None, {}, 401),
        ("POST", "/admin/tenants", {"id": "acme"}, AUTH, 201),
    ],
)
async def test_every_response_carries_a_request_id(full, method, path, body, headers, status):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, full.base_url + path, json=body, headers=headers) as resp:
            await resp.read()
            assert resp.status == status
            assert resp.headers["X-Request-ID"].startswith("req_")
            assert resp.headers.getall("Server") == ["sovereign"]  # no Python or aiohttp version to scan for
        # A safe id the client sent comes back as is, streamed or not.
        async with session.request(method, full.base_url + path, json=body, headers={**headers, "X-Request-ID": "trace-42"}) as resp:
            await resp.read()
            assert resp.headers["X-Request-ID"] == "trace-42"


async def test_stream_request_id_is_the_one_the_provider_saw(mock, full):
    async with aiohttp.ClientSession() as session:
        async with session.post(full.v1 + "/chat/completions", json={**CHAT, "stream": True}) as resp:
            assert resp.content_type == "text/event-stream"
            assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert mock.requests[-1]["headers"]["x-request-id"] == resp.headers["X-Request-ID"]


async def test_separate_admin_port_answers_carry_a_request_id(mock):
    # The root app `sovereign serve` puts on admin.port, served here on a free port.
    gateway = Gateway(make_settings(mock.url, admin={"port": 1}))
    app = create_admin_app(gateway, standalone=True)
    server = TestServer(app, host="127.0.0.1", port=0)
    await gateway.start()
    await server.start_server(**RUNNER_OPTIONS)
    try:
        async with aiohttp.ClientSession() as session:
            for headers, status in ((AUTH, 404), ({}, 401)):
                async with session.get(f"http://127.0.0.1:{server.port}/admin/tenants/nobody", headers=headers) as resp:
                    assert resp.status == status and resp.headers["X-Request-ID"].startswith("req_")
                    assert resp.headers["Server"] == "sovereign"
    finally:
        await server.close()
        await gateway.close()


# -- Content-Encoding ------------------------------------------------------------
POST_ROUTES = [
    ("/v1/chat/completions", CHAT, 200),
    ("/v1/responses", RESPONSE, 200),
    ("/admin/tenants", {"id": "acme"}, 201),
    ("/admin/keys", {"tenant": "acme"}, 201),
    ("/admin/tenants/acme/credits", {"amount": 5}, 200),
]


@pytest.mark.parametrize("encoding", sorted(COMPRESS))
async def test_a_body_that_does_not_decompress_is_a_400_before_auth_on_every_post_route(mock, full, encoding):
    async with aiohttp.ClientSession() as session:
        for path, body, _ in POST_ROUTES:
            # No credentials at all: the body is refused before the admin token check.
            headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
            async with session.post(full.base_url + path, data=orjson.dumps(body), headers=headers) as resp:
                error = (await resp.json())["error"]
                assert resp.status == 400, (path, error)
                assert error["code"] == "invalid_body" and error["type"] == "invalid_request_error"
                assert f"could not be decompressed (Content-Encoding: {encoding})" in error["message"]
                assert resp.headers["X-Request-ID"].startswith("req_")
        # The gateway is still healthy and answers the next request normally.
        async with session.post(full.v1 + "/chat/completions", json=CHAT) as resp:
            assert resp.status == 200
    assert len(mock.requests) == 1


@pytest.mark.parametrize("encoding", sorted(COMPRESS))
async def test_a_properly_compressed_body_works_on_every_post_route(mock, full, encoding):
    async with aiohttp.ClientSession(headers=AUTH) as session:
        for path, body, status in POST_ROUTES:
            headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
            async with session.post(full.base_url + path, data=COMPRESS[encoding](orjson.dumps(body)), headers=headers) as resp:
                answer = await resp.json()
                assert resp.status == status, (path, answer)
    # The provider got the decompressed request, without the client's Content-Encoding.
    sent = [r for r in mock.requests if r["body"]["messages"][-1]["content"] == "hello"]
    assert len(sent) == 2 and all("content-encoding" not in r["headers"] for r in sent)


def bomb(encoding: str, inflated: int) -> bytes:
    """`inflated` bytes of JSON-ish whitespace, compressed as `encoding`."""
    data = b"[" + b" " * (inflated - 1)
    if encoding == "br":
        return brotli.compress(data, quality=1)
    packer = zlib.compressobj(9, zlib.DEFLATED, 31 if encoding == "gzip" else 15)
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize("encoding", sorted(COMPRESS))
async def test_a_compression_bomb_gets_413_without_being_inflated(mock, gateway_factory, encoding):
    limit = 64 * 1024
    gw = await gateway_factory(make_settings(mock.url, admin_token=None, server={"max_body_bytes": limit}))
    body = bomb(encoding, 64 * 1024 * 1024)
    assert len(body) < limit  # the Content-Length check alone cannot catch it

    async def chunked():  # and without a Content-Length at all
        yield body

    tracemalloc.start()
    try:
        async with aiohttp.ClientSession() as session:
            headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
            for data in (body, chunked()):
                async with session.post(gw.v1 + "/chat/completions", data=data, headers=headers) as resp:
                    error = (await resp.json())["error"]
                    assert resp.status == 413 and error["code"] == "request_too_large"
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 1024 * 1024, f"{peak} bytes allocated for a {len(body)}-byte body"
    assert mock.requests == []


@pytest.mark.parametrize(
    "encoding, data, status, code",
    [
        ("gzip", gzip.compress(orjson.dumps(CHAT))[:-9], 400, "invalid_body"),  # truncated
        ("gzip", gzip.compress(orjson.dumps(CHAT)) + b"junk", 400, "invalid_body"),
        ("deflate", zlib.compress(orjson.dumps(CHAT))[:-3], 400, "invalid_body"),
        ("br", brotli.compress(orjson.dumps(CHAT))[:-2], 400, "invalid_body"),
        ("zstd", orjson.dumps(CHAT), 415, "unsupported_content_encoding"),
        ("compress", orjson.dumps(CHAT), 415, "unsupported_content_encoding"),
    ],
    ids=["gzip-truncated", "gzip-trailing-junk", "deflate-truncated", "br-truncated", "zstd", "compress"],
)
async def test_damaged_or_unsupported_encodings_are_openai_shaped(mock, passthrough, encoding, data, status, code):
    async with aiohttp.ClientSession() as session:
        headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
        async with session.post(passthrough.v1 + "/chat/completions", data=data, headers=headers) as resp:
            body = await resp.json()
    assert resp.status == status and body["error"]["code"] == code
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert mock.requests == []


async def test_gzip_members_and_raw_deflate_decode(mock, passthrough):
    half = len(orjson.dumps(CHAT)) // 2
    raw = orjson.dumps(CHAT)
    members = gzip.compress(raw[:half]) + gzip.compress(raw[half:])  # RFC 1952 allows concatenated members
    packer = zlib.compressobj(6, zlib.DEFLATED, -15)
    raw_deflate = packer.compress(raw) + packer.flush()  # "deflate" without the zlib wrapper, as some clients send it
    async with aiohttp.ClientSession() as session:
        for encoding, data in (("gzip", members), ("deflate", raw_deflate), ("identity", raw)):
            headers = {"Content-Type": "application/json", "Content-Encoding": encoding}
            async with session.post(passthrough.v1 + "/chat/completions", data=data, headers=headers) as resp:
                assert resp.status == 200, await resp.text()
    assert len(mock.requests) == 3


# -- 405 -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, path, allow",
    [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/responses", "POST"),
        ("DELETE", "/v1/models", "GET, HEAD"),
        ("POST", "/healthz", "GET, HEAD"),
        ("PATCH", "/v1/responses/resp_1", "DELETE, GET, HEAD"),
        ("PUT", "/admin/keys", "GET, HEAD, POST"),
    ],
)
async def test_405_names_the_allowed_methods(full, method, path, allow):
    async with aiohttp.ClientSession() as session:
        async with session.request(method, full.base_url + path, headers=AUTH) as resp:
            body = await resp.json()
    assert resp.status == 405 and body["error"]["code"] == "method_not_allowed"
    assert resp.headers["Allow"] == allow


@pytest.mark.parametrize("cookie", ["sov_admin", "sov_tenant"])
@pytest.mark.parametrize("expires", ["\u00b9", "\u0663\u0663", "9" * 5000])
async def test_a_forged_console_cookie_with_odd_digits_is_no_session_not_a_crash(full, cookie, expires):
    """`str.isdigit` accepts "¹" and Arabic-Indic digits, which int() refuses: the cookie is simply not a session."""
    kind = cookie.removeprefix("sov_")
    async with aiohttp.ClientSession(cookies={cookie: f"{kind}.acme.{expires}.forged"}) as session:
        for path in ("/console/", "/console/tenant"):
            async with session.get(full.base_url + path, allow_redirects=False) as resp:
                assert resp.status < 500, (path, resp.status, await resp.text())


async def test_logging_out_ends_the_console_session_not_only_the_browser_cookie(mock, gateway_factory, redis_prefix):
    """The logged-out cookie kept full admin rights for its 12 hours (it was only deleted from the browser)."""
    import re

    from tests.support import ADMIN_TOKEN, REDIS_URL

    running = await gateway_factory(make_settings(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth"]))
    base = running.base_url
    async with aiohttp.ClientSession() as http:
        async with http.post(base + "/console/login", data={"token": ADMIN_TOKEN}, allow_redirects=False) as resp:
            assert resp.status == 303
            cookie = resp.cookies["sov_admin"].value
    jar = {"Cookie": f"sov_admin={cookie}"}
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/console/", headers=jar) as resp:
            csrf = re.search(r'name="csrf-token" content="([^"]+)"', await resp.text()).group(1)
        async with http.post(base + "/console/logout", data={"csrf": csrf}, headers=jar, allow_redirects=False) as resp:
            assert resp.status == 303
        async with http.get(base + "/console/", headers=jar) as resp:
            assert 'id="tenants"' not in await resp.text()  # the login page again
        async with http.post(base + "/admin/tenants", json={"id": "after-logout"}, headers={**jar, "X-CSRF-Token": csrf}) as resp:
            assert resp.status == 401
