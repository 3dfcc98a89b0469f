"""Responses API request → chat-completions request.

`to_chat` turns a `POST /v1/responses` body into a chat body plus the
normalised input items (with ids, as `GET /v1/responses/{id}/input_items`
lists them). `history` is the earlier conversation of a
`previous_response_id` chain as chat messages; the earlier `instructions` are
not part of it (OpenAI's rule: only the new request's instructions apply).

`item_reference` inputs (`{"type": "item_reference", "id": "rs_…"}`) name
an item of one of the tenant's stored responses; the unit looks them up first
(`referenced_ids`, then `ResponseStore.items`) and passes the stored items in,
so this module stays a pure translator.

Bad input raises a 400 `ApiError` naming the field (`input[2].type`, ...).
"""

from __future__ import annotations

from typing import Any

from proxy.core.ids import new_id
from proxy.core.errors import ApiError, invalid_request

# Chat roles per Responses message role. `developer` becomes `system`, which
# every chat provider (vLLM, Ollama, ...) understands.
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal"})
_REASONING_EFFORTS = frozenset({"none", "minimal", "low", "medium", "high", "xhigh"})
# The `include` value that asks for the output text's token logprobs.
LOGPROBS = "message.output_text.logprobs"
# Numeric fields echoed into the Response: (name, minimum, maximum).
_NUMBERS = (("temperature", 0, 2), ("top_p", 0, 1))
# Responses features that have no chat equivalent; refused instead of ignored.
_UNSUPPORTED = {
    "background": "Background responses are not supported by this gateway.",
    "conversation": "Conversations are not supported by this gateway; use previous_response_id.",
    "prompt": "Prompt templates are not supported by this gateway.",
}


def _bad(message: str, param: str) -> ApiError:
    return invalid_request(message, param=param)


def _text_of(part: Any, param: str) -> str:
    text = part.get("text") if part.get("type") != "refusal" else part.get("refusal")
    if not isinstance(text, str):
        raise _bad("A text content part needs a string `text`.", f"{param}.text")
    return text


def _message(item: dict[str, Any], param: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One `message` item → (chat message, stored input item)."""
    role = item.get("role")
    chat_role = _ROLES.get(role) if isinstance(role, str) else None
    if chat_role is None:
        raise _bad("A message's role is one of user, assistant, system, developer.", f"{param}.role")
    content = item.get("content")
    if isinstance(content, str):
        parts: list[Any] = [{"type": "output_text" if role == "assistant" else "input_text", "text": content}]
    elif isinstance(content, list):
        parts = content
    else:
        raise _bad("A message's content is a string or a list of content parts.", f"{param}.content")
    chat_parts: list[dict[str, Any]] = []
    stored: list[dict[str, Any]] = []
    for j, part in enumerate(parts):
        where = f"{param}.content[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            kind = None  # an unhashable `type` must be a 400, not a crash
        if kind in _TEXT_PARTS:
            text = _text_of(part, where)
            chat_parts.append({"type": "text", "text": text})
            if role == "assistant":
                stored.append({"type": "output_text", "text": text, "annotations": []})
            else:
                stored.append({"type": "input_text", "text": text})
        elif kind == "input_image" and role == "user":
            url = part.get("image_url")
            if not isinstance(url, str):
                raise _bad("Only input_image parts with an image_url are supported.", f"{where}.image_url")
            detail = part.get("detail") or "auto"
            chat_parts.append({"type": "image_url", "image_url": {"url": url, "detail": detail}})
            stored.append({"type": "input_image", "image_url": url, "detail": detail})
        else:
            raise _bad(f"Content parts of type `{kind}` are not supported here.", f"{where}.type")
    if len(chat_parts) == 1 and chat_parts[0]["type"] == "text":
        chat_content: Any = chat_parts[0]["text"]
    elif role == "user":
        chat_content = chat_parts
    else:  # system/assistant content is text only on most providers
        chat_content = "".join(p["text"] for p in chat_parts)
    item_id = item.get("id") if isinstance(item.get("id"), str) else new_id("msg_")
    stored_item = {"id": item_id, "type": "message", "role": role, "status": "completed", "content": stored}
    return {"role": chat_role, "content": chat_content}, stored_item


def _function_call(item: dict[str, Any], param: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """One `function_call` item → (chat tool call, stored input item)."""
    for field in ("call_id", "name", "arguments"):
        if not isinstance(item.get(field), str):
            raise _bad(f"A function_call item needs a string `{field}`.", f"{param}.{field}")
    call = {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
    stored = {
        "id": item["id"] if isinstance(item.get("id"), str) else new_id("fc_"),
        "type": "function_call",
        "call_id": item["call_id"],
        "name": item["name"],
        "arguments": item["arguments"],
        "status": "completed",
    }
    return call, stored


def _function_output(item: dict[str, Any], param: str) -> tuple[dict[str, Any], dict[str, Any]]:
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str):
        raise _bad("A function_call_output item needs a string `call_id`.", f"{param}.call_id")
    if isinstance(output, list):
        text = "".join(_text_of(p, f"{param}.output[{j}]") for j, p in enumerate(output) if isinstance(p, dict))
    elif isinstance(output, str):
        text = output
    else:
        raise _bad("A function_call_output item needs an `output` string.", f"{param}.output")
    stored = {
        "id": item["id"] if isinstance(item.get("id"), str) else new_id("fco_"),
        "type": "function_call_output",
        "call_id": call_id,
        "output": output,
        "status": "completed",
    }
    return {"role": "tool", "tool_call_id": call_id, "content": text}, stored


def mcp_call_messages(item: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An `mcp_call` item (a server tool the agent ran) → (chat tool call, its tool message).

    Agent frameworks send a Response's output back as the next input, and a
    chained response continues from it: the model then sees the call it made
    and its result, as it did when it made it (the content an error gave it is
    the agent's `error: …`).
    """
    call = {"id": item["id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
    output, error = item.get("output"), item.get("error")
    if isinstance(output, str) and error is None:
        text = output
    elif isinstance(error, dict) and isinstance(error.get("content"), list):
        # A tool's own error result: its content is the tool message the model got.
        text = "".join(p["text"] for p in error["content"] if isinstance(p, dict) and isinstance(p.get("text"), str))
    else:  # a protocol error (timeout, unreachable, bad arguments): the agent prefixed its message
        message = error if isinstance(error, str) else error.get("message") if isinstance(error, dict) else None
        text = f"error: {message if isinstance(message, str) and message else 'the tool call failed'}"
    return call, {"role": "tool", "tool_call_id": item["id"], "content": text}


def _mcp_call(item: dict[str, Any], param: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """One `mcp_call` input item → (chat tool call, tool message, stored input item)."""
    for field in ("id", "server_label", "name", "arguments"):
        if not isinstance(item.get(field), str):
            raise _bad(f"An mcp_call item needs a string `{field}`.", f"{param}.{field}")
    call, result = mcp_call_messages(item)
    stored = {key: item.get(key) for key in ("id", "type", "server_label", "name", "arguments", "output", "error")}
    stored["status"] = item.get("status") or "completed"
    return call, result, stored


def _is_reference(item: dict[str, Any]) -> bool:
    # The spec lets a reference omit `type`, but an untyped item is an easy
    # input message everywhere else (the validation unit too), so a reference
    # needs its type here.
    return item.get("type") == "item_reference"


def referenced_ids(value: Any) -> list[tuple[str, str]]:
    """The `item_reference` inputs of `input`: (param, item id) pairs, in order."""
    if not isinstance(value, list):
        return []
    found = []
    for i, item in enumerate(value):
        if isinstance(item, dict) and _is_reference(item):
            if not isinstance(item.get("id"), str):
                raise _bad("An item_reference needs a string `id`.", f"input[{i}].id")
            found.append((f"input[{i}].id", item["id"]))
    return found


def item_not_found(item_id: str, param: str) -> ApiError:
    """An item_reference to no stored item of the caller's tenant (shaped like previous_response_not_found)."""
    return ApiError(400, f"Item with id '{item_id[:128]}' not found.", code="item_not_found", param=param)


def input_messages(
    value: Any, references: dict[str, dict[str, Any]] | None = None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The request's `input` → (chat messages, stored input items).

    `references` holds the stored items that `item_reference` inputs name, by
    id; a referenced item is translated as if it had been sent in full.
    """
    if isinstance(value, str):
        item_id = new_id("msg_")
        stored = {"id": item_id, "type": "message", "role": "user", "status": "completed",
                  "content": [{"type": "input_text", "text": value}]}
        return [{"role": "user", "content": value}], [stored]
    if not isinstance(value, list):
        raise _bad("`input` is a string or a list of input items.", "input")
    messages: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        param = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad("An input item is an object.", param)
        if _is_reference(item):
            stored_item = (references or {}).get(item["id"]) if isinstance(item.get("id"), str) else None
            if stored_item is None:
                raise item_not_found(str(item.get("id")), f"{param}.id")
            item = stored_item
        kind = item.get("type", "message")  # EasyInputMessage has no type
        if kind == "message":
            message, stored = _message(item, param)
            last = messages[-1] if messages else None
            if message["role"] == "assistant" and last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                # Text streamed after the turn's tool calls (a Response lists the items as they
                # came): still the same assistant turn, or its tool results would not follow it.
                last["content"] = (last["content"] or "") + message["content"]
            else:
                messages.append(message)
        elif kind == "function_call":
            call, stored = _function_call(item, param)
            last = messages[-1] if messages else None
            # Consecutive calls (and calls right after assistant text) form one assistant turn.
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            message, stored = _function_output(item, param)
            messages.append(message)
        elif kind == "mcp_call":
            call, result, stored = _mcp_call(item, param)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not last.get("tool_calls"):
                last["tool_calls"] = [call]  # the text the model wrote before it, the same turn
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            messages.append(result)  # the result at once: a client call after it starts a turn of its own
        elif kind == "reasoning":
            continue  # chat providers take no reasoning input
        else:
            raise _bad(f"Input items of type `{kind}` are not supported by this gateway.", f"{param}.type")
        items.append(stored)
    return messages, items


def chat_tools(tools: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Flat Responses function tools → (chat tools, tools echoed in the Response)."""
    if not isinstance(tools, list):
        raise _bad("`tools` is a list.", "tools")
    chat: list[dict[str, Any]] = []
    echoed: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind == "mcp":  # for agent models; the agent unit checks its server_label
            from middleware.responses.mcp import echoed_tool

            chat.append(tool)
            echoed.append(echoed_tool(tool))
            continue
        if kind != "function":
            raise ApiError(
                400,
                f"Tools of type `{kind}` are not supported by this gateway; only `function` tools are.",
                code="unsupported_tool",
                param=f"tools[{i}].type",
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            raise _bad("A function tool needs a `name`.", f"tools[{i}].name")
        function: dict[str, Any] = {"name": name}
        for key in ("description", "parameters", "strict"):
            if tool.get(key) is not None:
                function[key] = tool[key]
        chat.append({"type": "function", "function": function})
        echoed.append({"type": "function", "name": name, "description": tool.get("description"),
                       "parameters": tool.get("parameters"), "strict": tool.get("strict")})
    return chat, echoed


def chat_tool_choice(choice: Any) -> Any:
    if choice in ("auto", "none", "required"):
        return choice
    kind = choice.get("type") if isinstance(choice, dict) else None
    if kind == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    if kind == "allowed_tools":
        return _allowed_tools(choice)
    raise _bad("`tool_choice` is auto, none, required, {\"type\": \"function\", \"name\": ...} or "
               "{\"type\": \"allowed_tools\", ...}.", "tool_choice")


def _allowed_tools(choice: dict[str, Any]) -> dict[str, Any]:
    """`{"type": "allowed_tools", "mode", "tools": [{"type": "function", "name"}]}` → chat's `allowed_tools` choice."""
    mode = choice.get("mode")
    if mode not in ("auto", "required"):
        raise _bad("`tool_choice.mode` is auto or required.", "tool_choice.mode")
    tools = choice.get("tools")
    if not isinstance(tools, list) or not tools:
        raise _bad("`tool_choice.tools` is a non-empty list of tools.", "tool_choice.tools")
    names = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("name"), str):
            raise _bad("Only function tools ({\"type\": \"function\", \"name\": ...}) can be allowed here.",
                       f"tool_choice.tools[{i}]")
        names.append(tool["name"])
    return {"type": "allowed_tools", "allowed_tools": {
        "mode": mode, "tools": [{"type": "function", "function": {"name": name}} for name in names]}}


def chat_response_format(text: Any) -> tuple[dict[str, Any] | None, str | None]:
    """`text` → (chat response_format or None, verbosity or None)."""
    if not isinstance(text, dict):
        raise _bad("`text` is an object.", "text")
    fmt = text.get("format")
    verbosity = text.get("verbosity")
    if fmt is None or (isinstance(fmt, dict) and fmt.get("type") == "text"):
        return None, verbosity
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "json_object":
        return {"type": "json_object"}, verbosity
    if kind == "json_schema":
        if not isinstance(fmt.get("name"), str) or not isinstance(fmt.get("schema"), dict):
            raise _bad("A json_schema format needs a `name` and a `schema` object.", "text.format")
        schema = {key: fmt[key] for key in ("name", "schema", "strict", "description") if fmt.get(key) is not None}
        return {"type": "json_schema", "json_schema": schema}, verbosity
    raise _bad("`text.format.type` is text, json_object or json_schema.", "text.format.type")


def _check_fields(body: dict[str, Any]) -> None:
    """Refuse unsupported features and mistyped fields that the Response echoes back."""
    for field, message in _UNSUPPORTED.items():
        if body.get(field):
            raise _bad(message, field)
    for field, kind, name in (("metadata", dict, "an object"), ("store", bool, "a boolean"),
                              ("parallel_tool_calls", bool, "a boolean"), ("instructions", str, "a string")):
        if body.get(field) is not None and not isinstance(body[field], kind):
            raise _bad(f"`{field}` is {name}.", field)
    for field, low, high in _NUMBERS:
        value = body.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high):
            raise _bad(f"`{field}` is a number from {low} to {high}.", field)
    top = body.get("top_logprobs")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= 20):
        raise _bad("`top_logprobs` is an integer from 0 to 20.", "top_logprobs")
    max_output = body.get("max_output_tokens")
    if max_output is not None and (isinstance(max_output, bool) or not isinstance(max_output, int) or max_output < 1):
        raise _bad("`max_output_tokens` is a positive integer.", "max_output_tokens")


def to_chat(
    body: dict[str, Any], history: list[dict[str, Any]], references: dict[str, dict[str, Any]] | None = None
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Map a Responses body.

    `references`: the stored items its `item_reference` inputs name, by id.
    Returns (chat body, conversation messages without instructions, stored
    input items, tools as echoed in the Response).
    """
    _check_fields(body)
    new_messages, items = input_messages(body["input"], references) if "input" in body else ([], [])
    conversation = [*history, *new_messages]
    if not conversation:
        raise ApiError(400, "Missing required parameter: 'input'.", code="missing_required_parameter", param="input")
    instructions = body.get("instructions")
    messages = [{"role": "system", "content": instructions}, *conversation] if instructions is not None else conversation
    chat: dict[str, Any] = {"model": body.get("model"), "messages": messages}
    echoed_tools: list[dict[str, Any]] = []
    tool_choice = chat_tool_choice(body["tool_choice"]) if body.get("tool_choice") is not None else None
    if body.get("tools"):
        chat["tools"], echoed_tools = chat_tools(body["tools"])
        # Chat providers reject these without tools, so they only travel with them.
        if tool_choice is not None:
            chat["tool_choice"] = tool_choice
        if body.get("parallel_tool_calls") is not None:
            chat["parallel_tool_calls"] = body["parallel_tool_calls"]
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    for key in ("temperature", "top_p", "metadata", "user", "service_tier", "prompt_cache_key", "safety_identifier"):
        if body.get(key) is not None:
            chat[key] = body[key]
    include = body.get("include")
    if body.get("top_logprobs") is not None or (isinstance(include, list) and LOGPROBS in include):
        chat["logprobs"] = True  # the provider's token logprobs land on the output_text parts
        if body.get("top_logprobs") is not None:
            chat["top_logprobs"] = body["top_logprobs"]
    if body.get("text") is not None:
        response_format, verbosity = chat_response_format(body["text"])
        if response_format is not None:
            chat["response_format"] = response_format
        if verbosity is not None:
            chat["verbosity"] = verbosity
    reasoning = body.get("reasoning")
    if isinstance(reasoning, dict) and reasoning.get("effort") is not None:
        if not isinstance(reasoning["effort"], str) or reasoning["effort"] not in _REASONING_EFFORTS:
            raise _bad("`reasoning.effort` is none, minimal, low, medium, high or xhigh.", "reasoning.effort")
        chat["reasoning_effort"] = reasoning["effort"]
    if body.get("stream") is True:
        chat["stream"] = True
        # The Response object carries usage, so always ask the provider for it.
        chat["stream_options"] = {"include_usage": True}
    return chat, conversation, items, echoed_tools
