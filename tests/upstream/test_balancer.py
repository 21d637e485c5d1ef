"""
Tests for L{monedge.upstream.balancer}: which endpoints may take traffic, power of
two choices on outstanding requests, and connection back-off.
"""

from __future__ import annotations

import random
from collections import Counter

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from monedge.registry import Endpoint
from monedge.upstream.balancer import Balancer, EndpointState, eligible


def ep(
    port: int, ready: bool = True, serving: bool = True, terminating: bool = False
) -> Endpoint:
    """
    An endpoint on 10.0.0.1 at C{port} with the given conditions.
    """
    return Endpoint(
        "10.0.0.1", port, ready=ready, serving=serving, terminating=terminating
    )


class EligibleTests(SynchronousTestCase):
    """
    L{eligible} follows EndpointSlice conditions.
    """

    def test_readyFirst(self) -> None:
        """
        When any endpoint is ready, exactly the ready ones are eligible, in
        order, and terminating-but-serving ones are not.
        """
        a = ep(1)
        b = ep(2, ready=False, serving=True, terminating=True)
        c = ep(3, ready=True, terminating=True)
        d = ep(4, ready=False, serving=False)
        self.assertEqual(eligible([a, b, c, d]), (a, c))

    def test_servingTerminatingFallback(self) -> None:
        """
        With none ready, the serving endpoints that are terminating are
        eligible; not-serving or not-terminating ones are not.
        """
        a = ep(1, ready=False, serving=True, terminating=True)
        b = ep(2, ready=False, serving=False, terminating=True)
        c = ep(3, ready=False, serving=True, terminating=False)
        d = ep(4, ready=False, serving=True, terminating=True)
        self.assertEqual(eligible([a, b, c, d]), (a, d))

    def test_nothing(self) -> None:
        """
        With none ready and none serving-and-terminating, or no endpoints at
        all, nothing is eligible.
        """
        self.assertEqual(eligible([]), ())
        self.assertEqual(
            eligible(
                [
                    ep(1, ready=False, serving=False, terminating=True),
                    ep(2, ready=False, serving=True, terminating=False),
                ]
            ),
            (),
        )

    def test_iterable(self) -> None:
        """
        Any iterable, even a one-shot generator, is accepted.
        """
        endpoints = [ep(1, ready=False, terminating=True), ep(2)]
        self.assertEqual(eligible(e for e in endpoints), (endpoints[1],))


class BalancerTestCase(SynchronousTestCase):
    """
    A balancer on a fake clock with a seeded random source.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.balancer = Balancer(
            self.clock, backoff=1.0, maxBackoff=30.0, rng=random.Random(42)
        )


class StatesTests(BalancerTestCase):
    """
    L{Balancer.states} and L{Balancer.retain} keep one state per address.
    """

    def test_fresh(self) -> None:
        """
        A new state has nothing outstanding, no failures, is not backing
        off, and knows its URL prefix.
        """
        [state] = self.balancer.states([Endpoint("::1", 8443, scheme="https")])
        self.assertEqual(
            (state.outstanding, state.failures, state.downUntil), (0, 0, 0.0)
        )
        self.assertEqual(state.base, b"https://[::1]:8443")
        self.assertEqual(state.key, ("https", "::1", 8443))

    def test_sameObject(self) -> None:
        """
        The same address gives the same state object across calls, so
        counts survive registry changes; the state follows the newest
        endpoint's conditions.
        """
        [first] = self.balancer.states([ep(1)])
        first.outstanding = 3
        updated = ep(1, ready=False, terminating=True)
        [second, other] = self.balancer.states([updated, ep(2)])
        self.assertIs(second, first)
        self.assertEqual(second.outstanding, 3)
        self.assertIs(second.endpoint, updated)
        self.assertIsNot(other, first)

    def test_order(self) -> None:
        """
        States come back in the order of the endpoints.
        """
        endpoints = [ep(3), ep(1), ep(2)]
        states = self.balancer.states(endpoints)
        self.assertEqual([s.endpoint for s in states], endpoints)

    def test_schemeIsPartOfKey(self) -> None:
        """
        The same host and port over HTTP and HTTPS are different endpoints.
        """
        a, b = self.balancer.states(
            [Endpoint("h", 1), Endpoint("h", 1, scheme="https")]
        )
        self.assertIsNot(a, b)

    def test_retainForgetsIdleUnknown(self) -> None:
        """
        L{Balancer.retain} forgets idle states for endpoints no longer
        listed: asking again gives a fresh state.
        """
        [gone, kept] = self.balancer.states([ep(1), ep(2)])
        gone.failures = 2
        kept.failures = 5
        self.balancer.retain([ep(2)])
        [gone2, kept2] = self.balancer.states([ep(1), ep(2)])
        self.assertIsNot(gone2, gone)
        self.assertEqual(gone2.failures, 0)
        self.assertIs(kept2, kept)

    def test_retainKeepsOutstanding(self) -> None:
        """
        A state with requests outstanding is kept even when no service lists
        its endpoint, so that finishing those requests is counted.
        """
        [busy] = self.balancer.states([ep(1)])
        busy.outstanding = 1
        self.balancer.retain([])
        [again] = self.balancer.states([ep(1)])
        self.assertIs(again, busy)
        busy.outstanding = 0
        self.balancer.retain([])
        [fresh] = self.balancer.states([ep(1)])
        self.assertIsNot(fresh, busy)

    def test_retainSteps(self) -> None:
        """
        L{Balancer.retainSteps} does L{Balancer.retain}'s work a batch at a
        time: nothing is forgotten until the last step, and each step reads
        at most C{batch} services or checks at most C{batch} states.
        """
        states = self.balancer.states([ep(n) for n in range(10)])
        steps = self.balancer.retainSteps(([ep(n)] for n in range(5)), batch=2)
        taken = 0
        for _ in steps:
            taken += 1
            if taken < 3:
                self.assertEqual(len(self.balancer._states), 10)
        # 5 services in batches of 2 (2 steps), 10 states in batches of 2
        # (5 steps).
        self.assertEqual(taken, 7)
        self.assertEqual(
            [s.key[2] for s in self.balancer._states.values()], [0, 1, 2, 3, 4]
        )
        self.assertEqual(self.balancer.states([ep(0)]), states[:1])


class PickTests(BalancerTestCase):
    """
    L{Balancer.pick} chooses by power of two choices.
    """

    def test_none(self) -> None:
        """
        No candidates, or only the excluded one, give L{None}.
        """
        self.assertIsNone(self.balancer.pick([]))
        [only] = self.balancer.states([ep(1)])
        self.assertIsNone(self.balancer.pick([only], exclude=only))

    def test_single(self) -> None:
        """
        A single candidate is chosen, however loaded.
        """
        [only] = self.balancer.states([ep(1)])
        only.outstanding = 100
        for _ in range(10):
            self.assertIs(self.balancer.pick([only]), only)

    def test_twoFewerOutstanding(self) -> None:
        """
        With two candidates, the one with fewer outstanding requests is
        always chosen, whichever order they come in.
        """
        a, b = self.balancer.states([ep(1), ep(2)])
        a.outstanding, b.outstanding = 3, 2
        for _ in range(100):
            self.assertIs(self.balancer.pick([a, b]), b)
            self.assertIs(self.balancer.pick([b, a]), b)
        a.outstanding, b.outstanding = 0, 1
        for _ in range(100):
            self.assertIs(self.balancer.pick([a, b]), a)

    def test_equalLoadSpreads(self) -> None:
        """
        With equal load, both of two candidates are chosen.
        """
        a, b = self.balancer.states([ep(1), ep(2)])
        counts = Counter(self.balancer.pick([a, b]) for _ in range(200))
        self.assertEqual(set(counts), {a, b})
        self.assertGreater(min(counts.values()), 50)

    def test_mostLoadedNeverChosen(self) -> None:
        """
        With several candidates, one with strictly more outstanding than
        every other is never chosen (it loses every pair it is in), and the
        least loaded is chosen most often.
        """
        states = self.balancer.states([ep(p) for p in range(1, 6)])
        for load, state in enumerate(states):
            state.outstanding = load
        counts = Counter(self.balancer.pick(states) for _ in range(1000))
        self.assertNotIn(states[-1], counts)
        self.assertEqual(counts.most_common(1)[0][0], states[0])
        self.assertEqual(sum(counts.values()), 1000)

    def test_deterministic(self) -> None:
        """
        With the same seed, the same choices are made.
        """

        def run() -> list[int]:
            balancer = Balancer(Clock(), rng=random.Random(7))
            states = balancer.states([ep(p) for p in range(1, 6)])
            picks = []
            for _ in range(50):
                state = balancer.pick(states)
                assert state is not None
                picks.append(state.endpoint.port)
            return picks

        self.assertEqual(run(), run())
        self.assertGreater(len(set(run())), 1)

    def test_exclude(self) -> None:
        """
        The excluded candidate is never chosen, even when it is the least
        loaded.
        """
        a, b, c = self.balancer.states([ep(1), ep(2), ep(3)])
        b.outstanding = c.outstanding = 10
        for _ in range(100):
            choice = self.balancer.pick([a, b, c], exclude=a)
            self.assertIn(choice, (b, c))
        self.assertIs(self.balancer.pick([a, b], exclude=a), b)


class BackoffTests(BalancerTestCase):
    """
    Connection failures put an endpoint in back-off.
    """

    def test_skippedWhileBackingOff(self) -> None:
        """
        An endpoint that failed to connect is skipped, even when it has
        fewer outstanding requests, until the clock reaches C{downUntil}.
        """
        a, b = self.balancer.states([ep(1), ep(2)])
        b.outstanding = 50
        self.balancer.connectFailed(a)
        self.assertEqual(a.downUntil, self.clock.seconds() + 1.0)
        for _ in range(50):
            self.assertIs(self.balancer.pick([a, b]), b)
        self.clock.advance(0.999)
        self.assertIs(self.balancer.pick([a, b]), b)
        self.clock.advance(0.001)
        for _ in range(50):
            self.assertIs(self.balancer.pick([a, b]), a)

    def test_exponential(self) -> None:
        """
        Each consecutive failure doubles the back-off: 1, 2, 4, 8, 16, then
        capped at C{maxBackoff} (30).
        """
        [state] = self.balancer.states([ep(1)])
        delays = []
        for _ in range(8):
            self.balancer.connectFailed(state)
            delays.append(state.downUntil - self.clock.seconds())
        self.assertEqual(delays, [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0])
        self.assertEqual(state.failures, 8)

    def test_customBackoff(self) -> None:
        """
        The first back-off and the cap are configurable.
        """
        balancer = Balancer(self.clock, backoff=0.5, maxBackoff=3.0)
        [state] = balancer.states([ep(1)])
        delays = []
        for _ in range(5):
            balancer.connectFailed(state)
            delays.append(state.downUntil - self.clock.seconds())
        self.assertEqual(delays, [0.5, 1.0, 2.0, 3.0, 3.0])

    def test_backoffFromNow(self) -> None:
        """
        Back-off is counted from the time of the failure.
        """
        [state] = self.balancer.states([ep(1)])
        self.balancer.connectFailed(state)
        self.clock.advance(100)
        self.balancer.connectFailed(state)
        self.assertEqual(state.downUntil, self.clock.seconds() + 2.0)

    def test_manyConsecutiveFailures(self) -> None:
        """
        An endpoint that keeps failing (thousands of times, as a dead only
        endpoint does when every request falls back to it) stays at the
        capped back-off; recording the failure never raises.
        """
        [state] = self.balancer.states([ep(1)])
        for _ in range(5000):
            self.balancer.connectFailed(state)
        self.assertEqual(state.failures, 5000)
        self.assertEqual(state.downUntil, self.clock.seconds() + 30.0)

    def test_connectedResets(self) -> None:
        """
        A successful exchange clears the failures and the back-off: the
        next failure backs off for the first interval again.
        """
        a, b = self.balancer.states([ep(1), ep(2)])
        b.outstanding = 5
        for _ in range(4):
            self.balancer.connectFailed(a)
        self.balancer.connected(a)
        self.assertEqual((a.failures, a.downUntil), (0, 0.0))
        self.assertIs(self.balancer.pick([a, b]), a)
        self.balancer.connectFailed(a)
        self.assertEqual(a.downUntil, self.clock.seconds() + 1.0)

    def test_connectedHealthyUnchanged(self) -> None:
        """
        A success on a healthy endpoint changes nothing.
        """
        [state] = self.balancer.states([ep(1)])
        state.outstanding = 2
        self.balancer.connected(state)
        self.assertEqual(
            (state.outstanding, state.failures, state.downUntil), (2, 0, 0.0)
        )

    def test_allBackingOff(self) -> None:
        """
        When every candidate is backing off, the choice is among all of
        them (by load) rather than none.
        """
        a, b, c = self.balancer.states([ep(1), ep(2), ep(3)])
        for state in (a, b, c):
            self.balancer.connectFailed(state)
        a.outstanding, b.outstanding, c.outstanding = 5, 0, 5
        counts = Counter(self.balancer.pick([a, b, c]) for _ in range(300))
        self.assertLessEqual(set(counts), {a, b, c})
        self.assertEqual(counts.most_common(1)[0][0], b)
        self.assertGreater(counts[b], 150)
        self.assertIs(self.balancer.pick([a, b], exclude=b), a)

    def test_healthyPreferredOverLessLoadedDown(self) -> None:
        """
        While one candidate is healthy, candidates in back-off are never
        chosen, even with the exclude leaving only one healthy one.
        """
        a, b, c = self.balancer.states([ep(1), ep(2), ep(3)])
        self.balancer.connectFailed(a)
        self.balancer.connectFailed(b)
        c.outstanding = 99
        for _ in range(50):
            self.assertIs(self.balancer.pick([a, b, c]), c)
        self.assertIs(self.balancer.pick([a, b, c], exclude=b), c)

    def test_excludeWhenOthersDown(self) -> None:
        """
        Excluding the only healthy candidate falls back to the others in
        back-off, never the excluded one.
        """
        a, b = self.balancer.states([ep(1), ep(2)])
        self.balancer.connectFailed(b)
        self.assertIs(self.balancer.pick([a, b], exclude=a), b)


class EndpointStateTests(SynchronousTestCase):
    """
    L{EndpointState} describes one endpoint.
    """

    def test_base(self) -> None:
        """
        The URL prefix is the scheme and the authority.
        """
        self.assertEqual(EndpointState(Endpoint("h", 80)).base, b"http://h:80")
        self.assertEqual(
            EndpointState(Endpoint("fe80::1", 443, scheme="https")).base,
            b"https://[fe80::1]:443",
        )
