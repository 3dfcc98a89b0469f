"""The benchmark's MCP tool server (stdio), run by the `agent` profile's gateway: one cheap tool."""

from mcp.server.mcpserver import MCPServer

server = MCPServer("bench-tools", log_level="WARNING")


@server.tool(description="Looks up a short fact about a city.")
def lookup(city: str) -> str:
    return f"{city}: 21 degrees, sunny"


if __name__ == "__main__":
    server.run("stdio")
