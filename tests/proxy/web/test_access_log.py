"""The access log and request metrics of a real `sovereign serve`: one line per request with what it was charged,
a client that left included."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp

from proxy.core.settings import StoreSettings
from proxy.store.accounts import Accounts
from proxy.store.store import Store
from tests.support import REDIS_URL, settings_data, spawn_gateway, until

CHAT = {"model": "sovereign-alpha", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 20}


async def test_every_request_has_one_line_with_its_charge_a_client_that_left_included(mock, redis_prefix, tmp_path):
    data = settings_data(mock.url, store_url=REDIS_URL, prefix=redis_prefix, pipeline=["auth", "metering"],
                         logging={"level": "info", "access_log": True})
    proc, base = await spawn_gateway(data, tmp_path)
    store = Store(StoreSettings(url=REDIS_URL, prefix=redis_prefix))
    await store.connect()
    try:
        accounts = Accounts(store)
        tenant = "t-" + uuid.uuid4().hex[:10]
        await accounts.create_tenant(tenant, 100_000)
        key, _ = await accounts.create_key(tenant)
        auth = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as http:
            async with http.post(base + "/v1/chat/completions", json=CHAT, headers={**auth, "X-Request-ID": "log-json"}) as resp:
                assert resp.status == 200 and await resp.json()
            async with http.post(base + "/v1/chat/completions", json={**CHAT, "stream": True},
                                 headers={**auth, "X-Request-ID": "log-stream"}) as resp:
                assert (await resp.read()).endswith(b"data: [DONE]\n\n")
            # A slow stream the client leaves after its first content chunk.
            resp = await http.post(base + "/v1/chat/completions", json={**CHAT, "stream": True},
                                   headers={**auth, "X-Request-ID": "log-left", "x-mock-chunks": "20", "x-mock-delay-ms": "50"})
            async for line in resp.content:
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # a chunk with text in it: something was produced
            resp.close()
            await until(lambda: '"request_id":"log-left"' in proc.output(), timeout=10)
            async with http.get(base + "/metrics") as metrics:
                exposition = await metrics.text()
        for _ in range(100):  # the charges are written in the background
            ledger = {e["request_id"]: e for e in await accounts.ledger(tenant) if e["type"] == "charge"}
            if len(ledger) == 3:
                break
            await asyncio.sleep(0.05)
        logged = [json.loads(text) for text in proc.output().splitlines() if text.startswith("{")]
        lines = {line["request_id"]: line for line in logged
                 if line.get("event") == "request" and line.get("request_id", "").startswith("log-")}
    finally:
        proc.stop()
        await store.close()
    assert set(lines) == set(ledger) == {"log-json", "log-stream", "log-left"}
    for request_id, line in lines.items():
        entry = ledger[request_id]
        # The line carries the charge the ledger has: it was worked out before the line was written.
        assert (line["input_tokens"], line["output_tokens"], line["credits"], line["usage_source"]) == (
            entry["input_tokens"], entry["output_tokens"], -entry["credits"], entry["usage_source"]), request_id
    # Durations finer than uvloop's millisecond clock (two whole-millisecond ones would be a coincidence).
    assert any(lines[request_id]["duration_ms"] != round(lines[request_id]["duration_ms"]) for request_id in ("log-json", "log-stream"))
    assert (lines["log-left"]["status"], lines["log-left"]["outcome"]) == (200, "client_disconnected")
    assert lines["log-left"]["usage_source"] == "estimated" and lines["log-stream"]["outcome"] == "completed"
    counted = [sample for sample in exposition.splitlines() if sample.startswith("sovereign_requests_total{")
               and "/v1/chat/completions" in sample and 'status="200"' in sample]
    assert len(counted) == 1 and float(counted[0].rsplit(" ", 1)[1]) == 3.0  # the one that left is counted too
