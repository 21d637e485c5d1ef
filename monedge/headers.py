"""
Header rules at the edge: hop-by-hop stripping both ways, the forwarding
headers monedge owns, and request ids.

Pure functions over L{twisted.web.http_headers.Headers}; repeated headers
are kept as repeated headers.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Iterable

from twisted.web.http_headers import Headers

#: Hop-by-hop headers (RFC 9110 7.6.1, plus the legacy and HTTP/2 ones).
#: C{content-length} and C{expect} are framing that monedge regenerates.
HOP_BY_HOP = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"http2-settings",
    ]
)

#: Headers the proxy sets itself on the way up; whatever the client sent
#: under these names is dropped (or, from trusted hops, merged).
_OWNED_UP = frozenset(
    [
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-request-id",
        b"forwarded",
    ]
)


_CANONICAL: dict[bytes, bytes] = {}


def canonicalName(name: bytes) -> bytes:
    """
    C{name} as Twisted's L{Headers} stores it (C{X-Forwarded-For}),
    validated as a token, and remembered (boundedly): header names are few
    and repeat.

    @raise twisted.web.http_headers.InvalidHeaderName: for a non-token.
    """
    canonical = _CANONICAL.get(name)
    if canonical is None:
        canonical = next(iter(Headers({name: [b""]}).getAllRawHeaders()))[0]
        if len(_CANONICAL) < 10_000:
            _CANONICAL[name] = canonical
    return canonical


_DROP_UP = frozenset(map(canonicalName, HOP_BY_HOP | _OWNED_UP))
_DROP_DOWN = frozenset(map(canonicalName, HOP_BY_HOP))

_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}\Z")
_PORT = re.compile(rb"\d{1,5}\Z")


def connectionTokens(values: Iterable[bytes] | None) -> frozenset[bytes]:
    """
    The lowercased header names listed in C{Connection} header values.
    """
    if not values:
        return frozenset()
    tokens = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


#: Request ids come from a generator of their own, seeded from the OS's
#: random source at start and again in a forked child: ids must be unique,
#: not secret, and a system call per request for them cost more than
#: routing the request.
_ids = random.Random(os.urandom(32))
os.register_at_fork(after_in_child=lambda: _ids.seed(os.urandom(32)))


def newRequestId() -> bytes:
    """
    A fresh request id: 32 hex digits (128 random bits).
    """
    return b"%032x" % _ids.getrandbits(128)


def requestIdFor(incoming: Headers, trustedHops: int) -> bytes:
    """
    The request's id: a valid C{X-Request-Id} from a trusted hop, else a
    new one.  With no trusted hops the client's value is never used.
    """
    if trustedHops > 0:
        values = incoming.getRawHeaders(b"x-request-id")
        if values and len(values) == 1 and _REQUEST_ID.match(values[0]):
            return values[0]
    return newRequestId()


def forwardedFor(incoming: Headers, peer: bytes, trustedHops: int) -> bytes:
    """
    The C{X-Forwarded-For} to send upstream: the last C{trustedHops}
    entries the client side sent (those added by hops we trust), then the
    peer's address.  With no trusted hops, just the peer.
    """
    if trustedHops <= 0:
        return peer
    values = incoming.getRawHeaders(b"x-forwarded-for")
    entries: list[bytes] = []
    if values:
        for value in values:
            entries.extend(e.strip() for e in value.split(b",") if e.strip())
    entries = entries[-trustedHops:]
    entries.append(peer)
    return b", ".join(entries)


def upstreamHeaders(
    incoming: Headers,
    *,
    host: bytes | None,
    peer: bytes,
    proto: bytes,
    port: bytes,
    prefix: bytes | None,
    requestId: bytes,
    trustedHops: int,
) -> Headers:
    """
    The headers to send upstream for a client request.

    @param host: the client's Host, forwarded as is (one value).
    @param peer: the client's address.
    @param proto: C{http} or C{https}, from the listener.
    @param port: the listener's port.
    @param prefix: C{/<name>} when the prefix is stripped, else L{None}.
    """
    tokens = connectionTokens(incoming._rawHeaders.get(b"Connection"))
    out = Headers()
    # Names from Twisted's parser are canonical and values already refused
    # CR, LF and NUL, so they are copied into the new table directly
    # instead of being re-validated one by one: this runs per request.
    raw = out._rawHeaders
    for name, values in incoming.getAllRawHeaders():
        if name in _DROP_UP or (tokens and name.lower() in tokens):
            continue
        raw[name] = list(values)
    if host is not None:
        raw[b"Host"] = [host]
    raw[b"X-Forwarded-For"] = [forwardedFor(incoming, peer, trustedHops)]
    if trustedHops > 0:
        sentProto = incoming.getRawHeaders(b"x-forwarded-proto")
        if sentProto and len(sentProto) == 1 and sentProto[0] in (b"http", b"https"):
            proto = sentProto[0]
        sentPort = incoming.getRawHeaders(b"x-forwarded-port")
        if sentPort and len(sentPort) == 1 and _PORT.match(sentPort[0]):
            port = sentPort[0]
    raw[b"X-Forwarded-Proto"] = [proto]
    if host is not None:
        raw[b"X-Forwarded-Host"] = [host]
    raw[b"X-Forwarded-Port"] = [port]
    if prefix is not None:
        raw[b"X-Forwarded-Prefix"] = [prefix]
    raw[b"X-Request-Id"] = [requestId]
    return out


def downstreamHeaders(
    upstream: Headers, connection: Iterable[bytes] | None, out: Headers
) -> None:
    """
    Copy an upstream response's headers into C{out}, dropping hop-by-hop
    headers and every header the upstream named in C{Connection}.
    (Twisted's client keeps a body's C{Content-Length} to itself, except
    for the entity header of a HEAD response, which passes.)

    @param connection: the upstream's C{Connection} header values.
    """
    tokens = connectionTokens(connection)
    # Both clients' response Headers hold canonical names and values already
    # free of CR, LF and NUL (they were added through Headers or checked on
    # the way in), so they are copied without re-validation: this runs per
    # response.
    raw = out._rawHeaders
    for name, values in upstream.getAllRawHeaders():
        if name in _DROP_DOWN or (tokens and name.lower() in tokens):
            continue
        raw[name] = list(values)
