"""Session titles: made in the background after the first reply, billed as "title" calls.

The simulated provider is wrapped so that title requests (recognised by the title
prompt) can be made slow or failing while ordinary turns stay fast.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from middleware.sessions.unit import DEFAULT_TITLE_PROMPT
from proxy.store.accounts import Accounts
from proxy.core.gateway import Gateway
from proxy.devtools.mock_upstream import MockUpstream
from proxy.core.settings import ConfigError
from tests.middleware.sessions.test_sessions import api, turn
from tests.support import REDIS_URL, RunningGateway, make_settings


class TitleMock(MockUpstream):
    """The simulated provider, with knobs for the requests that carry the title prompt."""

    def __init__(self) -> None:
        super().__init__()
        self.title_delay = 0.0
        self.title_failures = 0  # the next N title requests get a 400
        self.titles: list[dict[str, Any]] = []

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = orjson.loads(await request.read())  # aiohttp caches the body for the real handler
        messages = body.get("messages") or [{}]
        if messages[0].get("content") == DEFAULT_TITLE_PROMPT:
            self.titles.append(body)
            await asyncio.sleep(self.title_delay)
            if self.title_failures:
                self.title_failures -= 1
                error = {"error": {"message": "no", "type": "invalid_request_error", "param": None, "code": "mock_failure"}}
                return web.json_response(error, status=400)
        return await super()._chat_completions(request)


@pytest.fixture
async def title_mock():
    upstream = TitleMock()
    upstream.url = await upstream.start()
    yield upstream
    await upstream.close()


async def start(mock: TitleMock, gateway_factory, prefix: str, pipeline: list[str], units: dict[str, Any] | None = None,
                **overrides: Any) -> RunningGateway:
    settings = make_settings(mock.url, store_url=REDIS_URL, prefix=prefix, pipeline=pipeline,
                             units={"sessions": units or {}}, **overrides)
    return await gateway_factory(settings)


async def tenant_key(running: RunningGateway, tenant: str, credits: int = 100_000) -> str:
    accounts = Accounts(running.gateway.store)
    await accounts.create_tenant(tenant, credits)
    key, _ = await accounts.create_key(tenant)
    return key


async def wait_title(running: RunningGateway, session: str, key: str | None = None, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = await api(running, "GET", f"/sessions/{session}", key)
        if body.get("title"):
            return body["title"]
        await asyncio.sleep(0.05)
    raise AssertionError("no title was stored")


async def test_title_arrives_after_the_reply_and_is_billed_as_title(title_mock, gateway_factory, redis_prefix):
    running = await start(title_mock, gateway_factory, redis_prefix, ["auth", "sessions", "metering"])
    key = await tenant_key(running, "acme")
    client = running.openai(key)
    title_mock.title_delay = 1.5

    started = time.monotonic()
    _, reply = await turn(client, "trip", [{"role": "user", "content": "plan a trip to Lisbon"}])
    replied = time.monotonic() - started
    assert replied < 1.0  # the slow title request did not hold up the reply
    status, body = await api(running, "GET", "/sessions/trip", key)
    assert status == 200 and body["title"] is None  # not there yet: it is still being made

    title = await wait_title(running, "trip", key)
    assert time.monotonic() - started >= 1.5
    sent = title_mock.titles[0]
    assert sent["model"] == "mock-model" and sent["stream"] is False
    assert "plan a trip to Lisbon" in sent["messages"][1]["content"] and reply["content"] in sent["messages"][1]["content"]
    words = sent["messages"][1]["content"].split()
    assert title == " ".join((words * 8)[:8])  # the mock's deterministic answer, stored as the title
    listed = (await api(running, "GET", "/sessions", key))[1]["data"]
    assert listed[0]["title"] == title

    await running.gateway.drain(5)
    ledger = await Accounts(running.gateway.store).ledger("acme")
    charges = [e for e in ledger if e["type"] == "charge"]
    assert sorted(e["kind"] for e in charges) == ["request", "title"]
    title_entry = next(e for e in charges if e["kind"] == "title")
    assert title_entry["credits"] < 0 and title_entry["key_id"] == charges[0]["key_id"]
    tenant = await Accounts(running.gateway.store).tenant("acme")
    assert tenant["balance"] == 100_000 + sum(e["credits"] for e in charges)

    # Later turns do not ask for another title.
    await turn(client, "trip", [{"role": "user", "content": "and Porto?"}])
    await running.gateway.drain(5)
    assert len(title_mock.titles) == 1


async def test_one_title_for_concurrent_first_turns(title_mock, gateway_factory, redis_prefix):
    running = await start(title_mock, gateway_factory, redis_prefix, ["sessions"])
    client = running.openai()
    await asyncio.gather(
        *(turn(client, "crowd", [{"role": "user", "content": f"question {i}"}], stream=bool(i % 2)) for i in range(30))
    )
    assert await wait_title(running, "crowd")
    await running.gateway.drain(5)
    assert len(title_mock.titles) == 1


async def test_failed_title_is_retried_once_and_logged_without_prompt(title_mock, gateway_factory, redis_prefix):
    running = await start(title_mock, gateway_factory, redis_prefix, ["sessions"])
    client = running.openai()
    title_mock.title_failures = 5
    with capture_logs() as logs:
        _, reply = await turn(client, "untitled", [{"role": "user", "content": "confidential merger plan"}], stream=True)
        assert reply["content"].startswith("confidential")
        await running.gateway.drain(5)
    assert len(title_mock.titles) == 2
    failures = [e for e in logs if e["event"] == "session.title_failed"]
    assert [e["attempt"] for e in failures] == [1, 2]
    assert all("confidential" not in repr(e) for e in logs)
    status, body = await api(running, "GET", "/sessions/untitled")
    assert status == 200 and body["title"] is None and body["message_count"] == 2
    await turn(client, "untitled", [{"role": "user", "content": "next"}])
    await running.gateway.drain(5)
    assert len(title_mock.titles) == 2  # a failed title is not asked for again


async def test_title_model_setting_and_titles_off(title_mock, gateway_factory, redis_prefix):
    mini = {"upstream": "default", "upstream_model": "mini-model", "free": True}
    running = await start(title_mock, gateway_factory, redis_prefix, ["sessions"], units={"title_model": "sovereign-mini"},
                          models={"sovereign-mini": mini})
    await turn(running.openai(), "m", [{"role": "user", "content": "hello"}])
    assert await wait_title(running, "m")
    assert title_mock.titles[0]["model"] == "mini-model"

    off = await start(title_mock, gateway_factory, redis_prefix + ":off", ["sessions"], units={"titles": False})
    await turn(off.openai(), "quiet", [{"role": "user", "content": "hello"}])
    await off.gateway.drain(5)
    assert len(title_mock.titles) == 1
    assert (await api(off, "GET", "/sessions/quiet"))[1]["title"] is None


def test_unknown_title_model_fails_at_start():
    settings = make_settings("http://127.0.0.1:9/v1", pipeline=["sessions"], units={"sessions": {"title_model": "nope"}})
    with pytest.raises(ConfigError, match="units.sessions.title_model"):
        Gateway(settings)
