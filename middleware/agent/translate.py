"""Pure translation between MCP and chat completions for the agent loop.

- MCP tool → OpenAI function tool (`function_tool`), with the name the model
  sees: the MCP tool's own name, or ``<label>__<tool>`` where two servers (or a
  client tool) share it (`exposed_names`);
- MCP tool result → the text of a `tool` message (`result_text`), errors as
  ``"error: …"`` and cut at the server's ``max_result_bytes``;
- the chat messages the loop appends (`assistant_message`, `tool_message`) and
  the chunks it streams (`tool_call_chunk`, `usage_chunk`), plus `add_usage`.

Nothing here does I/O.
"""

from __future__ import annotations

from typing import Any

import orjson

SEPARATOR = "__"
TRUNCATED_NOTE = "\n[truncated: the tool's result was longer than {limit} bytes]"


def exposed_names(tools_by_server: dict[str, list[str]], taken: set[str] | frozenset[str] = frozenset()) -> dict[str, tuple[str, str]]:
    """Model-facing name → (server label, MCP tool name).

    A tool keeps its own name unless another offered server has one of the
    same name, or a client tool (`taken`) does: then each such tool is
    ``<label>__<tool>`` (with ``_2``, ``_3`` … after it should a client tool
    have that name too: the provider refuses two functions of one name).
    """
    seen: dict[str, int] = {}
    for tools in tools_by_server.values():
        for tool in tools:
            seen[tool] = seen.get(tool, 0) + 1
    names: dict[str, tuple[str, str]] = {}
    for label, tools in tools_by_server.items():
        for tool in tools:
            shared = seen[tool] > 1 or tool in taken
            name = base = f"{label}{SEPARATOR}{tool}" if shared else tool
            suffix = 2
            while name in taken or name in names:
                name, suffix = f"{base}_{suffix}", suffix + 1
            names[name] = (label, tool)
    return names


def function_tool(name: str, description: str | None, input_schema: dict[str, Any] | None) -> dict[str, Any]:
    """An MCP tool as a chat-completions function tool."""
    function: dict[str, Any] = {"name": name}
    if description:
        function["description"] = description
    function["parameters"] = input_schema or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def client_tool_names(tools: Any) -> set[str]:
    names = set()
    for tool in tools if isinstance(tools, list) else ():
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and isinstance(function.get("name"), str):
            names.add(function["name"])
    return names


def content_text(content: list[Any], structured: Any = None) -> str:
    """The text of an MCP result's content blocks (non-text blocks are named, not inlined)."""
    parts = []
    for block in content:
        kind = getattr(block, "type", None)
        if kind == "text":
            parts.append(block.text)
        elif kind in ("image", "audio"):
            parts.append(f"[{kind} {getattr(block, 'mime_type', '')}]".replace(" ]", "]"))
        elif kind == "resource_link":
            parts.append(f"[resource {block.uri}]")
        elif kind == "resource":
            resource = block.resource
            text = getattr(resource, "text", None)
            parts.append(text if isinstance(text, str) else f"[resource {resource.uri}]")
    if not parts and structured is not None:
        return orjson.dumps(structured).decode()
    return "\n".join(parts)


def truncate(text: str, limit: int) -> str:
    """`text` cut to at most `limit` UTF-8 bytes (on a character boundary), with a note when cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[:limit].decode(errors="ignore") + TRUNCATED_NOTE.format(limit=limit)


def result_text(text: str, is_error: bool, limit: int) -> str:
    """The tool message content for a result: errors are prefixed so the model can tell."""
    return truncate(f"error: {text}" if is_error else text, limit)


def assistant_message(content: Any, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The assistant turn that called the tools, as the next provider request carries it."""
    return {"role": "assistant", "content": content if isinstance(content, str) and content else None, "tool_calls": tool_calls}


def tool_message(call_id: str, content: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_call_chunk(template: dict[str, Any], index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """One server tool call as a complete stream delta (the agent API's shape)."""
    call = {"index": index, **tool_call(call_id, name, arguments)}
    return {**template, "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}


def usage_chunk(template: dict[str, Any], usage: dict[str, Any]) -> dict[str, Any]:
    return {**template, "choices": [], "usage": usage}


def add_usage(total: dict[str, Any] | None, usage: Any) -> dict[str, Any] | None:
    """Sum of two chat usage objects (token counts and their details), for a loop's several calls."""
    if not isinstance(usage, dict):
        return total
    if total is None:
        return _copy_counts(usage)
    for key, value in usage.items():
        if type(value) is int:
            total[key] = total.get(key, 0) + value
        elif isinstance(value, dict):
            inner = total.setdefault(key, {})
            if isinstance(inner, dict):
                for k, v in value.items():
                    if type(v) is int:
                        inner[k] = inner.get(k, 0) + v
    return total


def _copy_counts(usage: dict[str, Any]) -> dict[str, Any]:
    return {k: dict(v) if isinstance(v, dict) else v for k, v in usage.items()}


def parse_arguments(arguments: Any) -> dict[str, Any] | None:
    """A tool call's JSON arguments as an object (empty text: no arguments); None when invalid."""
    if arguments in (None, ""):
        return {}
    if not isinstance(arguments, str):
        return None
    try:
        value = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
