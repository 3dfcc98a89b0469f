"""Chat-completions output → Responses output.

`skeleton` builds the Response object echoed from the request; `complete`
fills it from a `chat.completion` body; `StreamTranslator` turns a stream of
`chat.completion.chunk` events (also those the router makes of a provider's
completion when it ignored `stream`) into the Responses event sequence
(`response.created` … `response.completed`), with `sequence_number` from 0
and dense `output_index` in the order items are announced.

Output items, in order of appearance: `reasoning` (from the provider's
`reasoning_content` / `reasoning`), `message` (assistant `output_text`; the
provider's `refusal`, which structured outputs send instead of content, as a
`refusal` part, streamed as `response.refusal.*` events), `function_call`
(`fc_…` ids, `call_id` = the provider's tool-call id).

A reasoning item's text goes where the `reasoning` mode says: `summary` (one
`summary_text` part; `response.reasoning_summary_part.*` and
`response.reasoning_summary_text.*` events), `text` (one `reasoning_text`
content part; `response.content_part.*` and `response.reasoning_text.*`
events) or `both` (each event pair, summary first).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any, Literal

from proxy.core.call import SSEEvent
from proxy.core.chat_deltas import ChoiceDelta, ChunkTranslator, reasoning_of, token_logprobs
from proxy.core.errors import ApiError, UpstreamError

from proxy.core.ids import new_id

from middleware.responses.request import mcp_call_messages

# finish_reason → incomplete_details.reason; anything else counts as completed.
_INCOMPLETE = {"length": "max_output_tokens", "content_filter": "content_filter"}
# Item kinds while streaming; a "refusal" is a message item whose one part is a refusal.
_ID_PREFIX = {"message": "msg_", "refusal": "msg_", "reasoning": "rs_", "function_call": "fc_"}
# The `reasoning` unit setting: summary, text or both.
ReasoningMode = Literal["summary", "text", "both"]


def skeleton(
    body: dict[str, Any], response_id: str, model: str | None, tools: list[dict[str, Any]], store: bool
) -> dict[str, Any]:
    """The Response object as `response.created` shows it, echoing the request."""
    reasoning = body.get("reasoning")
    return {
        "id": response_id,
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "background": False,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": model,
        "output": [],
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": reasoning if isinstance(reasoning, dict) else {"effort": None, "summary": None},
        "store": store,
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": tools,
        "top_p": body.get("top_p", 1.0),
        "top_logprobs": body.get("top_logprobs"),
        "truncation": "disabled",
        "usage": None,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def usage_of(usage: Any) -> dict[str, Any] | None:
    """Chat usage → Responses usage (None when the provider reported none)."""
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": usage.get("total_tokens") or prompt + completion,
    }


def _finish(response: dict[str, Any], finish_reason: Any, usage: Any) -> None:
    reason = _INCOMPLETE.get(finish_reason)
    response["status"] = "incomplete" if reason else "completed"
    response["incomplete_details"] = {"reason": reason} if reason else None
    response["usage"] = usage_of(usage)
    response["completed_at"] = int(time.time())


def _text_part(text: str, logprobs: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    # The chat token logprobs have the Responses shape already (token, logprob, bytes, top_logprobs).
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": list(logprobs)}


def _refusal_part(text: str) -> dict[str, Any]:
    return {"type": "refusal", "refusal": text}


def _message_item(item_id: str, parts: list[dict[str, Any]], status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": parts}


def _reasoning_item(item_id: str, text: str, status: str, mode: ReasoningMode) -> dict[str, Any]:
    item: dict[str, Any] = {"id": item_id, "type": "reasoning",
                            "summary": [] if mode == "text" else [{"type": "summary_text", "text": text}]}
    if mode != "summary":
        item["content"] = [{"type": "reasoning_text", "text": text}]
    item["status"] = status
    return item


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": item_id, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def complete(response: dict[str, Any], completion: dict[str, Any], reasoning_mode: ReasoningMode = "summary") -> None:
    """Fill `response` from a non-streamed `chat.completion` (first choice)."""
    choices = completion.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    message = choice.get("message") or {}
    finish_reason = choice.get("finish_reason")
    status = "incomplete" if finish_reason in _INCOMPLETE else "completed"
    output: list[dict[str, Any]] = []
    reasoning = reasoning_of(message)
    if isinstance(reasoning, str) and reasoning:
        output.append(_reasoning_item(new_id("rs_"), reasoning, "completed", reasoning_mode))
    content, refusal = message.get("content"), message.get("refusal")
    parts = [_text_part(content, token_logprobs(choice.get("logprobs")))] if isinstance(content, str) and content else []
    if isinstance(refusal, str) and refusal:
        parts.append(_refusal_part(refusal))
    if parts:
        output.append(_message_item(new_id("msg_"), parts, "completed"))
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        output.append(_call_item(new_id("fc_"), call.get("id") or new_id("call_"), function.get("name") or "",
                                 function.get("arguments") or "", "completed"))
    if output:
        # A cut (the cap, a filter) stops the item being generated: the last one.
        output[-1]["status"] = status
    response["output"] = output
    _finish(response, finish_reason, completion.get("usage"))


def assistant_messages(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Response's output as the chat messages of its turn (for previous_response_id).

    The server tool calls an agent model ran (`mcp_call` items, first) are its
    tool calls and their results; then one assistant message with the text and
    the client's function calls. A refusal is the assistant's text of that
    turn: every provider reads it as content.
    """
    messages: list[dict[str, Any]] = []
    for item in output:
        if item["type"] == "mcp_call":
            call, result = mcp_call_messages(item)
            messages += [{"role": "assistant", "content": None, "tool_calls": [call]}, result]
    text = "".join(part["text"] if part["type"] == "output_text" else part["refusal"]
                   for item in output if item["type"] == "message" for part in item["content"])
    calls = [
        {"id": item["call_id"], "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
        for item in output
        if item["type"] == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if calls else "")}
    if calls:
        message["tool_calls"] = calls
    messages.append(message)
    return messages


class _Item:
    """One output item being streamed: its position, id and accumulated text/arguments."""

    __slots__ = ("index", "kind", "id", "parts", "logprobs", "call_id", "name", "status", "mode")

    def __init__(self, index: int, kind: str, call_id: str = "", name: str = "",
                 mode: ReasoningMode = "summary") -> None:
        self.index = index
        self.kind = kind
        self.mode = mode
        self.id = new_id(_ID_PREFIX[kind])
        self.parts: list[str] = []
        self.logprobs: list[dict[str, Any]] = []  # a message's token logprobs, when asked for
        self.call_id = call_id
        self.name = name
        self.status: str | None = None  # set when the item is closed

    def item(self, status: str) -> dict[str, Any]:
        text = "".join(self.parts)
        if self.kind == "message":
            return _message_item(self.id, [_text_part(text, self.logprobs)], status)
        if self.kind == "refusal":
            return _message_item(self.id, [_refusal_part(text)], status)
        if self.kind == "reasoning":
            return _reasoning_item(self.id, text, status, self.mode)
        return _call_item(self.id, self.call_id, self.name, text, status)

    def announced(self) -> dict[str, Any]:
        """The item as `response.output_item.added` shows it (no content yet)."""
        item = self.item("in_progress")
        if "content" in item:
            item["content"] = []
        if self.kind == "reasoning":
            item["summary"] = []
        return item


class StreamTranslator(ChunkTranslator):
    """Chat chunks in, Responses events out; one per streamed request."""

    def __init__(self, response: dict[str, Any], reasoning_mode: ReasoningMode = "summary") -> None:
        self.response = response
        self.reasoning_mode = reasoning_mode
        self.seq = 0
        self.items: list[_Item] = []
        self.text: _Item | None = None  # the open reasoning or message item
        self.calls: dict[int, _Item] = {}  # provider tool-call index → item
        self.finish_reason: Any = None
        self.usage: Any = None
        self.saw_done = False  # the provider's [DONE]: a clean end even without finish_reason

    def _event(self, event: dict[str, Any]) -> SSEEvent:
        event["sequence_number"] = self.seq
        self.seq += 1
        return SSEEvent.from_json(event, event=event["type"])

    def start(self) -> Iterator[SSEEvent]:
        yield self._event({"type": "response.created", "response": self.response})
        yield self._event({"type": "response.in_progress", "response": self.response})

    # The parts of each chunk (`ChunkTranslator.chunk`); usage and finish_reason are only remembered.
    def on_reasoning(self, text: str) -> Iterator[SSEEvent]:
        return self._text("reasoning", text)

    def on_content(self, text: str, logprobs: Sequence[dict[str, Any]]) -> Iterator[SSEEvent]:
        return self._text("message", text, logprobs)

    def on_refusal(self, text: str) -> Iterator[SSEEvent]:
        return self._text("refusal", text)

    def on_finish(self, part: ChoiceDelta) -> None:
        self.finish_reason = part.finish_reason

    def _text(self, kind: str, delta: str, logprobs: Sequence[dict[str, Any]] = ()) -> Iterator[SSEEvent]:
        item = self.text
        if item is None or item.kind != kind:
            if item is not None:
                yield from self._close(item, "completed")  # another item began: this one is whole
            item = self.text = self._open(kind)
            yield self._event({"type": "response.output_item.added", "output_index": item.index,
                               "item": item.announced()})
            head = {"item_id": item.id, "output_index": item.index}
            if kind == "message":
                yield self._event({"type": "response.content_part.added", **head, "content_index": 0,
                                   "part": _text_part("")})
            elif kind == "refusal":
                yield self._event({"type": "response.content_part.added", **head, "content_index": 0,
                                   "part": _refusal_part("")})
            if self._summary(item):
                yield self._event({"type": "response.reasoning_summary_part.added", **head, "summary_index": 0,
                                   "part": {"type": "summary_text", "text": ""}})
            if self._reasoning_text(item):
                yield self._event({"type": "response.content_part.added", **head, "content_index": 0,
                                   "part": {"type": "reasoning_text", "text": ""}})
        item.parts.append(delta)
        item.logprobs.extend(logprobs)
        head = {"item_id": item.id, "output_index": item.index}
        if kind == "message":
            yield self._event({"type": "response.output_text.delta", **head, "content_index": 0, "delta": delta,
                               "logprobs": list(logprobs)})
        elif kind == "refusal":
            yield self._event({"type": "response.refusal.delta", **head, "content_index": 0, "delta": delta})
        if self._summary(item):
            yield self._event({"type": "response.reasoning_summary_text.delta", **head, "summary_index": 0,
                               "delta": delta})
        if self._reasoning_text(item):
            yield self._event({"type": "response.reasoning_text.delta", **head, "content_index": 0, "delta": delta})

    def _summary(self, item: _Item) -> bool:
        return item.kind == "reasoning" and self.reasoning_mode != "text"

    def _reasoning_text(self, item: _Item) -> bool:
        return item.kind == "reasoning" and self.reasoning_mode != "summary"

    def on_tool_call(self, call: dict[str, Any]) -> Iterator[SSEEvent]:
        function: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else {}
        index = call.get("index", 0)
        item = self.calls.get(index)
        if item is None:
            if self.text is not None:
                yield from self._close(self.text, "completed")
            item = self.calls[index] = self._open(
                "function_call", call.get("id") or new_id("call_"), function.get("name") or "")
            yield self._event({"type": "response.output_item.added", "output_index": item.index,
                               "item": item.announced()})
        elif not item.name and isinstance(function.get("name"), str):
            item.name = function["name"]  # some providers name a call in a later fragment than its first
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            item.parts.append(arguments)
            yield self._event({"type": "response.function_call_arguments.delta", "item_id": item.id,
                               "output_index": item.index, "delta": arguments})

    def _open(self, kind: str, call_id: str = "", name: str = "") -> _Item:
        item = _Item(len(self.items), kind, call_id, name, self.reasoning_mode)
        self.items.append(item)
        return item

    def _status(self) -> str:
        return "incomplete" if self.finish_reason in _INCOMPLETE else "completed"

    def _close(self, item: _Item, status: str) -> Iterator[SSEEvent]:
        item.status = status
        if item is self.text:
            self.text = None
        done = item.item(item.status)
        head = {"item_id": item.id, "output_index": item.index}
        if item.kind == "function_call":
            yield self._event({"type": "response.function_call_arguments.done", **head,
                               "name": item.name, "arguments": done["arguments"]})
        elif item.kind == "message":
            part = done["content"][0]
            yield self._event({"type": "response.output_text.done", **head, "content_index": 0,
                               "text": part["text"], "logprobs": part["logprobs"]})
            yield self._event({"type": "response.content_part.done", **head, "content_index": 0, "part": part})
        elif item.kind == "refusal":
            part = done["content"][0]
            yield self._event({"type": "response.refusal.done", **head, "content_index": 0, "refusal": part["refusal"]})
            yield self._event({"type": "response.content_part.done", **head, "content_index": 0, "part": part})
        else:
            if self._summary(item):
                part = done["summary"][0]
                yield self._event({"type": "response.reasoning_summary_text.done", **head, "summary_index": 0,
                                   "text": part["text"]})
                yield self._event({"type": "response.reasoning_summary_part.done", **head, "summary_index": 0,
                                   "part": part})
            if self._reasoning_text(item):
                part = done["content"][0]
                yield self._event({"type": "response.reasoning_text.done", **head, "content_index": 0,
                                   "text": part["text"]})
                yield self._event({"type": "response.content_part.done", **head, "content_index": 0,
                                   "part": part})
        yield self._event({"type": "response.output_item.done", "output_index": item.index, "item": done})

    def finish(self) -> Iterator[SSEEvent]:
        """Close what is open and send `response.completed` (or `.incomplete`)."""
        if self.finish_reason is None and not self.saw_done:
            # Neither finish_reason nor [DONE]: the provider's stream ended early.
            yield from self.fail(UpstreamError("The upstream provider ended the stream early."))
            return
        # A cut (the cap, a filter) stops the item being generated, the last one;
        # the calls before it are whole.
        last = self.items[-1] if self.items else None
        for item in self.items:
            if item.status is None:
                yield from self._close(item, self._status() if item is last else "completed")
        self.response["output"] = [item.item(item.status or "completed") for item in self.items]
        _finish(self.response, self.finish_reason, self.usage)
        kind = "response.incomplete" if self.response["status"] == "incomplete" else "response.completed"
        yield self._event({"type": kind, "response": self.response})

    def fail(self, error: ApiError) -> Iterator[SSEEvent]:
        """`error`, then `response.failed` with what was produced so far."""
        yield self._event({"type": "error", "code": error.code, "message": error.message, "param": error.param})
        response = self.response
        response["status"] = "failed"
        response["error"] = {"code": "server_error", "message": error.message}
        response["output"] = [item.item(item.status or "incomplete") for item in self.items]
        response["usage"] = usage_of(self.usage)
        yield self._event({"type": "response.failed", "response": response})
