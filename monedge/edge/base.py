"""
What the front ends' requests and connections share: HTTP/1.1's
(L{monedge.edge.http1}) and HTTP/2's (L{monedge.edge.http2}).

  - L{SharedRequest}: a request's identity (its request id, client address
    and listener port), its body read within the service's limit, and the
    end of its tunnel;
  - L{SharedChannel}: a connection's limits, its header deadline (one timer
    for the connection, not one per request), its response head held to
    go out with the body's first bytes, and its refusals on behalf of the
    request being read.

Each is a mixin: the class that uses it provides the attributes it reads
(listed on it), and L{SharedChannel} calls the channel's C{_later} to
schedule its timer.
"""

from __future__ import annotations

from typing import IO, TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall

from monedge.record import RequestRecord
from monedge.rules.headers import requestIdFor
from monedge.rules.limits import Limits
from monedge.upstream.streaming import StreamingBody

#: The status logged for a request whose client went away first.
CLIENT_CLOSED = 499

#: Seconds a refused connection is kept half-open, discarding input, so the
#: client reads the refusal instead of a reset.
LINGER = 2.0

#: The message of the 400 for a header name with an underscore, with
#: C{--underscore-headers reject}.
UNDERSCORE_REFUSED = "header names with underscores are refused"


class SharedRequest:
    """
    What the front ends' requests share.
    """

    #: The proxy's site (a L{monedge.edge.server.ProxySite}).
    site: Any
    requestHeaders: Any
    client: Any
    host: Any
    record: RequestRecord
    content: IO[bytes] | None
    #: The body as it streams to the upstream (monedge's own front ends),
    #: or None: the exchange then sends C{content}, held whole.
    bodyStream: StreamingBody | None = None
    _requestId: bytes | None = None
    _peerAddress: bytes | None = None
    _bodyLimit: int | None = None
    _refused = False

    exchange: Any = None
    method: bytes
    uri: bytes
    code: int
    sentLength: int
    _accounted = False
    _inFlight = False
    _metrics: Any = None

    if TYPE_CHECKING:
        # Provided by the request class.

        def _refuse(self, code: str, message: str | None = None) -> None: ...

    @property
    def requestId(self) -> bytes:
        """
        This request's id: a trusted hop's valid C{X-Request-Id}, or a new
        one.
        """
        rid = self._requestId
        if rid is None:
            rid = self._requestId = requestIdFor(
                self.requestHeaders, self.site.forwarding.isTrusted(self.peerAddress)
            )
        return rid

    @property
    def peerAddress(self) -> bytes:
        """
        The client's address, for C{X-Forwarded-For} and the log (worked
        out once: routing, the request id and the log all read it).
        """
        address = self._peerAddress
        if address is None:
            host = getattr(self.client, "host", None)
            if host is None:
                address = b"unknown"
            elif isinstance(host, str):
                address = host.encode("ascii")
            else:
                address = bytes(host)
            self._peerAddress = address
        return address

    @property
    def listenerPort(self) -> bytes:
        """
        The port the request arrived on.
        """
        return str(getattr(self.host, "port", 0)).encode("ascii")

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:
            return
        record = self.record
        record.bytesIn += len(data)
        if self._bodyLimit is not None and record.bytesIn > self._bodyLimit:
            self._refuse("body_too_large")
            return
        content = self.content
        assert content is not None
        content.write(data)

    def _account(self, status: int) -> None:
        """
        The request is over, however it ended: account for it once, from
        its record (the access log and the metrics), and let go of its
        exchange and its body.
        """
        if self._accounted:
            return
        self._accounted = True
        self.exchange = None
        stream = self.bodyStream
        if stream is not None:
            stream.close()
        site = self.site
        if self._inFlight:
            self._inFlight = False
            site.inFlight -= 1
            self._metrics.inFlight -= 1
        record = self.record
        record.requestId = self.requestId
        record.client = self.peerAddress
        record.method = self.method
        record.path = self.uri
        if not record.tunnelled:
            record.bytesOut = self.sentLength
        record.finished(status, site.reactor.seconds(), self.code)
        site.requestDone(record)

    def tunnelDone(self) -> None:
        """
        The tunnel this request opened has closed: log it, as a 101.
        """
        self._account(101)


class SharedChannel:
    """
    What both front ends' HTTP/1.1 connections share.
    """

    #: The proxy's site (a L{monedge.edge.server.ProxySite}).
    site: Any
    transport: Any
    requests: list[Any]
    _deadline: IDelayedCall | None
    _deadlineAt: float | None
    #: The response-head deadline of the exchange waiting on this
    #: connection's upstream, if one is (L{responseDeadline}): when, for
    #: whom, and what to call then.
    _responseAt: float | None = None
    _responseOwner: object = None
    _responseFunc: Any = None
    _heldHead: bytes | None
    _inBody: bool

    if TYPE_CHECKING:
        # Provided by the channel class.

        def _later(self, delay: float, f: Any) -> IDelayedCall: ...

        def setTimeout(self, period: float | None) -> object: ...

        def refuse(
            self,
            code: str,
            requestId: bytes | None = None,
            message: str | None = None,
            request: Any = None,
        ) -> None: ...

    @property
    def limits(self) -> Limits:
        limits: Limits = self.site.limits
        return limits

    def abandon(self) -> None:
        """
        Another protocol (HTTP/2) took the connection: stop timing it and
        stop counting it as an HTTP/1.1 connection.
        """
        self._cancelDeadline()
        self.setTimeout(None)
        self.site.channels.discard(self)

    # The header deadline, and the response deadline

    # One timer serves many requests on a keep-alive connection, and both
    # its deadlines: the head's or body's (_deadlineAt) and the response
    # head's its exchange waits for (_responseAt).  Stopping a deadline
    # only clears it, and the timer, when it fires, acts on the deadlines
    # passed and re-arms itself for the nearest one left, or lapses.  A
    # request then costs no timer of its own.

    def responseDeadline(self, delay: float, owner: object, func: Any) -> None:
        """
        Call C{func} in C{delay} seconds, for C{owner} (an exchange waiting
        for its upstream's response head), unless
        L{stopResponseDeadline} is called first; on this connection's one
        timer.
        """
        at = self.site.reactor.seconds() + delay
        self._responseAt = at
        self._responseOwner = owner
        self._responseFunc = func
        if self._deadline is None:
            self._deadline = self._later(delay, self._deadlineFired)
        elif self._deadline.getTime() > at:
            self._deadline.reset(delay)

    def stopResponseDeadline(self, owner: object) -> None:
        """
        Forget C{owner}'s response deadline (nothing, if another's is set).
        """
        if self._responseOwner is owner:
            self._responseAt = None
            self._responseOwner = None
            self._responseFunc = None

    def _startDeadline(self, timeout: float | None = None) -> None:
        if self._deadlineAt is not None:
            return
        if timeout is None:
            timeout = self.limits.headerTimeout
        self._deadlineAt = self.site.reactor.seconds() + timeout
        if self._deadline is None:
            self._deadline = self._later(timeout, self._deadlineFired)
        elif self._deadline.getTime() > self._deadlineAt:
            # A shorter deadline than the timer's (a body timeout below the
            # header timeout): bring the timer forward.
            self._deadline.reset(timeout)

    def _stopDeadline(self) -> None:
        self._deadlineAt = None

    def _cancelDeadline(self) -> None:
        self._deadlineAt = None
        self._responseAt = None
        self._responseOwner = None
        self._responseFunc = None
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _deadlineFired(self) -> None:
        self._deadline = None
        now = self.site.reactor.seconds()
        responseAt = self._responseAt
        if responseAt is not None and responseAt <= now:
            func = self._responseFunc
            self._responseAt = None
            self._responseOwner = None
            self._responseFunc = None
            func()
            responseAt = self._responseAt
        at = self._deadlineAt
        if at is None or at > now:
            left = [t for t in (at, responseAt) if t is not None]
            if left and self._deadline is None:
                self._deadline = self._later(min(left) - now, self._deadlineFired)
            return
        self._deadlineAt = None
        request = self.requests[-1] if self.requests else None
        message = None
        if self._inBody:
            message = f"the request body stalled for {self.limits.bodyTimeout:g} s"
        self.refuse(
            "request_timeout",
            request.requestId if request is not None else None,
            message,
            request=request,
        )

    def writeHeaders(
        self, version: bytes, code: bytes, reason: bytes, headers: Any
    ) -> None:
        """
        Write the response head as one piece (Twisted's own writes a
        sequence of small pieces, each checked): this runs per response.
        Names and values come from L{Headers}, which validated them.
        """
        lines = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                lines += (name, b": ", value, b"\r\n")
        lines.append(b"\r\n")
        # Held until the body's first bytes, so that both go in one send
        # (see monedge.twistedseam.sendAtOnce): flushHead sends it alone if
        # need be.
        self._heldHead = b"".join(lines)

    def flushHead(self) -> None:
        """
        Send the response head held by L{writeHeaders}, if any.
        """
        head = self._heldHead
        if head is not None:
            self._heldHead = None
            assert self.transport is not None
            self.transport.write(head)

    def write(self, data: bytes) -> None:
        head = self._heldHead
        if head is not None:
            self._heldHead = None
            data = head + data
        assert self.transport is not None
        self.transport.write(data)

    def writeSequence(self, iovec: list[bytes]) -> None:
        head = self._heldHead
        if head is not None:
            self._heldHead = None
            iovec = [head, *iovec]
        assert self.transport is not None
        self.transport.write(b"".join(iovec))

    def _refuseForRequest(self, code: str, message: str | None = None) -> None:
        request = self.requests[-1] if self.requests else None
        self.refuse(code, None, message, request=request)
