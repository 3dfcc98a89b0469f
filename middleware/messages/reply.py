"""Chat-completions reply → Anthropic Message (pure).

`to_message` turns a `chat.completion` (first choice) into a Message:
content blocks in order `thinking` (the provider's `reasoning_content` /
`reasoning`), `text` (also the provider's `refusal`, with stop reason
`refusal`), `tool_use` (the provider's call id, its arguments parsed as
`input`); `stop_reason` from the finish reason; `usage` from the
provider's usage (Anthropic counts cache reads apart from `input_tokens`).
"""

from __future__ import annotations

import os
from typing import Any

import orjson

from proxy.core.chat_deltas import reasoning_of

# finish_reason → stop_reason; "stop" is end_turn unless a stop sequence matched.
_STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use", "content_filter": "refusal"}


def new_message_id() -> str:
    return "msg_" + os.urandom(12).hex()


def stop_reason(finish_reason: Any, matched: Any, stop_sequences: Any) -> tuple[str, str | None]:
    """(stop_reason, stop_sequence). `matched` is the provider's `stop_reason` field (vLLM names the stop string)."""
    if finish_reason == "stop" and isinstance(matched, str) and isinstance(stop_sequences, list) and matched in stop_sequences:
        return "stop_sequence", matched
    return _STOP_REASONS.get(finish_reason, "end_turn"), None


def usage_of(usage: Any) -> dict[str, int]:
    """Chat usage → Anthropic usage (zeros when the provider reported none)."""
    usage = usage if isinstance(usage, dict) else {}
    prompt = usage.get("prompt_tokens") if type(usage.get("prompt_tokens")) is int else 0
    output = usage.get("completion_tokens") if type(usage.get("completion_tokens")) is int else 0
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    cached = cached if type(cached) is int and 0 <= cached <= prompt else 0
    return {
        "input_tokens": prompt - cached,
        "output_tokens": output,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def tool_input(arguments: Any) -> dict[str, Any]:
    """The provider's JSON arguments as a `tool_use` input object ({} when empty or not an object)."""
    if isinstance(arguments, str) and arguments:
        try:
            parsed = orjson.loads(arguments)
        except orjson.JSONDecodeError:
            return {}
        return parsed if isinstance(parsed, dict) else {}
    return {}


def message_skeleton(message_id: str, model: Any, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }


def client_tool_name(name: Any, names: dict[str, str] | None) -> str:
    """The client's name for a tool the provider called (its own unless the request shortened it)."""
    if not isinstance(name, str):
        return ""
    return names.get(name, name) if names else name


def to_message(
    completion: dict[str, Any], message_id: str, model: Any, stop_sequences: Any, names: dict[str, str] | None = None
) -> dict[str, Any]:
    """The Message for a chat completion; `names` maps shortened tool names back (`request.renamed_tools`)."""
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message: dict[str, Any] = choice["message"] if isinstance(choice.get("message"), dict) else {}
    content: list[dict[str, Any]] = []
    reasoning = reasoning_of(message)
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text, refusal = message.get("content"), message.get("refusal")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    refused = isinstance(refusal, str) and bool(refusal)
    if refused:
        content.append({"type": "text", "text": refusal})
    calls = message.get("tool_calls")
    for call in calls if isinstance(calls, list) else ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        content.append({"type": "tool_use", "id": call.get("id") or "toolu_" + os.urandom(12).hex(),
                        "name": client_tool_name(function.get("name"), names), "input": tool_input(function.get("arguments"))})
    finish = choice.get("finish_reason")
    called = any(block["type"] == "tool_use" for block in content)
    if finish == "stop" and called:
        finish = "tool_calls"  # some providers finish a tool call with "stop"
    elif finish in ("tool_calls", "function_call") and not called:
        finish = "stop"  # tool_use promises a tool_use block (tool loops rely on it)
    result = message_skeleton(message_id, model, usage_of(completion.get("usage")))
    result["content"] = content
    result["stop_reason"], result["stop_sequence"] = (
        ("refusal", None) if refused else stop_reason(finish, choice.get("stop_reason"), stop_sequences)
    )
    return result
