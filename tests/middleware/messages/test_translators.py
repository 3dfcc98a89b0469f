"""The pure Messages translators: request → chat, chat reply → Message, chat chunks → Anthropic events."""

from __future__ import annotations

import pytest

from middleware.messages import errors
from middleware.messages.reply import to_message
from middleware.messages.request import to_chat
from middleware.messages.stream import StreamTranslator
from proxy.core.errors import ApiError, UpstreamError


def test_tool_results_go_first_and_choices_map():
    chat = to_chat({
        "model": "m", "max_tokens": 5,
        "tools": [{"name": "a", "input_schema": {"type": "object"}}, {"type": "custom", "name": "b", "input_schema": {}}],
        "tool_choice": {"type": "any"},
        "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": [{"type": "text", "text": "calling "},
                                              {"type": "tool_use", "id": "t1", "name": "a", "input": {"x": 1}},
                                              {"type": "tool_use", "id": "t2", "name": "b", "input": {}}]},
            {"role": "user", "content": [{"type": "text", "text": "here:"},
                                         {"type": "tool_result", "tool_use_id": "t1", "content": "one"},
                                         {"type": "tool_result", "tool_use_id": "t2", "is_error": True}]},
        ],
    })
    assert chat["tool_choice"] == "required" and "parallel_tool_calls" not in chat
    assert [t["function"]["name"] for t in chat["tools"]] == ["a", "b"]
    assert chat["messages"][1]["content"] == "calling "
    assert [c["id"] for c in chat["messages"][1]["tool_calls"]] == ["t1", "t2"]
    assert chat["messages"][2:] == [
        {"role": "tool", "tool_call_id": "t1", "content": "one"},
        {"role": "tool", "tool_call_id": "t2", "content": "Error"},
        {"role": "user", "content": "here:"},
    ]
    assert to_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"name": "a", "input_schema": {}}],
                    "tool_choice": {"type": "none"}})["tool_choice"] == "none"
    # Without tools a tool_choice is not sent (chat providers reject it).
    assert "tool_choice" not in to_chat({"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": {"type": "auto"}})


@pytest.mark.parametrize(("body", "param", "code"), [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0]", "unsupported_image_input"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": [{"type": "document"}]}]}]},
     "messages[0].content[0].content[0]", "unsupported_file_input"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools[0].type", "unsupported_tool"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role", "invalid_value"),
    ({"messages": []}, "messages", "missing_required_parameter"),
])
def test_bad_input_names_the_field(body, param, code):
    with pytest.raises(ApiError) as caught:
        to_chat({"model": "m", **body})
    assert (caught.value.status, caught.value.param, caught.value.code) == (400, param, code)


def test_reply_stop_reasons_usage_and_tool_input():
    def message(finish, **choice):
        completion = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": finish, **choice}],
                      "usage": {"prompt_tokens": 10, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 4}}}
        return to_message(completion, "msg_1", "public", ["STOP"])

    assert message("stop", stop_reason="STOP")["stop_reason"] == "stop_sequence"
    assert message("stop", stop_reason="STOP")["stop_sequence"] == "STOP"
    assert message("stop")["stop_reason"] == "end_turn"
    assert message("length")["stop_reason"] == "max_tokens"
    assert message("content_filter")["stop_reason"] == "refusal"
    assert message("stop")["usage"] == {"input_tokens": 6, "output_tokens": 3, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 4}
    called = to_message({"choices": [{"message": {"content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}, "finish_reason": "stop"}]}, "msg_2", "m", None)
    assert called["content"] == [{"type": "tool_use", "id": "c", "name": "f", "input": {}}]
    assert called["stop_reason"] == "tool_use" and called["usage"]["input_tokens"] == 0


def _chunk(delta=None, finish=None, **extra):
    return {"choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish}], **extra}


def test_stream_parallel_tool_calls_are_dense_blocks():
    translator = StreamTranslator("msg_1", "m", None, 42)
    events = [e.json() for e in translator.start()]
    assert events[0]["message"]["usage"]["input_tokens"] == 42
    for chunk in [_chunk({"tool_calls": [{"index": 0, "id": "a", "function": {"name": "f", "arguments": "{}"}}]}),
                  _chunk({"tool_calls": [{"index": 1, "id": "b", "function": {"name": "g", "arguments": ""}}]}),
                  _chunk({"tool_calls": [{"index": 1, "function": {"arguments": '{"k":1}'}}]}),
                  _chunk(finish="tool_calls"), {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}]:
        events += [e.json() for e in translator.chunk(chunk)]
    events += [e.json() for e in translator.finish()]
    assert [(e["type"], e.get("index")) for e in events] == [
        ("message_start", None),
        ("content_block_start", 0), ("content_block_delta", 0),
        ("content_block_stop", 0), ("content_block_start", 1), ("content_block_delta", 1),
        ("content_block_stop", 1), ("message_delta", None), ("message_stop", None),
    ]
    assert events[-2]["delta"] == {"stop_reason": "tool_use", "stop_sequence": None}
    assert events[-2]["usage"]["input_tokens"] == 5 and events[-2]["usage"]["output_tokens"] == 2


def test_stream_first_call_streams_live_and_a_call_named_late_waits_for_its_name():
    translator = StreamTranslator("msg_1", "m", None, 1)
    out = []
    for fragment in [{"index": 0, "id": "a", "function": {"arguments": '{"x"'}},  # no name yet: nothing to start
                     {"index": 0, "function": {"name": "f", "arguments": ": 1"}},
                     {"index": 0, "function": {"arguments": "}"}}]:
        out.append([e.json() for e in translator.chunk(_chunk({"tool_calls": [fragment]}))])
    assert out[0] == []
    assert [e["type"] for e in out[1]] == ["content_block_start", "content_block_delta"]
    assert out[1][0]["content_block"] == {"type": "tool_use", "id": "a", "name": "f", "input": {}}
    assert out[1][1]["delta"]["partial_json"] == '{"x": 1'  # what was kept, then the fragment
    assert out[2][0]["delta"]["partial_json"] == "}"  # live from then on
    list(translator.chunk(_chunk(finish="tool_calls")))
    assert [e.json()["type"] for e in translator.finish()] == ["content_block_stop", "message_delta", "message_stop"]


def test_stream_failures_raise_for_the_relay():
    translator = StreamTranslator("msg_1", "m", None, 1)
    list(translator.chunk(_chunk({"content": "partial"})))
    with pytest.raises(UpstreamError):
        list(translator.finish())  # neither finish_reason nor [DONE]: cut off
    with pytest.raises(UpstreamError, match="overloaded"):
        list(StreamTranslator("msg_2", "m", None, 1).chunk({"error": {"message": "overloaded"}}))
    event = errors.stream_event(UpstreamError("The upstream provider broke off the stream."))
    assert event == (b'event: error\ndata: {"type":"error","error":{"type":"api_error",'
                     b'"message":"The upstream provider broke off the stream."}}\n\n')
