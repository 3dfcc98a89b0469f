"""Reading a request body: the size limit, the read timeout, and ``Content-Encoding``.

The gateway's runners turn aiohttp's own request decompression off
(``auto_decompress=False``, see `RUNNER_OPTIONS`): aiohttp answers some bodies
that do not decompress with a plain-text 400 from inside its HTTP parser, where
no handler can give it the OpenAI error shape. Decoding here instead makes
every outcome an OpenAI-shaped answer: a body that does not decompress is 400
``invalid_body``, an encoding the gateway cannot decode is 415, and
``server.max_body_bytes`` bounds the compressed bytes read *and* the
decompressed bytes produced, so a small compressed bomb is a 413 without
ever being inflated past the limit.
"""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

from aiohttp import web

from proxy.core.errors import ClientError, InvalidRequest, RequestTooLarge

try:
    import brotli
except ImportError:  # pragma: no cover - a dependency; without it `br` is a 415
    brotli = None

# Options for every web.AppRunner/TestServer that serves the gateway app.
RUNNER_OPTIONS: dict[str, Any] = {"auto_decompress": False}

_DECODED = web.RequestKey("decoded_body", bytes)
_ZLIB_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}


def too_large(limit: int) -> RequestTooLarge:
    return RequestTooLarge(f"The request body is larger than {limit} bytes.")


def undecodable(encoding: str) -> InvalidRequest:
    return InvalidRequest(
        f"The request body could not be decompressed (Content-Encoding: {encoding}); "
        "send it uncompressed or compressed as declared.",
        code="invalid_body",
    )


async def read_body(request: web.Request, gateway: Any) -> bytes:
    """The whole body, decompressed; every failure is an OpenAI-shaped 4xx. Reads once (cached)."""
    limit = gateway.settings.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    try:
        if request.content.is_eof():  # already buffered (the usual case): no timer needed
            raw = await request.read()
        else:
            async with asyncio.timeout(gateway.settings.server.client_read_timeout):
                raw = await request.read()
    except TimeoutError:
        raise ClientError(408, "The request body arrived too slowly.", code="request_timeout") from None
    except web.HTTPRequestEntityTooLarge:
        raise too_large(limit) from None
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    # A runner that left aiohttp's decompression on has decoded the body already.
    if encoding in ("", "identity") or getattr(request.content, "total_compressed_bytes", None) is not None:
        return raw
    decoded = request.get(_DECODED)
    if decoded is None:
        decoded = request[_DECODED] = decompress(raw, encoding, limit)
    return decoded


def decompress(raw: bytes, encoding: str, limit: int) -> bytes:
    """`raw` decoded per `encoding`, producing at most `limit` bytes."""
    if not raw:
        return raw
    if encoding in _ZLIB_WBITS:
        return _inflate(raw, encoding, limit)
    if encoding == "br" and brotli is not None:
        return _unbrotli(raw, encoding, limit)
    supported = "gzip, deflate, br" if brotli is not None else "gzip, deflate"
    raise ClientError(
        415,
        f"Content-Encoding `{encoding}` is not supported; send the body uncompressed or as {supported}.",
        code="unsupported_content_encoding",
    )


def _inflate(raw: bytes, encoding: str, limit: int) -> bytes:
    wbits = _ZLIB_WBITS[encoding]
    if wbits == 15 and not _zlib_header(raw):
        wbits = -15  # "deflate" sent as a raw deflate stream, without the zlib wrapper (common in practice)
    out = bytearray()
    data = raw
    try:
        while data:
            inflater = zlib.decompressobj(wbits)
            out += inflater.decompress(data, limit + 1 - len(out))
            if len(out) > limit:
                raise too_large(limit)
            if not inflater.eof:
                raise undecodable(encoding)  # truncated
            # gzip allows several members one after another; anything else after the end is garbage.
            data = inflater.unused_data
            if data and wbits != 31:
                raise undecodable(encoding)
    except zlib.error:
        raise undecodable(encoding) from None
    return bytes(out)


def _zlib_header(raw: bytes) -> bool:
    """RFC 1950: compression method 8 and a header checksum divisible by 31."""
    return len(raw) >= 2 and raw[0] & 0x0F == 8 and ((raw[0] << 8) | raw[1]) % 31 == 0


def _unbrotli(raw: bytes, encoding: str, limit: int) -> bytes:
    decoder = brotli.Decompressor()
    try:
        out = decoder.process(raw, output_buffer_limit=limit + 1)
    except brotli.error:
        raise undecodable(encoding) from None
    if len(out) > limit:
        raise too_large(limit)
    if not decoder.is_finished():
        raise undecodable(encoding)
    return out
