"""Legacy function calling: `functions`/`function_call` on top of `tools`.

Providers today speak only `tools`/`tool_choice`; older clients still send the
deprecated ``functions``/``function_call`` fields and ``role: "function"``
result messages. On chat completions this unit rewrites such requests into the
modern shape and, for clients that used the legacy top-level fields, rewrites
the reply back:

- ``functions`` → ``tools``; ``function_call`` → ``tool_choice``; and
  ``parallel_tool_calls: false``, because a legacy message holds a single
  ``function_call`` — a second parallel call could not be shown to the client;
- an assistant message's ``function_call`` → one ``tool_calls`` entry whose id
  is derived from the message's position, name and arguments (`call_id`), so
  the same history always yields the same ids; the ``role: "function"``
  message answering it → ``role: "tool"`` with that ``tool_call_id`` (paired by
  name, else in order);
- reply: ``message.tool_calls[0]`` → ``message.function_call``, stream deltas'
  ``tool_calls`` (the first call, index 0) → ``delta.function_call``, and
  ``finish_reason: "tool_calls"`` → ``"function_call"``. Only events whose
  bytes mention ``tool_calls`` are parsed; all others pass as the same object.

Mixing legacy and modern top-level fields in one request is a 400. The mapping
functions are pure and exported for tests.
"""

from __future__ import annotations

import hashlib
from typing import Any

from proxy.core.call import CHAT, Call, Next, Reply, SSEEvent
from proxy.core.errors import invalid_request
from proxy.core.pipeline import Unit
from proxy.core.streams import EventStream

_LEGACY = ("functions", "function_call")


def call_id(index: int, name: str, arguments: str) -> str:
    """The tool-call id of the legacy function_call in message `index` (stable)."""
    digest = hashlib.sha256(f"{index}\0{name}\0{arguments}".encode()).hexdigest()
    return "call_" + digest[:24]


def to_tools(functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "function", "function": function} for function in functions]


def to_tool_choice(function_call: str | dict[str, Any]) -> str | dict[str, Any]:
    if isinstance(function_call, str):  # "auto" / "none" mean the same for tool_choice
        return function_call
    return {"type": "function", "function": {"name": function_call["name"]}}


def convert_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Legacy call/result messages as tool messages; None when there are none."""
    out: list[dict[str, Any]] = []
    pending: list[tuple[str, str]] = []  # (name, id) of calls not answered yet
    changed = False
    for index, message in enumerate(messages):
        # Shapes are checked by the validation unit; anything else passes as is.
        role = message.get("role") if isinstance(message, dict) else None
        if role == "assistant" and isinstance(message.get("function_call"), dict):
            if message.get("tool_calls"):
                raise invalid_request(
                    "An assistant message cannot carry both `function_call` and `tool_calls`.",
                    param=f"messages[{index}].function_call",
                )
            function = message["function_call"]
            name, arguments = function.get("name"), function.get("arguments")
            ident = call_id(index, name, arguments)
            converted = {k: v for k, v in message.items() if k != "function_call"}
            converted["tool_calls"] = [
                {"id": ident, "type": "function", "function": {"name": name, "arguments": arguments}}
            ]
            out.append(converted)
            pending = [(name, ident)]
            changed = True
        elif role == "function":
            match = next((p for p in pending if p[0] == message.get("name")), pending[0] if pending else None)
            if match is None:
                raise invalid_request(
                    "A `function` message must answer the `function_call` of a preceding assistant message.",
                    param=f"messages[{index}]",
                )
            pending.remove(match)
            out.append({"role": "tool", "tool_call_id": match[1], "content": message.get("content") or ""})
            changed = True
        else:
            out.append(message)
    return out if changed else None


def is_legacy_client(body: dict[str, Any]) -> bool:
    """Whether the client used the legacy top-level fields (and expects legacy replies)."""
    return body.get("functions") is not None or body.get("function_call") is not None


def normalize_request(body: dict[str, Any]) -> dict[str, Any] | None:
    """The body in the modern shape, or None when it has nothing legacy."""
    functions, function_call = body.get("functions"), body.get("function_call")
    legacy = functions is not None or function_call is not None
    if legacy and (body.get("tools") is not None or body.get("tool_choice") is not None):
        raise invalid_request(
            "Use either the legacy `functions`/`function_call` or `tools`/`tool_choice`, not both.",
            param="functions" if functions is not None else "function_call",
        )
    if function_call is not None and functions is None and isinstance(function_call, dict):
        raise invalid_request("`function_call` names a function but no `functions` were given.", param="function_call")
    messages = body.get("messages")
    converted = convert_messages(messages) if isinstance(messages, list) else None
    if not legacy and converted is None:
        return None
    new = {k: v for k, v in body.items() if k not in _LEGACY}
    if functions is not None:
        new["tools"] = to_tools(functions)
        new["parallel_tool_calls"] = False  # one function_call per legacy message
        if function_call is not None:
            new["tool_choice"] = to_tool_choice(function_call)
    # function_call "auto"/"none" without functions offers nothing: dropped.
    if converted is not None:
        new["messages"] = converted
    return new


def _legacy_call(call: Any) -> dict[str, Any] | None:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        return None
    return {k: function[k] for k in ("name", "arguments") if k in function}


def _legacy_choice(choice: Any, part: str) -> Any:
    """A choice with `part` ("message" or "delta") and finish_reason in legacy form."""
    if not isinstance(choice, dict):
        return choice
    inner: Any = choice.get(part)  # a dict whenever has_calls
    has_calls = isinstance(inner, dict) and "tool_calls" in inner
    if not has_calls and choice.get("finish_reason") != "tool_calls":
        return choice
    new = dict(choice)
    if has_calls:
        calls = inner["tool_calls"] if isinstance(inner["tool_calls"], list) else []
        # Streams: only fragments of the first call (index 0); a message: its first call.
        first = next((c for c in calls if part == "message" or (isinstance(c, dict) and c.get("index", 0) == 0)), None)
        converted = {k: v for k, v in inner.items() if k != "tool_calls"}
        function_call = _legacy_call(first)
        if function_call:
            converted["function_call"] = function_call
        new[part] = converted
    if choice.get("finish_reason") == "tool_calls":
        new["finish_reason"] = "function_call"
    return new


def _map_choices(obj: dict[str, Any], part: str) -> dict[str, Any]:
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return obj
    mapped = [_legacy_choice(choice, part) for choice in choices]
    if all(a is b for a, b in zip(mapped, choices)):
        return obj
    return {**obj, "choices": mapped}


def completion_to_legacy(completion: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion in legacy form (the same object when nothing changes)."""
    return _map_choices(completion, "message")


def chunk_to_legacy(chunk: dict[str, Any]) -> dict[str, Any] | None:
    """A chat.completion.chunk in legacy form: the same object when unchanged,
    None when nothing is left of it (it only carried a dropped parallel call)."""
    new = _map_choices(chunk, "delta")
    if new is chunk:
        return chunk
    empty = all(isinstance(c, dict) and not c.get("delta") and c.get("finish_reason") is None for c in new["choices"])
    return None if empty and not new.get("usage") else new


class LegacyFunctionsUnit(Unit):
    """Serves legacy function calling on top of a tools-only provider."""

    name = "legacy_functions"

    async def __call__(self, call: Call, next: Next) -> Reply:
        if call.endpoint != CHAT:
            return await next(call)
        body = normalize_request(call.body)
        if body is None:
            return await next(call)
        legacy_client = is_legacy_client(call.body)
        call.replace_body(body)
        reply = await next(call)
        if not legacy_client or reply.status >= 400:
            return reply
        if reply.events is not None:
            reply.events = EventStream(reply.events, observe=_legacy_event)
        else:
            completion = reply.json()
            if isinstance(completion, dict):
                mapped = completion_to_legacy(completion)
                if mapped is not completion:
                    reply.set_json(mapped)
        return reply


def _legacy_event(event: SSEEvent) -> SSEEvent | None:
    """A chat chunk as a legacy client reads it (None: nothing left to send)."""
    # Cheap filter: only events mentioning tool_calls can need a change.
    if event.raw.find(b"tool_calls") == -1:  # (not `in`: see proxy/upstream/router.py, Upstream.redact)
        return event
    chunk = event.json()
    if not isinstance(chunk, dict):
        return event
    mapped = chunk_to_legacy(chunk)
    if mapped is chunk:
        return event
    return SSEEvent.from_json(mapped) if mapped is not None else None


__all__ = [
    "LegacyFunctionsUnit",
    "call_id",
    "chunk_to_legacy",
    "completion_to_legacy",
    "convert_messages",
    "is_legacy_client",
    "normalize_request",
    "to_tool_choice",
    "to_tools",
]
