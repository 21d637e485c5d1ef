"""
The C{ratelimit} hook's buckets in Redis: L{RedisLimiter}, the GCRA Lua
script it runs atomically on the server's clock, and how it tells a Redis
outage from a single failure.  The Redis client itself is
L{monedge.builtin.ratelimit.redisclient}.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.logger import Logger
from twisted.python.failure import Failure

from monedge.builtin.ratelimit.algorithm import Decision, Limit
from monedge.builtin.ratelimit.memory import MemoryLimiter
from monedge.builtin.ratelimit.redisclient import (
    DEFAULT_POOL_SIZE,
    RedisAddress,
    RedisPool,
    RedisReplyError,
)

#: Every Redis key this hook writes starts with this.
KEY_PREFIX = "monedge:rl:"

#: Connections to Redis per hook (commands are pipelined over them).
REDIS_POOL_SIZE = DEFAULT_POOL_SIZE

#: Requests failed in a row that start a Redis outage.
OUTAGE_AFTER = 3

#: Seconds between PINGs during a Redis outage.
PROBE_INTERVAL = 1.0

#: GCRA, atomically, on the server's clock.  KEYS[1]: the bucket;
#: ARGV[1]: the emission interval and ARGV[2]: the tolerance (burst times
#: the interval), both in microseconds.  Returns {allowed, ahead}: 1 or 0,
#: and how far (microseconds) the bucket's theoretical arrival time is
#: ahead of now after this request.  The key expires when the bucket is
#: full again, when it is the same as no key at all.
SCRIPT = """\
if redis.replicate_commands then redis.replicate_commands() end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local new = tat + interval
if new - tolerance > now then
  return {0, tat - now}
end
redis.call('SET', KEYS[1], string.format('%.0f', new),
  'PX', math.ceil((new - now) / 1000))
return {1, new - now}
"""

#: The script's SHA-1, as EVALSHA names it.
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode("utf-8")).hexdigest()

#: What the outage lines are logged under: the name they had before the
#: hook became a package, which log filters may match.
_LOG_NAMESPACE = "monedge.builtin.ratelimit.RedisLimiter"


class RedisUnavailable(Exception):
    """
    Redis did not decide a request: it is unreachable, too slow, answered
    an error, or an outage is under way.  The hook then decides as
    C{on-redis-error} says.
    """


class RedisLimiter:
    """
    GCRA buckets in Redis, shared by every replica that uses the same
    server, with its outages told apart from single failures.

    A request Redis does not decide (no reply within the timeout, an error
    reply, a lost connection) fails alone with L{RedisUnavailable}, and a
    PING checks Redis's health.  An outage starts when that PING fails or
    after L{OUTAGE_AFTER} requests in a row have failed; during it Redis is
    not asked (requests fail at once) but PINGed every L{PROBE_INTERVAL},
    and the first good PING ends it.  One line is logged as an outage
    starts and one as it ends, nothing else.

    @ivar failures: requests decided without Redis (failed alone or during
        an outage).
    @ivar outages: how many outages started.
    @ivar down: whether an outage is under way.
    @ivar mirror: in-memory buckets kept the same as Redis's, if any.
    """

    def __init__(
        self,
        limit: Limit,
        address: RedisAddress,
        reactor: Any,
        timeout: float,
        mode: str = "open",
        mirror: MemoryLimiter | None = None,
        pool: RedisPool | None = None,
    ) -> None:
        self.limit = limit
        self.address = address
        self._reactor = reactor
        self.timeout = timeout
        self.mode = mode
        self.mirror = mirror
        self.pool = pool or RedisPool(
            reactor,
            address,
            timeout,
            setup=[("SCRIPT", "LOAD", SCRIPT)],
            size=REDIS_POOL_SIZE,
        )
        self.failures = 0
        self.outages = 0
        self.down = False
        self._consecutive = 0
        self._downSince = 0.0
        self._decidedWithout = 0
        self._checking = False
        self._probe: Any = None
        self._closed = False
        self._log = Logger(namespace=_LOG_NAMESPACE, source=self)

    def connect(self) -> None:
        """
        Open the connections now, so the first requests do not wait.
        """
        self.pool.connect()

    def close(self) -> Deferred[None]:
        """
        Stop probing and close the connections.
        """
        self._closed = True
        probe, self._probe = self._probe, None
        if probe is not None and probe.active():
            probe.cancel()
        return self.pool.close()

    def take(self, key: str) -> Deferred[Decision]:
        """
        Count one request against the bucket called C{key} (without
        L{KEY_PREFIX}).

        @return: the decision, or a failure with L{RedisUnavailable}.
        """
        if self.down:
            self.failures += 1
            self._decidedWithout += 1
            return fail(RedisUnavailable(f"Redis at {self.address} is unavailable"))
        limit = self.limit
        redisKey = f"{KEY_PREFIX}{limit}:{limit.burst}:{key}"
        args = (1, redisKey, limit.interval, limit.tolerance)
        pool = self.pool

        def noScript(reason: Failure) -> object:
            # The server forgot the script (restart, SCRIPT FLUSH, failover):
            # EVAL runs it and caches it again.
            if reason.check(RedisReplyError) and str(reason.value).startswith(
                "NOSCRIPT"
            ):
                return pool.execute("EVAL", SCRIPT, *args)
            return reason

        d: Deferred[Any] = pool.execute("EVALSHA", SCRIPT_SHA, *args)
        d.addErrback(noScript)
        d.addCallback(self._decided, key)
        d.addErrback(self._failed)
        return d

    def _decided(self, reply: object, key: str) -> Decision:
        if (
            not isinstance(reply, list)
            or len(reply) != 2
            or not all(isinstance(n, int) for n in reply)
        ):
            raise RedisReplyError(f"unexpected reply from the script: {reply!r}")
        self._consecutive = 0
        allowed, ahead = reply
        if self.mirror is not None:
            self.mirror.mirror(key, ahead)
        return Decision.fromGCRA(bool(allowed), ahead, self.limit)

    def _failed(self, reason: Failure) -> Decision:
        if reason.check(CancelledError):
            reason.raiseException()  # the hook timed out: not Redis's doing
        message = reason.getErrorMessage()
        self.failures += 1
        if self.down:
            self._decidedWithout += 1
        elif self._closed:
            pass  # closing: no outage to start or log
        else:
            self._consecutive += 1
            if self._consecutive >= OUTAGE_AFTER:
                self._startOutage(f"{self._consecutive} requests failed; {message}")
            else:
                self._check()
        raise RedisUnavailable(f"Redis at {self.address}: {message}")

    def _check(self) -> None:
        """
        PING Redis after a failed request; an outage starts if it fails.
        """
        if self._checking or self._closed:
            return
        self._checking = True

        def answered(reply: object) -> None:
            self._checking = False
            if reply != "PONG":
                failed(Failure(RedisReplyError(f"PING answered {reply!r}")))

        def failed(reason: Failure) -> None:
            self._checking = False
            if not self.down and not self._closed:
                self._startOutage(f"PING failed: {reason.getErrorMessage()}")

        self.pool.execute("PING").addCallbacks(answered, failed)

    def _startOutage(self, reason: str) -> None:
        self.down = True
        self.outages += 1
        self._downSince = self._reactor.seconds()
        # The failed requests that led here were decided without it too.
        self._decidedWithout = self._consecutive
        self._log.warn(
            "ratelimit: Redis at {address} is unavailable ({reason});"
            " {mode} until it answers a PING",
            address=str(self.address),
            reason=reason,
            mode=_OUTAGE_MODES[self.mode],
        )
        self._scheduleProbe()

    def _scheduleProbe(self) -> None:
        if not self._closed:
            self._probe = self._reactor.callLater(PROBE_INTERVAL, self._ping)

    def _ping(self) -> None:
        self._probe = None

        def answered(reply: object) -> None:
            if self._closed:
                return
            if reply == "PONG":
                self._endOutage()
            else:
                self._scheduleProbe()

        def failed(_: Failure) -> None:
            self._scheduleProbe()

        self.pool.execute("PING").addCallbacks(answered, failed)

    def _endOutage(self) -> None:
        self.down = False
        self._consecutive = 0
        self._log.info(
            "ratelimit: Redis at {address} answers again after {seconds:.1f} s;"
            " {count} requests were decided without it",
            address=str(self.address),
            seconds=self._reactor.seconds() - self._downSince,
            count=self._decidedWithout,
        )


#: How each on-redis-error mode decides during an outage, for the log.
_OUTAGE_MODES = {
    "open": "letting requests through",
    "closed": "failing requests with 500 hook_failed",
    "local": "limiting with this process's in-memory buckets",
}
