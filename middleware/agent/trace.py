"""What one agent request ran, left on the `Call` (`call.agent`) for the units before it.

The Responses unit turns the `ToolRun`s into `mcp_call` output items; the
sessions unit stores the turn as the user message and the final answer
(`session_turn`), or with the tool traffic when ``keep_tool_messages`` is on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class ToolRun:
    """One server tool call: what the model asked for and what came back."""

    call_id: str  # the provider's tool-call id
    server_label: str
    name: str  # the MCP tool's own name
    arguments: str  # JSON text, as the model wrote it
    output: str | None = None  # the result text (what the model saw), when it succeeded
    # The failure, when it did not, in the Responses API's shape: mcp_protocol_error
    # {code, message} or mcp_tool_execution_error {content}.
    error: dict[str, Any] | None = None
    item_id: str = ""  # the mcp_call item id in a Responses stream (set by the Responses unit)
    credits: int = 0  # what the call was charged (its server's price_per_call, when it ran)


@dataclass(slots=True)
class AgentTrace:
    """Server tool calls of one request and the messages the loop appended."""

    keep_tool_messages: bool = False
    runs: list[ToolRun] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)  # assistant tool-call + tool messages

    @property
    def server_call_ids(self) -> set[str]:
        return {run.call_id for run in self.runs}

    def session_turn(self, assistant: dict[str, Any]) -> list[dict[str, Any]]:
        """The messages to store after the user's: the final answer without the server tool calls
        the client was shown, preceded by the tool traffic when `keep_tool_messages` is on."""
        ids = self.server_call_ids
        calls = assistant.get("tool_calls")
        if isinstance(calls, list) and ids:
            kept = [c for c in calls if not (isinstance(c, dict) and c.get("id") in ids)]
            assistant = {k: v for k, v in assistant.items() if k != "tool_calls"}
            if kept:
                assistant["tool_calls"] = kept
            elif assistant.get("content") is None:
                assistant["content"] = ""
        return [*self.messages, assistant] if self.keep_tool_messages else [assistant]
