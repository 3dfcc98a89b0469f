"""The one reading of a streamed chat chunk and the tool-call fragment accumulator."""

from __future__ import annotations

import pytest

from proxy.core.chat_deltas import ChoiceDelta, ToolCalls, first_choice, reasoning_of
from proxy.core.errors import UpstreamError


def test_a_choice_delta_reads_every_part() -> None:
    part = ChoiceDelta({
        "index": 0,
        "delta": {"reasoning_content": "hm", "content": "Hi", "tool_calls": [{"index": 0}, "junk"],
                  "function_call": {"name": "f"}},
        "finish_reason": "stop",
    })
    assert (part.reasoning, part.content, part.finish_reason) == ("hm", "Hi", "stop")
    assert list(part.tool_calls) == [{"index": 0}]  # fragments that are not objects are skipped
    assert part.function_call == {"name": "f"}


def test_parts_of_the_wrong_type_read_as_absent() -> None:
    part = ChoiceDelta({"delta": {"content": 3, "reasoning": ["x"], "tool_calls": {"index": 0}, "function_call": "f"}})
    assert (part.reasoning, part.content, part.function_call, part.finish_reason) == (None, None, None, None)
    assert not part.tool_calls
    bare = ChoiceDelta({"delta": None, "finish_reason": "length"})
    assert (bare.content, bare.finish_reason) == (None, "length")
    assert ChoiceDelta({"delta": {"content": ""}}).content == ""  # empty text is text (sessions keeps it)


def test_reasoning_under_either_name() -> None:
    assert reasoning_of({"reasoning": "r"}) == "r"
    assert reasoning_of({"reasoning_content": "a", "reasoning": "b"}) == "a"
    assert reasoning_of({}) is None


def test_first_choice_is_choice_zero_in_first_place_only() -> None:
    part = first_choice({"choices": [{"index": 0, "delta": {"content": "x"}}]})
    assert part is not None and part.content == "x"
    assert first_choice({"choices": [{"index": 1, "delta": {"content": "x"}}, {"index": 0}]}) is None
    assert first_choice({"choices": [], "usage": {"total_tokens": 3}}) is None


def test_first_choice_raises_the_providers_in_band_error() -> None:
    with pytest.raises(UpstreamError, match="overloaded"):
        first_choice({"error": {"message": "overloaded"}})
    with pytest.raises(UpstreamError, match="The upstream provider failed."):
        first_choice({"choices": [], "error": {}})


def test_tool_calls_assemble_fragments_by_index() -> None:
    calls = ToolCalls()
    for fragment in (
        {"index": 1, "id": "call_b", "type": "function", "function": {"name": "second", "arguments": ""}},
        {"index": 0, "id": "call_a", "function": {"name": "fir"}},
        {"index": 0, "function": {"name": "st", "arguments": '{"q":'}},
        {"index": 1, "function": {"arguments": "{}"}},
        {"index": 0, "id": 7, "function": {"arguments": ' "x"}'}},  # a non-string id is ignored
    ):
        calls.add(fragment)
    assert len(calls) == 2 and 0 in calls and 2 not in calls
    assert calls.message_calls() == [
        {"id": "call_a", "type": "function", "function": {"name": "first", "arguments": '{"q": "x"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "second", "arguments": "{}"}},
    ]


def test_a_fragment_without_index_is_call_zero() -> None:
    calls = ToolCalls()
    call = calls.add({"function": {"name": "f", "arguments": "{}"}})
    assert calls.add({"index": 0}) is call and call.function() == {"name": "f", "arguments": "{}"} and call.id is None
