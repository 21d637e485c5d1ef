"""
A small HTTP load balancer for tests: L{LoadBalancer}.

It stands in for the AWS Application Load Balancer in front of monedge, so
that a rolling restart of monedge can be tested end to end on 127.0.0.1:

  - every C{interval} seconds it sends C{GET} to each backend's health
    URL (monedge's admin C{/readyz}), on a new connection each time; a
    backend becomes healthy after C{healthyThreshold} consecutive 200s and
    unhealthy after C{unhealthyThreshold} consecutive failures (any other
    status, a connection error, or no answer within C{checkTimeout});
    backends start unhealthy;
  - it forwards each client request to the next healthy backend, round
    robin, over a pool of keep-alive connections, and streams the response
    back with its status and headers, hop-by-hop headers dropped both
    ways;
  - it never retries: when no backend is healthy, or the backend connection
    fails before a response, it answers 502 and counts it in
    L{LoadBalancer.errors}; a response body cut short cuts the client's
    connection.  A test sees every failure.

What it does not do: TLS, HTTP/2, upgrades, backpressure on response bodies
(they are buffered in memory as they come), streaming of request bodies (read
whole before forwarding), C{X-Forwarded-*} headers, and connection
draining of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    FileBodyProducer,
    HTTPConnectionPool,
    ResponseDone,
    readBody,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from monedge.twistedseam import requestDisconnected

__all__ = ["Backend", "LoadBalancer", "endToEnd"]

#: Headers that describe one connection, never forwarded (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def endToEnd(headers: Headers) -> Headers:
    """
    A copy of C{headers} without the hop-by-hop ones: those in L{HOP_BY_HOP}
    and those the C{Connection} header names.
    """
    named = {
        token.strip().lower()
        for value in headers.getRawHeaders(b"connection", [])
        for token in value.split(b",")
    }
    copied = Headers()
    for name, values in headers.getAllRawHeaders():
        lowered = name.lower()
        if lowered not in HOP_BY_HOP and lowered not in named:
            copied.setRawHeaders(name, list(values))
    return copied


@dataclass(eq=False)
class Backend:
    """
    One backend and what the load balancer knows of it.

    @ivar url: where traffic goes, C{http://host:port} (the request's path
        is appended).
    @ivar healthURL: what the health check GETs.
    @ivar healthy: whether it gets traffic.
    @ivar forwarded: responses it has answered through the load balancer.
    @ivar lastCheck: the last health check's outcome, for messages.
    """

    name: str
    url: str
    healthURL: str
    healthy: bool = False
    forwarded: int = 0
    lastCheck: str = "never checked"
    _passes: int = field(default=0, init=False, repr=False)
    _fails: int = field(default=0, init=False, repr=False)
    _checking: bool = field(default=False, init=False, repr=False)
    _waiters: list[tuple[bool, Deferred[None]]] = field(
        default_factory=list, init=False, repr=False
    )

    def observe(self, ok: bool, healthyThreshold: int, unhealthyThreshold: int) -> bool:
        """
        Count one health check's result; return whether the backend changed
        state (healthy after C{healthyThreshold} consecutive passes,
        unhealthy after C{unhealthyThreshold} consecutive failures).
        """
        if ok:
            self._passes += 1
            self._fails = 0
            changed = not self.healthy and self._passes >= healthyThreshold
        else:
            self._fails += 1
            self._passes = 0
            changed = self.healthy and self._fails >= unhealthyThreshold
        if changed:
            self.healthy = not self.healthy
            waiters, self._waiters = self._waiters, []
            for state, waiter in waiters:
                if state == self.healthy:
                    waiter.callback(None)
                else:
                    self._waiters.append((state, waiter))
        return changed

    def whenHealthy(self, healthy: bool = True) -> Deferred[None]:
        """
        Fire once the backend is healthy (or, with C{False}, unhealthy).
        """
        if self.healthy == healthy:
            return defer.succeed(None)
        waiter: Deferred[None] = Deferred()
        self._waiters.append((healthy, waiter))
        return waiter


class _QuietSite(Site):
    """
    The balancer's site, whose requests are not logged (Twisted's site
    would write a line for each to the global log).
    """

    def log(self, request: object) -> None:
        pass


class _Relay(Protocol):
    """
    Writes a backend's response body to the client's request as it comes.
    """

    def __init__(self, request: Request, done: Deferred[None]) -> None:
        self._request = request
        self._done = done

    def dataReceived(self, data: bytes) -> None:
        if not self._request.finished and not requestDisconnected(self._request):
            self._request.write(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self._done.callback(None)
        else:
            self._done.errback(reason)


class _Front(Resource):
    """
    The load balancer's whole site: every request is forwarded.
    """

    isLeaf = True

    def __init__(self, balancer: LoadBalancer) -> None:
        super().__init__()
        self._balancer = balancer

    def render(self, request: Request) -> int:
        forwarding = Deferred.fromCoroutine(self._balancer.forward(request))
        forwarding.addErrback(
            lambda failure: self._balancer._log.failure(
                "forwarding {uri!r} failed", failure, uri=request.uri
            )
        )
        return NOT_DONE_YET


class LoadBalancer:
    """
    An HTTP load balancer on 127.0.0.1 in front of C{backends} (see the
    module docstring).

    @param reactor: the reactor to listen, connect and time on; the global
        reactor by default.
    @param interval: seconds between health checks of a backend (a check
        still running when the next is due makes that one skip).
    @param requestTimeout: how long a forwarded request may wait for its
        response headers before it is answered 502.

    @ivar errors: requests answered 502 or cut short by the load balancer.
    @ivar errorLog: what went wrong, one line per error.
    @ivar transitions: C{(reactor time, backend name, healthy)} for each
        state change.
    """

    _log = Logger()

    def __init__(
        self,
        backends: Sequence[Backend],
        reactor: Any = None,
        interval: float = 0.1,
        healthyThreshold: int = 2,
        unhealthyThreshold: int = 1,
        checkTimeout: float = 1.0,
        requestTimeout: float = 30.0,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        if healthyThreshold < 1 or unhealthyThreshold < 1:
            raise ValueError("thresholds must be at least 1")
        self.backends = list(backends)
        self.interval = interval
        self.healthyThreshold = healthyThreshold
        self.unhealthyThreshold = unhealthyThreshold
        self.checkTimeout = checkTimeout
        self.requestTimeout = requestTimeout
        self.errors = 0
        self.errorLog: list[str] = []
        self.transitions: list[tuple[float, str, bool]] = []
        self.resource = _Front(self)
        self._reactor = reactor
        self._next = 0
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 64
        self._pool.retryAutomatically = False
        self._agent = Agent(reactor, pool=self._pool)
        self._checkAgent = Agent(reactor, pool=HTTPConnectionPool(reactor, False))
        self._probes: set[Deferred[int]] = set()
        self._checks = LoopingCall(self._checkAll)
        self._checks.clock = reactor
        self._port: IListeningPort | None = None

    # Lifecycle

    def start(self, port: int = 0) -> int:
        """
        Listen on 127.0.0.1:C{port} (any free port for 0) and start the
        health checks; return the port.
        """
        site = _QuietSite(self.resource, reactor=self._reactor)
        self._port = self._reactor.listenTCP(port, site, interface="127.0.0.1")
        self._checks.start(self.interval, now=True)
        return self.port

    def stop(self) -> Deferred[None]:
        """
        Stop the health checks and listening, and close pooled connections.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._checks.running:
            self._checks.stop()
        for probe in list(self._probes):
            probe.cancel()
        port, self._port = self._port, None
        if port is not None:
            await defer.maybeDeferred(port.stopListening)
        await self._pool.closeCachedConnections()

    @property
    def port(self) -> int:
        """
        The port listened on.
        """
        assert self._port is not None
        number: int = getattr(self._port.getHost(), "port")  # noqa: B009
        return number

    @property
    def url(self) -> str:
        """
        C{http://127.0.0.1:PORT}.
        """
        return f"http://127.0.0.1:{self.port}"

    # Health

    def _checkAll(self) -> None:
        for backend in self.backends:
            if not backend._checking:
                backend._checking = True
                Deferred.fromCoroutine(self._check(backend))

    async def _probe(self, backend: Backend) -> int:
        response = await self._checkAgent.request(b"GET", backend.healthURL.encode())
        await readBody(response)
        code: int = response.code
        return code

    async def _check(self, backend: Backend) -> None:
        probe = Deferred.fromCoroutine(self._probe(backend))
        probe.addTimeout(self.checkTimeout, self._reactor)
        self._probes.add(probe)
        try:
            code = await probe
            ok = code == 200
            outcome = str(code)
        except Exception as e:
            ok = False
            outcome = f"{type(e).__name__}: {e}"
        finally:
            self._probes.discard(probe)
            backend._checking = False
        backend.lastCheck = outcome
        if backend.observe(ok, self.healthyThreshold, self.unhealthyThreshold):
            self.transitions.append(
                (self._reactor.seconds(), backend.name, backend.healthy)
            )
            self._log.info(
                "backend {name} is {state} (check: {outcome})",
                name=backend.name,
                state="healthy" if backend.healthy else "unhealthy",
                outcome=outcome,
            )

    def pick(self) -> Backend | None:
        """
        The next healthy backend, round robin; L{None} if none is healthy.
        """
        for _ in range(len(self.backends)):
            backend = self.backends[self._next % len(self.backends)]
            self._next += 1
            if backend.healthy:
                return backend
        return None

    # Traffic

    def _fail(self, request: Request, why: str) -> None:
        self.errors += 1
        self.errorLog.append(why)
        self._log.warn("{why}", why=why)
        if not request.finished and not requestDisconnected(request):
            request.setResponseCode(502)
            request.setHeader(b"content-type", b"text/plain")
            request.write(f"load balancer: {why}\n".encode())
            request.finish()

    async def forward(self, request: Request) -> None:
        """
        Forward C{request} to a healthy backend and relay the answer.
        """
        backend = self.pick()
        if backend is None:
            self._fail(request, f"no healthy backend for {request.uri!r}")
            return
        content = request.content
        body = content.read() if content is not None else b""
        producer = FileBodyProducer(BytesIO(body)) if body else None
        pending = self._agent.request(
            request.method,
            backend.url.encode() + request.uri,
            endToEnd(request.requestHeaders),
            producer,
        )
        pending.addTimeout(self.requestTimeout, self._reactor)
        request.notifyFinish().addErrback(lambda _: pending.cancel())
        try:
            response: IResponse = await pending
        except Exception as e:
            self._fail(request, f"backend {backend.name}: {type(e).__name__}: {e}")
            return
        request.setResponseCode(response.code, response.phrase)
        for name, values in endToEnd(response.headers).getAllRawHeaders():
            request.responseHeaders.setRawHeaders(name, list(values))
        done: Deferred[None] = Deferred()
        response.deliverBody(_Relay(request, done))
        try:
            await done
        except Exception as e:
            # The status line has gone: all that is left is to cut.
            self.errors += 1
            self.errorLog.append(f"backend {backend.name} body: {e}")
            request.loseConnection()
            return
        backend.forwarded += 1
        if not request.finished and not requestDisconnected(request):
            request.finish()
