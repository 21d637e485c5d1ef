"""
The C{ratelimit} hook's buckets in this process: L{MemoryLimiter}, a
bounded LRU map of GCRA buckets on a clock.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from monedge.builtin.ratelimit.algorithm import MICRO, Decision, Limit, gcra


class MemoryLimiter:
    """
    GCRA buckets in this process, on C{clock}, in a bounded LRU map.

    @ivar evicted: buckets dropped to stay within C{maxKeys}.
    """

    def __init__(self, limit: Limit, clock: Callable[[], float], maxKeys: int) -> None:
        self.limit = limit
        self._clock = clock
        self.maxKeys = maxKeys
        self._buckets: OrderedDict[str, int] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str) -> Decision:
        """
        Count one request against C{key}'s bucket.
        """
        now = self._now()
        allowed, new, ahead = gcra(self._buckets.get(key), now, self.limit)
        if allowed:
            self._store(key, new)
        elif key in self._buckets:
            self._buckets.move_to_end(key)
        return Decision.fromGCRA(allowed, ahead, self.limit)

    def mirror(self, key: str, ahead: int) -> None:
        """
        Make C{key}'s bucket what Redis said it is: its theoretical arrival
        time C{ahead} microseconds from now.  Mirrored buckets are what
        C{on-redis-error: local} continues from when Redis goes away.
        """
        now = self._now()
        if ahead > 0:
            self._store(key, now + ahead)
        else:
            self._buckets.pop(key, None)

    def _now(self) -> int:
        now = round(self._clock() * MICRO)
        buckets = self._buckets
        # A bucket that has filled up again is the same as none: drop a few
        # from the cold end each time, so idle keys go without a sweep.
        for _ in range(2):
            oldest = next(iter(buckets.items()), None)
            if oldest is None or oldest[1] > now:
                break
            del buckets[oldest[0]]
        return now

    def _store(self, key: str, tat: int) -> None:
        buckets = self._buckets
        buckets[key] = tat
        buckets.move_to_end(key)
        while len(buckets) > self.maxKeys:
            buckets.popitem(last=False)
            self.evicted += 1
