"""Client TLS contexts from `TLSSettings`: the provider hop and the script client of a ``rediss://`` store use these."""

from __future__ import annotations

import ssl

from proxy.core.settings import TLSSettings


def client_context(tls: TLSSettings) -> ssl.SSLContext:
    """The system's CAs or ``ca_file``; a client certificate (mTLS) when set; no verification only when asked."""
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    if not tls.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


__all__ = ["client_context"]
