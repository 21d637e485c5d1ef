"""
Tests for L{monedge.testing.loadbalancer}, the test load balancer the
rolling-restart scenario puts in front of monedge.
"""

from __future__ import annotations

import json

import treq
from twisted.internet import reactor
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource
from zope.interface.verify import verifyObject

from monedge.testing import RecordingUpstream, freePort
from monedge.testing.loadbalancer import Backend, LoadBalancer, endToEnd


def _backend(name: str) -> Backend:
    return Backend(name, f"http://{name}", f"http://{name}/readyz")


class HealthTests(SynchronousTestCase):
    """
    Health thresholds and the choice of backend.
    """

    def test_thresholds(self) -> None:
        """
        A backend starts unhealthy, is healthy after C{healthyThreshold}
        passes in a row and unhealthy after C{unhealthyThreshold} failures
        in a row; a pass or a failure breaks the other's streak.
        """
        backend = _backend("a")
        became = backend.whenHealthy()
        self.assertFalse(backend.healthy)
        self.assertFalse(backend.observe(True, 2, 2))
        self.assertFalse(backend.observe(False, 2, 2))
        self.assertFalse(backend.observe(True, 2, 2))
        self.assertNoResult(became)
        self.assertTrue(backend.observe(True, 2, 2))
        self.assertTrue(backend.healthy)
        self.successResultOf(became)
        lost = backend.whenHealthy(False)
        self.assertFalse(backend.observe(False, 2, 2))
        self.assertFalse(backend.observe(True, 2, 2))
        self.assertFalse(backend.observe(False, 2, 2))
        self.assertNoResult(lost)
        self.assertTrue(backend.observe(False, 2, 2))
        self.assertFalse(backend.healthy)
        self.successResultOf(lost)
        self.successResultOf(backend.whenHealthy(False))

    def test_roundRobinOverHealthy(self) -> None:
        """
        L{LoadBalancer.pick} takes the healthy backends in turn and skips
        the others; with none healthy it gives L{None}.
        """
        backends = [_backend(name) for name in "abc"]
        balancer = LoadBalancer(backends, MemoryReactorClock(), healthyThreshold=1)
        self.assertIsNone(balancer.pick())
        for backend in backends[0], backends[2]:
            backend.observe(True, 1, 1)
        picked = [balancer.pick() for _ in range(4)]
        self.assertEqual([b.name for b in picked if b], ["a", "c", "a", "c"])
        for backend in backends:
            backend.observe(False, 1, 1)
        self.assertIsNone(balancer.pick())
        verifyObject(IResource, balancer.resource)

    def test_hopByHopDropped(self) -> None:
        """
        L{endToEnd} drops the hop-by-hop headers and those C{Connection}
        names, and keeps the rest.
        """
        headers = Headers(
            {
                b"Connection": [b"close, X-Hop"],
                b"X-Hop": [b"1"],
                b"Keep-Alive": [b"timeout=5"],
                b"Transfer-Encoding": [b"chunked"],
                b"X-Kept": [b"2"],
                b"Host": [b"example"],
            }
        )
        kept = dict(endToEnd(headers).getAllRawHeaders())
        self.assertEqual(kept, {b"X-Kept": [b"2"], b"Host": [b"example"]})


class TrafficTests(TestCase):
    """
    The load balancer on the real reactor, in front of real upstreams.
    """

    def setUp(self) -> None:
        self.upstream = RecordingUpstream()
        self.upstream.start(reactor)
        self.addCleanup(self.upstream.stop)
        pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=pool))

    def startBalancer(self, backend: Backend) -> LoadBalancer:
        balancer = LoadBalancer([backend], reactor, interval=0.05)
        balancer.start()
        self.addCleanup(balancer.stop)
        return balancer

    async def test_forwardsWhileHealthy(self) -> None:
        """
        A healthy backend gets the request, path and headers included (the
        hop-by-hop ones excepted); once its health check fails, requests
        are answered 502 and counted.
        """
        url = f"http://{self.upstream.address}"
        backend = Backend("up", url, url + "/readyz")
        balancer = self.startBalancer(backend)
        await backend.whenHealthy().addTimeout(10, reactor)
        response = await self.http.get(
            balancer.url + "/some/path?q=1", headers=Headers({b"X-Mine": [b"yes"]})
        )
        self.assertEqual(response.code, 200)
        self.assertEqual(json.loads(await response.content())["uri"], "/some/path?q=1")
        [seen] = [r for r in self.upstream.received if r.uri != b"/readyz"]
        self.assertEqual(seen.header(b"x-mine"), [b"yes"])
        self.assertEqual(seen.header(b"connection"), [])
        self.assertEqual((backend.forwarded, balancer.errors), (1, 0))
        await self.upstream.stop()
        await backend.whenHealthy(False).addTimeout(10, reactor)
        response = await self.http.get(balancer.url + "/after")
        self.assertEqual(response.code, 502)
        self.assertIn(b"no healthy backend", await response.content())
        self.assertEqual(balancer.errors, 1)

    async def test_backendConnectionFails(self) -> None:
        """
        A request whose backend refuses the connection is answered 502 and
        counted, not retried.
        """
        health = f"http://{self.upstream.address}/readyz"
        backend = Backend("dead", f"http://127.0.0.1:{freePort()}", health)
        balancer = self.startBalancer(backend)
        await backend.whenHealthy().addTimeout(10, reactor)
        response = await self.http.get(balancer.url + "/x")
        self.assertEqual(response.code, 502)
        self.assertIn(b"ConnectionRefused", await response.content())
        self.assertEqual((backend.forwarded, balancer.errors), (0, 1))
