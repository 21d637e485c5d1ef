"""
The upstream HTTP client: an L{Agent} on one persistent
L{HTTPConnectionPool}, with endpoints that skip name resolution for IP
literals, and the upstream's C{Connection} header kept so that the headers
it names can be stripped.

This is deliberately not treq and not L{twisted.web.proxy}: no cookies, no
redirects, no decoding, no buffering.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    _HTTP11ClientFactory,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from monedge.interfaces import IUpstreamClient

#: Upstream keep-alive idle: below the keep-alive of common upstream
#: servers (Node.js 5 s, nginx 75 s, Go 90 s), so monedge, not the
#: upstream, closes an idle pooled connection and never races its close.
DEFAULT_POOL_IDLE = 4.0
DEFAULT_MAX_PER_HOST = 256
#: Endpoint objects kept for reuse (more are rebuilt, not leaked).
MAX_ENDPOINTS = 4096


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


@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """
    Endpoints for upstream URIs: IP literals connect directly, names go
    through L{HostnameEndpoint}; C{https} wraps TLS.
    """

    def __init__(self, reactor: Any, connectTimeout: float) -> None:
        self._reactor = reactor
        self._timeout = connectTimeout
        self._endpoints: dict[tuple[bytes, bytes, int], IStreamClientEndpoint] = {}

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        # Agent asks for an endpoint on every request, even when a pooled
        # connection will serve it: build each one once.
        key = (uri.scheme, uri.host, uri.port)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= MAX_ENDPOINTS:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = self._newEndpoint(uri)
        return endpoint

    def _newEndpoint(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii")
        endpoint: IStreamClientEndpoint
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            endpoint = HostnameEndpoint(
                self._reactor, uri.host, uri.port, timeout=self._timeout
            )
        else:
            if address.version == 4:
                endpoint = TCP4ClientEndpoint(
                    self._reactor, host, uri.port, timeout=self._timeout
                )
            else:
                endpoint = TCP6ClientEndpoint(
                    self._reactor, host, uri.port, timeout=self._timeout
                )
        if uri.scheme == b"https":
            endpoint = wrapClientTLS(optionsForClientTLS(host), endpoint)
        return endpoint


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
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = maxPerHost
        self.pool.cachedConnectionTimeout = poolIdle  # type: ignore[assignment]
        self.pool._factory = _ClientFactory
        self._agents: dict[float, Agent] = {}

    def _agent(self, connectTimeout: float) -> Agent:
        agent = self._agents.get(connectTimeout)
        if agent is None:
            agent = self._agents[connectTimeout] = Agent.usingEndpointFactory(
                self._reactor,
                _EndpointFactory(self._reactor, connectTimeout),
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
    ) -> Deferred[IResponse]:
        """
        Send one request; the result fires with the response once its
        headers arrive.  Cancelling it aborts the upstream connection.
        """
        return self._agent(connectTimeout).request(method, url, headers, body)

    def close(self) -> Deferred[None]:
        """
        Close every pooled connection.
        """
        d: Deferred[None] = self.pool.closeCachedConnections()
        return d
