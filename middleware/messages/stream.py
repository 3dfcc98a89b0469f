"""Chat chunk stream → Anthropic Messages event stream (a pure, stateful translator).

One `StreamTranslator` per streamed request: `start()` gives `message_start`;
`chunk()` the events of one `chat.completion.chunk`; `finish()` closes the open
block and sends `message_delta` (stop reason, usage) and `message_stop`. Blocks
are numbered densely in the order they open: `thinking` (reasoning deltas as
`thinking_delta`), `text` (`text_delta`), `tool_use` (one per provider tool
call, its argument fragments as `input_json_delta`). A block is stopped when
the next one starts, so at most one is open at a time, as Anthropic streams them.

Tool calls: a block cannot start before its name is known, and a stopped block
cannot take more input. Providers differ on both: some send a call's name in a
later fragment than its id, some interleave the fragments of parallel calls
(index 0, 1, 0, 1 …). So the first call streams live once named, and every
other call's fragments are kept and sent at the end, each as one whole block:
the input of each call is complete and in its own block whatever the
provider's order, and a provider that streams calls one after another (OpenAI)
still streams the first live.
The provider's `refusal` text (structured outputs send it instead of content)
is a `text` block, and the stop reason is then `refusal`.

A provider failure (an in-band error chunk, or a stream that ends with neither
a finish reason nor `[DONE]`) raises `UpstreamError`; the relay writes it as
the Anthropic `error` event.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

from proxy.core.call import SSEEvent
from proxy.core.chat_deltas import ChoiceDelta, ChunkTranslator
from proxy.core.errors import UpstreamError

from middleware.messages.reply import client_tool_name, message_skeleton, stop_reason, usage_of

PING = SSEEvent.from_json({"type": "ping"}, event="ping")


def _event(payload: dict[str, Any]) -> SSEEvent:
    return SSEEvent.from_json(payload, event=payload["type"])


class _Block:
    __slots__ = ("index", "kind")

    def __init__(self, index: int, kind: str) -> None:
        self.index = index
        self.kind = kind  # "thinking", "text" or "tool_use"


class _ToolUse:
    """One provider tool call: what its fragments said so far, and its block once started."""

    __slots__ = ("id", "name", "arguments", "block")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name: str | None = None
        self.arguments: list[str] = []  # fragments not yet sent
        self.block: _Block | None = None


class StreamTranslator(ChunkTranslator):
    """Chat chunks in, Anthropic events out."""

    def __init__(self, message_id: str, model: Any, stop_sequences: Any, input_estimate: int,
                 names: dict[str, str] | None = None) -> None:
        self.message_id = message_id
        self.names = names  # shortened tool names → the client's (request.renamed_tools)
        self.model = model
        self.stop_sequences = stop_sequences
        self.input_estimate = input_estimate
        self.blocks = 0  # blocks opened so far (the next block's index)
        self.open: _Block | None = None
        self.calls: dict[Any, _ToolUse] = {}  # provider tool-call index → its latest call
        self.tools: list[_ToolUse] = []  # every call, in the order first seen
        self.live: _ToolUse | None = None  # the call whose block is open and streams as it comes
        self.finish_reason: Any = None
        self.matched: Any = None  # the provider's `stop_reason` (vLLM: the stop string hit)
        self.usage: Any = None
        self.saw_done = False
        self.refused = False

    @property
    def talking(self) -> bool:
        """True once the model produced its first block (no more pings needed)."""
        return self.blocks > 0

    def start(self) -> Iterator[SSEEvent]:
        # The provider reports usage only at the end: until message_delta, the
        # input is the gateway's estimate, the output zero.
        usage = {"input_tokens": self.input_estimate, "output_tokens": 0,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        yield _event({"type": "message_start", "message": message_skeleton(self.message_id, self.model, usage)})

    # The parts of each chunk (`ChunkTranslator.chunk`).
    def on_reasoning(self, text: str) -> Iterator[SSEEvent]:
        return self._text("thinking", text)

    def on_content(self, text: str, logprobs: Sequence[dict[str, Any]]) -> Iterator[SSEEvent]:  # (Anthropic has none)
        return self._text("text", text)

    def on_refusal(self, text: str) -> Iterator[SSEEvent]:
        self.refused = True
        return self._text("text", text)

    def on_finish(self, part: ChoiceDelta) -> None:
        self.finish_reason = part.finish_reason
        self.matched = part.choice.get("stop_reason")

    def _start_block(self, kind: str, content_block: dict[str, Any]) -> Iterator[SSEEvent]:
        yield from self._stop_open()
        block = self.open = _Block(self.blocks, kind)
        self.blocks += 1
        yield _event({"type": "content_block_start", "index": block.index, "content_block": content_block})

    def _stop_open(self) -> Iterator[SSEEvent]:
        if self.open is not None:
            yield _event({"type": "content_block_stop", "index": self.open.index})
            self.open = None
            self.live = None

    def _text(self, kind: str, text: str) -> Iterator[SSEEvent]:
        if self.open is None or self.open.kind != kind:
            start: dict[str, Any] = (
                {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {"type": "text", "text": ""}
            )
            yield from self._start_block(kind, start)
        assert self.open is not None
        delta = {"type": "thinking_delta", "thinking": text} if kind == "thinking" else {"type": "text_delta", "text": text}
        yield _event({"type": "content_block_delta", "index": self.open.index, "delta": delta})

    def on_tool_call(self, call: dict[str, Any]) -> Iterator[SSEEvent]:
        function: dict[str, Any] = call["function"] if isinstance(call.get("function"), dict) else {}
        index = call.get("index", 0)
        call_id = call["id"] if isinstance(call.get("id"), str) and call["id"] else None
        tool = self.calls.get(index)
        # Another id at a known index is another call: Ollama numbers parallel calls all 0, some adapters send no index.
        if tool is None or (call_id is not None and tool.id is not None and call_id != tool.id):
            tool = self.calls[index] = _ToolUse()
            self.tools.append(tool)
        if tool.id is None:
            tool.id = call_id
        name = function.get("name")
        if tool.name is None and isinstance(name, str) and name:
            tool.name = name
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            if tool is self.live:
                yield self._input(tool, arguments)
            elif tool.block is None:
                tool.arguments.append(arguments)
            # (else: its block was stopped by text the provider sent between its fragments; nothing can reopen it)
        if tool.block is None and tool.name is not None and self.live is None and len(self.tools) == 1:
            # The first call, named: it streams live (any later call waits for the end, see the module docstring).
            yield from self._start_tool(tool)
            self.live = tool

    def _start_tool(self, tool: _ToolUse) -> Iterator[SSEEvent]:
        """The block of `tool`: its start, and the input kept so far as one delta."""
        start = {"type": "tool_use", "id": tool.id or "toolu_" + os.urandom(12).hex(),
                 "name": client_tool_name(tool.name, self.names), "input": {}}
        yield from self._start_block("tool_use", start)
        tool.block = self.open
        if tool.arguments:
            yield self._input(tool, "".join(tool.arguments))
            tool.arguments.clear()

    def _input(self, tool: _ToolUse, partial_json: str) -> SSEEvent:
        assert tool.block is not None
        return _event({"type": "content_block_delta", "index": tool.block.index,
                       "delta": {"type": "input_json_delta", "partial_json": partial_json}})

    def finish(self, billed: Any = None) -> Iterator[SSEEvent]:
        """Close the open block, then `message_delta` and `message_stop`.

        `billed` is the usage metering charged (`Call.usage`), reported when
        the provider reported none (an estimate then).
        """
        if self.finish_reason is None and not self.saw_done:
            raise UpstreamError("The upstream provider ended the stream early.")
        for tool in self.tools:
            if tool.block is None:  # kept for the end: after the first call, or never named
                yield from self._start_tool(tool)
        yield from self._stop_open()
        finish = self.finish_reason
        if finish in (None, "stop") and self.tools:
            finish = "tool_calls"  # some providers finish a tool call with "stop"
        elif finish in ("tool_calls", "function_call") and not self.tools:
            finish = "stop"  # tool_use promises a tool_use block (tool loops rely on it)
        reason, sequence = stop_reason(finish or "stop", self.matched, self.stop_sequences)
        if self.refused:
            reason, sequence = "refusal", None
        reported = self.usage if self.usage is not None else billed
        usage = usage_of(reported)
        if reported is None:
            usage["input_tokens"] = self.input_estimate  # nothing better was reported or billed
        yield _event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage})
        yield _event({"type": "message_stop"})
