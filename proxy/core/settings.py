"""The whole configuration as one pydantic model tree, loaded from YAML and env.

Where settings come from, later wins:
1. the model defaults below (identical to the shipped ``config/sovereign.yaml``);
2. a YAML file: ``--config PATH``, else ``$SOVEREIGN_CONFIG``, else the shipped one;
3. environment variables: the short names in `ENV_ALIASES`, and for any setting
   ``SOVEREIGN_<SECTION>__<FIELD>[__<FIELD>…]`` (values parsed as YAML scalars).

So the gateway runs from env alone. Invalid settings raise `ConfigError`
naming the field path (``models.sovereign-alpha.price.input_per_million``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from proxy.core.params import field_path

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config" / "sovereign.yaml"
ENV_PREFIX = "SOVEREIGN_"

# Short env names for the settings every deployment touches.
ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "SOVEREIGN_HOST": ("server", "host"),
    "SOVEREIGN_PORT": ("server", "port"),
    "SOVEREIGN_LOG_LEVEL": ("logging", "level"),
    "SOVEREIGN_STORE_URL": ("store", "url"),
    "SOVEREIGN_ADMIN_TOKEN": ("admin", "token"),
    "SOVEREIGN_UPSTREAM_URL": ("upstreams", "default", "url"),
    "SOVEREIGN_UPSTREAM_API_KEY": ("upstreams", "default", "api_key"),
    "SOVEREIGN_UPSTREAM_MODEL": ("upstreams", "default", "model"),
}
# Env names that are not settings and must not be read as overrides.
_NOT_SETTINGS = {"SOVEREIGN_CONFIG", "SOVEREIGN_TEST_REDIS_URL"}


class ConfigError(Exception):
    """The configuration is invalid; the message names each bad field path."""


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value


# A URL setting that must be http(s) (webhooks, MCP servers).
HttpURL = Annotated[str, AfterValidator(_http_url)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerSettings(Section):
    host: str = Field("0.0.0.0", description="Address the client API listens on.")
    port: int = Field(8080, ge=0, le=65535, description="Port of the client API.")
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest accepted request body; larger bodies get 413 before being read whole."
    )
    client_read_timeout: float = Field(
        30.0, gt=0, description="Seconds a client may take to send its request body (slow-client guard)."
    )
    keepalive_timeout: float = Field(75.0, gt=0, description="Idle keep-alive connection timeout in seconds.")
    drain_seconds: float = Field(
        25.0, ge=0, description="On SIGTERM, how long open streams may take to finish before the process exits."
    )
    sse_keepalive_seconds: float | None = Field(
        None, gt=0, description="If set, send an SSE comment line after this many idle seconds before a stream's first event (keeps load balancers from cutting slow reasoning streams)."
    )
    workers: int = Field(
        1,
        ge=1,
        description="Processes serving the client port together (SO_REUSEPORT), each on its own core; `auto` = the CPUs this process may use. More than one needs a shared store (redis://). `sovereign serve --workers N` sets it too.",
    )

    @field_validator("workers", mode="before")
    @classmethod
    def _resolve_workers(cls, value: Any) -> Any:
        # `auto` becomes a number at load time, so every reader sees an int.
        return available_cpus() if isinstance(value, str) and value.strip().lower() == "auto" else value


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class LoggingSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    access_log: bool = Field(True, description="Write one structured JSON line per request.")

    @field_validator("level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class TLSSettings(Section):
    ca_file: str | None = Field(None, description="PEM bundle of the CAs that sign the server's certificate (a private CA); default: the system's trust store.")
    cert_file: str | None = Field(None, description="PEM client certificate for mutual TLS (may hold the key too).")
    key_file: str | None = Field(None, description="PEM private key of `cert_file` (when the certificate file does not hold it).")
    verify: bool = Field(True, description="Verify the server's certificate and name; `false` logs a warning at start-up (testing only).")

    @model_validator(mode="after")
    def _key_needs_cert(self) -> TLSSettings:
        if self.key_file and not self.cert_file:
            raise ValueError("key_file needs cert_file")
        return self

    @property
    def configured(self) -> bool:
        return bool(self.ca_file or self.cert_file or not self.verify)


class UpstreamTLSSettings(TLSSettings):
    server_name: str | None = Field(None, description="Name sent as SNI and verified in the provider's certificate (default: the URL's host).")

    @property
    def configured(self) -> bool:
        return super().configured or bool(self.server_name)


class StoreSettings(Section):
    url: str = Field(
        "memory://",
        description="`redis://…`, `rediss://…` (add `?cluster=true` for Redis Cluster) or `memory://` (embedded, one process, lost at exit).",
    )
    prefix: str = Field("sov", min_length=1, description="Prefix of every Redis key the gateway writes.")
    timeout: float = Field(1.0, gt=0, description="Seconds before a Redis command counts as failed (503 store_unavailable).")
    max_connections: int = Field(
        256, ge=1, description="Redis connection pool size; request-path commands beyond it wait for a free connection."
    )
    spool_dir: str | None = Field(
        None,
        description="Directory for settlements Redis could not take (at shutdown, or past the memory bound), replayed at start-up and when Redis answers again; mount a volume that outlives the process. Unset: none are spooled (a warning at start with a durable store).",
    )
    tls: TLSSettings = Field(default_factory=TLSSettings, description="TLS of a `rediss://` store, used alike by both Redis clients.")

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "memory://", "unix://")):
            raise ValueError("must start with redis://, rediss://, unix:// or memory://")
        return value


class AdminSettings(Section):
    token: SecretStr | None = Field(None, description="Bearer token of the admin API; the admin API is off when unset.")
    port: int | None = Field(None, ge=0, le=65535, description="Serve the admin API on this port instead of under /admin on the client port.")
    host: str = Field("127.0.0.1", description="Address of the separate admin listener (when `admin.port` is set).")


class UsageSettings(Section):
    retention_days: int = Field(90, ge=1, description="Days the hourly usage buckets are kept.")
    daily_retention_days: int = Field(730, ge=1, description="Days the daily usage buckets are kept (queries beyond `retention_days` are answered by day).")


class LedgerSettings(Section):
    retention_days: float | None = Field(
        None, gt=0, description="Fold ledger entries older than this many days into one opening-balance entry (unset: keep every entry)."
    )
    fold_interval_seconds: float = Field(3600.0, gt=0, description="How often one replica folds old ledger entries (when `retention_days` is set).")


class WebhookSettings(Section):
    url: HttpURL | None = Field(None, description="Where events (`tenant.balance_low`, `key.budget_exhausted`, `tenant.credits_added`) are POSTed (http or https); unset: no events are recorded.")
    secret: SecretStr | None = Field(None, description="Key of the `Sovereign-Signature` HMAC-SHA256 over `<t>.<body>`; required with `url`.")
    timeout_seconds: float = Field(10.0, gt=0, description="Seconds one delivery attempt may take.")
    retry_seconds: float = Field(1.0, gt=0, description="First pause after a failed delivery; doubles per failure up to `max_retry_seconds`.")
    max_retry_seconds: float = Field(300.0, gt=0, description="Longest pause between delivery attempts.")
    max_age_seconds: float = Field(86400.0, gt=0, description="An event still undelivered after this long is dropped (logged as an error).")
    poll_seconds: float = Field(1.0, gt=0, description="How often the delivering replica looks for new events.")
    lease_seconds: float = Field(15.0, gt=0, description="Lease that makes one replica at a time the deliverer; another takes over when it lapses.")

    @model_validator(mode="after")
    def _signed(self) -> WebhookSettings:
        # Unsigned (an empty key) anyone could forge an event the receiver trusts.
        if self.url is not None and (self.secret is None or not self.secret.get_secret_value()):
            raise ValueError("webhooks.secret is required with webhooks.url: receivers check the Sovereign-Signature with it")
        return self


class MetricsSettings(Section):
    enabled: bool = Field(True, description="Serve Prometheus metrics at /metrics.")
    tenant_labels: bool = Field(False, description="Label request metrics by tenant (watch the cardinality).")


class TelemetrySettings(Section):
    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector (`http://collector:4318`; a bare address gets `/v1/traces`); tracing is off when unset. Needs the `otel` extra.",
    )
    service_name: str = Field("sovereign", min_length=1, description="`service.name` of the exported spans.")

    @field_validator("otlp_endpoint")
    @classmethod
    def _installed(cls, value: str | None) -> str | None:
        if not value:
            return None
        import importlib.util

        # Checked only when tracing is asked for: off, nothing of OpenTelemetry is looked at.
        for module in ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.http"):
            try:
                found = importlib.util.find_spec(module) is not None
            except ImportError:
                found = False
            if not found:
                raise ValueError("tracing needs OpenTelemetry: pip install 'sovereign[otel]'")
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL (OTLP over HTTP)")
        return value


class Timeouts(Section):
    connect: float = Field(5.0, gt=0, description="Seconds to open a connection to the provider.")
    first_byte: float = Field(120.0, gt=0, description="Seconds until the provider's response headers arrive.")
    idle: float = Field(120.0, gt=0, description="Largest gap in seconds between two reads of the provider's body.")
    total: float = Field(600.0, gt=0, description="Whole-request limit in seconds.")


class UpstreamSettings(Section):
    url: str = Field("http://127.0.0.1:9100/v1", description="Base URL of the provider's OpenAI API (ending in /v1).")
    api_key: SecretStr | None = Field(None, description="The provider's key, injected as `Authorization: Bearer`.")
    model: str | None = Field(None, description="Provider model used by public models that name none.")
    max_connections: int = Field(1024, ge=1, description="Pooled keep-alive connections to this provider.")
    timeouts: Timeouts = Field(default_factory=Timeouts)
    proxy: SecretStr | None = Field(
        None,
        description="Egress proxy for this provider, `http://[user:pass@]host:port` (HTTPS providers go through a CONNECT tunnel); masked like a secret.",
    )
    trust_env: bool = Field(
        True,
        description="Without `proxy`: use `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` (or lowercase) from the environment, read once at start-up.",
    )
    tls: UpstreamTLSSettings = Field(default_factory=UpstreamTLSSettings, description="TLS of an `https://` provider.")
    keepalive_seconds: float = Field(15.0, ge=0, description="An idle pooled connection older than this is not reused (0: no reuse).")
    dns_cache_seconds: float = Field(10.0, ge=0, description="How long the provider host's addresses are cached (0: looked up on every new connection).")
    connect_stagger_seconds: float = Field(
        0.25, gt=0, description="Happy Eyeballs delay: the next address is tried when the previous one has not connected within this."
    )

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("proxy")
    @classmethod
    def _proxy_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or not value.get_secret_value():
            return None
        from urllib.parse import urlsplit

        try:
            parts = urlsplit(value.get_secret_value())
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ValueError("must be an http://host:port URL") from None
        if parts.scheme != "http" or not parts.hostname:
            # The message must not echo the value: it may carry credentials.
            raise ValueError("must be an http://[user:pass@]host:port URL (HTTPS proxies are not supported)")
        return value


class RoutingSettings(Section):
    attempts: int = Field(3, ge=1, le=10, description="Most provider attempts per request, across a model's upstream targets, before the first byte reaches the client.")
    backoff_ms: float = Field(50.0, ge=0, description="Base of the jittered pause between attempts, in milliseconds.")
    max_retry_after: float = Field(2.0, ge=0, description="Longest provider `Retry-After` (seconds) the gateway waits before retrying; longer ones fail over at once.")
    breaker_failures: int = Field(5, ge=1, description="Consecutive failures that open an upstream's circuit breaker.")
    breaker_cooldown: float = Field(30.0, gt=0, description="Seconds an open breaker skips its upstream before trying it again.")


class Price(Section):
    input_per_million: int = Field(0, ge=0, description="Credits per million input tokens.")
    output_per_million: int = Field(0, ge=0, description="Credits per million output tokens.")
    cached_input_per_million: int | None = Field(None, ge=0, description="Credits per million cached input tokens (default: the input price).")
    per_request: int = Field(0, ge=0, description="Flat credits per request.")


TOOL_SERVER_LABEL = r"^[A-Za-z0-9_-]{1,48}$"


class ToolServerSettings(Section):
    """One MCP server the gateway itself calls for agent models (`tool_servers.<label>`)."""

    url: HttpURL | None = Field(None, description="Streamable-HTTP endpoint of the MCP server (`http(s)://…/mcp`); or give `command`.")
    headers: dict[str, SecretStr] = Field(default_factory=dict, description="HTTP headers sent to the server (e.g. `Authorization`).")
    command: list[str] | None = Field(None, description="Start the server as a child process over stdio: `[program, arg…]`.")
    env: dict[str, SecretStr] = Field(
        default_factory=dict, description="The whole environment of a stdio server (it inherits nothing else, not even PATH)."
    )
    tools: list[str] | None = Field(None, description="Allowlist of the server's tools offered to the model (default: all).")
    timeout_seconds: float = Field(30.0, gt=0, description="Seconds one tool call may take before it counts as failed.")
    max_result_bytes: int = Field(65536, ge=1, description="Tool results are cut to this many bytes before the model sees them.")
    price_per_call: int = Field(0, ge=0, description="Credits charged per call of this server's tools (0: free).")

    @model_validator(mode="after")
    def _one_transport(self) -> ToolServerSettings:
        if (self.url is None) == (self.command is None):
            raise ValueError("give exactly one of `url` (streamable HTTP) or `command` (stdio)")
        if self.command is not None and not self.command:
            raise ValueError("`command` needs at least the program")
        return self


class AgentSettings(Section):
    """Makes a public model an agent: the gateway runs the configured MCP tools in a loop."""

    model: str = Field(description="The public model that reasons (the agent is priced as it unless it has its own `price`).")
    tool_servers: list[str] = Field(min_length=1, description="Labels of the `tool_servers` whose tools this agent may call.")
    max_iterations: int = Field(30, ge=1, le=1000, description="Most provider calls per request; the last is sent with `tool_choice: \"none\"`.")
    show_tool_calls: bool = Field(
        False,
        description="Stream each server tool call to the client as a `delta.tool_calls` chunk (for a UI that shows progress; SDKs and agent frameworks take such a chunk as a call for them to run, so leave it off for them).",
    )
    keep_tool_messages: bool = Field(
        False, description="Store the tool calls and results in the session (X-Session-ID) instead of only the final answer."
    )


class ModelSettings(Section):
    upstream: str | list[str] = Field("default", description="Upstream name, or an ordered list for failover.")
    upstream_model: str | None = Field(None, description="The provider's model name (default: the upstream's `model`, else the public name).")
    owned_by: str = Field("sovereign", description="`owned_by` shown in /v1/models.")
    price: Price | None = Field(None, description="Credits charged; required unless `free`.")
    free: bool = Field(False, description="Serve without charging (must be explicit).")
    max_output_tokens: int = Field(4096, ge=1, description="Output cap used when the client sends none (also sizes the credit hold).")
    output_cap_param: Literal["max_completion_tokens", "max_tokens"] = Field(
        "max_completion_tokens", description="Request field that carries the output cap to this provider."
    )
    kind: Literal["chat", "embeddings"] = Field(
        "chat", description="`chat`: served on the chat, Responses and Messages routes; `embeddings`: on `/v1/embeddings` only."
    )
    alias_of: str | None = Field(None, description="Serve this entry as an alias of another public model.")
    system_prompt: str | None = Field(None, description="System message prepended to this model's chat requests.")
    defaults: dict[str, Any] = Field(default_factory=dict, description="Request fields applied when the client omits them (before the hold is sized).")
    agent: AgentSettings | None = Field(None, description="Serve this entry as an agent that runs the operator's MCP tools (see Agent mode).")

    @property
    def targets(self) -> list[str]:
        return [self.upstream] if isinstance(self.upstream, str) else list(self.upstream)

    @model_validator(mode="after")
    def _priced(self) -> ModelSettings:
        if self.price is None and not self.free and self.alias_of is None and self.agent is None:
            raise ValueError("a model needs a `price` unless it is marked `free: true`")
        return self


def _default_models() -> dict[str, ModelSettings]:
    return {
        "sovereign-alpha": ModelSettings(
            upstream="default",
            price=Price(input_per_million=500, output_per_million=1500),
        )
    }


DEFAULT_PIPELINE = [
    "auth", "rate_limit", "validation", "responses", "messages", "sessions", "legacy_functions", "agent", "metering"
]


class Settings(Section):
    server: ServerSettings = Field(default_factory=ServerSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    admin: AdminSettings = Field(default_factory=AdminSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    ledger: LedgerSettings = Field(default_factory=LedgerSettings)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    routing: RoutingSettings = Field(default_factory=RoutingSettings)
    upstreams: dict[str, UpstreamSettings] = Field(
        default_factory=lambda: {"default": UpstreamSettings()}, description="Providers by name."
    )
    models: dict[str, ModelSettings] = Field(default_factory=_default_models, description="Public models by name.")
    tool_servers: dict[str, ToolServerSettings] = Field(
        default_factory=dict, description="MCP servers the gateway calls for agent models, by label."
    )
    pipeline: list[str] = Field(default_factory=lambda: list(DEFAULT_PIPELINE), description="Units in request order.")
    units: dict[str, dict[str, Any]] = Field(default_factory=dict, description="Settings of each unit, by unit name.")

    @model_validator(mode="after")
    def _references(self) -> Settings:
        for name, model in self.models.items():
            if model.alias_of is not None:
                target = self.models.get(model.alias_of)
                if target is None or target.alias_of is not None:
                    raise ValueError(f"models.{name}.alias_of: `{model.alias_of}` is not a configured (non-alias) model")
                continue
            if model.agent is not None:
                self._check_agent(name, model.agent)
                continue
            for upstream in model.targets:
                if upstream not in self.upstreams:
                    raise ValueError(f"models.{name}.upstream: no upstream named `{upstream}`")
        if len(set(self.pipeline)) != len(self.pipeline):
            raise ValueError("pipeline: a unit is listed twice")
        for label in self.tool_servers:
            if not re.fullmatch(TOOL_SERVER_LABEL, label):
                raise ValueError(f"tool_servers.{label}: a label is 1-48 letters, digits, '_' or '-'")
        return self

    def _check_agent(self, name: str, agent: AgentSettings) -> None:
        target = self.models.get(agent.model)
        if target is None or target.agent is not None or target.alias_of is not None:
            raise ValueError(f"models.{name}.agent.model: `{agent.model}` is not a configured model (nor an agent or an alias)")
        for index, label in enumerate(agent.tool_servers):
            if label not in self.tool_servers:
                raise ValueError(f"models.{name}.agent.tool_servers[{index}]: no tool server labelled `{label}`")

    def model_kind(self, public: str) -> str | None:
        """`chat` or `embeddings` for a public name (an alias has its target's kind); None if unknown."""
        resolved = self.resolve_model(public)
        return resolved[1].kind if resolved is not None else None

    def resolve_model(self, public: str) -> tuple[str, ModelSettings] | None:
        """The configured model for a public name, following an alias to its target."""
        entry = self.models.get(public)
        if entry is None:
            return None
        if entry.alias_of is not None:
            return entry.alias_of, self.models[entry.alias_of]
        if entry.agent is not None:  # an agent reasons with (and is routed as) its model
            return entry.agent.model, self.models[entry.agent.model]
        return public, entry

    def masked(self) -> dict[str, Any]:
        """The effective settings as plain data with every secret masked (URL passwords and the webhook URL's path too)."""
        data = _mask(self.model_dump(mode="python"))
        url = data["webhooks"]["url"]
        if url:  # chat-tool webhook URLs carry their token in the path
            split = urlsplit(url)
            data["webhooks"]["url"] = urlunsplit(split._replace(path="/********" if split.path not in ("", "/") else split.path, query=""))
        return data


def masked_url(url: str) -> str:
    """`url` without the password of its userinfo (`redis://user:***@host:6379/0`), for messages and check-config."""
    split = urlsplit(url)
    if split.password is None:
        return url
    host = split.hostname or ""
    netloc = f"{split.username or ''}:***@{host}" + (f":{split.port}" if split.port else "")
    return urlunsplit(split._replace(netloc=netloc))


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "********" if value.get_secret_value() else ""
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    if isinstance(value, str) and "://" in value and "@" in value:
        try:
            return masked_url(value)
        except ValueError:  # not a URL after all
            return value
    return value


# A message that starts with a field path of its own: `models.x.upstream: …`, `upstreams[0]: …`.
_NAMES_A_FIELD = re.compile(r"^[A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])+: ")


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        path = field_path(item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if not path and _NAMES_A_FIELD.match(msg):
            lines.append(msg)  # a whole-settings check that names its own field (`models.x.upstream: …`)
        else:
            lines.append(f"{path or '(top level)'}: {msg}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    """Nested settings data from SOVEREIGN_* variables (aliases and __ paths)."""
    _TOP_LEVEL = _top_level_fields()
    data: dict[str, Any] = {}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in _NOT_SETTINGS:
            continue
        if name in ENV_ALIASES:
            path = ENV_ALIASES[name]
        elif "__" in name or name[len(ENV_PREFIX):].lower() in _TOP_LEVEL:
            path = tuple(name[len(ENV_PREFIX):].lower().split("__"))
        else:
            continue
        node = data
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = _parse_env_value(value)
    return data


def _env_form(name: str) -> str:
    """How `name` reads in an environment variable's path: lower case, ``-`` and ``.`` as ``_``."""
    return name.lower().replace("-", "_").replace(".", "_")


def _named_as_configured(override: dict[str, Any], base: Mapping[str, Any], path: tuple[str, ...] = ()) -> dict[str, Any]:
    """`override` (from the environment) with each name spelt as `base` (the file) spells it.

    A variable name holds no ``-``, ``.`` or capitals, so
    ``SOVEREIGN_MODELS__SOVEREIGN_ALPHA__…`` must change ``models.sovereign-alpha``
    rather than add a model ``sovereign_alpha`` beside it. A name that matches
    no configured one stays as written (a new entry); one that matches two is an error.
    """
    named: dict[str, Any] = {}
    for key, value in override.items():
        target = key
        if key not in base:
            matches = sorted(name for name in base if isinstance(name, str) and _env_form(name) == key)
            if len(matches) > 1:
                variable = ENV_PREFIX + "__".join(_env_form(part) for part in (*path, key)).upper()
                spelt = " and ".join(".".join((*path, match)) for match in matches)
                raise ConfigError(f"{variable} matches both {spelt}: rename one of them in the config file")
            if matches:
                target = matches[0]
        inner = base.get(target)
        if isinstance(value, dict) and isinstance(inner, Mapping):
            value = _named_as_configured(value, inner, (*path, target))
        named[target] = value
    return named


def _top_level_fields() -> frozenset[str]:
    return frozenset(Settings.model_fields)


def _parse_env_value(value: str) -> Any:
    if value == "":
        return None
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    # Only scalars and flow lists/maps; anything else stays the literal string.
    return parsed if isinstance(parsed, (str, int, float, bool, list, dict)) else value


def deep_merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def config_path(explicit: str | os.PathLike[str] | None, env: Mapping[str, str]) -> Path | None:
    if explicit:
        return Path(explicit)
    if env.get("SOVEREIGN_CONFIG"):
        return Path(env["SOVEREIGN_CONFIG"])
    return SHIPPED_CONFIG if SHIPPED_CONFIG.is_file() else None


def load_settings(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Load the effective settings; raises ConfigError with field paths."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    file = config_path(path, env)
    if file is not None:
        try:
            loaded = yaml.safe_load(file.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config file {file}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {file} is not valid YAML: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {file} must hold a mapping at the top level")
        data = loaded
    from_env = env_overrides(env)
    if "models" in from_env and "models" not in data:
        # Without a file the default models are the base: a variable changes
        # `sovereign-alpha` (or adds a model beside it), as it would with the shipped file.
        data["models"] = {name: model.model_dump(exclude_unset=True) for name, model in _default_models().items()}
    data = deep_merge(data, _named_as_configured(from_env, data))
    if overrides:
        data = deep_merge(data, overrides)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
