"""The web console: `/console/` for operators (admin token), `/console/tenant` for a tenant (client key).

Server-rendered pages (``page.html``) with a little JavaScript (``console.js``:
forms that call the admin API, and the usage charts, drawn as SVG from the
usage API); every asset is served from this package, nothing from a CDN, so
the console works offline and behind a firewall. No build step.

Mounting (see proxy/web/app.py): with ``admin.token`` set, the console is
mounted next to the admin API (on the client port under ``/console``, or on
``admin.port``); the tenant view is always on the client port, where client
keys are used. Admin pages call ``/admin/…`` with the session cookie and an
``X-CSRF-Token`` header (the admin API accepts either that or the Bearer
token); the tenant view reads ``/console/tenant/usage`` with its own cookie.
Sessions and CSRF: see `session.py`.
"""

from __future__ import annotations

import hmac
import html
import time
from importlib import resources
from string import Template
from typing import Any
from urllib.parse import quote

from aiohttp import web

from proxy.admin.console.session import (
    ADMIN_COOKIE,
    TENANT_COOKIE,
    Session,
    Sessions,
    same_origin,
)
from proxy.core.errors import ApiError
from proxy.core.gateway import GATEWAY, Gateway
from proxy.store.accounts import Accounts, KeyRecord
from proxy.web.usage import usage_response

SESSIONS = web.AppKey("console_sessions", Sessions)
CONSOLE_ACCOUNTS = web.AppKey("console_accounts", Accounts)
# Tenants on one page of the operator console's list.
TENANTS_PER_PAGE = 200
# Whether this console app serves the tenant view too (not on a separate admin.port).
TENANT_VIEW = web.AppKey("console_tenant_view", bool)
STATIC = {"console.css": "text/css", "console.js": "text/javascript"}
LEDGER_PAGE = 50
PAGE = Template(resources.files(__package__).joinpath("page.html").read_text())
NO_STORE = {"Cache-Control": "no-store"}


def esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def when(value: Any) -> str:
    if not value:
        return "—"
    try:
        return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(float(value)))
    except (ValueError, OverflowError, OSError):  # a time no calendar prints (stored before expiries were bounded)
        return str(value)


def render(title: str, body: str, *, csrf: str = "", nav: str = "", home: str = "/console/", status: int = 200) -> web.Response:
    text = PAGE.substitute(title=esc(title), body=body, csrf=esc(csrf), nav=nav, home=home, root="/console")
    return web.Response(text=text, content_type="text/html", status=status, headers=NO_STORE)


def see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **NO_STORE})


def logout_form(action: str, csrf: str) -> str:
    return (
        f'<form method="post" action="{action}" class="inline"><input type="hidden" name="csrf" value="{esc(csrf)}">'
        '<button type="submit" class="link">Log out</button></form>'
    )


def login_page(action: str, label: str, field: str, error: str = "", status: int = 200, home: str = "/console/") -> web.Response:
    alert = f'<p class="error" role="alert">{esc(error)}</p>' if error else ""
    body = f"""{alert}
<form method="post" action="{action}" class="card narrow">
  <label for="secret">{esc(label)}</label>
  <input id="secret" name="{field}" type="password" autocomplete="off" required autofocus>
  <button type="submit">Log in</button>
</form>"""
    return render("Log in", body, status=status, home=home)


async def read_form(request: web.Request) -> dict[str, str]:
    """The posted form's fields; the console's forms are urlencoded, anything else is refused (415/400)."""
    if request.content_type != "application/x-www-form-urlencoded":
        raise web.HTTPUnsupportedMediaType(text="The console's forms are application/x-www-form-urlencoded.")
    try:
        form = await request.post()
    except ValueError:
        raise web.HTTPBadRequest(text="Malformed form body.") from None
    return {name: value for name, value in form.items() if isinstance(value, str)}


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in STATIC:
        raise web.HTTPNotFound()
    text = resources.files(__package__).joinpath(name).read_text()
    return web.Response(text=text, content_type=STATIC[name], headers={"Cache-Control": "no-cache"})


# -- operator pages -------------------------------------------------------------
async def _admin(request: web.Request) -> tuple[Session, str] | None:
    sessions = request.app[SESSIONS]
    session = await sessions.read(request, "admin")
    return (session, await sessions.csrf_token(session)) if session else None


def _admin_nav(request: web.Request, csrf: str) -> str:
    tenant_view = '<a href="/console/tenant">Tenant view</a> ' if request.app[TENANT_VIEW] else ""
    return '<a href="/console/">Tenants</a> ' + tenant_view + logout_form("/console/logout", csrf)


async def home(request: web.Request) -> web.Response:
    auth = await _admin(request)
    if auth is None:
        return login_page("/console/login", "Admin token", "token")
    _, csrf = auth
    after = request.query.get("after") or None
    tenants, more = await request.app[CONSOLE_ACCOUNTS].list_tenants(TENANTS_PER_PAGE, after)
    pages = ""
    if after is not None:
        pages += '<a href="/console/">First page</a> '
    if more:
        pages += f'<a rel="next" href="/console/?after={quote(tenants[-1]["id"])}">Next tenants</a>'
    rows = "".join(
        f'<tr><th scope="row"><a href="/console/tenants/{quote(t["id"])}">{esc(t["id"])}</a></th>'
        f'<td class="num">{t["balance"]}</td><td class="num">{t["reserved"]}</td><td class="num">{t["available"]}</td>'
        f'<td>{when(t["created_at"])}</td></tr>'
        for t in tenants
    ) or '<tr><td colspan="5">No tenants yet.</td></tr>'
    body = f"""
<section class="card" aria-labelledby="new-tenant">
  <h2 id="new-tenant">New tenant</h2>
  <form data-api="POST /admin/tenants" data-then="open-tenant" class="row">
    <label>Id <input name="id" required pattern="[A-Za-z0-9][A-Za-z0-9._\\-]{{0,63}}"></label>
    <label>Opening credits <input name="credits" type="number" min="0" value="0"></label>
    <label>Low-balance alert below <input name="low_balance_threshold" type="number" min="0"></label>
    <button type="submit">Create tenant</button>
  </form>
</section>
<section aria-labelledby="tenants-h">
  <h2 id="tenants-h">Tenants</h2>
  <div class="scroll"><table id="tenants">
    <thead><tr><th scope="col">Tenant</th><th scope="col">Balance</th><th scope="col">Reserved</th><th scope="col">Available</th><th scope="col">Created</th></tr></thead>
    <tbody>{rows}</tbody>
  </table></div>
  {f'<p class="pages">{pages}</p>' if pages else ""}
</section>"""
    return render("Tenants", body, csrf=csrf, nav=_admin_nav(request, csrf))


async def login(request: web.Request) -> web.Response:
    token = request.config_dict[GATEWAY].settings.admin.token
    form = await read_form(request)
    presented = str(form.get("token", ""))
    if not same_origin(request):
        return login_page("/console/login", "Admin token", "token", "This form must be sent from the console itself.", 403)
    expected = token.get_secret_value() if token else ""
    if not expected or not presented or not hmac.compare_digest(presented.encode(), expected.encode()):
        return login_page("/console/login", "Admin token", "token", "That is not the admin token.", 401)
    response = see_other("/console/")
    await request.app[SESSIONS].issue(response, request, "admin", "-")
    return response


async def logout(request: web.Request) -> web.Response:
    return await _logout(request, "admin", ADMIN_COOKIE, "/console/")


async def _logout(request: web.Request, kind: str, cookie: str, to: str) -> web.Response:
    sessions = request.app[SESSIONS]
    session = await sessions.read(request, kind)
    form = await read_form(request)
    if session is not None and not await sessions.csrf_ok(request, session, str(form.get("csrf", ""))):
        raise web.HTTPForbidden(text="CSRF token missing or wrong.")
    if session is not None:
        await sessions.end(session)  # not only the browser's copy: the cookie itself stops working
    response = see_other(to)
    response.del_cookie(cookie, path="/")
    return response


def _budget_text(budget: dict[str, Any] | None) -> str:
    if not budget:
        return "none"
    per = "in total" if budget["period"] == "total" else f"per {budget['period']}"
    return f"{budget.get('spent', 0)} of {budget['credits']} {per}"


def _key_row(key: dict[str, Any], csrf: str) -> str:
    active = key["revoked_at"] is None
    budget = key.get("budget") or {}
    kid = esc(key["id"])
    actions = ""
    if active:
        actions = f"""<button type="button" data-api="DELETE /admin/keys/{kid}" data-confirm="Revoke key {esc(key['name'] or key['id'])}? Clients using it are refused within seconds." class="danger">Revoke</button>
<details><summary>Edit</summary>
<form data-api="PATCH /admin/keys/{kid}" class="stack" aria-label="Edit key {kid}">
  <label>Name <input name="name" value="{esc(key['name'])}"></label>
  <label>Requests per minute <input name="rpm" type="number" min="1" value="{esc(key['rpm'])}" data-null></label>
  <label>Max concurrency <input name="max_concurrency" type="number" min="1" value="{esc(key['max_concurrency'])}" data-null></label>
  <label>Budget (credits) <input name="budget.credits" type="number" min="0" value="{esc(budget.get('credits'))}" data-null="budget"></label>
  <label>Budget period <select name="budget.period">{_period_options(budget.get('period'))}</select></label>
  <button type="submit">Save</button>
</form></details>"""
    return (
        f'<tr><th scope="row">{esc(key["name"] or "—")}<br><code>{kid}</code></th>'
        f'<td>{"active" if active else "revoked " + when(key["revoked_at"])}</td>'
        f'<td>{esc(", ".join(key["models"]) or "all")}</td><td class="num">{esc(key["rpm"] or "—")}</td>'
        f'<td class="num">{esc(key["max_concurrency"] or "—")}</td><td>{esc(_budget_text(key.get("budget")))}</td>'
        f"<td>{when(key['expires_at'])}</td><td>{actions}</td></tr>"
    )


def _period_options(selected: str | None) -> str:
    return "".join(
        f'<option value="{p}"{" selected" if p == (selected or "day") else ""}>{p}</option>' for p in ("day", "month", "total")
    )


def _ledger_rows(entries: list[dict[str, Any]]) -> str:
    return "".join(
        f'<tr><td>{when(e.get("created_at"))}</td><td>{esc(e.get("type"))}</td><td class="num">{esc(e.get("credits"))}</td>'
        f'<td class="num">{esc(e.get("balance_after"))}</td><td>{esc(e.get("model") or "")}</td><td><code>{esc(e.get("key_id") or "")}</code></td>'
        f'<td class="num">{esc(e.get("input_tokens", ""))}</td><td class="num">{esc(e.get("output_tokens", ""))}</td></tr>'
        for e in entries
    ) or '<tr><td colspan="8">No entries.</td></tr>'


LEDGER_HEAD = (
    '<thead><tr><th scope="col">Time</th><th scope="col">Type</th><th scope="col">Credits</th><th scope="col">Balance after</th>'
    '<th scope="col">Model</th><th scope="col">Key</th><th scope="col">Input tokens</th><th scope="col">Output tokens</th></tr></thead>'
)


def usage_section(url: str) -> str:
    today = time.strftime("%Y-%m-%d", time.gmtime())
    week_ago = time.strftime("%Y-%m-%d", time.gmtime(time.time() - 6 * 86400))
    return f"""
<section class="card usage" aria-labelledby="usage-h" data-usage-url="{esc(url)}">
  <h2 id="usage-h">Usage</h2>
  <form class="row usage-range">
    <label>From <input type="date" name="start" value="{week_ago}"></label>
    <label>To (inclusive) <input type="date" name="end" value="{today}"></label>
    <label>Split by <select name="split"><option value="model">model</option><option value="key">key</option></select></label>
    <button type="submit">Show</button>
  </form>
  <figure><figcaption>Credits</figcaption><div class="chart" data-metric="credits"></div></figure>
  <figure><figcaption>Tokens (input + output)</figcaption><div class="chart" data-metric="tokens"></div></figure>
  <details><summary>Usage as a table</summary><div class="scroll usage-table"></div></details>
</section>"""


async def tenant_page(request: web.Request) -> web.Response:
    auth = await _admin(request)
    if auth is None:
        return see_other("/console/")
    _, csrf = auth
    accounts = request.app[CONSOLE_ACCOUNTS]
    tenant_id = request.match_info["tenant"]
    try:
        tenant = await accounts.tenant(tenant_id)
    except ApiError:
        return render("No such tenant", '<p><a href="/console/">Back to the tenants</a></p>', csrf=csrf, nav=_admin_nav(request, csrf), status=404)
    keys = [await accounts.public_key(r) for r in await accounts.list_keys(tenant_id)]
    cursor = request.query.get("cursor") or None
    try:
        entries, next_cursor = await accounts.ledger_page(tenant_id, LEDGER_PAGE, cursor)
    except ApiError:
        entries, next_cursor = await accounts.ledger_page(tenant_id, LEDGER_PAGE)
    tid = esc(tenant_id)
    path = f"/admin/tenants/{quote(tenant_id)}"
    older = f'<a href="/console/tenants/{quote(tenant_id)}?cursor={next_cursor}#ledger-h">Older entries</a>' if next_cursor else ""
    key_rows = "".join(_key_row(k, csrf) for k in keys) or '<tr><td colspan="8">No keys yet.</td></tr>'
    body = f"""
<section class="card summary" aria-labelledby="balance-h">
  <h2 id="balance-h" class="visually-hidden">Balance</h2>
  <dl class="figures">
    <div><dt>Balance</dt><dd id="balance">{tenant['balance']}</dd></div>
    <div><dt>Reserved</dt><dd id="reserved">{tenant['reserved']}</dd></div>
    <div><dt>Available</dt><dd>{tenant['available']}</dd></div>
    <div><dt>Low-balance alert below</dt><dd>{esc(tenant['low_balance_threshold'] if tenant['low_balance_threshold'] is not None else '—')}</dd></div>
  </dl>
  <div class="row">
    <form data-api="POST {path}/credits" class="row" aria-label="Top up">
      <label>Add credits <input name="amount" type="number" min="1" required></label>
      <button type="submit">Top up</button>
    </form>
    <form data-api="PATCH {path}" class="row" aria-label="Low-balance alert">
      <label>Alert below <input name="low_balance_threshold" type="number" min="0" value="{esc(tenant['low_balance_threshold'])}" data-null></label>
      <button type="submit">Set alert</button>
    </form>
  </div>
</section>
<section class="card" aria-labelledby="keys-h">
  <h2 id="keys-h">API keys</h2>
  <div id="new-key" class="new-key" role="alert" hidden>
    <p><strong>New key</strong> — shown once; copy it now:</p>
    <p><code id="new-key-value"></code></p>
    <button type="button" data-reload>Done</button>
  </div>
  <form data-api="POST /admin/keys" data-then="show-key" class="row" aria-label="New key">
    <input type="hidden" name="tenant" value="{tid}">
    <label>Name <input name="name"></label>
    <label>Requests per minute <input name="rpm" type="number" min="1"></label>
    <label>Max concurrency <input name="max_concurrency" type="number" min="1"></label>
    <label>Budget (credits) <input name="budget.credits" type="number" min="0"></label>
    <label>Budget period <select name="budget.period">{_period_options("day")}</select></label>
    <button type="submit">Create key</button>
  </form>
  <div class="scroll"><table id="keys">
    <thead><tr><th scope="col">Key</th><th scope="col">Status</th><th scope="col">Models</th><th scope="col">RPM</th><th scope="col">Concurrency</th><th scope="col">Budget</th><th scope="col">Expires</th><th scope="col">Actions</th></tr></thead>
    <tbody>{key_rows}</tbody>
  </table></div>
</section>
{usage_section(f"/admin/usage?tenant={quote(tenant_id)}")}
<section class="card" aria-labelledby="ledger-h">
  <h2 id="ledger-h">Ledger</h2>
  <div class="scroll"><table id="ledger">{LEDGER_HEAD}<tbody>{_ledger_rows(entries)}</tbody></table></div>
  <p>{older}</p>
</section>"""
    return render(f"Tenant {tenant_id}", body, csrf=csrf, nav=_admin_nav(request, csrf))


# -- the tenant view --------------------------------------------------------------
async def to_tenant_view(_: web.Request) -> web.Response:
    return see_other("/console/tenant")


async def _tenant_session(request: web.Request) -> tuple[KeyRecord, str] | None:
    sessions = request.app[SESSIONS]
    session = await sessions.read(request, "tenant")
    if session is None:
        return None
    record = await request.app[CONSOLE_ACCOUNTS].get_key(session.subject)
    if record is None or not record.usable(time.time()):
        return None
    return record, await sessions.csrf_token(session)


async def tenant_home(request: web.Request) -> web.Response:
    auth = await _tenant_session(request)
    if auth is None:
        return login_page("/console/tenant/login", "API key", "key", home="/console/tenant")
    record, csrf = auth
    accounts = request.app[CONSOLE_ACCOUNTS]
    tenant = await accounts.tenant(record.tenant)
    keys = [await accounts.public_key(r) for r in await accounts.list_keys(record.tenant)]
    rows = "".join(
        f'<tr><th scope="row">{esc(k["name"] or "—")}<br><code>{esc(k["id"])}</code></th>'
        f'<td>{"active" if k["revoked_at"] is None else "revoked"}</td><td>{esc(_budget_text(k.get("budget")))}</td>'
        f'<td class="num">{esc(k["rpm"] or "—")}</td><td>{when(k["expires_at"])}</td></tr>'
        for k in keys
    )
    body = f"""
<section class="card summary" aria-labelledby="balance-h">
  <h2 id="balance-h">Tenant <span id="tenant-id">{esc(record.tenant)}</span></h2>
  <dl class="figures">
    <div><dt>Balance</dt><dd id="balance">{tenant['balance']}</dd></div>
    <div><dt>Reserved</dt><dd>{tenant['reserved']}</dd></div>
    <div><dt>Available</dt><dd>{tenant['available']}</dd></div>
  </dl>
</section>
<section class="card" aria-labelledby="keys-h">
  <h2 id="keys-h">Keys and budgets</h2>
  <div class="scroll"><table id="keys"><thead><tr><th scope="col">Key</th><th scope="col">Status</th><th scope="col">Budget</th><th scope="col">RPM</th><th scope="col">Expires</th></tr></thead>
  <tbody>{rows}</tbody></table></div>
</section>
{usage_section("/console/tenant/usage")}"""
    nav = logout_form("/console/tenant/logout", csrf)
    return render("Your usage", body, csrf=csrf, nav=nav, home="/console/tenant")


async def tenant_login(request: web.Request) -> web.Response:
    form = await read_form(request)
    if not same_origin(request):
        return login_page("/console/tenant/login", "API key", "key", "This form must be sent from the console itself.", 403, "/console/tenant")
    record = await request.app[CONSOLE_ACCOUNTS].lookup(str(form.get("key", "")).strip())
    if record is None or not record.usable(time.time()):
        return login_page("/console/tenant/login", "API key", "key", "That key is unknown, revoked or expired.", 401, "/console/tenant")
    response = see_other("/console/tenant")
    await request.app[SESSIONS].issue(response, request, "tenant", record.id)
    return response


async def tenant_logout(request: web.Request) -> web.Response:
    return await _logout(request, "tenant", TENANT_COOKIE, "/console/tenant")


async def tenant_usage(request: web.Request) -> web.Response:
    auth = await _tenant_session(request)
    if auth is None:
        raise ApiError(401, "Log in to the tenant console first.", code="invalid_api_key")
    return await usage_response(request.app[GATEWAY].store, auth[0].tenant, request.query)


def create_console_app(gateway: Gateway, *, admin: bool, tenant: bool) -> web.Application:
    """The console sub-app (routes relative to ``/console``): operator pages when `admin`, the tenant view when `tenant`."""
    app = web.Application()
    app[GATEWAY] = gateway
    token = gateway.settings.admin.token
    app[SESSIONS] = Sessions(gateway.store, token.get_secret_value() if admin and token else None)
    app[CONSOLE_ACCOUNTS] = Accounts(gateway.store, events=bool(gateway.settings.webhooks.url))
    app[TENANT_VIEW] = tenant
    routes = [web.get("/static/{name}", static)]
    if admin:
        routes += [
            web.get("/", home),
            web.post("/login", login),
            web.post("/logout", logout),
            web.get("/tenants/{tenant}", tenant_page),
        ]
    else:
        routes.append(web.get("/", to_tenant_view))
    if tenant:
        routes += [
            web.get("/tenant", tenant_home),
            web.post("/tenant/login", tenant_login),
            web.post("/tenant/logout", tenant_logout),
            web.get("/tenant/usage", tenant_usage),
        ]
    app.add_routes(routes)
    return app


__all__ = ["create_console_app", "Sessions"]
