"""
The upstream HTTP client: an L{Agent} on one persistent
L{HTTPConnectionPool}, with endpoints that skip name resolution for IP
literals, and the upstream's C{Connection} header kept so that the headers
it names can be stripped.

This is deliberately not treq and not L{twisted.web.proxy}: no cookies, no
redirects, no decoding, no buffering.

Twisted's pool sends a request again on a new connection when its pooled
one was found closed, but only for C{GET}, C{HEAD}, C{OPTIONS}, C{DELETE}
and C{TRACE} without a body.  monedge's rule (L{monedge.replay}) also
allows C{PUT} and a body it holds in full, and both clients keep it: the
pool here wraps cached connections in L{_Replaying} instead.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol, Request
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
    _RetryingHTTP11ClientProtocol,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from monedge.endpoints import EndpointCache, UpstreamTLS, UpstreamTLSError
from monedge.interfaces import IUpstreamClient
from monedge.replay import BufferedBody, mayReplay

#: Upstream keep-alive idle: below the keep-alive of common upstream
#: servers (Node.js 5 s, nginx 75 s, Go 90 s), so monedge, not the
#: upstream, closes an idle pooled connection and never races its close.
DEFAULT_POOL_IDLE = 4.0
DEFAULT_MAX_PER_HOST = 256


class _ConnectionHeaderProtocol(HTTP11ClientProtocol):
    """
    Records the response's C{Connection} header, which Twisted's parser
    keeps out of C{response.headers}, on the response as
    C{monedgeConnection}.
    """

    def request(self, request: Any) -> Deferred[IResponse]:
        d = super().request(request)
        parser = self._parser

        def attach(response: IResponse) -> IResponse:
            if parser is not None:
                response.monedgeConnection = (  # type: ignore[attr-defined]
                    parser.connHeaders.getRawHeaders(b"connection")
                )
            return response

        return d.addCallback(attach)


class _ClientFactory(_HTTP11ClientFactory):
    noisy = False

    def buildProtocol(self, addr: Any) -> HTTP11ClientProtocol:
        return _ConnectionHeaderProtocol(self._quiescentCallback)


class _Replaying(_RetryingHTTP11ClientProtocol):
    """
    A cached connection that sends its request again, once, on a new
    connection if it fails before any of the response and
    L{monedge.replay.mayReplay} allows it; a L{BufferedBody} is sent again
    from its first byte.
    """

    def request(self, request: Request) -> Deferred[IResponse]:
        d: Deferred[IResponse] = self._clientProtocol.request(request)

        def failed(reason: Failure) -> Any:
            body = request.bodyProducer
            # Twisted's _shouldRetry judges the failure (nothing of the
            # response came, and it was not cancelled); method and body are
            # mayReplay's to judge, so it is asked about a bodiless GET.
            if not (
                mayReplay(request.method, body)
                and self._shouldRetry(b"GET", reason.value, None)
            ):
                return reason
            if isinstance(body, BufferedBody):
                request.bodyProducer = body.again()
            new: Callable[[], Deferred[HTTP11ClientProtocol]] = self._newConnection
            return new().addCallback(lambda connection: connection.request(request))

        return d.addErrback(failed)


class _Pool(HTTPConnectionPool):
    """
    Twisted's pool, with cached connections wrapped in L{_Replaying}.
    """

    retryAutomatically = False
    _factory = _ClientFactory

    def getConnection(
        self, key: Hashable, endpoint: IStreamClientEndpoint
    ) -> Deferred[HTTP11ClientProtocol]:
        cached = any(c.state == "QUIESCENT" for c in self._connections.get(key, ()))
        d = super().getConnection(key, endpoint)
        if not cached:
            return d

        def wrap(connection: HTTP11ClientProtocol) -> Any:
            return _Replaying(connection, lambda: self._newConnection(key, endpoint))

        return d.addCallback(wrap)


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """
    Endpoints for upstream URIs, from a shared L{EndpointCache}: Agent asks
    for one on every request, even when a pooled connection will serve it.
    """

    def __init__(
        self, cache: EndpointCache, connectTimeout: float, tls: UpstreamTLS | None
    ) -> None:
        self._cache = cache
        self._timeout = connectTimeout
        self._tls = tls

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self._cache.get(uri.scheme, uri.host, uri.port, self._timeout, self._tls)


@implementer(IUpstreamClient)
class UpstreamClient:
    """
    Sends requests upstream over one shared, persistent connection pool.

    @param reactor: the reactor connections are made with.
    @param maxPerHost: idle connections kept per endpoint.
    @param poolIdle: seconds an idle pooled connection is kept.
    """

    def __init__(
        self,
        reactor: Any,
        maxPerHost: int = DEFAULT_MAX_PER_HOST,
        poolIdle: float = DEFAULT_POOL_IDLE,
    ) -> None:
        self._reactor = reactor
        self.pool = _Pool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = maxPerHost
        self.pool.cachedConnectionTimeout = poolIdle  # type: ignore[assignment]
        self._agents: dict[tuple[float, UpstreamTLS | None], Agent] = {}
        self._endpoints = EndpointCache(reactor)

    def _agent(self, connectTimeout: float, tls: UpstreamTLS | None) -> Agent:
        key = (connectTimeout, tls)
        agent = self._agents.get(key)
        if agent is None:
            agent = self._agents[key] = Agent.usingEndpointFactory(
                self._reactor,
                _EndpointFactory(self._endpoints, connectTimeout, tls),
                pool=self.pool,
            )
        return agent

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        connectTimeout: float,
        tls: UpstreamTLS | None = None,
    ) -> Deferred[IResponse]:
        """
        Send one request; the result fires with the response once its
        headers arrive.  Cancelling it aborts the upstream connection.
        Connections are pooled by address: two services with different
        TLS settings for one address would share them.
        """
        try:
            agent = self._agent(connectTimeout, tls)
            return agent.request(method, url, headers, body)
        except UpstreamTLSError as e:
            return fail(e)

    def close(self) -> Deferred[None]:
        """
        Close every pooled connection.
        """
        d: Deferred[None] = self.pool.closeCachedConnections()
        return d
