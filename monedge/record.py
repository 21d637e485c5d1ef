"""
The per-request record: what one request did, from its first byte to its
accounting, in the spirit of Envoy's StreamInfo.

One L{RequestRecord} is made for each request, and owned by the object
that made it: the request (L{monedge.edge.http1.HTTP1Request} or
L{monedge.edge.http2.H2Request}), or the channel for a request it refuses
before any request object could answer it.  The
stages write it through a narrow set of methods:

  - routing (L{monedge.proxy.resource}) records its decision: L{routed},
    L{decided};
  - the exchange (L{monedge.proxy.exchange}) records each attempt upstream and its
    answer: L{upstreamSent}, L{upstreamAnswered}, L{tunnelEnded};
  - whoever refuses or fails the request records why: L{failed}.

The owner fills in what only it knows (the request line, the client, the
bytes read and written, the status) and closes the record with
L{finished}.  The access log (L{monedge.observe.accesslog}) and the metrics
(L{monedge.observe.metrics}) read only the record: never the channel, nor
Twisted's request.
"""

from __future__ import annotations

from twisted.web.resource import IResource

from monedge.rules.errors import CATALOGUE
from monedge.rules.paths import RoutedPath

#: Who chose a response's status: the upstream, or monedge.
UPSTREAM = "upstream"
MONEDGE = "monedge"


class RequestRecord:
    """
    What one request did.

    @ivar start: when the request began (its first line), in reactor
        seconds, or L{None} for a request refused before it had begun.
    @ivar end: when it was accounted for, or L{None} until then.
    @ivar totalLatency: seconds from start to end, once finished (L{None}
        for a request refused before it had begun).
    @ivar requestId: its request id, once known.
    @ivar client: the client's address, as logged.
    @ivar method: the request method as received, or L{None} if none
        arrived.
    @ivar path: the request target as received, or L{None}.
    @ivar host: the Host (or absolute-form authority) it was routed by.
    @ivar routedPath: its normalised path, once routing parsed it.
    @ivar decision: the leaf that answers it (the routing decision), once
        made.
    @ivar service: the service it was routed to, if any.
    @ivar endpoint: the endpoint of its last attempt upstream, if any.
    @ivar attempts: how many times it was sent upstream.
    @ivar upstreamLatency: seconds from its last sending to the upstream's
        response head, if one came.
    @ivar bytesIn: request body bytes received (both directions' client
        bytes for a tunnel).
    @ivar bytesOut: response body bytes sent (the upstream's bytes for a
        tunnel).
    @ivar status: the status it was accounted with (499 if the client left
        first), once finished.
    @ivar errorCode: the refusal or failure code, if any (the error
        catalogue's, or an upstream failure's such as C{reset_mid_body}).
    @ivar tunnelled: whether it became a tunnel (a WebSocket).
    @ivar origin: who chose the status (L{UPSTREAM} or L{MONEDGE}), once
        finished.
    @ivar grpcStatus: a gRPC call's C{grpc-status}: the upstream's (in its
        trailers, or its head for a trailers-only answer), or the one
        monedge answered with (a refusal in gRPC's form); else L{None}.
    """

    __slots__ = (
        "start",
        "end",
        "totalLatency",
        "requestId",
        "client",
        "method",
        "path",
        "host",
        "routedPath",
        "decision",
        "service",
        "endpoint",
        "attempts",
        "upstreamLatency",
        "_sentAt",
        "bytesIn",
        "bytesOut",
        "status",
        "errorCode",
        "tunnelled",
        "origin",
        "grpcStatus",
    )

    def __init__(self, start: float | None) -> None:
        self.start = start
        self.end: float | None = None
        self.totalLatency: float | None = None
        self.requestId = b"-"
        self.client = b"unknown"
        self.method: bytes | None = None
        self.path: bytes | None = None
        self.host: bytes | None = None
        self.routedPath: RoutedPath | None = None
        self.decision: IResource | None = None
        self.service: str | None = None
        self.endpoint: str | None = None
        self.attempts = 0
        self.upstreamLatency: float | None = None
        self._sentAt = 0.0
        self.bytesIn = 0
        self.bytesOut = 0
        self.status = 0
        self.errorCode: str | None = None
        self.tunnelled = False
        self.origin = MONEDGE
        self.grpcStatus: int | None = None

    # Routing

    def routed(self, host: bytes | None, routedPath: RoutedPath) -> None:
        """
        Routing read the request's host and normalised its path.
        """
        self.host = host
        self.routedPath = routedPath

    def decided(self, decision: IResource, service: str | None) -> None:
        """
        Routing chose the leaf that answers the request, for C{service}
        (L{None} for a refusal).
        """
        self.decision = decision
        if service is not None:
            self.service = service

    # The exchange

    def upstreamSent(self, endpoint: str, now: float) -> None:
        """
        The request was sent (again) to C{endpoint} at C{now}.
        """
        self.attempts += 1
        self.endpoint = endpoint
        self._sentAt = now

    def upstreamAnswered(self, now: float) -> None:
        """
        The upstream's response head arrived at C{now}.
        """
        self.upstreamLatency = now - self._sentAt

    def tunnelStarted(self) -> None:
        """
        The request became a tunnel: it is accounted for when the tunnel
        ends.
        """
        self.tunnelled = True

    def tunnelEnded(self, bytesIn: int, bytesOut: int, timedOut: bool) -> None:
        """
        The tunnel closed, having carried C{bytesIn} bytes from the client
        and C{bytesOut} from the upstream.
        """
        self.bytesIn = bytesIn
        self.bytesOut = bytesOut
        if timedOut:
            self.failed("tunnel_idle_timeout")

    # Any stage

    def failed(self, code: str | None) -> None:
        """
        The request was refused or failed, with C{code} (L{None}: a hook's
        answer that names no code).
        """
        self.errorCode = code

    # The owner

    def finished(self, status: int, now: float, sentStatus: int | None = None) -> None:
        """
        The request is over, accounted with C{status}; C{sentStatus} is
        the status of the response sent, if one was.

        The upstream chose the status if it answered, the status is the
        one sent, and monedge refused nothing after (a code from the
        catalogue is a status monedge made; the other codes, a body cut
        short say, leave the upstream's status); else monedge did.
        """
        self.status = status
        self.end = now
        start = self.start
        if start is not None:
            self.totalLatency = now - start
        if (
            self.upstreamLatency is not None
            and status == sentStatus
            and self.errorCode not in CATALOGUE
        ):
            self.origin = UPSTREAM
