"""The OpenAPI 3.1 description of Sovereign's own API, served at /openapi.json.

The paths and the reply schemas are written here (the routes are few), kept in
step with the router by tests/proxy/web/test_openapi.py, which fails when a
route exists without a description or the reverse. The request bodies that
have a pydantic model are generated from it (`model_json_schema()`), so the
document cannot drift from what the gateway accepts: the admin bodies from
`proxy.admin.bodies`, the others from the units that check them
(`Unit.openapi_schemas()`; `proxy` never imports `middleware`). A body whose
unit is not in the pipeline is described as a plain object.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from proxy import __version__
from proxy.admin.bodies import OPENAPI_BODIES
from proxy.core.gateway import GATEWAY
from proxy.core.pipeline import Unit

JSON = "application/json"


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str = "OK") -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema}}}


ERRORS = {"default": _json(_ref("Error"), "An OpenAI-shaped error.")}
ANTHROPIC_ERRORS = {"default": _json(_ref("AnthropicError"), "An Anthropic-shaped error (the /v1/messages routes).")}


# Request bodies by component name, with what the route says of them. The
# schemas come from the models (`document`); these names are the models' names.
BODIES: dict[str, str] = {
    "ChatCompletionRequest": "An OpenAI chat-completions request; unknown fields are forwarded.",
    "ResponsesRequest": "An OpenAI Responses request, served on top of chat completions.",
    "MessagesRequest": "An Anthropic Messages request, served on top of chat completions (x-api-key or Bearer).",
    "CountTokensRequest": "A Messages request without `max_tokens`.",
    "EmbeddingsRequest": "An OpenAI embeddings request for a model of kind `embeddings`.",
    "TenantCreate": "The new tenant.",
    "TenantUpdate": "The low-balance threshold (null clears it).",
    "CreditTopUp": "Credits to add; a repeated `idempotency_key` adds them once.",
    "LedgerFold": "Fold entries older than `before`.",
    "KeyCreate": "The new key's tenant, name, models, limits, budget and expiry.",
    "KeyUpdate": "Only the fields sent change; null clears a limit, the budget or the expiry.",
}


def _op(summary: str, responses: dict[str, Any], *, body: str | None = None, params: list | None = None,
        security: str = "client", errors: dict[str, Any] = ERRORS) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": {**responses, **errors}}
    op["security"] = [{security: []}] if security != "none" else []
    if body is not None:
        op["requestBody"] = {"required": True, "description": BODIES[body], "content": {JSON: {"schema": _ref(body)}}}
    if params:
        op["parameters"] = params
    return op


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _list_of(item: str) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["object", "data"],
        "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _ref(item)}},
    }


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["string", "null"]},
                },
            }
        },
    },
    "AnthropicError": {
        "type": "object",
        "required": ["type", "error"],
        "properties": {
            "type": {"const": "error"},
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
            "request_id": {"type": "string"},
        },
    },
    "Message": {
        "type": "object",
        "required": ["id", "type", "role", "content", "model", "stop_reason", "usage"],
        "properties": {
            "id": {"type": "string"},
            "type": {"const": "message"},
            "role": {"const": "assistant"},
            "content": {"type": "array", "items": {"type": "object"}},
            "model": {"type": "string"},
            "stop_reason": {"type": ["string", "null"]},
            "usage": {"type": "object"},
        },
    },
    "TokenCount": {"type": "object", "required": ["input_tokens"], "properties": {"input_tokens": {"type": "integer"}}},
    "Embeddings": {
        "type": "object",
        "required": ["object", "data", "model"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"type": "object"}},
            "model": {"type": "string"},
            "usage": {"type": "object"},
        },
    },
    "Model": {
        "type": "object",
        "required": ["id", "object", "created", "owned_by"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "model"},
            "created": {"type": "integer"},
            "owned_by": {"type": "string"},
        },
    },
    "ChatCompletion": {
        "type": "object",
        "required": ["id", "object", "choices"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "chat.completion"},
            "choices": {"type": "array", "items": {"type": "object"}},
            "usage": {"type": ["object", "null"]},
        },
    },
    "Response": {
        "type": "object",
        "required": ["id", "object", "status", "output"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "response"},
            "status": {"type": "string"},
            "output": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Deleted": {
        "type": "object",
        "required": ["id", "object", "deleted"],
        "properties": {"id": {"type": "string"}, "object": {"type": "string"}, "deleted": {"const": True}},
    },
    "Session": {
        "type": "object",
        "required": ["id"],
        "properties": {
            "id": {"type": "string"},
            "title": {"type": ["string", "null"]},
            "created_at": {"type": ["integer", "number"]},
            "updated_at": {"type": ["integer", "number"]},
            "message_count": {"type": "integer"},
            "messages": {"type": "array", "items": {"type": "object"}},
        },
    },
    "Credits": {
        "type": "object",
        "required": ["object", "tenant", "balance", "reserved"],
        "properties": {
            "object": {"const": "credits"},
            "tenant": {"type": "string"},
            "balance": {"type": "integer"},
            "reserved": {"type": "integer"},
            "available": {"type": "integer"},
            "key": {"type": "object"},
        },
    },
    "Tenant": {
        "type": "object",
        "required": ["id", "balance", "reserved", "created_at"],
        "properties": {
            "id": {"type": "string"},
            "balance": {"type": "integer"},
            "reserved": {"type": "integer"},
            "available": {"type": "integer"},
            "created_at": {"type": "integer"},
            "low_balance_threshold": {"type": ["integer", "null"]},
        },
    },
    "LedgerEntry": {
        "type": "object",
        "required": ["id", "type", "credits", "balance_after"],
        "properties": {
            "id": {"type": "string"},
            "type": {"type": "string"},
            "credits": {"type": "integer"},
            "balance_after": {"type": "integer"},
        },
    },
    "Key": {
        "type": "object",
        "required": ["id", "tenant"],
        "properties": {
            "id": {"type": "string"},
            "tenant": {"type": "string"},
            "name": {"type": "string"},
            "models": {"type": "array", "items": {"type": "string"}},
            "rpm": {"type": ["integer", "null"]},
            "max_concurrency": {"type": ["integer", "null"]},
            "expires_at": {"type": ["integer", "null"]},
            "revoked_at": {"type": ["integer", "null"]},
            "budget": {"type": ["object", "null"], "description": "{credits, period} and, when read back, spent and held in the current period."},
        },
    },
    "KeyCreated": {
        "allOf": [_ref("Key"), {"type": "object", "required": ["key"], "properties": {"key": {"type": "string"}}}]
    },
    "Status": {"type": "object", "required": ["status"], "properties": {"status": {"type": "string"}}},
    # Usage, budgets, alerts (DESIGN §9).
    "UsageRow": {
        "type": "object",
        "required": ["start", "end", "tenant", "requests", "input_tokens", "output_tokens", "credits"],
        "properties": {
            "start": {"type": "integer", "description": "Unix seconds."},
            "end": {"type": "integer"},
            "tenant": {"type": "string"},
            "key_id": {"type": "string"},
            "model": {"type": "string"},
            "requests": {"type": "integer"},
            "input_tokens": {"type": "integer"},
            "output_tokens": {"type": "integer"},
            "credits": {"type": "integer"},
        },
    },
    "LedgerPage": {
        "type": "object",
        "required": ["object", "data", "has_more", "next_cursor"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/LedgerEntry"}},
            "has_more": {"type": "boolean"},
            "next_cursor": {"type": ["string", "null"]},
        },
    },
}
USAGE_QUERY = [
    {"name": name, "in": "query", "required": False, "schema": {"type": "string"}, "description": text}
    for name, text in (
        ("start", "Unix seconds or ISO 8601 (default: 24 hours before `end`)."),
        ("end", "Unix seconds or ISO 8601 (default: now)."),
        ("group_by", "Comma-separated: hour or day, model, key."),
        ("key", "Only this key id."),
        ("model", "Only this model."),
        ("format", "json (default) or csv."),
    )
]
HTML = {"200": {"description": "An HTML page.", "content": {"text/html": {"schema": {"type": "string"}}}}}
SEE_OTHER = {"303": {"description": "Redirect after the form."}, **HTML}
# Console pages answer refusals with a page, not JSON.
HTML_PAGE = {"content": {"text/html": {"schema": {"type": "string"}}, JSON: {"schema": _ref("Error")}}}
for _code, _text in (
    ("400", "Malformed form."), ("401", "Not logged in / wrong secret."), ("403", "Wrong origin or CSRF token."),
    ("404", "No such page."), ("415", "Not a urlencoded form."),
):
    HTML[_code] = SEE_OTHER[_code] = {"description": _text, **HTML_PAGE}

SSE = {"text/event-stream": {"schema": {"type": "string"}}}


def _stream_or_json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"200": {"description": "JSON, or SSE when `stream` is true.", "content": {JSON: {"schema": schema}, **SSE}}}


PATHS: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "post": _op("Create a chat completion (JSON or SSE).", _stream_or_json(_ref("ChatCompletion")), body="ChatCompletionRequest")
    },
    "/v1/responses": {
        "post": _op("Create a response (Responses API on chat completions).", _stream_or_json(_ref("Response")), body="ResponsesRequest")
    },
    "/v1/responses/{response_id}": {
        "get": _op("Retrieve a stored response.", {"200": _json(_ref("Response"))}, params=[_path_param("response_id")]),
        "delete": _op("Delete a stored response.", {"200": _json(_ref("Deleted"))}, params=[_path_param("response_id")]),
    },
    "/v1/responses/{response_id}/input_items": {
        "get": _op("List a stored response's input items.", {"200": _json({"type": "object", "required": ["object", "data"], "properties": {"object": {"const": "list"}, "data": {"type": "array"}}})}, params=[_path_param("response_id")]),
    },
    "/v1/messages": {
        "post": _op("Create a message (Anthropic Messages API on chat completions; JSON or SSE).",
                    _stream_or_json(_ref("Message")), body="MessagesRequest", errors=ANTHROPIC_ERRORS)
    },
    "/v1/messages/count_tokens": {
        "post": _op("The gateway's estimate of a Messages request's input tokens (free).",
                    {"200": _json(_ref("TokenCount"))}, body="CountTokensRequest", errors=ANTHROPIC_ERRORS)
    },
    "/v1/embeddings": {
        "post": _op("Create embeddings (models of kind `embeddings`).", {"200": _json(_ref("Embeddings"))}, body="EmbeddingsRequest")
    },
    "/v1/models": {"get": _op("Models this key may use.", {"200": _json(_list_of("Model"))})},
    "/v1/models/{model}": {"get": _op("One model.", {"200": _json(_ref("Model"))}, params=[_path_param("model")])},
    "/v1/sessions": {
        "get": _op(
            "The tenant's sessions.",
            {"200": _json(_list_of("Session"))},
            params=[_query("limit", {"type": "integer", "minimum": 1, "maximum": 100}), _query("after", {"type": "string"})],
        )
    },
    "/v1/sessions/{session_id}": {
        "get": _op("One session with its messages.", {"200": _json(_ref("Session"))}, params=[_path_param("session_id")]),
        "delete": _op("Delete a session.", {"200": _json(_ref("Deleted"))}, params=[_path_param("session_id")]),
    },
    "/v1/credits": {"get": _op("The caller's tenant balance and key limits.", {"200": _json(_ref("Credits"))})},
    "/v1/usage": {"get": _op("The caller's tenant usage over time.", {"200": _json(_list_of("UsageRow"))}, params=USAGE_QUERY)},
    "/healthz": {"get": _op("Liveness.", {"200": _json(_ref("Status"))}, security="none")},
    "/readyz": {"get": _op("Readiness: store reachable, not draining.", {"200": _json(_ref("Status")), "503": _json(_ref("Status"))}, security="none")},
    "/metrics": {"get": _op("Prometheus metrics.", {"200": {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}, security="none")},
    "/openapi.json": {"get": _op("This document.", {"200": _json({"type": "object"})}, security="none")},
    "/admin/tenants": {
        "post": _op("Create a tenant.", {"201": _json(_ref("Tenant"))}, body="TenantCreate", security="admin"),
        "get": _op("Every tenant.", {"200": _json(_list_of("Tenant"))}, security="admin"),
    },
    "/admin/tenants/{tenant_id}": {
        "get": _op("A tenant.", {"200": _json(_ref("Tenant"))}, params=[_path_param("tenant_id")], security="admin"),
        "patch": _op("Set the low-balance threshold.", {"200": _json(_ref("Tenant"))}, body="TenantUpdate", params=[_path_param("tenant_id")], security="admin"),
    },
    "/admin/tenants/{tenant_id}/ledger/fold": {
        "post": _op("Fold old ledger entries into one opening-balance entry.", {"200": _json({"type": "object"})}, body="LedgerFold", params=[_path_param("tenant_id")], security="admin")
    },
    "/admin/usage": {
        "get": _op("A tenant's usage over time.", {"200": _json(_list_of("UsageRow"))}, params=[{"name": "tenant", "in": "query", "required": True, "schema": {"type": "string"}}, *USAGE_QUERY], security="admin")
    },
    "/admin/tenants/{tenant_id}/credits": {
        "post": _op("Add credits (once per idempotency key).", {"200": _json(_ref("Tenant"))}, body="CreditTopUp", params=[_path_param("tenant_id")], security="admin")
    },
    "/admin/tenants/{tenant_id}/ledger": {
        "get": _op(
            "The tenant's ledger, newest first.",
            {"200": _json(_ref("LedgerPage"))},
            params=[_path_param("tenant_id"), _query("limit", {"type": "integer", "minimum": 1, "maximum": 1000}), _query("cursor", {"type": "string"})],
            security="admin",
        )
    },
    "/admin/keys": {
        "post": _op("Create an API key (the plaintext is returned only here).", {"201": _json(_ref("KeyCreated"))}, body="KeyCreate", security="admin"),
        "get": _op("List a tenant's keys.", {"200": _json(_list_of("Key"))}, params=[{"name": "tenant", "in": "query", "required": True, "schema": {"type": "string"}}], security="admin"),
    },
    "/admin/keys/{key_id}": {
        "get": _op("A key (its budget with what it spent).", {"200": _json(_ref("Key"))}, params=[_path_param("key_id")], security="admin"),
        "patch": _op("Change a key's name, models, limits, budget or expiry.", {"200": _json(_ref("Key"))}, body="KeyUpdate", params=[_path_param("key_id")], security="admin"),
        "delete": _op("Revoke a key.", {"200": _json(_ref("Key"))}, params=[_path_param("key_id")], security="admin"),
    },
    # The console's pages (HTML; forms post with a session cookie, see proxy/admin/console).
    "/console/": {"get": _op("The operator console (log-in form without a session).", HTML, security="none")},
    "/console/login": {"post": _op("Operator log-in (form field `token`).", SEE_OTHER, security="none")},
    "/console/logout": {"post": _op("Operator log-out.", SEE_OTHER, security="none")},
    "/console/tenants/{tenant_id}": {"get": _op("One tenant's console page.", {**SEE_OTHER}, params=[_path_param("tenant_id")], security="none")},
    "/console/static/{name}": {"get": _op("A console asset.", {"200": {"description": "CSS or JavaScript."}}, params=[_path_param("name")], security="none")},
    "/console/tenant": {"get": _op("The tenant view (log-in form without a session).", HTML, security="none")},
    "/console/tenant/login": {"post": _op("Tenant log-in (form field `key`).", SEE_OTHER, security="none")},
    "/console/tenant/logout": {"post": _op("Tenant log-out.", SEE_OTHER, security="none")},
    "/console/tenant/usage": {"get": _op("The tenant view's usage (session cookie).", {"200": _json(_list_of("UsageRow"))}, params=USAGE_QUERY, security="none")},
}


def model_schemas(models: Mapping[str, type[BaseModel]]) -> dict[str, Any]:
    """Component schemas generated from pydantic models, their nested models (`$defs`) hoisted alongside."""
    components: dict[str, Any] = {}

    def add(name: str, schema: dict[str, Any]) -> None:
        if components.setdefault(name, schema) != schema:
            # Two different models by one name would silently describe the wrong one.
            raise ValueError(f"two request models define the OpenAPI component {name!r} differently")

    for name, model in models.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for nested, nested_schema in schema.pop("$defs", {}).items():
            add(nested, nested_schema)
        add(name, schema)
    return components


def request_models(units: Iterable[Unit], admin: bool) -> dict[str, type[BaseModel]]:
    """The request-body models: the admin API's (where it is listed) and those the pipeline's units check."""
    models: dict[str, type[BaseModel]] = dict(OPENAPI_BODIES) if admin else {}
    for unit in units:
        models.update(unit.openapi_schemas())
    return models


def document(units: Iterable[Unit] = (), admin: bool = True) -> dict[str, Any]:
    """The document for a gateway with these units; `admin=False` leaves out the /admin routes (and their token scheme).

    Bodies with a model among `units` and the admin API are generated from it;
    the others are described as an object (the route's description says what).
    """
    paths = PATHS if admin else {path: ops for path, ops in PATHS.items() if not path.startswith("/admin/")}
    generated = model_schemas(request_models(units, admin))
    clash = sorted(set(generated) & set(SCHEMAS))
    if clash:
        raise ValueError(f"request models and hand-written reply schemas share the OpenAPI components {clash}")
    schemas = {**SCHEMAS, **generated}
    for ops in paths.values():
        for op in ops.values():
            body = op.get("requestBody")
            if body is not None:
                name = body["content"][JSON]["schema"]["$ref"].rpartition("/")[2]
                schemas.setdefault(name, {"type": "object", "description": BODIES[name]})
    security_schemes = {
        "client": {"type": "http", "scheme": "bearer", "description": "A client key: sk-sov-live-…"},
        "admin": {"type": "http", "scheme": "bearer", "description": "The admin token (SOVEREIGN_ADMIN_TOKEN)."},
    }
    if not admin:
        del security_schemes["admin"]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Sovereign gateway",
            "version": __version__,
            "description": "OpenAI-compatible gateway with multi-tenant keys and prepaid credits. Errors have the OpenAI shape, except on the Anthropic /v1/messages routes (Anthropic's shape).",
        },
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": security_schemes},
    }


async def openapi_json(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    admin = gateway.settings.admin
    # The admin routes are on this port only when the admin API is on and has no port of its own (proxy/web/app.py).
    return web.json_response(document(gateway.units, admin=admin.token is not None and admin.port is None))
