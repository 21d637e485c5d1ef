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

from monedge.rules.trust import Trust
from monedge.twistedseam import rawHeaderTable

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


#: Request headers through which frameworks, CDNs and load balancers take
#: the client's address, scheme, host or port, override the URL or the
#: method, or carry an identity established in front of them.  A client can
#: write any of them: none reaches an upstream unless it comes from a trusted
#: peer and is named with C{--trusted-header} (docs/security.md lists where
#: each comes from).  C{X-Forwarded-For}, C{-Proto}, C{-Port}, C{-Host},
#: C{-Prefix}, C{X-Request-Id} and C{Forwarded} are monedge's own
#: (L{_OWNED_UP}); C{X-Real-IP} is set by monedge unless turned off.
CLIENT_CONTROLLED: dict[str, tuple[bytes, ...]] = {
    "client address": (
        b"x-real-ip",
        b"true-client-ip",
        b"cf-connecting-ip",
        b"cf-connecting-ipv6",
        b"cf-pseudo-ipv4",
        b"fastly-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"client-ip",
        b"x-originating-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-envoy-external-address",
        b"x-azure-clientip",
        b"x-azure-socketip",
        b"x-appengine-user-ip",
        b"x-original-forwarded-for",
        b"forwarded-for",
        b"x-forwarded",
        b"x-proxyuser-ip",
    ),
    "scheme, host and port": (
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
        b"x-forwarded-protocol",
        b"front-end-https",
        b"x-url-scheme",
        b"x-scheme",
        b"x-arr-ssl",
        b"cf-visitor",
        b"x-forwarded-server",
        b"x-host",
        b"x-original-host",
        b"x-script-name",
    ),
    "URL and method overrides": (
        b"x-original-url",
        b"x-rewrite-url",
        b"x-original-uri",
        b"x-forwarded-uri",
        b"x-forwarded-path",
        b"x-envoy-original-path",
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-forwarded-method",
        b"x-original-method",
    ),
    "client certificates and identities": (
        b"x-forwarded-client-cert",
        b"x-forwarded-tls-client-cert",
        b"x-forwarded-tls-client-cert-info",
        b"x-ssl-client-cert",
        b"x-ssl-client-verify",
        b"x-ssl-client-dn",
        b"x-ssl-client-s-dn",
        b"ssl-client-cert",
        b"ssl-client-verify",
        b"x-client-cert",
        b"x-client-verify",
        b"x-arr-clientcert",
        b"x-amzn-mtls-clientcert",
        b"x-amzn-oidc-data",
        b"x-amzn-oidc-identity",
        b"x-amzn-oidc-accesstoken",
        b"x-forwarded-user",
        b"x-forwarded-email",
        b"x-forwarded-preferred-username",
        b"x-forwarded-groups",
        b"x-forwarded-access-token",
        b"x-auth-request-user",
        b"x-auth-request-email",
        b"x-auth-request-groups",
        b"x-auth-request-preferred-username",
        b"x-auth-request-access-token",
        b"x-remote-user",
        b"remote-user",
        b"x-webauth-user",
        b"x-ms-client-principal",
        b"x-ms-client-principal-id",
        b"x-ms-client-principal-name",
        b"x-goog-authenticated-user-email",
        b"x-goog-authenticated-user-id",
        b"x-goog-iap-jwt-assertion",
        b"cf-access-jwt-assertion",
        b"cf-access-authenticated-user-email",
    ),
}

#: Every member of L{CLIENT_CONTROLLED}, lowercased.
CLIENT_CONTROLLED_NAMES = frozenset(
    name for family in CLIENT_CONTROLLED.values() for name in family
)

#: Name prefixes of client-controlled headers: Envoy's own control headers
#: (retries, timeouts, routing), which an Envoy sidecar in front of an
#: upstream would obey.
CLIENT_CONTROLLED_PREFIXES = (b"x-envoy-",)


def requestIdFor(incoming: Headers, trusted: bool) -> bytes:
    """
    The request's id: a valid C{X-Request-Id} from a trusted peer, else a
    new one.  From an untrusted peer the client's value is never used.
    """
    if trusted:
        values = incoming.getRawHeaders(b"x-request-id")
        if values and len(values) == 1 and _REQUEST_ID.match(values[0]):
            return values[0]
    return newRequestId()


#: No trusted hop.
NO_TRUST = Trust()


class ForwardingRules:
    """
    What monedge does with forwarding and identity headers on the way
    upstream, from the options: C{--trusted-hops}, C{--trusted-proxies},
    C{--trusted-header}, C{--identity-header} and C{--no-real-ip}.

    The sets of names to drop are worked out once, here: the per-request
    work is one set lookup per header, as before.
    """

    def __init__(
        self,
        trust: Trust = NO_TRUST,
        *,
        identityHeaders: Iterable[str] = (),
        trustedHeaders: Iterable[str] = (),
        realIp: bool = True,
    ) -> None:
        self.trust = trust
        self.realIp = realIp
        self.identityHeaders = tuple(sorted({n.lower() for n in identityHeaders}))
        self.trustedHeaders = tuple(sorted({n.lower() for n in trustedHeaders}))
        identity = frozenset(n.encode("ascii") for n in self.identityHeaders)
        passed = frozenset(n.encode("ascii") for n in self.trustedHeaders)
        # X-Real-IP is a member: with realIp on, monedge's own value
        # replaces whatever passed (and tap refuses it as a trusted header).
        untrusted = _OWNED_UP | HOP_BY_HOP | identity | CLIENT_CONTROLLED_NAMES
        trusted = _OWNED_UP | HOP_BY_HOP | identity | (CLIENT_CONTROLLED_NAMES - passed)
        self._dropUntrusted = frozenset(map(canonicalName, untrusted))
        self._dropTrusted = frozenset(map(canonicalName, trusted))
        self._passed = passed

    def isTrusted(self, peer: bytes) -> bool:
        """
        Whether forwarding headers from C{peer} are believed.
        """
        return self.trust.trusts(peer)

    def forwardedFor(self, incoming: Headers, peer: bytes) -> bytes:
        """
        The C{X-Forwarded-For} to send upstream: the client as resolved,
        the trusted proxies after it, then the peer.
        """
        return self.forwardedFrom(
            rawHeaderTable(incoming).get(b"X-Forwarded-For"), peer
        )

    def forwardedFrom(self, sent: Iterable[bytes] | None, peer: bytes) -> bytes:
        """
        L{forwardedFor}, from the C{X-Forwarded-For} values the peer sent.
        """
        return b", ".join(self.trust.chain(sent, peer))

    def dropped(self, trusted: bool) -> frozenset[bytes]:
        """
        The canonical names never copied upstream from a peer trusted or
        not.
        """
        return self._dropTrusted if trusted else self._dropUntrusted

    def droppedByPrefix(self, lowered: bytes, trusted: bool) -> bool:
        """
        Whether a header is dropped for its name's prefix.
        """
        if not lowered.startswith(CLIENT_CONTROLLED_PREFIXES):
            return False
        return not (trusted and lowered in self._passed)


#: No trusted hop, every default.
DEFAULT_RULES = ForwardingRules()


def upstreamHeaders(
    incoming: Headers,
    *,
    host: bytes | None,
    peer: bytes,
    proto: bytes,
    port: bytes,
    prefix: bytes | None,
    requestId: bytes,
    rules: ForwardingRules = DEFAULT_RULES,
) -> Headers:
    """
    The headers to send upstream for a client request.

    @param host: the client's Host, forwarded as is (one value).
    @param peer: the client's address.
    @param proto: C{http} or C{https}, from the listener.
    @param port: the listener's port.
    @param prefix: C{/<name>} when the prefix is stripped, else L{None}.
    @param rules: what is trusted, stripped and set.
    """
    table = rawHeaderTable(incoming)
    tokens = connectionTokens(table.get(b"Connection"))
    trusted = rules.isTrusted(peer)
    drop = rules.dropped(trusted)
    out = Headers()
    # Names from Twisted's parser are canonical and values already refused
    # CR, LF and NUL, so they are copied into the new table directly
    # instead of being re-validated one by one: this runs per request.
    raw = rawHeaderTable(out)
    for name, values in incoming.getAllRawHeaders():
        if name in drop:
            continue
        # Names are canonical (X-Envoy-...), so the prefix is matched as
        # such, without a lowered copy: this runs per header.
        if name.startswith(b"X-Envoy-") and rules.droppedByPrefix(
            name.lower(), trusted
        ):
            continue
        if tokens and name.lower() in tokens:
            continue
        raw[name] = list(values)
    if host is not None:
        raw[b"Host"] = [host]
    forwarded = rules.forwardedFrom(table.get(b"X-Forwarded-For"), peer)
    raw[b"X-Forwarded-For"] = [forwarded]
    if rules.realIp:
        raw[b"X-Real-Ip"] = [forwarded.partition(b",")[0]]
    if trusted:
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
) -> dict[bytes, list[bytes]]:
    """
    Copy an upstream response's headers into C{out}, dropping hop-by-hop
    headers and every header the upstream named in C{Connection}.
    (Twisted's client keeps a body's C{Content-Length} to itself, except
    for the entity header of a HEAD response, which passes.)

    @param connection: the upstream's C{Connection} header values.
    @return: C{out}'s table (L{monedge.twistedseam.rawHeaderTable}), for
        the caller to set its own values in.
    """
    tokens = connectionTokens(connection)
    # Both clients' response Headers hold canonical names and values already
    # free of CR, LF and NUL (they were added through Headers or checked on
    # the way in), so they are copied without re-validation: this runs per
    # response.
    raw = rawHeaderTable(out)
    for name, values in upstream.getAllRawHeaders():
        if name in _DROP_DOWN or (tokens and name.lower() in tokens):
            continue
        raw[name] = list(values)
    return raw


#: Fields that never cross in a trailer section, either way (RFC 9110,
#: 6.5.1): hop-by-hop fields, framing, routing, and the fields monedge
#: itself sets on a request.
_NOT_TRAILERS = (
    HOP_BY_HOP
    | _OWNED_UP
    | frozenset(
        [
            b"content-encoding",
            b"content-range",
            b"content-type",
            b"authorization",
            b"cookie",
            b"set-cookie",
        ]
    )
)

_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def trailerFields(
    fields: Iterable[tuple[bytes, bytes]], underscores: str = "drop"
) -> list[tuple[bytes, bytes]] | None:
    """
    The trailer fields that may cross, from C{fields} as a peer sent them:
    names canonical, values without surrounding whitespace; a field that
    may not be a trailer, or whose name or value is malformed, is dropped.

    @param underscores: what to do with a name with an underscore, as
        C{--underscore-headers} says: C{"drop"}, C{"reject"} or
        C{"allow"}.
    @return: the fields, or L{None} if C{underscores} is C{"reject"} and a
        name has one.
    """
    kept: list[tuple[bytes, bytes]] = []
    for name, value in fields:
        lowered = name.lower()
        if lowered in _NOT_TRAILERS:
            continue
        if b"_" in name and underscores != "allow":
            if underscores == "reject":
                return None
            continue
        value = value.strip(b" \t")
        if _FIELD_VALUE_BAD.search(value) is not None:
            continue
        try:
            kept.append((canonicalName(name), value))
        except ValueError:
            continue
    return kept
