"""Chat chunk stream → Anthropic Messages event stream (a pure, stateful translator).

One `StreamTranslator` per streamed request: `start()` gives `message_start`;
`chunk()` the events of one `chat.completion.chunk`; `finish()` closes the open
block and sends `message_delta` (stop reason, usage) and `message_stop`. Blocks
are numbered densely in the order they open: `thinking` (reasoning deltas as
`thinking_delta`), `text` (`text_delta`), `tool_use` (one per provider tool
call, its argument fragments as `input_json_delta`). A block is stopped when
the next one starts, so at most one is open at a time, as Anthropic streams them.
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
        self.calls: dict[int, _Block] = {}  # provider tool-call index → its block
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
        block = self.calls.get(index)
        if block is None:
            start: dict[str, Any] = {"type": "tool_use", "id": call.get("id") or "toolu_" + os.urandom(12).hex(),
                                      "name": client_tool_name(function.get("name"), self.names), "input": {}}
            yield from self._start_block("tool_use", start)
            assert self.open is not None
            block = self.calls[index] = self.open
        arguments = function.get("arguments")
        if isinstance(arguments, str) and arguments:
            yield _event({"type": "content_block_delta", "index": block.index,
                          "delta": {"type": "input_json_delta", "partial_json": arguments}})

    def finish(self) -> Iterator[SSEEvent]:
        """Close the open block, then `message_delta` and `message_stop`."""
        if self.finish_reason is None and not self.saw_done:
            raise UpstreamError("The upstream provider ended the stream early.")
        yield from self._stop_open()
        finish = self.finish_reason
        if finish in (None, "stop") and self.calls:
            finish = "tool_calls"  # some providers finish a tool call with "stop"
        reason, sequence = stop_reason(finish or "stop", self.matched, self.stop_sequences)
        if self.refused:
            reason, sequence = "refusal", None
        usage = usage_of(self.usage)
        if self.usage is None:
            usage["input_tokens"] = self.input_estimate  # nothing better was reported
        yield _event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence}, "usage": usage})
        yield _event({"type": "message_stop"})
