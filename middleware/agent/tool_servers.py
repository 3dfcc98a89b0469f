"""Long-lived MCP client sessions to the operator's tool servers (`tool_servers.<label>`).

Each `ToolServer` owns one background task that connects (streamable HTTP, or
a child process over stdio started by `launch.py` with a clean environment),
initialises the session and lists the tools (keeping the allowlisted ones).
It then watches the connection: a `notifications/tools/list_changed` from the
server re-lists the tools, a failed ping or a tool call that broke the
connection ends the session, and the task reconnects with capped, jittered
backoff — so a server that is down at start-up, or a stdio server that died,
comes back by itself. While a server is not connected its tools are simply
not offered, and `/readyz` lists ``tool_server_unreachable:<label>``.

Tool calls run on the request's task through the shared session
(`ToolServer.call`), with the server's ``timeout_seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import sys
from pathlib import Path
from typing import Any

import orjson
import structlog
from mcp import ClientSession, types
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError

from middleware.agent.launch import SPEC
from proxy.core.settings import ToolServerSettings

log = structlog.get_logger("sovereign")

LAUNCHER = str(Path(__file__).with_name("launch.py"))
PING_SECONDS = 10.0  # how often an idle connection is checked
BACKOFF_FIRST = 0.25  # seconds before the first reconnect attempt
BACKOFF_MAX = 30.0


class ToolUnavailable(Exception):
    """The server is not connected (or the connection broke during the call)."""


class ToolServer:
    """One configured MCP server: its session, its current tools, and the task that keeps them."""

    def __init__(self, label: str, settings: ToolServerSettings) -> None:
        self.label = label
        self.settings = settings
        self.session: ClientSession | None = None
        self.tools: dict[str, types.Tool] = {}
        self.problem: str | None = "not connected yet"
        self.connections = 0  # sessions opened so far (tests watch reconnects)
        self._wake = asyncio.Event()
        self._stale = False  # the server said its tools changed
        self._broken = False  # a call found the connection gone
        self._task: asyncio.Task[None] | None = None

    @property
    def connected(self) -> bool:
        return self.session is not None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"tool_server:{self.label}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None

    # -- the connection ----------------------------------------------------------
    async def _run(self) -> None:
        delay = BACKOFF_FIRST
        while True:
            opened = self.connections
            try:
                await self._serve()
            except Exception as exc:  # noqa: BLE001 - any failure means: reconnect later
                self.problem = _describe(exc)
            finally:
                self.session = None
                self.tools = {}
            if self.connections > opened:
                delay = BACKOFF_FIRST  # it was up: start the backoff afresh
            log.warning("tool_server.unreachable", server=self.label, problem=self.problem, retry_in=round(delay, 2))
            await asyncio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _serve(self) -> None:
        """Open a session, list the tools, and return when the connection is gone."""
        async with contextlib.AsyncExitStack() as stack:
            read, write = await stack.enter_async_context(self._transport(stack))
            session = await stack.enter_async_context(ClientSession(read, write, message_handler=self._on_message))
            async with asyncio.timeout(self.settings.timeout_seconds):
                await session.initialize()
                await self._list_tools(session)
            self.session, self.problem, self._broken = session, None, False
            self.connections += 1
            log.info("tool_server.connected", server=self.label, tools=sorted(self.tools))
            while not self._broken:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(PING_SECONDS):
                        await self._wake.wait()
                self._wake.clear()
                async with asyncio.timeout(self.settings.timeout_seconds):
                    if self._stale:
                        self._stale = False
                        await self._list_tools(session)
                        log.info("tool_server.tools_changed", server=self.label, tools=sorted(self.tools))
                    elif not self._broken:
                        await session.send_ping()
            self.problem = "the connection broke"

    def _transport(self, stack: contextlib.AsyncExitStack) -> Any:
        settings = self.settings
        if settings.url is not None:
            headers = {name: value.get_secret_value() for name, value in settings.headers.items()}
            http = create_mcp_http_client(headers=headers)
            stack.push_async_callback(http.aclose)
            return streamable_http_client(settings.url, http_client=http)
        assert settings.command is not None
        program = shutil.which(settings.command[0])
        if program is None:
            raise FileNotFoundError(f"program `{settings.command[0]}` not found")
        env = {name: value.get_secret_value() for name, value in settings.env.items()}
        spec = orjson.dumps({"argv": [program, *settings.command[1:]], "env": env}).decode()
        # The launcher gets the SDK's few inherited variables plus the spec; the
        # server itself gets exactly `env` (see launch.py).
        params = StdioServerParameters(command=sys.executable, args=["-I", LAUNCHER], env={SPEC: spec})
        return stdio_client(params, errlog=sys.stderr)

    async def _list_tools(self, session: ClientSession) -> None:
        allowed = set(self.settings.tools) if self.settings.tools is not None else None
        tools: dict[str, types.Tool] = {}
        cursor: str | None = None
        while True:
            page = await session.list_tools(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
            for tool in page.tools:
                if allowed is None or tool.name in allowed:
                    tools[tool.name] = tool
            cursor = page.next_cursor
            if not cursor:
                break
        self.tools = tools

    def _lost(self) -> None:
        """The connection is gone (a stdio server died, an HTTP server went away): reconnect now."""
        self.session = None
        self.tools = {}
        self._broken = True
        self._wake.set()

    async def _on_message(self, message: Any) -> None:
        # Runs inside the session's receive loop: only flag the work, never await session I/O here.
        if isinstance(message, types.ToolListChangedNotification):
            self._stale = True
            self._wake.set()

    # -- tool calls ------------------------------------------------------------------
    async def call(self, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
        """Run one tool; raises ToolUnavailable, TimeoutError or MCPError."""
        session = self.session
        if session is None:
            raise ToolUnavailable(self.problem or "not connected")
        timeout = self.settings.timeout_seconds
        try:
            async with asyncio.timeout(timeout):
                result = await session.call_tool(tool, arguments, read_timeout_seconds=timeout)
        except TimeoutError:
            raise
        except MCPError as exc:
            if exc.error.code != types.CONNECTION_CLOSED:
                raise  # the server answered with an error
            self._lost()
            raise ToolUnavailable("the connection closed") from None
        except Exception as exc:  # the transport failed
            self._lost()
            raise ToolUnavailable(_describe(exc)) from None
        if not isinstance(result, types.CallToolResult):
            raise MCPError(code=types.INTERNAL_ERROR, message="the server asked for input, which agent mode cannot give")
        return result


class ToolServers:
    """All configured tool servers of a gateway, started at start-up and closed at exit."""

    def __init__(self, settings: dict[str, ToolServerSettings]) -> None:
        self.servers = {label: ToolServer(label, entry) for label, entry in settings.items()}

    def __getitem__(self, label: str) -> ToolServer:
        return self.servers[label]

    def start(self) -> None:
        for server in self.servers.values():
            server.start()

    async def close(self) -> None:
        await asyncio.gather(*(server.close() for server in self.servers.values()))

    def unreachable(self) -> list[str]:
        return [label for label, server in self.servers.items() if not server.connected]


def _describe(exc: BaseException) -> str:
    """A short, secret-free description of a connection failure (no URLs with tokens, no headers)."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, MCPError):
        return f"MCP error {exc.error.code}: {exc.error.message}"[:200]
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, FileNotFoundError):
        return str(exc)[:200]
    return type(exc).__name__


__all__ = ["ToolServer", "ToolServers", "ToolUnavailable"]
