"""
The client-side limits: how long a request line, a header line and a
header block may be, how many headers, how long each stage of a request
may take, how many connections a listener holds, and what to do with an
underscore in a header name.  Plain values, set by C{twistd monedge}'s
options and enforced by L{monedge.edge.server}.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    """
    Client-side limits, each documented in docs/configuration.md.
    """

    maxRequestLine: int = 8192
    maxHeaderLine: int = 8192
    maxHeadersSize: int = 32768
    maxHeaderCount: int = 100
    headerTimeout: float = 10.0
    keepAliveTimeout: float = 75.0
    bodyTimeout: float = 30.0
    sendTimeout: float = 60.0
    maxConnections: int = 20000
    #: What to do with a request header whose name has an underscore:
    #: C{"drop"} it, C{"reject"} the request (400), or C{"allow"} it.
    underscoreHeaders: str = "drop"
    #: The most bytes of a streamed request body kept so that the request
    #: can be sent again on a stale pooled connection.
    replayBodySize: int = 64 * 1024
    #: The most bytes of request bodies held in memory at once, over the
    #: process, for services with request buffering.
    requestBufferBudget: int = 256 * 1024 * 1024


#: The limits monedge runs with when no option changes them.
DEFAULT_LIMITS = Limits()
