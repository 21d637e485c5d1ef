"""
How late the reactor runs: its lag, as Envoy's watchdog and Node's
C{monitorEventLoopDelay} measure an event loop's.

L{ReactorLag} sets a timer every C{interval} and records how late each one
ran.  Anything that holds the reactor thread (a long computation, a pause
of the garbage collector, another thread holding the interpreter) makes
every event that came in meanwhile wait as long: a lag of 80 ms is 80 ms
added to whatever request was in flight.  The histogram of lags is
exported as C{monedge_reactor_lag_seconds}; a stall of S seconds is
recorded as a lag of at least S - C{interval}.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime

__all__ = ["LAG_INTERVAL", "ReactorLag"]

#: Seconds between two of L{ReactorLag}'s timers: about 0.1% of a CPU.
LAG_INTERVAL = 0.01


class ReactorLag(Service):
    """
    While running, a timer every C{interval} seconds on C{clock}; each one
    reports to C{observe} how many seconds after its due time it ran.

    @ivar worst: the largest lag seen so far, in seconds.
    """

    def __init__(
        self,
        clock: IReactorTime,
        observe: Callable[[float], None],
        interval: float = LAG_INTERVAL,
    ) -> None:
        self.clock = clock
        self.observe = observe
        self.interval = interval
        self.worst = 0.0
        self._due = 0.0
        self._call: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()
        self._schedule()

    def stopService(self) -> None:
        super().stopService()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _schedule(self) -> None:
        self._due = self.clock.seconds() + self.interval
        self._call = self.clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        lag = max(0.0, self.clock.seconds() - self._due)
        self.worst = max(self.worst, lag)
        self.observe(lag)
        self._schedule()
