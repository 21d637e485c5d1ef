"""
End-to-end lifecycle: registry reloads under load, SIGTERM drain, and the
admin endpoints.
"""

from __future__ import annotations

import json
import signal
import socket
import time

from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET, Request

from monedge.testing import Received
from tests.e2e import ProxyTestCase, deferRaw


def _later(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


class ReloadTests(ProxyTestCase):
    """
    The static registry reloads without failing a request.
    """

    async def test_reloadUnderLoad(self) -> None:
        """
        While ten clients send requests back to back, the registry file is
        rewritten to move the service from one upstream to another and
        back: every request succeeds, and after the move traffic reaches
        the new upstream.
        """
        first = self.startUpstream()
        second = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [first.address]}}
        )
        failures: list[str] = []
        sent = [0]
        running = [True]

        async def client() -> None:
            while running[0]:
                response, body = await self.get(proxy.url + "/svc/x")
                sent[0] += 1
                if response.code != 200:
                    failures.append(f"{response.code} {body[:200]!r}")

        clients = [Deferred.fromCoroutine(client()) for _ in range(10)]
        layouts = [
            [first.address, second.address],
            [second.address],
            [first.address, second.address],
            [first.address],
        ]
        for endpoints in layouts:
            await _later(0.6)
            self.writeServices({"service.api.svc": {"endpoints": endpoints}})
        await _later(1.5)
        beforeSecond = len(second.received)
        self.writeServices({"service.api.svc": {"endpoints": [second.address]}})
        await _later(1.5)
        running[0] = False
        await defer.gatherResults(clients)
        self.assertEqual(failures, [])
        self.assertGreater(sent[0], 100)
        self.assertGreater(len(second.received), beforeSecond)
        routes = json.loads((await self.get(proxy.adminURL + "/routes"))[1])
        [service] = routes["services"]
        self.assertEqual([e["address"] for e in service["endpoints"]], [second.address])
        self.assertEqual(routes["registry"]["reloads"]["failed"], 0)

    async def test_invalidReloadKeepsTable(self) -> None:
        """
        An invalid file on reload keeps the last good table, and the bad
        reload shows in /metrics.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream.address]}}
        )
        with open(self.registryPath, "w") as f:
            f.write("services: {service.api.svc: {endpoints: [nonsense]}}\n")
        proxy.signal(signal.SIGHUP)

        async def metricsText() -> str:
            return (await self.get(proxy.adminURL + "/metrics"))[1].decode()

        deadline = time.monotonic() + 5
        while 'monedge_registry_reloads_total{result="failed"} 1.0' not in (
            await metricsText()
        ):
            self.assertLess(time.monotonic(), deadline, await metricsText())
            await _later(0.1)
        response, _ = await self.get(proxy.url + "/svc/")
        self.assertEqual(response.code, 200)
        self.assertIn("endpoints[0]", proxy.log())


class DrainTests(ProxyTestCase):
    """
    SIGTERM drains: not ready at once, serving on, no request dropped.
    """

    async def test_sigtermDrainsInFlightRequests(self) -> None:
        """
        After SIGTERM, /readyz is 503 at once; requests keep being served
        for the drain delay; requests in flight when the listener closes
        still complete; then the process exits cleanly.
        """
        held: list[Request] = []

        def slow(request: Request, seen: Received) -> int:
            held.append(request)
            return NOT_DONE_YET

        upstream = self.startUpstream(slow)
        fast = self.startUpstream()
        proxy = await self.startProxy(
            {
                "service.api.slow": {"endpoints": [upstream.address]},
                "service.api.fast": {"endpoints": [fast.address]},
            },
            ["--drain-delay", "1s", "--drain-timeout", "20s"],
        )
        ready, _ = await self.get(proxy.adminURL + "/readyz")
        self.assertEqual(ready.code, 200)
        inflight = [
            Deferred.fromCoroutine(self.get(proxy.url + "/slow/")) for _ in range(5)
        ]
        await proxy.waitFor(lambda: len(held) == 5, 5, "five held requests")
        proxy.signal(signal.SIGTERM)
        await _later(0.2)
        ready, body = await self.get(proxy.adminURL + "/readyz")
        self.assertEqual(ready.code, 503, body)
        # A keep-alive request during the drain delay is served, and its
        # response closes the connection.
        during = await deferRaw(proxy.port, b"GET /fast/ HTTP/1.1\r\nHost: a\r\n\r\n")
        head = during.partition(b"\r\n\r\n")[0]
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), during)
        self.assertIn(b"\r\nConnection: close", head)
        await _later(1.5)
        self.assertFalse(proxy.exited())
        # Past the drain delay the listener is closed.
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
        for request in held:
            request.write(b"done")
            request.finish()
        results = await defer.gatherResults(inflight)
        self.assertEqual([(r.code, b) for r, b in results], [(200, b"done")] * 5)
        await proxy.waitFor(proxy.exited, 10, "monedge to exit")
        assert proxy.process is not None
        # twistd re-raises the signal that stopped it, so the exit status
        # says "terminated by SIGTERM", as it should; the log says how.
        self.assertEqual(proxy.process.returncode, -signal.SIGTERM)
        self.assertIn("drained: no request in flight", proxy.log())
