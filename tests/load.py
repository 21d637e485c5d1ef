"""
A closed-loop HTTP load generator for the reliability scenarios: L{Load}.

Each of N clients sends a GET, reads the whole response, and sends the
next, over a persistent connection pool as a real keep-alive client does,
but with automatic retries off, so that a request the server drops counts
as failed instead of being quietly sent again.  Every request is recorded
(start, latency, outcome); L{Load.figures} sums them up for the whole run
or for the window of the event under test, and L{Load.report} appends them
as one JSON line to the file named by C{$MONEDGE_FIGURES}, if set (the
source of the table in docs/reliability.md).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import treq
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool

__all__ = ["Figures", "Load", "Sample"]

#: How many failures L{Figures} describes, for assertion messages.
KEEP_FAILURES = 5


@dataclass(frozen=True)
class Sample:
    """
    One request.

    @ivar started: when it was sent (C{time.monotonic()}).
    @ivar latency: seconds until its whole response was read, or it failed.
    @ivar status: the response's status, or L{None} if there was none.
    @ivar error: what went wrong: the exception, or the status and the
        start of the body of a non-2xx response; empty on success.
    """

    started: float
    latency: float
    status: int | None
    error: str = ""

    @property
    def failed(self) -> bool:
        """
        Not a 2xx response.
        """
        return self.status is None or not 200 <= self.status < 300


def _percentile(ordered: list[float], fraction: float) -> float:
    """
    The nearest-rank percentile of C{ordered} (sorted), 0 if empty.
    """
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(len(ordered) * fraction))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Figures:
    """
    What a set of requests came to; latencies in seconds.
    """

    sent: int
    failed: int
    failures: tuple[str, ...]
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, samples: list[Sample]) -> Figures:
        """
        Sum up C{samples}, describing the first few failures.
        """
        latencies = sorted(s.latency for s in samples)
        failures = [s.error for s in samples if s.failed]
        return cls(
            sent=len(samples),
            failed=len(failures),
            failures=tuple(failures[:KEEP_FAILURES]),
            p50=_percentile(latencies, 0.50),
            p99=_percentile(latencies, 0.99),
            max=latencies[-1] if latencies else 0.0,
        )

    def asJSON(self) -> dict[str, Any]:
        """
        The figures as a JSON object, latencies in milliseconds.
        """
        return {
            "sent": self.sent,
            "failed": self.failed,
            "failures": list(self.failures),
            "p50_ms": round(self.p50 * 1000, 2),
            "p99_ms": round(self.p99 * 1000, 2),
            "max_ms": round(self.max * 1000, 2),
        }


class Load:
    """
    C{concurrency} client loops GETting C{url} from L{start} until L{stop}.

    @param timeout: how long one request may take, its body included,
        before it is cancelled and counted as failed.
    """

    def __init__(
        self,
        url: str,
        concurrency: int = 8,
        timeout: float = 10.0,
        reactor: Any = None,
    ) -> None:
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        self.url = url
        self.concurrency = concurrency
        self.timeout = timeout
        self._reactor = reactor
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = concurrency
        self._pool.retryAutomatically = False
        self._http = treq.client.HTTPClient(Agent(reactor, pool=self._pool))
        self.samples: list[Sample] = []
        self._running = False
        self._loops: list[Deferred[None]] = []
        self._began = self._ended = 0.0
        self._eventStart: float | None = None
        self._eventEnd: float | None = None

    def start(self) -> None:
        """
        Start the client loops.
        """
        self._running = True
        self._began = time.monotonic()
        self._loops = [
            Deferred.fromCoroutine(self._client()) for _ in range(self.concurrency)
        ]

    def eventStarted(self) -> None:
        """
        The event under test begins now.
        """
        self._eventStart = time.monotonic()

    def eventEnded(self) -> None:
        """
        The event under test is over.
        """
        self._eventEnd = time.monotonic()

    async def stop(self) -> None:
        """
        Let each loop finish its request, then close the connections.
        """
        self._running = False
        await defer.gatherResults(self._loops)
        self._ended = time.monotonic()
        await self._pool.closeCachedConnections()

    async def _client(self) -> None:
        while self._running:
            started = time.monotonic()
            attempt = Deferred.fromCoroutine(self._once())
            attempt.addTimeout(self.timeout, self._reactor)
            try:
                status, error = await attempt
            except Exception as e:
                status, error = None, f"{type(e).__name__}: {e}"
            sample = Sample(started, time.monotonic() - started, status, error)
            self.samples.append(sample)
            if sample.failed:
                # Do not spin on a dead server.
                await task.deferLater(self._reactor, 0.01, lambda: None)

    async def _once(self) -> tuple[int, str]:
        response = await self._http.get(self.url)
        body = await response.content()
        code: int = response.code
        if 200 <= code < 300:
            return code, ""
        return code, f"{code} {body[:200]!r}"

    def figures(self, event: bool = False) -> Figures:
        """
        The figures for the whole run, or for the requests sent during the
        event (from L{eventStarted} to L{eventEnded}).
        """
        samples = self.samples
        if event:
            assert self._eventStart is not None and self._eventEnd is not None
            start, end = self._eventStart, self._eventEnd
            samples = [s for s in samples if start <= s.started <= end]
        return Figures.of(samples)

    def report(
        self, scenario: str, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """
        The run's figures as JSON, with C{extra} (say, a measured recovery
        time), also appended as one line to the file C{$MONEDGE_FIGURES}
        names, if it is set.
        """
        record: dict[str, Any] = {
            "scenario": scenario,
            "concurrency": self.concurrency,
            "duration_s": round(self._ended - self._began, 2),
            "whole": self.figures().asJSON(),
            **(extra or {}),
        }
        if self._eventStart is not None and self._eventEnd is not None:
            record["event_s"] = round(self._eventEnd - self._eventStart, 2)
            record["event"] = self.figures(event=True).asJSON()
        path = os.environ.get("MONEDGE_FIGURES")
        if path:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        return record
