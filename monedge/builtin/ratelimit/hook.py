"""
The C{ratelimit} hook itself: L{RateLimitHook}, which keys each request to
a bucket, refuses it with 429 over the limit and tells every client its
quota in RateLimit fields; with Redis, it decides as C{on-redis-error} says
when Redis did not.
"""

from __future__ import annotations

import hashlib
import itertools

import jwt
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from monedge.builtin.ratelimit.algorithm import Decision
from monedge.builtin.ratelimit.memory import MemoryLimiter
from monedge.builtin.ratelimit.redisstore import RedisLimiter, RedisUnavailable
from monedge.hooks import HookResponse
from monedge.interfaces import (
    IHookRequest,
    IHookResponse,
    IRequestHook,
    IResponseHook,
)
from monedge.rules.syntax import bearerToken

#: Key values longer than this are replaced by a digest.
MAX_KEY_VALUE = 64


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
