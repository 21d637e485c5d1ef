"""
Endpoint choice: power of two choices on the fewest outstanding requests,
skipping endpoints that recently refused connections.

State is kept per endpoint address, shared by every route, so that counts
survive registry changes while requests are still in flight.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence

from twisted.internet.interfaces import IReactorTime

from monedge.registry import Endpoint

EndpointKey = tuple[str, str, int]


class EndpointState:
    """
    What the balancer knows of one endpoint.

    @ivar outstanding: requests sent to it and not yet finished.
    @ivar downUntil: the clock time before which it is skipped.
    @ivar failures: consecutive connection failures.
    @ivar base: C{scheme://host:port}, the URL prefix for requests.
    """

    __slots__ = ("endpoint", "key", "base", "outstanding", "downUntil", "failures")

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.key: EndpointKey = (endpoint.scheme, endpoint.host, endpoint.port)
        #: The URL prefix requests to this endpoint start with.
        self.base = f"{endpoint.scheme}://{endpoint.authority}".encode("ascii")
        self.outstanding = 0
        self.downUntil = 0.0
        self.failures = 0


def eligible(endpoints: Iterable[Endpoint]) -> tuple[Endpoint, ...]:
    """
    The endpoints traffic may go to: the ready ones, or if none is ready,
    the serving ones that are terminating.
    """
    endpoints = tuple(endpoints)
    ready = tuple(e for e in endpoints if e.ready)
    if ready:
        return ready
    return tuple(e for e in endpoints if e.serving and e.terminating)


class Balancer:
    """
    Chooses endpoints and tracks their load and health.

    @param backoff: seconds an endpoint is skipped after its first
        connection failure; doubled per consecutive failure up to
        C{maxBackoff}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        backoff: float = 1.0,
        maxBackoff: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self._clock = clock
        self._backoff = backoff
        self._maxBackoff = maxBackoff
        self._rng = rng or random.Random()
        self._states: dict[EndpointKey, EndpointState] = {}

    def states(self, endpoints: Iterable[Endpoint]) -> list[EndpointState]:
        """
        The state objects for C{endpoints}, created as needed.
        """
        result = []
        for endpoint in endpoints:
            key = (endpoint.scheme, endpoint.host, endpoint.port)
            state = self._states.get(key)
            if state is None:
                state = self._states[key] = EndpointState(endpoint)
            else:
                state.endpoint = endpoint
            result.append(state)
        return result

    def retain(self, endpoints: Iterable[Endpoint]) -> None:
        """
        Forget idle endpoints that no service lists any more, so memory
        follows the registry.
        """
        for _ in self.retainSteps([endpoints], batch=1 << 62):
            pass

    def retainSteps(
        self, groups: Iterable[Iterable[Endpoint]], batch: int = 1000
    ) -> Iterator[None]:
        """
        L{retain}, a step at a time: iterating does the work, yielding
        after each C{batch} groups of endpoints (a service's) read and each
        C{batch} endpoint states checked, so that a caller can spread the
        work of a registry of thousands of services over reactor turns.
        """
        keep: set[EndpointKey] = set()
        for index, endpoints in enumerate(groups, 1):
            keep.update((e.scheme, e.host, e.port) for e in endpoints)
            if index % batch == 0:
                yield None
        states = self._states
        for index, (key, state) in enumerate(list(states.items()), 1):
            if key not in keep and state.outstanding == 0 and states.get(key) is state:
                del states[key]
            if index % batch == 0:
                yield None

    def pick(
        self, candidates: Sequence[EndpointState], exclude: EndpointState | None = None
    ) -> EndpointState | None:
        """
        Choose an endpoint: two at random among the healthy ones, the one
        with fewer requests outstanding.  If every candidate is backing
        off, choose among all of them rather than fail.
        """
        now = self._clock.seconds()
        pool = [s for s in candidates if s is not exclude and s.downUntil <= now]
        if not pool:
            pool = [s for s in candidates if s is not exclude]
            if not pool:
                return None
        if len(pool) == 1:
            return pool[0]
        a, b = self._rng.sample(pool, 2)
        return a if a.outstanding <= b.outstanding else b

    def connectFailed(self, state: EndpointState) -> None:
        """
        Record a refused or timed-out connection: back off from C{state}.
        """
        state.failures += 1
        # The exponent is capped so the delay stays a small float however
        # long an endpoint keeps refusing.
        exponent = min(state.failures - 1, 32)
        delay = min(self._maxBackoff, self._backoff * 2.0**exponent)
        state.downUntil = self._clock.seconds() + delay

    def connected(self, state: EndpointState) -> None:
        """
        Record a successful exchange: C{state} is healthy again.
        """
        if state.failures:
            state.failures = 0
            state.downUntil = 0.0
