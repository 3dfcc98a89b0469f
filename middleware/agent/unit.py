"""Agent mode: the gateway runs the operator's MCP tools for agent models (`models.<name>.agent`).

For a request to an agent model this unit offers the tools of the agent's
`tool_servers` (as function tools, next to any the client sent) and loops:
each provider call goes on down the pipeline (`next`), so metering holds and
settles every one of them under the request's id; while the model calls
*server* tools the unit runs them (a turn's calls concurrently), appends the
assistant tool-call message and one `tool` message per call, and calls the
provider again. A call of a *client* tool ends the loop and goes back to the
client as usual. At most ``max_iterations`` provider calls: the last one is
sent with ``tool_choice: "none"``. Tool failures (MCP errors, ``isError``
results, timeouts, an unreachable server, bad arguments) become the tool
message's content, ``"error: …"``, for the model to handle.

Streams: every provider call streams; text streams to the client as it comes,
server tool calls are shown only with ``show_tool_calls`` (off by default:
the SDKs accumulate any ``delta.tool_calls`` into the final message, and agent
frameworks then run it themselves), as one complete ``delta.tool_calls``
chunk each once the model has finished writing them,
usage (when the client asked for it) is summed into one final usage chunk,
and the stream ends with the final answer's ``finish_reason`` and one
``[DONE]``. Until the client has been sent something, a failure (a refused
credit hold: 402) is an HTTP error; after that it is an in-band error event.
For the Responses API the unit emits marker chunks instead of tool-call deltas,
which the responses unit turns into ``mcp_call`` items (middleware/responses/mcp.py);
on the Messages API it shows none (a `tool_use` block would ask the client to run it).
JSON replies carry only the final message (usage summed over the loop).

Requests to other models pass straight through (`await next(call)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Any

import structlog

from middleware.agent import translate
from middleware.agent.trace import AgentTrace, ToolRun
from middleware.metering.unit import MeteringUnit
from middleware.responses.mcp import MARKER
from proxy.core.call import DONE_EVENT, MESSAGES, RESPONSES, Call, Next, Reply, SSEEvent
from proxy.core.chat_deltas import ChoiceDelta, ToolCall, ToolCalls
from proxy.core.errors import ApiError, CreditsExhausted, UpstreamError, invalid_request
from proxy.core.ids import unique_id
from proxy.core.pipeline import Unit, UnitSettings
from proxy.core.streams import EventStream
from proxy.core.settings import AgentSettings, ConfigError

if TYPE_CHECKING:
    from middleware.agent.tool_servers import ToolServers
    from proxy.core.gateway import Gateway

log = structlog.get_logger("sovereign")

TOOL_HOLD_SECONDS = 600.0  # a priced tool call's hold outlives any tool timeout
# MCP's JSON-RPC codes, used for failures that never reached the tool.
CONNECTION_CLOSED = -32000
REQUEST_TIMEOUT = -32001
INVALID_PARAMS = -32602


class AgentUnit(Unit):
    """Runs the tool loop for agent models; a pass-through for every other model."""

    name = "agent"

    class Settings(UnitSettings):
        pass

    def __init__(self, settings: UnitSettings, gateway: Gateway) -> None:
        super().__init__(settings, gateway)
        models = gateway.settings.models
        self.agents: dict[str, AgentSettings] = {name: m.agent for name, m in models.items() if m.agent is not None}
        self.servers: ToolServers | None = None
        if gateway.settings.tool_servers:
            try:
                from middleware.agent.tool_servers import ToolServers
            except ImportError:
                raise ConfigError(
                    "invalid configuration:\n  tool_servers: agent mode needs the MCP SDK: pip install 'sovereign-gateway[agent]'"
                ) from None
            self.servers = ToolServers(gateway.settings.tool_servers)
        # The unit that holds and charges priced tool calls; found at start-up (it is built after this one).
        self.metering: MeteringUnit | None = None

    async def startup(self) -> None:
        unit = self.gateway.unit("metering")
        self.metering = unit if isinstance(unit, MeteringUnit) else None
        if self.servers is not None:
            self.servers.start()  # connects in the background: start-up never waits for a tool server

    async def shutdown(self) -> None:
        if self.servers is not None:
            await self.servers.close()

    def readiness(self) -> list[str]:
        if self.servers is None:
            return []
        return [f"tool_server_unreachable:{label}" for label in self.servers.unreachable()]

    async def __call__(self, call: Call, next: Next) -> Reply:
        if call.endpoint == RESPONSES:
            model = call.model
            agent = self.agents.get(model) if isinstance(model, str) else None
            if agent is None:
                _refuse_mcp_tools(call.body, None)
                return await next(call)
        elif not self.agents:
            return await next(call)
        else:
            model = call.model
            agent = self.agents.get(model) if isinstance(model, str) else None
            if agent is None:
                return await next(call)
        if call.ledger_kind == "title":
            return await next(call)  # a session title: plain text from the agent's model, no tools
        loop = AgentLoop(self, call, next, agent)
        return await (loop.stream() if call.stream else loop.json())

    # -- one tool call ------------------------------------------------------------
    async def execute(self, run: ToolRun, call: Call) -> str:
        """Run one server tool call; returns the tool message content and fills `run`."""
        assert self.servers is not None
        server = self.servers[run.server_label]
        started = time.monotonic()
        # Until the call is known to have ended otherwise: a cancellation (the
        # client left) anywhere below is neither an `ok` nor charged.
        outcome = "cancelled"
        hold_id = ""
        metering = self.metering
        price = server.settings.price_per_call if metering is not None else 0
        arguments = translate.parse_arguments(run.arguments)
        try:
            if arguments is None:
                outcome = "invalid_arguments"
                run.error = _protocol_error(INVALID_PARAMS, "the arguments are not a JSON object")
                return translate.result_text(run.error["message"], True, server.settings.max_result_bytes)
            if price:
                assert metering is not None
                # Named before the round trip, so a cancellation during it still releases the hold.
                hold_id = unique_id(f"{call.request_id}:tool:", 32)
                status = await metering.hold_extra(call, hold_id, price, TOOL_HOLD_SECONDS)
                if status != 1:
                    outcome, hold_id = "refused", ""  # nothing was held: nothing to release
                    reason = "the key's budget is used up" if status == -2 else "insufficient credits"
                    run.error = _protocol_error(CONNECTION_CLOSED, f"{reason} for this tool call")
                    return translate.result_text(run.error["message"], True, server.settings.max_result_bytes)
            from mcp.shared.exceptions import MCPError

            from middleware.agent.tool_servers import ToolUnavailable

            try:
                result = await server.call(run.name, arguments)
            except ToolUnavailable as exc:
                outcome = "unreachable"
                run.error = _protocol_error(CONNECTION_CLOSED, f"tool server `{run.server_label}` is unreachable ({exc})")
            except TimeoutError:
                outcome = "timeout"
                run.error = _protocol_error(REQUEST_TIMEOUT, f"the tool did not answer within {server.settings.timeout_seconds:g} seconds")
            except MCPError as exc:
                outcome = "error"
                run.error = _protocol_error(exc.error.code, exc.error.message)
            else:
                text = translate.content_text(result.content, result.structured_content)
                content = translate.result_text(text, result.is_error, server.settings.max_result_bytes)
                if result.is_error:
                    outcome = "error"
                    run.error = {"type": "mcp_tool_execution_error", "content": [{"type": "text", "text": content}]}
                else:
                    run.output = content
                    outcome = "ok"
                return content
            return translate.result_text(run.error["message"], True, server.settings.max_result_bytes)
        except Exception:
            outcome = "internal_error"  # the gateway's failure, not the tool's: not charged
            raise
        finally:
            duration = time.monotonic() - started
            metrics = self.gateway.metrics
            metrics.child(metrics.tool_calls, run.server_label, run.name, outcome).inc()
            metrics.child(metrics.tool_call_duration, run.server_label).observe(duration)
            # Never the arguments or the result: they may hold the tenant's data.
            log.info(
                "tool_call", request_id=call.request_id, server=run.server_label, tool=run.name,
                duration_ms=round(duration * 1000, 3), outcome=outcome,
            )
            if hold_id and metering is not None:
                charged = outcome in ("ok", "error", "timeout")  # the server did the work
                cost = run.credits = price if charged else 0  # 0: the hold is released
                self.gateway.spawn(metering.settle_extra(call, hold_id, cost, _tool_entry(call, run, cost)), "agent.tool_charge")


def _tool_entry(call: Call, run: ToolRun, cost: int) -> dict[str, Any]:
    """The ledger entry of a priced tool call (without its id)."""
    return {
        "type": "charge", "request_id": call.request_id, "key_id": call.principal.key_id,
        "model": call.model, "input_tokens": 0, "output_tokens": 0, "credits": -cost,
        "usage_source": "tool_call", "kind": "tool_call", "tool": f"{run.server_label}/{run.name}",
        "created_at": int(time.time()),
    }


def _protocol_error(code: int, message: str) -> dict[str, Any]:
    return {"type": "mcp_protocol_error", "code": code, "message": message}


def _refuse_mcp_tools(body: dict[str, Any], allowed: list[str] | None) -> list[tuple[str, Any]]:
    """Check client `mcp` tools (Responses API): (server_label, allowed_tools) of each.

    An `mcp` tool is accepted only for an agent model and only when its
    `server_label` names one of that agent's tool servers; its `server_url`
    is never contacted.
    """
    selected = []
    tools = body.get("tools")
    for index, tool in enumerate(tools if isinstance(tools, list) else ()):
        if not (isinstance(tool, dict) and tool.get("type") == "mcp"):
            continue
        label = tool.get("server_label")
        if allowed is None:
            raise ApiError(400, "`mcp` tools are only available with agent models.", code="unsupported_tool",
                           param=f"tools[{index}].type")
        if not isinstance(label, str) or label not in allowed:
            raise ApiError(400, f"`{str(label)[:64]}` is not a tool server of this model; use one of: {', '.join(allowed)}.",
                           code="unknown_tool_server", param=f"tools[{index}].server_label")
        if tool.get("require_approval") == "always":
            raise ApiError(400, "Tool approvals are not supported; this gateway runs its configured tool servers without them.",
                           code="unsupported_value", param=f"tools[{index}].require_approval")
        selected.append((label, tool.get("allowed_tools")))
    return selected


def _allowed_names(allowed_tools: Any) -> set[str] | None:
    if isinstance(allowed_tools, list):
        return {name for name in allowed_tools if isinstance(name, str)}
    if isinstance(allowed_tools, dict) and isinstance(allowed_tools.get("tool_names"), list):
        return {name for name in allowed_tools["tool_names"] if isinstance(name, str)}
    return None


class _TurnCalls(ToolCalls):
    """One provider call's streamed tool calls, each a server call or a client call (and its index for the client)."""

    __slots__ = ("client_index",)

    def __init__(self) -> None:
        super().__init__()
        self.client_index: dict[Any, int | None] = {}  # provider index → index in the client's stream; None: a server call

    def server_calls(self) -> list[ToolCall]:
        return [self.calls[index] for index, shown in self.client_index.items() if shown is None]

    def clients(self) -> int:
        return sum(1 for shown in self.client_index.values() if shown is not None)


class AgentLoop:
    """The tool loop of one request."""

    def __init__(self, unit: AgentUnit, call: Call, next: Next, agent: AgentSettings) -> None:
        self.unit = unit
        self.call = call
        self.next = next
        self.agent = agent
        self.trace = call.agent = AgentTrace(agent.keep_tool_messages)
        self.responses = call.endpoint == RESPONSES
        # Chat clients may see the server's calls as `delta.tool_calls`; an Anthropic
        # client would take such a chunk (a `tool_use` block) as its own tool to run.
        self.show_tool_calls = agent.show_tool_calls and call.route != MESSAGES
        body = call.body
        n = body.get("n")
        if n is not None and n != 1:
            raise invalid_request("Agent models produce one choice; `n` must be 1.", param="n")
        tools = body.get("tools")
        tools = tools if isinstance(tools, list) else []
        selection = _refuse_mcp_tools(body, agent.tool_servers)
        self.client_tools = [t for t in tools if not (isinstance(t, dict) and t.get("type") == "mcp")]
        # Client mcp tools pick (and may narrow) the agent's servers; without any, all of them.
        chosen: dict[str, set[str] | None] = {}
        if selection:
            for label, allowed_tools in selection:
                chosen[label] = _allowed_names(allowed_tools)
        else:
            chosen = dict.fromkeys(agent.tool_servers)
        servers = unit.servers
        assert servers is not None
        by_server = {
            label: [name for name in servers[label].tools if only is None or name in only] for label, only in chosen.items()
        }
        self.catalog = translate.exposed_names(by_server, translate.client_tool_names(self.client_tools))
        self.tools = list(self.client_tools)
        for exposed, (label, name) in self.catalog.items():
            tool = servers[label].tools[name]
            self.tools.append(translate.function_tool(exposed, tool.description, tool.input_schema))
        self.messages: list[dict[str, Any]] = list(body.get("messages") or [])
        self.iteration = 0
        self.usage: dict[str, Any] | None = None
        options = body.get("stream_options")
        self.client_usage = isinstance(options, dict) and options.get("include_usage") is True
        self.shown = 0  # tool-call indexes used in the client's stream
        self.sent = False  # something reached the client's stream
        self.error_reply: Reply | None = None
        self.failed = False  # a provider call of the stream ended in an error event
        self.headers: dict[str, str] = {}
        self.template: dict[str, Any] | None = None  # id/object/created/model of the client's chunks
        self.content: str | None = None  # text of the current provider call (for its assistant message)
        self.inner: list[Call] = []  # the provider calls made, as metering settled them

    def _account(self) -> None:
        """The whole loop's tokens and credits on the request, for its access log line and metrics.

        Each provider call was metered on its own call (settled by now: a JSON
        reply at once, a stream when it closed); the tool calls add their prices.
        """
        call = self.call
        if call.usage is None:  # (the client's stream carries no usage unless asked: metering's still counted)
            usage = None
            for inner in self.inner:
                usage = translate.add_usage(usage, inner.usage)
            call.usage = usage
        charged = [inner for inner in self.inner if inner.credits is not None]
        if charged or any(run.credits for run in self.trace.runs):
            call.credits = sum(inner.credits or 0 for inner in charged) + sum(run.credits for run in self.trace.runs)
            sources = {inner.usage_source for inner in charged}
            call.usage_source = "estimated" if "estimated" in sources else "reported"

    # -- provider calls ------------------------------------------------------------
    def _provider_call(self, last: bool) -> Call:
        self.iteration += 1
        body = {k: v for k, v in self.call.body.items() if k not in ("messages", "tools", "tool_choice", "parallel_tool_calls")}
        body["messages"] = list(self.messages)
        if self.tools:
            body["tools"] = self.tools
            if last:
                body["tool_choice"] = "none"  # the last permitted call must answer in text
            elif self.iteration == 1 and self.call.body.get("tool_choice") is not None:
                body["tool_choice"] = self.call.body["tool_choice"]  # the client's choice binds its first turn only
            if self.call.body.get("parallel_tool_calls") is not None:
                body["parallel_tool_calls"] = self.call.body["parallel_tool_calls"]
        call = self.call
        inner = Call(call.endpoint, body, None, call.headers, call.request_id, call.started_at)
        inner.principal = call.principal
        inner.state = call.state
        inner.ledger_kind, inner.session_id = call.ledger_kind, call.session_id
        return inner

    async def _send(self, last: bool) -> Reply:
        inner = self._provider_call(last)
        try:
            reply = await self.next(inner)
        except CreditsExhausted as exc:
            if self.iteration > 1:
                # The client sees only this refusal: say that the steps before it were served, and charged.
                exc.message += (f" The agent loop stopped before its provider call {self.iteration}; the calls"
                                " and tool calls before it were served and are charged (see GET /v1/credits).")
            raise

        self.call.upstream, self.call.upstream_latency = inner.upstream, inner.upstream_latency
        self.inner.append(inner)
        return reply

    def _runs(self, calls: list[tuple[str, str, str]]) -> list[ToolRun]:
        return [ToolRun(call_id, *self.catalog[exposed], arguments) for call_id, exposed, arguments in calls]

    async def _run_tools(self, calls: list[tuple[str, str, str]], runs: list[ToolRun], content: Any) -> None:
        """Run one turn's server tool calls concurrently; append the assistant and tool messages."""
        results = await asyncio.gather(*(self.unit.execute(run, self.call) for run in runs))
        assistant = translate.assistant_message(content, [translate.tool_call(i, n, a) for i, n, a in calls])
        appended = [assistant, *(translate.tool_message(run.call_id, text) for run, text in zip(runs, results, strict=True))]
        self.messages.extend(appended)
        self.trace.messages.extend(appended)
        self.trace.runs.extend(runs)

    # -- JSON ------------------------------------------------------------------------
    async def json(self) -> Reply:
        for index in range(self.agent.max_iterations):
            last = index == self.agent.max_iterations - 1
            reply = await self._send(last)
            completion = reply.json() if reply.status == 200 and reply.events is None else None
            if not isinstance(completion, dict) or not isinstance(completion.get("choices"), list) or not completion["choices"]:
                return reply  # a provider error (or something unexpected): the client gets it as is
            self.usage = translate.add_usage(self.usage, completion.get("usage"))
            choice = completion["choices"][0]
            message = choice.get("message") if isinstance(choice, dict) else None
            calls = message.get("tool_calls") if isinstance(message, dict) else None
            calls = calls if isinstance(calls, list) else []
            server = [c for c in calls if _name_of(c) in self.catalog]
            if server and len(server) == len(calls) and not last:
                calls_ = [(_id_of(c), _name_of(c), _arguments_of(c)) for c in server]
                await self._run_tools(calls_, self._runs(calls_), message.get("content") if isinstance(message, dict) else None)
                continue
            if server:  # mixed with client tools, or the provider ignored tool_choice "none": not run
                _drop_calls(choice, "message", {id(c) for c in server})
            if self.usage is not None:
                completion["usage"] = self.call.usage = self.usage  # the access log shows the loop's tokens
            self._account()
            reply.set_json(completion)
            return reply
        raise AssertionError("unreachable: the last iteration always returns")

    # -- streams ---------------------------------------------------------------------
    async def stream(self) -> Reply:
        events = self._events()
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        except BaseException:
            await events.aclose()
            raise
        if self.error_reply is not None:
            await events.aclose()
            return self.error_reply
        # The loop has started: closing the reply, even before its first event, must reach it.
        return Reply(status=200, headers=self.headers, events=EventStream(events, transform=lambda rest: _prepend(first, rest)))

    async def _events(self) -> AsyncGenerator[SSEEvent, None]:
        for index in range(self.agent.max_iterations):
            last = index == self.agent.max_iterations - 1
            reply = await self._send(last)
            if reply.events is None:
                if not self.sent:
                    self.error_reply = reply
                    return
                raise _error_of(reply)
            if index == 0:
                self.headers = reply.headers
            slots = _TurnCalls()
            self.content = None
            async with contextlib.aclosing(reply.events) as events:  # type: ignore[type-var]
                async for event in events:
                    out = self._relay(event, slots, last)
                    if out is not None:
                        self.sent = True
                        yield out
                    if self.failed:
                        break
            if self.failed:
                # The provider's error event has gone out: the stream ends as a plain
                # model's would, without running this broken turn's calls or a [DONE].
                return
            server = slots.server_calls()
            if not server or len(server) < len(slots) or last:
                break
            calls = [(s.id or unique_id("call_"), "".join(s.name), "".join(s.arguments)) for s in server]
            runs = self._runs(calls)
            self.sent = True  # the client has seen output (this turn's text or, next, its tool calls)
            if self.responses:
                for run in runs:
                    yield SSEEvent.from_json({"choices": [], MARKER: {"phase": "started", "run": run}})
            elif self.show_tool_calls:
                for call_id, name, arguments in calls:
                    yield SSEEvent.from_json(translate.tool_call_chunk(self._template(), self.shown, call_id, name, arguments))
                    self.shown += 1
            await self._run_tools(calls, runs, self.content)
            if self.responses:
                for run in runs:
                    yield SSEEvent.from_json({"choices": [], MARKER: {"phase": "finished", "run": run}})
        self.call.usage = self.usage
        self._account()
        if self.client_usage and self.usage is not None:
            yield SSEEvent.from_json(translate.usage_chunk(self._template(), self.usage))
        yield SSEEvent(DONE_EVENT)


    def _template(self) -> dict[str, Any]:
        return self.template or {"id": unique_id("chatcmpl-"), "object": "chat.completion.chunk",
                                 "created": int(time.time()), "model": self.call.model}

    def _relay(self, event: SSEEvent, slots: _TurnCalls, last: bool) -> SSEEvent | None:
        """One provider event as the client's stream shows it; None to drop it."""
        if event.is_done:
            return None  # one [DONE], at the very end
        chunk = event.json()
        if type(chunk) is not dict:
            return event  # comments
        if self.template is None:
            self.template = {k: chunk[k] for k in ("id", "object", "created", "model") if k in chunk}
        changed = False
        usage = chunk.get("usage")
        if usage:
            self.usage = translate.add_usage(self.usage, usage)
        choices = chunk.get("choices")
        if not choices:
            if "error" in chunk:
                self.failed = True  # the provider's in-band error (vLLM and others): relayed, and the loop ends
                return event
            return None if usage or "usage" in chunk else event  # usage goes out once, summed, at the end
        if "usage" in chunk:
            chunk = {k: v for k, v in chunk.items() if k != "usage"}
            changed = True
        kept = []
        for choice in choices:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                kept.append(choice)
                continue
            new = self._choice(choice, slots, last)
            changed = changed or new is not choice
            if new is not None:
                kept.append(new)
        if self.template.get("id") is not None and chunk.get("id") != self.template["id"]:
            chunk = {**chunk, "id": self.template["id"]}  # one id for the whole answer
            changed = True
        if not changed:
            return event
        if not kept:
            return None
        return SSEEvent.from_json({**chunk, "choices": kept})

    def _choice(self, choice: dict[str, Any], slots: _TurnCalls, last: bool) -> dict[str, Any] | None:
        delta = choice.get("delta")
        if self.iteration > 1 and isinstance(delta, dict) and "role" in delta:
            # One answer, one role: the SDKs concatenate every `role` delta they get ("assistantassistant").
            delta = {k: v for k, v in delta.items() if k != "role"}
            choice = {**choice, "delta": delta}
        part = ChoiceDelta(choice)
        fragments = delta.get("tool_calls") if isinstance(delta, dict) else None
        finish = part.finish_reason
        if not fragments and finish != "tool_calls":
            if part.content is not None:
                self.content = (self.content or "") + part.content
            return choice
        new = dict(choice)
        if fragments:
            forwarded = []
            for fragment in part.tool_calls:
                index = fragment.get("index", 0)
                if index not in slots:
                    # A call's first fragment names its tool: a server call runs here, a
                    # client call goes on to the client under the next index of its stream.
                    function = fragment.get("function")
                    name = function.get("name") if isinstance(function, dict) else None
                    slots.client_index[index] = None if name in self.catalog else self.shown + slots.clients()
                slots.add(fragment)
                client_index = slots.client_index[index]
                if client_index is not None:
                    forwarded.append({**fragment, "index": client_index})
            assert isinstance(delta, dict)
            new_delta = {k: v for k, v in delta.items() if k != "tool_calls"}
            if forwarded:
                new_delta["tool_calls"] = forwarded
            new["delta"] = new_delta
            if part.content is not None:
                self.content = (self.content or "") + part.content
        if finish == "tool_calls" and not slots.clients():
            # Only server calls: the loop goes on (or, on the last call, the answer ends here).
            new["finish_reason"] = "stop" if last else None
        if new.get("finish_reason") is None and not new.get("delta") and not new.get("logprobs"):
            return None
        return new


async def _prepend(first: SSEEvent | None, rest: AsyncIterator[SSEEvent]) -> AsyncIterator[SSEEvent]:
    """The loop's events with the first one, already read, in front (the EventStream around it closes `rest`)."""
    if first is not None:
        yield first
    async for event in rest:
        yield event


def _error_of(reply: Reply) -> ApiError:
    """A provider's error reply in the middle of the loop, as the in-band error of the stream."""
    body = reply.json()
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return ApiError(reply.status, error["message"], type=str(error.get("type") or "server_error"),
                        code=error.get("code") if isinstance(error.get("code"), str) else None)
    return UpstreamError(f"The upstream provider answered HTTP {reply.status}.")


def _name_of(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    return function.get("name") if isinstance(function, dict) else None


def _arguments_of(call: Any) -> str:
    function = call.get("function") if isinstance(call, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    return arguments if isinstance(arguments, str) else ""


def _id_of(call: Any) -> str:
    ident = call.get("id") if isinstance(call, dict) else None
    return ident if isinstance(ident, str) and ident else unique_id("call_")


def _drop_calls(choice: dict[str, Any], part: str, drop: set[int]) -> None:
    """Remove the server tool calls that were not run from a final message."""
    message = choice[part]
    kept = [c for c in message.get("tool_calls") or [] if id(c) not in drop]
    if kept:
        message["tool_calls"] = kept
        return
    message.pop("tool_calls", None)
    if choice.get("finish_reason") == "tool_calls":
        choice["finish_reason"] = "stop"


__all__ = ["AgentUnit"]
