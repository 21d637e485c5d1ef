"""
The access log: one JSON object per line per request, on its own stream
(stdout by default), separate from the process's operational log.

Fields: time, request_id, client, method, path, status, service, endpoint,
upstream_latency, total_latency, bytes_in, bytes_out, error (the
refusal or upstream failure code, if any), and grpc_status (a gRPC
call's C{grpc-status}: the upstream's, or that of monedge's refusal).

Lines are formatted directly (the same bytes C{json.dumps} with compact
separators would give) and, given a reactor, written once per reactor
iteration for every request that finished in it: one write for many
lines, none of them held back longer than the iteration.
"""

from __future__ import annotations

import math
import sys
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii
from typing import IO, Any

from twisted.logger import Logger

from monedge.record import RequestRecord

_MAX_PATH = 2048

#: How often, at most, a failure to write the log is itself logged.
_FAILURE_LOG_INTERVAL = 60.0


class _Clock:
    """
    ISO 8601 UTC timestamps with milliseconds, as
    C{datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")}
    gives, the seconds formatted once per second.
    """

    __slots__ = ("_second", "_prefix", "_millisecond", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""
        self._millisecond = -1
        self._text = ""

    def __call__(self, when: float) -> str:
        # Under load, consecutive requests end within one millisecond: an
        # instant well inside the last one formatted (more than 2 us from
        # either edge, far beyond rounding to the microsecond and a
        # timestamp's float precision) gets the same text.
        scaled = when * 1000.0
        millisecond = int(scaled)
        if millisecond == self._millisecond and when >= 0:
            inside = scaled - millisecond
            if 0.002 < inside < 0.998:
                return self._text
        text = self._format(when)
        inside = scaled - millisecond
        if when >= 0 and 0.002 < inside < 0.998:
            self._millisecond = millisecond
            self._text = text
        return text

    def _format(self, when: float) -> str:
        # As datetime.fromtimestamp rounds: the fraction to the nearest
        # microsecond, half to even.
        fraction, whole = math.modf(when)
        micro = round(fraction * 1e6)
        second = int(whole)
        if micro >= 1_000_000:
            second, micro = second + 1, micro - 1_000_000
        elif micro < 0:
            second, micro = second - 1, micro + 1_000_000
        if second != self._second:
            self._second = second
            self._prefix = datetime.fromtimestamp(second, UTC).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
        return f"{self._prefix}.{micro // 1000:03d}+00:00"


def formatRecord(
    time: str,
    requestId: str,
    client: str,
    method: str | None,
    path: str | None,
    status: int,
    service: str | None,
    endpoint: str | None,
    upstreamLatency: float | None,
    totalLatency: float | None,
    bytesIn: int,
    bytesOut: int,
    error: str | None,
    grpcStatus: int | None = None,
) -> str:
    """
    One access-log line, newline included: exactly what
    C{json.dumps(record, separators=(",", ":"))} gives for the record with
    these fields in this order.
    """
    # Each field's null or JSON text inline: this runs per request.
    enc = encode_basestring_ascii
    return (
        f'{{"time":{enc(time)}'
        f',"request_id":{enc(requestId)}'
        f',"client":{enc(client)}'
        f',"method":{"null" if method is None else enc(method)}'
        f',"path":{"null" if path is None else enc(path)}'
        f',"status":{status}'
        f',"service":{"null" if service is None else enc(service)}'
        f',"endpoint":{"null" if endpoint is None else enc(endpoint)}'
        f',"upstream_latency":{"null" if upstreamLatency is None else repr(upstreamLatency)}'
        f',"total_latency":{"null" if totalLatency is None else repr(totalLatency)}'
        f',"bytes_in":{bytesIn}'
        f',"bytes_out":{bytesOut}'
        f',"error":{"null" if error is None else enc(error)}'
        f',"grpc_status":{"null" if grpcStatus is None else grpcStatus}}}\n'
    )


class AccessLogFileError(Exception):
    """
    The access log's file cannot be opened: the message names the path
    and why, on one line.
    """


def openAccessLog(value: str) -> IO[str] | None:
    """
    The stream an C{--access-log} value names: C{-} is stdout, C{none} is
    L{None} (no log), anything else a file path, opened for appending.

    @raise AccessLogFileError: if the file cannot be opened.
    """
    if value == "none":
        return None
    if value == "-":
        return sys.stdout
    try:
        return open(value, "a", encoding="utf-8")
    except OSError as e:
        reason = e.strerror.lower() if e.strerror else str(e)
        raise AccessLogFileError(f"{value}: cannot open: {reason}") from None


class AccessLog:
    """
    Builds access-log lines and writes them.

    @param out: where lines go; L{None} disables the log.
    @param reactor: if given, lines are gathered and written once per
        reactor iteration; otherwise each is written and flushed at once.
    """

    _log = Logger()

    def __init__(self, out: IO[str] | None, reactor: Any = None) -> None:
        self._out = out
        self._reactor = reactor
        self._pending: list[str] = []
        self._scheduled = False
        self._clock = _Clock()
        self._lastFailure: float | None = None

    @property
    def enabled(self) -> bool:
        """
        Whether lines are written at all.
        """
        return self._out is not None

    @classmethod
    def fromOption(cls, value: str, reactor: Any = None) -> AccessLog:
        """
        C{-} is stdout, C{none} disables, anything else is a file path
        (appended to): see L{openAccessLog}.

        @raise AccessLogFileError: if the file cannot be opened.
        """
        return cls(openAccessLog(value), reactor)

    def _emit(self, line: str) -> None:
        if self._reactor is None:
            self._pending.append(line)
            self.flush()
            return
        self._pending.append(line)
        if not self._scheduled:
            self._scheduled = True
            self._reactor.callLater(0, self.flush)

    def flush(self) -> None:
        """
        Write and flush every pending line (at shutdown, say).
        """
        self._scheduled = False
        if not self._pending or self._out is None:
            return
        data = "".join(self._pending)
        self._pending.clear()
        try:
            self._out.write(data)
            self._out.flush()
        except (OSError, ValueError) as e:
            now = self._reactor.seconds() if self._reactor is not None else 0.0
            last = self._lastFailure
            if last is None or now - last >= _FAILURE_LOG_INTERVAL:
                self._lastFailure = now
                self._log.error(
                    "cannot write the access log ({error}); lines are lost",
                    error=e,
                )

    def log(self, record: RequestRecord) -> None:
        """
        Log a finished request: one line from its record.
        """
        if self._out is None:
            return
        latency = record.upstreamLatency
        total = record.totalLatency
        method, path = record.method, record.path
        end = record.end
        assert end is not None
        self._emit(
            formatRecord(
                self._clock(end),
                record.requestId.decode("ascii"),
                record.client.decode("ascii", "replace"),
                None
                if method is None
                else method[:32].decode("utf-8", "backslashreplace"),
                None
                if path is None
                else path[:_MAX_PATH].decode("utf-8", "backslashreplace"),
                record.status,
                record.service,
                record.endpoint,
                round(latency, 6) if latency is not None else None,
                round(total, 6) if total is not None else None,
                record.bytesIn,
                record.bytesOut,
                record.errorCode,
                record.grpcStatus,
            )
        )
