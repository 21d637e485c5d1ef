"""
The C{ratelimit} hook's options (see L{monedge.builtin.ratelimit}) and
L{RateLimitHookFactory}, which checks them and builds a hook on the
memory or the Redis buckets.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from monedge.builtin.ratelimit.algorithm import MICRO, UNITS, Limit
from monedge.builtin.ratelimit.hook import RateLimitHook
from monedge.builtin.ratelimit.memory import MemoryLimiter
from monedge.builtin.ratelimit.metrics import collectorFor
from monedge.builtin.ratelimit.redisclient import RedisAddress
from monedge.builtin.ratelimit.redisstore import RedisLimiter
from monedge.hooks import DEFAULT_HOOK_TIMEOUT, HookConfigError
from monedge.interfaces import IHookFactory
from monedge.rules.syntax import isToken, parseDuration

#: The most in-memory buckets kept, unless C{max-keys} says otherwise.
DEFAULT_MAX_KEYS = 100_000

#: Seconds to wait for a reply from Redis, from the command's write,
#: unless C{redis-timeout} says otherwise.
DEFAULT_REDIS_TIMEOUT = 0.25

_RATE = re.compile(r"\s*(\d+)\s*/\s*(s|m|h)\s*\Z", re.ASCII)
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}\Z")
_MAX_BURST = 10_000_000
_MAX_KEYS = 10_000_000

#: Every option the hook reads.
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
    if not 1 <= count <= UNITS[unit] * MICRO:
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
        A hook from C{options} (see L{monedge.builtin.ratelimit}), timed by
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
            collectorFor(metrics.registry).hooks.add(hook)
        return hook
