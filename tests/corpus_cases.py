"""
The raw-socket corpus run by L{tests.test_e2e_corpus}: each L{Case} is the
exact bytes a client sends and everything that must follow, at the client
and at the upstream.

The tables are functions so that cases can name the proxy's port, which is
only known once it runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

#: The Host every case sends unless it says otherwise.
HOST = b"h.example"

#: Header name -> the exact list of values expected; C{()} means absent.
HeaderExpectations = Mapping[bytes, Sequence[bytes]]

#: The registry every default proxy runs on, with the address of the
#: recording upstream filled in.  The decoys are names the convention
#: refuses: if monedge ever looked one up, it would route to the upstream
#: and the "nothing reached the upstream" check would fail.
LONGEST_NAME = b"a" * 63
TOO_LONG_NAME = b"a" * 64
DECOY_NAMES = ["ECHO", "Echo", "9abc", "a_b", "-x", "x-", TOO_LONG_NAME.decode()]


def services(address: str, **more: str) -> dict[str, dict[str, object]]:
    """
    The registry for a default proxy: C{service.api.echo} and the longest
    valid name on the recording upstream at C{address}, every decoy on it
    too, and C{more} (name -> address).
    """
    table: dict[str, dict[str, object]] = {
        "service.api.echo": {"endpoints": [address]},
        "service.api." + LONGEST_NAME.decode(): {"endpoints": [address]},
    }
    for decoy in DECOY_NAMES:
        table["service.api." + decoy] = {"endpoints": [address]}
    for name, where in more.items():
        table["service.api." + name] = {"endpoints": [where]}
    return table


@dataclass(frozen=True)
class Case:
    """
    One raw exchange and what must follow.

    @ivar name: a short label for failure messages.
    @ivar raw: the bytes the client sends.
    @ivar status: the final response's status.
    @ivar code: the JSON error body's C{code}, or L{None} for a response
        that is not a monedge error.
    @ivar uri: the exact target the upstream receives, or L{None} if the
        request must reach no recording upstream at all.
    @ivar upstream: exact header values the upstream must receive (C{()}:
        must not receive the header at all).
    @ivar client: exact header values the client must receive.
    @ivar body: the exact body the upstream must receive, if given.
    @ivar echo: the client body is the recording upstream's default JSON
        echo, whose C{uri} must be C{uri}.
    @ivar requestId: the X-Request-Id the client and upstream must both see;
        L{None} means a fresh id monedge made (32 hex digits).
    @ivar closes: the proxy closes the connection after the response.
    """

    name: str
    raw: bytes
    status: int
    code: str | None = None
    uri: bytes | None = None
    upstream: HeaderExpectations = field(default_factory=dict)
    client: HeaderExpectations = field(default_factory=dict)
    body: bytes | None = None
    echo: bool = True
    requestId: bytes | None = None
    closes: bool = True


def request(
    target: bytes,
    *headers: bytes,
    method: bytes = b"GET",
    version: bytes = b"HTTP/1.1",
    host: bytes | None = HOST,
    close: bool = True,
    body: bytes = b"",
) -> bytes:
    """
    A raw request: the request line, C{Host} (unless L{None}), C{headers}
    as given, C{Connection: close} (unless C{close} is false), the blank
    line and C{body}, all CRLF-terminated.
    """
    lines = [method + b" " + target + b" " + version]
    if host is not None:
        lines.append(b"Host: " + host)
    lines.extend(headers)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _refused(name: str, target: bytes, code: str, status: int = 400) -> Case:
    return Case(name, request(target), status, code)


def _routed(name: str, target: bytes, uri: bytes) -> Case:
    return Case(
        name,
        request(target),
        200,
        uri=uri,
        upstream={b"x-forwarded-prefix": [b"/echo"], b"host": [HOST]},
    )


def pathCases() -> list[Case]:
    """
    Request targets: refused, unroutable, and routed with the exact
    canonical path forwarded.
    """
    dot = "path_dot_segment"
    sep = "path_encoded_separator"
    ctl = "path_control_character"
    utf8 = "path_invalid_utf8"
    double = "path_double_encoding"
    escape = "path_invalid_escape"
    notFound = "route_not_found"
    return [
        # Dot segments, raw, encoded, with parameters and after NFKC.
        _refused("raw ..", b"/echo/../admin", dot),
        _refused("raw .", b"/echo/./x", dot),
        _refused("trailing ..", b"/echo/x/..", dot),
        _refused("leading .", b"/./echo/x", dot),
        _refused("%2e%2e", b"/echo/%2e%2e/x", dot),
        _refused("%2E%2e", b"/echo/%2E%2e/x", dot),
        _refused("%2e", b"/echo/%2e", dot),
        _refused(".%2e", b"/echo/.%2e/x", dot),
        _refused("%2e%2e before name", b"/%2e%2e/echo/x", dot),
        _refused("..;", b"/echo/..;/x", dot),
        _refused("..;jsessionid", b"/echo/%2e%2e;jsessionid=1/x", dot),
        _refused(".;x", b"/echo/.;x/y", dot),
        _refused("fullwidth dots", b"/echo/%ef%bc%8e%ef%bc%8e/x", dot),
        _refused("two dot leader", b"/echo/%e2%80%a5/x", dot),
        # Separators: encoded, raw backslash, and NFKC lookalikes.
        _refused("%2f", b"/echo/x%2fy", sep),
        _refused("%2F", b"/echo/x%2Fy", sep),
        _refused("%5c", b"/echo/x%5cy", sep),
        _refused("raw backslash", b"/echo\\x", sep),
        _refused("raw backslash dots", b"/echo/a\\..\\b", sep),
        _refused("%2f in name", b"/echo%2fx", sep),
        _refused("fullwidth solidus", b"/echo/a%ef%bc%8fb", sep),
        _refused("fullwidth reverse solidus", b"/echo/a%ef%bc%bcb", sep),
        # Control characters, encoded or raw, in the path or the query.
        _refused("%00", b"/echo/%00", ctl),
        _refused("CRLF injection", b"/echo/a%0d%0aX-Injected:1", ctl),
        _refused("%09", b"/echo/a%09b", ctl),
        _refused("%7f", b"/echo/%7f", ctl),
        _refused("raw DEL", b"/echo/a\x7fb", ctl),
        _refused("raw #", b"/echo/#frag", ctl),
        _refused("# in query", b"/echo/x?a#b", ctl),
        # Invalid UTF-8, overlong forms and surrogates.
        _refused("%ff", b"/echo/%ff", utf8),
        _refused("overlong /", b"/echo/%c0%af", utf8),
        _refused("overlong ..", b"/echo/%c0%ae%c0%ae/x", utf8),
        _refused("surrogate", b"/echo/%ed%a0%80", utf8),
        # Double encoding.
        _refused("%252e%252e", b"/echo/%252e%252e/x", double),
        _refused("%252f", b"/echo/a%252fb", double),
        _refused("%255c", b"/echo/a%255cb", double),
        _refused("%2500", b"/echo/a%2500", double),
        # Malformed escapes and targets.
        _refused("lone %", b"/echo/%", escape),
        _refused("%zz", b"/echo/%zz", escape),
        _refused("%2 at end", b"/echo/%2", escape),
        _refused("asterisk", b"*", "path_not_absolute"),
        _refused("relative", b"echo/x", "path_not_absolute"),
        # Refused by the request-line parser before monedge sees a target.
        _refused("raw 0xff", b"/echo/\xff", "bad_request"),
        Case("raw space", b"GET /echo/a b HTTP/1.1\r\n\r\n", 400, "bad_request"),
        Case(
            "HTTP/2.0 line",
            request(b"/echo/x", version=b"HTTP/2.0"),
            400,
            "bad_request",
        ),
        # Not a service name: 404 and nothing looked up (every decoy below
        # is registered, so a lookup would route it).
        _refused("upper case", b"/ECHO/x", notFound, 404),
        _refused("title case", b"/Echo/x", notFound, 404),
        _refused("encoded upper case", b"/%45CHO/x", notFound, 404),
        _refused("leading digit", b"/9abc/", notFound, 404),
        _refused("underscore", b"/a_b/", notFound, 404),
        _refused("leading hyphen", b"/-x/", notFound, 404),
        _refused("trailing hyphen", b"/x-/", notFound, 404),
        _refused("64 characters", b"/" + TOO_LONG_NAME + b"/", notFound, 404),
        _refused("parameter on name", b"/echo;x/y", notFound, 404),
        _refused("dot in name", b"/echo.evil/x", notFound, 404),
        _refused("root", b"/", notFound, 404),
        _refused("unknown", b"/nosuch/x", notFound, 404),
        # Routed: the exact canonical path reaches the upstream.
        _routed("merged slashes", b"//echo//a///b", b"/a/b"),
        _routed("bare name", b"/echo", b"/"),
        _routed("name and slash", b"/echo/", b"/"),
        _routed("bare name, query", b"/echo?x=1", b"/?x=1"),
        _routed("trailing slash", b"/echo/a/", b"/a/"),
        _routed("encoded name", b"/%65cho/x", b"/x"),
        _routed("encoded name tail", b"/ech%6f/x", b"/x"),
        _routed("pipe re-encoded", b"/echo/a|b", b"/a%7Cb"),
        _routed("space re-encoded", b"/echo/a%20b", b"/a%20b"),
        _routed("unreserved decoded", b"/echo/%41%7e", b"/A~"),
        _routed("UTF-8 canonical", b"/echo/caf%c3%a9", b"/caf%C3%A9"),
        _routed("parameters kept", b"/echo/a;b=c", b"/a;b=c"),
        _routed("query verbatim", b"/echo/x?a=1&b=%2F..", b"/x?a=1&b=%2F.."),
        _routed("query %00 verbatim", b"/echo/x?a=%00", b"/x?a=%00"),
        _routed("empty query dropped", b"/echo/x?", b"/x"),
        Case(
            "63 characters",
            request(b"/" + LONGEST_NAME + b"/x"),
            200,
            uri=b"/x",
            upstream={b"x-forwarded-prefix": [b"/" + LONGEST_NAME]},
        ),
        # Absolute form, Host and version.
        Case(
            "absolute form",
            request(b"http://host.example/echo/x", host=b"host.example"),
            200,
            uri=b"/x",
            upstream={b"host": [b"host.example"]},
        ),
        Case(
            "absolute form, other case",
            request(b"HTTP://HOST.example/echo/x?q=1", host=b"host.example"),
            200,
            uri=b"/x?q=1",
            upstream={b"host": [b"host.example"]},
        ),
        Case(
            "absolute form, other host",
            request(b"http://host.example/echo/x", host=b"other.example"),
            400,
            "host_mismatch",
        ),
        Case(
            "absolute form, userinfo",
            request(b"http://user@host.example/echo/x", host=b"host.example"),
            400,
            "host_mismatch",
        ),
        Case(
            "absolute form, dot segment",
            request(b"http://host.example/echo/../x", host=b"host.example"),
            400,
            dot,
        ),
        Case(
            "two Host headers",
            request(b"/echo/x", b"Host: other.example"),
            400,
            "missing_host",
        ),
        Case("no Host", request(b"/echo/x", host=None), 400, "missing_host"),
        Case("empty Host", request(b"/echo/x", host=b""), 400, "bad_request"),
        Case(
            "Host with userinfo",
            request(b"/echo/x", host=b"user@h.example"),
            400,
            "bad_request",
        ),
        Case(
            "Host with bad port",
            request(b"/echo/x", host=b"h.example:abc"),
            400,
            "bad_request",
        ),
        Case(
            "HTTP/1.0 without Host",
            request(b"/echo/x", version=b"HTTP/1.0", host=None, close=False),
            200,
            uri=b"/x",
        ),
        # Methods that are never proxied.
        Case(
            "CONNECT",
            request(b"host:443", method=b"CONNECT", host=b"host:443"),
            405,
            "method_not_allowed",
        ),
        Case(
            "CONNECT to a route",
            request(b"/echo/x", method=b"CONNECT"),
            405,
            "method_not_allowed",
        ),
        Case(
            "TRACE",
            request(b"/echo/", method=b"TRACE"),
            405,
            "method_not_allowed",
        ),
    ]


def hopByHopRequestCases() -> list[Case]:
    """
    Hop-by-hop request headers, and every header the client names in
    C{Connection}, never reach the upstream; end-to-end headers do.
    """
    gone: dict[bytes, Sequence[bytes]] = {b"connection": (), b"keep-alive": ()}
    return [
        Case(
            "Connection: close, X-Secret",
            request(
                b"/echo/h",
                b"Connection: close, X-Secret",
                b"X-Secret: 1",
                b"X-Keep: yes",
                close=False,
            ),
            200,
            uri=b"/h",
            upstream={**gone, b"x-secret": (), b"x-keep": [b"yes"]},
        ),
        Case(
            "Connection: keep-alive, x-custom",
            request(
                b"/echo/h",
                b"Connection: keep-alive, x-custom",
                b"X-Custom: v",
                close=False,
            ),
            200,
            uri=b"/h",
            upstream={**gone, b"x-custom": ()},
            closes=False,
        ),
        Case(
            "close, then a second Connection header",
            request(
                b"/echo/h",
                b"Connection: close",
                b"Connection: keep-alive, x-custom",
                b"X-Custom: v",
                close=False,
            ),
            200,
            uri=b"/h",
            upstream={**gone, b"x-custom": ()},
        ),
        Case(
            "Connection token in another case",
            request(
                b"/echo/h",
                b"Connection: close",
                b"Connection: X-SeCrEt",
                b"x-secret: 1",
                close=False,
            ),
            200,
            uri=b"/h",
            upstream={**gone, b"x-secret": ()},
        ),
        Case(
            "Connection naming X-Forwarded-For",
            request(
                b"/echo/h",
                b"Connection: close",
                b"Connection: X-Forwarded-For",
                b"X-Forwarded-For: 1.2.3.4",
                close=False,
            ),
            200,
            uri=b"/h",
            upstream={**gone, b"x-forwarded-for": [b"127.0.0.1"]},
        ),
        Case(
            "Keep-Alive",
            request(b"/echo/h", b"Keep-Alive: timeout=5, max=100"),
            200,
            uri=b"/h",
            upstream=gone,
        ),
        Case(
            "TE: trailers",
            request(b"/echo/h", b"TE: trailers, deflate"),
            200,
            uri=b"/h",
            # The client's TE is not passed on; monedge sends its own
            # "trailers", since it passes trailers on to this client.
            upstream={**gone, b"te": [b"trailers"]},
        ),
        Case(
            "TE without trailers",
            request(b"/echo/h", b"TE: gzip"),
            200,
            uri=b"/h",
            upstream={**gone, b"te": ()},
        ),
        Case(
            "Trailer",
            request(b"/echo/h", b"Trailer: X"),
            200,
            uri=b"/h",
            upstream={**gone, b"trailer": ()},
        ),
        Case(
            "h2c upgrade",
            request(
                b"/echo/h",
                b"Upgrade: h2c",
                b"HTTP2-Settings: AAA",
                b"Connection: Upgrade, HTTP2-Settings",
                close=False,
            ),
            200,
            uri=b"/h",
            upstream={**gone, b"upgrade": (), b"http2-settings": ()},
            client={b"upgrade": ()},
            closes=False,
        ),
        Case(
            "h2c upgrade, with close",
            request(
                b"/echo/h",
                b"Upgrade: h2c",
                b"HTTP2-Settings: AAA",
                b"Connection: close",
                b"Connection: Upgrade, HTTP2-Settings",
                close=False,
            ),
            200,
            uri=b"/h",
            upstream={**gone, b"upgrade": (), b"http2-settings": ()},
            client={b"upgrade": ()},
        ),
        Case(
            "websocket upgrade",
            request(
                b"/echo/ws",
                b"Connection: close",
                b"Connection: Upgrade",
                b"Upgrade: websocket",
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
                b"Sec-WebSocket-Version: 13",
                close=False,
            ),
            200,
            uri=b"/ws",
            # A checked WebSocket handshake goes upstream as one, on a
            # connection of its own; this upstream answers 200, which is
            # relayed as a plain response (never a tunnel).
            upstream={
                b"connection": [b"Upgrade"],
                b"keep-alive": (),
                b"upgrade": [b"websocket"],
                b"sec-websocket-version": [b"13"],
            },
            client={b"upgrade": ()},
        ),
        Case(
            "Proxy-Connection",
            request(b"/echo/h", b"Proxy-Connection: keep-alive"),
            200,
            uri=b"/h",
            upstream={**gone, b"proxy-connection": ()},
        ),
        Case(
            "Proxy-Authorization",
            request(b"/echo/h", b"Proxy-Authorization: Basic Zm9vOmJhcg=="),
            200,
            uri=b"/h",
            upstream={**gone, b"proxy-authorization": ()},
        ),
        Case(
            "Expect: 100-continue",
            request(
                b"/echo/h",
                b"Expect: 100-continue",
                b"Content-Length: 2",
                method=b"POST",
                body=b"hi",
            ),
            200,
            uri=b"/h",
            upstream={**gone, b"expect": (), b"content-length": [b"2"]},
            body=b"hi",
        ),
    ]


def hopByHopResponseCases() -> list[Case]:
    """
    Hop-by-hop response headers, and every header the upstream names in
    C{Connection}, never reach the client; end-to-end headers do.  The
    C{hop} service is a recording upstream with a responder that adds
    them; C{rawhop} is a raw upstream that sends them verbatim.
    """
    client: dict[bytes, Sequence[bytes]] = {
        b"x-internal": (),
        b"keep-alive": (),
        b"proxy-authenticate": (),
        b"trailer": (),
        b"x-public": [b"yes"],
        b"connection": [b"close"],
    }
    return [
        Case(
            "upstream Connection: X-Internal (twisted.web upstream)",
            request(b"/hop/"),
            200,
            uri=b"/",
            client=client,
            echo=False,
        ),
        Case(
            "upstream Connection: X-Internal (raw upstream)",
            request(b"/rawhop/"),
            200,
            client={**client, b"x-other": (), b"upgrade": ()},
        ),
        Case(
            "upstream Connection: X-Internal (raw upstream, keep-alive)",
            request(b"/rawhop/", close=False),
            200,
            client={**client, b"x-other": (), b"upgrade": (), b"connection": ()},
            closes=False,
        ),
    ]


def untrustedForwardingCases(port: int) -> list[Case]:
    """
    With no trusted hops every forwarding header and the request id are
    monedge's own, whatever the client sent.
    """
    own: dict[bytes, Sequence[bytes]] = {
        b"x-forwarded-for": [b"127.0.0.1"],
        b"x-forwarded-proto": [b"http"],
        b"x-forwarded-host": [HOST],
        b"x-forwarded-port": [b"%d" % (port,)],
        b"x-forwarded-prefix": [b"/echo"],
        b"host": [HOST],
        b"forwarded": (),
    }

    def spoof(name: str, *headers: bytes) -> Case:
        return Case(name, request(b"/echo/f", *headers), 200, uri=b"/f", upstream=own)

    return [
        spoof("nothing sent"),
        spoof("X-Forwarded-For", b"X-Forwarded-For: 1.2.3.4"),
        spoof("x-FORWARDED-for", b"x-FORWARDED-for: 1.2.3.4"),
        spoof(
            "two X-Forwarded-For",
            b"X-Forwarded-For: 1.2.3.4",
            b"X-Forwarded-For: 5.6.7.8",
        ),
        spoof("X-Forwarded-Proto: https", b"X-Forwarded-Proto: https"),
        spoof("X-Forwarded-Host", b"X-Forwarded-Host: evil.example"),
        spoof("X-Forwarded-Port", b"X-Forwarded-Port: 443"),
        spoof("X-Forwarded-Prefix", b"X-Forwarded-Prefix: /admin"),
        spoof("Forwarded", b"Forwarded: for=1.2.3.4;proto=https;host=evil"),
        spoof("X-Request-Id", b"X-Request-Id: abc-123"),
        spoof(
            "all of them",
            b"X-Forwarded-For: 1.2.3.4",
            b"X-Forwarded-Proto: https",
            b"X-Forwarded-Host: evil.example",
            b"X-Forwarded-Port: 443",
            b"X-Forwarded-Prefix: /admin",
            b"X-Request-Id: abc-123",
            b"Forwarded: for=1.2.3.4",
        ),
    ]


def trustedForwardingCases(port: int) -> list[Case]:
    """
    With one trusted hop, the last X-Forwarded-For entry, a valid
    X-Request-Id and a valid X-Forwarded-Proto/Port are kept; everything
    else is still monedge's own.
    """
    ours = b"%d" % (port,)

    def case(
        name: str,
        *headers: bytes,
        xff: bytes = b"127.0.0.1",
        proto: bytes = b"http",
        forwardedPort: bytes = ours,
        requestId: bytes | None = None,
    ) -> Case:
        return Case(
            name,
            request(b"/echo/t", *headers),
            200,
            uri=b"/t",
            upstream={
                b"x-forwarded-for": [xff],
                b"x-forwarded-proto": [proto],
                b"x-forwarded-port": [forwardedPort],
                b"x-forwarded-host": [HOST],
                b"x-forwarded-prefix": [b"/echo"],
            },
            requestId=requestId,
        )

    return [
        case("nothing sent"),
        case(
            "two-entry X-Forwarded-For",
            b"X-Forwarded-For: 6.6.6.6, 10.0.0.1",
            xff=b"10.0.0.1, 127.0.0.1",
        ),
        case(
            "two X-Forwarded-For headers",
            b"X-Forwarded-For: 6.6.6.6",
            b"X-Forwarded-For: 10.0.0.1",
            xff=b"10.0.0.1, 127.0.0.1",
        ),
        case(
            "valid X-Request-Id",
            b"X-Request-Id: abc-123",
            requestId=b"abc-123",
        ),
        case("X-Request-Id with space", b"X-Request-Id: bad id!"),
        case("200-character X-Request-Id", b"X-Request-Id: " + b"a" * 200),
        case(
            "two X-Request-Id headers",
            b"X-Request-Id: abc-123",
            b"X-Request-Id: def-456",
        ),
        case("X-Forwarded-Proto: https", b"X-Forwarded-Proto: https", proto=b"https"),
        case("X-Forwarded-Proto: ftp", b"X-Forwarded-Proto: ftp"),
        case(
            "X-Forwarded-Port: 8443", b"X-Forwarded-Port: 8443", forwardedPort=b"8443"
        ),
        case("X-Forwarded-Port: abc", b"X-Forwarded-Port: abc"),
        case("X-Forwarded-Host", b"X-Forwarded-Host: evil.example"),
    ]


#: Every client-controlled header (monedge.rules.headers.CLIENT_CONTROLLED), and
#: one of Envoy's control headers, each with a value a client might forge.
def _forgeries() -> list[tuple[bytes, bytes]]:
    from monedge.rules.headers import CLIENT_CONTROLLED_NAMES

    forged = [(name, b"6.6.6.6") for name in sorted(CLIENT_CONTROLLED_NAMES)]
    return [
        *forged,
        (b"x-envoy-retry-on", b"5xx"),
        (b"X-ENVOY-UPSTREAM-RQ-TIMEOUT-MS", b"1"),
    ]


def clientControlledCases(
    port: int,
    *,
    client: bytes = b"127.0.0.1",
    chain: bytes = b"127.0.0.1",
    forwardedFor: bytes | None = None,
    passed: Sequence[bytes] = (),
    realIp: bool = True,
) -> list[Case]:
    """
    One case per client-controlled header (docs/security.md): sent by the
    client, it must not reach the upstream, unless it is in C{passed} (a
    C{--trusted-header} from a trusted peer), when it must arrive as sent.
    X-Real-IP is always the resolved C{client} (or absent without
    C{realIp}, unless passed), and X-Forwarded-For is C{chain}.

    @param forwardedFor: an X-Forwarded-For line every case sends.
    """
    extra = () if forwardedFor is None else (b"X-Forwarded-For: " + forwardedFor,)
    cases = []
    for name, value in _forgeries():
        lowered = name.lower()
        expected: dict[bytes, Sequence[bytes]] = {b"x-forwarded-for": [chain]}
        if lowered == b"x-real-ip" and realIp:
            expected[b"x-real-ip"] = [client]
        elif lowered in passed:
            expected[lowered] = [value]
        else:
            expected[lowered] = ()
        if lowered != b"x-real-ip":
            expected[b"x-real-ip"] = [client] if realIp else ()
        cases.append(
            Case(
                f"client-controlled {name.decode()}",
                request(b"/echo/c", name + b": " + value, *extra),
                200,
                uri=b"/c",
                upstream=expected,
            )
        )
    # Many members at once, each in two spellings (in batches that stay
    # under the default 100-header limit).
    removed = [
        (name, value)
        for name, value in _forgeries()
        if name.lower() not in passed and name.lower() != b"x-real-ip"
    ]
    for start in range(0, len(removed), 40):
        batch = removed[start : start + 40]
        cases.append(
            Case(
                f"client-controlled headers {start} to {start + len(batch) - 1}",
                request(
                    b"/echo/c",
                    *[
                        spelled + b": " + value
                        for name, value in batch
                        for spelled in (name, name.upper())
                    ],
                    *extra,
                ),
                200,
                uri=b"/c",
                upstream={name.lower(): () for name, _ in batch},
            )
        )
    return cases


def identityHeaderCases(names: Sequence[bytes]) -> list[Case]:
    """
    C{--identity-header} names are removed from every request, in any case
    and however repeated, on a route that runs no hook.
    """
    cases = []
    for name in names:
        for spelled in (name, name.upper(), name.lower()):
            cases.append(
                Case(
                    f"identity header {spelled.decode()}",
                    request(
                        b"/echo/i",
                        spelled + b": admin",
                        spelled + b": root",
                        b"X-Kept: yes",
                    ),
                    200,
                    uri=b"/i",
                    upstream={name.lower(): (), b"x-kept": [b"yes"]},
                )
            )
    return cases


def framingCases() -> list[Case]:
    """
    Request framing: everything ambiguous is refused before anything
    reaches the upstream; valid bodies arrive intact with framing monedge
    regenerated.
    """
    bad = "bad_request"

    def post(name: str, *headers: bytes, body: bytes = b"abc") -> Case:
        return Case(
            name, request(b"/echo/up", *headers, method=b"POST", body=body), 400, bad
        )

    chunked = b"3\r\nabc\r\n0\r\n\r\n"
    return [
        post(
            "Content-Length and Transfer-Encoding",
            b"Content-Length: 3",
            b"Transfer-Encoding: chunked",
            body=chunked,
        ),
        post(
            "Transfer-Encoding and Content-Length",
            b"Transfer-Encoding: chunked",
            b"Content-Length: 3",
            body=chunked,
        ),
        post(
            "Content-Length and Transfer-Encoding: identity",
            b"Content-Length: 3",
            b"Transfer-Encoding: identity",
        ),
        Case(
            "Transfer-Encoding: identity, body is another request",
            request(
                b"/echo/up",
                b"Transfer-Encoding: identity",
                method=b"POST",
                close=False,
                body=request(b"/echo/smuggled"),
            ),
            400,
            bad,
        ),
        post(
            "two Transfer-Encoding: chunked",
            b"Transfer-Encoding: chunked",
            b"Transfer-Encoding: chunked",
            body=chunked,
        ),
        post("Content-Length: +3", b"Content-Length: +3"),
        post("Content-Length: -1", b"Content-Length: -1"),
        post("Content-Length: 5, 5", b"Content-Length: 5, 5", body=b"abcde"),
        post(
            "two Content-Length",
            b"Content-Length: 3",
            b"Content-Length: 3",
        ),
        post(
            "Transfer-Encoding: gzip, chunked",
            b"Transfer-Encoding: gzip, chunked",
            body=chunked,
        ),
        post(
            "Transfer-Encoding: chunked, chunked",
            b"Transfer-Encoding: chunked, chunked",
            body=chunked,
        ),
        post(
            "malformed chunk size",
            b"Transfer-Encoding: chunked",
            body=b"zz\r\nabc\r\n0\r\n\r\n",
        ),
        post(
            "chunk size 0x3",
            b"Transfer-Encoding: chunked",
            body=b"0x3\r\nabc\r\n0\r\n\r\n",
        ),
        post(
            "chunk size +3",
            b"Transfer-Encoding: chunked",
            body=b"+3\r\nabc\r\n0\r\n\r\n",
        ),
        Case(
            "whitespace before the first header",
            request(b"/echo/x", b" X-Lead: v"),
            400,
            bad,
        ),
        Case(
            "obs-fold",
            request(b"/echo/x", b"X-Folded: a", b" b"),
            400,
            bad,
        ),
        Case("NUL in a header", request(b"/echo/x", b"X-Nul: a\x00b"), 400, bad),
        Case(
            "space before colon",
            request(b"/echo/x", b"X-Bad : v"),
            400,
            bad,
        ),
        Case("header without colon", request(b"/echo/x", b"NoColon"), 400, bad),
        Case(
            "request line over 8192 bytes",
            request(b"/echo/" + b"a" * 9000),
            414,
            "uri_too_long",
        ),
        Case(
            "header over 8192 bytes",
            request(b"/echo/x", b"X-Big: " + b"a" * 9000),
            431,
            "headers_too_large",
        ),
        Case(
            "101 headers",
            request(b"/echo/x", *(b"X-H%d: v" % (i,) for i in range(101))),
            431,
            "headers_too_large",
        ),
        Case(
            "headers over 32 KiB in total",
            request(b"/echo/x", *(b"X-H%d: " % (i,) + b"v" * 1000 for i in range(40))),
            431,
            "headers_too_large",
        ),
        Case(
            "Content-Length body",
            request(b"/echo/up", b"Content-Length: 3", method=b"POST", body=b"abc"),
            200,
            uri=b"/up",
            upstream={b"content-length": [b"3"], b"transfer-encoding": ()},
            body=b"abc",
        ),
        Case(
            "chunked body",
            request(
                b"/echo/up",
                b"Transfer-Encoding: chunked",
                method=b"POST",
                body=b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n",
            ),
            200,
            uri=b"/up",
            # Streamed as it comes: chunked on the way up too.
            upstream={b"content-length": (), b"transfer-encoding": [b"chunked"]},
            body=b"hello world",
        ),
        Case(
            "chunked body with a trailer",
            request(
                b"/echo/up",
                b"Transfer-Encoding: chunked",
                method=b"POST",
                body=b"3\r\nabc\r\n0\r\nX-Trailer: t\r\n\r\n",
            ),
            200,
            uri=b"/up",
            upstream={
                b"content-length": (),
                b"transfer-encoding": [b"chunked"],
                # A trailer, never a header.
                b"x-trailer": (),
            },
            body=b"abc",
        ),
    ]


#: What a smuggled request looks like once it is a body or trailing bytes.
SMUGGLED = request(b"/echo/smuggled")


def transferEncodingCases() -> list[Case]:
    """
    C{Transfer-Encoding} obfuscations (TE.TE, and CL.TE or TE.CL with each
    of them): every whitespace, case and control-byte variant of the name
    and of the value.  A variant monedge reads as C{chunked} is decoded (and
    refused beside a C{Content-Length}); every other one is refused: none is
    ever ignored, so no variant can leave the body to be framed by another
    hop.
    """
    bad = "bad_request"
    chunked = b"3\r\nabc\r\n0\r\n\r\n" + SMUGGLED
    names = [
        (b"Transfer-Encoding", True),
        (b"transfer-encoding", True),
        (b"TRANSFER-ENCODING", True),
        (b"tRaNsFeR-eNcOdInG", True),
        (b"Transfer-Encoding ", False),
        (b"Transfer-Encoding\t", False),
        (b"Transfer-Encoding\x00", False),
        (b"Transfer-Encoding\x0b", False),
        (b"Transfer-Encoding\x0c", False),
        (b"Transfer-Encoding\r", False),
        (b"Transfer-Encoding\x7f", False),
        (b"Transfer-\x00Encoding", False),
        (b"Transfer Encoding", False),
        (b"\x0bTransfer-Encoding", False),
    ]
    values = [
        (b"chunked", True),
        (b"CHUNKED", True),
        (b"Chunked", True),
        (b"  chunked", True),
        (b"\tchunked", True),
        (b"chunked ", True),
        (b"chunked\t", True),
        (b"\x0bchunked", False),
        (b"chunked\x0b", False),
        (b"\x0cchunked", False),
        (b"chunked\x0c", False),
        (b"chunked\x00", False),
        (b"chunked\r", False),
        (b"\x85chunked", False),
        (b"\xa0chunked", False),
        (b'"chunked"', False),
        (b"xchunked", False),
        (b"chunk", False),
        (b"chunked;q=1", False),
        (b"chunked, identity", False),
        (b"identity, chunked", False),
        (b"chunked,", False),
        (b",chunked", False),
        (b"", False),
    ]

    def post(*headers: bytes) -> bytes:
        return request(b"/echo/up", *headers, method=b"POST", body=chunked)

    def spelt(kind: str, raw: bytes) -> str:
        return f"{kind} {raw.decode('latin-1')!r}"

    variants = [(name + b": chunked", ok, spelt("name", name)) for name, ok in names]
    variants += [
        (b"Transfer-Encoding:" + value, ok, spelt("value", value))
        for value, ok in values[1:]
    ]
    cases = []
    for header, ok, label in variants:
        # TE.TE: the variant alone.  Decoded as chunked, or refused.
        if ok:
            cases.append(
                Case(
                    f"TE {label}",
                    post(header),
                    200,
                    uri=b"/up",
                    upstream={
                        b"content-length": (),
                        b"transfer-encoding": [b"chunked"],
                    },
                    body=b"abc",
                )
            )
        else:
            cases.append(Case(f"TE {label}", post(header), 400, bad))
        # CL.TE and TE.CL: with a Content-Length, always refused.
        cases.append(
            Case(
                f"CL.TE {label}",
                post(b"Content-Length: 5", header),
                400,
                bad,
            )
        )
        cases.append(
            Case(
                f"TE.CL {label}",
                post(header, b"Content-Length: 5"),
                400,
                bad,
            )
        )
    return cases


def smugglingCases() -> list[Case]:
    """
    The framing rules beyond C{Transfer-Encoding}: HTTP/1.0 bodies, bare
    CR, LF and NUL, chunk syntax, bodies that look like requests, bytes
    after C{Connection: close}, and header names with underscores (dropped
    by default).
    """
    bad = "bad_request"

    def post(*headers: bytes, body: bytes, version: bytes = b"HTTP/1.1") -> bytes:
        return request(
            b"/echo/up", *headers, method=b"POST", version=version, body=body
        )

    def chunkedPost(body: bytes) -> bytes:
        return post(b"Transfer-Encoding: chunked", body=body)

    return [
        Case(
            "HTTP/1.0 with chunked",
            post(
                b"Transfer-Encoding: chunked",
                body=b"3\r\nabc\r\n0\r\n\r\n",
                version=b"HTTP/1.0",
            ),
            400,
            bad,
        ),
        Case(
            "HTTP/1.0 with Content-Length",
            post(b"Content-Length: 3", body=b"abc", version=b"HTTP/1.0"),
            200,
            uri=b"/up",
            upstream={b"content-length": [b"3"], b"transfer-encoding": ()},
            body=b"abc",
        ),
        Case(
            "HTTP/1.0 body then a request",
            post(b"Content-Length: 3", body=b"abc" + SMUGGLED, version=b"HTTP/1.0"),
            200,
            uri=b"/up",
            body=b"abc",
        ),
        Case("bare CR in a value", request(b"/echo/x", b"X-A: a\rb"), 400, bad),
        Case("bare LF in a value", request(b"/echo/x", b"X-A: a\nX-B: b"), 400, bad),
        Case("bare CR in a name", request(b"/echo/x", b"X\r-A: b"), 400, bad),
        Case("NUL in a name", request(b"/echo/x", b"X-\x00A: b"), 400, bad),
        Case(
            "bare CR in the request line",
            b"GET /echo/x\rGET /echo/y HTTP/1.1\r\nHost: h.example\r\n\r\n",
            400,
            bad,
        ),
        Case(
            "bare LF line ends",
            b"GET /echo/x HTTP/1.1\nHost: h.example\n\nGET /echo/y HTTP/1.1\r\n\r\n",
            400,
            bad,
        ),
        Case("empty Content-Length", post(b"Content-Length:", body=b""), 400, bad),
        Case(
            "Content-Length: 0x10",
            post(b"Content-Length: 0x10", body=b"a" * 16),
            400,
            bad,
        ),
        Case(
            "Content-Length: 1 0",
            post(b"Content-Length: 1 0", body=b"a" * 10),
            400,
            bad,
        ),
        Case(
            "chunk-size line over 1024 bytes",
            chunkedPost(b"3;" + b"x" * 1100 + b"\r\nabc\r\n0\r\n\r\n"),
            400,
            bad,
        ),
        Case(
            "control character in a chunk extension",
            chunkedPost(b"3;a\x01b\r\nabc\r\n0\r\n\r\n"),
            400,
            bad,
        ),
        Case(
            "chunk data not followed by CRLF",
            chunkedPost(b"3\r\nabcXX0\r\n\r\n"),
            400,
            bad,
        ),
        Case(
            "chunk size with a bare LF",
            chunkedPost(b"3\nabc\r\n0\r\n\r\n"),
            400,
            bad,
        ),
        Case(
            "negative chunk size",
            chunkedPost(b"-3\r\nabc\r\n0\r\n\r\n"),
            400,
            bad,
        ),
        Case(
            "chunk declared over max-body-size",
            chunkedPost(b"%x\r\nabc" % (10 * 1024 * 1024 + 1,)),
            413,
            "body_too_large",
        ),
        Case(
            "huge chunk size",
            chunkedPost(b"f" * 40 + b"\r\nabc"),
            413,
            "body_too_large",
        ),
        Case(
            "second chunk declared over max-body-size",
            chunkedPost(b"3\r\nabc\r\n%x\r\nabc" % (10 * 1024 * 1024 - 2,)),
            413,
            "body_too_large",
        ),
        Case(
            "body is a request",
            request(
                b"/echo/get",
                b"Content-Length: %d" % (len(SMUGGLED),),
                body=SMUGGLED,
            ),
            200,
            uri=b"/get",
            body=SMUGGLED,
        ),
        Case(
            "bytes after Connection: close",
            request(b"/echo/first") + SMUGGLED,
            200,
            uri=b"/first",
        ),
        Case(
            "underscore header dropped",
            request(b"/echo/x", b"X_Forwarded_For: 6.6.6.6", b"X_User_Id: admin"),
            200,
            uri=b"/x",
            upstream={
                b"x_forwarded_for": (),
                b"x_user_id": (),
                b"x-forwarded-for": [b"127.0.0.1"],
            },
        ),
        Case(
            "Transfer_Encoding dropped, Content-Length frames",
            post(
                b"Transfer_Encoding: chunked",
                b"Content-Length: 3",
                body=b"abc",
            ),
            200,
            uri=b"/up",
            upstream={b"transfer_encoding": (), b"content-length": [b"3"]},
            body=b"abc",
        ),
        Case(
            "Content_Length dropped",
            request(b"/echo/x", b"Content_Length: 10"),
            200,
            uri=b"/x",
            upstream={b"content_length": ()},
            body=b"",
        ),
        Case(
            "underscore header with a NUL still refused",
            request(b"/echo/x", b"X_A: a\x00b"),
            400,
            bad,
        ),
    ]


def _hostRouted(name: str, host: bytes) -> Case:
    """
    A request to C{/echo/x} with C{host}, routed, the Host forwarded as sent.
    """
    return Case(
        name,
        request(b"/echo/x", host=host),
        200,
        uri=b"/x",
        upstream={b"host": [host], b"x-forwarded-host": [host]},
    )


def _hostRefused(
    name: str, host: bytes, status: int = 400, code: str = "bad_request"
) -> Case:
    """
    A request to C{/echo/x} with C{host}, refused.
    """
    return Case(name, request(b"/echo/x", host=host), status, code)


def hostCases() -> list[Case]:
    """
    Hosts, on a proxy with no C{--host-tier}: every valid host names the
    C{api} tier, and is forwarded exactly as sent; a malformed one is 400.
    """
    return [
        _hostRouted("port", b"h.example:8080"),
        _hostRouted("trailing dot", b"h.example."),
        _hostRouted("upper case", b"H.EXAMPLE"),
        _hostRouted("IPv4 literal", b"127.0.0.1"),
        _hostRouted("IPv4 literal and port", b"127.0.0.1:30080"),
        _hostRouted("IPv6 literal", b"[::1]"),
        _hostRouted("IPv6 literal and port", b"[::1]:30080"),
        _hostRefused("brackets around a name", b"[h.example]"),
        _hostRefused("unbracketed IPv6", b"::1"),
        _hostRefused("empty label", b"h..example"),
        _hostRefused("two trailing dots", b"h.example.."),
        _hostRefused("empty port", b"h.example:"),
        _hostRefused("six-digit port", b"h.example:123456"),
        _hostRefused("slash", b"h.example/echo"),
        _hostRefused("question mark", b"h.example?x"),
        _hostRefused("hash", b"h.example#x"),
        _hostRefused("tab", b"h.\texample"),
        _hostRefused("non-ASCII", b"h\xc3\xa9.example"),
        _hostRefused("percent-encoded", b"h%2eexample"),
        _hostRefused("backslash", b"h.example\\evil.example"),
    ]


#: The C{--host-tier} mapping L{hostTierCases} run under.
HOST_TIER_ARGS = ["--host-tier", "api.example.com=api"]


def hostTierCases() -> list[Case]:
    """
    Hosts, with C{--host-tier api.example.com=api}: the mapped host matches
    in any case, with a port or one trailing dot; any other host, an IP
    literal included, is 404 unknown_host, with no fallback.
    """
    return [
        _hostRouted("mapped", b"api.example.com"),
        _hostRouted("mapped, port", b"api.example.com:443"),
        _hostRouted("mapped, trailing dot", b"api.example.com."),
        _hostRouted("mapped, mixed case", b"API.Example.COM"),
        _hostRefused("unknown", b"h.example", 404, "unknown_host"),
        _hostRefused(
            "subdomain of a mapped host", b"x.api.example.com", 404, "unknown_host"
        ),
        _hostRefused(
            "mapped host as a suffix", b"evilapi.example.com", 404, "unknown_host"
        ),
        _hostRefused("IP literal", b"127.0.0.1", 404, "unknown_host"),
        _hostRefused("IPv6 literal", b"[::1]", 404, "unknown_host"),
        Case(
            "no Host, HTTP/1.0",
            request(b"/echo/x", version=b"HTTP/1.0", host=None),
            404,
            "unknown_host",
        ),
    ]


def everyCase(port: int) -> list[tuple[str, bytes]]:
    """
    Every case of every table, as (name, raw bytes), with C{port} as the
    proxy's: the fuzz target's seeds.
    """
    cases = [
        *pathCases(),
        *hopByHopRequestCases(),
        *hopByHopResponseCases(),
        *untrustedForwardingCases(port),
        *trustedForwardingCases(port),
        *framingCases(),
        *transferEncodingCases(),
        *smugglingCases(),
        *hostCases(),
        *hostTierCases(),
    ]
    return [(case.name, case.raw) for case in cases]
