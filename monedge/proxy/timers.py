"""
A deadline that is set and cleared on every request without a timer of
its own each time.

An exchange waits for its upstream's response head for the service's
C{timeout}, and nearly always gets it in time: a timer made for every
request (C{callLater}) is cancelled on every request, and Twisted then
keeps the cancelled call in its queue until it rebuilds the queue.  A
connection's requests come one after another, so one L{LazyTimer} serves
them all: clearing the deadline only forgets it, and the one delayed call
underneath, when it comes due, fires the deadline if it has passed, or
moves itself to the deadline now set, or lapses if none is.  As the HTTP/1
channel's header deadline does (L{monedge.edge.base}).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["LazyTimer"]


class LazyTimer:
    """
    One deadline at a time, for one owner at a time, on a delayed call that
    is moved rather than cancelled.

    @param clock: where time and delayed calls come from.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._call: IDelayedCall | None = None
        self._at: float | None = None
        self._owner: object = None
        self._func: Callable[[], object] | None = None

    @property
    def armed(self) -> bool:
        """
        Whether a deadline is set.
        """
        return self._at is not None

    def start(self, delay: float, owner: object, func: Callable[[], object]) -> None:
        """
        Call C{func} in C{delay} seconds, for C{owner}, unless it is stopped
        first; any deadline set before is forgotten.
        """
        clock = self._clock
        at = clock.seconds() + delay
        self._at = at
        self._owner = owner
        self._func = func
        call = self._call
        if call is None:
            self._call = clock.callLater(delay, self._fired)
        elif call.getTime() > at:
            call.reset(delay)

    def stop(self, owner: object) -> None:
        """
        Forget C{owner}'s deadline (nothing, if another's is set now).
        """
        if self._owner is owner:
            self._at = None
            self._owner = None
            self._func = None

    def close(self) -> None:
        """
        Forget any deadline, and cancel the delayed call: the timer's user
        is gone.
        """
        self._at = None
        self._owner = None
        self._func = None
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

    def _fired(self) -> None:
        self._call = None
        at = self._at
        if at is None:
            return
        remaining = at - self._clock.seconds()
        if remaining > 0:
            self._call = self._clock.callLater(remaining, self._fired)
            return
        func = self._func
        self._at = None
        self._owner = None
        self._func = None
        assert func is not None
        func()
