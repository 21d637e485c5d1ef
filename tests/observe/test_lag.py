"""
Tests for L{monedge.observe.lag}: the reactor's lag, measured on a clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from monedge.observe.lag import ReactorLag
from monedge.observe.metrics import Metrics


class ReactorLagTests(SynchronousTestCase):
    """
    L{ReactorLag} sets a timer every interval and reports how late each ran.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.lags: list[float] = []
        self.lag = ReactorLag(self.clock, self.lags.append, interval=0.01)

    def test_onTime(self) -> None:
        """
        Timers that run when due report no lag, one per interval.
        """
        self.lag.startService()
        self.clock.pump([0.01] * 5)
        self.assertEqual(self.lags, [0.0] * 5)
        self.assertEqual(self.lag.worst, 0.0)

    def test_stall(self) -> None:
        """
        A reactor held for 60 ms runs the timer due 10 ms in 50 ms late;
        the next one is set from then, and is on time again.
        """
        self.lag.startService()
        self.clock.advance(0.06)
        self.clock.advance(0.01)
        self.assertEqual(len(self.lags), 2)
        self.assertAlmostEqual(self.lags[0], 0.05)
        self.assertAlmostEqual(self.lags[1], 0.0)
        self.assertAlmostEqual(self.lag.worst, 0.05)

    def test_stop(self) -> None:
        """
        Once stopped, no timer is left and nothing more is reported.
        """
        self.lag.startService()
        self.clock.advance(0.01)
        self.lag.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.clock.advance(1)
        self.assertEqual(self.lags, [0.0])

    def test_exported(self) -> None:
        """
        Fed to the metrics' C{reactorLag}, the lags are exported as the
        C{monedge_reactor_lag_seconds} histogram: a 50 ms lag counts in the
        0.05 bucket, not in the 0.04 one.
        """
        metrics = Metrics()
        lag = ReactorLag(self.clock, metrics.reactorLag.observe, interval=0.01)
        lag.startService()
        self.clock.advance(0.06)
        self.clock.advance(0.01)
        text = b"".join(metrics.exposition()).decode("utf-8")
        self.assertIn('monedge_reactor_lag_seconds_bucket{le="0.04"} 1.0', text)
        self.assertIn('monedge_reactor_lag_seconds_bucket{le="0.05"} 2.0', text)
        self.assertIn("monedge_reactor_lag_seconds_count 2.0", text)
