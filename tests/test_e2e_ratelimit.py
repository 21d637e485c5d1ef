"""
The C{ratelimit} hook on Redis under load and through an outage, end to
end: a real C{twistd monedge} with the hook on a real C{redis-server}, real
clients (C{h2load}, treq), and monedge's own log.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet import reactor, task, threads
from twisted.logger import Logger

from monedge.hooks import availableFactories
from monedge.testing import ProxyProcess, RecordingUpstream
from tests.e2e import ProxyTestCase
from tests.redis_server import SKIP_REASON, RedisServer

H2LOAD = shutil.which("h2load")

_log = Logger()

_STATUS = re.compile(rb"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_FIELD = re.compile(rb'"default";r=(\d+);t=(\d+)\Z')

#: monedge's log line as a Redis outage starts, and as it ends.
OUTAGE_STARTED = "ratelimit: Redis at {address} is unavailable"
OUTAGE_ENDED = "ratelimit: Redis at {address} answers again"


class RedisRateLimitTestCase(ProxyTestCase):
    """
    A redis-server, an upstream, and a proxy whose service C{limited}
    runs the ratelimit hook on that Redis.
    """

    skip = SKIP_REASON

    async def startAll(
        self, options: Mapping[str, Any]
    ) -> tuple[RedisServer, RecordingUpstream, ProxyProcess]:
        """
        Start Redis, an upstream and a proxy limiting C{/limited/} with
        C{options} (plus the Redis URL).
        """
        # Refresh the plugin cache here, not in the child as it starts.
        availableFactories()
        redis = RedisServer(os.path.join(self.directory, "redis"))
        self.addCleanup(redis.stop)
        await redis.start()
        upstream = self.startUpstream()
        hook = {"name": "ratelimit", "options": {**options, "redis": redis.url}}
        proxy = await self.startProxy(
            {
                "service.api.limited": {
                    "endpoints": [upstream.address],
                    "policy": {"hooks": [hook]},
                }
            }
        )
        return redis, upstream, proxy

    def log(self, proxy: ProxyProcess) -> str:
        """
        Everything monedge has logged so far.
        """
        with open(proxy.logPath, encoding="utf-8", errors="replace") as f:
            return f.read()

    async def waitFor(self, condition: Callable[[], bool], what: str) -> None:
        """
        Return once C{condition()} holds; fail after 15 s.
        """
        deadline = time.monotonic() + 15
        while not condition():
            if time.monotonic() > deadline:
                self.fail(f"timed out waiting for {what}")
            await task.deferLater(reactor, 0.05, lambda: None)

    async def metric(self, proxy: ProxyProcess, name: str) -> float:
        """
        The value of the metric sample C{name} (with its labels) on the
        admin /metrics page.
        """
        _, body = await self.get(proxy.adminURL + "/metrics")
        for line in body.decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        self.fail(f"{name} is not on /metrics")

    async def assertRedisCounters(
        self, proxy: ProxyProcess, errors: int, outages: int
    ) -> None:
        """
        The default policy's requests decided without Redis, and outages,
        are as given on /metrics.
        """
        counted = [
            await self.metric(
                proxy, f'monedge_ratelimit_redis_{kind}_total{{policy="default"}}'
            )
            for kind in ("errors", "outages")
        ]
        self.assertEqual(counted, [errors, outages])

    async def outcome(self, proxy: ProxyProcess) -> tuple[int, int | None]:
        """
        GET /limited/x: the status and the RateLimit field's r, if any.
        """
        response, body = await self.get(proxy.url + "/limited/x")
        values = response.headers.getRawHeaders(b"ratelimit")
        if response.code == 429:
            self.assertEqual(json.loads(body)["code"], "rate_limited")
        if not values:
            return response.code, None
        match = _FIELD.match(values[0])
        assert match is not None, values
        return response.code, int(match[1])


class BurstTests(RedisRateLimitTestCase):
    """
    A burst of concurrent requests is limited through Redis, however busy
    it keeps monedge.
    """

    if H2LOAD is None:
        skip = "h2load is not installed (scripts/system-deps.sh installs it)"

    async def test_thousandConcurrentRequests(self) -> None:
        """
        1,000 requests from one client on 1,000 concurrent connections
        (h2load --h1 -c 1000), against 5/s (burst 5) on Redis with the
        default on-redis-error open and redis-timeout 250ms: exactly the
        requests the limit allows reach the upstream, at least the burst of
        5 and at most 5 more for every second the run took (what GCRA can
        refill meanwhile); the rest are refused with 429; no Redis call
        fails or times out, no outage starts, nothing is logged about
        Redis.
        """
        _, upstream, proxy = await self.startAll({"rate": "5/s", "key": "client"})
        started = time.monotonic()
        assert H2LOAD is not None
        run = await threads.deferToThread(
            subprocess.run,
            [H2LOAD, "--h1", "-n", "1000", "-c", "1000", proxy.url + "/limited/x"],
            capture_output=True,
            timeout=60,
        )
        elapsed = time.monotonic() - started
        match = _STATUS.search(run.stdout)
        assert match is not None, run.stdout + run.stderr
        ok, redirect, refused, failed = (int(n) for n in match.groups())
        self.assertEqual((ok + refused, redirect, failed), (1000, 0, 0), run.stdout)
        self.assertEqual(len(upstream.received), ok)
        most = 5 + math.floor(elapsed * 5)
        self.assertTrue(5 <= ok <= most, f"{ok} admitted in {elapsed:.3f} s")
        await self.assertRedisCounters(proxy, errors=0, outages=0)
        log = self.log(proxy)
        self.assertNotIn("ratelimit:", log)
        self.assertNotIn("Traceback", log)
        _log.info(
            "burst: {ok} of 1000 admitted in {elapsed:.3f} s (at most {most})",
            ok=ok,
            elapsed=elapsed,
            most=most,
        )


class OutageTests(RedisRateLimitTestCase):
    """
    Redis stopped and started again under a running proxy.
    """

    async def test_outageWithLocal(self) -> None:
        """
        With on-redis-error local and 4/m (burst 4): 2 requests pass
        through Redis (r 3, 2); with redis-server stopped the in-memory
        limit carries on from there: 2 more pass (r 1, 0) and the next 3
        are refused with 429; monedge logs one line as the outage starts.
        Once redis-server is back (empty), one line says so and Redis
        decides again: the next request passes with r 3 where the
        in-memory bucket would refuse it.  No traceback is logged, and the
        metrics count 5 requests decided without Redis and 1 outage.
        """
        redis, upstream, proxy = await self.startAll(
            {"rate": "4/m", "key": "client", "on-redis-error": "local"}
        )
        address = f"127.0.0.1:{redis.port}/0"
        started = OUTAGE_STARTED.format(address=address)
        ended = OUTAGE_ENDED.format(address=address)
        before = [await self.outcome(proxy) for _ in range(2)]
        self.assertEqual(before, [(200, 3), (200, 2)])
        await redis.stop()
        during = [await self.outcome(proxy) for _ in range(5)]
        self.assertEqual(during, [(200, 1), (200, 0), (429, 0), (429, 0), (429, 0)])
        self.assertEqual(len(upstream.received), 4)
        await self.waitFor(lambda: started in self.log(proxy), "the outage's line")
        await redis.start()
        await self.waitFor(lambda: ended in self.log(proxy), "the recovery's line")
        self.assertEqual(await self.outcome(proxy), (200, 3))
        log = self.log(proxy)
        self.assertEqual((log.count(started), log.count(ended)), (1, 1))
        self.assertEqual(log.count("ratelimit:"), 2)
        self.assertIn("5 requests were decided without it", log)
        self.assertNotIn("Traceback", log)
        await self.assertRedisCounters(proxy, errors=5, outages=1)
