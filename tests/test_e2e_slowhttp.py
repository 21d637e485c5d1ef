"""
slowhttptest (Debian's) against a real C{twistd monedge}: slowloris, slow
body and slow read, each cut within its deadline while normal requests keep
succeeding.
"""

from __future__ import annotations

import re
import shutil
import subprocess

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET, Request

from monedge.testing import ProxyProcess, Received
from tests.e2e import ProxyTestCase

#: Every deadline is set to this many seconds for the attacks.
DEADLINE = 2

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _big(request: Request, seen: Received) -> int:
    """
    A 64 MiB response (more than the kernel buffers hold), written as fast
    as the proxy takes it.
    """
    from tests.test_e2e_streaming import _PatternProducer

    request.setHeader(b"content-length", b"%d" % (64 << 20))
    request.registerProducer(_PatternProducer(request, 64 << 20), False)
    return NOT_DONE_YET


class SlowHTTPTests(ProxyTestCase):
    """
    Slow clients hold no connection past monedge's deadlines.
    """

    timeout = 180

    async def startTarget(self) -> ProxyProcess:
        if shutil.which("slowhttptest") is None:
            self.fail("slowhttptest is missing: scripts/system-deps.sh installs it")
        big = self.startUpstream(_big)
        small = self.startUpstream()
        return await self.startProxy(
            {
                "service.api.big": {"endpoints": [big.address]},
                "service.api.svc": {"endpoints": [small.address]},
            },
            [
                "--header-timeout",
                f"{DEADLINE}s",
                "--body-timeout",
                f"{DEADLINE}s",
                "--send-timeout",
                f"{DEADLINE}s",
            ],
        )

    async def attack(self, proxy: ProxyProcess, *args: str) -> tuple[str, list[int]]:
        """
        Run slowhttptest with C{args} against the proxy for at most 15 s,
        sending normal requests meanwhile; its final report and their
        statuses.
        """
        running = threads.deferToThread(
            subprocess.run,
            ["slowhttptest", *args, "-l", "15", "-p", "3"],
            capture_output=True,
            timeout=60,
        )
        codes = []
        for _ in range(8):
            response, _ = await self.get(proxy.url + "/svc/x")
            codes.append(response.code)
            await self._sleep(0.25)
        result = await running
        report = _ANSI.sub("", result.stdout.decode("utf-8", "replace"))
        return report, codes

    def _sleep(self, seconds: float) -> Deferred[None]:
        from twisted.internet import reactor, task

        return task.deferLater(reactor, seconds, lambda: None)

    def assertCut(self, report: str, within: float) -> None:
        ended = re.findall(r"Test ended on (\d+)th second", report)
        self.assertTrue(ended, report[-2000:])
        self.assertIn("Exit status: No open connections left", report, report[-2000:])
        self.assertLessEqual(int(ended[-1]), within, report[-2000:])

    async def test_slowloris(self) -> None:
        """
        50 connections sending a header line a second never finish their
        headers: all are cut at the header deadline.
        """
        proxy = await self.startTarget()
        report, codes = await self.attack(
            proxy, "-H", "-c", "50", "-r", "50", "-i", "1", "-u", proxy.url + "/svc/x"
        )
        self.assertEqual(codes, [200] * 8)
        self.assertCut(report, DEADLINE + 3)

    async def test_slowBody(self) -> None:
        """
        50 connections sending a body chunk every 3 s (longer than the body
        deadline) are all cut.
        """
        proxy = await self.startTarget()
        report, codes = await self.attack(
            proxy,
            "-B",
            "-c",
            "50",
            "-r",
            "50",
            "-i",
            "3",
            "-s",
            "8192",
            "-u",
            proxy.url + "/svc/x",
        )
        self.assertEqual(codes, [200] * 8)
        self.assertCut(report, DEADLINE + 3)

    async def test_slowRead(self) -> None:
        """
        20 connections asking for 64 MiB and reading 32 bytes every 3 s
        through a tiny window are each dropped at the send deadline (the
        access log says client_send_timeout, about 2 s after the request),
        while normal requests succeed. (slowhttptest itself cannot see the
        close: what monedge had sent before it sits in the client's receive
        buffer, read 32 bytes at a time.)
        """
        proxy = await self.startTarget()
        _, codes = await self.attack(
            proxy,
            "-X",
            "-c",
            "20",
            "-r",
            "20",
            "-n",
            "3",
            "-z",
            "32",
            "-w",
            "512",
            "-y",
            "1024",
            "-u",
            proxy.url + "/big/",
        )
        self.assertEqual(codes, [200] * 8)
        stalled = [
            record
            for record in proxy.accessLog()
            if record["path"] == "/big/" and record["error"] == "client_send_timeout"
        ]
        self.assertGreaterEqual(len(stalled), 20, proxy.accessLog()[-5:])
        for record in stalled:
            self.assertLess(record["total_latency"], DEADLINE + 3, record)
