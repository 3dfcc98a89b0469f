"""Tool servers: stdio servers with a clean environment that come back after dying, HTTP servers
that are down (readiness reasons, `error:` tool messages), and a real `sovereign serve` process."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from tests.middleware.agent.support import (
    AGENT,
    McpServer,
    ScriptedProvider,
    agent_config,
    read_calls,
    stdio_command,
    text_completion,
    tool_call_completion,
)
from tests.support import ADMIN_TOKEN, free_port, settings_data, spawn_gateway, until

PIPELINE = ["validation", "agent"]
QUESTION = [{"role": "user", "content": "Weather in Oslo?"}]


def calls_then_answer(*calls):
    def script(body, n):
        return tool_call_completion([calls[n - 1]]) if n <= len(calls) else text_completion("done")
    return script


def tool_results(body):
    return [m["content"] for m in body["messages"] if m["role"] == "tool"]


async def readyz(running) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(running.base_url + "/readyz") as r:
        return r.status, await r.json()


async def test_stdio_server_gets_only_its_configured_environment_and_is_restarted(tmp_path, agent_gateway, monkeypatch):
    monkeypatch.setenv("GATEWAY_ONLY_SECRET", "must-not-leak")
    log, env_dump = tmp_path / "calls.jsonl", tmp_path / "env.json"
    servers = {"tools": {"command": stdio_command(log, env_dump), "env": {"WEATHER_REGION": "north"}}}
    provider = ScriptedProvider(calls_then_answer(("c1", "weather", {"city": "Oslo"}), ("c2", "crash", {})))
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config(servers))
        server = running.gateway.unit("agent").servers["tools"]
        reply = await running.openai().chat.completions.create(model=AGENT, messages=QUESTION)
        assert reply.choices[0].message.content == "done"
        # The server process saw its configured variable and nothing of the gateway's environment.
        env = json.loads(env_dump.read_text())
        assert env["WEATHER_REGION"] == "north"
        assert not {"GATEWAY_ONLY_SECRET", "PATH", "HOME", "SOVEREIGN_TOOL_SERVER_SPEC"} & set(env)
        assert tool_results(provider.requests[1]) == ["sunny and 21 degrees in Oslo"]
        # The crash tool kills the process: the call fails, and the server is started again.
        assert tool_results(provider.requests[2])[-1].startswith("error: ")
        await until(lambda: server.connections >= 2 and server.connected, timeout=20)
        provider.script = calls_then_answer(("c3", "weather", {"city": "Rome"}))
        provider.requests.clear()
        await running.openai().chat.completions.create(model=AGENT, messages=QUESTION)
    assert tool_results(provider.requests[1]) == ["sunny and 21 degrees in Rome"]
    pids = [c["pid"] for c in read_calls(log)]
    assert pids[0] == pids[1] != pids[2]  # the same process until the crash, a new one after


async def test_tools_are_listed_again_when_the_server_says_they_changed(tmp_path, agent_gateway):
    servers = {"tools": {"command": stdio_command(tmp_path / "calls.jsonl")}}
    provider = ScriptedProvider(calls_then_answer(("c1", "grow", {})))
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config(servers))
        server = running.gateway.unit("agent").servers["tools"]
        assert "echo" not in server.tools
        await running.openai().chat.completions.create(model=AGENT, messages=QUESTION)
        await until(lambda: "echo" in server.tools, timeout=10)
        provider.script = lambda body, n: text_completion("ok")
        await running.openai().chat.completions.create(model=AGENT, messages=QUESTION)
    offered = [t["function"]["name"] for t in provider.requests[-1]["tools"]]
    assert "echo" in offered and "echo" not in [t["function"]["name"] for t in provider.requests[0]["tools"]]
    assert server.connections == 1  # the same session, re-listed


async def test_a_server_that_is_down_is_a_readiness_reason_not_a_failure(tmp_path, mcp_http, agent_gateway):
    down = f"http://127.0.0.1:{free_port()}/mcp"
    servers = {"tools": {"url": mcp_http.url}, "down": {"url": down, "timeout_seconds": 2}}
    provider = ScriptedProvider(calls_then_answer(("c1", "weather", {"city": "Oslo"})))
    async with provider.serve() as url:
        running = await agent_gateway(url, pipeline=PIPELINE, **agent_config(servers))
        status, body = await readyz(running)
        assert status == 200 and body["status"] == "ready"
        assert body["reasons"] == ["tool_server_unreachable:down"]
        # The agent still works with the tools it can reach.
        reply = await running.openai().chat.completions.create(model=AGENT, messages=QUESTION)
        assert reply.choices[0].message.content == "done"


async def test_a_server_that_goes_away_yields_an_error_tool_message(tmp_path, agent_gateway):
    server = McpServer(tmp_path / "calls.jsonl").start()
    try:
        provider = ScriptedProvider(calls_then_answer(("c1", "weather", {"city": "Oslo"})))
        async with provider.serve() as url:
            running = await agent_gateway(url, pipeline=PIPELINE, **agent_config({"tools": {"url": server.url, "timeout_seconds": 3}}))
            offered = running.gateway.unit("agent").servers["tools"]
            server.kill()
            # The tools were listed while it was up; the call now fails inside the loop.
            if offered.connected:
                reply = await running.openai().chat.completions.create(model=AGENT, messages=QUESTION)
                assert reply.choices[0].message.content == "done"
                assert tool_results(provider.requests[1])[0].startswith("error: ")
            await until(lambda: not offered.connected, timeout=20)
            status, body = await readyz(running)
            assert status == 200 and body["reasons"] == ["tool_server_unreachable:tools"]
    finally:
        server.kill()


async def test_sovereign_serve_runs_an_agent_end_to_end(tmp_path):
    """A real `sovereign serve` with a stdio tool server, configured through the environment."""
    log = tmp_path / "calls.jsonl"
    provider = ScriptedProvider(calls_then_answer(("c1", "add", {"a": 20, "b": 22})))
    async with provider.serve() as url:
        data = settings_data(url, pipeline=["auth", "validation", "responses", "sessions", "legacy_functions", "agent", "metering"],
                             models={AGENT: {"agent": {"model": "sovereign-alpha", "tool_servers": ["calc"], "max_iterations": 4}}},
                             logging={"level": "info", "access_log": True})
        # The tool server itself comes from env: SOVEREIGN_TOOL_SERVERS__<LABEL>__<FIELD>.
        command = json.dumps(stdio_command(log))
        proc, base = await spawn_gateway(data, tmp_path, env={"SOVEREIGN_TOOL_SERVERS__CALC__COMMAND": command},
                                         timeout=60)  # the MCP SDK's import is slow on a busy machine
        try:
            await until_connected(base)
            async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
                async with admin.post(base + "/admin/tenants", json={"id": "acme", "credits": 100_000}) as resp:
                    assert resp.status == 201
                async with admin.post(base + "/admin/keys", json={"tenant": "acme", "models": [AGENT]}) as resp:
                    key = (await resp.json())["key"]
                client = openai.AsyncOpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
                assert AGENT in [m.id async for m in client.models.list()]
                reply = await client.chat.completions.create(model=AGENT, messages=[{"role": "user", "content": "20+22?"}])
                with pytest.raises(openai.NotFoundError):  # the key's allowlist holds only the agent
                    await client.chat.completions.create(model="sovereign-alpha", messages=QUESTION)
                await client.close()
                async with admin.get(base + "/admin/tenants/acme/ledger") as resp:
                    ledger = (await resp.json())["data"]
        finally:
            proc.stop()
    assert reply.choices[0].message.content == "done"
    assert read_calls(log)[0]["arguments"] == {"a": 20, "b": 22}
    assert tool_results(provider.requests[1]) == ["42"]
    assert [e["model"] for e in ledger if e["type"] == "charge"] == [AGENT, AGENT]
    lines = [json.loads(line) for line in proc.output().splitlines() if line.startswith("{")]
    tool_lines = [line for line in lines if line.get("event") == "tool_call"]
    assert [(t["server"], t["tool"], t["outcome"]) for t in tool_lines] == [("calc", "add", "ok")]
    # Who, what, how long, how it went: never the arguments or the result.
    assert {"request_id", "server", "tool", "duration_ms", "outcome"} <= set(tool_lines[0])
    assert not {"arguments", "result", "output"} & set(tool_lines[0]) and "42" not in tool_lines[0].values()


async def until_connected(base: str) -> None:
    async with aiohttp.ClientSession() as http:
        async with asyncio.timeout(60):
            while True:
                async with http.get(base + "/readyz") as r:
                    body = await r.json()
                if r.status == 200 and not body.get("reasons"):
                    return
                await asyncio.sleep(0.05)
