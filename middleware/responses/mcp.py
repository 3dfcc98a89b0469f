"""Agent mode on the Responses API: server tool calls as `mcp_call` output items.

The agent unit (middleware/agent) runs the operator's MCP tools. For a
Responses request it leaves what it ran on the call (`call.agent.runs`) and,
in a stream, sends a marker chunk (``{"choices": [], MARKER: {"phase", "run"}}``)
when a tool call starts and when it ends. Here those become:

- JSON: `mcp_call` items (``server_label``, ``name``, ``arguments``, ``output``
  or ``error``) in front of the final message (`add_items`);
- stream: ``response.output_item.added``, ``response.mcp_call.in_progress``,
  ``response.mcp_call_arguments.done`` when a call starts, then
  ``response.mcp_call.completed`` (or ``.failed``) and
  ``response.output_item.done`` when it ends (`stream_events`).

A client-sent `mcp` tool travels to the agent unit as is (`chat_tool`), which
accepts it only when its `server_label` names one of the agent model's tool
servers; the tool echoed in the Response leaves out its headers and
authorization (`echoed_tool`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from proxy.core.call import SSEEvent
from proxy.core.ids import new_id

if TYPE_CHECKING:
    from middleware.responses.stream import StreamTranslator

MARKER = "sovereign.mcp_call"
_ECHOED = ("server_label", "server_url", "server_description", "allowed_tools", "require_approval", "connector_id")


def echoed_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A client `mcp` tool as the Response echoes it: no secrets."""
    return {"type": "mcp", **{key: tool[key] for key in _ECHOED if tool.get(key) is not None}}


def mcp_item(run: Any, status: str) -> dict[str, Any]:
    """One `ToolRun` (middleware/agent/trace.py) as an `mcp_call` output item."""
    if not run.item_id:
        run.item_id = new_id("mcp_")
    item: dict[str, Any] = {
        "id": run.item_id,
        "type": "mcp_call",
        "server_label": run.server_label,
        "name": run.name,
        "arguments": run.arguments,
        "status": status,
    }
    if status != "in_progress":
        item["output"] = run.output
        item["error"] = run.error
    return item


def _status(run: Any) -> str:
    return "failed" if run.error is not None else "completed"


def add_items(response: dict[str, Any], trace: Any) -> None:
    """Put the agent's tool calls, as `mcp_call` items, before the final output."""
    if trace is None or not trace.runs:
        return
    response["output"] = [mcp_item(run, _status(run)) for run in trace.runs] + response["output"]


class McpItem:
    """An `mcp_call` among the stream translator's output items (same interface as its own)."""

    __slots__ = ("index", "kind", "id", "run", "status")

    def __init__(self, index: int, run: Any) -> None:
        self.index = index
        self.kind = "mcp_call"
        self.run = run
        self.id = mcp_item(run, "in_progress")["id"]
        self.status: str | None = None

    def item(self, status: str) -> dict[str, Any]:
        return mcp_item(self.run, status)


def stream_events(translator: StreamTranslator, marker: dict[str, Any]) -> Iterator[SSEEvent]:
    """The Responses events for one agent marker chunk."""
    run = marker["run"]
    if marker["phase"] == "started":
        if translator.text is not None:
            yield from translator._close(translator.text, "completed")  # the text before the call ends here
        item = McpItem(len(translator.items), run)
        translator.items.append(item)  # type: ignore[arg-type]
        head = {"item_id": item.id, "output_index": item.index}
        yield translator._event({"type": "response.output_item.added", "output_index": item.index,
                                 "item": item.item("in_progress")})
        yield translator._event({"type": "response.mcp_call.in_progress", **head})
        yield translator._event({"type": "response.mcp_call_arguments.done", **head, "arguments": run.arguments})
        return
    found = next((i for i in translator.items if isinstance(i, McpItem) and i.run is run), None)
    if found is None:
        return
    found.status = _status(run)
    head = {"item_id": found.id, "output_index": found.index}
    kind = "response.mcp_call.failed" if found.status == "failed" else "response.mcp_call.completed"
    yield translator._event({"type": kind, **head})
    yield translator._event({"type": "response.output_item.done", "output_index": found.index,
                             "item": found.item(found.status)})
