"""
Protocol upgrades (RFC 9110 section 7.8) at the edge: which ones monedge
carries, how a WebSocket opening handshake (RFC 6455 section 4) is checked
on the way in, and how the upstream's answer is checked on the way out.

Only WebSocket is ever tunnelled. Any other C{Upgrade} (C{h2c} included) is
dropped with the other hop-by-hop headers and the request is proxied as a
plain one, as RFC 9110 allows a server to ignore an upgrade.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

from twisted.web.http_headers import Headers

from monedge.rules.errors import ProxyError
from monedge.twistedseam import rawHeaderTable

#: The GUID RFC 6455 appends to the key to form Sec-WebSocket-Accept.
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _tokens(headers: Headers, name: bytes) -> list[bytes]:
    tokens = []
    for value in headers.getRawHeaders(name, []):
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.append(token)
    return tokens


def wantsWebSocket(headers: Headers) -> bool:
    """
    Whether a request asks to switch to WebSocket: C{Connection} lists
    C{upgrade} and C{Upgrade} names C{websocket}. Anything else, an
    C{Upgrade: h2c} included, is an ordinary request.
    """
    if b"Upgrade" not in rawHeaderTable(headers):
        # The common case, answered with one lookup.
        return False
    return b"upgrade" in _tokens(headers, b"connection") and any(
        protocol.split(b"/")[0] == b"websocket"
        for protocol in _tokens(headers, b"upgrade")
    )


def checkWebSocketRequest(method: bytes, version: bytes, headers: Headers) -> bytes:
    """
    Check a WebSocket opening handshake before it goes anywhere.

    @return: its C{Sec-WebSocket-Key}.
    @raise ProxyError: C{bad_upgrade} (400) for a method other than GET, an
        HTTP version other than 1.1, or a missing or malformed key;
        C{websocket_version} (426) for a version other than 13.
    """
    if method != b"GET" or version != b"HTTP/1.1":
        raise ProxyError("bad_upgrade", "a WebSocket handshake must be an HTTP/1.1 GET")
    keys = headers.getRawHeaders(b"sec-websocket-key", [])
    if len(keys) != 1:
        raise ProxyError(
            "bad_upgrade", "a WebSocket handshake needs one Sec-WebSocket-Key"
        )
    key = keys[0].strip()
    try:
        decoded = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        decoded = b""
    if len(decoded) != 16:
        raise ProxyError("bad_upgrade", "Sec-WebSocket-Key must be 16 bytes in base64")
    versions = headers.getRawHeaders(b"sec-websocket-version", [])
    if [v.strip() for v in versions] != [b"13"]:
        raise ProxyError("websocket_version")
    return key


def acceptFor(key: bytes) -> bytes:
    """
    The C{Sec-WebSocket-Accept} value that answers C{key}.
    """
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def isWebSocketAccept(headers: Headers, key: bytes) -> bool:
    """
    Whether a 101 response's headers complete the handshake for C{key}:
    C{Upgrade: websocket}, C{Connection: upgrade} and the right
    C{Sec-WebSocket-Accept}.
    """
    accepts = headers.getRawHeaders(b"sec-websocket-accept", [])
    return (
        _tokens(headers, b"upgrade") == [b"websocket"]
        and b"upgrade" in _tokens(headers, b"connection")
        and [value.strip() for value in accepts] == [acceptFor(key)]
    )
