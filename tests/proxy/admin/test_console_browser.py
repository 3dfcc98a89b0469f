"""The console in a real browser: headless Chromium (Debian's `chromium`) driven by Playwright.

Logs in (a wrong token is refused), creates a tenant and a key (the plaintext
shown once), tops up, edits and revokes, and finds the ledger and the usage
chart updated after real requests; the tenant view shows only its own tenant.
Screenshots go to ``test-artifacts/`` (gitignored).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from proxy.store.accounts import Accounts
from tests.support import ADMIN_TOKEN, REDIS_URL, REPO, make_settings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]

playwright_api = pytest.importorskip("playwright.async_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed (make test installs it)")


@pytest.fixture
async def browser(tmp_path):
    async with playwright_api.async_playwright() as pw:
        context = await pw.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS, viewport={"width": 1100, "height": 900},
        )
        try:
            yield context
        finally:
            await context.close()


async def shot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / name), full_page=True)


async def test_operator_console_end_to_end(browser, mock, gateway_factory, redis_prefix):
    running = await gateway_factory(make_settings(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"]))
    base = running.base_url
    page = browser.pages[0] if browser.pages else await browser.new_page()

    # A wrong token is refused; the right one opens a session in an http-only cookie.
    await page.goto(base + "/console/")
    await page.get_by_label("Admin token").fill("not-the-token")
    await page.get_by_role("button", name="Log in").click()
    await page.get_by_role("alert").filter(has_text="not the admin token").wait_for()
    assert await page.locator("#tenants").count() == 0
    await page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    await page.get_by_label("Admin token").press("Enter")  # the keyboard works as well as the mouse
    await page.locator("#tenants").wait_for()
    assert "sov_admin" not in await page.evaluate("document.cookie")
    cookie = next(c for c in await browser.cookies() if c["name"] == "sov_admin")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    # The session alone cannot change anything: a state-changing call needs the page's CSRF token.
    forged = await page.evaluate(
        """async () => (await fetch('/admin/tenants', {method: 'POST', headers: {'Content-Type': 'application/json'},
             body: JSON.stringify({id: 'forged'})})).status"""
    )
    assert forged == 401

    # Create a tenant.
    await page.get_by_label("Id").fill("acme")
    await page.get_by_label("Opening credits").fill("1000")
    await page.get_by_role("button", name="Create tenant").click()
    await page.wait_for_url("**/console/tenants/acme")
    assert await page.locator("#balance").inner_text() == "1000"

    # Create a key with a budget: its plaintext is shown once.
    new_key = page.get_by_role("form", name="New key")
    await new_key.get_by_label("Name").fill("ci")
    await new_key.get_by_label("Budget (credits)").fill("500")
    await new_key.get_by_role("button", name="Create key").click()
    await page.locator("#new-key:not([hidden])").wait_for()
    plaintext = await page.locator("#new-key-value").inner_text()
    assert plaintext.startswith("sk-sov-live-")
    await shot(page, "console-new-key.png")
    await page.get_by_role("button", name="Done").click()
    await page.locator("#keys").get_by_text("of 500 per day").wait_for()
    assert plaintext not in await page.content()

    # Top up.
    await page.get_by_label("Add credits").fill("250")
    await page.get_by_role("button", name="Top up").click()
    await page.locator("#balance", has_text="1250").wait_for()

    # Real requests with the new key, then the ledger and the usage chart show them.
    client = running.openai(plaintext)
    for words in ("one", "two three", "four five six"):
        await client.chat.completions.create(model="sovereign-alpha", messages=[{"role": "user", "content": words}], max_tokens=5)
    await running.gateway.drain()
    accounts = Accounts(running.gateway.store)
    charged = -sum(e["credits"] for e in await accounts.ledger("acme") if e["type"] == "charge")
    assert charged > 0
    await page.reload()
    assert await page.locator("#ledger tbody tr", has_text="charge").count() == 3
    await page.wait_for_selector(".usage[data-loaded]")
    totals = await page.eval_on_selector_all(".chart svg", "els => els.map(e => Number(e.dataset.total))")
    assert totals[0] == charged and totals[1] > 0  # credits and tokens
    assert await page.locator(".chart[data-metric=credits] rect").count() >= 1
    await page.get_by_label("Split by").select_option("key")
    await page.get_by_role("button", name="Show").click()
    await page.locator(".legend", has_text="key_").first.wait_for()
    assert int(await page.locator("#balance").inner_text()) == 1250 - charged
    await shot(page, "console-tenant.png")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "console-readme.png"), clip={"x": 0, "y": 0, "width": 1100, "height": 1000})
    await page.set_viewport_size({"width": 390, "height": 844})  # a phone
    await shot(page, "console-phone.png")
    await page.set_viewport_size({"width": 1100, "height": 900})

    # Edit the key's budget, then revoke it.
    key_row = page.locator("#keys tbody tr", has_text="ci")
    await key_row.get_by_text("Edit", exact=True).click()
    await key_row.get_by_label("Budget (credits)").fill("100")
    await key_row.get_by_role("button", name="Save").click()
    await page.locator("#keys", has_text="of 100 per day").wait_for()
    page.once("dialog", lambda dialog: dialog.accept())
    await page.locator("#keys tbody tr", has_text="ci").get_by_role("button", name="Revoke").click()
    await page.locator("#keys", has_text="revoked").wait_for()


async def test_tenant_view_shows_only_its_own_tenant(browser, mock, gateway_factory, redis_prefix):
    running = await gateway_factory(make_settings(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"]))
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant("acme", 5000)
    await accounts.create_tenant("globex", 7777)
    key, _ = await accounts.create_key("acme", name="acme-bot", budget_credits=900, budget_period="month")
    other_key, _ = await accounts.create_key("globex", name="globex-bot")
    await running.openai(key).chat.completions.create(model="sovereign-alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    await running.openai(other_key).chat.completions.create(model="sovereign-alpha", messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    await running.gateway.drain()
    page = browser.pages[0] if browser.pages else await browser.new_page()

    await page.goto(running.base_url + "/console/tenant")
    await page.get_by_label("API key").fill("sk-sov-live-" + "x" * 40)
    await page.get_by_role("button", name="Log in").click()
    await page.get_by_role("alert").filter(has_text="unknown").wait_for()
    await page.get_by_label("API key").fill(key)
    await page.get_by_role("button", name="Log in").click()
    await page.locator("#tenant-id", has_text="acme").wait_for()
    await page.wait_for_selector(".usage[data-loaded]")
    balance = (await accounts.tenant("acme"))["balance"]
    assert await page.locator("#balance").inner_text() == str(balance)
    text = await page.locator("main").inner_text()
    assert "acme-bot" in text and "of 900 per month" in text
    assert "globex" not in text and "7777" not in text
    charged = -sum(e["credits"] for e in await accounts.ledger("acme") if e["type"] == "charge")
    assert await page.eval_on_selector(".chart svg", "e => Number(e.dataset.total)") == charged
    # The tenant session opens no operator page or admin call.
    assert await page.evaluate("async () => (await fetch('/admin/tenants/globex')).status") == 401
    await shot(page, "console-tenant-view.png")
