"""
The access log: one JSON object per line per request, emitted through
L{twisted.logger} to its own observer (stdout by default), separate from
the process's operational log.

Fields: time, request_id, client, method, path, status, service, endpoint,
upstream_latency, total_latency, bytes_in, bytes_out, and error (the
refusal or upstream failure code, if any).
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

from twisted.logger import ILogObserver, LogEvent, Logger
from zope.interface import implementer

if TYPE_CHECKING:
    from monedge.server import ProxyChannel, ProxyRequest

_MAX_PATH = 2048


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    Writes each event's C{access} field as one JSON line.
    """

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: LogEvent) -> None:
        record = event.get("access")
        if record is not None:
            self._out.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._out.flush()


def _text(value: bytes | None, limit: int = _MAX_PATH) -> str | None:
    if value is None:
        return None
    return value[:limit].decode("utf-8", "backslashreplace")


def _received(value: bytes) -> bytes | None:
    """
    C{value}, or L{None} for Twisted's placeholders for a request line that
    never arrived (C{(no method yet)}).
    """
    return None if value.startswith(b"(no ") else value


def _timestamp(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")


class AccessLog:
    """
    Builds access-log records and emits them.

    @param out: where lines go; L{None} disables the log.
    """

    def __init__(self, out: IO[str] | None) -> None:
        self._log = (
            Logger(namespace="monedge.access", observer=JSONLinesObserver(out))
            if out is not None
            else None
        )

    @classmethod
    def fromOption(cls, value: str) -> AccessLog:
        """
        C{-} is stdout, C{none} disables, anything else is a file path
        (appended to).
        """
        if value == "none":
            return cls(None)
        if value == "-":
            return cls(sys.stdout)
        return cls(open(value, "a", encoding="utf-8"))

    def request(
        self, request: ProxyRequest, status: int, now: float, total: float
    ) -> None:
        """
        Log a request that reached L{ProxyRequest.process} (or was aborted).
        """
        if self._log is None:
            return
        latency = request.upstreamLatency
        record: dict[str, Any] = {
            "time": _timestamp(now),
            "request_id": request.requestId.decode("ascii"),
            "client": request.peerAddress.decode("ascii", "replace"),
            "method": _text(_received(request.method), 32),
            "path": _text(_received(request.uri)),
            "status": status,
            "service": request.service,
            "endpoint": request.endpoint,
            "upstream_latency": round(latency, 6) if latency is not None else None,
            "total_latency": round(total, 6),
            "bytes_in": request.bytesIn,
            "bytes_out": request.sentLength,
            "error": request.errorCode,
        }
        self._log.info("access", access=record)

    def refusal(
        self,
        channel: ProxyChannel,
        code: str,
        status: int,
        requestId: bytes,
        request: ProxyRequest | None,
        now: float,
    ) -> None:
        """
        Log a request the channel refused before it could be processed.
        """
        if self._log is None:
            return
        transport = channel.transport
        peer = (
            getattr(transport.getPeer(), "host", "unknown") if transport else "unknown"
        )
        command = getattr(channel, "_command", None)
        path = getattr(channel, "_path", None)
        record: dict[str, Any] = {
            "time": _timestamp(now),
            "request_id": requestId.decode("ascii"),
            "client": str(peer),
            "method": _text(command, 32),
            "path": _text(path),
            "status": status,
            "service": request.service if request is not None else None,
            "endpoint": None,
            "upstream_latency": None,
            "total_latency": (
                round(now - request.startTime, 6) if request is not None else None
            ),
            "bytes_in": request.bytesIn if request is not None else 0,
            "bytes_out": 0,
            "error": code,
        }
        self._log.info("access", access=record)
