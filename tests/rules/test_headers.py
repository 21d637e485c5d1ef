"""
Tests for L{monedge.rules.headers}: hop-by-hop stripping both ways, the
forwarding headers monedge owns, and request ids.
"""

from __future__ import annotations

import re

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from monedge.rules.headers import (
    CLIENT_CONTROLLED,
    CLIENT_CONTROLLED_NAMES,
    HOP_BY_HOP,
    ForwardingRules,
    connectionTokens,
    downstreamHeaders,
    newRequestId,
    requestIdFor,
    trailerFields,
    upstreamHeaders,
)
from monedge.rules.trust import Trust

PEER = b"192.0.2.7"
REQUEST_ID = b"0123456789abcdef0123456789abcdef"
_HEX32 = re.compile(rb"[0-9a-f]{32}\Z")


def headers(*pairs: tuple[bytes, bytes]) -> Headers:
    """
    Headers holding C{pairs}, in order, repeated names kept.
    """
    result = Headers()
    for name, value in pairs:
        result.addRawHeader(name, value)
    return result


def names(h: Headers) -> set[bytes]:
    """
    The lowercased names in C{h}.
    """
    return {name.lower() for name, _ in h.getAllRawHeaders()}


def upstream(
    incoming: Headers,
    *,
    host: bytes | None = b"api.example.com",
    proto: bytes = b"http",
    port: bytes = b"30080",
    prefix: bytes | None = b"/echo",
    requestId: bytes = REQUEST_ID,
    trustedHops: int = 0,
    rules: ForwardingRules | None = None,
) -> Headers:
    """
    L{upstreamHeaders} for C{incoming}, with usual values for the rest.
    """
    return upstreamHeaders(
        incoming,
        host=host,
        peer=PEER,
        proto=proto,
        port=port,
        prefix=prefix,
        requestId=requestId,
        rules=rules if rules is not None else ForwardingRules(Trust(trustedHops)),
    )


class ConnectionTokensTests(SynchronousTestCase):
    """
    L{connectionTokens} reads the names a C{Connection} header lists.
    """

    def test_none(self) -> None:
        """
        No header, or no values, list nothing.
        """
        self.assertEqual(connectionTokens(None), frozenset())
        self.assertEqual(connectionTokens([]), frozenset())
        self.assertEqual(connectionTokens([b"", b" , ,"]), frozenset())

    def test_tokens(self) -> None:
        """
        Tokens from every value, split on commas, trimmed of spaces and
        tabs, and lowercased.
        """
        self.assertEqual(
            connectionTokens([b"Keep-Alive, X-Foo", b"\tx-BAR\t ,, close "]),
            frozenset([b"keep-alive", b"x-foo", b"x-bar", b"close"]),
        )


class UpstreamHopByHopTests(SynchronousTestCase):
    """
    L{upstreamHeaders} strips hop-by-hop headers and keeps the rest.
    """

    def test_hopByHopStripped(self) -> None:
        """
        Every hop-by-hop header (Connection, Keep-Alive, Proxy-Connection,
        Proxy-Authenticate, Proxy-Authorization, TE, Trailer,
        Transfer-Encoding, Upgrade, HTTP2-Settings) is stripped, in any
        case, and end-to-end headers are kept.
        """
        incoming = headers(
            (b"Connection", b"Upgrade, HTTP2-Settings"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"PROXY-AUTHORIZATION", b"Basic Zm9vOmJhcg=="),
            (b"TE", b"trailers"),
            (b"Trailer", b"X-Checksum"),
            (b"Transfer-Encoding", b"chunked"),
            (b"upgrade", b"h2c"),
            (b"HTTP2-Settings", b"AAMAAABkAAQAAP__"),
            (b"Accept", b"*/*"),
            (b"Authorization", b"Bearer t"),
            (b"User-Agent", b"curl/8"),
        )
        out = upstream(incoming)
        self.assertEqual(names(out) & HOP_BY_HOP, set())
        self.assertEqual(out.getRawHeaders(b"accept"), [b"*/*"])
        self.assertEqual(out.getRawHeaders(b"authorization"), [b"Bearer t"])
        self.assertEqual(out.getRawHeaders(b"user-agent"), [b"curl/8"])
        self.assertEqual(
            HOP_BY_HOP,
            frozenset(
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
            ),
        )

    def test_connectionNamedStripped(self) -> None:
        """
        Every header named in any C{Connection} header is stripped: several
        Connection headers, comma lists with empty items, odd case and
        whitespace; headers not named are kept.
        """
        incoming = headers(
            (b"Connection", b"X-Foo, , x-BAR"),
            (b"connection", b"  X-Baz\t,Keep-Alive  "),
            (b"X-Foo", b"1"),
            (b"x-bar", b"2"),
            (b"X-BAZ", b"3"),
            (b"X-Qux", b"4"),
        )
        out = upstream(incoming)
        for name in [b"x-foo", b"x-bar", b"x-baz", b"connection"]:
            self.assertIsNone(out.getRawHeaders(name), name)
        self.assertEqual(out.getRawHeaders(b"x-qux"), [b"4"])

    def test_connectionCannotRemoveOwned(self) -> None:
        """
        Naming monedge's own headers in C{Connection} does not stop monedge
        from setting them.
        """
        incoming = headers(
            (b"Connection", b"host, x-request-id, x-forwarded-for, x-forwarded-prefix"),
        )
        out = upstream(incoming)
        self.assertEqual(out.getRawHeaders(b"host"), [b"api.example.com"])
        self.assertEqual(out.getRawHeaders(b"x-request-id"), [REQUEST_ID])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [PEER])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-prefix"), [b"/echo"])

    def test_repeatedPreserved(self) -> None:
        """
        Repeated headers are forwarded as repeated headers, in order.
        """
        incoming = headers(
            (b"Cookie", b"a=1"),
            (b"Accept", b"text/html"),
            (b"cookie", b"b=2"),
            (b"Accept", b"*/*"),
            (b"COOKIE", b"c=3"),
        )
        out = upstream(incoming)
        self.assertEqual(out.getRawHeaders(b"cookie"), [b"a=1", b"b=2", b"c=3"])
        self.assertEqual(out.getRawHeaders(b"accept"), [b"text/html", b"*/*"])

    def test_framingAndForwardedDropped(self) -> None:
        """
        Content-Length and Expect (framing monedge regenerates) and the
        RFC 7239 C{Forwarded} header are not passed on.
        """
        incoming = headers(
            (b"Content-Length", b"5"),
            (b"Expect", b"100-continue"),
            (b"Forwarded", b"for=10.0.0.1;proto=https"),
            (b"Content-Type", b"text/plain"),
        )
        out = upstream(incoming, trustedHops=2)
        for name in [b"content-length", b"expect", b"forwarded"]:
            self.assertIsNone(out.getRawHeaders(name), name)
        self.assertEqual(out.getRawHeaders(b"content-type"), [b"text/plain"])

    def test_incomingUnchanged(self) -> None:
        """
        The client's headers are not modified.
        """
        incoming = headers(
            (b"Connection", b"x-foo"),
            (b"X-Foo", b"1"),
            (b"X-Forwarded-For", b"10.0.0.1"),
        )
        upstream(incoming)
        self.assertEqual(incoming.getRawHeaders(b"x-foo"), [b"1"])
        self.assertEqual(incoming.getRawHeaders(b"x-forwarded-for"), [b"10.0.0.1"])
        self.assertEqual(incoming.getRawHeaders(b"connection"), [b"x-foo"])


class UpstreamForwardingTests(SynchronousTestCase):
    """
    The forwarding headers monedge sets on the way up.
    """

    def test_forwardedForUntrusted(self) -> None:
        """
        With no trusted hops, X-Forwarded-For is only the peer, whatever
        the client sent.
        """
        for sent in [
            [],
            [b"10.0.0.1"],
            [b"10.0.0.1, 10.0.0.2", b"10.0.0.3"],
        ]:
            incoming = headers(*[(b"X-Forwarded-For", v) for v in sent])
            out = upstream(incoming, trustedHops=0)
            self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [PEER], sent)

    def test_forwardedForTrusted(self) -> None:
        """
        With N trusted hops, X-Forwarded-For is the last N entries the
        client side sent (across repeated headers, trimmed, empty entries
        skipped), then the peer, as one header.
        """
        incoming = headers(
            (b"X-Forwarded-For", b"1.1.1.1,  2.2.2.2"),
            (b"x-forwarded-for", b" , 3.3.3.3 "),
        )
        for hops, expected in [
            (1, b"3.3.3.3, " + PEER),
            (2, b"2.2.2.2, 3.3.3.3, " + PEER),
            (3, b"1.1.1.1, 2.2.2.2, 3.3.3.3, " + PEER),
            (10, b"1.1.1.1, 2.2.2.2, 3.3.3.3, " + PEER),
        ]:
            out = upstream(incoming, trustedHops=hops)
            self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [expected], hops)

    def test_forwardedForTrustedNoneSent(self) -> None:
        """
        With trusted hops but no X-Forwarded-For sent, it is just the peer.
        """
        out = upstream(headers(), trustedHops=2)
        self.assertEqual(out.getRawHeaders(b"x-forwarded-for"), [PEER])

    def test_protoPortUntrusted(self) -> None:
        """
        With no trusted hops, X-Forwarded-Proto and X-Forwarded-Port are
        the listener's, whatever the client sent.
        """
        incoming = headers(
            (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Port", b"443")
        )
        out = upstream(incoming, proto=b"http", port=b"30080", trustedHops=0)
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-port"), [b"30080"])

    def test_protoPortNotSent(self) -> None:
        """
        With trusted hops that sent nothing, the listener's proto and port
        are used.
        """
        out = upstream(headers(), proto=b"https", port=b"8443", trustedHops=1)
        self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(out.getRawHeaders(b"x-forwarded-port"), [b"8443"])

    def test_protoPortTrustedValid(self) -> None:
        """
        With trusted hops, a single valid X-Forwarded-Proto (C{http} or
        C{https}) and X-Forwarded-Port (digits) are kept.
        """
        for proto, port in [(b"https", b"443"), (b"http", b"8080"), (b"https", b"1")]:
            incoming = headers(
                (b"X-Forwarded-Proto", proto), (b"X-Forwarded-Port", port)
            )
            out = upstream(incoming, proto=b"http", port=b"30080", trustedHops=1)
            self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [proto])
            self.assertEqual(out.getRawHeaders(b"x-forwarded-port"), [port])

    def test_protoTrustedInvalid(self) -> None:
        """
        An invalid or repeated X-Forwarded-Proto from a trusted hop is
        replaced by the listener's.
        """
        for sent in [
            [b"HTTPS"],
            [b"ftp"],
            [b"https "],
            [b""],
            [b"https, http"],
            [b"https", b"https"],
        ]:
            incoming = headers(*[(b"X-Forwarded-Proto", v) for v in sent])
            out = upstream(incoming, proto=b"http", trustedHops=1)
            self.assertEqual(out.getRawHeaders(b"x-forwarded-proto"), [b"http"], sent)

    def test_portTrustedInvalid(self) -> None:
        """
        An invalid or repeated X-Forwarded-Port from a trusted hop is
        replaced by the listener's.
        """
        for sent in [
            [b"http"],
            [b"80a"],
            [b"-80"],
            [b""],
            [b"123456"],
            [b"443, 80"],
            [b"443", b"443"],
        ]:
            incoming = headers(*[(b"X-Forwarded-Port", v) for v in sent])
            out = upstream(incoming, port=b"30080", trustedHops=1)
            self.assertEqual(out.getRawHeaders(b"x-forwarded-port"), [b"30080"], sent)

    def test_forwardedHost(self) -> None:
        """
        X-Forwarded-Host and Host are the client's Host, as one value; the
        client's own X-Forwarded-Host is dropped, even from trusted hops.
        """
        incoming = headers(
            (b"Host", b"ignored.example"),
            (b"X-Forwarded-Host", b"evil.example"),
        )
        for hops in [0, 1]:
            out = upstream(incoming, host=b"API.example.com:30080", trustedHops=hops)
            self.assertEqual(out.getRawHeaders(b"host"), [b"API.example.com:30080"])
            self.assertEqual(
                out.getRawHeaders(b"x-forwarded-host"), [b"API.example.com:30080"]
            )

    def test_noHost(self) -> None:
        """
        With no Host (HTTP/1.0), neither Host nor X-Forwarded-Host is sent,
        not even the client's.
        """
        incoming = headers(
            (b"Host", b"client.example"), (b"X-Forwarded-Host", b"client.example")
        )
        out = upstream(incoming, host=None)
        self.assertIsNone(out.getRawHeaders(b"host"))
        self.assertIsNone(out.getRawHeaders(b"x-forwarded-host"))

    def test_prefix(self) -> None:
        """
        X-Forwarded-Prefix is set to the stripped prefix, replacing any the
        client sent.
        """
        incoming = headers((b"X-Forwarded-Prefix", b"/admin"))
        out = upstream(incoming, prefix=b"/echo", trustedHops=1)
        self.assertEqual(out.getRawHeaders(b"x-forwarded-prefix"), [b"/echo"])

    def test_noPrefix(self) -> None:
        """
        With no prefix stripped, no X-Forwarded-Prefix is sent: the
        client's is dropped, even from trusted hops.
        """
        incoming = headers((b"X-Forwarded-Prefix", b"/admin"))
        for hops in [0, 1]:
            out = upstream(incoming, prefix=None, trustedHops=hops)
            self.assertIsNone(out.getRawHeaders(b"x-forwarded-prefix"))

    def test_requestId(self) -> None:
        """
        X-Request-Id is the given id, as one value; the client's is
        dropped.
        """
        incoming = headers((b"X-Request-Id", b"client-id"), (b"x-request-id", b"x"))
        out = upstream(incoming, requestId=b"chosen", trustedHops=1)
        self.assertEqual(out.getRawHeaders(b"x-request-id"), [b"chosen"])

    def test_everyOwnedHeaderOnce(self) -> None:
        """
        Each header monedge owns appears exactly once, with monedge's value,
        when the client sent them all, twice.
        """
        owned = [
            b"Host",
            b"X-Forwarded-For",
            b"X-Forwarded-Proto",
            b"X-Forwarded-Host",
            b"X-Forwarded-Port",
            b"X-Forwarded-Prefix",
            b"X-Request-Id",
        ]
        incoming = headers(*[(n, b"client") for n in owned + owned])
        out = upstream(incoming, trustedHops=0)
        for name, value in [
            (b"host", b"api.example.com"),
            (b"x-forwarded-for", PEER),
            (b"x-forwarded-proto", b"http"),
            (b"x-forwarded-host", b"api.example.com"),
            (b"x-forwarded-port", b"30080"),
            (b"x-forwarded-prefix", b"/echo"),
            (b"x-request-id", REQUEST_ID),
        ]:
            self.assertEqual(out.getRawHeaders(name), [value], name)


class ClientControlledTests(SynchronousTestCase):
    """
    The client-controlled family, C{--trusted-header}, C{--identity-header}
    and X-Real-IP, in L{upstreamHeaders}.
    """

    def everyMember(self) -> Headers:
        """
        Every client-controlled header, and two Envoy control headers.
        """
        incoming = headers(
            (b"x-envoy-retry-on", b"5xx"), (b"X-Envoy-Max-Retries", b"9")
        )
        for name in CLIENT_CONTROLLED_NAMES:
            incoming.addRawHeader(name, b"forged")
        return incoming

    def test_familyDocumented(self) -> None:
        """
        The family is grouped, has no member twice, and overlaps neither
        the hop-by-hop headers nor those monedge owns.
        """
        members = [n for family in CLIENT_CONTROLLED.values() for n in family]
        self.assertEqual(len(members), len(set(members)))
        self.assertEqual(set(members), CLIENT_CONTROLLED_NAMES)
        self.assertFalse(CLIENT_CONTROLLED_NAMES & HOP_BY_HOP)
        self.assertNotIn(b"x-forwarded-for", CLIENT_CONTROLLED_NAMES)
        for must in (b"x-real-ip", b"true-client-ip", b"x-original-url"):
            self.assertIn(must, CLIENT_CONTROLLED_NAMES)

    def test_strippedFromUntrusted(self) -> None:
        """
        With no trusted hops, or from a peer outside the trusted ranges, no
        member (and no X-Envoy- header) reaches the upstream, even one
        named with --trusted-header; X-Real-IP is the peer.
        """
        for rules in (
            ForwardingRules(),
            ForwardingRules(
                Trust.fromOptions(1, ["10.0.0.0/8"]),
                trustedHeaders=["true-client-ip", "x-envoy-retry-on"],
            ),
        ):
            out = upstream(self.everyMember(), rules=rules)
            passed = names(out) & CLIENT_CONTROLLED_NAMES
            self.assertEqual(passed, {b"x-real-ip"})
            self.assertEqual(out.getRawHeaders(b"x-real-ip"), [PEER])
            self.assertFalse(
                [n for n in names(out) if n.startswith(b"x-envoy-")], rules
            )

    def test_trustedHeaderFromTrustedPeer(self) -> None:
        """
        From a trusted peer, only the --trusted-header names pass, as sent;
        the rest of the family is still removed, and X-Real-IP is the
        client the trusted hop reported.
        """
        rules = ForwardingRules(
            Trust.fromOptions(1, ["192.0.2.0/24"]),
            trustedHeaders=["True-Client-IP", "x-envoy-retry-on"],
        )
        incoming = self.everyMember()
        incoming.addRawHeader(b"x-forwarded-for", b"198.51.100.4")
        out = upstream(incoming, rules=rules)
        self.assertEqual(
            names(out) & CLIENT_CONTROLLED_NAMES, {b"x-real-ip", b"true-client-ip"}
        )
        self.assertEqual(out.getRawHeaders(b"true-client-ip"), [b"forged"])
        self.assertEqual(out.getRawHeaders(b"x-envoy-retry-on"), [b"5xx"])
        self.assertIsNone(out.getRawHeaders(b"x-envoy-max-retries"))
        self.assertEqual(out.getRawHeaders(b"x-real-ip"), [b"198.51.100.4"])

    def test_noRealIp(self) -> None:
        """
        Without X-Real-IP (--no-real-ip) monedge sets none, and the client's
        is removed unless it is a trusted header from a trusted peer.
        """
        incoming = headers((b"X-Real-IP", b"6.6.6.6"))
        out = upstream(incoming, rules=ForwardingRules(realIp=False))
        self.assertIsNone(out.getRawHeaders(b"x-real-ip"))
        rules = ForwardingRules(Trust(1), trustedHeaders=["x-real-ip"], realIp=False)
        out = upstream(incoming, rules=rules)
        self.assertEqual(out.getRawHeaders(b"x-real-ip"), [b"6.6.6.6"])

    def test_identityHeaders(self) -> None:
        """
        --identity-header names are removed from every request, trusted or
        not, in any case and however repeated; other headers pass.
        """
        incoming = headers(
            (b"X-User-Role", b"admin"),
            (b"x-user-role", b"root"),
            (b"X-USER-ID", b"1"),
            (b"X-Kept", b"yes"),
        )
        for trust in (Trust(), Trust(1)):
            rules = ForwardingRules(trust, identityHeaders=["X-User-Role", "x-user-id"])
            out = upstream(incoming, rules=rules)
            self.assertIsNone(out.getRawHeaders(b"x-user-role"))
            self.assertIsNone(out.getRawHeaders(b"x-user-id"))
            self.assertEqual(out.getRawHeaders(b"x-kept"), [b"yes"])


class RequestIdTests(SynchronousTestCase):
    """
    L{requestIdFor} and L{newRequestId} choose a request's id.
    """

    def test_newRequestId(self) -> None:
        """
        New ids are 32 lowercase hex digits, and differ.
        """
        ids = {newRequestId() for _ in range(100)}
        self.assertEqual(len(ids), 100)
        for rid in ids:
            self.assertRegex(rid, _HEX32)

    def test_trustedValidUsed(self) -> None:
        """
        From a trusted hop, one valid X-Request-Id is used as is.
        """
        for rid in [b"abc", b"A-b_c.d:e", b"x" * 128, REQUEST_ID]:
            incoming = headers((b"X-Request-Id", rid))
            self.assertEqual(requestIdFor(incoming, trusted=True), rid)
            self.assertEqual(requestIdFor(incoming, trusted=True), rid)

    def test_trustedInvalidIgnored(self) -> None:
        """
        From a trusted hop, an X-Request-Id that is too long, empty or has
        characters outside C{[A-Za-z0-9._:-]} is replaced by a new id.
        """
        for rid in [
            b"",
            b"x" * 129,
            b"has space",
            b"a/b",
            b"a,b",
            b"a\tb",
            b"caf\xc3\xa9",
            b"<script>",
        ]:
            incoming = headers((b"X-Request-Id", rid))
            result = requestIdFor(incoming, trusted=True)
            self.assertNotEqual(result, rid)
            self.assertRegex(result, _HEX32)

    def test_duplicateIgnored(self) -> None:
        """
        Two X-Request-Id values, even equal and valid, give a new id.
        """
        incoming = headers((b"X-Request-Id", b"abc"), (b"X-Request-Id", b"abc"))
        result = requestIdFor(incoming, trusted=True)
        self.assertRegex(result, _HEX32)
        self.assertNotEqual(result, b"abc")

    def test_untrustedIgnored(self) -> None:
        """
        With no trusted hops the client's X-Request-Id is never used, even
        when it looks like one of ours.
        """
        for rid in [b"abc", REQUEST_ID]:
            incoming = headers((b"X-Request-Id", rid))
            result = requestIdFor(incoming, trusted=False)
            self.assertNotEqual(result, rid)
            self.assertRegex(result, _HEX32)

    def test_noneSent(self) -> None:
        """
        With no X-Request-Id, ids are new each time.
        """
        first = requestIdFor(headers(), trusted=True)
        second = requestIdFor(headers(), trusted=True)
        self.assertRegex(first, _HEX32)
        self.assertRegex(second, _HEX32)
        self.assertNotEqual(first, second)


class DownstreamHeadersTests(SynchronousTestCase):
    """
    L{downstreamHeaders} copies an upstream response's headers.
    """

    def test_hopByHopDropped(self) -> None:
        """
        Hop-by-hop headers from the upstream are not copied; end-to-end
        ones are.
        """
        response = headers(
            (b"Connection", b"keep-alive"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Upgrade", b"h2c"),
            (b"Trailer", b"X-Sum"),
            (b"Proxy-Authenticate", b"Basic"),
            (b"Content-Type", b"application/json"),
            (b"Cache-Control", b"no-store"),
        )
        out = Headers()
        downstreamHeaders(response, response.getRawHeaders(b"connection"), out)
        self.assertEqual(names(out) & HOP_BY_HOP, set())
        self.assertEqual(names(out), {b"content-type", b"cache-control"})
        self.assertEqual(out.getRawHeaders(b"content-type"), [b"application/json"])

    def test_connectionNamedDropped(self) -> None:
        """
        Headers the upstream named in its Connection values (any case,
        several values) are not copied.
        """
        response = headers(
            (b"X-Internal", b"1"),
            (b"x-debug", b"2"),
            (b"X-Public", b"3"),
        )
        out = Headers()
        downstreamHeaders(response, [b" X-INTERNAL ,", b"X-Debug"], out)
        self.assertEqual(names(out), {b"x-public"})

    def test_noConnection(self) -> None:
        """
        With no Connection values, only the hop-by-hop set is dropped.
        """
        response = headers((b"X-A", b"1"), (b"TE", b"trailers"))
        out = Headers()
        downstreamHeaders(response, None, out)
        self.assertEqual(names(out), {b"x-a"})

    def test_repeatedSetCookie(self) -> None:
        """
        Repeated Set-Cookie headers are kept as separate headers, in order,
        never joined.
        """
        response = headers(
            (b"Set-Cookie", b"a=1; Path=/"),
            (b"set-cookie", b"b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT"),
            (b"Set-Cookie", b"c=3"),
        )
        out = Headers()
        downstreamHeaders(response, None, out)
        self.assertEqual(
            out.getRawHeaders(b"set-cookie"),
            [b"a=1; Path=/", b"b=2; Expires=Wed, 21 Oct 2026 07:28:00 GMT", b"c=3"],
        )

    def test_existingKept(self) -> None:
        """
        Headers already in C{out} that the upstream did not send are kept.
        """
        out = headers((b"Server", b"monedge"))
        downstreamHeaders(headers((b"X-A", b"1")), None, out)
        self.assertEqual(out.getRawHeaders(b"server"), [b"monedge"])
        self.assertEqual(out.getRawHeaders(b"x-a"), [b"1"])


class TrailerFieldsTests(SynchronousTestCase):
    """
    Which trailer fields may cross, either way.
    """

    def test_kept(self) -> None:
        """
        Ordinary fields are kept, in order, canonical, values stripped.
        """
        self.assertEqual(
            trailerFields([(b"grpc-status", b" 0 "), (b"X-Checksum", b"abc")]),
            [(b"Grpc-Status", b"0"), (b"X-Checksum", b"abc")],
        )

    def test_forbiddenDropped(self) -> None:
        """
        Hop-by-hop, framing, routing, credential and forwarding fields are
        dropped, as are malformed names and values.
        """
        names = [
            b"Connection",
            b"Transfer-Encoding",
            b"Content-Length",
            b"Content-Type",
            b"Host",
            b"Authorization",
            b"Set-Cookie",
            b"X-Forwarded-For",
            b"TE",
            b"Trailer",
            b"bad name",
        ]
        fields = [(name, b"v") for name in names] + [(b"X-Ok", b"a\x01b")]
        self.assertEqual(trailerFields(fields), [])

    def test_underscores(self) -> None:
        """
        The underscore policy applies: dropped by default, kept with
        C{allow}, and the whole section refused (L{None}) with C{reject}.
        """
        fields = [(b"X_User", b"1"), (b"X-Ok", b"2")]
        self.assertEqual(trailerFields(fields), [(b"X-Ok", b"2")])
        self.assertEqual(
            trailerFields(fields, "allow"), [(b"X_user", b"1"), (b"X-Ok", b"2")]
        )
        self.assertIsNone(trailerFields(fields, "reject"))
