"""
End-to-end C{--workers N}: a real supervisor and its real worker processes
sharing one listening socket on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET, Request

from monedge.testing import ProxyProcess, Received
from tests.e2e import ProxyTestCase


def _later(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def _running(pid: int) -> bool:
    """
    Whether C{pid} is a live process (not a zombie).
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rpartition(")")[2].split()[1])


def _sample(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


class WorkersTests(ProxyTestCase):
    """
    A supervisor runs N proxy processes on its listeners, answers for the
    group on the admin port, restarts the ones that die and drains them all.
    """

    async def startGroup(self, upstream: str, *args: str) -> ProxyProcess:
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream]}}, ["--workers", "2", *args]
        )
        await self.waitReady(proxy)
        return proxy

    async def waitReady(self, proxy: ProxyProcess) -> None:
        for _ in range(200):
            response, _ = await self.get(proxy.adminURL + "/readyz")
            if response.code == 200:
                return
            await _later(0.05)
        self.fail("the group never became ready")

    async def workers(self, proxy: ProxyProcess) -> list[dict[str, object]]:
        _, body = await self.get(proxy.adminURL + "/routes")
        workers: list[dict[str, object]] = json.loads(body)["workers"]
        return workers

    async def test_groupServesAndCountsEveryRequest(self) -> None:
        """
        With --workers 2, forty requests on fresh connections all succeed;
        the group's /metrics counts each exactly once; /routes lists two
        running workers, each a child of the supervisor.
        """
        upstream = self.startUpstream()
        proxy = await self.startGroup(upstream.address)
        results = await defer.gatherResults(
            [Deferred.fromCoroutine(self.get(proxy.url + "/svc/x")) for _ in range(40)]
        )
        self.assertEqual([r.code for r, _ in results], [200] * 40)
        _, metrics = await self.get(proxy.adminURL + "/metrics")
        text = metrics.decode("utf-8")
        self.assertEqual(
            _sample(
                text,
                "monedge_requests_total",
                service="service.api.svc",
                code_class="2xx",
                origin="upstream",
            ),
            40.0,
        )
        self.assertEqual(_sample(text, "monedge_workers_alive"), 2.0)
        workers = await self.workers(proxy)
        pids = [worker["pid"] for worker in workers]
        self.assertEqual([worker["alive"] for worker in workers], [True, True])
        self.assertEqual(len(set(pids)), 2)
        assert proxy.process is not None
        for pid in pids:
            assert isinstance(pid, int)
            self.assertEqual(_parent(pid), proxy.process.pid)

    async def test_crashedWorkerIsRestarted(self) -> None:
        """
        A worker killed with SIGKILL is restarted with a new pid and counted
        in monedge_worker_restarts_total; requests sent meanwhile all
        succeed, because the listening socket never closes.
        """
        upstream = self.startUpstream()
        proxy = await self.startGroup(upstream.address)
        before = await self.workers(proxy)
        victim = before[0]["pid"]
        assert isinstance(victim, int)
        os.kill(victim, signal.SIGKILL)
        await proxy.waitFor(lambda: not _running(victim), 5, "the worker to die")
        codes = []
        for _ in range(20):
            response, _ = await self.get(proxy.url + "/svc/x")
            codes.append(response.code)
        self.assertEqual(codes, [200] * 20)
        for _ in range(200):
            after = await self.workers(proxy)
            if after[0]["alive"]:
                break
            await _later(0.05)
        self.assertTrue(after[0]["alive"], after)
        self.assertNotEqual(after[0]["pid"], victim)
        self.assertEqual(after[0]["restarts"], 1)
        self.assertEqual(after[0]["last_exit"], "signal 9")
        self.assertEqual(after[1]["pid"], before[1]["pid"])
        await self.waitReady(proxy)
        _, metrics = await self.get(proxy.adminURL + "/metrics")
        self.assertEqual(
            _sample(
                metrics.decode("utf-8"), "monedge_worker_restarts_total", worker="0"
            ),
            1.0,
        )

    async def test_sigtermDrainsEveryWorker(self) -> None:
        """
        SIGTERM to the supervisor turns the group's /readyz 503 at once;
        requests in flight on every worker complete; then the workers and
        the supervisor exit.
        """
        held: list[Request] = []

        def slow(request: Request, seen: Received) -> int:
            held.append(request)
            return NOT_DONE_YET

        upstream = self.startUpstream(slow)
        proxy = await self.startGroup(
            upstream.address, "--drain-delay", "1s", "--drain-timeout", "20s"
        )
        pids = [worker["pid"] for worker in await self.workers(proxy)]
        inflight = [
            Deferred.fromCoroutine(self.get(proxy.url + "/svc/")) for _ in range(8)
        ]
        await proxy.waitFor(lambda: len(held) == 8, 10, "eight held requests")
        proxy.signal(signal.SIGTERM)
        await _later(0.2)
        ready, body = await self.get(proxy.adminURL + "/readyz")
        self.assertEqual(ready.code, 503, body)
        self.assertIn(b"draining", body)
        await _later(1.5)
        self.assertFalse(proxy.exited())
        for request in held:
            request.write(b"done")
            request.finish()
        results = await defer.gatherResults(inflight)
        self.assertEqual([(r.code, b) for r, b in results], [(200, b"done")] * 8)
        await proxy.waitFor(proxy.exited, 15, "the supervisor to exit")
        for pid in pids:
            assert isinstance(pid, int)
            self.assertFalse(_running(pid), f"worker {pid} outlived the group")

    async def test_workersStopWhenTheSupervisorDies(self) -> None:
        """
        If the supervisor is killed outright, its workers notice within
        seconds and stop, so no orphan keeps the port.
        """
        upstream = self.startUpstream()
        proxy = await self.startGroup(upstream.address)
        pids = [worker["pid"] for worker in await self.workers(proxy)]
        proxy.signal(signal.SIGKILL)
        await proxy.waitFor(proxy.exited, 5, "the supervisor to die")

        def gone() -> bool:
            return not any(_running(pid) for pid in pids if isinstance(pid, int))

        deadline = 100
        while not gone() and deadline:
            await _later(0.1)
            deadline -= 1
        self.assertTrue(gone(), f"workers {pids} outlived their supervisor")

    async def test_tlsListenerShared(self) -> None:
        """
        With --workers 2 and --tls-port, the workers terminate TLS on the
        supervisor's socket: a verified TLS request through the group
        reaches the upstream as https.
        """
        from monedge.testing import freePort
        from monedge.testing.tls import CertificateAuthority

        ca = CertificateAuthority()
        tlsDir = os.path.join(self.directory, "tls")
        os.makedirs(tlsDir)
        with open(os.path.join(tlsDir, "default.pem"), "wb") as f:
            f.write(ca.issue(["api.example.com"]))
        caFile = os.path.join(self.directory, "ca.pem")
        with open(caFile, "wb") as f:
            f.write(ca.certificatePEM)
        tlsPort = freePort()
        upstream = self.startUpstream()
        await self.startGroup(
            upstream.address,
            "--tls-port",
            f"tcp:{tlsPort}:interface=127.0.0.1",
            "--tls-dir",
            tlsDir,
        )
        result = await self.curl(
            "--cacert",
            caFile,
            "--resolve",
            f"api.example.com:{tlsPort}:127.0.0.1",
            "--write-out",
            "\n%{http_code}",
            f"https://api.example.com:{tlsPort}/svc/x",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.endswith(b"\n200"), result.stdout)
        [seen] = upstream.received
        self.assertEqual(seen.header(b"x-forwarded-proto"), [b"https"])
