"""
The generic cell rate algorithm (GCRA) the C{ratelimit} hook limits with: a
configured L{Limit}, one request's L{Decision}, and L{gcra} itself, the
arithmetic the Redis script runs too.  Times are whole microseconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: Microseconds in a second.
MICRO = 1_000_000

#: Seconds in each unit a rate may be given in.
UNITS = {"s": 1, "m": 60, "h": 3600}


@dataclass(frozen=True)
class Limit:
    """
    A configured rate: C{count} requests per C{unit}, up to C{burst} at
    once.
    """

    count: int
    unit: str
    burst: int

    @property
    def period(self) -> int:
        """
        The unit in seconds.
        """
        return UNITS[self.unit]

    @property
    def interval(self) -> int:
        """
        The emission interval (one request earned back), in microseconds.
        """
        return max(1, round(self.period * MICRO / self.count))

    @property
    def tolerance(self) -> int:
        """
        How far ahead of now a bucket may run, in microseconds: a full
        bucket lets exactly C{burst} requests through at once.
        """
        return self.interval * self.burst

    def __str__(self) -> str:
        return f"{self.count}/{self.unit}"


@dataclass(frozen=True)
class Decision:
    """
    One request's outcome.

    @ivar allowed: whether it may pass.
    @ivar remaining: how many more requests would pass right now.
    @ivar wait: whole seconds, at least 1, until one more request is
        earned: for a refused request, when to retry.
    """

    allowed: bool
    remaining: int
    wait: int

    @classmethod
    def fromGCRA(cls, allowed: bool, ahead: int, limit: Limit) -> Decision:
        """
        The decision for a bucket whose theoretical arrival time is
        C{ahead} microseconds ahead of now after the request.
        """
        room = limit.tolerance - ahead
        remaining = max(0, room // limit.interval)
        # (remaining + 1) * interval > room always: wait is positive.
        waitMicros = (remaining + 1) * limit.interval - room
        return cls(allowed, remaining, max(1, math.ceil(waitMicros / MICRO)))


def gcra(tat: int | None, now: int, limit: Limit) -> tuple[bool, int, int]:
    """
    The generic cell rate algorithm, as the Redis script runs it.

    @param tat: the bucket's theoretical arrival time, or L{None} for a new
        bucket; microseconds, like C{now}.
    @return: whether the request passes, the bucket's new theoretical
        arrival time, and how far that is ahead of now.
    """
    if tat is None or tat < now:
        tat = now
    new = tat + limit.interval
    if new - limit.tolerance > now:
        return False, tat, tat - now
    return True, new, new - now
