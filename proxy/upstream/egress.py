"""How the provider hop leaves the network: the egress proxy and the TLS context of each upstream.

Both are decided once, at start-up, per upstream:

- `egress_proxy`: the upstream's own ``proxy`` setting, else (``trust_env``)
  the standard environment variables, as aiohttp's ``trust_env`` and httpx
  read them: ``HTTPS_PROXY`` for ``https://`` providers, ``HTTP_PROXY`` for
  ``http://`` ones (lowercase too), skipped when ``NO_PROXY`` matches the
  provider host;
- the TLS context, from ``tls.*`` by `proxy.core.tls.client_context` (a
  private CA, a client certificate for mTLS, verification off only on
  request); the store's ``rediss://`` script client uses it too.

A `Proxy` keeps its credentials out of ``repr``, logs and error messages: only
``host:port`` (`Proxy.where`) is ever shown.
"""

from __future__ import annotations

import base64
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from proxy.core.settings import UpstreamSettings


@dataclass(frozen=True)
class Proxy:
    """An HTTP forward proxy: where it is and the ``Proxy-Authorization`` it wants (if any)."""

    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)  # "Basic …": never shown

    @property
    def where(self) -> str:
        """``host:port``: what messages may say about the proxy."""
        return f"{self.host}:{self.port}"

    @classmethod
    def from_url(cls, url: str) -> Proxy:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("an egress proxy must be an http://[user:pass@]host:port URL")
        authorization = None
        if parts.username is not None:
            token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
            authorization = "Basic " + base64.b64encode(token).decode("ascii")
        return cls(parts.hostname, parts.port or 80, authorization)


def egress_proxy(settings: UpstreamSettings) -> Proxy | None:
    """The proxy this upstream's requests go through, or None for a direct connection."""
    if settings.proxy is not None:
        return Proxy.from_url(settings.proxy.get_secret_value())
    if not settings.trust_env:
        return None
    parts = urlsplit(settings.url)
    proxies = urllib.request.getproxies()  # the *_PROXY variables, either case
    url = proxies.get(parts.scheme)
    if not url or urllib.request.proxy_bypass(parts.hostname or ""):  # NO_PROXY
        return None
    return Proxy.from_url(url)


__all__ = ["Proxy", "egress_proxy"]
