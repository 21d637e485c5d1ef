"""
The Twisted seam: everything monedge relies on that Twisted does not
promise.

monedge is a Twisted program, and some of its speed and some of its
behaviour come from reaching past Twisted's public API: reading the table
inside L{Headers}, a request's disconnection, Twisted's own readers of a
request line, a header name and a chunk size, replacing a reactor's dispatch or a transport's C{write}.  This module is
the only one that names a private attribute, class or method of Twisted
(a C{_}-prefixed name), or replaces a method of one of Twisted's objects;
the rest of monedge calls the small functions here
(C{tests/test_architecture.py} checks it).  On a Twisted upgrade, this
module is what to read again, beside the tests named in each section.

It was written for Twisted 26.x from 26.10.0 (C{setup.cfg} bounds Twisted
below 27), and L{checkTwistedVersion}, called when C{twistd monedge}
builds its service, refuses any other version with one line.

Accessors used on every request are C{operator.attrgetter} objects bound
at import and typed as callables: a call costs about as much as the
attribute lookup it replaces, with no Python frame.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Callable, Iterable
from operator import attrgetter
from typing import Any

from twisted.copyright import version as installedTwisted
from twisted.internet.tcp import Connection
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.usage import UsageError
from twisted.web._abnf import _hexint
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory
from twisted.web.http import Request as HTTPRequest
from twisted.web.http import (
    _parseRequestLine,
)
from twisted.web.http_headers import Headers, _nameEncoder

__all__ = [
    "TWISTED_BELOW",
    "TWISTED_LOWEST",
    "canonicalHeaderName",
    "chunkSize",
    "parseRequestLine",
    "acceptOneAtATime",
    "checkTwistedVersion",
    "leanDispatch",
    "quietConnectionPool",
    "rawHeaderTable",
    "HeaderTable",
    "requestDisconnected",
    "sendAtOnce",
]

_log = Logger()

# The version

#: The first Twisted release this module was written for.
TWISTED_LOWEST = (26, 10, 0)
#: The first Twisted release it was not: the next major one.
TWISTED_BELOW = (27, 0, 0)

_VERSION = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(map(str, version))


def checkTwistedVersion(version: str | None = None) -> None:
    """
    Refuse to run on a Twisted this module was not written for.

    @param version: the Twisted version to check (its leading
        C{MAJOR.MINOR.MICRO} is read); the installed one by default.
    @raise UsageError: if it is outside L{TWISTED_LOWEST} (included) to
        L{TWISTED_BELOW} (excluded), or unreadable; its one-line message
        names both versions (at startup, C{monedge.tap} ends the process
        with it as monedge's one line on standard error).
    """
    if version is None:
        version = installedTwisted
    match = _VERSION.match(version)
    found = tuple(int(part) for part in match.groups()) if match else None
    if found is None or not TWISTED_LOWEST <= found < TWISTED_BELOW:
        raise UsageError(
            f"Twisted {version} is installed, but this monedge is written for"
            f" Twisted >= {_dotted(TWISTED_LOWEST)}, < {TWISTED_BELOW[0]}"
            " (it relies on Twisted internals: monedge/twistedseam.py)"
        )


# Headers (tests/rules/test_headers.py, tests/proxy/test_proxy.py)

#: The table inside a L{Headers}: canonical names (C{b"X-Request-Id"}) to
#: their values, as Twisted keeps them.  Read to look a canonical name up
#: without L{Headers.getRawHeaders} encoding it again; written to set
#: values known to be valid without their check for CR, LF and NUL.  Per
#: request.
HeaderTable = dict[bytes, list[bytes]]
rawHeaderTable: Callable[[Headers], HeaderTable] = attrgetter("_rawHeaders")


#: A request header's name as L{Headers} keeps it (C{b"x-foo"} ->
#: C{b"X-Foo"}), with Twisted's cache; raises L{ValueError}
#: (C{InvalidHeaderName}) for a name that is not a token.  monedge's own
#: HTTP/1.1 front end (L{monedge.edge.http1}) checks names as Twisted's
#: channel does.  Per header.
canonicalHeaderName: Callable[[bytes], bytes] = _nameEncoder.encode

#: Twisted's request-line parser: C{(method, target, version)}, or
#: L{ValueError} for a line its channel refuses (a method that is not a
#: token, a target with a space or a control byte, a version other than
#: HTTP/1.0 and HTTP/1.1).  L{monedge.edge.http1} reads request lines with
#: it, so that both front ends accept the same ones.  Per request.
parseRequestLine: Callable[[bytes], tuple[bytes, bytes, bytes]] = _parseRequestLine

#: Twisted's reading of a chunk-size (hex digits only, no sign, no
#: spaces), or L{ValueError}.  Per chunk.
chunkSize: Callable[[bytes], int] = _hexint


# Requests (tests/runtime/test_workers.py, tests/test_loadbalancer.py)

#: Whether the connection a request came on is gone (Twisted's request
#: then drops its channel, and ignores writes).
requestDisconnected: Callable[[HTTPRequest], bool] = attrgetter("_disconnected")


# Transports (tests/test_sockets.py)


def sendAtOnce(transport: Any) -> None:
    """
    Make C{transport} send what it is given at once when its buffer is
    empty.  For a TLS transport (Twisted's L{TLSMemoryBIOProtocol}), the
    TCP connection beneath it sends the TLS records at once.  Any other
    transport (a test's L{StringTransport}) is left as it is, and so is a
    connection already changed.

    Twisted's TCP transports buffer every C{write} and send it on the next
    reactor iteration: C{startWriting} asks epoll to watch the socket for
    writability, the next C{epoll_wait} says it is, C{doWrite} sends, and
    C{stopWriting} asks epoll to stop watching.  That is two C{epoll_ctl}
    system calls, a reactor iteration and a good deal of Python for every
    write, and a proxied request makes two writes (upstream and back),
    each on an otherwise idle keep-alive connection whose kernel buffer
    has room.  The C{write} given here, when nothing is waiting in the
    buffer, sends at once and buffers only what the kernel did not take.
    Everything else (flow control, producers, half-close, errors) stays
    Twisted's: a failed or partial send falls back to the buffered path,
    which finds the error or sends the rest as before.
    """
    if isinstance(transport, TLSMemoryBIOProtocol):
        # TLS: its records are written to the TCP connection beneath it
        # (its transport), one write for each write made of it.
        transport = transport.transport
    # Not hasattr(transport, "socket"): a TLS transport hands attribute
    # lookups on to the TCP connection beneath it.
    if not isinstance(transport, Connection) or "write" in vars(transport):
        return
    send = transport.socket.send
    buffered = type(transport).write.__get__(transport)

    def write(data: bytes) -> None:
        if (
            data
            and not transport._tempDataBuffer
            and transport.offset == len(transport.dataBuffer)
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._writeDisconnecting
        ):
            try:
                sent = send(data)
            except OSError:
                # EAGAIN, or a real error the buffered path will report.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        buffered(data)

    def writeSequence(iovec: Iterable[bytes]) -> None:
        write(b"".join(iovec))

    transport.write = write  # type: ignore[method-assign]
    transport.writeSequence = writeSequence  # type: ignore[method-assign]


# The reactor (tests/test_dispatch.py)


def leanDispatch(reactor: Any) -> bool:
    """
    Give C{reactor} a lean C{doPoll} if it is Twisted's epoll reactor;
    whether it did.

    Twisted's epoll reactor hands every ready descriptor to its
    C{_doReadOrWrite} through C{twisted.python.log.callWithLogger}: it
    asks the descriptor for its log prefix, copies the legacy log context
    dictionary twice and pushes it on a stack, so that a legacy
    C{log.msg} made while the event is handled is tagged with the
    connection's prefix.  monedge logs with C{twisted.logger}, which never
    reads that context, and a proxied request is at least two events (the
    client's read and the upstream's).  The context costs about 5% of
    monedge's instructions per request (bench/instructions.sh,
    docs/performance.md).

    The C{doPoll} given here does what Twisted's does (the same poll, the
    same lookup of each descriptor, the same C{_doReadOrWrite}) but calls
    it directly.  What is lost: Twisted-internal legacy messages logged
    during an event (C{Unhandled Error} from a protocol's
    C{dataReceived}, say) carry the system C{-} instead of the
    connection's prefix.  An exception that escapes C{_doReadOrWrite}
    itself is still logged, as Twisted's C{callWithLogger} would.
    """
    try:
        from twisted.internet.epollreactor import EPollReactor
    except ImportError:  # pragma: no cover (not Linux)
        return False
    if not isinstance(reactor, EPollReactor):
        return False
    poll = reactor._poller.poll
    selectables = reactor._selectables
    dispatch = reactor._doReadOrWrite

    def doPoll(timeout: float | None) -> None:
        if timeout is None:
            timeout = -1
        try:
            events = poll(timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        for fd, event in events:
            # Looked up for each event, as Twisted does: an earlier event in
            # this batch may have closed this descriptor or reused its number.
            selectable = selectables.get(fd)
            if selectable is None:
                continue
            try:
                dispatch(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                _log.failure("unhandled error dispatching {fd}", fd=fd)

    reactor.doPoll = reactor.doIteration = doPoll  # type: ignore[method-assign]
    return True


# Listening ports (tests/runtime/test_workers.py)


def acceptOneAtATime(port: Any) -> None:
    """
    Make a listening port accept one connection each time it is readable,
    as nginx's C{multi_accept off} does.

    Twisted's ports accept up to 100 connections (and more, adaptively) per
    readiness event. Workers sharing one socket are all woken by a burst of
    new connections, and the first awake would take the whole burst; one
    at a time, they take turns, and the connections spread over the
    workers.
    """
    doRead = port.doRead

    def fairDoRead() -> None:
        port.numberAccepts = 1
        doRead()

    port.doRead = fairDoRead


# The Agent's connection pool (tests/test_e2e_workers.py)


class _QuietClientFactory(_HTTP11ClientFactory):
    # Its connections open and close without a log line each.
    noisy = False


def quietConnectionPool(reactor: Any) -> HTTPConnectionPool:
    """
    A persistent L{HTTPConnectionPool} whose connections are not logged as
    they open and close (Twisted's pool has no option for it).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory = _QuietClientFactory
    return pool
