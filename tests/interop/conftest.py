"""The interoperability suite's gateway: a real `sovereign serve` process in front of a
real `sovereign mock-upstream` process (a reasoning provider: it sends
`reasoning_content`), with the shipped default pipeline and a funded tenant.

One pair of processes for the whole suite (package scope: the frameworks'
loops are short, the process start is not); each test builds its own clients,
so nothing is shared between tests but the tenant's balance.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import aiohttp
import pytest

from tests.support import (
    ADMIN_TOKEN,
    Process,
    free_port,
    settings_data,
    spawn_gateway,
    wait_http,
)

MODEL = "sovereign-alpha"


@dataclass
class Interop:
    """Where the gateway listens and a client key of a funded tenant."""

    v1: str
    key: str
    mock_url: str


async def _client_key(base: str) -> str:
    """A key of a new, well-funded tenant, made over the admin API."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with aiohttp.ClientSession(headers=admin) as session:
        async with session.post(base + "/admin/tenants", json={"id": "interop", "credits": 10**12}) as resp:
            assert resp.status == 201, await resp.text()
        async with session.post(base + "/admin/keys", json={"tenant": "interop", "name": "frameworks"}) as resp:
            assert resp.status == 201, await resp.text()
            return (await resp.json())["key"]


@pytest.fixture(scope="package")
def interop(tmp_path_factory) -> Iterator[Interop]:
    tmp = tmp_path_factory.mktemp("interop")
    port = free_port()
    mock = Process(["mock-upstream", "--port", str(port), "--reasoning-chunks", "2"], log_path=tmp / "mock.log")
    gateway = None
    try:
        mock_url = f"http://127.0.0.1:{port}/v1"
        # No `pipeline`: the gateway runs the shipped default, every unit a client meets.
        data = settings_data(mock_url)
        del data["pipeline"]
        # The two processes start side by side; the gateway needs the provider only for requests.
        gateway, base = asyncio.run(spawn_gateway(data, tmp, name="interop"))
        asyncio.run(wait_http(mock_url + "/models", proc=mock))
        key = asyncio.run(_client_key(base))
        yield Interop(v1=base + "/v1", key=key, mock_url=mock_url)
    finally:
        if gateway is not None:
            gateway.stop()
        mock.stop()
