"""
Tests for L{monedge.upstream.dispatch}: the client that sends each request
over the protocol of its service.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from monedge.interfaces import IUpstreamClient, IUpstreamUpgrader
from monedge.testing import FakeUpstreamClient
from monedge.upstream.dispatch import ProtocolDispatch


class ProtocolDispatchTests(SynchronousTestCase):
    """
    L{ProtocolDispatch} over two recording clients.
    """

    def setUp(self) -> None:
        self.http1 = FakeUpstreamClient()
        self.http2 = FakeUpstreamClient()
        self.client = ProtocolDispatch(self.http1, self.http2)

    def send(self, url: bytes, **kwargs: str) -> None:
        self.client.request(b"GET", url, Headers(), None, 5.0, None, **kwargs)

    def test_interfaces(self) -> None:
        """
        It provides L{IUpstreamClient} and L{IUpstreamUpgrader}.
        """
        self.assertTrue(verifyObject(IUpstreamClient, self.client))
        self.assertTrue(verifyObject(IUpstreamUpgrader, self.client))

    def test_http1ByDefault(self) -> None:
        """
        Without a protocol, or with C{http1}, a request goes to the
        HTTP/1.1 client unchanged.
        """
        self.send(b"https://10.0.0.1:443/x")
        self.send(b"http://10.0.0.1:80/y", protocol="http1")
        self.assertEqual(
            [call.url for call in self.http1.calls],
            [b"https://10.0.0.1:443/x", b"http://10.0.0.1:80/y"],
        )
        self.assertEqual(self.http2.calls, [])

    def test_http2Schemes(self) -> None:
        """
        C{h2c} and C{h2} go to the HTTP/2 client: C{h2} always over TLS,
        C{h2c} never, the port kept.
        """
        self.send(b"http://10.0.0.1:8080/a", protocol="h2c")
        self.send(b"https://10.0.0.1:8443/b", protocol="h2c")
        self.send(b"http://10.0.0.1:8080/c", protocol="h2")
        self.send(b"https://10.0.0.1:8443/d", protocol="h2")
        self.assertEqual(
            [call.url for call in self.http2.calls],
            [
                b"http://10.0.0.1:8080/a",
                b"http://10.0.0.1:8443/b",
                b"https://10.0.0.1:8080/c",
                b"https://10.0.0.1:8443/d",
            ],
        )
        self.assertEqual(self.http1.calls, [])

    def test_closeBoth(self) -> None:
        """
        Closing it closes both clients.
        """
        self.successResultOf(self.client.close())
        self.assertTrue(self.http1.closed)
        self.assertTrue(self.http2.closed)
