"""
The C{ratelimit} hook: a GCRA rate limit per client, header value, JWT
subject or service, kept in this process or shared by every replica through
Redis.

    hooks:
      - name: ratelimit
        options:
          rate: 600/m              # required: COUNT/s, COUNT/m or COUNT/h
          burst: 20                # default: the rate's COUNT
          key: client              # client | header:<Name> | jwt-subject | service
          scope: service           # service | global
          redis: redis://redis.monedge:6379/0   # default: in this process
          on-redis-error: open     # open | closed | local
          redis-timeout: 250ms
          max-keys: 100000         # in-memory buckets kept at most
          name: default            # the policy's name in the RateLimit fields

Options:

  - C{rate} (string, required): the sustained rate, C{COUNT/UNIT} with a
    whole COUNT of 1 or more and a UNIT of C{s}, C{m} or C{h}.  One request
    is earned back every UNIT/COUNT (the emission interval).
  - C{burst} (whole number, default: the rate's COUNT): the most requests
    that may pass at once, from a bucket that has been idle long enough to
    be full.  C{rate: 600/m, burst: 10} lets 10 through at once, then one
    every 100 ms.
  - C{key} (string, default C{client}): what a bucket is keyed by.
      - C{client}: the client's address as monedge resolved it with
        C{--trusted-hops}, i.e. the first address of the X-Forwarded-For
        monedge sends upstream (with no trusted hops, the TCP peer).  The
        TCP peer itself is used if that header is absent.
      - C{header:<Name>}: the first value of the request header C{Name}, as
        it will be sent upstream (so a header an earlier hook set, such as
        an authenticated user id, counts and a client's copy it removed
        does not).  Requests without the header are keyed by the client
        address, never all together: anonymous clients cannot exhaust one
        shared bucket.  A client can choose a header's value: key on a
        header only if something before monedge, or an earlier hook, sets
        it.
      - C{jwt-subject}: the C{sub} claim of the C{Authorization: Bearer}
        JWT the client sent, read WITHOUT verifying the token.  Anyone can
        mint a token with any subject, so this is only trustworthy when an
        authentication hook that verifies the token runs first (a global
        hook, or earlier in the service's list).  Requests without a
        readable Bearer JWT with a string C{sub} are keyed by the client
        address.
      - C{service}: one bucket for the whole service.
  - C{scope} (string, default C{service}): C{service} keeps separate
    buckets per service (a global hook then limits each client on each
    service); C{global} shares them across every service that runs this
    hook configuration (a global hook then limits each client proxy-wide).
    Hooks with equal options are built once and shared, so without the
    service in the key two services configured alike would share buckets.
  - C{redis} (string, default none): C{redis://[[user]:password@]host
    [:port][/db]} (port 6379, db 0 by default).  Without it, buckets are
    kept in this process: each replica then limits on its own.  With it,
    every replica shares each bucket through one atomic Lua script (one
    EVALSHA round trip per request, pipelined with concurrent requests'
    over a pool of REDIS_POOL_SIZE connections, by L{monedge.redisclient}),
    timed by the Redis server's clock so that replicas with skewed clocks
    agree.  Keys are
    C{monedge:rl:<COUNT/UNIT>:<burst>:<scope>:<key>} and expire as soon as
    their bucket is full again, so Redis holds only active buckets.  Hook
    options are shown on the admin C{/routes} page: prefer a Redis without
    a password, reachable only from monedge.
  - C{on-redis-error} (string, default C{open}): how a request Redis did
    not decide is decided (no reply within C{redis-timeout}, an error
    reply, a lost or refused connection, or an outage under way).
    C{open} lets it through (without RateLimit fields); C{closed} answers
    500 C{hook_failed}; C{local} decides it with in-memory buckets in this
    process, with the same limit, carried on from what Redis last said
    about each bucket this process saw (each replica then limits on its
    own).  A failure alone fails only its request, and PINGs Redis.  An
    outage starts when that PING fails or after OUTAGE_AFTER (3) requests
    in a row failed; during it Redis is not asked (requests are decided at
    once) but PINGed every PROBE_INTERVAL (1 s), and the first PONG ends
    it.  One warning is logged as an outage starts and one info line as it
    ends (with how many requests were decided without Redis), and nothing
    else: no traceback, no line per request.
  - C{redis-timeout} (duration, default C{250ms}): how long a command may
    wait for its reply, from its write to Redis (written at once, not on
    the reactor's next turn).  A deadline is judged only after monedge has
    read what Redis sent, so time monedge spent on other work is never
    taken for a slow Redis.  A request that finds no open connection is
    timed from when it asked: waiting for a connection counts.  Must be
    below the hook timeout.
  - C{max-keys} (whole number, default 100000): the most in-memory buckets
    kept.  Buckets that have filled up again are dropped as requests come;
    beyond the cap the least recently used bucket is dropped (its client
    starts afresh), so memory stays bounded under any number of keys.
  - C{name} (string, default C{default}): the policy name in the RateLimit
    fields (letters, digits, C{.}, C{_}, C{-}).

Over the limit, the hook answers 429 C{rate_limited} with the fields of
draft-ietf-httpapi-ratelimit-headers (draft 11, structured form) and
C{Retry-After}:

    Retry-After: 6
    RateLimit-Policy: "default";q=10;w=60
    RateLimit: "default";r=0;t=6

C{q} and C{w} are the configured rate (COUNT per UNIT in seconds);
C{;monedge-burst=N} is added when the burst differs from COUNT.  C{r} is
how many more requests would pass right now; C{t} is how many seconds
(rounded up, at least 1) until one more is earned: the client can use no
more than C{r} within C{t}.  On a 429 C{t} equals C{Retry-After}.  Allowed
requests get the same C{RateLimit-Policy} and C{RateLimit} fields on their
response.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from monedge.hooks import DEFAULT_HOOK_TIMEOUT, HookConfigError, HookResponse
from monedge.interfaces import (
    IHookFactory,
    IHookRequest,
    IHookResponse,
    IRequestHook,
    IResponseHook,
)
from monedge.policy import parseDuration
from monedge.redisclient import (
    DEFAULT_POOL_SIZE,
    RedisAddress,
    RedisPool,
    RedisReplyError,
)
from monedge.syntax import bearerToken, isToken

#: Every Redis key this hook writes starts with this.
KEY_PREFIX = "monedge:rl:"

#: The most in-memory buckets kept, unless C{max-keys} says otherwise.
DEFAULT_MAX_KEYS = 100_000

#: Seconds to wait for a reply from Redis, from the command's write,
#: unless C{redis-timeout} says otherwise.
DEFAULT_REDIS_TIMEOUT = 0.25

#: Connections to Redis per hook (commands are pipelined over them).
REDIS_POOL_SIZE = DEFAULT_POOL_SIZE

#: Requests failed in a row that start a Redis outage.
OUTAGE_AFTER = 3

#: Seconds between PINGs during a Redis outage.
PROBE_INTERVAL = 1.0

#: Key values longer than this are replaced by a digest.
MAX_KEY_VALUE = 64

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

_MICRO = 1_000_000
_UNITS = {"s": 1, "m": 60, "h": 3600}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(s|m|h)\s*\Z", re.ASCII)
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_MAX_BURST = 10_000_000
_MAX_KEYS = 10_000_000

OPTIONS = (
    "rate",
    "burst",
    "key",
    "scope",
    "redis",
    "on-redis-error",
    "redis-timeout",
    "max-keys",
    "name",
)


class RedisUnavailable(Exception):
    """
    Redis did not decide a request: it is unreachable, too slow, answered
    an error, or an outage is under way.  The hook then decides as
    C{on-redis-error} says.
    """


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
        return _UNITS[self.unit]

    @property
    def interval(self) -> int:
        """
        The emission interval (one request earned back), in microseconds.
        """
        return max(1, round(self.period * _MICRO / self.count))

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
        return cls(allowed, remaining, max(1, math.ceil(waitMicros / _MICRO)))


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
        now = round(self._clock() * _MICRO)
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

    _log = Logger()

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


def _bounded(value: str) -> str:
    """
    C{value}, or a digest of it if it is long, so keys stay small.
    """
    if len(value) <= MAX_KEY_VALUE:
        return value
    return "sha256:" + hashlib.sha256(value.encode("utf-8", "replace")).hexdigest()[:32]


def _clientAddress(request: IHookRequest) -> str:
    forwarded = request.upstreamHeaders.getRawHeaders(b"x-forwarded-for")
    if forwarded:
        first = forwarded[0].split(b",", 1)[0].strip()
        if first:
            return first.decode("latin-1")
    return request.clientAddress


def _bearerSubject(headers: Headers) -> str | None:
    token = bearerToken(headers.getRawHeaders(b"authorization"))
    if not token:
        return None
    try:
        claims = jwt.decode(token.decode("ascii"), options={"verify_signature": False})
    except (jwt.PyJWTError, UnicodeDecodeError, ValueError):
        return None
    subject = claims.get("sub") if isinstance(claims, dict) else None
    return subject if isinstance(subject, str) and subject else None


_slots = itertools.count()


@implementer(IRequestHook, IResponseHook)
class RateLimitHook:
    """
    Refuses requests over the limit with 429, and tells every client its
    remaining quota in RateLimit fields.

    @ivar limiter: where the buckets are (L{MemoryLimiter} or
        L{RedisLimiter}).
    @ivar onRedisError: how a request Redis did not decide is decided:
        C{open}, C{closed} or C{local}.
    @ivar local: the in-memory buckets C{local} decides with.
    @ivar allowed: requests let through with a decision.
    @ivar limited: requests refused with 429.
    """

    def __init__(
        self,
        limiter: MemoryLimiter | RedisLimiter,
        key: str,
        scope: str,
        onRedisError: str,
        name: str,
    ) -> None:
        self.limiter = limiter
        self.limit = limiter.limit
        self.key = key
        self.scope = scope
        self.onRedisError = onRedisError
        self.local = limiter.mirror if isinstance(limiter, RedisLimiter) else None
        self.name = name
        self.allowed = 0
        self.limited = 0
        # Where a request's decision waits for its response (see onResponse).
        self._slot = f"_monedge_ratelimit_{next(_slots)}"
        limit = self.limit
        policy = f'"{name}";q={limit.count};w={limit.period}'
        if limit.burst != limit.count:
            policy += f";monedge-burst={limit.burst}"
        self.policyField = policy.encode("ascii")

    def bucketKey(self, request: IHookRequest) -> str:
        """
        The bucket C{request} counts against: C{<scope>:<kind>:<value>},
        the scope being the service or C{*}.
        """
        scope = request.service if self.scope == "service" else "*"
        key = self.key
        if key == "service":
            return f"{scope}:service:{request.service}"
        if key == "jwt-subject":
            subject = _bearerSubject(request.headers)
            if subject is not None:
                return f"{scope}:sub:{_bounded(subject)}"
        elif key.startswith("header:"):
            name = key[len("header:") :]
            values = request.upstreamHeaders.getRawHeaders(name.encode("ascii"))
            if values:
                value = _bounded(values[0].decode("latin-1"))
                return f"{scope}:header:{name.lower()}:{value}"
        return f"{scope}:client:{_bounded(_clientAddress(request))}"

    def fields(self, decision: Decision) -> list[tuple[bytes, bytes]]:
        """
        The RateLimit-Policy and RateLimit fields for C{decision}.
        """
        return [
            (b"RateLimit-Policy", self.policyField),
            (
                b"RateLimit",
                f'"{self.name}";r={decision.remaining};t={decision.wait}'.encode(
                    "ascii"
                ),
            ),
        ]

    def onRequest(
        self, request: IHookRequest
    ) -> HookResponse | None | Deferred[HookResponse | None]:
        """
        Count the request against its bucket: pass (C{None}), or answer
        429 C{rate_limited}.  With Redis, a L{Deferred} of either.
        """
        key = self.bucketKey(request)
        limiter = self.limiter
        if isinstance(limiter, MemoryLimiter):
            return self._decided(request, limiter.take(key))
        return limiter.take(key).addCallbacks(
            lambda decision: self._decided(request, decision),
            lambda reason: self._withoutRedis(request, key, reason),
        )

    def _decided(
        self, request: IHookRequest, decision: Decision
    ) -> HookResponse | None:
        if decision.allowed:
            self.allowed += 1
            try:
                request.state[self._slot] = decision
            except (AttributeError, TypeError):
                pass  # a request object that takes no attributes: no fields
            return None
        self.limited += 1
        return HookResponse.error(
            429,
            "rate_limited",
            f"too many requests: the limit is {self.limit};"
            f" retry after {decision.wait} s",
            headers=[
                (b"Retry-After", b"%d" % (decision.wait,)),
                *self.fields(decision),
            ],
        )

    def _withoutRedis(
        self, request: IHookRequest, key: str, reason: Failure
    ) -> HookResponse | None:
        """
        Decide a request Redis did not decide, as C{on-redis-error} says.
        """
        reason.trap(RedisUnavailable)
        if self.onRedisError == "local" and self.local is not None:
            return self._decided(request, self.local.take(key))
        if self.onRedisError == "closed":
            # Answered here rather than raised: the hook chain would log a
            # traceback or a line for every request of an outage.
            return HookResponse.error(
                500, "hook_failed", "the ratelimit hook could not reach its Redis"
            )
        return None

    def onResponse(self, request: IHookRequest, response: IHookResponse) -> None:
        """
        Add the RateLimit-Policy and RateLimit fields of the request's
        decision, if it had one (not when Redis was unavailable).
        """
        decision = request.state.get(self._slot)
        if isinstance(decision, Decision):
            for name, value in self.fields(decision):
                response.headers.addRawHeader(name, value)

    def stats(self) -> dict[str, int]:
        """
        Counters, until monedge gives hooks its metrics registry:
        C{allowed}, C{limited}, C{redis_errors} (requests Redis did not
        decide: failed alone or during an outage), C{redis_outages}
        (outages started), C{keys} (in-memory buckets: with Redis, those
        C{on-redis-error: local} keeps) and C{evicted} (in-memory buckets
        dropped at the cap).
        """
        counts = {"allowed": self.allowed, "limited": self.limited}
        limiter = self.limiter
        if isinstance(limiter, MemoryLimiter):
            counts.update(
                redis_errors=0,
                redis_outages=0,
                keys=len(limiter),
                evicted=limiter.evicted,
            )
        else:
            local = limiter.mirror
            counts.update(
                redis_errors=limiter.failures,
                redis_outages=limiter.outages,
                keys=0 if local is None else len(local),
                evicted=0 if local is None else local.evicted,
            )
        return counts

    def close(self) -> Deferred[None]:
        """
        Close the Redis connections, if any (monedge does not yet stop
        hooks; tests do).
        """
        if isinstance(self.limiter, RedisLimiter):
            return self.limiter.close()
        done: Deferred[None] = Deferred()
        done.callback(None)
        return done


def _wholeNumber(options: Mapping[str, Any], name: str, default: int, most: int) -> int:
    value = options.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise HookConfigError(
            f"{name}: expected a whole number from 1 to {most}, got {value!r}"
        )
    return value


def _choice(
    options: Mapping[str, Any], name: str, default: str, known: tuple[str, ...]
) -> str:
    value = options.get(name, default)
    if value not in known:
        raise HookConfigError(
            f"{name}: expected one of {', '.join(known)}, got {value!r}"
        )
    return str(value)


def parseLimit(options: Mapping[str, Any]) -> Limit:
    """
    The C{rate} and C{burst} options.

    @raise HookConfigError: naming the option that is wrong.
    """
    if "rate" not in options:
        raise HookConfigError("rate: required, e.g. '100/s', '600/m' or '10000/h'")
    rate = options["rate"]
    match = _RATE.match(rate) if isinstance(rate, str) else None
    if match is None:
        raise HookConfigError(
            f"rate: expected COUNT/s, COUNT/m or COUNT/h (e.g. '600/m'), got {rate!r}"
        )
    count, unit = int(match.group(1)), match.group(2)
    if not 1 <= count <= _UNITS[unit] * _MICRO:
        raise HookConfigError(
            f"rate: the count must be from 1 to one a microsecond, got {rate!r}"
        )
    burst = _wholeNumber(options, "burst", min(count, _MAX_BURST), _MAX_BURST)
    return Limit(count, unit, burst)


def parseKey(value: object) -> str:
    """
    The C{key} option.

    @raise HookConfigError: naming the option.
    """
    if value in ("client", "service", "jwt-subject"):
        return str(value)
    if isinstance(value, str) and value.startswith("header:"):
        name = value[len("header:") :]
        if isToken(name):
            return value
        raise HookConfigError(f"key: invalid header name {name!r}")
    raise HookConfigError(
        f"key: expected client, header:<Name>, jwt-subject or service, got {value!r}"
    )


@implementer(IHookFactory, IPlugin)
class RateLimitHookFactory:
    """
    Makes C{ratelimit} hooks.
    """

    name = "ratelimit"
    description = (
        "Limit request rates per client, header, JWT subject or service,"
        " in memory or shared through Redis."
    )

    def build(self, options: Mapping[str, Any], context: Any) -> RateLimitHook:
        """
        A hook from C{options} (see the module docstring), timed by
        C{context.reactor}.

        @raise HookConfigError: naming the option that is wrong.
        """
        if not isinstance(options, Mapping):
            raise HookConfigError(f"expected a mapping of options, got {options!r}")
        extra = set(options) - set(OPTIONS)
        if extra:
            raise HookConfigError(
                f"unknown option {sorted(map(str, extra))[0]!r}"
                f" (known: {', '.join(OPTIONS)})"
            )
        limit = parseLimit(options)
        key = parseKey(options.get("key", "client"))
        scope = _choice(options, "scope", "service", ("service", "global"))
        onRedisError = _choice(
            options, "on-redis-error", "open", ("open", "closed", "local")
        )
        name = options.get("name", "default")
        if not isinstance(name, str) or not _NAME.match(name):
            raise HookConfigError(
                f"name: expected 1 to 64 letters, digits, '.', '_' or '-', got {name!r}"
            )
        maxKeys = _wholeNumber(options, "max-keys", DEFAULT_MAX_KEYS, _MAX_KEYS)
        hookTimeout = float(getattr(context, "timeout", DEFAULT_HOOK_TIMEOUT))
        try:
            timeout = parseDuration(options.get("redis-timeout", DEFAULT_REDIS_TIMEOUT))
        except ValueError as e:
            raise HookConfigError(f"redis-timeout: {e}") from None
        if timeout >= hookTimeout:
            raise HookConfigError(
                f"redis-timeout: must be below the hook timeout ({hookTimeout:g} s),"
                f" got {timeout:g} s"
            )
        reactor = context.reactor
        limiter: MemoryLimiter | RedisLimiter
        if options.get("redis") is None:
            limiter = MemoryLimiter(limit, reactor.seconds, maxKeys)
        else:
            try:
                address = RedisAddress.parse(options["redis"])
            except ValueError as e:
                raise HookConfigError(f"redis: {e}") from None
            mirror = None
            if onRedisError == "local":
                mirror = MemoryLimiter(limit, reactor.seconds, maxKeys)
            limiter = RedisLimiter(
                limit, address, reactor, timeout, onRedisError, mirror
            )
            # Connect once the reactor runs (after twistd has daemonized),
            # so the first request does not wait for the connection.
            whenRunning = getattr(reactor, "callWhenRunning", None)
            if whenRunning is not None:
                whenRunning(limiter.connect)
        hook = RateLimitHook(limiter, key, scope, onRedisError, name)
        metrics = getattr(context, "metrics", None)
        if metrics is not None:
            _collectorFor(metrics.registry).hooks.add(hook)
        return hook


class _RateLimitCollector(Collector):
    """
    Every ratelimit hook's counters, read at scrape time, by policy name.
    """

    def __init__(self) -> None:
        self.hooks: weakref.WeakSet[RateLimitHook] = weakref.WeakSet()

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "monedge_ratelimit_decisions",
            "Rate-limit decisions, by policy name and decision.",
            labels=["policy", "decision"],
        )
        errors = CounterMetricFamily(
            "monedge_ratelimit_redis_errors",
            "Requests decided without Redis because it failed, by policy.",
            labels=["policy"],
        )
        outages = CounterMetricFamily(
            "monedge_ratelimit_redis_outages",
            "Times Redis became unreachable, by policy.",
            labels=["policy"],
        )
        buckets = GaugeMetricFamily(
            "monedge_ratelimit_buckets",
            "In-memory buckets held, by policy.",
            labels=["policy"],
        )
        totals: dict[str, dict[str, int]] = {}
        for hook in list(self.hooks):
            mine = totals.setdefault(hook.name, {})
            for counter, value in hook.stats().items():
                mine[counter] = mine.get(counter, 0) + value
        for policy, counts in sorted(totals.items()):
            decisions.add_metric([policy, "allowed"], counts.get("allowed", 0))
            decisions.add_metric([policy, "limited"], counts.get("limited", 0))
            errors.add_metric([policy], counts.get("redis_errors", 0))
            outages.add_metric([policy], counts.get("redis_outages", 0))
            buckets.add_metric([policy], counts.get("keys", 0))
        yield decisions
        yield errors
        yield outages
        yield buckets


_collectors: weakref.WeakKeyDictionary[Any, _RateLimitCollector] = (
    weakref.WeakKeyDictionary()
)


def _collectorFor(registry: Any) -> _RateLimitCollector:
    """
    The one collector registered on C{registry} for every ratelimit hook.
    """
    collector = _collectors.get(registry)
    if collector is None:
        collector = _collectors[registry] = _RateLimitCollector()
        registry.register(collector)
    return collector
