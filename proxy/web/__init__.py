"""The HTTP side: app factory, edge middlewares (request id, errors, access log), routes, relay, OpenAPI, the server process."""
