"""Agent-mode test harness: a real MCP server process and a scripted provider.

`McpServer` runs tests/middleware/agent/mcp_server.py (the official MCP SDK)
over streamable HTTP on a free loopback port; `stdio_command` gives the
command line the gateway runs for the same server over stdio. Both record
every tool call in a JSON-lines file the test reads back.

`ScriptedProvider` is a chat-completions provider on a real socket whose
answer to the n-th request is decided by the test (`script(body, n)`), and
which keeps every request body, so a test asserts exactly what the gateway
sent: the tools offered, the tool results, `tool_choice` on the last call.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tests.support import free_port, provider

SERVER_SCRIPT = str(Path(__file__).with_name("mcp_server.py"))
AGENT = "sorat-agent"
USAGE = {"prompt_tokens": 40, "completion_tokens": 10, "total_tokens": 50}


def read_calls(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def stdio_command(log: Path, env_dump: Path | None = None) -> list[str]:
    extra = ["--env-dump", str(env_dump)] if env_dump else []
    return [sys.executable, SERVER_SCRIPT, "--log", str(log), *extra, "stdio"]


class McpServer:
    """The test MCP server over streamable HTTP, as a child process."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> McpServer:
        self.proc = subprocess.Popen(
            [sys.executable, SERVER_SCRIPT, "--log", str(self.log), "http", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the MCP server exited")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the MCP server did not start")

    def calls(self) -> list[dict[str, Any]]:
        return read_calls(self.log)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def tool_call_completion(calls: list[tuple[str, str, dict[str, Any]]], content: str | None = None) -> dict[str, Any]:
    """A chat.completion whose message calls tools: (id, name, arguments)."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": content,
        "tool_calls": [
            {"id": ident, "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}
            for ident, name, args in calls
        ],
    }
    return _completion(message, "tool_calls")


def text_completion(text: str) -> dict[str, Any]:
    return _completion({"role": "assistant", "content": text}, "stop")


def _completion(message: dict[str, Any], finish: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-" + str(time.monotonic_ns()), "object": "chat.completion", "created": int(time.time()),
        "model": "mock-model", "choices": [{"index": 0, "message": message, "finish_reason": finish}], "usage": dict(USAGE),
    }


def as_chunks(completion: dict[str, Any], include_usage: bool) -> list[dict[str, Any]]:
    """A completion as the chunks a provider streams (text in pieces, each tool call in two fragments)."""
    base = {"id": completion["id"], "object": "chat.completion.chunk", "created": completion["created"], "model": "mock-model"}
    choice = completion["choices"][0]
    message = choice["message"]
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    text = message.get("content") or ""
    for start in range(0, len(text), 5):
        chunks.append({**base, "choices": [{"index": 0, "delta": {"content": text[start:start + 5]}, "finish_reason": None}]})
    for index, call in enumerate(message.get("tool_calls") or []):
        arguments = call["function"]["arguments"]
        half = len(arguments) // 2
        chunks.append({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": index, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": arguments[:half]}}
        ]}, "finish_reason": None}]})
        chunks.append({**base, "choices": [{"index": 0, "delta": {"tool_calls": [
            {"index": index, "function": {"arguments": arguments[half:]}}
        ]}, "finish_reason": None}]})
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}]})
    if include_usage:
        chunks.append({**base, "choices": [], "usage": completion["usage"]})
    return chunks


Script = Callable[[dict[str, Any], int], dict[str, Any]]


class ScriptedProvider:
    """Answers each chat request with `script(body, n)` (a chat.completion), as JSON or as a stream."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        completion = self.script(body, len(self.requests))
        if not body.get("stream"):
            return web.json_response(completion)
        include_usage = (body.get("stream_options") or {}).get("include_usage") is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in as_chunks(completion, include_usage):
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    @asynccontextmanager
    async def serve(self):
        async with provider(self.handle) as url:
            yield url


def agent_config(servers: dict[str, dict[str, Any]], **agent: Any) -> dict[str, Any]:
    """Settings overrides: the given tool servers and the agent model `sorat-agent` over sovereign-alpha."""
    return {
        "tool_servers": servers,
        "models": {AGENT: {"agent": {"model": "sovereign-alpha", "tool_servers": list(servers), **agent}}},
    }
