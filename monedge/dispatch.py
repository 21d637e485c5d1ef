"""
The reactor's event dispatch, without the legacy log context.

Twisted's epoll reactor hands every ready descriptor to its
C{_doReadOrWrite} through C{twisted.python.log.callWithLogger}: it asks the
descriptor for its log prefix, copies the legacy log context dictionary
twice and pushes it on a stack, so that a legacy C{log.msg} made while the
event is handled is tagged with the connection's prefix.  monedge logs with
C{twisted.logger}, which never reads that context, and a proxied request is
at least two events (the client's read and the upstream's).  The context
costs about 5% of monedge's instructions per request (bench/instructions.sh,
docs/performance.md).

L{leanDispatch} gives one epoll reactor a C{doPoll} that does what Twisted's
does (the same poll, the same lookup of each descriptor, the same
C{_doReadOrWrite}) but calls it directly.  What is lost: Twisted-internal
legacy messages logged during an event (C{Unhandled Error} from a
protocol's C{dataReceived}, say) carry the system C{-} instead of the
connection's prefix.  An exception that escapes C{_doReadOrWrite} itself is
still logged, as Twisted's C{callWithLogger} would.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.logger import Logger

__all__ = ["leanDispatch"]

_log = Logger()


def leanDispatch(reactor: Any) -> bool:
    """
    Give C{reactor} the lean C{doPoll} if it is Twisted's epoll reactor;
    whether it did.
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
