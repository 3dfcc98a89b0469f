"""Server-side chat sessions keyed by X-Session-ID (unit, session store and scripts)."""

from middleware.sessions.unit import SessionsUnit

__all__ = ["SessionsUnit"]
