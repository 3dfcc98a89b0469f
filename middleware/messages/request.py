"""Anthropic Messages request → chat-completions request (pure).

`to_chat` maps a `POST /v1/messages` (or `/count_tokens`) body onto a chat
body: `system` (a string or text blocks) becomes the leading system message;
user turns keep their text, and their `tool_result` blocks become `tool`
messages (placed first, right after the assistant turn that called them, as
chat requires; one with `is_error` says so first, as chat has no such
flag); assistant turns keep their text, and their `tool_use` blocks become
`tool_calls` with the `input` serialised as `arguments`. `thinking` blocks
are dropped (chat providers take no reasoning input); `cache_control`
is ignored wherever it appears. `tools` (`input_schema`) become function
tools, a name over the 64 characters chat providers take shortened to a
head and a hash (`provider_tool_name`; the reply maps it back); `tool_choice`
auto/any/tool/none becomes auto/required/the named function/none;
`stop_sequences`, `max_tokens`, `temperature`, `top_p` and
`metadata.user_id` map onto `stop`, `max_completion_tokens`, `temperature`,
`top_p` and `user`; `output_config.format` (structured outputs) becomes a
strict `json_schema` `response_format`, a tool's `strict` its function's.
`top_k`, `thinking` and `service_tier` have no chat
equivalent every provider accepts and are not forwarded.

The validation unit has already checked the body against
`middleware.validation.schemas.MessagesRequest`; the checks here keep the
mapping safe without it (a 400 naming the field, never a crash).
"""

from __future__ import annotations

import hashlib
from typing import Any

import orjson

from proxy.core.errors import ApiError, invalid_request

# Chat providers take function names of at most 64 characters (OpenAI refuses
# longer ones); Anthropic allows 128, and Claude Code's MCP tools
# (`mcp__<server>__<tool>`) often need more than 64.
CHAT_NAME_LIMIT = 64
_DIGEST = 8
# What a tool message starts with for a `tool_result` with `is_error: true`.
TOOL_ERROR = "Error"


def provider_tool_name(name: str) -> str:
    """`name` as a chat provider takes it: itself up to 64 characters, else a head and a hash of the whole.

    The same for the same name in every request, so a tool keeps its provider
    name across the turns of a conversation without any state.
    """
    if len(name) <= CHAT_NAME_LIMIT:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:_DIGEST]
    return f"{name[: CHAT_NAME_LIMIT - _DIGEST - 1]}_{digest}"


def renamed_tools(body: dict[str, Any]) -> dict[str, str]:
    """Provider name → the client's, for each tool of `body` whose name `provider_tool_name` shortens."""
    tools = body.get("tools")
    names = (tool.get("name") for tool in tools if isinstance(tool, dict)) if isinstance(tools, list) else ()
    return {provider_tool_name(name): name for name in names if isinstance(name, str) and len(name) > CHAT_NAME_LIMIT}


# Block types refused with the codes the OpenAI routes use for the same media.
_MEDIA_CODES = {"image": "unsupported_image_input", "document": "unsupported_file_input"}


def _bad(message: str, param: str) -> ApiError:
    return invalid_request(message, param=param)


def _media(kind: Any, param: str) -> ApiError:
    code = _MEDIA_CODES.get(kind) if isinstance(kind, str) else None
    if code is not None:
        return ApiError(400, code, code=code, param=param)
    return _bad(f"Content blocks of type `{kind}` are not supported here.", f"{param}.type")


def _text(block: dict[str, Any], param: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise _bad("A text block needs a string `text`.", f"{param}.text")
    return text


def _blocks(content: Any, param: str) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad("`content` is a string or a list of content blocks.", param)
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            raise _bad("A content block is an object.", f"{param}[{j}]")
    return content


def system_text(system: Any) -> str | None:
    """`system` as one string: the text blocks joined by blank lines."""
    if system is None or isinstance(system, str):
        return system
    blocks = _blocks(system, "system")
    parts = []
    for j, block in enumerate(blocks):
        if block.get("type") != "text":
            raise _bad("System blocks are text blocks.", f"system[{j}].type")
        parts.append(_text(block, f"system[{j}]"))
    return "\n\n".join(parts)


def _tool_result(block: dict[str, Any], param: str) -> dict[str, Any]:
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str):
        raise _bad("A tool_result block needs a string `tool_use_id`.", f"{param}.tool_use_id")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        texts = []
        for k, part in enumerate(_blocks(content, f"{param}.content")):
            where = f"{param}.content[{k}]"
            if part.get("type") != "text":
                raise _media(part.get("type"), where)
            texts.append(_text(part, where))
        text = "\n".join(texts)
    if block.get("is_error") is True:
        # Chat tool messages have no error flag: the model learns the call failed from the text.
        text = f"{TOOL_ERROR}: {text}" if text else TOOL_ERROR
    return {"role": "tool", "tool_call_id": call_id, "content": text}


def _user_turn(content: Any, param: str) -> list[dict[str, Any]]:
    """One user turn → its tool messages (first), then the user message with its text, if any."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    results: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, f"{param}.content")):
        where = f"{param}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, where)})
        elif kind == "tool_result":
            results.append(_tool_result(block, where))
        else:
            raise _media(kind, where)
    if parts or not results:
        text: Any = parts[0]["text"] if len(parts) == 1 else (parts or "")
        results.append({"role": "user", "content": text})
    return results


def _assistant_turn(content: Any, param: str) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(_blocks(content, f"{param}.content")):
        where = f"{param}.content[{j}]"
        kind = block.get("type")
        if kind == "text":
            texts.append(_text(block, where))
        elif kind == "tool_use":
            for field, expected in (("id", str), ("name", str), ("input", dict)):
                if not isinstance(block.get(field), expected):
                    raise _bad(f"A tool_use block needs `{field}`.", f"{where}.{field}")
            arguments = orjson.dumps(block["input"]).decode()
            function = {"name": provider_tool_name(block["name"]), "arguments": arguments}
            calls.append({"id": block["id"], "type": "function", "function": function})
        elif kind in ("thinking", "redacted_thinking"):
            continue  # chat providers take no reasoning input
        else:
            raise _media(kind, where)
    text = "".join(texts)
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    return message


def chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    turns = body.get("messages")
    if not isinstance(turns, list) or not turns:
        raise ApiError(400, "Missing required parameter: 'messages'.", code="missing_required_parameter", param="messages")
    messages: list[dict[str, Any]] = []
    system = system_text(body.get("system"))
    if system:
        messages.append({"role": "system", "content": system})
    for i, turn in enumerate(turns):
        param = f"messages[{i}]"
        role = turn.get("role") if isinstance(turn, dict) else None
        if role == "user":
            messages.extend(_user_turn(turn.get("content"), param))
        elif role == "assistant":
            messages.append(_assistant_turn(turn.get("content"), param))
        else:
            raise _bad("A message's role is user or assistant.", f"{param}.role")
    return messages


def chat_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        raise _bad("`tools` is a list.", "tools")
    chat = []
    for i, tool in enumerate(tools):
        kind = (tool.get("type") or "custom") if isinstance(tool, dict) else None  # (type may be null)
        if kind != "custom":
            raise ApiError(
                400,
                f"Tools of type `{kind}` are not supported by this gateway; only custom tools (name, input_schema) are.",
                code="unsupported_tool",
                param=f"tools[{i}].type",
            )
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise _bad("A tool needs a `name`.", f"tools[{i}].name")
        if not isinstance(schema, dict):
            raise _bad("A tool needs an `input_schema` object.", f"tools[{i}].input_schema")
        function: dict[str, Any] = {"name": provider_tool_name(name), "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        if isinstance(tool.get("strict"), bool):
            function["strict"] = tool["strict"]
        chat.append({"type": "function", "function": function})
    return chat


def chat_tool_choice(choice: Any) -> tuple[Any, bool | None]:
    """`tool_choice` → (chat tool_choice, parallel_tool_calls or None)."""
    kind = choice.get("type") if isinstance(choice, dict) else None
    parallel = False if isinstance(choice, dict) and choice.get("disable_parallel_tool_use") is True else None
    if kind == "auto":
        return "auto", parallel
    if kind == "any":
        return "required", parallel
    if kind == "none":
        return "none", None
    if kind == "tool" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": provider_tool_name(choice["name"])}}, parallel
    raise _bad("`tool_choice.type` is auto, any, tool (with a `name`) or none.", "tool_choice.type")


def chat_response_format(output_format: Any) -> dict[str, Any]:
    """`output_config.format` (structured outputs) → chat's `response_format`.

    Anthropic guarantees the schema (constrained decoding), which chat asks
    for with `strict: true`; the schema needs no name there, chat's does.
    """
    schema = output_format.get("schema") if isinstance(output_format, dict) else None
    if not isinstance(output_format, dict) or output_format.get("type") != "json_schema" or not isinstance(schema, dict):
        raise _bad("`output_config.format` is `{\"type\": \"json_schema\", \"schema\": {…}}`.", "output_config.format")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}


def to_chat(body: dict[str, Any]) -> dict[str, Any]:
    """The chat body for a Messages body (see the module docstring for the mapping)."""
    chat: dict[str, Any] = {"model": body.get("model"), "messages": chat_messages(body)}
    if body.get("tools"):
        chat["tools"] = chat_tools(body["tools"])
        # Chat providers reject a tool_choice without tools, so it only travels with them.
        if body.get("tool_choice") is not None:
            chat["tool_choice"], parallel = chat_tool_choice(body["tool_choice"])
            if parallel is not None:
                chat["parallel_tool_calls"] = parallel
    if body.get("max_tokens") is not None:
        chat["max_completion_tokens"] = body["max_tokens"]
    stop = body.get("stop_sequences")
    if stop:
        chat["stop"] = stop
    for key in ("temperature", "top_p"):
        if body.get(key) is not None:
            chat[key] = body[key]
    metadata = body.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        chat["user"] = metadata["user_id"]
    output_format = body.get("output_config", {}).get("format") if isinstance(body.get("output_config"), dict) else None
    if output_format is not None:
        chat["response_format"] = chat_response_format(output_format)
    if body.get("stream") is True:
        chat["stream"] = True
        # message_delta carries the output usage, so always ask the provider for it.
        chat["stream_options"] = {"include_usage": True}
    return chat
