"""
slowhttptest (Debian's) against a real C{twistd monedge}: slowloris and slow
body, each cut within its deadline while normal requests keep succeeding.
(Its slow-read mode is not cut yet: see docs/protocols.md; a client that
stops reading is, in tests/test_e2e_limits.py.)
"""

from __future__ import annotations

import re
import shutil
import subprocess

from twisted.internet import threads
from twisted.internet.defer import Deferred

from monedge.testing import ProxyProcess
from tests.e2e import ProxyTestCase

#: Every deadline is set to this many seconds for the attacks.
DEADLINE = 2

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class SlowHTTPTests(ProxyTestCase):
    """
    Slow clients hold no connection past monedge's deadlines.
    """

    timeout = 180

    async def startTarget(self) -> ProxyProcess:
        if shutil.which("slowhttptest") is None:
            self.fail("slowhttptest is missing: scripts/system-deps.sh installs it")
        small = self.startUpstream()
        return await self.startProxy(
            {"service.api.svc": {"endpoints": [small.address]}},
            [
                "--header-timeout",
                f"{DEADLINE}s",
                "--body-timeout",
                f"{DEADLINE}s",
                "--send-timeout",
                f"{DEADLINE}s",
                "--access-log",
                "none",
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
