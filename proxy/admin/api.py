"""The admin API: tenants, credits, the ledger and API keys over HTTP.

`create_admin_app` builds a sub-application mounted at ``/admin`` on the
client port (``proxy/app.py``), or, with ``standalone=True``, a root app
serving the same ``/admin/…`` paths on ``admin.port`` (``proxy/server.py``).
It is present only when ``admin.token`` is set. Every request needs
``Authorization: Bearer <admin token>`` (compared in constant time); client
API keys are not admin tokens. Request bodies are validated with pydantic
(unknown fields refused) and every error is OpenAI-shaped with ``param``.

The request models and `create_key_from` are shared with the CLI
(`proxy/manage.py`), so both accept exactly the same input.
"""

from __future__ import annotations

import hmac
import secrets
import time
from typing import Any, TypeVar

from aiohttp import web
from pydantic import ValidationError

from proxy.admin.bodies import AdminBody, CreditTopUp, KeyCreate, KeyUpdate, LedgerFold, TenantCreate, TenantUpdate
from proxy.admin.console import create_console_app
from proxy.admin.console.session import ADMIN_COOKIE, Sessions
from proxy.store.accounts import MAX_TENANTS_LISTED, Accounts
from proxy.web.usage import usage_response
from proxy.core.errors import ApiError, invalid_request, not_found
from proxy.core.params import field_path, query_limit
from proxy.core.gateway import GATEWAY, Gateway
from proxy.web.middlewares import gateway_middleware, stamp_request_id
from proxy.web.routes import read_json_body
from proxy.core.settings import ConfigError, Settings

ACCOUNTS = web.AppKey("accounts", Accounts)
MAX_LEDGER_LIMIT = 1000


Body = TypeVar("Body", bound=AdminBody)


def parse_body(model: type[Body], data: Any) -> Body:
    """Validate `data`; the first problem becomes a 400 naming its field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = field_path(error["loc"])
        kind = error["type"]
        if kind == "missing":
            raise invalid_request(f"Missing required parameter `{param}`.", param=param, code="missing_required_parameter") from None
        if kind == "extra_forbidden":
            raise invalid_request(f"Unknown parameter `{param}`.", param=param, code="unknown_parameter") from None
        raise invalid_request(f"Invalid `{param}`: {error['msg']}.", param=param or None) from None


def check_key_request(request: KeyCreate | KeyUpdate, settings: Settings) -> None:
    """What pydantic cannot know: the configured models and the clock."""
    for index, model in enumerate(request.models or []):
        if model not in settings.models:
            raise invalid_request(f"Unknown model `{model[:200]}`.", param=f"models[{index}]")
    if request.expires_at is not None and request.expires_at <= time.time():
        raise invalid_request("`expires_at` must be a future unix time in seconds.", param="expires_at")


async def create_key_from(accounts: Accounts, request: KeyCreate, settings: Settings) -> tuple[str, Any]:
    """Check a validated key request and create the key: (plaintext, record)."""
    check_key_request(request, settings)
    return await accounts.create_key(
        request.tenant,
        name=request.name,
        models=request.models,
        rpm=request.rpm,
        max_concurrency=request.max_concurrency,
        expires_at=request.expires_at,
        budget_credits=request.budget.credits if request.budget else None,
        budget_period=request.budget.period if request.budget else None,
    )


async def update_key_from(accounts: Accounts, key_id: str, request: KeyUpdate, settings: Settings) -> Any:
    """Check a validated key update and apply the fields it sets: the record."""
    check_key_request(request, settings)
    changes = {name: getattr(request, name) for name in request.model_fields_set}
    if "budget" in changes and request.budget is not None:
        changes["budget"] = request.budget.model_dump()
        if "period" not in request.budget.model_fields_set:
            # A new amount alone keeps the key's period (and what it has spent in it).
            record = await accounts.get_key(key_id)
            if record is not None and record.budget_period is not None:
                changes["budget"]["period"] = record.budget_period
    return await accounts.update_key(key_id, changes)


def new_idempotency_key() -> str:
    return "auto-" + secrets.token_hex(12)


# -- handlers ----------------------------------------------------------------
async def _body(request: web.Request, model: type[Body]) -> Body:
    _, data = await read_json_body(request, request.app[GATEWAY])
    return parse_body(model, data)


async def create_tenant(request: web.Request) -> web.Response:
    body = await _body(request, TenantCreate)
    tenant = await request.app[ACCOUNTS].create_tenant(body.id, body.credits, body.low_balance_threshold)
    return web.json_response(tenant, status=201)


async def list_tenants(request: web.Request) -> web.Response:
    """By id, `limit` (1-1000, default 1000) at a time; `after` (the last id of a page) for the next."""
    limit = query_limit(request.query, MAX_TENANTS_LISTED, MAX_TENANTS_LISTED)
    tenants, more = await request.app[ACCOUNTS].list_tenants(limit, request.query.get("after") or None)
    return web.json_response({"object": "list", "data": tenants, "has_more": more,
                              "last_id": tenants[-1]["id"] if tenants else None})


async def update_tenant(request: web.Request) -> web.Response:
    body = await _body(request, TenantUpdate)
    accounts = request.app[ACCOUNTS]
    tenant = request.match_info["tenant"]
    if "low_balance_threshold" in body.model_fields_set:
        return web.json_response(await accounts.update_tenant(tenant, body.low_balance_threshold))
    return web.json_response(await accounts.tenant(tenant))


async def show_tenant(request: web.Request) -> web.Response:
    return web.json_response(await request.app[ACCOUNTS].tenant(request.match_info["tenant"]))


async def top_up(request: web.Request) -> web.Response:
    body = await _body(request, CreditTopUp)
    # An empty key is the client's mistake (400 from add_credits), not a request for a fresh one.
    key = body.idempotency_key if body.idempotency_key is not None else new_idempotency_key()
    applied, tenant = await request.app[ACCOUNTS].add_credits(request.match_info["tenant"], body.amount, key)
    # A repeated idempotency key changed nothing; say so without changing the body's shape.
    return web.json_response(tenant, headers={"Idempotent-Replayed": "false" if applied else "true"})


async def ledger(request: web.Request) -> web.Response:
    limit = query_limit(request.query, 100, MAX_LEDGER_LIMIT)
    cursor = request.query.get("cursor") or None
    entries, next_cursor = await request.app[ACCOUNTS].ledger_page(request.match_info["tenant"], limit, cursor)
    return web.json_response({"object": "list", "data": entries, "has_more": next_cursor is not None, "next_cursor": next_cursor})


async def fold_ledger(request: web.Request) -> web.Response:
    """Fold old entries into one opening-balance entry now (the housekeeping task does it on a schedule)."""
    body = await _body(request, LedgerFold) if request.can_read_body else LedgerFold(before=None)
    days = request.app[GATEWAY].settings.ledger.retention_days
    before = body.before
    if before is None:
        if days is None:
            raise invalid_request("Send `before` (unix seconds), or set `ledger.retention_days`.", param="before")
        before = time.time() - days * 86400
    folded = await request.app[ACCOUNTS].fold_ledger(request.match_info["tenant"], float(before))
    return web.json_response({"object": "ledger.fold", "tenant": request.match_info["tenant"], "folded_entries": folded})


async def usage(request: web.Request) -> web.Response:
    tenant = request.query.get("tenant")
    if not tenant:
        raise invalid_request("Missing required parameter `tenant`.", param="tenant", code="missing_required_parameter")
    await request.app[ACCOUNTS].tenant(tenant)  # 404 for an unknown tenant
    return await usage_response(request.app[GATEWAY].store, tenant, request.query)


async def create_key(request: web.Request) -> web.Response:
    body = await _body(request, KeyCreate)
    plaintext, record = await create_key_from(request.app[ACCOUNTS], body, request.app[GATEWAY].settings)
    return web.json_response({**record.public(), "key": plaintext}, status=201)


async def list_keys(request: web.Request) -> web.Response:
    tenant = request.query.get("tenant")
    if not tenant:
        raise invalid_request("Missing required parameter `tenant`.", param="tenant", code="missing_required_parameter")
    accounts = request.app[ACCOUNTS]
    records = await accounts.list_keys(tenant)
    return web.json_response({"object": "list", "data": [await accounts.public_key(r) for r in records]})


async def show_key(request: web.Request) -> web.Response:
    accounts = request.app[ACCOUNTS]
    record = await accounts.get_key(request.match_info["key_id"])
    if record is None:
        raise not_found("key")
    return web.json_response(await accounts.public_key(record))


async def update_key(request: web.Request) -> web.Response:
    body = await _body(request, KeyUpdate)
    accounts = request.app[ACCOUNTS]
    record = await update_key_from(accounts, request.match_info["key_id"], body, request.app[GATEWAY].settings)
    return web.json_response(await accounts.public_key(record))


async def revoke_key(request: web.Request) -> web.Response:
    record = await request.app[ACCOUNTS].revoke_key(request.match_info["key_id"])
    return web.json_response(record.public())


# -- the application -----------------------------------------------------------
def _admin_token_middleware(token: str, sessions: Sessions) -> Any:
    """Bearer admin token, or a console admin session (cookie) with its CSRF token on changes."""
    expected = token.encode()

    @web.middleware
    async def require_admin_token(request: web.Request, handler: Any) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        presented = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not presented and ADMIN_COOKIE in request.cookies:
            session = await sessions.read(request, "admin")
            if session is not None and await sessions.csrf_ok(request, session):
                return await handler(request)
        if not presented or not hmac.compare_digest(presented.encode(), expected):
            raise ApiError(
                401,
                "The admin API needs `Authorization: Bearer <admin token>`.",
                code="invalid_admin_token",
                headers={"WWW-Authenticate": 'Bearer realm="sovereign-admin"'},
            )
        return await handler(request)

    return require_admin_token


def create_admin_app(gateway: Gateway, *, standalone: bool = False) -> web.Application:
    """The admin sub-app (routes relative to ``/admin``); `standalone` wraps it in a root app."""
    token = gateway.settings.admin.token
    if token is None or not token.get_secret_value():
        raise ConfigError("invalid configuration:\n  admin.token: must not be empty (leave it unset to turn the admin API off)")
    sessions = Sessions(gateway.store, token.get_secret_value())
    app = web.Application(middlewares=[_admin_token_middleware(token.get_secret_value(), sessions)])
    app[GATEWAY] = gateway
    app[ACCOUNTS] = Accounts(gateway.store, events=bool(gateway.settings.webhooks.url))
    app.add_routes(
        [
            web.post("/tenants", create_tenant),
            web.get("/tenants", list_tenants),
            web.get("/tenants/{tenant}", show_tenant),
            web.patch("/tenants/{tenant}", update_tenant),
            web.post("/tenants/{tenant}/credits", top_up),
            web.get("/tenants/{tenant}/ledger", ledger),
            web.post("/tenants/{tenant}/ledger/fold", fold_ledger),
            web.post("/keys", create_key),
            web.get("/keys", list_keys),
            web.get("/keys/{key_id}", show_key),
            web.patch("/keys/{key_id}", update_key),
            web.delete("/keys/{key_id}", revoke_key),
            web.get("/usage", usage),
        ]
    )
    if not standalone:
        return app
    # The root app's middleware gives request ids, error rendering and draining, as on the client port.
    root = web.Application(middlewares=[gateway_middleware], client_max_size=gateway.settings.server.max_body_bytes)
    root[GATEWAY] = gateway
    root.on_response_prepare.append(stamp_request_id)
    root.add_subapp("/admin", app)
    root.add_subapp("/console", create_console_app(gateway, admin=True, tenant=False))
    return root
