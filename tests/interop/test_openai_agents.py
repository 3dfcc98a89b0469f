"""The OpenAI Agents SDK (`openai-agents`) through Sovereign: function-tool agents end to end.

Each loop runs against a real `sovereign serve` in front of the simulated
reasoning provider, with both of the SDK's model classes (Responses and Chat
Completions) and both runners (`Runner.run`, `Runner.run_streamed`). A loop
passes when it ends with a text answer built from the tool's result, with the
tool executed exactly once per call the model made.
"""

from __future__ import annotations

import asyncio
import sys
from collections import Counter

import openai
import pytest
from agents import (
    Agent,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)

from tests.interop.conftest import MODEL
from tests.support import REPO

set_tracing_disabled(True)  # the SDK would otherwise export traces to OpenAI

MODELS = {"responses": OpenAIResponsesModel, "chat_completions": OpenAIChatCompletionsModel}


def weather_agent(interop, model_class, calls: Counter, parallel: bool = False) -> Agent:
    """An agent with a weather tool (and a clock when `parallel`); `calls` counts executions."""

    @function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        calls["get_weather"] += 1
        return f"sunny in {city}"

    @function_tool
    def get_time(city: str) -> str:
        """The local time in a city."""
        calls["get_time"] += 1
        return f"noon in {city}"

    client = openai.AsyncOpenAI(base_url=interop.v1, api_key=interop.key, max_retries=0)
    return Agent(
        name="weather",
        instructions="Answer with the tools' results.",
        tools=[get_weather, get_time] if parallel else [get_weather],
        model=model_class(model=MODEL, openai_client=client),
        model_settings=ModelSettings(parallel_tool_calls=parallel or None),
    )


def tool_outputs(result) -> list[str]:
    return [item.output for item in result.new_items if item.type == "tool_call_output_item"]


@pytest.mark.parametrize("api", MODELS)
async def test_run_reaches_a_text_answer(interop, api):
    calls: Counter = Counter()
    result = await Runner.run(weather_agent(interop, MODELS[api], calls), "What is the weather in Paris?", max_turns=4)
    assert calls == {"get_weather": 1}
    assert tool_outputs(result) == ["sunny in value"]
    assert result.final_output == "Done: get_weather returned sunny in value "
    # Two provider turns: the tool call, then the answer.
    assert len(result.raw_responses) == 2


@pytest.mark.parametrize("api", MODELS)
async def test_run_streamed_reaches_a_text_answer(interop, api):
    calls: Counter = Counter()
    result = Runner.run_streamed(weather_agent(interop, MODELS[api], calls), "Weather in Paris?", max_turns=4)
    kinds = Counter()
    text = []
    async for event in result.stream_events():
        kinds[event.type] += 1
        if event.type == "raw_response_event" and event.data.type == "response.output_text.delta":
            text.append(event.data.delta)
        if event.type == "run_item_stream_event":
            kinds[event.name] += 1
    assert calls == {"get_weather": 1}
    assert result.final_output == "".join(text) == "Done: get_weather returned sunny in value "
    assert kinds["tool_called"] == kinds["tool_output"] == 1 and kinds["reasoning_item_created"] == 2


@pytest.mark.parametrize("api", MODELS)
async def test_parallel_tool_calls_each_run_once(interop, api):
    calls: Counter = Counter()
    result = await Runner.run(weather_agent(interop, MODELS[api], calls, parallel=True), "Weather and time?",
                              max_turns=4)
    assert calls == {"get_weather": 1, "get_time": 1}
    assert sorted(tool_outputs(result)) == ["noon in value", "sunny in value"]
    assert result.final_output == "Done: get_weather returned sunny in value; get_time returned noon in value "


async def test_readme_agents_example_runs_as_printed(interop, tmp_path):
    """The README's Agent frameworks snippet, pasted as is (only the demo's URL and key swapped)."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("#### Agent frameworks"):]
    snippet = section[section.index("```python\n") + len("```python\n"):section.index("\n```\n")]
    assert "http://127.0.0.1:8080/v1" in snippet and "sk-sov-live-..." in snippet
    script = tmp_path / "agent.py"
    script.write_text(snippet.replace("http://127.0.0.1:8080/v1", interop.v1).replace("sk-sov-live-...", interop.key))
    proc = await asyncio.create_subprocess_exec(sys.executable, str(script), stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, output.decode()
    printed = snippet.rsplit("# ", 1)[1].strip()  # the output the README promises
    assert output.decode().strip() == printed
