"""Fixtures of the agent tests: one MCP server over streamable HTTP per module, and gateways that wait for it."""

from __future__ import annotations

import pytest

from tests.middleware.agent.support import McpServer
from tests.support import make_settings, until


@pytest.fixture(scope="module")
def mcp_http(tmp_path_factory):
    server = McpServer(tmp_path_factory.mktemp("mcp") / "calls.jsonl").start()
    yield server
    server.kill()


@pytest.fixture
def agent_gateway(gateway_factory):
    """Start a gateway in front of `url` with agent overrides and wait until its tool servers are connected."""

    async def start(url: str, *, connected: tuple[str, ...] = ("tools",), **kwargs):
        running = await gateway_factory(make_settings(url, **kwargs))
        unit = running.gateway.unit("agent")
        await until(lambda: all(unit.servers[label].connected for label in connected), timeout=20)
        return running

    return start
