"""
The access log's line format, timestamps and batched writes.
"""

from __future__ import annotations

import io
import json
import random
from datetime import UTC, datetime
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial.unittest import SynchronousTestCase

from monedge.observe.accesslog import AccessLog, _Clock, formatRecord

#: Strings that JSON must escape, or that are not ASCII.
HOSTILE = [
    "",
    "plain",
    'quote " and backslash \\',
    "controls \x00\x01\x1f\x7f tab\t newline\n cr\r",
    "unicode é ß 日本 \U0001f600",
    "escaped bytes \\xff\\xfe as backslashreplace gives",
    "</script><script>alert(1)</script>",
    "\u2028\u2029 line separators",
    "lone surrogate \udc80",
]


def _fields(**overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "time": "2026-01-01T00:00:00.123+00:00",
        "request_id": "4f1c2a9be0d34c0a8e51f3b7a6d29c10",
        "client": "203.0.113.7",
        "method": "GET",
        "path": "/echo/hello?x=1",
        "status": 200,
        "service": "service.api.echo",
        "endpoint": "127.0.0.1:9001",
        "upstream_latency": 0.012346,
        "total_latency": 0.015123,
        "bytes_in": 0,
        "bytes_out": 312,
        "error": None,
        "grpc_status": None,
    }
    fields.update(overrides)
    return fields


def _format(fields: dict[str, Any]) -> str:
    return formatRecord(*fields.values())


class _Out(io.StringIO):
    """
    A stream that counts its writes and flushes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)

    def flush(self) -> None:
        self.flushes += 1


class _Broken(io.StringIO):
    def write(self, s: str) -> int:
        raise OSError(28, "No space left on device")


class FormatTests(SynchronousTestCase):
    """
    Lines are formatted by hand, byte for byte as json.dumps would.
    """

    def test_sameAsJSONDumps(self) -> None:
        """
        For every hostile string in every string field, and null in every
        nullable one, the line is json.dumps's compact output plus a
        newline, and parses back to the same record.
        """
        for name in ("request_id", "client", "method", "path", "service", "error"):
            for value in [*HOSTILE, None]:
                if value is None and name in ("request_id", "client"):
                    continue
                fields = _fields(**{name: value})
                line = _format(fields)
                self.assertEqual(
                    line, json.dumps(fields, separators=(",", ":")) + "\n", name
                )
                self.assertEqual(json.loads(line), fields)
                self.assertNotIn("\n", line[:-1])

    def test_numbers(self) -> None:
        """
        Latencies print as json.dumps prints floats (shortest repr, no
        exponent surprises hidden); null when absent; integers as integers.
        """
        for latency in (0.0, 1e-06, 0.000123, 12.5, 123456.789012, None):
            fields = _fields(upstream_latency=latency, total_latency=latency)
            self.assertEqual(
                _format(fields), json.dumps(fields, separators=(",", ":")) + "\n"
            )
        fields = _fields(status=499, bytes_in=10**12, bytes_out=0)
        self.assertEqual(
            _format(fields), json.dumps(fields, separators=(",", ":")) + "\n"
        )


class ClockTests(SynchronousTestCase):
    """
    The cached timestamp formatter agrees with datetime's own.
    """

    def test_matchesDatetime(self) -> None:
        """
        For random instants, and ones on and around second boundaries and
        half-milliseconds, the formatter gives what datetime.isoformat
        with milliseconds gives.
        """
        clock = _Clock()
        rng = random.Random(7)
        instants = [rng.uniform(0, 4e9) for _ in range(20000)]
        for base in (1767225600, 1767225601, 2000000000):
            for offset in (0.0, 0.0005, 0.0004999, 0.9995, 0.9999996, 0.999999, 0.123):
                instants.append(base + offset)
                instants.append(base - offset)
            # Runs of instants within one millisecond, from its start to its
            # end, as a loaded proxy logs them (the formatter reuses the
            # text well inside a millisecond).
            for step in range(0, 1000, 7):
                instants.append(base + 0.456 + step * 1e-6)
                instants.append(base + 0.999 + step * 1e-6)
        instants.sort()
        for when in instants:
            expected = datetime.fromtimestamp(when, UTC).isoformat(
                timespec="milliseconds"
            )
            # Each instant twice: the second is formatted from the first's.
            self.assertEqual(clock(when), expected, repr(when))
            self.assertEqual(clock(when), expected, repr(when))


class WriteTests(SynchronousTestCase):
    """
    Without a reactor each line is written and flushed at once; with one,
    the lines of one reactor iteration go out in one write.
    """

    def test_immediateWithoutReactor(self) -> None:
        """
        Without a reactor, each line is written and flushed as it is
        logged.
        """
        out = _Out()
        log = AccessLog(out)
        log._emit("a\n")
        self.assertEqual((out.getvalue(), out.writes, out.flushes), ("a\n", 1, 1))
        log._emit("b\n")
        self.assertEqual((out.getvalue(), out.writes, out.flushes), ("a\nb\n", 2, 2))

    def test_batchedPerIteration(self) -> None:
        """
        With a reactor, lines wait for the end of the current iteration
        (a zero-delay call), then go out together in one write and one
        flush; the next line schedules the next write.
        """
        out = _Out()
        clock = Clock()
        log = AccessLog(out, clock)
        log._emit("a\n")
        log._emit("b\n")
        self.assertEqual(out.getvalue(), "")
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(0)
        self.assertEqual((out.getvalue(), out.writes, out.flushes), ("a\nb\n", 1, 1))
        log._emit("c\n")
        clock.advance(0)
        self.assertEqual((out.getvalue(), out.writes), ("a\nb\nc\n", 2))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_flushWritesPending(self) -> None:
        """
        flush() writes what is pending at once (monedge calls it when it
        stops); the scheduled call then finds nothing to write.
        """
        out = _Out()
        clock = Clock()
        log = AccessLog(out, clock)
        log._emit("a\n")
        log.flush()
        self.assertEqual(out.getvalue(), "a\n")
        clock.advance(0)
        self.assertEqual(out.writes, 1)

    def test_disabled(self) -> None:
        """
        'none' writes nothing and schedules nothing.
        """
        clock = Clock()
        log = AccessLog.fromOption("none", clock)
        self.assertFalse(log.enabled)
        log.flush()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_writeFailureLoggedNotRaised(self) -> None:
        """
        A write that fails (a full disk) loses those lines but never
        reaches the request path as an exception; it is logged at most
        once a minute.
        """
        clock = Clock()
        log = AccessLog(_Broken(), clock)
        clock.advance(100)
        with capturedLogs() as events:
            for _ in range(3):
                log._emit("a\n")
                clock.advance(0)
            clock.advance(61)
            log._emit("b\n")
            clock.advance(0)
        errors = [e for e in events if "access log" in e.get("log_format", "")]
        self.assertEqual(len(errors), 2)
        self.assertEqual(log._pending, [])
