"""A real MCP server (the official `mcp` SDK's MCPServer) that the agent tests run.

    python mcp_server.py --log CALLS.jsonl stdio
    python mcp_server.py --log CALLS.jsonl http PORT

Every tool call is appended to the log file as one JSON line (tool name and
arguments), so a test can assert what the gateway really called. It also
writes the environment it was started with (`--env-dump FILE`) so the stdio
tests can check the gateway gave it a clean one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError

parser = argparse.ArgumentParser()
parser.add_argument("--log", required=True)
parser.add_argument("--env-dump")
parser.add_argument("transport", choices=["stdio", "http"])
parser.add_argument("port", nargs="?", type=int, default=0)
args = parser.parse_args()

if args.env_dump:
    with open(args.env_dump, "w") as f:
        json.dump(dict(os.environ), f)

server = MCPServer("test-tools")


def record(tool: str, arguments: dict) -> None:
    with open(args.log, "a") as f:
        f.write(json.dumps({"tool": tool, "arguments": arguments, "pid": os.getpid()}) + "\n")


@server.tool(description="The weather in a city.")
def weather(city: str) -> str:
    record("weather", {"city": city})
    return f"sunny and 21 degrees in {city}"


@server.tool(description="Adds two integers.")
def add(a: int, b: int) -> str:
    record("add", {"a": a, "b": b})
    return str(a + b)


@server.tool(description="Always fails.")
def broken(reason: str) -> str:
    record("broken", {"reason": reason})
    raise ToolError(f"the tool broke: {reason}")


@server.tool(description="Waits, then answers.")
async def slow(seconds: float) -> str:
    record("slow", {"seconds": seconds})
    await asyncio.sleep(seconds)
    return "done waiting"


@server.tool(description="Returns a long text.")
def big(size: int) -> str:
    record("big", {"size": size})
    return "x" * size


def echo(text: str) -> str:
    record("echo", {"text": text})
    return text


@server.tool(description="Adds the echo tool and tells the client its tools changed.")
async def grow(ctx: Context) -> str:
    record("grow", {})
    server.add_tool(echo, name="echo", description="Echoes the text.")
    await ctx.session.send_tool_list_changed()
    return "grown"


@server.tool(description="Exits the server process (to test restarts).")
def crash() -> str:
    record("crash", {})
    os._exit(3)


if args.transport == "stdio":
    server.run("stdio")
else:
    import uvicorn

    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=args.port, log_level="warning")
    sys.exit(0)
