"""One reading of a streamed chat chunk, and one accumulator of its tool-call fragments.

A `chat.completion.chunk` carries, per choice, a ``delta`` (reasoning text,
content text, tool-call fragments, a legacy ``function_call`` fragment) and a
``finish_reason``. The units that read provider streams (sessions, agent,
Responses, Messages) read them here:

- `ChoiceDelta(choice)`: the parts of one choice's delta (`ChoiceDelta`),
  each None/empty when absent or not of the expected type (``refusal``: the
  text of a model that declined, which structured outputs send instead of
  content);
- `first_choice(chunk)`: the same for ``choices[0]`` when it is choice 0 (the
  translators' reading: a Response or a Message has one output, extra choices
  of ``n > 1`` are dropped), after the provider's in-band error event, which
  it raises as `UpstreamError`;
- `reasoning_of(part)`: reasoning text under either name providers use;
- `token_logprobs(logprobs)`: a choice's content logprobs, when asked for;
- `not_a_completion(body)`: the 502 for a 200 reply that holds no completion
  (OpenRouter-style ``{"error": …}`` bodies), for the units that translate it;
- `as_chunks(completion)`: a finished completion as the chunks its stream adds
  up to, for the router to stream a reply from a provider that ignored ``stream``;
- `ChunkTranslator`: the chunk reading of the translators into another
  API's events (Responses, Messages): each part of choice 0 to a hook;
- `ToolCalls`: tool-call fragments assembled by their ``index`` (ids, names
  and arguments arrive in pieces), into `ToolCall` slots.

Which choices a unit reads stays with the unit: sessions and the agent scan
every choice for index 0 (they pass the others on), the translators take
``choices[0]``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

from proxy.core.call import SSEEvent
from proxy.core.errors import UpstreamError

_NO_FRAGMENTS: tuple[dict[str, Any], ...] = ()


def reasoning_of(part: dict[str, Any]) -> Any:
    """The reasoning of a message or delta, as the provider sent it (None when absent)."""
    # DeepSeek/vLLM call it reasoning_content; OpenRouter and newer vLLM call it reasoning.
    value = part.get("reasoning_content")
    return value if value is not None else part.get("reasoning")


def not_a_completion(body: Any) -> UpstreamError:
    """The error for a provider's 200 reply that is not a chat completion, naming the provider's message if any."""
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str) and message:
        return UpstreamError(f"The upstream provider answered without a completion: {message[:500]}")
    return UpstreamError("The upstream provider answered without a completion.")


def as_chunks(completion: dict[str, Any]) -> list[dict[str, Any]]:
    """A finished `chat.completion` as the chunks its stream adds up to (for a provider that ignored `stream`).

    One chunk with every choice's message as its delta (tool calls numbered
    by their position, as chunks number them), then, when the completion has
    usage, the usage chunk that ``include_usage`` adds (no choices).
    """
    choices = completion.get("choices")
    deltas = []
    for position, choice in enumerate(choices if isinstance(choices, list) else ()):
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        delta = dict(message) if isinstance(message, dict) else {}
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            delta["tool_calls"] = [{**call, "index": i} for i, call in enumerate(calls) if isinstance(call, dict)]
        deltas.append({"index": choice.get("index", position), "delta": delta, "logprobs": choice.get("logprobs"),
                       "finish_reason": choice.get("finish_reason")})
    head = {"id": completion.get("id"), "object": "chat.completion.chunk", "created": completion.get("created"),
            "model": completion.get("model")}
    chunks = [{**head, "choices": deltas}]
    if isinstance(completion.get("usage"), dict):
        chunks.append({**head, "choices": [], "usage": completion["usage"]})
    return chunks


def token_logprobs(logprobs: Any) -> Sequence[dict[str, Any]]:
    """The token entries of a choice's `logprobs.content` (a message's or a chunk's), those that are objects."""
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    return [entry for entry in content if isinstance(entry, dict)] if isinstance(content, list) else _NO_FRAGMENTS


class ChoiceDelta:
    """The parts of one streamed choice: each None (or no fragments) when absent or of the wrong type."""

    __slots__ = ("choice", "reasoning", "content", "logprobs", "refusal", "tool_calls", "function_call", "finish_reason")

    choice: dict[str, Any]
    reasoning: str | None
    content: str | None
    logprobs: Sequence[dict[str, Any]]  # the content's token logprobs (`logprobs.content`), when asked for
    refusal: str | None
    tool_calls: Sequence[dict[str, Any]]  # the fragments that are objects, in order
    function_call: dict[str, Any] | None  # a legacy `function_call` fragment
    finish_reason: Any

    def __init__(self, choice: dict[str, Any]) -> None:
        self.choice = choice  # the raw choice, for provider extras (vLLM's stop_reason)
        self.finish_reason = choice.get("finish_reason")
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            self.reasoning = self.content = self.refusal = self.function_call = None
            self.tool_calls = self.logprobs = _NO_FRAGMENTS
            return
        reasoning = reasoning_of(delta)
        self.reasoning = reasoning if isinstance(reasoning, str) else None
        content = delta.get("content")
        self.content = content if isinstance(content, str) else None
        self.logprobs = token_logprobs(choice.get("logprobs"))
        refusal = delta.get("refusal")
        self.refusal = refusal if isinstance(refusal, str) else None
        fragments = delta.get("tool_calls")
        self.tool_calls = (
            [f for f in fragments if isinstance(f, dict)] if isinstance(fragments, list) and fragments else _NO_FRAGMENTS
        )
        function = delta.get("function_call")
        self.function_call = function if isinstance(function, dict) else None


def first_choice(chunk: dict[str, Any]) -> ChoiceDelta | None:
    """Choice 0 of `chunk` when it comes first; None for a chunk without it (usage only, another choice).

    A chunk without choices that carries an ``error`` object is the provider's
    in-band error event: raised as `UpstreamError`.
    """
    choices = chunk.get("choices")
    if not choices:
        if isinstance(chunk.get("error"), dict):
            raise UpstreamError(str(chunk["error"].get("message") or "The upstream provider failed."))
        return None
    choice = choices[0]
    if not isinstance(choice, dict) or choice.get("index", 0) != 0:
        return None
    return ChoiceDelta(choice)


class ChunkTranslator(ABC):
    """Chat chunks in, another API's events out: the reading its translators share.

    `chunk` remembers the chunk's usage, raises the provider's in-band error
    and hands the parts of choice 0 (`first_choice`) to the hooks, in order:
    reasoning text, content text, refusal text (each when not empty), each
    tool-call fragment, then the finish reason, after the events of the chunk's text
    (an item closed by that text takes its status from the reason before it).
    """

    usage: Any  # the latest usage a chunk reported

    def chunk(self, chunk: dict[str, Any]) -> Iterator[SSEEvent]:
        """The events for one chat chunk."""
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        part = first_choice(chunk)  # one output; extra choices (n > 1) are dropped
        if part is None:
            return
        if part.reasoning:
            yield from self.on_reasoning(part.reasoning)
        if part.content:
            yield from self.on_content(part.content, part.logprobs)
        if part.refusal:
            yield from self.on_refusal(part.refusal)
        for fragment in part.tool_calls:
            yield from self.on_tool_call(fragment)
        if part.finish_reason:
            self.on_finish(part)

    @abstractmethod
    def on_reasoning(self, text: str) -> Iterator[SSEEvent]: ...

    @abstractmethod
    def on_content(self, text: str, logprobs: Sequence[dict[str, Any]]) -> Iterator[SSEEvent]: ...

    @abstractmethod
    def on_refusal(self, text: str) -> Iterator[SSEEvent]: ...

    @abstractmethod
    def on_tool_call(self, fragment: dict[str, Any]) -> Iterator[SSEEvent]: ...

    @abstractmethod
    def on_finish(self, part: ChoiceDelta) -> None: ...


class ToolCall:
    """One tool call being assembled: the latest id and type sent, the name and argument pieces."""

    __slots__ = ("id", "type", "name", "arguments")

    def __init__(self) -> None:
        self.id: str | None = None
        self.type = "function"
        self.name: list[str] = []
        self.arguments: list[str] = []

    def add_function(self, function: dict[str, Any]) -> None:
        """Add one fragment of a function's name and arguments (also a legacy `function_call` delta)."""
        name, arguments = function.get("name"), function.get("arguments")
        if isinstance(name, str):
            self.name.append(name)
        if isinstance(arguments, str):
            self.arguments.append(arguments)

    def function(self) -> dict[str, str]:
        return {"name": "".join(self.name), "arguments": "".join(self.arguments)}


class ToolCalls:
    """Tool-call fragments of one streamed choice, assembled by their ``index``."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: dict[Any, ToolCall] = {}  # provider index → call, in the order first seen

    def __len__(self) -> int:
        return len(self.calls)

    def __contains__(self, index: Any) -> bool:
        return index in self.calls

    def add(self, fragment: dict[str, Any]) -> ToolCall:
        """Add one ``delta.tool_calls`` entry; returns its call (opened on the index's first fragment)."""
        index = fragment.get("index", 0)
        call = self.calls.get(index)
        if call is None:
            call = self.calls[index] = ToolCall()
        if isinstance(fragment.get("id"), str):
            call.id = fragment["id"]
        if isinstance(fragment.get("type"), str):
            call.type = fragment["type"]
        function = fragment.get("function")
        if isinstance(function, dict):
            call.add_function(function)
        return call

    def message_calls(self) -> list[dict[str, Any]]:
        """The calls as an assistant message's ``tool_calls``, by index."""
        return [
            {"id": call.id, "type": call.type, "function": call.function()}
            for _, call in sorted(self.calls.items(), key=lambda item: item[0])
        ]
