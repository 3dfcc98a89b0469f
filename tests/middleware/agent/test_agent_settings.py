"""Agent settings: references checked with field paths, env overrides, pricing and routing of agent models;
and the pure MCP ↔ chat translators."""

from __future__ import annotations

import pytest

from middleware.agent import translate
from middleware.agent.trace import AgentTrace, ToolRun
from middleware.metering.pricing import pricing_table
from proxy.core.settings import ConfigError, load_settings

BASE = {
    "upstreams": {"default": {"url": "http://127.0.0.1:9/v1", "model": "provider-model"}},
    "models": {"sovereign-alpha": {"price": {"input_per_million": 500, "output_per_million": 1500}}},
    "tool_servers": {"search": {"url": "http://127.0.0.1:9/mcp"}},
}


def load(extra: dict, env: dict | None = None):
    from proxy.core.settings import deep_merge

    return load_settings(path=None, env=env or {"SOVEREIGN_CONFIG": "/dev/null"}, overrides=deep_merge(BASE, extra))


def agent(**fields):
    return {"models": {"sorat-agent": {"agent": {"model": "sovereign-alpha", "tool_servers": ["search"], **fields}}}}


def test_an_agent_is_routed_and_priced_as_its_model_unless_it_has_a_price():
    settings = load(agent())
    assert settings.resolve_model("sorat-agent")[0] == "sovereign-alpha"
    table = pricing_table(settings)
    assert table["sorat-agent"] == table["sovereign-alpha"]
    priced = load({"models": {"sorat-agent": {"price": {"input_per_million": 1, "output_per_million": 2}, **agent()["models"]["sorat-agent"]}}})
    assert pricing_table(priced)["sorat-agent"].input == 1
    agent_settings = settings.models["sorat-agent"].agent
    assert (agent_settings.max_iterations, agent_settings.show_tool_calls, agent_settings.keep_tool_messages) == (30, False, False)
    server = settings.tool_servers["search"]
    assert (server.timeout_seconds, server.max_result_bytes, server.price_per_call) == (30.0, 65536, 0)


@pytest.mark.parametrize(
    "extra, message",
    [
        (agent(tool_servers=["nope"]), "models.sorat-agent.agent.tool_servers[0]: no tool server labelled `nope`"),
        ({"models": {"sorat-agent": {"agent": {"model": "ghost", "tool_servers": ["search"]}}}}, "models.sorat-agent.agent.model"),
        ({"tool_servers": {"both": {"url": "http://x/mcp", "command": ["srv"]}}}, "tool_servers.both"),
        ({"tool_servers": {"neither": {}}}, "tool_servers.neither"),
        ({"tool_servers": {"search": {"url": "ftp://x"}}}, "tool_servers.search.url"),
        (agent(max_iterations=0), "models.sorat-agent.agent.max_iterations"),
    ],
)
def test_bad_agent_settings_name_the_field(extra, message):
    with pytest.raises(ConfigError) as error:
        load(extra)
    assert message in str(error.value)


def test_an_agent_cannot_reason_with_another_agent():
    extra = agent()
    extra["models"]["meta-agent"] = {"agent": {"model": "sorat-agent", "tool_servers": ["search"]}}
    with pytest.raises(ConfigError, match="models.meta-agent.agent.model"):
        load(extra)


def test_tool_servers_come_from_the_environment_and_headers_are_masked():
    env = {
        "SOVEREIGN_CONFIG": "/dev/null",
        "SOVEREIGN_TOOL_SERVERS__FILES__COMMAND": "[fs-mcp, --root, /srv]",
        # A flow map keeps the variables' case (a path segment would be lowercased).
        "SOVEREIGN_TOOL_SERVERS__FILES__ENV": "{FS_MODE: ro}",
        "SOVEREIGN_TOOL_SERVERS__SEARCH__HEADERS__AUTHORIZATION": "Bearer secret-token",
        "SOVEREIGN_TOOL_SERVERS__SEARCH__TIMEOUT_SECONDS": "5",
    }
    settings = load({}, env)
    assert settings.tool_servers["files"].command == ["fs-mcp", "--root", "/srv"]
    assert settings.tool_servers["files"].env["FS_MODE"].get_secret_value() == "ro"
    assert settings.tool_servers["search"].timeout_seconds == 5
    masked = settings.masked()["tool_servers"]["search"]["headers"]
    assert masked == {"authorization": "********"}


def test_exposed_names_prefix_only_shared_names():
    names = translate.exposed_names({"a": ["search", "read"], "b": ["search", "write"]}, taken={"write"})
    assert names == {"a__search": ("a", "search"), "read": ("a", "read"), "b__search": ("b", "search"), "b__write": ("b", "write")}
    # A client tool with the prefixed name too: the server's gets a suffix (two functions of one name are refused).
    assert translate.exposed_names({"tools": ["weather"]}, taken={"weather", "tools__weather"}) == {
        "tools__weather_2": ("tools", "weather")}


def test_results_are_cut_on_a_character_boundary():
    text = "é" * 100  # two bytes each
    cut = translate.result_text(text, False, 51)
    assert cut.startswith("é" * 25) and not cut.startswith("é" * 26) and "truncated" in cut
    assert translate.result_text("boom", True, 100) == "error: boom"


def test_usage_of_several_calls_is_summed():
    total = translate.add_usage(None, {"prompt_tokens": 3, "completion_tokens": 1, "prompt_tokens_details": {"cached_tokens": 1}})
    total = translate.add_usage(total, {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 2}})
    assert total == {"prompt_tokens": 8, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 3}}


def test_session_turn_drops_the_server_calls_unless_kept():
    trace = AgentTrace(runs=[ToolRun("c1", "search", "find", "{}")], messages=[{"role": "assistant", "tool_calls": []}, {"role": "tool"}])
    final = {"role": "assistant", "content": "done", "tool_calls": [{"id": "c1"}]}
    assert trace.session_turn(final) == [{"role": "assistant", "content": "done"}]
    trace.keep_tool_messages = True
    assert len(trace.session_turn(final)) == 3
