"""The admin API: token checks, the route contract, and OpenAI-shaped validation errors."""

from __future__ import annotations

import time

import aiohttp
import openai
import pytest

from tests.support import ADMIN_TOKEN, make_settings

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture
async def admin(mock, gateway_factory, store_url, redis_prefix):
    running = await gateway_factory(
        make_settings(mock.url, store_url=store_url, prefix=redis_prefix, pipeline=["auth", "rate_limit"])
    )
    async with aiohttp.ClientSession(base_url=running.base_url, headers=AUTH) as session:
        session.running = running
        yield session


async def call(session: aiohttp.ClientSession, method: str, path: str, **kwargs) -> tuple[int, dict]:
    async with session.request(method, path, **kwargs) as resp:
        return resp.status, await resp.json()


def assert_error(status: int, body: dict, expected: int, param: str | None = None) -> None:
    assert status == expected, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if param is not None:
        assert body["error"]["param"] == param, body


async def test_tenant_credit_and_ledger_contract(admin):
    status, tenant = await call(admin, "POST", "/admin/tenants", json={"id": "acme", "credits": 1000})
    assert status == 201
    assert {k: tenant[k] for k in ("id", "balance", "reserved")} == {"id": "acme", "balance": 1000, "reserved": 0}
    assert abs(tenant["created_at"] - time.time()) < 5
    assert_error(*await call(admin, "POST", "/admin/tenants", json={"id": "acme"}), 409)
    assert await call(admin, "GET", "/admin/tenants/acme") == (200, tenant)
    assert_error(*await call(admin, "GET", "/admin/tenants/nobody"), 404)

    for _ in range(3):  # one idempotency key applies once
        status, after = await call(admin, "POST", "/admin/tenants/acme/credits", json={"amount": 500, "idempotency_key": "inv-1"})
        assert (status, after["balance"]) == (200, 1500)
    # The same key with another amount is refused (not replayed as if it matched), and changes nothing.
    status, error = await call(admin, "POST", "/admin/tenants/acme/credits", json={"amount": 400, "idempotency_key": "inv-1"})
    assert_error(status, error, 422, "idempotency_key")
    assert error["error"]["code"] == "idempotency_key_reused"
    status, after = await call(admin, "POST", "/admin/tenants/acme/credits", json={"amount": 5})
    assert after["balance"] == 1505
    assert_error(*await call(admin, "POST", "/admin/tenants/nobody/credits", json={"amount": 5}), 404)

    status, ledger = await call(admin, "GET", "/admin/tenants/acme/ledger")
    assert status == 200 and ledger["object"] == "list"
    assert [(e["type"], e["credits"], e["balance_after"]) for e in ledger["data"]] == [
        ("topup", 5, 1505), ("topup", 500, 1500), ("grant", 1000, 1000),
    ]
    status, ledger = await call(admin, "GET", "/admin/tenants/acme/ledger", params={"limit": "1"})
    assert [e["credits"] for e in ledger["data"]] == [5]
    for bad in ("0", "1001", "x", "-1"):
        assert_error(*await call(admin, "GET", "/admin/tenants/acme/ledger", params={"limit": bad}), 400, "limit")


async def test_key_contract(admin):
    await call(admin, "POST", "/admin/tenants", json={"id": "acme"})
    expires = int(time.time()) + 3600
    status, created = await call(
        admin, "POST", "/admin/keys",
        json={"tenant": "acme", "name": "ci", "models": ["sovereign-alpha"], "rpm": 60, "max_concurrency": 2, "expires_at": expires},
    )
    assert status == 201
    assert created["key"].startswith("sk-sov-live-") and len(created["key"]) >= len("sk-sov-live-") + 32
    assert {k: created[k] for k in ("tenant", "name", "models", "rpm", "max_concurrency", "expires_at", "revoked_at")} == {
        "tenant": "acme", "name": "ci", "models": ["sovereign-alpha"], "rpm": 60, "max_concurrency": 2,
        "expires_at": expires, "revoked_at": None,
    }
    status, listed = await call(admin, "GET", "/admin/keys", params={"tenant": "acme"})
    assert status == 200 and listed["object"] == "list"
    public = {k: v for k, v in created.items() if k != "key"}
    assert listed["data"] == [public]
    assert "key" not in listed["data"][0] and "hash" not in str(listed)

    # The key works until it is revoked.
    client = admin.running.openai(created["key"])
    assert (await client.models.list()).data
    status, revoked = await call(admin, "DELETE", f"/admin/keys/{created['id']}")
    assert status == 200 and revoked["id"] == created["id"] and revoked["revoked_at"] >= created["created_at"]
    assert_error(*await call(admin, "DELETE", "/admin/keys/key_nope"), 404)
    assert_error(*await call(admin, "GET", "/admin/keys", params={"tenant": "nobody"}), 404)
    assert_error(*await call(admin, "POST", "/admin/keys", json={"tenant": "nobody"}), 404)


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/admin/tenants", {"credits": 5}, "id"),
        ("/admin/tenants", {"id": "acme", "credits": "5"}, "credits"),
        ("/admin/tenants", {"id": "acme", "credits": True}, "credits"),
        ("/admin/tenants", {"id": "acme", "credits": -1}, "credits"),
        ("/admin/tenants", {"id": "bad id!"}, "id"),
        ("/admin/tenants", {"id": "acme", "extra": 1}, "extra"),
        ("/admin/tenants/acme/credits", {}, "amount"),
        ("/admin/tenants/acme/credits", {"amount": 0}, "amount"),
        ("/admin/tenants/acme/credits", {"amount": 1.5}, "amount"),
        ("/admin/tenants/acme/credits", {"amount": 5, "idempotency_key": 7}, "idempotency_key"),
        ("/admin/keys", {}, "tenant"),
        ("/admin/keys", {"tenant": "acme", "models": ["sovereign-alpha", "gpt-x"]}, "models[1]"),
        ("/admin/keys", {"tenant": "acme", "models": "sovereign-alpha"}, "models"),
        ("/admin/keys", {"tenant": "acme", "models": [1]}, "models[0]"),
        ("/admin/keys", {"tenant": "acme", "rpm": 0}, "rpm"),
        ("/admin/keys", {"tenant": "acme", "max_concurrency": "3"}, "max_concurrency"),
        ("/admin/keys", {"tenant": "acme", "expires_at": 1000}, "expires_at"),
        ("/admin/keys", {"tenant": "acme", "name": ["x"]}, "name"),
    ],
)
async def test_bad_input_is_a_4xx_naming_the_field(admin, path, body, param):
    await call(admin, "POST", "/admin/tenants", json={"id": "acme"})
    assert_error(*await call(admin, "POST", path, json=body), 400, param)


async def test_unparseable_bodies(admin):
    for data in (b"{not json", b"[1, 2]", b""):
        status, body = await call(admin, "POST", "/admin/tenants", data=data, headers={"Content-Type": "application/json"})
        assert 400 <= status < 500
        assert body["error"]["code"] in ("invalid_json", "invalid_value")


async def test_admin_token_is_required(admin, store_url):
    running = admin.running
    await call(admin, "POST", "/admin/tenants", json={"id": "acme"})
    _, created = await call(admin, "POST", "/admin/keys", json={"tenant": "acme"})
    async with aiohttp.ClientSession(base_url=running.base_url) as anonymous:
        for headers in ({}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Bearer {created['key']}"},
                        {"Authorization": ADMIN_TOKEN}, {"Authorization": f"Basic {ADMIN_TOKEN}"}):
            for method, path in (("GET", "/admin/tenants/acme"), ("POST", "/admin/tenants"), ("GET", "/admin/keys?tenant=acme"),
                                 ("DELETE", f"/admin/keys/{created['id']}")):
                status, body = await call(anonymous, method, path, headers=headers, json={"id": "x"})
                assert_error(status, body, 401)
    # Nothing changed: the key still works.
    assert (await running.openai(created["key"]).models.list()).data
    # The admin token is not a client key either.
    with pytest.raises(openai.AuthenticationError):
        await running.openai(ADMIN_TOKEN).models.list()


async def test_admin_api_is_absent_without_a_token(mock, gateway_factory, redis_prefix):
    running = await gateway_factory(make_settings(mock.url, prefix=redis_prefix, pipeline=["auth"], admin_token=None))
    async with aiohttp.ClientSession(base_url=running.base_url, headers=AUTH) as session:
        for method, path in (("GET", "/admin/tenants/acme"), ("POST", "/admin/tenants"), ("GET", "/admin/keys")):
            assert_error(*await call(session, method, path, json={"id": "acme"}), 404)


async def test_separate_admin_port(mock, redis_prefix, tmp_path):
    from tests.support import REDIS_URL, free_port, settings_data, spawn_gateway

    port = free_port()
    data = settings_data(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth"], admin={"port": port})
    proc, base = await spawn_gateway(data, tmp_path)
    try:
        async with aiohttp.ClientSession(headers=AUTH) as session:
            assert_error(*await call(session, "POST", base + "/admin/tenants", json={"id": "acme"}), 404)
            status, tenant = await call(session, "POST", f"http://127.0.0.1:{port}/admin/tenants", json={"id": "acme"})
            assert (status, tenant["id"]) == (201, "acme")
            async with session.get(f"http://127.0.0.1:{port}/admin/tenants/acme", headers={"Authorization": "Bearer x"}) as resp:
                assert resp.status == 401 and resp.headers["X-Request-ID"]
        # The console there links no tenant view: that one is served on the client port only (it was a 404 link).
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:  # (unsafe: an IP host)
            async with browser.post(f"http://127.0.0.1:{port}/console/login", data={"token": ADMIN_TOKEN}) as resp:
                page = await resp.text()
            assert 'id="tenants"' in page and 'href="/console/tenant"' not in page
    finally:
        proc.signal(15)
        proc.wait(15)


async def test_top_up_edges_an_empty_idempotency_key_and_the_largest_balance(admin):
    from proxy.store.accounts import MAX_BALANCE, MAX_CREDITS

    assert (await call(admin, "POST", "/admin/tenants", json={"id": "edge", "credits": MAX_CREDITS - 10}))[0] == 201
    # "" used to mean "make one up", so each repeat was credited again.
    for _ in range(2):
        assert_error(*await call(admin, "POST", "/admin/tenants/edge/credits", json={"amount": 5, "idempotency_key": ""}),
                     400, "idempotency_key")
    for n in range(3):
        assert (await call(admin, "POST", "/admin/tenants/edge/credits", json={"amount": MAX_CREDITS, "idempotency_key": f"big-{n}"}))[0] == 200
    # A fifth 10^15 would pass the largest balance (sums must stay exact): refused, its key not spent.
    assert_error(*await call(admin, "POST", "/admin/tenants/edge/credits", json={"amount": MAX_CREDITS, "idempotency_key": "big-3"}),
                 400, "amount")
    status, after = await call(admin, "POST", "/admin/tenants/edge/credits", json={"amount": 7, "idempotency_key": "big-3"})
    assert (status, after["balance"]) == (200, MAX_BALANCE - 3)
    assert_error(*await call(admin, "POST", "/admin/keys", json={"tenant": "edge", "expires_at": 1e308}), 400, "expires_at")


async def test_tenants_are_listed_a_page_at_a_time(admin):
    """The list used to stop at 1,000 without saying so."""
    ids = [f"page-{i:02d}" for i in range(5)]
    for tenant in ids:
        assert (await call(admin, "POST", "/admin/tenants", json={"id": tenant}))[0] == 201
    seen, after = [], ""
    while True:
        status, page = await call(admin, "GET", f"/admin/tenants?limit=2&after={after}")
        assert status == 200 and len(page["data"]) <= 2
        seen += [t["id"] for t in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert [t for t in seen if t.startswith("page-")] == ids
    assert_error(*await call(admin, "GET", "/admin/tenants?limit=0"), 400, "limit")
