"""
One proxied exchange: choose an endpoint, send the request, stream the
response back with backpressure, and turn every failure into the right
status.

Retry rule: a request whose connection could not be opened is retried once
on another endpoint.  Once any byte may have reached an upstream, nothing is
retried here (the upstream client alone replays an idempotent request,
its body included, whose pooled connection turned out to be closed before
any response byte came back).
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Any, cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, DNSLookupError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import NO_BODY_CODES, PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from zope.interface import implementer

from monedge.hooks import HookFailed, HookResponse, HookResponseHead, HookSet
from monedge.interfaces import IUpstreamClient, IUpstreamUpgrader
from monedge.record import RequestRecord
from monedge.rules.errors import (
    ProxyError,
    errorBody,
    isGrpcRequest,
    renderError,
    setGrpcRefusal,
)
from monedge.rules.grpc import formatGrpcTimeout, parseGrpcStatus
from monedge.rules.headers import downstreamHeaders, trailerFields
from monedge.rules.limits import DEFAULT_LIMITS
from monedge.twistedseam import HeaderTable
from monedge.upstream.balancer import Balancer, EndpointState
from monedge.upstream.client import UpstreamHeadersTooLarge
from monedge.upstream.endpoints import UpstreamTLS, UpstreamTLSError
from monedge.upstream.replay import BufferedBody
from monedge.upstream.streaming import BufferBudget, BufferFull, StreamingBody
from monedge.upstream.tunnel import Tunnel, TunnelSet, TunnelSide
from monedge.upstream.upgrade import isWebSocketAccept

if TYPE_CHECKING:
    from monedge.observe.metrics import ServiceMetrics
    from monedge.proxy.grpcweb import GrpcWebCall
    from monedge.rules.policy import Policy


class ClientRequest(typing.Protocol):
    """
    What the exchange and the routing leaves use of a client's request
    (L{monedge.edge.server.ClientRequest} provides it): Twisted's request API
    for the response, the request's own identity, and its record, which
    they write (L{monedge.record}).
    """

    record: RequestRecord
    #: The exchange proxying the request, once started: told if the client
    #: goes first.
    exchange: ProxyExchange | None
    method: bytes
    uri: bytes
    clientproto: bytes
    code: int
    startedWriting: int
    disconnected: bool
    hasBody: bool
    #: Whether trailers given to L{setTrailers} can reach the client.
    sendsTrailers: bool
    content: IO[bytes] | None
    #: The body as it streams from the client, if the front end streams
    #: it (else C{content} holds it whole).
    bodyStream: StreamingBody | None
    requestHeaders: Headers
    responseHeaders: Headers
    #: The request headers' table (L{monedge.twistedseam.rawHeaderTable}).
    headerTable: HeaderTable
    channel: Any
    site: Any

    @property
    def requestId(self) -> bytes: ...

    @property
    def peerAddress(self) -> bytes: ...

    @property
    def listenerPort(self) -> bytes: ...

    def isSecure(self) -> bool: ...

    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...

    def write(self, data: bytes) -> None: ...

    def finish(self) -> None: ...

    def loseConnection(self) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def flushHead(self) -> None: ...

    def tunnelDone(self) -> None: ...

    def setTrailers(self, trailers: list[tuple[bytes, bytes]]) -> None: ...

    def stopBodyTimeout(self) -> None: ...


class TunnelChannel(typing.Protocol):
    """
    What a WebSocket handshake's exchange uses of the client's connection
    to make it a tunnel (L{monedge.edge.http1.HTTP1Channel} provides it).
    """

    transport: Any

    def startTunnel(self, side: TunnelSide) -> bytes: ...


class ProxyContext:
    """
    What every exchange shares: the upstream client, the balancer, the
    clock and the hooks.
    """

    def __init__(
        self,
        client: IUpstreamClient,
        balancer: Balancer,
        clock: IReactorTime,
        hooks: HookSet | None = None,
        upgrader: IUpstreamUpgrader | None = None,
        tunnels: TunnelSet | None = None,
        bufferBudget: BufferBudget | None = None,
    ) -> None:
        self.client = client
        self.balancer = balancer
        self.clock = clock
        self.hooks = hooks
        #: Sends WebSocket handshakes; None refuses them (502).
        self.upgrader = upgrader
        self.tunnels = tunnels if tunnels is not None else TunnelSet()
        #: What request bodies services with request buffering may hold.
        self.bufferBudget = (
            bufferBudget
            if bufferBudget is not None
            else BufferBudget(DEFAULT_LIMITS.requestBufferBudget)
        )


_DONE = Failure(ResponseDone())


@implementer(IPushProducer)
class _BodyRelay(Protocol):
    """
    Streams an upstream response body to the client.  It is the client
    connection's producer: when the client stops reading, it pauses the
    upstream socket, so no more than a socket buffer is held in memory.
    """

    def __init__(
        self, exchange: ProxyExchange, idleTimeout: float, timer: IDelayedCall | None
    ) -> None:
        self._exchange = exchange
        self._request = exchange.request
        self._clock = exchange.context.clock
        self._idleTimeout = idleTimeout
        #: How long the client may leave the response unread (--send-timeout).
        limits = getattr(getattr(self._request, "site", None), "limits", None)
        self._sendTimeout: float = getattr(limits, "sendTimeout", 60.0)
        self._last = 0.0
        self._paused = False
        self._pausedAt = 0.0
        #: The exchange's response-header timer, re-armed as the idle timer
        #: (one timer per exchange: this runs per request).
        self._idleCall = timer

    def connectionMade(self) -> None:
        self._last = self._clock.seconds()
        self._request.registerProducer(self, True)
        timer = self._idleCall
        if timer is not None and timer.active():
            timer.reset(self._idleTimeout)
            timer.func = self._checkIdle  # type: ignore[attr-defined]
        else:
            self._idleCall = self._clock.callLater(self._idleTimeout, self._checkIdle)

    def dataReceived(self, data: bytes) -> None:
        self._last = self._clock.seconds()
        self._request.write(data)

    def connectionLost(self, reason: Failure = _DONE) -> None:
        if self._idleCall is not None and self._idleCall.active():
            self._idleCall.cancel()
        self._idleCall = None
        request = self._request
        if not request.disconnected:
            # A client that left took its channel with it (Twisted's
            # request then has none to unregister from).
            request.unregisterProducer()
        self._exchange.bodyDone(reason)

    def _checkIdle(self) -> None:
        now = self._clock.seconds()
        if self._paused:
            # The client is not reading: that is not the upstream's
            # idleness, but a client may only stall so long.
            stalled = now - self._pausedAt
            if stalled >= self._sendTimeout:
                self._idleCall = None
                self._exchange.clientStalled()
                return
            wait = min(self._idleTimeout, self._sendTimeout - stalled)
            self._idleCall = self._clock.callLater(wait, self._checkIdle)
            return
        last = self._last
        exchange = self._exchange
        if exchange.grpc:
            # A gRPC call is idle only if its client is quiet too; that is
            # checked each quarter of the timeout.
            last = max(last, exchange.clientQuietSince(now))
        idle = now - last
        if idle < self._idleTimeout:
            wait = self._idleTimeout - idle
            if exchange.grpc:
                wait = min(wait, self._idleTimeout / 4)
            self._idleCall = self._clock.callLater(wait, self._checkIdle)
            return
        self._idleCall = None
        self._exchange.bodyStalled()
        self.stopProducing()

    # IPushProducer, for the client connection

    def pauseProducing(self) -> None:
        self._paused = True
        self._pausedAt = self._clock.seconds()
        timer = self._idleCall
        if timer is not None and timer.active():
            wait = timer.getTime() - self._pausedAt
            if wait > self._sendTimeout:
                timer.reset(self._sendTimeout)
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def resumeProducing(self) -> None:
        self._paused = False
        self._last = self._clock.seconds()
        assert self.transport is not None
        self.transport.resumeProducing()  # type: ignore[attr-defined]

    def stopProducing(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]


class ProxyExchange:
    """
    The life of one proxied request.

    @ivar request: the client request.
    @ivar url: the path and query to send upstream.
    """

    _log = Logger()

    def __init__(
        self,
        request: ClientRequest,
        context: ProxyContext,
        candidates: list[EndpointState],
        policy: Policy,
        metrics: ServiceMetrics,
        headers: Any,
        target: bytes,
    ) -> None:
        self.request = request
        self.context = context
        self._candidates = candidates
        self._policy = policy
        self._metrics = metrics
        self._headers = headers
        self._target = target
        self._state: EndpointState | None = None
        self._pending: Deferred[IResponse] | None = None
        self._timeoutCall: IDelayedCall | None = None
        #: The client connection whose one timer holds this exchange's
        #: response-head deadline, if it has one (an HTTP/1.1 connection).
        self._deadlineChannel: Any = None
        #: The error code of the timeout that ended the exchange, if one did.
        self._timedOut: str | None = None
        self._relay: _BodyRelay | None = None
        self._response: IResponse | None = None
        self._clientGone = False
        #: Runs the response hooks on the response's head, if there are any.
        #: (L{None} when they all returned at once, else a L{Deferred}).
        self.responseHooks: (
            Callable[[HookResponseHead], Deferred[None] | None] | None
        ) = None
        #: The Sec-WebSocket-Key of a WebSocket handshake, else None.
        self.upgradeKey: bytes | None = None
        #: TLS settings for https endpoints (the service's policy).
        self.tls: UpstreamTLS | None = None
        #: Whether the request is a gRPC call: a stream, which the policy's
        #: C{stream-idle-timeout} and its own deadline govern rather than
        #: the HTTP timeouts, and whose grpc-status is recorded.
        self.grpc = False
        #: A gRPC call's C{grpc-timeout}, seconds: its deadline, counted
        #: from its arrival.
        self.deadline: float | None = None
        self._deadlineCall: IDelayedCall | None = None
        #: The request body bytes received at the last idle check, and
        #: when that check saw them grow.
        self._progress = 0
        self._quietSince = 0.0
        #: Headers request hooks gave for any answer but the upstream's.
        self.answerHeaders: Headers | None = None
        #: A gRPC-Web call's translation to gRPC (HTTP/2 services only).
        self.grpcWeb: GrpcWebCall | None = None

    def start(self) -> None:
        """
        Choose an endpoint and send.
        """
        # The request tells its exchange when its client goes (cheaper than
        # a notifyFinish Deferred on every request).
        request = self.request
        request.exchange = self
        if self.deadline is not None:
            self._startDeadline(self.deadline)
        stream = request.bodyStream
        if (
            stream is not None
            and self._policy.requestBuffering
            and not stream.replayable()
        ):
            # The service wants the whole body first: hold it, then send.
            try:
                stream.buffer(self.context.bufferBudget)
            except BufferFull:
                self._fail(ProxyError("request_buffer_full"))
                return
            stream.whenComplete().addCallbacks(lambda _: self._pick(), lambda _: None)
            return
        self._pick()

    def _pick(self) -> None:
        if self._clientGone:
            return
        if self._timedOut is not None:
            # The call's deadline passed while its body was being held.
            self._fail(ProxyError(self._timedOut))
            return
        state = self.context.balancer.pick(self._candidates)
        if state is None:
            self._fail(ProxyError("no_ready_endpoint"))
            return
        self._send(state, canRetry=True)

    def _body(self) -> IBodyProducer | None:
        request = self.request
        if not request.hasBody:
            return None
        stream = request.bodyStream
        if stream is not None:
            if self._policy.requestBuffering:
                # Held whole: sent with its length, unless it has trailers.
                return stream.held() or stream
            return stream
        content = request.content
        assert content is not None
        return BufferedBody(content)

    def _send(self, state: EndpointState, canRetry: bool) -> None:
        self._state = state
        state.outstanding += 1
        clock = self.context.clock
        self.request.record.upstreamSent(state.endpoint.authority, clock.seconds())
        upgrader = self.context.upgrader
        if self.upgradeKey is not None and upgrader is not None:
            d = upgrader.upgrade(
                state.base + self._target,
                self._headers,
                self._policy.connectTimeout,
                self.tls,
            )
        elif self._policy.protocol == "http1":
            d = self.context.client.request(
                self.request.method,
                state.base + self._target,
                self._headers,
                self._body(),
                self._policy.connectTimeout,
                self.tls,
            )
        else:
            # An HTTP/2 service: the client dispatches by protocol
            # (monedge.upstream.dispatch.ProtocolDispatch).
            dispatch: Any = self.context.client
            web = self.grpcWeb
            body = self._body()
            d = dispatch.request(
                self.request.method,
                state.base + self._target,
                self._headers,
                body if web is None else web.body(body),
                self._policy.connectTimeout,
                self.tls,
                protocol=self._policy.protocol,
            )
            if web is not None:
                d = web.watch(d)
        self._pending = d
        if self.grpc:
            # A stream: no wait for the head (a client stream's comes at
            # its end), but no silence longer than the stream idle timeout.
            stream = self.request.bodyStream
            self._progress = stream.received if stream is not None else 0
            self._quietSince = clock.seconds()
            self._timeoutCall = clock.callLater(
                self._policy.streamIdleTimeout / 4, self._callQuiet
            )
        else:
            # On the client connection's one timer, if it has one (an
            # HTTP/1.1 connection's requests are answered one at a time).
            channel = self.request.channel
            setDeadline = getattr(channel, "responseDeadline", None)
            if setDeadline is not None:
                setDeadline(self._policy.timeout, self, self._headersTimedOut)
                self._deadlineChannel = channel
            else:
                self._timeoutCall = clock.callLater(
                    self._policy.timeout, self._headersTimedOut
                )
        d.addCallbacks(self._gotResponse, self._failed, errbackArgs=(state, canRetry))

    def _release(self) -> None:
        if self._state is not None:
            self._state.outstanding -= 1
            self._state = None

    def _cancelTimeout(self) -> None:
        if self._timeoutCall is not None and self._timeoutCall.active():
            self._timeoutCall.cancel()
        self._timeoutCall = None
        channel = self._deadlineChannel
        if channel is not None:
            self._deadlineChannel = None
            channel.stopResponseDeadline(self)

    def _headersTimedOut(self) -> None:
        self._timeoutCall = None
        self._deadlineChannel = None
        self._timedOut = "upstream_timeout"
        if self._pending is not None:
            self._pending.cancel()

    # gRPC calls' timers

    def _callQuiet(self) -> None:
        """
        Check, each quarter of the stream idle timeout, that a gRPC call
        waiting for its upstream's answer is not idle: once its client has
        sent nothing for the timeout either, the call ends.
        """
        clock = self.context.clock
        now = clock.seconds()
        timeout = self._policy.streamIdleTimeout
        quiet = now - self.clientQuietSince(now)
        if quiet < timeout:
            self._timeoutCall = clock.callLater(
                min(timeout - quiet, timeout / 4), self._callQuiet
            )
            return
        self._timeoutCall = None
        self._timedOut = "stream_idle_timeout"
        if self._pending is not None:
            self._pending.cancel()

    def clientQuietSince(self, now: float) -> float:
        """
        Since when a gRPC call's client has sent nothing of its stream, as
        far as the checks made (the first that saw its body grow; C{now}
        is this check's time).
        """
        stream = self.request.bodyStream
        if stream is not None and stream.received != self._progress:
            self._progress = stream.received
            self._quietSince = now
        return self._quietSince

    def _startDeadline(self, deadline: float) -> None:
        """
        Arm a gRPC call's deadline, C{deadline} seconds from its arrival.
        """
        clock = self.context.clock
        start = self.request.record.start
        elapsed = clock.seconds() - start if start is not None else 0.0
        remaining = max(deadline - elapsed, 0.0)
        self._deadlineCall = clock.callLater(remaining, self._deadlinePassed)
        # The upstream is told what is left of the call's time.
        self._headers.setRawHeaders(b"grpc-timeout", [formatGrpcTimeout(remaining)])

    def _stopDeadline(self) -> None:
        call = self._deadlineCall
        if call is not None:
            self._deadlineCall = None
            if call.active():
                call.cancel()

    def _deadlinePassed(self) -> None:
        """
        A gRPC call's deadline passed: it ends, before its answer with
        C{grpc_deadline_exceeded} (DEADLINE_EXCEEDED), during it with its
        stream reset, and the upstream's call is cancelled either way.
        """
        self._deadlineCall = None
        self._timedOut = "grpc_deadline_exceeded"
        if self._pending is not None:
            self._pending.cancel()
        elif self._relay is not None:
            self.request.record.failed("grpc_deadline_exceeded")
            self._relay.stopProducing()

    def clientLost(self, reason: Failure) -> None:
        """
        The client connection was lost before the response was finished.
        """
        self._clientGone = True
        self._stopDeadline()
        if self._pending is not None:
            self._pending.cancel()
        elif self._relay is not None:
            self._relay.stopProducing()

    def _gotResponse(self, response: IResponse) -> None:
        self._pending = None
        state = self._state
        assert state is not None
        self.context.balancer.connected(state)
        request = self.request
        request.record.upstreamAnswered(self.context.clock.seconds())
        if self._clientGone or response.code < 200:
            self._cancelTimeout()
        if self._clientGone:
            response.deliverBody(_Discard())
            self._release()
            return
        if response.code == 101 and self.upgradeKey is not None:
            self._cancelTimeout()
            self._switch(response)
            return
        if response.code < 200:
            # monedge answers Expect itself and strips every Upgrade but a
            # checked WebSocket handshake's, so an interim or unasked-for
            # 101 answer here is an upstream error, never a tunnel.
            response.deliverBody(_Discard())
            self._release()
            self._metrics.upstreamError("invalid_response")
            self._fail(
                ProxyError("upstream_reset", "the upstream sent an interim response")
            )
            return
        request.setResponseCode(response.code)
        out = request.responseHeaders
        # monedge's own values (digits; a generated or checked request id),
        # set in the table directly: Headers would scan each for CR and LF.
        raw = downstreamHeaders(
            response.headers, getattr(response, "monedgeConnection", None), out
        )
        if (
            response.length is not UNKNOWN_LENGTH
            and request.method != b"HEAD"
            and response.code not in NO_BODY_CODES
        ):
            raw[b"Content-Length"] = [b"%d" % (response.length,)]
        raw[b"X-Request-Id"] = [request.requestId]
        if self.responseHooks is not None:
            done = self.responseHooks(HookResponseHead(response.code, out))
            if done is None:
                self._relayBody(response)
                return
            if not done.called:
                done.addCallbacks(
                    lambda _: self._relayBody(response),
                    lambda failure: self._responseHookFailed(response, failure),
                )
                return
            failed: list[Failure] = []
            done.addErrback(failed.append)
            if failed:
                self._responseHookFailed(response, failed[0])
                return
        self._relayBody(response)

    def _switch(self, response: IResponse) -> None:
        """
        The upstream answered a WebSocket handshake with 101: check it, send
        the 101 on, and join the two connections in a tunnel.
        """
        key = self.upgradeKey
        assert key is not None
        takeOver = getattr(response, "monedgeTakeOver", None)
        handshake = getattr(response, "monedgeHandshake", None)
        if (
            takeOver is None
            or handshake is None
            or not isWebSocketAccept(handshake, key)
        ):
            # Not a valid completion of this handshake: never a tunnel.
            response.deliverBody(_Discard())
            self._release()
            self._metrics.upstreamError("invalid_response")
            self._fail(
                ProxyError(
                    "upstream_reset", "the upstream sent an invalid WebSocket 101"
                )
            )
            return
        request = self.request
        channel = cast(TunnelChannel, request.channel)
        transport = channel.transport
        assert transport is not None
        out = Headers()
        downstreamHeaders(
            response.headers, getattr(response, "monedgeConnection", None), out
        )
        out.setRawHeaders(b"x-request-id", [request.requestId])
        lines = [b"HTTP/1.1 101 Switching Protocols\r\n"]
        lines.append(b"Upgrade: websocket\r\nConnection: Upgrade\r\n")
        for name, values in out.getAllRawHeaders():
            for value in values:
                lines += [name, b": ", value, b"\r\n"]
        lines.append(b"\r\n")
        tunnels = self.context.tunnels
        tunnel = Tunnel(
            self.context.clock, self._policy.tunnelIdleTimeout, self._tunnelClosed
        )
        upstreamTransport, fromUpstream = takeOver(tunnel.upstream)
        fromClient = channel.startTunnel(tunnel.client)
        request.record.tunnelStarted()
        request.code = 101
        request.startedWriting = True
        transport.write(b"".join(lines))
        tunnels.add(tunnel)
        self._metrics.tunnelOpened()
        tunnel.start(transport, upstreamTransport, fromClient, fromUpstream)

    def _tunnelClosed(self, tunnel: Tunnel) -> None:
        self.context.tunnels.remove(tunnel)
        self._release()
        request = self.request
        request.record.tunnelEnded(
            tunnel.client.bytes, tunnel.upstream.bytes, tunnel.timedOut
        )
        request.tunnelDone()

    def _responseHookFailed(self, response: IResponse, failure: Failure) -> None:
        response.deliverBody(_Discard())
        self._release()
        self._cancelTimeout()
        if self._clientGone:
            return
        self.request.responseHeaders = Headers()
        self.hookFailed(failure)

    def hookFailed(self, failure: Failure) -> None:
        """
        A hook raised or timed out: the request fails closed, with 500.
        """
        error = failure.value
        hook = error.hook if isinstance(error, HookFailed) else "?"
        self._metrics.upstreamError("hook_failed")
        if self._clientGone or self.request.disconnected:
            return
        self._fail(ProxyError("hook_failed", f"the {hook} hook failed"))

    def _relayBody(self, response: IResponse) -> None:
        request = self.request
        if self._clientGone:
            response.deliverBody(_Discard())
            self._release()
            self._cancelTimeout()
            return
        take = getattr(response, "monedgeTakeBody", None)
        body = take() if take is not None else None
        if body is not None:
            # The whole body came with the head (monedge's own client says
            # so): it goes out with the head in one write, and the request
            # is over, with no relay, producer or idle timer to set up.
            self._cancelTimeout()
            self._release()
            if body:
                # (With none, the head goes with the end: a trailers-only
                # gRPC answer stays one HEADERS frame.)
                request.write(body)
            self._passTrailers(response)
            request.finish()
            return
        # Send the headers now: a client waiting on a long poll or an event
        # stream must not wait for the first body byte to see them.
        request.write(b"")
        channel = self._deadlineChannel
        if channel is not None:
            self._deadlineChannel = None
            channel.stopResponseDeadline(self)
        timer, self._timeoutCall = self._timeoutCall, None
        self._response = response
        policy = self._policy
        self._relay = _BodyRelay(
            self,
            policy.streamIdleTimeout if self.grpc else policy.idleTimeout,
            timer,
        )
        response.deliverBody(self._relay)
        # The head went out with the body's first bytes if they were here
        # already; if not, it goes now, alone.
        request.flushHead()

    def bodyDone(self, reason: Failure) -> None:
        """
        The upstream body ended, completely or not.
        """
        self._relay = None
        self._release()
        self._stopDeadline()
        request = self.request
        if self._clientGone:
            self._response = None
            return
        # isinstance, not reason.check: the same test, at a fortieth of the
        # cost, on every request.
        # The response refers to the relay, and the relay to this exchange.
        response, self._response = self._response, None
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self._passTrailers(response)
            request.finish()
            return
        # The upstream failed mid-body: the client must see a cut-off
        # response, never one that looks complete.
        if self._timedOut is None:
            self._metrics.upstreamError("reset_mid_body")
            request.record.failed("reset_mid_body")
        request.loseConnection()

    def _passTrailers(self, response: IResponse | None) -> None:
        """
        Give the client request the trailers of C{response}'s body that
        may cross, if it had any.
        """
        trailers = getattr(response, "monedgeTrailers", None)
        if self.grpc:
            # (A gRPC-Web call's trailers travel in its body.)
            upstream = getattr(response, "monedgeUpstreamTrailers", trailers)
            self._recordStatus(upstream)
        if trailers:
            kept = trailerFields(trailers, "allow")
            if kept:
                self.request.setTrailers(kept)

    def clientStalled(self) -> None:
        """
        The client read none of the response for --send-timeout: drop its
        connection (a slow-read attack holds no connection for ever), and
        with it the upstream's.
        """
        request = self.request
        request.record.failed("client_send_timeout")
        transport = request.channel.transport
        if transport is not None:
            transport.abortConnection()
        if self._relay is not None:
            self._relay.stopProducing()

    def _recordStatus(self, trailers: list[tuple[bytes, bytes]] | None) -> None:
        """
        Record a gRPC call's grpc-status: its trailers', or its head's (a
        trailers-only answer).
        """
        values: Sequence[bytes]
        if trailers:
            values = [
                value for name, value in trailers if name.lower() == b"grpc-status"
            ]
        else:
            values = self.request.responseHeaders.getRawHeaders(b"grpc-status", [])
        if values:
            self.request.record.grpcStatus = parseGrpcStatus(values[0])

    def bodyStalled(self) -> None:
        """
        The upstream body made no progress for the idle timeout.
        """
        record = self.request.record
        if self.grpc:
            self._timedOut = "stream_idle_timeout"
            self._metrics.upstreamError("stream_idle_timeout")
            record.failed("stream_idle_timeout")
        else:
            self._timedOut = "body_idle_timeout"
            self._metrics.upstreamError("body_idle_timeout")
            record.failed("body_idle_timeout")

    def _failed(self, failure: Failure, state: EndpointState, canRetry: bool) -> None:
        self._pending = None
        self._cancelTimeout()
        self._release()
        if self._clientGone:
            return
        timedOut = self._timedOut
        if timedOut is not None:
            self._stopDeadline()
            # (A call's own deadline passing is not the upstream's failing.)
            if timedOut == "upstream_timeout":
                self._metrics.upstreamError("timeout")
            elif timedOut == "stream_idle_timeout":
                self._metrics.upstreamError("stream_idle_timeout")
            self._fail(ProxyError(timedOut))
            return
        if failure.check(ConnectTimeoutError):
            self.context.balancer.connectFailed(state)
            kind, error = "connect_timeout", "upstream_connect_timeout"
        elif failure.check(ConnectError, DNSLookupError):
            self.context.balancer.connectFailed(state)
            kind, error = "connect_refused", "upstream_connect_failed"
        elif failure.check(CancelledError):
            return
        elif failure.check(ProxyError):
            # The request itself could not go (a gRPC-Web text body that
            # is not base64): the client's fault, not the upstream's.
            self._fail(cast(ProxyError, failure.value))
            return
        elif failure.check(UpstreamHeadersTooLarge):
            # Logged by the client, naming the endpoint and the limit.
            kind, error = "headers_too_large", "upstream_headers_too_large"
        elif failure.check(UpstreamTLSError):
            self._log.error(
                "{service}: cannot connect to {endpoint}: {error}",
                service=self.request.record.service,
                endpoint=state.endpoint.authority,
                error=failure.getErrorMessage(),
            )
            kind, error = "connect_refused", "upstream_connect_failed"
            canRetry = False
        else:
            kind, error = "reset", "upstream_reset"
            self._log.debug(
                "upstream {endpoint} failed: {failure}",
                endpoint=state.endpoint.authority,
                failure=failure.getErrorMessage(),
            )
        self._metrics.upstreamError(kind)
        if kind.startswith("connect") and canRetry:
            other = self.context.balancer.pick(self._candidates, exclude=state)
            if other is not None:
                self._send(other, canRetry=False)
                return
        self._fail(ProxyError(error))

    def _fail(self, error: ProxyError) -> None:
        self._stopDeadline()
        request = self.request
        request.record.failed(error.code)
        if request.startedWriting:
            request.loseConnection()
            return
        body = renderError(request, error, request.requestId)
        if self.answerHeaders is not None:
            addAnswerHeaders(request, self.answerHeaders)
        if body:
            request.write(body)
        request.finish()


def writeHookResponse(
    request: ClientRequest, answer: HookResponse, answerHeaders: Headers | None = None
) -> None:
    """
    Answer C{request} with a request hook's response, with the
    C{answerHeaders} earlier hooks gave (L{IHookRequest.answerHeaders})
    under the hook's own.
    """
    if answerHeaders is not None:
        addAnswerHeaders(request, answerHeaders)
    body = answer.body
    if body is None and answer.code is None:
        body = b""
    if answer.status >= 400 and isGrpcRequest(request):
        # A hook's refusal of a gRPC call, in gRPC's form (its own body
        # could not be read by a gRPC client); the hook's headers still go.
        setGrpcRefusal(
            request,
            answer.code,
            answer.status,
            answer.message or "",
            request.requestId,
        )
        _addHookHeaders(request, answer)
        request.finish()
        return
    if body is None:
        body = errorBody(
            answer.status,
            answer.code or "hook_response",
            answer.message or "",
            request.requestId,
        )
        request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
        request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    request.setResponseCode(answer.status)
    _addHookHeaders(request, answer)
    if answer.status not in NO_BODY_CODES:
        # (A 204 or 304 has no body, and no Content-Length: RFC 9110 8.6.)
        request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % (len(body),)])
    request.responseHeaders.setRawHeaders(b"x-request-id", [request.requestId])
    request.record.failed(answer.code)
    request.write(body)
    request.finish()


def addAnswerHeaders(request: ClientRequest, answerHeaders: Headers) -> None:
    """
    Set the headers request hooks gave for any answer but the upstream's
    (L{IHookRequest.answerHeaders}) on C{request}'s response.
    """
    headers = request.responseHeaders
    for name, values in answerHeaders.getAllRawHeaders():
        headers.setRawHeaders(name, values)


def _addHookHeaders(request: ClientRequest, answer: HookResponse) -> None:
    """
    Add a hook's response headers to C{request}'s.
    """
    headers = request.responseHeaders
    for name in {name for name, _ in answer.headers}:
        # The hook's own Date or Server replaces Twisted's, never doubles it.
        headers.removeHeader(name)
    for name, value in answer.headers:
        headers.addRawHeader(name, value)


class _Discard(Protocol):
    """
    Reads and drops a body nobody wants, so its connection can go back to
    the pool or close.
    """

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.stopProducing()  # type: ignore[attr-defined]
