"""
End-to-end corpus: raw bytes on real sockets to a real C{twistd monedge}
process, checking both what the client gets back and what the upstream
received (or that it received nothing).

Each test method starts one proxy and runs a table of cases from
L{tests.corpus_cases} through it, one fresh connection per case, and fails
once at the end listing every case that went wrong.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import reactor, task, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request

from monedge.rules.errors import CATALOGUE
from monedge.testing import ProxyProcess, Received, RecordingUpstream
from tests import corpus_cases
from tests.corpus_cases import Case, request
from tests.e2e import ProxyTestCase

#: Seconds one exchange may take in all before it counts as a hang.
EXCHANGE_TIMEOUT = 5.0

#: Seconds to wait, after the expected responses, for the proxy to close.
CLOSE_GRACE = 0.3

_FRESH_ID = re.compile(rb"[0-9a-f]{32}\Z")
_ERROR_KEYS = {"status", "code", "message", "request_id"}
_VERSIONS = (b"HTTP/1.1", b"HTTP/1.0")


# The wire: a raw client and a strict enough response parser.


class MalformedResponse(ValueError):
    """
    The proxy sent bytes that are not an HTTP/1.x response.
    """


@dataclass
class Response:
    """
    One parsed response; header names lowercased, in wire order.
    """

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        """
        Every value of header C{name} (lowercase), in order.
        """
        return [v for n, v in self.headers if n == name]


@dataclass
class Exchange:
    """
    What one raw exchange got back.

    @ivar raw: every byte the proxy sent.
    @ivar closed: whether the proxy closed the connection.
    @ivar note: a transport problem worth reporting, if any.
    """

    raw: bytes
    closed: bool
    note: str = ""


def _dechunk(data: bytes) -> tuple[bytes, bytes] | None:
    """
    Decode a chunked body at the start of C{data}: the body and what
    follows it, or L{None} if it is not all here yet.
    """
    body = b""
    rest = data
    while True:
        line, sep, after = rest.partition(b"\r\n")
        if not sep:
            return None
        try:
            size = int(line.split(b";")[0], 16)
        except ValueError:
            raise MalformedResponse(f"bad chunk size line {line[:40]!r}") from None
        if size == 0:
            if after.startswith(b"\r\n"):
                return body, after[2:]
            _, sep, after = after.partition(b"\r\n\r\n")
            return (body, after) if sep else None
        if len(after) < size + 2:
            return None
        if after[size : size + 2] != b"\r\n":
            raise MalformedResponse("a chunk does not end with CRLF")
        body += after[:size]
        rest = after[size + 2 :]


def parseResponses(data: bytes, closed: bool) -> tuple[list[Response], bytes]:
    """
    Every complete HTTP/1.x response at the start of C{data} (none of them
    an answer to HEAD), and the bytes left over.  A body delimited by the connection's
    close is complete only if C{closed}.

    @raise MalformedResponse: for bytes that are no HTTP/1.x response.
    """
    responses: list[Response] = []
    rest = data
    while rest:
        head, sep, after = rest.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        version = parts[0]
        if len(parts) < 2 or version not in _VERSIONS or not parts[1].isdigit():
            raise MalformedResponse(f"bad status line {lines[0][:80]!r}")
        status = int(parts[1])
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip():
                raise MalformedResponse(f"bad header line {line[:80]!r}")
            headers.append((name.lower(), value.strip(b" \t")))
        response = Response(status, headers, b"")
        encodings = response.header(b"transfer-encoding")
        lengths = response.header(b"content-length")
        if status < 200 or status in (204, 304):
            rest = after
        elif encodings:
            if encodings != [b"chunked"] or lengths:
                raise MalformedResponse(f"ambiguous framing {headers!r}")
            dechunked = _dechunk(after)
            if dechunked is None:
                break
            response.body, rest = dechunked
        elif lengths:
            if len(lengths) != 1 or not lengths[0].isdigit():
                raise MalformedResponse(f"bad Content-Length {lengths!r}")
            length = int(lengths[0])
            if len(after) < length:
                break
            response.body, rest = after[:length], after[length:]
        elif closed:
            response.body, rest = after, b""
        else:
            break
        responses.append(response)
    return responses, rest


def _finalCount(data: bytes) -> int:
    try:
        responses, _ = parseResponses(data, closed=False)
    except MalformedResponse:
        return 0
    return sum(1 for r in responses if r.status >= 200)


def rawExchange(
    port: int,
    data: bytes,
    finals: int = 1,
    timeout: float = EXCHANGE_TIMEOUT,
    grace: float = CLOSE_GRACE,
) -> Exchange:
    """
    Send C{data} on a fresh connection; read until the proxy closes it, or
    until C{finals} complete final responses are in and C{grace} more
    seconds pass without a close, or C{timeout} passes in all.  Blocking:
    call it in a thread.
    """
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    closed = False
    note = ""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
        except OSError as e:
            # The proxy may refuse and close before reading everything.
            note = f"send failed: {e!r}"
        stop = deadline
        while True:
            remaining = stop - time.monotonic()
            if remaining <= 0:
                if stop == deadline:
                    note = note or f"no close and no complete answer in {timeout}s"
                break
            s.settimeout(remaining)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError as e:
                closed = True
                note = note or f"reset: {e!r}"
                break
            if not chunk:
                closed = True
                break
            chunks.append(chunk)
            if stop == deadline and _finalCount(b"".join(chunks)) >= finals:
                stop = min(deadline, time.monotonic() + grace)
    return Exchange(b"".join(chunks), closed, note)


# Checking one case.


def _checkResponse(case: Case, response: Response) -> tuple[list[str], bytes | None]:
    problems: list[str] = []
    if response.status != case.status:
        problems.append(f"status {response.status}, expected {case.status}")
    ids = response.header(b"x-request-id")
    requestId = ids[0] if len(ids) == 1 else None
    if requestId is None:
        problems.append(f"X-Request-Id {ids!r}, expected exactly one")
    elif case.requestId is not None and requestId != case.requestId:
        problems.append(f"X-Request-Id {requestId!r}, expected {case.requestId!r}")
    elif case.requestId is None and not _FRESH_ID.match(requestId):
        problems.append(f"X-Request-Id {requestId!r} is not a fresh 32-hex id")
    if case.code is not None:
        problems.extend(_checkErrorBody(case, response, requestId))
    for name, values in case.client.items():
        got = response.header(name)
        if got != list(values):
            problems.append(f"client got {name.decode()} {got!r}, expected {values!r}")
    if case.uri is not None and case.echo and response.status == 200:
        try:
            echoed = json.loads(response.body)["uri"]
        except (ValueError, KeyError, TypeError):
            problems.append(
                f"client body is not the upstream's echo: {response.body!r}"
            )
        else:
            if echoed != case.uri.decode("latin-1"):
                problems.append(f"client body echoes uri {echoed!r}")
    return problems, requestId


def _checkErrorBody(
    case: Case, response: Response, requestId: bytes | None
) -> list[str]:
    assert case.code is not None
    problems: list[str] = []
    if CATALOGUE.get(case.code, (None,))[0] != case.status:
        problems.append(f"test mistake: {case.code} is not a {case.status}")
    if response.header(b"content-type") != [b"application/json"]:
        problems.append(f"error Content-Type {response.header(b'content-type')!r}")
    try:
        document: Any = json.loads(response.body)
    except ValueError:
        return [*problems, f"error body is not JSON: {response.body[:200]!r}"]
    if not isinstance(document, dict) or set(document) != _ERROR_KEYS:
        return [*problems, f"error body has the wrong shape: {document!r}"]
    if document["code"] != case.code:
        problems.append(f"error code {document['code']!r}, expected {case.code!r}")
    if document["status"] != case.status:
        problems.append(f"error body status {document['status']!r}")
    if not isinstance(document["message"], str) or not document["message"]:
        problems.append(f"error message {document['message']!r}")
    if requestId is not None and document["request_id"] != requestId.decode():
        problems.append(
            f"error body request_id {document['request_id']!r} is not the"
            f" X-Request-Id {requestId!r}"
        )
    return problems


def _checkUpstream(
    case: Case, received: list[Received], requestId: bytes | None
) -> list[str]:
    if case.uri is None:
        if received:
            return [
                "the upstream must receive nothing, but received "
                + repr([(r.method, r.uri) for r in received])
            ]
        return []
    if len(received) != 1:
        return [
            f"the upstream received {[(r.method, r.uri) for r in received]!r},"
            f" expected one request for {case.uri!r}"
        ]
    [seen] = received
    problems: list[str] = []
    if seen.uri != case.uri:
        problems.append(f"upstream uri {seen.uri!r}, expected {case.uri!r}")
    for name, values in case.upstream.items():
        got = seen.header(name)
        if got != list(values):
            problems.append(
                f"upstream got {name.decode()} {got!r}, expected {list(values)!r}"
            )
    if case.body is not None and seen.body != case.body:
        problems.append(f"upstream body {seen.body!r}, expected {case.body!r}")
    if requestId is not None and seen.header(b"x-request-id") != [requestId]:
        problems.append(
            f"upstream X-Request-Id {seen.header(b'x-request-id')!r}, the client"
            f" got {requestId!r}"
        )
    return problems


def checkCase(case: Case, exchange: Exchange, received: list[Received]) -> list[str]:
    """
    Everything wrong with one exchange, as readable lines; empty if right.
    """
    try:
        responses, rest = parseResponses(exchange.raw, exchange.closed)
    except MalformedResponse as e:
        return [f"malformed response ({e}): {exchange.raw[:400]!r}"]
    problems: list[str] = []
    interim = [r.status for r in responses if r.status < 200]
    if any(status != 100 for status in interim):
        problems.append(f"interim responses {interim!r}: only 100 may come")
    finals = [r for r in responses if r.status >= 200]
    requestId: bytes | None = None
    if not finals:
        note = f" ({exchange.note})" if exchange.note else ""
        problems.append(f"no complete response{note}: got {exchange.raw[:400]!r}")
    else:
        if len(finals) > 1 or rest:
            problems.append(
                f"{len(finals)} responses and {rest[:200]!r} left over: expected one"
            )
        responseProblems, requestId = _checkResponse(case, finals[0])
        problems.extend(responseProblems)
    problems.extend(_checkUpstream(case, received, requestId))
    if case.closes and not exchange.closed:
        problems.append("the proxy kept the connection open after the response")
    elif not case.closes and exchange.closed:
        problems.append("the proxy closed a persistent connection")
    return problems


class CorpusTestCase(ProxyTestCase):
    """
    Runs case tables through a proxy and reports every failing case.
    """

    async def runCases(
        self,
        proxy: ProxyProcess,
        cases: Sequence[Case],
        upstreams: Sequence[RecordingUpstream],
    ) -> None:
        """
        Run each case on a fresh connection, in order; fail once, listing
        every case that went wrong, with its bytes and its problems, and
        any traceback the proxy logged.
        """
        self.assertLessEqual(len(cases), 150)
        names = [case.name for case in cases]
        self.assertEqual(len(names), len(set(names)), "case names must be unique")
        failures: list[str] = []
        for case in cases:
            before = [len(upstream.received) for upstream in upstreams]
            exchange = await threads.deferToThread(rawExchange, proxy.port, case.raw)
            received = [
                seen
                for upstream, count in zip(upstreams, before, strict=True)
                for seen in upstream.received[count:]
            ]
            problems = checkCase(case, exchange, received)
            if problems:
                failures.append(
                    f"[{case.name}] sent {case.raw[:300]!r}"
                    + "".join(f"\n    - {problem}" for problem in problems)
                )
        if "Traceback" in proxy.log():
            failures.append("[proxy log] has a traceback:\n" + proxy.log()[-3000:])
        if failures:
            self.fail(
                f"{len(failures)} of {len(cases)} cases failed:\n" + "\n".join(failures)
            )

    async def startDefault(
        self, args: Sequence[str] = (), **more: str
    ) -> tuple[ProxyProcess, RecordingUpstream]:
        """
        A recording upstream and a proxy whose registry is
        L{corpus_cases.services}; return the proxy and the upstream.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            corpus_cases.services(upstream.address, **more), args
        )
        return proxy, upstream


class PathCorpusTests(CorpusTestCase):
    """
    Request targets, Host and methods.
    """

    async def test_paths(self) -> None:
        """
        Every ambiguous target (dot segments, encoded separators, controls,
        bad UTF-8, double encoding, NFKC lookalikes) is a 400 with its
        stable code and reaches no upstream; invalid service names are a 404
        even when a service by that name is registered; routed targets reach
        the upstream as exactly one canonical path with the query verbatim;
        Host conflicts are 400s; CONNECT and TRACE are 405s.
        """
        proxy, upstream = await self.startDefault()
        await self.runCases(proxy, corpus_cases.pathCases(), [upstream])


class HopByHopTests(CorpusTestCase):
    """
    Hop-by-hop headers stop at monedge, both ways.
    """

    async def test_requestHeaders(self) -> None:
        """
        No hop-by-hop request header, and no header the client names in
        Connection, reaches the upstream; an upgrade request gets an
        ordinary response, never 101; the proxy honours Connection: close.
        """
        proxy, upstream = await self.startDefault()
        await self.runCases(proxy, corpus_cases.hopByHopRequestCases(), [upstream])

    async def test_responseHeaders(self) -> None:
        """
        No hop-by-hop response header, and no header the upstream names in
        Connection, reaches the client, from a twisted.web upstream or from
        a raw one that sends them verbatim.
        """

        def leaky(request: Request, seen: Received) -> bytes:
            headers = request.responseHeaders
            headers.setRawHeaders(b"connection", [b"X-Internal"])
            headers.setRawHeaders(b"x-internal", [b"secret"])
            headers.setRawHeaders(b"keep-alive", [b"timeout=5"])
            headers.setRawHeaders(b"proxy-authenticate", [b"Basic realm=x"])
            headers.setRawHeaders(b"trailer", [b"X-Sig"])
            headers.setRawHeaders(b"x-public", [b"yes"])
            return b"ok"

        hop = self.startUpstream(leaky)
        raw = RawUpstream(RawUpstream.LEAKY)
        raw.start()
        self.addCleanup(raw.stop)
        proxy, echo = await self.startDefault(hop=hop.address, rawhop=raw.address)
        cases = corpus_cases.hopByHopResponseCases()
        await self.runCases(proxy, cases, [echo, hop])
        self.assertEqual(raw.requests, 2)


class ForwardingTests(CorpusTestCase):
    """
    X-Forwarded-*, Forwarded and X-Request-Id, with and without trusted
    hops.
    """

    async def test_untrustedClient(self) -> None:
        """
        With --trusted-hops 0 (the default) whatever the client sends as
        X-Forwarded-*, Forwarded or X-Request-Id is replaced by monedge's
        own values; the upstream's X-Request-Id is the client's response
        header, 32 hex digits.
        """
        proxy, upstream = await self.startDefault()
        await self.runCases(
            proxy, corpus_cases.untrustedForwardingCases(proxy.port), [upstream]
        )

    async def test_trustedHop(self) -> None:
        """
        With --trusted-hops 1 only the last X-Forwarded-For entry is kept
        before the peer, a valid single X-Request-Id is kept and echoed, an
        invalid one is replaced, and X-Forwarded-Proto is kept only if it is
        http or https.
        """
        proxy, upstream = await self.startDefault(["--trusted-hops", "1"])
        await self.runCases(
            proxy, corpus_cases.trustedForwardingCases(proxy.port), [upstream]
        )


class ClientControlledTests(CorpusTestCase):
    """
    The client-controlled headers (X-Real-IP, True-Client-IP, X-Original-URL,
    X-HTTP-Method-Override and the rest of the family in docs/security.md),
    --trusted-proxies, --trusted-header, --identity-header and X-Real-IP.
    """

    async def test_noTrustedHops(self) -> None:
        """
        With --trusted-hops 0 (the default) no client-controlled header
        reaches the upstream, one by one or all at once in any spelling,
        and X-Real-IP is the TCP peer.
        """
        proxy, upstream = await self.startDefault()
        await self.runCases(
            proxy, corpus_cases.clientControlledCases(proxy.port), [upstream]
        )

    async def test_untrustedPeer(self) -> None:
        """
        With --trusted-hops 1 but a peer outside --trusted-proxies, nothing
        the client sends is believed: X-Forwarded-For and X-Real-IP are the
        peer, and even a --trusted-header does not pass.
        """
        proxy, upstream = await self.startDefault(
            [
                "--trusted-hops",
                "1",
                "--trusted-proxies",
                "10.0.0.0/8",
                "--trusted-header",
                "CF-Connecting-IP",
            ]
        )
        cases = corpus_cases.clientControlledCases(proxy.port, forwardedFor=b"1.2.3.4")
        cases += corpus_cases.untrustedForwardingCases(proxy.port)
        await self.runCases(proxy, cases, [upstream])

    async def test_trustedPeer(self) -> None:
        """
        From a peer inside --trusted-proxies (one hop by default), the last
        X-Forwarded-For entry is the client and X-Real-IP; a
        --trusted-header passes as sent, every other client-controlled
        header is still removed.
        """
        proxy, upstream = await self.startDefault(
            [
                "--trusted-proxies",
                "127.0.0.0/8",
                "--trusted-header",
                "CF-Connecting-IP",
                "--trusted-header",
                "x-envoy-retry-on",
            ]
        )
        cases = corpus_cases.clientControlledCases(
            proxy.port,
            client=b"1.2.3.4",
            chain=b"1.2.3.4, 127.0.0.1",
            forwardedFor=b"6.6.6.6, 1.2.3.4",
            passed=[b"cf-connecting-ip", b"x-envoy-retry-on"],
        )
        await self.runCases(proxy, cases, [upstream])

    async def test_trustedChain(self) -> None:
        """
        With several trusted hops, the walk back through X-Forwarded-For
        stops at the first address outside --trusted-proxies: that one is
        the client, and what came before it is dropped.
        """
        proxy, upstream = await self.startDefault(
            [
                "--trusted-hops",
                "3",
                "--trusted-proxies",
                "127.0.0.0/8",
                "--trusted-proxies",
                "10.0.0.0/8",
            ]
        )

        def case(name: str, sent: bytes, chain: bytes) -> Case:
            return Case(
                name,
                corpus_cases.request(b"/echo/w", b"X-Forwarded-For: " + sent),
                200,
                uri=b"/w",
                upstream={
                    b"x-forwarded-for": [chain],
                    b"x-real-ip": [chain.split(b", ")[0]],
                },
            )

        await self.runCases(
            proxy,
            [
                case(
                    "stops at the first untrusted address",
                    b"6.6.6.6, 1.2.3.4, 10.0.0.5",
                    b"1.2.3.4, 10.0.0.5, 127.0.0.1",
                ),
                case(
                    "at most three hops",
                    b"6.6.6.6, 10.0.0.7, 10.0.0.6, 10.0.0.5",
                    b"10.0.0.7, 10.0.0.6, 10.0.0.5, 127.0.0.1",
                ),
                case(
                    "a garbage entry is the client",
                    b"1.2.3.4, not-an-address",
                    b"not-an-address, 127.0.0.1",
                ),
            ],
            [upstream],
        )

    async def test_noRealIp(self) -> None:
        """
        With --no-real-ip monedge sets no X-Real-IP, and the client's is
        removed like any other client-controlled header.
        """
        proxy, upstream = await self.startDefault(["--no-real-ip"])
        await self.runCases(
            proxy,
            corpus_cases.clientControlledCases(proxy.port, realIp=False),
            [upstream],
        )

    async def test_rateLimitBucket(self) -> None:
        """
        A client outside --trusted-proxies cannot choose its rate-limit
        bucket with X-Forwarded-For: requests with five different forged
        addresses share the peer's bucket of two.
        """
        proxy, upstream = await self.startDefault(
            [
                "--trusted-hops",
                "1",
                "--trusted-proxies",
                "10.0.0.0/8",
                "--hook",
                '{"name": "ratelimit", "options": {"rate": "2/m"}}',
            ]
        )

        def attempt(n: int, status: int) -> Case:
            return Case(
                f"forged address {n}",
                corpus_cases.request(
                    b"/echo/r", b"X-Forwarded-For: 198.51.100.%d" % (n,)
                ),
                status,
                code=None if status == 200 else "rate_limited",
                uri=b"/r" if status == 200 else None,
            )

        await self.runCases(
            proxy,
            [attempt(n, 200 if n < 2 else 429) for n in range(5)],
            [upstream],
        )

    async def test_identityHeaders(self) -> None:
        """
        --identity-header names are removed from every request to every
        service, from untrusted and trusted peers alike, on routes that
        run no hook.
        """
        names = [b"X-User-Role", b"X-User-Id"]
        args = [arg for name in names for arg in ("--identity-header", name.decode())]
        proxy, upstream = await self.startDefault(
            [*args, "--trusted-proxies", "127.0.0.1/32"]
        )
        await self.runCases(proxy, corpus_cases.identityHeaderCases(names), [upstream])


class FramingTests(CorpusTestCase):
    """
    Request framing and header limits.
    """

    async def test_framing(self) -> None:
        """
        Conflicting or malformed Content-Length and Transfer-Encoding,
        obs-fold, NUL and malformed header lines are 400 bad_request;
        oversized request lines are 414 and oversized or too many headers
        431; none reach the upstream.  Valid bodies, chunked or not, reach
        it intact with a regenerated Content-Length and no
        Transfer-Encoding.
        """
        proxy, upstream = await self.startDefault()
        await self.runCases(proxy, corpus_cases.framingCases(), [upstream])


class HostCorpusTests(CorpusTestCase):
    """
    Hosts: ports, trailing dots, IP literals, malformed and unknown hosts.
    """

    async def test_hosts(self) -> None:
        """
        Without --host-tier, a host with a port, a trailing dot, another
        case or an IP literal routes to the api tier and is forwarded as
        sent; a malformed one is 400 bad_request, nothing upstream.
        """
        proxy, upstream = await self.startDefault()
        await self.runCases(proxy, corpus_cases.hostCases(), [upstream])

    async def test_hostTiers(self) -> None:
        """
        With --host-tier, the mapped host matches with a port, a trailing
        dot or in another case; any other host, IP literals and HTTP/1.0
        without Host included, is 404 unknown_host, nothing upstream.
        """
        proxy, upstream = await self.startDefault(corpus_cases.HOST_TIER_ARGS)
        await self.runCases(proxy, corpus_cases.hostTierCases(), [upstream])


class SmugglingTests(CorpusTestCase):
    """
    Request smuggling: C{Transfer-Encoding} obfuscations, and every other
    framing trick that could make monedge and an upstream disagree on where
    a request ends.
    """

    async def test_transferEncodingObfuscations(self) -> None:
        """
        Each whitespace, case and control-byte variant of
        C{Transfer-Encoding}, alone (TE.TE) or beside a C{Content-Length}
        (CL.TE, TE.CL), is either decoded as chunked (alone, when it is
        exactly C{chunked} after optional whitespace, in any case) or
        refused with 400 bad_request and the connection closed; the
        smuggled request after the body never reaches the upstream.
        """
        proxy, upstream = await self.startDefault()
        await self.runCases(proxy, corpus_cases.transferEncodingCases(), [upstream])
        self.assertNotIn(b"/smuggled", [seen.uri for seen in upstream.received])

    async def test_framingTricks(self) -> None:
        """
        HTTP/1.0 bodies, bare CR, LF and NUL, malformed chunks and
        Content-Lengths are refused; a body that is a request stays body;
        bytes after Connection: close are never parsed; header names with
        underscores are dropped before the upstream (and before any hook),
        however they are spelt.
        """
        proxy, upstream = await self.startDefault()
        await self.runCases(proxy, corpus_cases.smugglingCases(), [upstream])
        self.assertNotIn(b"/smuggled", [seen.uri for seen in upstream.received])

    async def test_underscoreHeadersRejectAndAllow(self) -> None:
        """
        With --underscore-headers reject, a header name with an underscore
        is 400 bad_request and the connection closed, nothing upstream;
        with allow, it is forwarded as sent.
        """
        upstream = self.startUpstream()
        registry = corpus_cases.services(upstream.address)
        reject = await self.startProxy(registry, ["--underscore-headers", "reject"])
        raw = request(b"/echo/x", b"X_User_Id: admin")
        await self.runCases(
            reject, [Case("rejected", raw, 400, "bad_request")], [upstream]
        )
        allow = await self.startProxy(registry, ["--underscore-headers", "allow"])
        await self.runCases(
            allow,
            [Case("allowed", raw, 200, uri=b"/x", upstream={b"x_user_id": [b"admin"]})],
            [upstream],
        )


class PipeliningTests(CorpusTestCase):
    """
    Pipelined requests on one connection.
    """

    async def test_inOrder(self) -> None:
        """
        Three requests written at once on one connection, the first one
        slow at the upstream, are answered in order, each with its own
        body and request id, and the connection closes after the third.
        """
        pending: list[Any] = []

        def echoPath(request: Request, seen: Received) -> bytes | int:
            if seen.uri == b"/slow":

                def finish() -> None:
                    if not request.finished and not request._disconnected:
                        request.write(seen.uri)
                        request.finish()

                pending.append(reactor.callLater(0.3, finish))
                return NOT_DONE_YET
            return seen.uri

        def cancelPending() -> None:
            for call in pending:
                if call.active():
                    call.cancel()

        upstream = self.startUpstream(echoPath)
        self.addCleanup(cancelPending)
        proxy = await self.startProxy(
            {"service.api.echo": {"endpoints": [upstream.address]}}
        )
        data = (
            request(b"/echo/slow", close=False)
            + request(b"/echo/two", close=False)
            + request(b"/echo/three")
        )
        exchange = await threads.deferToThread(rawExchange, proxy.port, data, 3)
        responses, rest = parseResponses(exchange.raw, exchange.closed)
        self.assertEqual(
            [(r.status, r.body) for r in responses],
            [(200, b"/slow"), (200, b"/two"), (200, b"/three")],
            exchange.raw,
        )
        self.assertEqual(rest, b"")
        self.assertTrue(exchange.closed, "no close after Connection: close")
        self.assertEqual(
            [seen.uri for seen in upstream.received], [b"/slow", b"/two", b"/three"]
        )
        ids = [r.header(b"x-request-id") for r in responses]
        self.assertEqual(
            [seen.header(b"x-request-id") for seen in upstream.received], ids
        )
        self.assertEqual(len({tuple(i) for i in ids}), 3)
        self.assertNotIn("Traceback", proxy.log())


# A raw upstream, for response headers twisted.web would not send as given.


class _FixedResponses(Protocol):
    """
    Answers every bodiless request on the connection with one fixed
    response, and keeps the connection open.
    """

    def __init__(self, upstream: RawUpstream) -> None:
        self._upstream = upstream
        self._buffer = b""

    def connectionMade(self) -> None:
        self._upstream.connections.add(self)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._upstream.connections.discard(self)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while b"\r\n\r\n" in self._buffer:
            _, _, self._buffer = self._buffer.partition(b"\r\n\r\n")
            self._upstream.requests += 1
            assert self.transport is not None
            self.transport.write(self._upstream.response)


class _RawFactory(ServerFactory[Any]):
    noisy = False

    def __init__(self, upstream: RawUpstream) -> None:
        self._upstream = upstream

    def buildProtocol(self, addr: IAddress | None) -> _FixedResponses:
        return _FixedResponses(self._upstream)


class RawUpstream:
    """
    An upstream on 127.0.0.1 that answers every request with the same raw
    bytes.
    """

    #: A response whose hop-by-hop headers, and those named in Connection
    #: (in two Connection headers, one with a list), must not reach the
    #: client.
    LEAKY = (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Length: 2\r\n"
        b"Connection: X-Internal, X-Other\r\n"
        b"Connection: keep-alive\r\n"
        b"X-Internal: secret\r\n"
        b"X-Other: 1\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Authenticate: Basic realm=x\r\n"
        b"Trailer: X-Sig\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Public: yes\r\n"
        b"\r\n"
        b"ok"
    )

    def __init__(self, response: bytes) -> None:
        self.response = response
        self.requests = 0
        self.connections: set[_FixedResponses] = set()
        self._port: IListeningPort | None = None

    def start(self) -> None:
        """
        Listen on a free port.
        """
        self._port = reactor.listenTCP(0, _RawFactory(self), interface="127.0.0.1")

    @property
    def address(self) -> str:
        """
        C{127.0.0.1:port}.
        """
        assert self._port is not None
        return f"127.0.0.1:{getattr(self._port.getHost(), 'port')}"  # noqa: B009

    def stop(self) -> Deferred[None]:
        """
        Stop listening and wait (briefly) for the proxy's connections, which
        close when it exits, to be gone.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        assert self._port is not None
        stopped = self._port.stopListening()
        if stopped is not None:
            await stopped
        for protocol in list(self.connections):
            assert protocol.transport is not None
            protocol.transport.loseConnection()
        for _ in range(100):
            if not self.connections:
                return
            await task.deferLater(reactor, 0.02, lambda: None)
