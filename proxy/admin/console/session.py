"""Console sessions: signed, http-only, same-site cookies, and the CSRF token that goes with them.

A cookie is ``<kind>.<subject>.<expires>.<signature>``: kind ``admin`` (subject
``-``) or ``tenant`` (subject: the key id that logged in). The signature is an
HMAC-SHA256 with a random secret kept in Redis (``console_secret``, created
once, shared by every replica), over the fields plus, for admin sessions, a
hash of the admin token, so changing the token ends every admin session.
Tenant sessions are re-checked against the key record on every request, so
revoking or expiring the key ends them. Logging out ends the cookie itself:
its digest is kept in Redis (``console_ended:<digest>``) until it would have
expired, and a cookie found there is no session, whoever presents it.

Cookies are ``HttpOnly`` (scripts cannot read them), ``SameSite=Strict``
(other sites' pages cannot make the browser send them) and ``Secure`` when
the request came over TLS. On top of that every state-changing request made
with a session must carry ``X-CSRF-Token`` (an HMAC of the cookie, embedded
in the page), and the login forms check ``Origin``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from aiohttp import web

from proxy.store.store import Store

ADMIN_COOKIE = "sov_admin"
TENANT_COOKIE = "sov_tenant"
SESSION_SECONDS = 12 * 3600
CSRF_HEADER = "X-CSRF-Token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True, slots=True)
class Session:
    kind: str
    subject: str
    cookie: str


class Sessions:
    """Issues and checks console cookies for one store (and admin token, if any)."""

    def __init__(self, store: Store, admin_token: str | None) -> None:
        self.store = store
        self.admin_bind = hashlib.sha256(admin_token.encode()).hexdigest() if admin_token else None
        self._secret: bytes | None = None

    async def secret(self) -> bytes:
        if self._secret is None:
            key = self.store.global_key("console_secret")
            await self.store.redis.set(key, secrets.token_hex(32), nx=True)
            self._secret = bytes.fromhex(await self.store.redis.get(key))
        return self._secret

    def _sign(self, secret: bytes, payload: str, kind: str) -> str:
        bind = (self.admin_bind or "") if kind == "admin" else ""
        return hmac.new(secret, f"{payload}|{bind}".encode(), hashlib.sha256).hexdigest()

    async def issue(self, response: web.StreamResponse, request: web.Request, kind: str, subject: str) -> None:
        payload = f"{kind}.{subject}.{int(time.time()) + SESSION_SECONDS}"
        value = f"{payload}.{self._sign(await self.secret(), payload, kind)}"
        response.set_cookie(
            ADMIN_COOKIE if kind == "admin" else TENANT_COOKIE, value, max_age=SESSION_SECONDS, path="/",
            httponly=True, samesite="Strict", secure=request.secure,
        )

    async def read(self, request: web.Request, kind: str) -> Session | None:
        """The valid session of this kind on the request, or None."""
        value = request.cookies.get(ADMIN_COOKIE if kind == "admin" else TENANT_COOKIE)
        if not value or value.count(".") != 3:
            return None
        payload, _, signature = value.rpartition(".")
        got_kind, subject, expires = payload.split(".")
        if got_kind != kind or (kind == "admin" and self.admin_bind is None) or not _unix_seconds(expires) or int(expires) < time.time():
            return None
        if not hmac.compare_digest(signature, self._sign(await self.secret(), payload, kind)):
            return None
        if await self.store.redis.exists(self._ended_key(value)):
            return None  # logged out
        return Session(kind, subject, value)

    async def end(self, session: Session) -> None:
        """Log out: refuse this cookie from now on (until it would have expired anyway), on every replica."""
        seconds = int(session.cookie.split(".")[2]) - int(time.time())
        if seconds > 0:
            await self.store.redis.set(self._ended_key(session.cookie), "1", ex=seconds)

    def _ended_key(self, cookie: str) -> str:
        return self.store.global_key("console_ended", hashlib.sha256(cookie.encode()).hexdigest())

    async def csrf_token(self, session: Session) -> str:
        return hmac.new(await self.secret(), f"csrf|{session.cookie}".encode(), hashlib.sha256).hexdigest()[:40]

    async def csrf_ok(self, request: web.Request, session: Session, presented: str | None = None) -> bool:
        """Safe methods pass; others need the token in `X-CSRF-Token` (or `presented`, from a form field)."""
        if request.method in SAFE_METHODS:
            return True
        token: str = presented or request.headers.get(CSRF_HEADER) or ""
        return bool(token) and hmac.compare_digest(token, await self.csrf_token(session))


def same_origin(request: web.Request) -> bool:
    """A form post from one of our own pages (browsers send Origin on POST); absent Origin is a non-browser client."""
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        return origin is None
    return origin.split("://", 1)[-1] == request.host


def _unix_seconds(text: str) -> bool:
    """Whether `text` is what `int()` reads as unix seconds: ASCII digits (str.isdigit also takes "¹"), at most 12."""
    return text.isascii() and text.isdigit() and len(text) <= 12
