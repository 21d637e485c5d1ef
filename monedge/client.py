"""
A lean HTTP/1.1 upstream client: one persistent connection pool, requests
written in one piece, responses parsed by C{httptools} (llhttp, the parser
Node.js uses), bodies streamed with backpressure.

It provides the same L{IUpstreamClient} as L{monedge.upstream.UpstreamClient}
(Twisted's C{Agent}) and is what monedge uses by default: the profile in
docs/performance.md shows C{Agent}'s machinery (its pool bookkeeping,
Deferred chains and line-by-line parser) as the largest single cost on the
proxy path.  Its contract, kept by the same end-to-end tests:

- a response is an L{IResponse}: C{headers} without the connection-control
  headers (C{Content-Length}, C{Transfer-Encoding}, C{Connection}, ...,
  except C{Content-Length} in answer to C{HEAD}), C{length} from
  C{Content-Length} or L{UNKNOWN_LENGTH}, and C{monedgeConnection}, the
  upstream's C{Connection} header values;
- a malformed response (llhttp is strict: bare LF, bad chunk sizes, two
  Content-Lengths) fails the request, as a reset would;
- a pooled connection found closed before any byte of the response is
  replaced by a new one, once, for a request L{monedge.replay.mayReplay}
  allows;
- cancelling the result aborts the request and its connection.
"""

from __future__ import annotations

import re
from typing import Any

import httptools
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from monedge.endpoints import EndpointCache, UpstreamTLS, UpstreamTLSError
from monedge.headers import canonicalName
from monedge.interfaces import IUpstreamClient, IUpstreamUpgrader
from monedge.replay import BufferedBody, mayReplay
from monedge.sockets import sendAtOnce

#: How every complete body ends, made once (as Twisted's C{connectionDone}
#: is): building a L{Failure} costs about 2 us.
_RESPONSE_DONE = Failure(ResponseDone())

#: Finds a byte no header value may hold (one scan, no copy).
_UNSAFE_VALUE = re.compile(rb"[\r\n\x00]").search

#: Response headers that frame the connection, not the entity: kept out of
#: C{response.headers}, as Twisted's client does.
_CONNECTION_CONTROL = frozenset(
    [
        b"content-length",
        b"connection",
        b"keep-alive",
        b"te",
        b"trailers",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-connection",
    ]
)

#: scheme, host, port and TLS settings: connections are pooled by all four.
Key = tuple[bytes, bytes, int, "UpstreamTLS | None"]


class UpstreamProtocolError(Exception):
    """
    The upstream's response could not be parsed.
    """


class StaleConnection(Exception):
    """
    A pooled connection was closed before any of the response arrived: the
    request may be sent again on a new connection if it is safe to.
    """


def parseURL(url: bytes) -> tuple[bytes, bytes, int, bytes]:
    """
    Split C{scheme://host:port/target} into its parts (IPv6 hosts without
    brackets).

    @raise ValueError: for anything else.
    """
    scheme, sep, rest = url.partition(b"://")
    if not sep or scheme not in (b"http", b"https"):
        raise ValueError(f"unsupported URL {url!r}")
    slash = rest.find(b"/")
    if slash < 0:
        authority, target = rest, b"/"
    else:
        authority, target = rest[:slash], rest[slash:]
    if authority.startswith(b"["):
        end = authority.index(b"]")
        host, port = authority[1:end], authority[end + 2 :]
    else:
        # rpartition gives ("", "", authority) when there is no colon.
        host, colon, port = authority.rpartition(b":")
        if not colon:
            host, port = authority, b""
    if not port:
        return scheme, host, 443 if scheme == b"https" else 80, target
    return scheme, host, int(port), target


def _address(
    url: bytes, headers: Headers, tls: UpstreamTLS | None
) -> tuple[Key, bytes]:
    """
    The pool key and request target for C{url}; C{headers} get a C{Host}
    from it if they have none.
    """
    scheme, host, port, target = parseURL(url)
    if not headers.hasHeader(b"host"):
        headers.setRawHeaders(b"host", [url.split(b"/")[2]])
    return (scheme, host, port, tls if scheme == b"https" else None), target


@implementer(IPushProducer)
class _BodyTransport:
    """
    What a body protocol sees as its transport: flow control over the
    upstream connection.
    """

    def __init__(self, connection: _Connection) -> None:
        self._connection = connection

    def pauseProducing(self) -> None:
        transport = self._connection.transport
        if transport is not None:
            transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._connection._resumeBody()

    def stopProducing(self) -> None:
        self._connection.abort()


@implementer(IResponse)
class _Response:
    """
    An upstream response, its body delivered by L{deliverBody}.
    """

    version = (b"HTTP", 1, 1)
    phrase = b""
    request = None
    previousResponse = None

    def __init__(
        self,
        connection: _Connection,
        code: int,
        headers: Headers,
        length: int | object,
        connectionHeader: list[bytes] | None,
    ) -> None:
        self._connection = connection
        self.code = code
        self.headers = headers
        self.length = length
        self.monedgeConnection = connectionHeader

    def deliverBody(self, protocol: Any) -> None:
        self._connection._deliver(protocol)

    def monedgeTakeBody(self) -> bytes | None:
        """
        The whole body at once, if it has already arrived in full and
        nobody reads it yet (the common small response, which comes in one
        read with its head); then the response is over, as if delivered.
        Otherwise L{None}, and L{deliverBody} streams it as usual.
        """
        return self._connection._takeBody(self)

    def setPreviousResponse(self, response: IResponse) -> None:
        pass


class _Connection(Protocol):
    """
    One connection to an upstream endpoint, carrying one request at a time.
    """

    def __init__(self, client: FastUpstreamClient, key: Key) -> None:
        self._client = client
        self.key = key
        self.reused = False
        #: When the connection last went back to the pool.
        self.idleSince = 0.0
        self._reset()

    def _reset(self) -> None:
        self._result: Deferred[IResponse] | None = None
        self._parser: Any = None
        self._headers: list[tuple[bytes, bytes]] = []
        self._head = False
        self._received = False
        self._interim = False
        self._response: _Response | None = None
        self._protocol: Any = None
        self._buffered: list[bytes] = []
        self._complete = False
        self._keepAlive = False
        self._chunked = False
        self._bodyWriter: Deferred[None] | None = None
        self._bufferPaused = False

    def connectionMade(self) -> None:
        sendAtOnce(self.transport)

    # Sending

    def send(
        self, method: bytes, target: bytes, headers: Headers, body: IBodyProducer | None
    ) -> Deferred[IResponse]:
        """
        Write one request; the result fires with the response's head.
        """
        self._reset()
        self._head = method == b"HEAD"
        self._parser = httptools.HttpResponseParser(self)

        def cancel(d: Deferred[IResponse]) -> None:
            self._result = None
            self.abort()

        result: Deferred[IResponse] = Deferred(cancel)
        self._result = result
        lines = [method, b" ", target, b" HTTP/1.1\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines += [name, b": ", value, b"\r\n"]
        if body is not None:
            lines.append(b"Content-Length: %d\r\n" % (body.length,))
        elif method in (b"POST", b"PUT", b"PATCH"):
            lines.append(b"Content-Length: 0\r\n")
        lines.append(b"\r\n")
        transport = self.transport
        assert transport is not None
        # A connection back from the pool may have been paused by the last
        # response's slow reader: read again.
        transport.resumeProducing()  # type: ignore[attr-defined]
        # One join and one write: writeSequence would check every piece.
        transport.write(b"".join(lines))
        if body is not None:
            writing = body.startProducing(transport)
            self._bodyWriter = writing
            writing.addErrback(self._bodyFailed)
        return result

    def _bodyFailed(self, reason: Failure) -> None:
        if not reason.check(CancelledError):
            self._fail(ResponseNeverReceived([reason]))
        self.abort()

    # Parsing (httptools callbacks)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        code = parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            # An interim response: wait for the real one.
            self._interim = True
            self._headers = []
            return
        headers = Headers()
        raw = headers._rawHeaders
        connection: list[bytes] | None = None
        length: int | object = UNKNOWN_LENGTH
        for name, value in self._headers:
            lowered = name.lower()
            if lowered in _CONNECTION_CONTROL:
                if lowered == b"content-length":
                    length = int(value)
                    if self._head:
                        headers.addRawHeader(name, value)
                elif lowered == b"connection":
                    connection = [*(connection or []), value]
                elif lowered == b"transfer-encoding":
                    self._chunked = True
                    length = UNKNOWN_LENGTH
                continue
            if _UNSAFE_VALUE(value) is not None:
                # Never expected from llhttp; the slow path sanitises.
                headers.addRawHeader(name, value)
                continue
            canonical = canonicalName(name)
            values = raw.get(canonical)
            if values is None:
                raw[canonical] = [value]
            else:
                values.append(value)
        if self._head or code in (204, 304):
            length = 0
        self._keepAlive = bool(parser.should_keep_alive()) and code != 101
        response = self._response = _Response(self, code, headers, length, connection)
        if self._head or code in (204, 304, 101):
            self._complete = True
        self._completeResponse(response)
        # The head is handed over once the parser has taken the whole read
        # (L{_handOver}): a body that came with it is then delivered at
        # once, and the client's response goes out in one send.

    def _completeResponse(self, response: _Response) -> None:
        """
        Add to a response before it is delivered (nothing, here).
        """

    def on_body(self, body: bytes) -> None:
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(body)
        else:
            # Nobody reads yet: the head is still to be handed over (see
            # _handOver), or a response hook is running.  Hold what came.
            self._buffered.append(body)
            if self._result is None:
                self._holdBody()

    def _holdBody(self) -> None:
        """
        The head was handed over and nobody reads the body yet (a response
        hook is running): read no more until someone does.
        """
        transport = self.transport
        if transport is not None and not self._bufferPaused:
            self._bufferPaused = True
            transport.pauseProducing()  # type: ignore[attr-defined]

    def _handOver(self) -> None:
        """
        Fire the request's result with the response head parsed from the
        last read, if there is one waiting.
        """
        response, result = self._response, self._result
        if response is None or result is None:
            return
        self._result = None
        result.callback(response)
        if self._protocol is None and self._buffered:
            self._holdBody()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        self._complete = True
        self._finishBody()

    # Receiving

    def dataReceived(self, data: bytes) -> None:
        self._received = True
        parser = self._parser
        if parser is None or (self._complete and self._head):
            # Nothing asked for this (or a HEAD response's would-be body):
            # the connection cannot be trusted any more.
            self.abort()
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._handOver()
            self._afterSwitch(data[e.args[0] :])
            return
        except httptools.HttpParserError as e:
            self._handOver()
            self._fail(ResponseFailed([Failure(UpstreamProtocolError(str(e)))]))
            self.abort()
            return
        self._handOver()

    def _afterSwitch(self, rest: bytes) -> None:
        """
        Bytes that followed a 101's head in the same read: nothing here
        asked for a switch, so they are dropped.
        """

    def _deliver(self, protocol: Any) -> None:
        self._protocol = protocol
        if self._bufferPaused:
            # Undo the pause made while nobody read, before the reader can
            # pause for its own reasons.
            self._bufferPaused = False
            self._resumeBody()
        protocol.makeConnection(_BodyTransport(self))
        buffered, self._buffered = self._buffered, []
        for chunk in buffered:
            if self._protocol is None:
                return
            protocol.dataReceived(chunk)
        if self._complete:
            self._finishBody()

    def _takeBody(self, response: _Response) -> bytes | None:
        if (
            response is not self._response
            or not self._complete
            or self._protocol is not None
            or self._parser is None
        ):
            return None
        body = b"".join(self._buffered)
        self._buffered = []
        if self._bufferPaused:
            self._bufferPaused = False
            self._resumeBody()
        keep = self._reusable()
        self._parser = None
        self._afterResponse(keep)
        return body

    def _resumeBody(self) -> None:
        transport = self.transport
        if transport is not None:
            transport.resumeProducing()  # type: ignore[attr-defined]

    def _finishBody(self) -> None:
        protocol = self._protocol
        if protocol is None:
            # Nobody reads it yet: it is delivered, ended, on deliverBody.
            return
        self._protocol = None
        keep = self._reusable()
        self._parser = None
        protocol.connectionLost(_RESPONSE_DONE)
        self._afterResponse(keep)

    def _reusable(self) -> bool:
        """
        Whether, its response complete, the connection can carry another
        request.
        """
        writer = self._bodyWriter
        # An upstream may answer before it has read the whole request body
        # (an early 413, say): the connection is then mid-request and can
        # never carry another one.
        bodySent = writer is None or writer.called
        return (
            self._keepAlive
            and bodySent
            and self.transport is not None
            and self._parser is not None
        )

    def _afterResponse(self, keep: bool) -> None:
        """
        The response is over: pool the connection if C{keep}, else close it.
        """
        if keep:
            self._client._release(self)
        else:
            self.abort()

    def _fail(self, error: Exception) -> None:
        result, self._result = self._result, None
        if result is not None:
            result.errback(Failure(error))
            return
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connectionLost(Failure(error))

    def abort(self) -> None:
        """
        Drop the connection now.
        """
        transport = self.transport
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        self._client._forget(self)
        writer = self._bodyWriter
        if writer is not None and not writer.called:
            writer.cancel()
        self.transport = None
        if self._result is not None:
            if self.reused and not self._received:
                self._fail(StaleConnection())
            else:
                self._fail(ResponseNeverReceived([reason]))
            return
        if self._response is not None and not self._complete:
            if self._response.length is UNKNOWN_LENGTH and not self._chunked:
                # A body delimited by the connection's close: this is its
                # end, as far as anyone can tell.
                self._complete = True
                protocol, self._protocol = self._protocol, None
                if protocol is not None:
                    protocol.connectionLost(Failure(PotentialDataLoss()))
                return
            self._fail(ResponseFailed([reason]))


@implementer(IHalfCloseableProtocol)
class _UpgradeConnection(_Connection):
    """
    A connection of its own for a request that asks to switch protocols.
    It is never pooled. If the answer is a 101, the response's
    C{monedgeTakeOver} hands the connection's bytes to a tunnel.
    """

    def _reset(self) -> None:
        super()._reset()
        self._leftover = b""
        self._side: Any = None

    def _completeResponse(self, response: _Response) -> None:
        self._keepAlive = False
        if response.code != 101:
            return
        # A 101 is checked on its Upgrade and Connection headers, which the
        # response's headers leave out: keep them all.
        handshake = Headers()
        for name, value in self._headers:
            handshake.addRawHeader(name, value)
        response.monedgeHandshake = handshake  # type: ignore[attr-defined]
        response.monedgeTakeOver = self.takeOver  # type: ignore[attr-defined]

    def takeOver(self, side: Any) -> tuple[Any, bytes]:
        """
        From now on every byte and close goes to C{side} (a
        L{monedge.tunnel.TunnelSide}).

        @return: the connection's transport, and the bytes that came after
            the 101's head.
        """
        self._side = side
        self._parser = None
        leftover, self._leftover = self._leftover, b""
        return self.transport, leftover

    def dataReceived(self, data: bytes) -> None:
        side = self._side
        if side is not None:
            side.received(data)
            return
        if self._response is not None and self._response.code == 101:
            # After the 101, before the tunnel takes over.
            self._leftover += data
            return
        super().dataReceived(data)

    def _afterSwitch(self, rest: bytes) -> None:
        side = self._side
        if side is not None:
            # The tunnel took over while the 101 was being parsed (its head
            # came in this very read): these bytes follow it.
            if rest:
                side.received(rest)
        else:
            self._leftover += rest

    def readConnectionLost(self) -> None:
        side = self._side
        if side is not None:
            side.readClosed()
            return
        transport = self.transport
        if transport is not None:
            transport.loseConnection()

    def writeConnectionLost(self) -> None:
        pass

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: B008
        side = self._side
        if side is not None:
            self._client._forget(self)
            self.transport = None
            side.lost(reason)
            return
        super().connectionLost(reason)


class _ConnectionFactory(Factory):
    noisy = False

    def __init__(
        self,
        client: FastUpstreamClient,
        key: Key,
        protocol: type[_Connection] = _Connection,
    ) -> None:
        self._client = client
        self._key = key
        self._protocol = protocol

    def buildProtocol(self, addr: Any) -> _Connection:
        return self._protocol(self._client, self._key)


@implementer(IUpstreamClient, IUpstreamUpgrader)
class FastUpstreamClient:
    """
    Sends requests upstream over one persistent pool of L{_Connection}s.

    @param maxPerHost: idle connections kept per endpoint.
    @param poolIdle: seconds an idle connection is kept.
    """

    def __init__(
        self, reactor: Any, maxPerHost: int = 256, poolIdle: float = 4.0
    ) -> None:
        self._reactor = reactor
        self._maxPerHost = maxPerHost
        self._poolIdle = poolIdle
        #: Each endpoint's idle connections, oldest first.
        self._idle: dict[Key, list[_Connection]] = {}
        self._endpoints = EndpointCache(reactor)
        #: The one timer that closes idle connections, due when the oldest
        #: idle connection has been idle for poolIdle (a timer per release
        #: would be set and cancelled on every request).
        self._sweep: IDelayedCall | None = None

    def _take(self, key: Key) -> _Connection | None:
        idle = self._idle.get(key)
        while idle:
            connection = idle.pop()
            if connection.transport is not None:
                connection.reused = True
                return connection
        return None

    def _release(self, connection: _Connection) -> None:
        connection._reset()
        idle = self._idle.setdefault(connection.key, [])
        if len(idle) >= self._maxPerHost:
            connection.abort()
            return
        connection.idleSince = self._reactor.seconds()
        idle.append(connection)
        if self._sweep is None:
            self._sweep = self._reactor.callLater(self._poolIdle, self._closeIdle)

    def _closeIdle(self) -> None:
        """
        Close every connection idle for poolIdle or more, and come back when
        the next one will have been.
        """
        self._sweep = None
        deadline = self._reactor.seconds() - self._poolIdle
        oldest: float | None = None
        for idle in list(self._idle.values()):
            while idle and idle[0].idleSince <= deadline:
                idle.pop(0).abort()
            if idle and (oldest is None or idle[0].idleSince < oldest):
                oldest = idle[0].idleSince
        if oldest is not None:
            self._sweep = self._reactor.callLater(oldest - deadline, self._closeIdle)

    def _forget(self, connection: _Connection) -> None:
        idle = self._idle.get(connection.key)
        if idle and connection in idle:
            idle.remove(connection)

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        connectTimeout: float,
        tls: UpstreamTLS | None = None,
    ) -> Deferred[IResponse]:
        key, target = _address(url, headers, tls)
        connection = self._take(key)
        if connection is not None:
            d = connection.send(method, target, headers, body)
            if mayReplay(method, body):
                return d.addErrback(
                    self._retryStale, key, method, target, headers, body, connectTimeout
                )
            return d
        return self._connectAndSend(key, method, target, headers, body, connectTimeout)

    def _retryStale(
        self,
        failure: Failure,
        key: Key,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        connectTimeout: float,
    ) -> Deferred[IResponse]:
        failure.trap(StaleConnection)
        # mayReplay allowed it: no body, or one that can be sent again.
        again = body.again() if isinstance(body, BufferedBody) else None
        return self._connectAndSend(key, method, target, headers, again, connectTimeout)

    def upgrade(
        self,
        url: bytes,
        headers: Headers,
        connectTimeout: float,
        tls: UpstreamTLS | None = None,
    ) -> Deferred[IResponse]:
        key, target = _address(url, headers, tls)
        return self._connectAndSend(
            key, b"GET", target, headers, None, connectTimeout, _UpgradeConnection
        )

    def _connectAndSend(
        self,
        key: Key,
        method: bytes,
        target: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        connectTimeout: float,
        protocol: type[_Connection] = _Connection,
    ) -> Deferred[IResponse]:
        scheme, host, port, tls = key
        try:
            endpoint = self._endpoints.get(scheme, host, port, connectTimeout, tls)
        except UpstreamTLSError as e:
            return fail(e)
        connecting = endpoint.connect(_ConnectionFactory(self, key, protocol))
        sending: list[Deferred[IResponse]] = []

        def connected(protocol: Any) -> Deferred[IResponse]:
            connection: _Connection = protocol
            d = connection.send(method, target, headers, body)
            sending.append(d)
            return d

        def cancel(result: Deferred[IResponse]) -> None:
            if sending:
                sending[0].cancel()
            else:
                connecting.cancel()

        result: Deferred[IResponse] = Deferred(cancel)
        connecting.addCallback(connected).chainDeferred(result)
        return result

    def close(self) -> Deferred[None]:
        """
        Close every idle connection.
        """
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in list(self._idle.values()):
            for connection in list(idle):
                connection.abort()
        self._idle.clear()
        return succeed(None)
