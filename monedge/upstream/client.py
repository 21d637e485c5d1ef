"""
A lean HTTP/1.1 upstream client: one persistent connection pool, requests
written in one piece, responses parsed by C{httptools} (llhttp, the parser
Node.js uses), bodies streamed with backpressure.

It is monedge's only upstream client, for ordinary requests
(L{IUpstreamClient}) and WebSocket handshakes (L{IUpstreamUpgrader}) alike.
It replaced Twisted's C{Agent}, whose machinery (its pool bookkeeping,
Deferred chains and line-by-line parser) the profile in
docs/performance.md showed as the largest single cost on the proxy path.
Its contract:

- a response is an L{IResponse}: C{headers} without the connection-control
  headers (C{Content-Length}, C{Transfer-Encoding}, C{Connection}, ...,
  except C{Content-Length} in answer to C{HEAD}), C{length} from
  C{Content-Length} or L{UNKNOWN_LENGTH}, C{monedgeConnection}, the
  upstream's C{Connection} header values, and C{monedgeTrailers}, a
  chunked body's trailer fields once it has ended;
- a request body of unknown length (one that streams from a client that
  sent it chunked) is sent chunked;
- a malformed response (llhttp is strict: bare LF, bad chunk sizes, two
  Content-Lengths) fails the request, as a reset would;
- framing is exact: a response carries no more body than it declares, and
  none at all in answer to HEAD or with a 1xx, 204 or 304 status; a byte
  after a response's end (a second response in the same read, garbage,
  bytes on an idle pooled connection) is never parsed or handed on, and
  the connection is discarded, with a warning naming the endpoint;
- a response's heads are bounded: C{maxHeadersSize} bytes (interim heads
  included), counted as they arrive, and C{maxHeaderCount} fields, counted
  as each head ends; past either, reading stops, the connection is dropped
  and the request fails with L{UpstreamHeadersTooLarge};
- a pooled connection found closed before any byte of the response is
  replaced by a new one, once, for a request L{monedge.upstream.replay.mayReplay}
  allows;
- cancelling the result aborts the request and its connection.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import httptools
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IHalfCloseableProtocol,
    IPushProducer,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
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

from monedge.interfaces import IUpstreamClient, IUpstreamUpgrader
from monedge.rules.headers import canonicalName
from monedge.twistedseam import rawHeaderTable, sendAtOnce
from monedge.upstream.endpoints import EndpointCache, UpstreamTLS, UpstreamTLSError
from monedge.upstream.replay import NotReplayable, bodyAgain, mayReplay

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

#: Upstream keep-alive idle: below the keep-alive of common upstream
#: servers (Node.js 5 s, nginx 75 s, Go 90 s), so monedge, not the
#: upstream, closes an idle pooled connection and never races its close
#: (--upstream-idle-timeout).
DEFAULT_POOL_IDLE = 4.0

#: Idle connections kept per endpoint (--upstream-pool-size).
DEFAULT_MAX_PER_HOST = 256

#: The default bound on a response's heads, in bytes (Envoy's default is
#: 60 KiB): --max-upstream-headers-size.
DEFAULT_MAX_HEADERS_SIZE = 65536

#: The default bound on the header fields of one response head (Envoy's
#: max_response_headers_count default): --max-upstream-header-count.
DEFAULT_MAX_HEADER_COUNT = 100

#: scheme, host, port and TLS settings: connections are pooled by all four.
Key = tuple[bytes, bytes, int, "UpstreamTLS | None"]


class UpstreamProtocolError(Exception):
    """
    The upstream's response could not be parsed.
    """


class UpstreamHeadersTooLarge(Exception):
    """
    The upstream's response head (or trailer section) is over
    C{maxHeadersSize} bytes or C{maxHeaderCount} fields: it was not read
    further.
    """


class _AfterResponse(Exception):
    """
    The parser found another message after the response.
    """


class _Interim(Exception):
    """
    The parser read an interim head in a read it was given whole.
    """


class _Switched(Exception):
    """
    A 101's head ended at C{offset} in the read being parsed.
    """

    def __init__(self, offset: int) -> None:
        super().__init__(offset)
        self.offset = offset


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
        connection = self._connection
        transport = connection.transport
        if transport is not None and not connection.aborted:
            transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._connection._resumeBody()

    def stopProducing(self) -> None:
        self._connection.abort()


@implementer(IConsumer)
class _ChunkedWriter:
    """
    The consumer a request body of unknown length is written to: each
    write goes to the upstream connection as one chunk, and L{end} writes
    the last chunk.  The body is registered as the connection's producer
    (see L{_Connection.send}), not this writer's.
    """

    def __init__(self, transport: Any) -> None:
        self._transport = transport

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        raise RuntimeError("the body is registered with the connection")

    def unregisterProducer(self) -> None:
        raise RuntimeError("the body is registered with the connection")

    def write(self, data: bytes) -> None:
        if data:
            self._transport.write(b"%x\r\n%b\r\n" % (len(data), data))

    def end(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """
        The body is whole: write the last chunk, and C{trailers} (fields
        the front end read and checked).
        """
        if not trailers:
            self._transport.write(b"0\r\n\r\n")
            return
        lines = [b"0\r\n"]
        for name, value in trailers:
            lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        self._transport.write(b"".join(lines))


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
        #: The trailer fields of a chunked body, as (name, value) pairs in
        #: the order the upstream sent them: complete once the body has
        #: ended (bounded like the head: see L{UpstreamHeadersTooLarge}).
        self.monedgeTrailers: list[tuple[bytes, bytes]] = []

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

    Its framing is strict: the parser is fed exactly the bytes of one
    response, whose head is found and counted here, and any byte past the
    response's end (a second response, garbage, a body the response may
    not have) discards the connection (L{_overrun}).
    """

    _log = Logger()

    def __init__(self, client: FastUpstreamClient, key: Key) -> None:
        self._client = client
        self._maxHeadersSize = client.maxHeadersSize
        self._maxHeaderCount = client.maxHeaderCount
        self.key = key
        self.reused = False
        #: When the connection last went back to the pool.
        self.idleSince = 0.0
        #: Bytes came that no response may carry: it is never used again.
        self._discarded = False
        #: The connection is being dropped: its transport is not paused or
        #: resumed any more.
        self.aborted = False
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
        #: How the body ended badly, if it did before anyone read it.
        self._failure: Failure | None = None
        #: Reading a response head (interim ones included).
        self._inHead = True
        #: Bytes of response heads so far (interim ones included); fields
        #: in the trailer section.
        self._headBytes = 0
        self._headerCount = 0
        #: The current head's last bytes so far (its end may be split
        #: across reads); empty before its first byte.
        self._tail = b""
        self._headEnded = False
        #: Body bytes declared, and still to come, for a body framed by
        #: its length (0 for a response that has none).
        self._declared = 0
        self._remaining: int | None = None
        #: A chunked body: its last three bytes, the bytes read since its
        #: last data (size lines, the trailer section), and whether data
        #: came in the current read.
        self._last3 = b""
        self._sinceData = 0
        self._gotData = False
        #: What a parser callback stopped the parser with, if it did.
        self._stop: Exception | None = None
        #: The parser was given a whole read (see _readWhole).
        self._whole = False

    def _idle(self) -> None:
        """
        The response is over and the connection goes back to the pool: let
        go of what the response held (its next request resets the rest).
        """
        self._parser = None
        self._response = None
        self._headers = []
        self._bodyWriter = None

    def connectionMade(self) -> None:
        sendAtOnce(self.transport)

    @property
    def endpoint(self) -> str:
        """
        The upstream endpoint, C{host:port}, as the log names it.
        """
        host = self.key[1].decode("ascii", "replace")
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.key[2]}"

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
        chunked = body is not None and body.length is UNKNOWN_LENGTH
        if chunked:
            # A body whose length is not known before it ends (the client
            # sent it chunked, and it streams): sent chunked.
            lines.append(b"Transfer-Encoding: chunked\r\n")
        elif body is not None:
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
            writer = _ChunkedWriter(transport) if chunked else None
            # The body is the connection's producer while it is written:
            # paused when the upstream stops reading, so that no more than
            # a socket buffer of it waits in monedge.
            transport.registerProducer(body, True)  # type: ignore[attr-defined]
            writing = body.startProducing(writer or transport)
            self._bodyWriter = writing
            writing.addBoth(self._bodyWritten, writer, body)
        return result

    def _bodyWritten(
        self, result: object, writer: _ChunkedWriter | None, body: IBodyProducer
    ) -> None:
        """
        The body is written (or failed): it is no longer the connection's
        producer, and a chunked body gets its last chunk.
        """
        transport = self.transport
        if transport is not None and self._bodyWriter is not None:
            transport.unregisterProducer()  # type: ignore[attr-defined]
        if isinstance(result, Failure):
            self._bodyFailed(result)
        elif writer is not None and transport is not None:
            writer.end(getattr(body, "trailers", ()))

    def _bodyFailed(self, reason: Failure) -> None:
        if not reason.check(CancelledError):
            self._fail(ResponseNeverReceived([reason]))
        self.abort()

    # Parsing (httptools callbacks)

    def on_message_begin(self) -> None:
        if self._complete:
            # Another message after the response: only a chunked body's end
            # is found by the parser, which then goes on to what follows.
            self._stop = _AfterResponse()
            raise self._stop

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._inHead:
            # Counted when the head ends (its bytes are bounded meanwhile).
            self._headers.append((name, value))
            return
        # A trailer field: counted, and kept on the response for whoever
        # relays it (a value with CR, LF or NUL, never expected from
        # llhttp, is dropped).
        self._headerCount += 1
        if self._headerCount > self._maxHeaderCount:
            self._tooManyFields()
        response = self._response
        if response is not None and _UNSAFE_VALUE(value) is None:
            response.monedgeTrailers.append((name, value))

    def _tooManyFields(self) -> None:
        """
        Stop the parser: a head or trailer section has too many fields.
        """
        self._stop = UpstreamHeadersTooLarge(
            f"more than {self._maxHeaderCount} header fields"
        )
        raise self._stop

    def on_headers_complete(self) -> None:
        self._headEnded = True
        if len(self._headers) > self._maxHeaderCount:
            self._tooManyFields()
        parser = self._parser
        code = parser.get_status_code()
        if 100 <= code < 200 and code != 101:
            # An interim response: wait for the real one.
            self._interim = True
            self._headers = []
            self._tail = b""
            if self._whole:
                # The parser was given the whole read: stop it here, so the
                # next head is found and counted (see _readWhole).
                self._stop = _Interim()
                raise self._stop
            return
        self._inHead = False
        headers = Headers()
        raw = rawHeaderTable(headers)
        connection: list[bytes] | None = None
        declared: int | None = None
        for name, value in self._headers:
            lowered = name.lower()
            if lowered in _CONNECTION_CONTROL:
                if lowered == b"content-length":
                    declared = int(value)
                    if self._head:
                        headers.addRawHeader(name, value)
                elif lowered == b"connection":
                    connection = [*(connection or []), value]
                elif lowered == b"transfer-encoding":
                    # As llhttp reads it: chunked if the last coding is;
                    # any other coding is a body delimited by the close.
                    coding = value.rpartition(b",")[2].strip(b" \t").lower()
                    self._chunked = coding == b"chunked"
                    declared = None
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
        length: int | object
        if self._head or code in (204, 304, 101):
            # No body, whatever the head says: the response ends with it.
            length = self._remaining = self._declared = 0
            self._complete = True
        elif declared is not None:
            length = self._remaining = self._declared = declared
        else:
            length = UNKNOWN_LENGTH
        self._keepAlive = bool(parser.should_keep_alive()) and code != 101
        response = self._response = _Response(self, code, headers, length, connection)
        self._completeResponse(response)
        # The head is handed over once the parser has taken the whole read
        # (L{_handOver}): a body that came with it is then delivered at
        # once, and the client's response goes out in one send.

    def _completeResponse(self, response: _Response) -> None:
        """
        Add to a response before it is delivered (nothing, here).
        """

    def on_body(self, body: bytes) -> None:
        self._gotData = True
        protocol = self._protocol
        if protocol is not None:
            protocol.dataReceived(body)
        else:
            # Nobody reads yet: the head is still to be handed over (see
            # _handOver), or a response hook is running.  Hold what came.
            self._buffered.append(body)
            if self._result is None:
                self._holdBody()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        # The body is ended once the whole read is parsed (dataReceived):
        # whether the connection can be pooled depends on what follows.
        self._complete = True

    def _holdBody(self) -> None:
        """
        The head was handed over and nobody reads the body yet (a response
        hook is running): read no more until someone does.
        """
        transport = self.transport
        if transport is not None and not self._bufferPaused and not self.aborted:
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

    # Receiving

    def dataReceived(self, data: bytes) -> None:
        self._received = True
        if self._parser is None or self._complete:
            # Nothing asked for these bytes, or they follow the response.
            self._overrun()
            return
        try:
            self._read(data)
        except _Switched as e:
            self._handOver()
            self._afterSwitch(data[e.offset :])
            return
        except UpstreamHeadersTooLarge as e:
            self._tooLarge(e)
            return
        except httptools.HttpParserError as e:
            stop = self._stop
            if isinstance(stop, UpstreamHeadersTooLarge):
                self._tooLarge(stop)
                return
            self._handOver()
            self._fail(ResponseFailed([Failure(UpstreamProtocolError(str(e)))]))
            self.abort()
            return
        except UpstreamProtocolError as e:
            self._handOver()
            self._fail(ResponseFailed([Failure(e)]))
            self.abort()
            return
        if self._complete and self._protocol is not None:
            self._finishBody()
        self._handOver()

    def _read(self, data: bytes) -> None:
        """
        Parse one read: the rest of a head (or heads, interim ones first),
        then as much of the body as the response has.

        @raise _Switched: a 101's head ended at the given offset.
        @raise UpstreamHeadersTooLarge: past the head limits.
        @raise httptools.HttpParserError: a malformed response.
        @raise UpstreamProtocolError: a head llhttp would read differently.
        """
        if self._inHead and not self._tail and not self._head:
            # The common case: a head that starts and ends in this read.
            end = data.find(b"\r\n\r\n")
            if end > 0 and data[0] not in b"\r\n":
                self._readWhole(data, end + 4)
                return
        self._readFrom(data, 0)

    def _readWhole(self, data: bytes, end: int) -> None:
        """
        Parse a read that holds a whole head, ending at C{end}, and maybe
        more: the parser takes it all at once (one call, no copy), and what
        it parsed past the response's end is found after.  Not for HEAD,
        whose answer llhttp would read a body for.
        """
        self._headBytes += end
        if self._headBytes > self._maxHeadersSize:
            limit = self._maxHeadersSize
            raise UpstreamHeadersTooLarge(f"response heads over {limit} bytes")
        # (A head that starts in this read is the response's first, or
        # follows an interim one read whole: nothing of the body came yet.)
        self._headEnded = False
        self._whole = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            raise _Switched(e.args[0]) from None
        except httptools.HttpParserError:
            stop = self._stop
            if isinstance(stop, _Interim):
                # An interim head ended at `end`: a parser of its own for
                # what follows, read head by head.
                self._stop = None
                self._interim = False
                self._whole = False
                self._parser = httptools.HttpResponseParser(self)
                self._readFrom(data, end)
                return
            response = self._response
            if response is not None and response.code == 101:
                raise _Switched(end) from None
            if self._complete and (stop is None or isinstance(stop, _AfterResponse)):
                # Another message, or garbage, after the response.
                self._overrun()
                return
            raise
        finally:
            self._whole = False
        if not self._headEnded:
            raise UpstreamProtocolError("the head did not end at its empty line")
        size = len(data)
        remaining = self._remaining
        if self._complete:
            if remaining is not None:
                # Only the empty lines llhttp skips could have followed.
                if size > end + self._declared:
                    self._overrun()
            else:
                self._checkChunkedEnd(data, end)
            return
        if remaining is not None:
            self._remaining = remaining - (size - end)
        elif self._chunked:
            self._chunkedRead(data, end)

    def _readFrom(self, data: bytes, pos: int) -> None:
        """
        Parse C{data} from C{pos}, head by head, feeding the parser only
        the bytes of the response.
        """
        size = len(data)
        while self._inHead:
            if pos == size:
                return
            if not self._tail and data[pos] in b"\r\n":
                # llhttp skips empty lines before a status line; monedge
                # takes them for bytes after the last response.
                raise UpstreamProtocolError("an empty line before the status line")
            end = self._headEnd(data, pos)
            stop = size if end < 0 else end
            self._headBytes += stop - pos
            limit = self._maxHeadersSize
            if self._headBytes > limit:
                raise UpstreamHeadersTooLarge(f"response heads over {limit} bytes")
            if end < 0:
                self._feed(data, pos, size)
                self._tail = (self._tail + data[max(pos, size - 3) :])[-3:]
                return
            self._headEnded = False
            try:
                self._feed(data, pos, end)
            except (httptools.HttpParserUpgrade, httptools.HttpParserError):
                response = self._response
                if response is not None and response.code == 101:
                    raise _Switched(end) from None
                raise
            if not self._headEnded:
                raise UpstreamProtocolError("the head did not end at its empty line")
            pos = end
        if pos == size:
            return
        if self._complete:
            # A response without a body (HEAD, 204, 304) and more bytes.
            self._overrun()
            return
        remaining = self._remaining
        if remaining is not None:
            stop = min(size, pos + remaining)
            self._remaining = remaining - (stop - pos)
            if stop < size:
                # Known before the parser ends the body: the connection is
                # discarded, never pooled.
                self._overrun()
            self._feed(data, pos, stop)
            return
        if not self._chunked:
            # Delimited by the close: everything is body.
            self._feed(data, pos, size)
            return
        self._gotData = False
        try:
            self._feed(data, pos, size)
        except httptools.HttpParserError:
            if not self._complete:
                raise
            # Another message, or garbage, after the last chunk.
            self._overrun()
            return
        if self._complete:
            self._checkChunkedEnd(data, pos)
            return
        self._chunkedRead(data, pos)

    def _checkChunkedEnd(self, data: bytes, pos: int) -> None:
        """
        A chunked body ended in C{data[pos:]}, and the parser raised
        nothing after it; but it skips empty lines after a message.  The
        body ends with CRLF CRLF after a byte that is neither, so any more
        CR or LF after it were bytes past its end.
        """
        last = (self._last3 + data[max(pos, len(data) - 8) :])[-8:]
        if len(last) - len(last.rstrip(b"\r\n")) > 4:
            self._overrun()

    def _chunkedRead(self, data: bytes, pos: int) -> None:
        """
        Account for a read of a chunked body, C{data[pos:]}, that did not
        end it: its last bytes, and the bytes with no data in them (size
        lines, the trailer section), which are bounded like a head.
        """
        size = len(data)
        self._last3 = (self._last3 + data[max(pos, size - 3) :])[-3:]
        if self._gotData:
            self._sinceData = 0
        else:
            self._sinceData += size - pos
            limit = self._maxHeadersSize
            if self._sinceData > limit:
                raise UpstreamHeadersTooLarge(
                    f"over {limit} bytes of chunk framing or trailers"
                )

    def _headEnd(self, data: bytes, pos: int) -> int:
        """
        Where the head being read ends in C{data} (just past its empty
        line), searching from C{pos}; -1 if not in it.  llhttp accepts no
        bare CR or LF, so the head ends at the first CRLF CRLF.
        """
        tail = self._tail
        if tail:
            split = (tail + data[pos : pos + 3]).find(b"\r\n\r\n")
            if split >= 0:
                return pos + split + 4 - len(tail)
        found = data.find(b"\r\n\r\n", pos)
        return found + 4 if found >= 0 else -1

    def _feed(self, data: bytes, start: int, stop: int) -> None:
        """
        Feed the parser C{data[start:stop]}, without a copy.
        """
        if start == 0 and stop == len(data):
            self._parser.feed_data(data)
        else:
            self._parser.feed_data(memoryview(data)[start:stop])

    def _overrun(self) -> None:
        """
        Bytes came after the end of a response (or with no request): they
        are never parsed or relayed, and the connection, whose framing
        cannot be trusted any more, is dropped.
        """
        if not self._discarded:
            self._discarded = True
            self._log.warn(
                "upstream {endpoint} sent bytes after the end of a response;"
                " connection discarded",
                endpoint=self.endpoint,
            )
        self.abort()

    def _tooLarge(self, error: UpstreamHeadersTooLarge) -> None:
        """
        The response's head (or its trailer section) is over the limits:
        read no more of it, and drop the connection.
        """
        self._discarded = True
        self._log.warn(
            "upstream {endpoint} sent {error}; connection dropped",
            endpoint=self.endpoint,
            error=str(error),
        )
        if self._result is not None and self._response is None:
            self._fail(error)
        else:
            self._handOver()
            self._fail(ResponseFailed([Failure(error)]))
        self.abort()

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
        failure = self._failure
        if failure is not None and self._protocol is protocol:
            # The body failed before anyone read it.
            self._failure = None
            self._protocol = None
            protocol.connectionLost(failure)
            return
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
        if transport is not None and not self.aborted:
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
            and not self._discarded
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
        elif self._response is not None and not self._complete:
            # Nobody reads the body yet (a response hook is running): its
            # reader learns of the failure when it comes.
            self._failure = Failure(error)

    def abort(self) -> None:
        """
        Drop the connection now.
        """
        transport = self.transport
        if transport is not None and not self.aborted:
            self.aborted = True
            # Out of the pool at once: the transport reports the loss later.
            self._client._forget(self)
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
        L{monedge.upstream.tunnel.TunnelSide}).

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
    @param maxHeadersSize: the most bytes of a response's heads (interim
        ones included, line ends included), and of a chunked body's
        framing and trailers between two pieces of data.
    @param maxHeaderCount: the most header fields in one head (or trailer
        section).
    """

    def __init__(
        self,
        reactor: Any,
        maxPerHost: int = DEFAULT_MAX_PER_HOST,
        poolIdle: float = DEFAULT_POOL_IDLE,
        maxHeadersSize: int = DEFAULT_MAX_HEADERS_SIZE,
        maxHeaderCount: int = DEFAULT_MAX_HEADER_COUNT,
    ) -> None:
        self._reactor = reactor
        self.maxHeadersSize = maxHeadersSize
        self.maxHeaderCount = maxHeaderCount
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
            if connection.transport is not None and not connection.aborted:
                connection.reused = True
                return connection
        return None

    def _release(self, connection: _Connection) -> None:
        connection._idle()
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
        # mayReplay allowed it: no body, or one that may be sent again if
        # it is whole by now (a streamed body: see bodyAgain).
        try:
            again = bodyAgain(body)
        except NotReplayable:
            return fail(failure)
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
