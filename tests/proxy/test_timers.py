"""
L{monedge.proxy.timers.LazyTimer}: one deadline at a time, on one delayed
call that is moved rather than cancelled, on a L{Clock}.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from monedge.proxy.timers import LazyTimer


class LazyTimerTests(SynchronousTestCase):
    """
    Deadlines set, cleared and set again.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.timer = LazyTimer(self.clock)
        self.fired: list[str] = []

    def pending(self) -> int:
        """
        How many delayed calls are scheduled.
        """
        return len([c for c in self.clock.getDelayedCalls() if c.active()])

    def test_firesAtTheDeadline(self) -> None:
        """
        A deadline set and not stopped fires once, when it passes; the
        timer is then disarmed.
        """
        self.timer.start(2.0, self, lambda: self.fired.append("a"))
        self.assertTrue(self.timer.armed)
        self.clock.advance(1.99)
        self.assertEqual(self.fired, [])
        self.clock.advance(0.01)
        self.assertEqual(self.fired, ["a"])
        self.assertFalse(self.timer.armed)
        self.clock.advance(10)
        self.assertEqual(self.fired, ["a"])

    def test_stoppedNeverFires(self) -> None:
        """
        A deadline stopped by its owner never fires; the call underneath
        lapses when it comes due, leaving nothing scheduled.
        """
        self.timer.start(2.0, self, lambda: self.fired.append("a"))
        self.timer.stop(self)
        self.assertFalse(self.timer.armed)
        self.clock.advance(5)
        self.assertEqual(self.fired, [])
        self.assertEqual(self.pending(), 0)

    def test_oneCallForManyDeadlines(self) -> None:
        """
        Deadlines set and stopped one after another use one delayed call;
        the last fires at its own time, not at the first one's.
        """
        for i in range(100):
            self.timer.start(2.0, i, lambda: self.fired.append("x"))
            self.assertEqual(self.pending(), 1)
            self.timer.stop(i)
            self.clock.advance(0.1)
        self.timer.start(2.0, "last", lambda: self.fired.append("last"))
        start = self.clock.seconds()
        while not self.fired:
            self.clock.advance(0.05)
        self.assertEqual(self.fired, ["last"])
        self.assertAlmostEqual(self.clock.seconds() - start, 2.0, delta=0.051)

    def test_shorterDeadlineBroughtForward(self) -> None:
        """
        A deadline sooner than the call's time brings the call forward.
        """
        self.timer.start(30.0, "a", lambda: self.fired.append("a"))
        self.timer.stop("a")
        self.timer.start(1.0, "b", lambda: self.fired.append("b"))
        self.clock.advance(1.0)
        self.assertEqual(self.fired, ["b"])

    def test_stopByAnotherOwner(self) -> None:
        """
        Stopping for an owner whose deadline is not the one set changes
        nothing.
        """
        self.timer.start(1.0, "b", lambda: self.fired.append("b"))
        self.timer.stop("a")
        self.clock.advance(1.0)
        self.assertEqual(self.fired, ["b"])

    def test_close(self) -> None:
        """
        Closing forgets the deadline and cancels the call underneath.
        """
        self.timer.start(1.0, "a", lambda: self.fired.append("a"))
        self.timer.close()
        self.assertEqual(self.pending(), 0)
        self.clock.advance(2.0)
        self.assertEqual(self.fired, [])
