"""The application factory: one aiohttp app with the core routes, unit routes and admin."""

from __future__ import annotations

from aiohttp import web

from proxy.core.gateway import GATEWAY, Gateway
from proxy.web.middlewares import gateway_middleware, stamp_request_id, stamp_request_id_with
from proxy.web.routes import core_routes
from proxy.core.settings import Settings
from proxy.store.store import Store


def create_app(settings: Settings, store: Store | None = None) -> web.Application:
    """Build the gateway application; nothing connects until start-up."""
    gateway = Gateway(settings, store)
    # client_max_size makes aiohttp stop reading at the limit, so an oversized
    # body without a Content-Length is refused before it is read whole.
    middlewares: list = [gateway_middleware]
    if gateway.tracing is not None:
        from proxy.web.tracing import tracing_middleware

        middlewares.insert(0, tracing_middleware(gateway.tracing))  # outermost: the span covers error rendering too
    app = web.Application(middlewares=middlewares, client_max_size=settings.server.max_body_bytes)
    app[GATEWAY] = gateway
    app.on_response_prepare.append(
        stamp_request_id_with(gateway.request_id_headers) if gateway.request_id_headers else stamp_request_id
    )
    app.add_routes(core_routes(gateway))
    for unit in gateway.units:
        app.add_routes(unit.routes())
    from proxy.admin.console import create_console_app

    admin_here = settings.admin.token is not None and settings.admin.port is None
    if admin_here:
        from proxy.admin.api import create_admin_app

        app.add_subapp("/admin", create_admin_app(gateway))
    # The console: operator pages beside the admin API, the tenant view always on the client port.
    app.add_subapp("/console", create_console_app(gateway, admin=admin_here, tenant=True))

    from proxy.admin.housekeeping import Housekeeper

    housekeeper = Housekeeper(gateway)  # webhook delivery and ledger retention, one replica at a time

    async def start(_: web.Application) -> None:
        await gateway.start()
        await housekeeper.start()

    async def stop(_: web.Application) -> None:
        await housekeeper.close()
        await gateway.close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    return app
