"""
The upstream client the exchange uses: it sends each request with the
client for its service's protocol (the policy key C{protocol}): HTTP/1.1
(L{monedge.upstream.client.FastUpstreamClient}), or HTTP/2
(L{monedge.upstream.h2client.H2UpstreamClient}) for C{h2c}, cleartext with
prior knowledge, and C{h2}, over TLS with ALPN C{h2} under the service's
upstream TLS settings.

C{h2} always means TLS and C{h2c} never does, whatever the endpoint's
scheme: the URL's scheme is set to match (its port is kept).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from monedge.interfaces import IUpstreamClient, IUpstreamUpgrader
from monedge.upstream.endpoints import UpstreamTLS

__all__ = ["ProtocolDispatch"]


@implementer(IUpstreamClient, IUpstreamUpgrader)
class ProtocolDispatch:
    """
    Sends each request with C{http1} or C{http2}, by the C{protocol} it is
    given; WebSocket handshakes always go over HTTP/1.1.
    """

    def __init__(self, http1: Any, http2: Any) -> None:
        self.http1 = http1
        self.http2 = http2

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        connectTimeout: float,
        tls: UpstreamTLS | None = None,
        protocol: str = "http1",
    ) -> Deferred[IResponse]:
        if protocol == "http1":
            result: Deferred[IResponse] = self.http1.request(
                method, url, headers, body, connectTimeout, tls
            )
            return result
        if protocol == "h2":
            if url.startswith(b"http://"):
                url = b"https://" + url[7:]
        elif url.startswith(b"https://"):
            url = b"http://" + url[8:]
        result = self.http2.request(method, url, headers, body, connectTimeout, tls)
        return result

    def upgrade(
        self,
        url: bytes,
        headers: Headers,
        connectTimeout: float,
        tls: UpstreamTLS | None = None,
    ) -> Deferred[IResponse]:
        result: Deferred[IResponse] = self.http1.upgrade(
            url, headers, connectTimeout, tls
        )
        return result

    def close(self) -> Deferred[Any]:
        return DeferredList([self.http1.close(), self.http2.close()])
