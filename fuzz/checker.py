"""
The invariants behind monedge's request-path fuzz target
(C{fuzz/request_path.py}) and its regression tests (C{tests/test_fuzz.py}).

L{checkRequestBytes} treats its input as the raw bytes a client sends on one
connection.  It feeds them to a real L{ProxySite} (real channel, request,
resource tree and exchange) over a L{StringTransport}, once whole and once
split at points derived from the input, with an upstream client that
answers every request with a small 200 tagged with the call's index, runs a
L{MemoryReactorClock} past every limit, and checks:

 1. nothing is logged at error or critical level, and no failure is logged;
 2. what the client receives is a sequence of complete, well-formed HTTP/1.x
    responses, one per request monedge framed, with no Python traceback;
    every 4xx and 5xx is monedge's JSON error with a catalogued code and the
    response's request id;
 3. every upstream call belongs to exactly one request monedge framed, which
    an independent strict framer framed identically; its framing headers are
    monedge's own (no hop-by-hop header but a checked WebSocket
    handshake's, one Host, no Content-Length); its service is a valid
    C{service.<tier>.<name>} and its path is what L{normalise} gives for the
    client's target under that service's policy;
 4. responses are never crossed: the response to the request that made
    call I{i} carries call I{i}'s tag and body;

and that the whole and the split feed give the same statuses and calls.  It
also checks the pure layer on the same bytes: L{normalise} (idempotent,
routes on the first segment it forwards) and the header policy of
L{monedge.rules.headers}.  A broken invariant raises L{AssertionError}.
"""

from __future__ import annotations

import io
import json
import random
import re
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from monedge.edge.http1 import HTTP1Channel, HTTP1Request
from monedge.edge.http2 import PREFACE
from monedge.edge.server import ProxySite
from monedge.interfaces import IUpstreamClient
from monedge.observe.accesslog import AccessLog
from monedge.observe.metrics import Metrics
from monedge.registry import ServiceEntry
from monedge.rules.convention import isValidName, parseServiceName, serviceName
from monedge.rules.errors import CATALOGUE
from monedge.rules.headers import (
    CLIENT_CONTROLLED_NAMES,
    CLIENT_CONTROLLED_PREFIXES,
    HOP_BY_HOP,
    ForwardingRules,
    connectionTokens,
    downstreamHeaders,
    requestIdFor,
    upstreamHeaders,
)
from monedge.rules.paths import PathError, RoutedPath, normalise, splitAbsoluteForm
from monedge.rules.policy import Policy
from monedge.rules.trust import Trust
from monedge.runtime.compose import buildProxy
from monedge.runtime.config import Configuration
from monedge.testing import BodySink, FakeResponse, MemoryRegistry, endpoint
from monedge.upstream.balancer import Balancer
from monedge.upstream.endpoints import UpstreamTLS
from monedge.upstream.upgrade import wantsWebSocket

#: The client's address and the listener's, as every connection sees them.
PEER = "192.0.2.7"
LISTENER_PORT = 30080


@dataclass(frozen=True)
class FuzzService:
    """
    One service of the fuzz registry.

    @ivar name: its registry name.
    @ivar address: its only endpoint, unique to it, so that a call's URL
        names the service it went to.
    @ivar policy: its policy.
    """

    name: str
    address: str
    policy: Policy = field(default_factory=Policy)


#: The registry every check runs on.  The decoys are names the convention
#: refuses: a call to one of their addresses is a routing bug.
SERVICES: tuple[FuzzService, ...] = (
    FuzzService("service.api.echo", "10.0.0.1:80"),
    FuzzService("service.api.other", "10.0.0.2:8080"),
    FuzzService("service.api.legacy", "10.0.0.3:80", Policy(stripPrefix=False)),
    FuzzService("service.api.internal", "10.0.0.4:80", Policy(expose=False)),
    FuzzService("service.api.small", "10.0.0.5:80", Policy(maxBodySize=16)),
    FuzzService("service.api." + "a" * 63, "10.0.0.6:80"),
    FuzzService("service.api.ECHO", "10.0.9.1:80"),
    FuzzService("service.api.Echo", "10.0.9.2:80"),
    FuzzService("service.api.9abc", "10.0.9.3:80"),
    FuzzService("service.api.a_b", "10.0.9.4:80"),
    FuzzService("service.api.x-", "10.0.9.5:80"),
    FuzzService("service.api." + "a" * 64, "10.0.9.6:80"),
)

_BY_ADDRESS = {s.address.encode("ascii"): s for s in SERVICES}
_BY_NAME = {s.name: s for s in SERVICES}

#: How far the clock is run once the input is in: past the header (10 s),
#: body (30 s), send (60 s) and keep-alive (75 s) limits and the linger.
_ADVANCES = (0.0, 1.0, 2.5, 5.0, 11.0, 31.0, 61.0, 76.0, 120.0)

#: The refusals the channel makes on its own (docs/errors.md).
_CHANNEL_REFUSALS = frozenset(
    ["request_timeout", "uri_too_long", "headers_too_large", "bad_request"]
)

_HEX32 = re.compile(rb"[0-9a-f]{32}\Z")
#: An RFC 9110 token: a header name or a method.  The checker's own, apart
#: from monedge's grammar, so that it judges monedge independently.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_CALL_URL = re.compile(rb"http://([0-9.]+:[0-9]+)(/[^?#]*)(\?[^#]*)?\Z")

#: The headers monedge owns on the way up (docs/convention.md).
_FORWARDING = (
    b"x-forwarded-for",
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"x-forwarded-prefix",
    b"x-request-id",
)

#: Headers monedge sets on the way up even when the client names them in
#: its Connection header.
_OWNED = frozenset([b"host", b"x-real-ip", *_FORWARDING])


def fail(message: str, *details: object) -> AssertionError:
    """
    The error a broken invariant raises: C{message}, then each detail.
    """
    text = message
    for detail in details:
        text += "\n  " + (
            detail.decode("latin-1") if isinstance(detail, bytes) else repr(detail)
        )
    return AssertionError(text)


# The upstream


@dataclass
class Call:
    """
    One request monedge sent upstream.

    @ivar index: its position among the connection's calls.
    @ivar request: the client request being processed when it was made.
    """

    index: int
    method: bytes
    url: bytes
    headers: Headers
    request: HTTP1Request | None
    result: Deferred[IResponse]
    answered: bool = False
    cancelled: bool = False
    #: The body as the upstream took it, and whether it came whole (a
    #: request with no body is whole at once).
    sink: BodySink | None = None
    whole: bool = True

    @property
    def body(self) -> bytes:
        return b"".join(self.sink.data) if self.sink is not None else b""


def answerBody(call: Call) -> bytes:
    """
    The body the upstream answers C{call} with: its tag and its URL.
    """
    return b"call %d %s\n" % (call.index, call.url)


@implementer(IUpstreamClient)
class TaggingUpstream:
    """
    An upstream client that records every call and, when L{answer} is
    called, answers each pending one with a 200 tagged C{X-Fuzz-Call: <i>}
    and a body naming it (L{answerBody}), the most recent call first.

    @param tagOffset: added to every tag: anything but 0 makes the upstream
        lie about which call it answers (for testing the checker).
    @param mangle: applied to the headers of every call as it is recorded
        (for testing the checker).
    """

    def __init__(
        self,
        tagOffset: int = 0,
        mangle: Callable[[Headers], None] | None = None,
    ) -> None:
        self.calls: list[Call] = []
        self.pending: list[Call] = []
        self.current: HTTP1Request | None = None
        self.tagOffset = tagOffset
        self.mangle = mangle

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        connectTimeout: float,
        tls: UpstreamTLS | None = None,
    ) -> Deferred[IResponse]:
        call: Call

        def cancel(d: Deferred[IResponse]) -> None:
            call.cancelled = True

        result: Deferred[IResponse] = Deferred(cancel)
        if self.mangle is not None:
            self.mangle(headers)
        call = Call(len(self.calls), method, url, headers, self.current, result)
        if body is not None:
            # Taken as an upstream connection takes it; the upstream answers
            # only once it has the whole body, as most do.
            call.whole = False
            sink = call.sink = BodySink()

            def whole(_: object) -> None:
                call.whole = True

            body.startProducing(sink).addCallbacks(whole, lambda _: None)
        self.calls.append(call)
        self.pending.append(call)
        return result

    def answer(self) -> int:
        """
        Answer every pending call, last first; return how many.
        """
        count = 0
        waiting = []
        while self.pending:
            call = self.pending.pop()
            if call.cancelled or call.result.called:
                continue
            if not call.whole:
                waiting.append(call)
                continue
            body = answerBody(call)
            tag = b"%d" % (call.index + self.tagOffset,)
            response = FakeResponse(
                200,
                Headers({b"content-type": [b"text/plain"], b"x-fuzz-call": [tag]}),
                length=len(body),
            )
            call.answered = True
            call.result.callback(response)
            count += 1
            if response.protocol is None:
                continue
            if not response.transport.stopped:
                response.deliver(body)
            response.end()
        self.pending[:0] = reversed(waiting)
        return count

    def close(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        d.callback(None)
        return d


# The proxy


class _RecordingHTTP1Request(HTTP1Request):
    """
    An L{HTTP1Request} that records itself, in the order the channel makes
    requests, and tells the upstream which request is being processed.
    """

    site: _FuzzSite

    def __init__(self, channel: Any, method: bytes, uri: bytes, version: bytes) -> None:
        super().__init__(channel, method, uri, version)
        self.site.made.append(self)

    def process(self) -> None:
        upstream = self.site.upstream
        upstream.current = self
        try:
            super().process()
        finally:
            upstream.current = None


class _RecordingHTTP1Channel(HTTP1Channel):
    requestClass = _RecordingHTTP1Request


class _FuzzSite(ProxySite):
    channelFactory = _RecordingHTTP1Channel

    def __init__(self, upstream: TaggingUpstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.upstream = upstream
        self.made: list[_RecordingHTTP1Request] = []


#: The proxy's configuration: the options' defaults.
_CONFIGURATION = Configuration()

_METRICS: Metrics | None = None


def _metrics() -> Metrics:
    # Prometheus metrics are the costly part of a proxy to build, and
    # nothing here reads them: one set serves every check.
    global _METRICS
    if _METRICS is None:
        _METRICS = Metrics()
    return _METRICS


def buildRegistry() -> MemoryRegistry:
    """
    The fuzz registry: L{SERVICES}.
    """
    registry = MemoryRegistry()
    registry.replaceAll(
        [
            ServiceEntry(s.name, (endpoint(s.address),), policy=s.policy)
            for s in SERVICES
        ]
    )
    return registry


@dataclass
class Outcome:
    """
    What one connection did: the bytes the client received, whether the
    proxy closed it, every request the channel made and every call.
    """

    output: bytes
    closed: bool
    requests: list[_RecordingHTTP1Request]
    calls: list[Call]


def runConnection(
    chunks: Sequence[bytes],
    answerAfter: Sequence[bool] = (),
    upstream: TaggingUpstream | None = None,
    registry: MemoryRegistry | None = None,
) -> Outcome:
    """
    Open one connection to a fresh proxy, send C{chunks} one
    C{dataReceived} each (stopping once the proxy closes the connection, as
    a real transport stops reading), answer the upstream after chunk I{i}
    if C{answerAfter[i]}, then answer the upstream and run the clock past
    every limit, and finally let the client go.
    """
    clock = MemoryReactorClock()
    upstream = upstream if upstream is not None else TaggingUpstream()
    # The one wiring (monedge.runtime.compose), on the fuzz fakes: no hooks,
    # WebSocket handshakes refused, a site that records its requests.
    site = buildProxy(
        _CONFIGURATION,
        clock,
        registry=registry if registry is not None else buildRegistry(),
        client=upstream,
        metrics=_metrics(),
        accessLog=AccessLog(io.StringIO()),
        balancer=Balancer(clock, rng=random.Random(7)),
        hooks=None,
        upgrader=None,
        siteFactory=partial(_FuzzSite, upstream),
    ).site
    assert isinstance(site, _FuzzSite)
    address = IPv4Address("TCP", PEER, 40000)
    protocol = site.buildProtocol(address)
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", LISTENER_PORT),
        peerAddress=address,
    )
    protocol.makeConnection(transport)
    for index, chunk in enumerate(chunks):
        if transport.disconnecting:
            break
        protocol.dataReceived(chunk)
        if index < len(answerAfter) and answerAfter[index]:
            upstream.answer()
    for step in _ADVANCES:
        upstream.answer()
        clock.advance(step)
    upstream.answer()
    closed = bool(transport.disconnecting)
    protocol.connectionLost(Failure(ConnectionDone()))
    clock.advance(1.0)
    return Outcome(transport.value(), closed, list(site.made), list(upstream.calls))


@contextmanager
def watchLog() -> Iterator[list[LogEvent]]:
    """
    Collect, while the block runs, every log event at error level or
    above and every event carrying a failure.
    """
    bad: list[LogEvent] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        level = event.get("log_level")
        if "log_failure" in event or level in (LogLevel.error, LogLevel.critical):
            bad.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        yield bad
    finally:
        globalLogPublisher.removeObserver(observe)


def _describe(event: LogEvent) -> str:
    failure = event.get("log_failure")
    text = str(event.get("log_format"))
    if isinstance(failure, Failure):
        text += "\n" + failure.getTraceback()
    return text


# Responses, as the client reads them


@dataclass
class Response:
    """
    One response parsed from what the client received.
    """

    version: bytes
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes

    def header(self, name: bytes) -> list[bytes]:
        """
        Every value of header C{name}, in order.
        """
        lowered = name.lower()
        return [v for n, v in self.headers if n.lower() == lowered]


_STATUS_LINE = re.compile(rb"(HTTP/1\.[01]) ([1-5][0-9][0-9]) ([\t\x20-\x7e]*)\Z")
_CHUNK_SIZE = re.compile(rb"([0-9a-fA-F]+)\Z")


def _line(data: bytes, start: int) -> tuple[bytes, int]:
    end = data.find(b"\r\n", start)
    if end < 0:
        raise fail("a truncated line in the response stream", data[start:][:200])
    return data[start:end], end + 2


def parseResponses(
    data: bytes, methods: Sequence[bytes], closed: bool
) -> tuple[list[Response], int]:
    """
    Parse the client's bytes strictly as HTTP/1.x responses.  The I{k}th
    final response answers a request with method C{methods[k]} (a HEAD
    response has no body).

    @return: the final responses and the number of interim (1xx) ones.
    @raise AssertionError: if anything is malformed, ambiguous or cut off.
    """
    responses: list[Response] = []
    interim = 0
    index = 0
    while index < len(data):
        start = index
        statusLine, index = _line(data, index)
        match = _STATUS_LINE.match(statusLine)
        if match is None:
            raise fail("a malformed status line", statusLine[:200])
        version, status = match.group(1), int(match.group(2))
        headers: list[tuple[bytes, bytes]] = []
        while True:
            line, index = _line(data, index)
            if not line:
                break
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name) or b"\x00" in value:
                raise fail("a malformed response header line", line[:200])
            headers.append((name, value.strip(b" \t")))
        response = Response(version, status, headers, b"", b"")
        if status < 200:
            if status != 100 or headers:
                raise fail("an unexpected interim response", data[start:index])
            interim += 1
            continue
        method = methods[len(responses)] if len(responses) < len(methods) else b"GET"
        lengths = response.header(b"content-length")
        codings = response.header(b"transfer-encoding")
        if len(lengths) > 1 or (lengths and codings):
            raise fail("a response with ambiguous framing", data[start:index])
        if method == b"HEAD" or status in (204, 304):
            body = b""
        elif codings:
            if codings != [b"chunked"]:
                raise fail("a response transfer coding", codings)
            pieces = []
            while True:
                sizeLine, index = _line(data, index)
                size = _CHUNK_SIZE.match(sizeLine)
                if size is None:
                    raise fail("a malformed response chunk size", sizeLine[:100])
                length = int(size.group(1), 16)
                if length == 0:
                    trailer, index = _line(data, index)
                    if trailer:
                        raise fail("a response trailer", trailer[:100])
                    break
                if index + length + 2 > len(data):
                    raise fail("a truncated response chunk", data[start:][:300])
                pieces.append(data[index : index + length])
                if data[index + length : index + length + 2] != b"\r\n":
                    raise fail("a chunk without its CRLF", data[start:][:300])
                index += length + 2
            body = b"".join(pieces)
        elif lengths:
            if not lengths[0].isdigit():
                raise fail("a malformed response Content-Length", lengths)
            length = int(lengths[0])
            if index + length > len(data):
                raise fail("a truncated response body", data[start:][:300])
            body = data[index : index + length]
            index += length
        else:
            # Ended by the close: only for the last response.
            if not closed:
                raise fail("a response with no length on an open connection")
            body = data[index:]
            index = len(data)
        response.body = body
        response.raw = data[start:index]
        responses.append(response)
    return responses, interim


def checkErrorResponse(response: Response, head: bool = False) -> str:
    """
    Check that C{response} is one of monedge's JSON errors; return its code
    (C{"-"} for the answer to a HEAD request, which has no body to read it
    from).
    """
    ids = response.header(b"x-request-id")
    if response.header(b"content-type") != [b"application/json"]:
        raise fail("an error that is not JSON", response.raw[:400])
    if head:
        if len(ids) != 1 or not _HEX32.match(ids[0]):
            raise fail("an error without its request id", response.raw[:400])
        return "-"
    try:
        document = json.loads(response.body)
    except ValueError:
        raise fail("an error body that is not JSON", response.raw[:400]) from None
    if not response.body.endswith(b"}\n") or not isinstance(document, dict):
        raise fail("an error body that is not one JSON line", response.raw[:400])
    if set(document) != {"status", "code", "message", "request_id"}:
        raise fail("an error body with other fields", response.raw[:400])
    code = document["code"]
    if code not in CATALOGUE or CATALOGUE[code][0] != response.status:
        raise fail("an error code that is not catalogued", response.raw[:400])
    if document["status"] != response.status:
        raise fail("an error body whose status differs", response.raw[:400])
    rid = str(document["request_id"]).encode("ascii", "replace")
    if len(ids) != 1 or ids[0] != rid or not _HEX32.match(rid):
        raise fail("an error whose request id is missing or differs", response.raw)
    return str(code)


# An independent framer


@dataclass
class Framed:
    """
    One request as L{frameRequests} framed it.
    """

    method: bytes
    target: bytes
    version: bytes
    body: bytes = b""


def frameRequests(data: bytes) -> list[Framed]:
    """
    Frame C{data} as a stream of HTTP/1.1 requests by RFC 9112's rules,
    strictly and independently of Twisted: the result stops before the
    first request it cannot frame unambiguously.
    """
    framed: list[Framed] = []
    index = 0
    skippedBlank = False
    while True:
        end = data.find(b"\r\n", index)
        if end < 0:
            return framed
        line = data[index:end]
        index = end + 2
        if not line and not skippedBlank:
            skippedBlank = True
            continue
        skippedBlank = False
        parts = line.split(b" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]):
            return framed
        method, target, version = parts
        if version not in (b"HTTP/1.0", b"HTTP/1.1") or not target:
            return framed
        if any(c <= 0x20 or c > 0xB0 for c in target):
            return framed
        lengths: list[bytes] = []
        codings: list[bytes] = []
        while True:
            end = data.find(b"\r\n", index)
            if end < 0:
                return framed
            line = data[index:end]
            index = end + 2
            if not line:
                break
            name, sep, value = line.partition(b":")
            if not sep or not _TOKEN.match(name):
                return framed
            value = value.strip(b" \t")
            if any(c in b"\x00\r\n" for c in value):
                return framed
            if name.lower() == b"content-length":
                lengths.append(value)
            elif name.lower() == b"transfer-encoding":
                codings.append(value)
        if codings:
            # Transfer coding names are case-insensitive (RFC 9110, 10.1.4).
            chunked = [coding.lower() for coding in codings] == [b"chunked"]
            if lengths or not chunked or version != b"HTTP/1.1":
                return framed
            pieces: list[bytes] = []
            while True:
                end = data.find(b"\r\n", index)
                if end < 0:
                    return framed
                size = data[index:end].partition(b";")[0].strip(b" \t")
                if not _CHUNK_SIZE.match(size):
                    return framed
                index = end + 2
                length = int(size, 16)
                if length == 0:
                    while True:
                        end = data.find(b"\r\n", index)
                        if end < 0:
                            return framed
                        trailer = data[index:end]
                        index = end + 2
                        if not trailer:
                            break
                    break
                if data[index + length : index + length + 2] != b"\r\n":
                    return framed
                pieces.append(data[index : index + length])
                index += length + 2
            body = b"".join(pieces)
        elif lengths:
            if len(lengths) != 1 or not lengths[0].isdigit():
                return framed
            length = int(lengths[0])
            if index + length > len(data):
                return framed
            body = data[index : index + length]
            index += length
        else:
            body = b""
        framed.append(Framed(method, target, version, body))


# The checks


def _expectedTarget(
    request: HTTP1Request,
) -> tuple[FuzzService, RoutedPath]:
    """
    Where C{request} must go, recomputed from its raw target alone.
    """
    _, originForm = splitAbsoluteForm(request.uri)
    try:
        routed = normalise(originForm)
    except PathError as e:
        raise fail(
            "a request went upstream with a path normalise refuses", request.uri, e.code
        ) from None
    if not isValidName(routed.name):
        raise fail("a request went upstream on an invalid name", request.uri)
    name = serviceName("api", routed.name)
    service = _BY_NAME.get(name)
    if service is None or not service.policy.expose:
        raise fail("a request went upstream for no exposed service", request.uri)
    return service, routed


def checkCall(call: Call) -> None:
    """
    Check one upstream call against the client request that made it.
    """
    request = call.request
    if request is None:
        raise fail("an upstream call made outside any request", call.url)
    match = _CALL_URL.match(call.url)
    if match is None:
        raise fail("an upstream URL that is not http://endpoint/path", call.url)
    chosen = _BY_ADDRESS.get(match.group(1))
    if chosen is None:
        raise fail("an upstream call to an unknown endpoint", call.url)
    parsed = parseServiceName(chosen.name)
    if parsed is None or not chosen.policy.expose:
        raise fail("an upstream call to a service never routed to", chosen.name)
    if request.record.service != chosen.name:
        raise fail(
            "the service chosen and the endpoint called differ",
            request.record.service,
            call.url,
        )
    expected, routed = _expectedTarget(request)
    if expected is not chosen:
        raise fail("the path routed on names another service", request.uri, chosen.name)
    if chosen.policy.stripPrefix:
        target = routed.rest + routed.query
        prefix: list[bytes] = [b"/" + parsed[1].encode("ascii")]
    else:
        target = routed.path + routed.query
        prefix = []
    if call.url != b"http://" + match.group(1) + target:
        raise fail(
            "the path forwarded is not the normalised path",
            request.uri,
            call.url,
            target,
        )
    if call.method != request.method:
        raise fail("the method changed on the way up", request.method, call.method)
    headers = call.headers
    clientTokens = connectionTokens(request.requestHeaders.getRawHeaders(b"connection"))
    webSocket = wantsWebSocket(request.requestHeaders)
    takesTrailers = b"trailers" in connectionTokens(
        request.requestHeaders.getRawHeaders(b"te")
    )
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        if webSocket and lowered in (b"connection", b"upgrade"):
            continue
        if lowered == b"te" and values == [b"trailers"] and takesTrailers:
            # monedge's own: it passes trailers on to this client.
            continue
        if lowered in HOP_BY_HOP or lowered.startswith(b"proxy-"):
            raise fail("a hop-by-hop header went upstream", name, values, request.uri)
        if lowered in clientTokens and lowered not in _OWNED:
            raise fail("a header named in Connection went upstream", name)
        if lowered in (b"content-length", b"expect", b"forwarded"):
            raise fail("a header monedge regenerates went upstream", name, values)
        if lowered == b"host" and len(values) != 1:
            raise fail("more than one Host went upstream", values)
    if webSocket:
        if headers.getRawHeaders(b"connection") != [b"Upgrade"] or (
            headers.getRawHeaders(b"upgrade") != [b"websocket"]
        ):
            raise fail("a WebSocket handshake went up with other upgrade headers")
    hosts = request.requestHeaders.getRawHeaders(b"host")
    authority, _ = splitAbsoluteForm(request.uri)
    host = hosts[0] if hosts else authority
    expectedHost = [host] if host is not None else None
    if headers.getRawHeaders(b"host") != expectedHost:
        raise fail("the Host sent up is not the client's", expectedHost, headers)
    own = {
        b"x-forwarded-for": [PEER.encode("ascii")],
        b"x-forwarded-proto": [b"http"],
        b"x-forwarded-host": expectedHost,
        b"x-forwarded-port": [b"%d" % (LISTENER_PORT,)],
        b"x-forwarded-prefix": prefix or None,
    }
    for name, value in own.items():
        if headers.getRawHeaders(name) != value:
            raise fail(
                "a forwarding header is not monedge's own",
                name,
                headers.getRawHeaders(name),
                value,
            )
    ids = headers.getRawHeaders(b"x-request-id") or []
    if ids != [request.requestId] or not _HEX32.match(ids[0]):
        raise fail("the request id sent up is not the request's", ids)


def checkOutcome(outcome: Outcome, framed: Sequence[Framed]) -> list[tuple[Any, ...]]:
    """
    Check invariants 2 to 4 on one connection's outcome.

    @return: a summary to compare between feeds: per response, its status
        and what it carries; and every call's method and URL.
    """
    if b"Traceback" in outcome.output:
        raise fail("a traceback reached the client", outcome.output[:2000])
    requests = outcome.requests
    methods = [r.method for r in requests]
    responses, _ = parseResponses(outcome.output, methods, outcome.closed)
    if len(responses) == len(requests) + 1:
        # The channel refused a request before making a request object for
        # it (its line was too long, or it never completed): that answer
        # closes the connection.
        refusal = responses.pop()
        if not outcome.closed or refusal.header(b"connection") != [b"close"]:
            raise fail("an answer to no request", refusal.raw)
        if checkErrorResponse(refusal) not in _CHANNEL_REFUSALS:
            raise fail("an answer to no request that is not a refusal", refusal.raw)
    if len(responses) != len(requests):
        raise fail(
            "responses and requests do not pair up",
            f"{len(requests)} requests, {len(responses)} responses",
            outcome.output[:2000],
        )
    byRequest: dict[int, Call] = {}
    for call in outcome.calls:
        checkCall(call)
        key = id(call.request)
        if key in byRequest:
            raise fail("one request went upstream twice", call.url)
        byRequest[key] = call
    for index, request in enumerate(requests):
        made = byRequest.get(id(request))
        if made is None:
            continue
        if not made.whole:
            # Its body went up as it came, and never came whole (malformed,
            # too large, or the client left): the upstream request must have
            # been given up, never answered.
            if made.answered or not made.cancelled:
                raise fail(
                    "a request whose body never came whole was not given up",
                    request.method,
                    request.uri,
                )
            continue
        if index >= len(framed):
            raise fail(
                "a request went upstream that a strict framer did not frame",
                request.method,
                request.uri,
            )
        if (framed[index].method, framed[index].target, framed[index].body) != (
            request.method,
            request.uri,
            made.body,
        ):
            raise fail(
                "monedge framed a request that a strict framer frames otherwise",
                (request.method, request.uri, made.body),
                framed[index],
            )
    calls = outcome.calls
    if [c.index for c in calls] != list(range(len(calls))):
        raise fail("calls out of order")
    summary: list[tuple[Any, ...]] = []
    for request, method, response in zip(requests, methods, responses, strict=True):
        made = byRequest.get(id(request))
        if made is not None and made.answered:
            call = made
            if response.status != 200:
                raise fail("an answered call's response is not the 200", response.raw)
            tags = response.header(b"x-fuzz-call")
            if tags != [b"%d" % (call.index,)]:
                raise fail(
                    "responses crossed: a request got another call's answer",
                    request.uri,
                    tags,
                    call.index,
                )
            if request.method != b"HEAD" and response.body != answerBody(call):
                raise fail("responses crossed: the body is another's", response.body)
            if response.header(b"x-request-id") != [request.requestId]:
                raise fail("the response's request id is not the request's")
            summary.append((200, call.method, call.url))
            continue
        if response.status < 400:
            raise fail(
                "a response that is neither the upstream's nor an error", response.raw
            )
        head = method == b"HEAD"
        summary.append((response.status, checkErrorResponse(response, head)))
    summary.extend(("call", c.method, c.url) for c in calls)
    return summary


def checkPath(target: bytes) -> None:
    """
    The pure path layer on one raw target: L{normalise} refuses with a
    catalogued C{path_*} code, or returns a canonical path that it maps to
    itself and that starts with the segment it routes on.
    """
    try:
        routed = normalise(target)
    except PathError as e:
        if not e.code.startswith("path_") or CATALOGUE.get(e.code, (0,))[0] != 400:
            raise fail(
                "normalise refused with an uncatalogued code", target, e.code
            ) from None
        return
    path = routed.path
    if not path.startswith(b"/") or not routed.rest.startswith(b"/"):
        raise fail("a normalised path that is not absolute", target, routed)
    if b"//" in path or b"\\" in path or b"#" in path or b"?" in path:
        raise fail("a normalised path with an ambiguous character", target, path)
    if routed.query and (not routed.query.startswith(b"?") or routed.query == b"?"):
        raise fail("a normalised query is malformed", target, routed.query)
    segments = path.split(b"/")[1:]
    for segment in segments:
        decoded = unquote_to_bytes(segment)
        if decoded.partition(b";")[0] in (b".", b".."):
            raise fail("a normalised path with a dot segment", target, path)
        if b"/" in decoded or b"\\" in decoded or re.search(rb"[\x00-\x1f]", decoded):
            raise fail("a normalised segment decodes to a separator", target, path)
    first = segments[0] if segments else b""
    if unquote_to_bytes(first) != routed.name.encode("utf-8"):
        raise fail("the name routed on is not the first segment", target, routed)
    if not (
        path == b"/" + first + routed.rest
        or (routed.rest == b"/" and path == b"/" + first)
    ):
        raise fail("the forwarded rest is not the path after the name", target, routed)
    again = normalise(path + routed.query)
    if again != routed:
        raise fail("normalise is not idempotent", target, routed, again)
    if isValidName(routed.name):
        service = serviceName("api", routed.name)
        if parseServiceName(service) != ("api", routed.name):
            raise fail("a valid name makes an invalid service", service)


def _headerLines(data: bytes) -> list[tuple[bytes, bytes]]:
    head = data.partition(b"\r\n\r\n")[0]
    pairs = []
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        value = value.strip(b" \t")
        if sep and _TOKEN.match(name) and not re.search(rb"[\x00\r\n]", value):
            pairs.append((name, value))
    return pairs


def checkHeaderPolicy(pairs: Sequence[tuple[bytes, bytes]]) -> None:
    """
    The pure header layer on one set of header lines: hop-by-hop headers
    and those named in C{Connection} are dropped both ways, forwarding
    headers are monedge's own (or a trusted hop's, validated), and every
    other header passes with its values in order.
    """
    incoming = Headers()
    for name, value in pairs:
        incoming.addRawHeader(name, value)
    tokens = connectionTokens(incoming.getRawHeaders(b"connection"))
    if any(t != t.strip().lower() or not t for t in tokens):
        raise fail("a Connection token is not lowercased and stripped", tokens)
    for hops in (0, 1, 2):
        rules = ForwardingRules(Trust(hops))
        rid = requestIdFor(incoming, hops > 0)
        sent = incoming.getRawHeaders(b"x-request-id") or []
        if hops == 0 or rid not in sent:
            if not _HEX32.match(rid):
                raise fail("a new request id is not 32 hex digits", rid)
        elif not re.match(rb"[A-Za-z0-9._:-]{1,128}\Z", rid) or len(sent) != 1:
            raise fail("an invalid trusted request id was kept", rid)
        xff = rules.forwardedFor(incoming, b"192.0.2.7")
        entries = xff.split(b", ")
        if entries[-1] != b"192.0.2.7" or len(entries) > hops + 1:
            raise fail("X-Forwarded-For keeps untrusted entries", hops, xff)
        out = upstreamHeaders(
            incoming,
            host=b"h.example",
            peer=b"192.0.2.7",
            proto=b"http",
            port=b"30080",
            prefix=b"/echo",
            requestId=rid,
            rules=rules,
        )
        seen: dict[bytes, list[bytes]] = {}
        for name, values in out.getAllRawHeaders():
            lowered = name.lower()
            if lowered == b"x-real-ip":
                if list(values) != [xff.split(b", ")[0]]:
                    raise fail("X-Real-IP is not the resolved client", values)
            elif lowered in CLIENT_CONTROLLED_NAMES or lowered.startswith(
                CLIENT_CONTROLLED_PREFIXES
            ):
                raise fail("a client-controlled header passes upstream", name)
            if lowered in HOP_BY_HOP or (lowered in tokens and lowered not in _OWNED):
                raise fail("a hop-by-hop header passes upstream", name)
            if lowered in (b"content-length", b"expect", b"forwarded"):
                raise fail("a regenerated header passes upstream", name)
            if lowered in seen:
                raise fail("a header appears under two spellings", name)
            seen[lowered] = list(values)
        fixed = {
            b"host": [b"h.example"],
            b"x-forwarded-host": [b"h.example"],
            b"x-forwarded-prefix": [b"/echo"],
            b"x-request-id": [rid],
            b"x-forwarded-for": [xff],
        }
        for fixedName, fixedValue in fixed.items():
            if seen.get(fixedName) != fixedValue:
                raise fail(
                    "a forwarding header is not monedge's",
                    fixedName,
                    seen.get(fixedName),
                )
        for name in (b"x-forwarded-proto", b"x-forwarded-port"):
            if len(seen.get(name, [])) != 1:
                raise fail("a forwarding header is not one value", name)
        if hops == 0 and seen[b"x-forwarded-proto"] != [b"http"]:
            raise fail("an untrusted X-Forwarded-Proto was kept")
        if hops == 0 and seen[b"x-forwarded-port"] != [b"30080"]:
            raise fail("an untrusted X-Forwarded-Port was kept")
        for name, values in incoming.getAllRawHeaders():
            lowered = name.lower()
            if lowered in HOP_BY_HOP or lowered in tokens or lowered in _FORWARDING:
                continue
            if lowered in CLIENT_CONTROLLED_NAMES or lowered.startswith(
                CLIENT_CONTROLLED_PREFIXES
            ):
                continue
            if lowered in (b"host", b"content-length", b"expect", b"forwarded"):
                continue
            if seen.get(lowered) != list(values):
                raise fail("an end-to-end header was changed", name, values)
    down = Headers()
    downstreamHeaders(incoming, incoming.getRawHeaders(b"connection"), down)
    for name, _values in down.getAllRawHeaders():
        lowered = name.lower()
        if lowered in HOP_BY_HOP or lowered in tokens:
            raise fail("a hop-by-hop header passes downstream", name)


def splitPoints(data: bytes) -> tuple[list[bytes], list[bool]]:
    """
    Chunks of C{data} cut at points the input itself chooses (so the fuzzer
    explores them as it mutates), and after which chunks to answer the
    upstream.
    """
    rng = random.Random(zlib.crc32(data))
    if len(data) < 2:
        return [data], [False]
    if len(data) <= 64 and rng.random() < 0.3:
        cuts = list(range(1, len(data)))
    else:
        count = rng.randint(1, min(8, len(data) - 1))
        cuts = sorted(set(rng.randint(1, len(data) - 1) for _ in range(count)))
        head = data.find(b"\r\n\r\n")
        if head > 0 and rng.random() < 0.5:
            cuts = sorted(set(cuts) | {head + 2, head + 4})
    # A transport never delivers an empty read.
    cuts = [c for c in cuts if 0 < c < len(data)]
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    return chunks, [rng.random() < 0.5 for _ in chunks]


def checkProxy(data: bytes) -> None:
    """
    Invariants 1 to 4 on one connection carrying C{data}, fed whole and
    split, and that both feeds have the same outcome.
    """
    framed = frameRequests(data)
    chunks, answerAfter = splitPoints(data)
    with watchLog() as bad:
        whole = runConnection([data])
        split = runConnection(chunks, answerAfter)
    if bad:
        raise fail(
            "something was logged at error level", *(_describe(e) for e in bad[:3])
        )
    if data.startswith(PREFACE):
        # HTTP/2 with prior knowledge (monedge.edge.http2), which this
        # HTTP/1.1 oracle does not read: the server answers in HTTP/2, its
        # SETTINGS first, and logs nothing at error level.
        for outcome in (whole, split):
            if outcome.output[3:4] != b"\x04":
                raise fail("h2c was not answered with SETTINGS", outcome.output[:40])
        return
    first = checkOutcome(whole, framed)
    second = checkOutcome(split, framed)
    if first != second:
        raise fail(
            "the whole and the split feed differ",
            [len(c) for c in chunks],
            first,
            second,
        )


def checkPure(data: bytes) -> None:
    """
    The pure layer on the targets and headers found in C{data}.
    """
    line = data.partition(b"\r\n")[0]
    parts = line.split(b" ")
    candidates = [data[:4096]]
    if len(parts) == 3:
        candidates.append(parts[1])
    for candidate in candidates:
        if any(c <= 0x20 or c > 0xB0 for c in candidate) or not candidate:
            # Twisted's request-line parser refuses these before routing.
            continue
        checkPath(splitAbsoluteForm(candidate)[1])
    checkHeaderPolicy(_headerLines(data))


def checkRequestBytes(data: bytes) -> None:
    """
    Check every invariant on C{data}, the raw bytes of one client
    connection.

    @raise AssertionError: if one is broken.
    """
    checkPure(data)
    checkProxy(data)


# The seed corpus


def _request(target: bytes, *headers: bytes, method: bytes = b"GET") -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: api.example.com"]
    lines.extend(headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


#: Well-formed requests the raw-socket corpus does not have, by name.
EXTRA_SEEDS: dict[str, bytes] = {
    "pipelined-gets": _request(b"/echo/one")
    + _request(b"/other/two?x=1")
    + _request(b"/legacy/three/")
    + _request(b"/echo/four", b"Connection: close"),
    "post-content-length": _request(
        b"/echo/upload",
        b"Content-Type: text/plain",
        b"Content-Length: 11",
        method=b"POST",
    )
    + b"hello world",
    "post-chunked": _request(
        b"/other/upload", b"Transfer-Encoding: chunked", method=b"PUT"
    )
    + b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n",
    "post-over-limit": _request(b"/small/x", b"Content-Length: 17", method=b"POST")
    + b"x" * 17,
    "chunked-over-limit": _request(
        b"/small/x", b"Transfer-Encoding: chunked", method=b"POST"
    )
    + b"10\r\n"
    + b"y" * 16
    + b"\r\n1\r\nz\r\n0\r\n\r\n",
    "websocket-upgrade": _request(
        b"/echo/socket",
        b"Connection: Upgrade",
        b"Upgrade: websocket",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
    ),
    "websocket-bad-version": _request(
        b"/echo/socket",
        b"Connection: keep-alive, Upgrade",
        b"Upgrade: websocket",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 8",
    ),
    "absolute-form": b"GET http://api.example.com:30080/echo/abs?q=1 HTTP/1.1\r\n"
    b"Host: api.example.com\r\n\r\n",
    "absolute-form-no-host": b"GET https://api.example.com/legacy/x HTTP/1.1\r\n\r\n",
    "head-then-get": _request(b"/echo/h", method=b"HEAD") + _request(b"/echo/g"),
    "expect-continue": _request(
        b"/echo/e", b"Expect: 100-continue", b"Content-Length: 3", method=b"POST"
    )
    + b"abc",
    "http10-keep-alive": b"GET /echo/ten HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    b"GET /other/ten HTTP/1.0\r\n\r\n",
    "longest-name": _request(b"/" + b"a" * 63 + b"/x"),
    "unexposed": _request(b"/internal/x"),
    "options-star": _request(b"*", method=b"OPTIONS"),
    "partial-headers": b"GET /echo/slow HTTP/1.1\r\nHost: a\r\n",
    "partial-body": _request(b"/echo/b", b"Content-Length: 10", method=b"POST")
    + b"abc",
}


#: Tokens for libFuzzer's dictionary.
DICTIONARY: tuple[bytes, ...] = (
    b"\r\n",
    b"\r\n\r\n",
    b" HTTP/1.1\r\n",
    b" HTTP/1.0\r\n",
    b"GET ",
    b"POST ",
    b"HEAD ",
    b"Host: ",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked",
    b"Connection: ",
    b"close",
    b"keep-alive",
    b"Upgrade",
    b"websocket",
    b"Expect: 100-continue",
    b"X-Forwarded-For: ",
    b"X-Request-Id: ",
    b"/echo/",
    b"/legacy/",
    b"/small/",
    b"http://",
    b"%2e",
    b"%2f",
    b"%5c",
    b"%25",
    b"%00",
    b"%c0%ae",
    b"%ef%bc%8e",
    b"..",
    b";",
    b"?",
    b"#",
    b"0\r\n\r\n",
)


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "case"


def writeSeeds(
    directory: str,
    cases: Sequence[tuple[str, bytes]],
    regressions: str | None = None,
) -> list[str]:
    """
    Write the seed corpus into C{directory}, one file per input: C{cases}
    (name, raw bytes), L{EXTRA_SEEDS}, and every file in C{regressions}
    but its C{README.md}.

    @return: the paths written.
    """
    import os
    import shutil

    os.makedirs(directory, exist_ok=True)
    written: list[str] = []
    taken: set[str] = set()

    def put(name: str, data: bytes) -> None:
        base = name
        number = 2
        while name in taken:
            name = f"{base}-{number}"
            number += 1
        taken.add(name)
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        written.append(path)

    for name, raw in cases:
        put("corpus-" + _slug(name), raw)
    for name, raw in EXTRA_SEEDS.items():
        put("extra-" + name, raw)
    if regressions is not None and os.path.isdir(regressions):
        for entry in sorted(os.listdir(regressions)):
            source = os.path.join(regressions, entry)
            if entry == "README.md" or not os.path.isfile(source):
                continue
            target = os.path.join(directory, "regression-" + entry)
            shutil.copyfile(source, target)
            written.append(target)
    return written


def writeDictionary(path: str) -> None:
    """
    Write L{DICTIONARY} in libFuzzer's C{-dict} format.
    """
    with open(path, "w", encoding="ascii") as f:
        for token in DICTIONARY:
            escaped = "".join(
                chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}"
                for b in token
            )
            f.write(f'"{escaped}"\n')
