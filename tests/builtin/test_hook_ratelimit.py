"""
The C{ratelimit} hook: its options, GCRA arithmetic and keys on a fake
clock; its Redis outage handling on a memory reactor and a fake Redis; the
same limiter contract against the in-memory and the Redis buckets; Redis
outages and a busy reactor against a real C{redis-server}; and real
C{twistd monedge} processes sharing one.  The Redis client it uses is
tested in L{tests.builtin.test_redisclient}.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jwt
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, formatEvent, globalLogPublisher
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer
from zope.interface.verify import verifyObject

from monedge.builtin.ratelimit import (
    KEY_PREFIX,
    OUTAGE_AFTER,
    REDIS_POOL_SIZE,
    SCRIPT_SHA,
    Limit,
    RateLimitHook,
    RedisLimiter,
    gcra,
)
from monedge.hooks import (
    HookConfigError,
    HookContext,
    HookResponse,
    HookResponseHead,
    HookSet,
    availableFactories,
)
from monedge.interfaces import IHookFactory, IRequestHook, IResponseHook
from monedge.rules.policy import HookSpec
from monedge.testing import ProxyProcess, freePort
from monedge.testing.hooks import HookOutcome, buildHook, hookRequest, runHooks
from tests.builtin.test_redisclient import BusyReactor, FakeRedis
from tests.e2e import ProxyTestCase
from tests.redis_server import SKIP_REASON, RedisServer

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object

_FIELD = re.compile(rb'"(?P<name>[^"]+)";r=(?P<r>\d+);t=(?P<t>\d+)\Z')

SECRET = "a test secret that is long enough for HS256"


def memoryHook(options: Mapping[str, Any], clock: Clock | None = None) -> RateLimitHook:
    """
    A ratelimit hook built as monedge builds it, on C{clock}.
    """
    hook = buildHook("ratelimit", options, HookContext(reactor=clock or Clock()))
    assert isinstance(hook, RateLimitHook)
    return hook


def redisLimiter(hook: RateLimitHook) -> RedisLimiter:
    """
    C{hook}'s limiter, which keeps its buckets in Redis.
    """
    assert isinstance(hook.limiter, RedisLimiter)
    return hook.limiter


def header(response: HookResponse, name: bytes) -> bytes:
    """
    The one value of header C{name} in a hook's answer.
    """
    [value] = [v for n, v in response.headers if n.lower() == name.lower()]
    return value


def field(value: bytes) -> tuple[str, int, int]:
    """
    A RateLimit field value as (policy name, r, t).
    """
    match = _FIELD.match(value)
    assert match is not None, value
    return match["name"].decode(), int(match["r"]), int(match["t"])


def only(headers: Headers, name: bytes) -> bytes:
    """
    The one value of header C{name}.
    """
    values = headers.getRawHeaders(name)
    assert values is not None and len(values) == 1, values
    return values[0]


def bearer(subject: str) -> dict[bytes, list[bytes]]:
    """
    Request headers with a Bearer JWT whose subject is C{subject}.
    """
    token = jwt.encode({"sub": subject}, SECRET, algorithm="HS256")
    return {b"authorization": [b"Bearer " + token.encode()]}


def take(
    hook: RateLimitHook, clock: Clock | None = None, **request: Any
) -> HookOutcome:
    """
    Run C{hook} on one request (with a 200 response to run onResponse on)
    and return what happened; for hooks that answer at once.
    """
    outcomes: list[HookOutcome] = []
    runHooks(
        [hook], hookRequest(**request), HookResponseHead(200, Headers()), clock
    ).addCallback(outcomes.append)
    [outcome] = outcomes
    return outcome


@implementer(ILogObserver)
class LogCapture:
    """
    Collects the ratelimit hook's own log events.
    """

    def __init__(self) -> None:
        self.events: list[Mapping[str, Any]] = []

    def __call__(self, event: Mapping[str, Any]) -> None:
        if str(event.get("log_namespace", "")).startswith("monedge.builtin.ratelimit"):
            self.events.append(event)

    def levels(self) -> list[LogLevel]:
        """
        The level of every event, in order.
        """
        return [event["log_level"] for event in self.events]

    def formatted(self) -> list[str]:
        """
        Every event's text, in order.
        """
        return [formatEvent(dict(event)) for event in self.events]


class PluginTests(SynchronousTestCase):
    """
    The plugin is found by name and provides the hook interfaces.
    """

    def test_factoryFound(self) -> None:
        """
        The plugin path offers a C{ratelimit} factory that provides
        IHookFactory and IPlugin.
        """
        factory = availableFactories()["ratelimit"]
        self.assertTrue(verifyObject(IHookFactory, factory))
        self.assertTrue(IPlugin.providedBy(factory))
        self.assertEqual(factory.name, "ratelimit")
        self.assertTrue(factory.description)

    def test_hookInterfaces(self) -> None:
        """
        The hook is both a request hook and a response hook.
        """
        hook = memoryHook({"rate": "10/m"})
        self.assertTrue(verifyObject(IRequestHook, hook))
        self.assertTrue(verifyObject(IResponseHook, hook))


class OptionTests(SynchronousTestCase):
    """
    build() refuses bad options with a HookConfigError naming the option.
    """

    def assertRefused(self, options: Mapping[str, Any], option: str) -> None:
        """
        C{options} are refused with a reason that starts with C{option}.
        """
        with self.assertRaises(HookConfigError) as caught:
            memoryHook(options)
        self.assertTrue(str(caught.exception).startswith(option), str(caught.exception))

    def test_badOptions(self) -> None:
        """
        Each invalid value is refused, naming its option.
        """
        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "rate"),
            ({"rate": 10}, "rate"),
            ({"rate": "10"}, "rate"),
            ({"rate": "10/d"}, "rate"),
            ({"rate": "0/s"}, "rate"),
            ({"rate": "-1/s"}, "rate"),
            ({"rate": "2000000/s"}, "rate"),
            ({"rate": "1.5/s"}, "rate"),
            ({"rate": "10/m", "burst": 0}, "burst"),
            ({"rate": "10/m", "burst": "5"}, "burst"),
            ({"rate": "10/m", "burst": True}, "burst"),
            ({"rate": "10/m", "burst": 2.5}, "burst"),
            ({"rate": "10/m", "key": "ip"}, "key"),
            ({"rate": "10/m", "key": "header:"}, "key"),
            ({"rate": "10/m", "key": "header:Bad Name"}, "key"),
            ({"rate": "10/m", "key": ["client"]}, "key"),
            ({"rate": "10/m", "scope": "cluster"}, "scope"),
            ({"rate": "10/m", "redis": "http://h:6379/0"}, "redis"),
            ({"rate": "10/m", "redis": "redis://:6379/0"}, "redis"),
            ({"rate": "10/m", "redis": "redis://h:99999/0"}, "redis"),
            ({"rate": "10/m", "redis": "redis://h:6379/x"}, "redis"),
            ({"rate": "10/m", "redis": "redis://h:6379/0?a=b"}, "redis"),
            ({"rate": "10/m", "redis": 6379}, "redis"),
            ({"rate": "10/m", "on-redis-error": "ignore"}, "on-redis-error"),
            ({"rate": "10/m", "redis-timeout": "soon"}, "redis-timeout"),
            ({"rate": "10/m", "redis-timeout": "0s"}, "redis-timeout"),
            ({"rate": "10/m", "redis-timeout": "5s"}, "redis-timeout"),
            ({"rate": "10/m", "max-keys": 0}, "max-keys"),
            ({"rate": "10/m", "name": 'de"fault'}, "name"),
            ({"rate": "10/m", "name": ""}, "name"),
            ({"rate": "10/m", "bucket": "x"}, "unknown option 'bucket'"),
        ]
        for options, option in cases:
            with self.subTest(options=options):
                self.assertRefused(options, option)

    def test_redisTimeoutBelowHookTimeout(self) -> None:
        """
        redis-timeout must be below the configured hook timeout, so that a
        slow Redis fails open rather than failing the hook.
        """
        context = HookContext(reactor=Clock(), timeout=1.0)
        with self.assertRaises(HookConfigError) as caught:
            buildHook("ratelimit", {"rate": "1/s", "redis-timeout": "1s"}, context)
        self.assertIn("redis-timeout", str(caught.exception))
        buildHook("ratelimit", {"rate": "1/s", "redis-timeout": "500ms"}, context)

    def test_hookSetNamesTheHook(self) -> None:
        """
        Through monedge's HookSet, the reason names the hook and the option.
        """
        hooks = HookSet(HookContext(reactor=Clock()))
        with self.assertRaises(HookConfigError) as caught:
            hooks.build(HookSpec("ratelimit", json.dumps({"rate": "fast"})))
        self.assertTrue(str(caught.exception).startswith("hook ratelimit: rate:"))

    def test_defaults(self) -> None:
        """
        burst defaults to the rate's count; key to client, scope to
        service, on-redis-error to open, the policy name to "default";
        without redis the buckets are in memory.
        """
        hook = memoryHook({"rate": "600/m"})
        self.assertEqual(hook.limit.burst, 600)
        self.assertEqual(hook.limit.interval, 100_000)
        self.assertEqual(hook.key, "client")
        self.assertEqual(hook.scope, "service")
        self.assertEqual(hook.onRedisError, "open")
        self.assertEqual(hook.name, "default")
        self.assertEqual(hook.stats()["keys"], 0)

    def test_validRedisURLs(self) -> None:
        """
        redis URLs may omit the port and database, and carry credentials;
        building does not connect without a running reactor.
        """
        hook = memoryHook({"rate": "1/s", "redis": "redis://:s%40cret@cache"})
        limiter = redisLimiter(hook)
        self.assertEqual(str(limiter.address), "cache:6379/0")
        self.assertEqual(limiter.address.password, "s@cret")
        self.assertEqual(limiter.pool.connections, [])

    def test_onRedisError(self) -> None:
        """
        on-redis-error is open, closed or local; only local keeps
        in-memory buckets beside Redis.
        """
        for mode in ["open", "closed", "local"]:
            with self.subTest(mode=mode):
                hook = memoryHook(
                    {"rate": "1/s", "redis": "redis://cache", "on-redis-error": mode}
                )
                self.assertEqual(hook.onRedisError, mode)
                self.assertEqual(hook.local is not None, mode == "local")


class GCRATests(SynchronousTestCase):
    """
    The in-memory limiter's arithmetic, on a fake clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def test_burstThenRetryAfter(self) -> None:
        """
        With 10/m and burst 10, exactly 10 requests pass at once; the 11th
        is refused with Retry-After 6 (one emission interval); 5.9 s later
        a request is still refused, with Retry-After 1; at 6 s exactly one
        passes and the next is refused again.
        """
        hook = memoryHook({"rate": "10/m", "burst": 10}, self.clock)
        for _ in range(10):
            self.assertIsNone(take(hook).response)
        refused = take(hook).response
        assert refused is not None
        self.assertEqual(refused.status, 429)
        self.assertEqual(header(refused, b"retry-after"), b"6")
        self.clock.advance(5.9)
        refused = take(hook).response
        assert refused is not None
        self.assertEqual(header(refused, b"retry-after"), b"1")
        self.clock.advance(0.1)
        self.assertIsNone(take(hook).response)
        refused = take(hook).response
        assert refused is not None
        self.assertEqual(header(refused, b"retry-after"), b"6")
        self.assertEqual(hook.stats()["allowed"], 11)
        self.assertEqual(hook.stats()["limited"], 3)

    def test_refusedJSONError(self) -> None:
        """
        The refusal is monedge's JSON error, 429 rate_limited, with
        Retry-After, RateLimit-Policy and RateLimit (r=0, t equal to
        Retry-After).
        """
        hook = memoryHook({"rate": "10/m"}, self.clock)
        for _ in range(10):
            take(hook)
        refused = take(hook).response
        assert refused is not None
        self.assertEqual((refused.status, refused.code), (429, "rate_limited"))
        self.assertIsNone(refused.body)
        assert refused.message is not None
        self.assertIn("10/m", refused.message)
        self.assertEqual(header(refused, b"ratelimit-policy"), b'"default";q=10;w=60')
        self.assertEqual(field(header(refused, b"ratelimit")), ("default", 0, 6))

    def test_allowedResponsesCountDown(self) -> None:
        """
        Allowed requests' responses carry RateLimit-Policy and RateLimit
        with the quota left (r counts down) and t the seconds until one more
        request is earned.
        """
        hook = memoryHook({"rate": "10/m"}, self.clock)
        seen = []
        for _ in range(10):
            outcome = take(hook)
            assert outcome.responseHeaders is not None
            policy = only(outcome.responseHeaders, b"ratelimit-policy")
            self.assertEqual(policy, b'"default";q=10;w=60')
            seen.append(field(only(outcome.responseHeaders, b"ratelimit")))
        self.assertEqual(seen, [("default", r, 6) for r in range(9, -1, -1)])

    def test_upstreamFieldsKept(self) -> None:
        """
        onResponse adds its fields after any the upstream sent.
        """
        hook = memoryHook({"rate": "10/m", "name": "edge"}, self.clock)
        response = HookResponseHead(200, Headers({b"ratelimit": [b'"up";r=5;t=1']}))
        outcome = self.successResultOf(runHooks([hook], hookRequest(), response))
        assert outcome.responseHeaders is not None
        self.assertEqual(
            outcome.responseHeaders.getRawHeaders(b"ratelimit"),
            [b'"up";r=5;t=1', b'"edge";r=9;t=6'],
        )

    def test_burstAboveRate(self) -> None:
        """
        With 1/s and burst 5, five pass at once, then one a second; the
        policy field says the burst in a vendor parameter.
        """
        hook = memoryHook({"rate": "1/s", "burst": 5}, self.clock)
        results = [take(hook).response is None for _ in range(6)]
        self.assertEqual(results, [True] * 5 + [False])
        self.clock.advance(1)
        self.assertIsNone(take(hook).response)
        refused = take(hook).response
        assert refused is not None
        self.assertEqual(
            header(refused, b"ratelimit-policy"), b'"default";q=1;w=1;monedge-burst=5'
        )

    def test_burstBelowRate(self) -> None:
        """
        With 100/s and burst 1, requests must be 10 ms apart; Retry-After
        is at least 1 even for a 10 ms wait.
        """
        hook = memoryHook({"rate": "100/s", "burst": 1}, self.clock)
        self.assertIsNone(take(hook).response)
        refused = take(hook).response
        assert refused is not None
        self.assertEqual(header(refused, b"retry-after"), b"1")
        self.clock.advance(0.01)
        self.assertIsNone(take(hook).response)

    def test_idleRefills(self) -> None:
        """
        After a whole period idle the full burst is available again, and no
        more than it.
        """
        hook = memoryHook({"rate": "3/h"}, self.clock)
        for _ in range(3):
            take(hook)
        self.clock.advance(86400)
        self.assertEqual(
            [take(hook).response is None for _ in range(4)], [True] * 3 + [False]
        )


class KeyTests(SynchronousTestCase):
    """
    Each key kind isolates the buckets it should, and only those.
    """

    def exhaust(self, hook: RateLimitHook, **request: Any) -> None:
        """
        Use up the (one-request) bucket of C{request}.
        """
        self.assertIsNone(take(hook, **request).response)
        self.assertIsNotNone(take(hook, **request).response)

    def passes(self, hook: RateLimitHook, **request: Any) -> bool:
        """
        Does C{request} pass?
        """
        return take(hook, **request).response is None

    def test_client(self) -> None:
        """
        key client: each client address has its own bucket.
        """
        hook = memoryHook({"rate": "1/h", "key": "client"})
        self.exhaust(hook, clientAddress="192.0.2.1")
        self.assertTrue(self.passes(hook, clientAddress="192.0.2.2"))
        self.assertFalse(self.passes(hook, clientAddress="192.0.2.1"))

    def test_clientFromForwardedFor(self) -> None:
        """
        key client uses the first X-Forwarded-For address monedge sends
        upstream (the client as resolved with --trusted-hops), not the
        peer: behind a load balancer clients do not share one bucket.
        """
        hook = memoryHook({"rate": "1/h"})
        lb = "10.0.0.1"
        self.exhaust(
            hook,
            clientAddress=lb,
            headers={b"x-forwarded-for": [b"198.51.100.7, 10.0.0.1"]},
        )
        self.assertTrue(
            self.passes(
                hook,
                clientAddress=lb,
                headers={b"x-forwarded-for": [b"198.51.100.8, 10.0.0.1"]},
            )
        )

    def test_header(self) -> None:
        """
        key header:X-Api-Key: each value has its own bucket, whatever the
        client; requests without it are keyed by client address.
        """
        hook = memoryHook({"rate": "1/h", "key": "header:X-Api-Key"})
        self.exhaust(hook, headers={b"x-api-key": [b"one"]}, clientAddress="192.0.2.1")
        self.assertFalse(
            self.passes(
                hook, headers={b"x-api-key": [b"one"]}, clientAddress="192.0.2.2"
            )
        )
        self.assertTrue(self.passes(hook, headers={b"x-api-key": [b"two"]}))
        self.exhaust(hook, clientAddress="192.0.2.1")
        self.assertTrue(self.passes(hook, clientAddress="192.0.2.2"))

    def test_longHeaderValueDigested(self) -> None:
        """
        A long key value is replaced by a digest: keys stay small, and
        distinct values still get distinct buckets.
        """
        hook = memoryHook({"rate": "1/h", "key": "header:X-Api-Key"})
        long1, long2 = b"a" * 5000, b"a" * 4999 + b"b"
        key = hook.bucketKey(hookRequest(headers={b"x-api-key": [long1]}))
        self.assertLess(len(key), 120)
        self.exhaust(hook, headers={b"x-api-key": [long1]})
        self.assertTrue(self.passes(hook, headers={b"x-api-key": [long2]}))

    def test_jwtSubject(self) -> None:
        """
        key jwt-subject: one bucket per subject across clients; requests
        without a readable Bearer JWT are keyed by client address.
        """
        hook = memoryHook({"rate": "1/h", "key": "jwt-subject"})
        self.exhaust(hook, headers=bearer("alice"), clientAddress="192.0.2.1")
        self.assertFalse(
            self.passes(hook, headers=bearer("alice"), clientAddress="192.0.2.2")
        )
        self.assertTrue(self.passes(hook, headers=bearer("bob")))
        garbage = {b"authorization": [b"Bearer not-a-jwt"]}
        self.exhaust(hook, headers=garbage, clientAddress="192.0.2.3")
        self.assertTrue(self.passes(hook, clientAddress="192.0.2.4"))
        self.assertFalse(self.passes(hook, clientAddress="192.0.2.3"))

    def test_jwtSubjectKeyNames(self) -> None:
        """
        The subject is read without verifying the token (the auth hook must
        run first), and only from a Bearer credential.
        """
        hook = memoryHook({"rate": "1/h", "key": "jwt-subject"})
        forged = jwt.encode(
            {"sub": "carol"}, "another key entirely, and also long enough", "HS256"
        )
        self.assertEqual(
            hook.bucketKey(
                hookRequest(headers={b"authorization": [b"Bearer " + forged.encode()]})
            ),
            "service.api.orders:sub:carol",
        )
        basic = {b"authorization": [b"Basic YWxpY2U6cHc="]}
        self.assertEqual(
            hook.bucketKey(hookRequest(headers=basic, clientAddress="192.0.2.9")),
            "service.api.orders:client:192.0.2.9",
        )

    def test_service(self) -> None:
        """
        key service: every client of a service shares one bucket; other
        services have their own.
        """
        hook = memoryHook({"rate": "1/h", "key": "service"})
        self.exhaust(hook, clientAddress="192.0.2.1")
        self.assertFalse(self.passes(hook, clientAddress="192.0.2.2"))
        self.assertTrue(self.passes(hook, service="service.api.other"))

    def test_scope(self) -> None:
        """
        scope service (the default) keeps a client's buckets apart per
        service, as one hook configuration serves every service that uses
        it; scope global shares them.
        """
        perService = memoryHook({"rate": "1/h"})
        self.exhaust(perService, service="service.api.a")
        self.assertTrue(self.passes(perService, service="service.api.b"))
        shared = memoryHook({"rate": "1/h", "scope": "global"})
        self.exhaust(shared, service="service.api.a")
        self.assertFalse(self.passes(shared, service="service.api.b"))


class MemoryBoundTests(SynchronousTestCase):
    """
    The in-memory map cannot grow without bound.
    """

    def test_capped(self) -> None:
        """
        1000 distinct clients never grow the map past max-keys (100); the
        least recently used buckets are the ones dropped.
        """
        clock = Clock()
        hook = memoryHook({"rate": "1/h", "max-keys": 100}, clock)
        for i in range(1000):
            take(hook, clientAddress=f"10.0.{i // 256}.{i % 256}")
            self.assertLessEqual(hook.stats()["keys"], 100)
        self.assertEqual(hook.stats()["keys"], 100)
        self.assertEqual(hook.stats()["evicted"], 900)
        # The most recent client is still limited; the first was forgotten.
        self.assertIsNotNone(take(hook, clientAddress="10.0.3.231").response)
        self.assertIsNone(take(hook, clientAddress="10.0.0.0").response)

    def test_staleDropped(self) -> None:
        """
        Buckets that have filled up again are dropped as requests come,
        without waiting for the cap.
        """
        clock = Clock()
        hook = memoryHook({"rate": "10/s"}, clock)
        for i in range(50):
            take(hook, clientAddress=f"192.0.2.{i}")
        self.assertEqual(hook.stats()["keys"], 50)
        clock.advance(1.0)
        for _ in range(30):
            take(hook, clientAddress="198.51.100.1")
        self.assertEqual(hook.stats()["keys"], 1)
        self.assertEqual(hook.stats()["evicted"], 0)


class ScriptRedis(FakeRedis):
    """
    The fake Redis, running the hook's script: EVALSHA and EVAL with the
    same GCRA arithmetic, on the reactor's clock.
    """

    def __init__(self, reactor: BusyReactor) -> None:
        super().__init__(reactor)
        self.buckets: dict[bytes, int] = {}
        #: An error reply EVALSHA and EVAL get instead of running, if set.
        self.evalError: bytes | None = None

    def answer(self, command: list[bytes]) -> bytes:
        """
        The reply to C{command}: the script's for EVALSHA and EVAL.
        """
        name = command[0].upper()
        if name in (b"EVALSHA", b"EVAL") and self.evalError is not None:
            return self.evalError
        if name == b"EVALSHA" and command[1].decode() not in self.scripts:
            return super().answer(command)
        if name in (b"EVALSHA", b"EVAL"):
            key, interval, tolerance = command[3], int(command[4]), int(command[5])
            now = round(self.reactor.seconds() * 1_000_000)
            count = round(1_000_000 / interval)
            limit = Limit(count, "s", tolerance // interval)
            allowed, new, ahead = gcra(self.buckets.get(key), now, limit)
            if allowed:
                self.buckets[key] = new
            return b"*2\r\n:%d\r\n:%d\r\n" % (int(allowed), ahead)
        return super().answer(command)


class RedisOutageTests(SynchronousTestCase):
    """
    The Redis limiter on a memory reactor: single failures, outages, the
    health check, the log lines, and what each on-redis-error does.
    """

    def setUp(self) -> None:
        self.reactor = BusyReactor()
        self.redis = ScriptRedis(self.reactor)
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)

    def hook(self, **options: Any) -> RateLimitHook:
        """
        A hook on the fake Redis (2/s, burst 3), connected.
        """
        options = {"rate": "2/s", "burst": 3, "redis": "redis://127.0.0.1/0", **options}
        hook = buildHook("ratelimit", options, HookContext(reactor=self.reactor))
        assert isinstance(hook, RateLimitHook)
        redisLimiter(hook).connect()
        self.redis.accept()
        self.redis.serve()
        return hook

    def ask(self, hook: RateLimitHook, **request: Any) -> list[HookOutcome]:
        """
        Run C{hook} on a request (with a 200 response); the outcome is in
        the list once it is decided.
        """
        outcomes: list[HookOutcome] = []
        runHooks(
            [hook], hookRequest(**request), HookResponseHead(200, Headers())
        ).addCallback(outcomes.append)
        return outcomes

    def timeOut(self) -> None:
        """
        Let the timeout pass with Redis silent.
        """
        self.reactor.iterate(0.3)
        self.reactor.iterate()

    def passedWithFields(self, outcomes: list[HookOutcome]) -> bool | None:
        """
        Whether a decided request passed, with (True) or without (None)
        RateLimit fields; False if it was refused.
        """
        [outcome] = outcomes
        self.assertIsNone(outcome.error)
        if outcome.response is not None:
            self.assertEqual(outcome.response.status, 429)
            return False
        assert outcome.responseHeaders is not None
        return True if outcome.responseHeaders.hasHeader(b"ratelimit") else None

    def test_builtConnectsWhenRunning(self) -> None:
        """
        Building the hook opens no connection; it asks to open them once
        the reactor runs.
        """
        hook = buildHook(
            "ratelimit",
            {"rate": "1/s", "redis": "redis://127.0.0.1/0"},
            HookContext(reactor=self.reactor),
        )
        assert isinstance(hook, RateLimitHook)
        self.assertEqual(self.reactor.tcpClients, [])
        [(call, _, _)] = self.reactor.whenRunningHooks
        call()
        self.assertEqual(len(self.reactor.tcpClients), REDIS_POOL_SIZE)

    def test_busyReactorDecidesThroughRedis(self) -> None:
        """
        20 requests whose replies arrive while the reactor is busy for a
        second are all decided by Redis: 3 pass (the burst), 17 are
        refused, and nothing counts as a Redis error.
        """
        hook = self.hook()
        outcomes = [self.ask(hook) for _ in range(20)]
        self.reactor.iterate(1.0)
        self.redis.serve()
        self.reactor.iterate()
        results = [self.passedWithFields(o) for o in outcomes]
        self.assertEqual((results.count(True), results.count(False)), (3, 17))
        self.assertEqual(hook.stats()["redis_errors"], 0)
        self.assertEqual(self.logs.events, [])

    def test_oneSlowReplyFailsOnlyItsRequest(self) -> None:
        """
        A request whose reply is late is decided without Redis (open: it
        passes without fields); a PING checks Redis, which answers, so no
        outage starts and nothing is logged; the next request goes to
        Redis again.
        """
        hook = self.hook()
        slow = self.ask(hook)
        self.timeOut()
        self.assertIsNone(self.passedWithFields(slow))
        self.assertEqual(self.redis.written(), [b"EVALSHA", b"PING"])
        self.redis.serve()
        after = self.ask(hook)
        self.redis.serve()
        self.assertTrue(self.passedWithFields(after))
        self.assertFalse(redisLimiter(hook).down)
        stats = hook.stats()
        self.assertEqual((stats["redis_errors"], stats["redis_outages"]), (1, 0))
        self.assertEqual(self.logs.events, [])

    def test_outageAfterConsecutiveFailures(self) -> None:
        """
        Three requests failing in a row (here Redis answers PING but
        refuses the script) start an outage, logged in one warning; during
        it Redis is not asked; the PING a second later, answered, ends it,
        logged in one info line; then Redis decides again.
        """
        self.assertEqual(OUTAGE_AFTER, 3)
        hook = self.hook()
        self.redis.evalError = (
            b"-READONLY You can't write against a read only replica.\r\n"
        )
        for i in range(3):
            outcomes = self.ask(hook)
            self.redis.serve()
            self.assertIsNone(self.passedWithFields(outcomes))
            self.assertEqual(redisLimiter(hook).down, i == 2)
            self.redis.serve()  # the health check's PING, answered
        self.assertEqual(self.logs.levels(), [LogLevel.warn])
        [started] = self.logs.formatted()
        self.assertIn("3 requests failed; READONLY", started)
        self.assertIn("letting requests through", started)
        during = [self.ask(hook) for _ in range(5)]
        self.assertEqual([self.passedWithFields(o) for o in during], [None] * 5)
        self.assertEqual(self.redis.written(), [])
        self.redis.evalError = None
        self.reactor.iterate(1.0)
        self.assertEqual(self.redis.written(), [b"PING"])
        self.redis.serve()
        self.assertFalse(redisLimiter(hook).down)
        self.assertEqual(self.logs.levels(), [LogLevel.warn, LogLevel.info])
        self.assertIn(
            "answers again after 1.0 s; 8 requests were decided without it",
            self.logs.formatted()[1],
        )
        after = self.ask(hook)
        self.redis.serve()
        self.assertTrue(self.passedWithFields(after))
        stats = hook.stats()
        self.assertEqual((stats["redis_errors"], stats["redis_outages"]), (8, 1))

    def test_failedHealthCheckStartsOutage(self) -> None:
        """
        A failed request's PING that fails too starts the outage at once.
        """
        hook = self.hook()
        outcomes = self.ask(hook)
        self.redis.drop(0)
        self.assertIsNone(self.passedWithFields(outcomes))
        self.assertFalse(redisLimiter(hook).down)
        self.assertEqual(self.redis.commands(1), [[b"PING"]])
        self.redis.drop(1)
        self.assertTrue(redisLimiter(hook).down)
        self.assertEqual(self.logs.levels(), [LogLevel.warn])
        self.assertIn("PING failed", self.logs.formatted()[0])

    def test_probesUntilRedisAnswers(self) -> None:
        """
        During an outage a PING goes out every second, requests or not,
        and the one that is answered ends it; failed ones log nothing.
        """
        hook = self.hook()
        self.redis.drop(0)
        self.redis.drop(1)
        for _ in range(3):
            self.ask(hook)
            self.redis.refuse()
        self.assertTrue(redisLimiter(hook).down)
        for _ in range(3):
            self.reactor.iterate(1.0)
            self.redis.refuse()
        self.reactor.iterate(1.0)
        self.redis.accept()
        self.redis.serve()
        self.assertFalse(redisLimiter(hook).down)
        self.assertEqual(self.logs.levels(), [LogLevel.warn, LogLevel.info])

    def test_local(self) -> None:
        """
        on-redis-error local: requests Redis does not decide are decided by
        this process's in-memory buckets, with the same limit, carried on
        from what Redis last said.  With 2 of the burst of 3 used through
        Redis, one more passes as Redis goes silent and the rest are
        refused with 429; half a second (one emission interval) later one
        more passes; all with RateLimit fields.
        """
        hook = self.hook(**{"on-redis-error": "local"})
        for _ in range(2):
            outcomes = self.ask(hook)
            self.redis.serve()
            self.assertTrue(self.passedWithFields(outcomes))
        self.assertEqual(hook.stats()["keys"], 1)
        silent = [self.ask(hook) for _ in range(4)]
        self.timeOut()
        results = [self.passedWithFields(outcomes) for outcomes in silent]
        self.assertEqual(results, [True, False, False, False])
        self.assertTrue(redisLimiter(hook).down)
        refused = self.ask(hook)[0].response
        assert refused is not None
        self.assertEqual(header(refused, b"retry-after"), b"1")
        self.reactor.iterate(0.5)
        later = [self.passedWithFields(self.ask(hook)) for _ in range(2)]
        self.assertEqual(later, [True, False])
        self.assertEqual(self.logs.levels(), [LogLevel.warn])
        self.assertIn("this process's in-memory buckets", self.logs.formatted()[0])

    def test_closed(self) -> None:
        """
        on-redis-error closed: a request Redis does not decide is answered
        500 hook_failed by the hook itself, so the hook chain logs nothing;
        the only log line is the outage's.
        """
        hook = self.hook(**{"on-redis-error": "closed"})
        outcomes = [self.ask(hook) for _ in range(5)]
        self.timeOut()
        for [outcome] in outcomes:
            self.assertIsNone(outcome.error)
            assert outcome.response is not None
            self.assertEqual(
                (outcome.response.status, outcome.response.code), (500, "hook_failed")
            )
        self.assertEqual(self.logs.levels(), [LogLevel.warn])
        self.assertNotIn("log_failure", self.logs.events[0])
        self.assertIn("failing requests with 500", self.logs.formatted()[0])

    def test_closedHookStartsNoOutage(self) -> None:
        """
        Requests that still reach a closed hook are decided without Redis
        (open: they pass) but start no outage and log nothing.
        """
        hook = self.hook()
        closed = hook.close()
        for protocol in self.redis.protocols:
            protocol.connectionLost(Failure(ConnectionDone("closed")))
        self.successResultOf(closed)
        outcomes = [self.ask(hook) for _ in range(OUTAGE_AFTER + 1)]
        self.assertEqual([self.passedWithFields(o) for o in outcomes], [None] * 4)
        self.assertFalse(redisLimiter(hook).down)
        self.assertEqual(self.logs.events, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_closeStopsProbing(self) -> None:
        """
        Closing the hook during an outage leaves no timer behind.
        """
        hook = self.hook()
        redisLimiter(hook)._startOutage("test")
        closed = hook.close()
        for protocol in self.redis.protocols:
            protocol.connectionLost(Failure(ConnectionDone("closed")))
        self.successResultOf(closed)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class LimiterContract(_Base):
    """
    What every limiter does, whatever holds its buckets.  Subclasses say
    how to build a hook, how to let time pass and how to run a request.
    """

    def makeHook(self, options: Mapping[str, Any]) -> RateLimitHook:
        """
        A hook with C{options} on this limiter.
        """
        raise NotImplementedError()

    async def advance(self, seconds: float) -> None:
        """
        Let C{seconds} pass for the limiter.
        """
        raise NotImplementedError()

    async def request(self, hook: RateLimitHook, **request: Any) -> HookOutcome:
        """
        Run C{hook} on one request with a 200 response.
        """
        return await runHooks(
            [hook], hookRequest(**request), HookResponseHead(200, Headers())
        )

    async def test_burstThenRefused(self) -> None:
        """
        With 2/s and burst 3, three requests pass at once with r counting
        down 2, 1, 0; the fourth is refused with Retry-After 1 and r=0.
        """
        hook = self.makeHook({"rate": "2/s", "burst": 3})
        remaining = []
        for _ in range(3):
            outcome = await self.request(hook)
            self.assertIsNone(outcome.response)
            assert outcome.responseHeaders is not None
            remaining.append(field(only(outcome.responseHeaders, b"ratelimit"))[1])
        self.assertEqual(remaining, [2, 1, 0])
        refused = (await self.request(hook)).response
        assert refused is not None
        self.assertEqual((refused.status, refused.code), (429, "rate_limited"))
        self.assertEqual(header(refused, b"retry-after"), b"1")
        self.assertEqual(field(header(refused, b"ratelimit")), ("default", 0, 1))
        self.assertEqual(
            header(refused, b"ratelimit-policy"), b'"default";q=2;w=1;monedge-burst=3'
        )

    async def test_oneMoreAfterInterval(self) -> None:
        """
        After the burst is used, one emission interval (500 ms) later
        exactly one more request passes; refused requests did not count.
        """
        hook = self.makeHook({"rate": "2/s", "burst": 3})
        for _ in range(3):
            await self.request(hook)
        for _ in range(3):
            self.assertIsNotNone((await self.request(hook)).response)
        await self.advance(0.6)
        self.assertIsNone((await self.request(hook)).response)
        self.assertIsNotNone((await self.request(hook)).response)

    async def test_keysIsolated(self) -> None:
        """
        One client using up its bucket leaves another's alone.
        """
        hook = self.makeHook({"rate": "1/h"})
        self.assertIsNone(
            (await self.request(hook, clientAddress="192.0.2.1")).response
        )
        refused = await self.request(hook, clientAddress="192.0.2.1")
        self.assertIsNotNone(refused.response)
        passed = await self.request(hook, clientAddress="192.0.2.2")
        self.assertIsNone(passed.response)

    async def test_decisionsCounted(self) -> None:
        """
        stats() counts allowed and refused requests.
        """
        hook = self.makeHook({"rate": "1/h", "burst": 2})
        for _ in range(5):
            await self.request(hook)
        stats = hook.stats()
        self.assertEqual((stats["allowed"], stats["limited"]), (2, 3))
        self.assertEqual(stats["redis_errors"], 0)


class MemoryContractTests(LimiterContract, TestCase):
    """
    The limiter contract with buckets in memory, on a fake clock.
    """

    def setUp(self) -> None:
        self.clock = Clock()

    def makeHook(self, options: Mapping[str, Any]) -> RateLimitHook:
        return memoryHook(options, self.clock)

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)


class RedisTestMixin(_Base):
    """
    A fresh redis-server for each test, and hooks on it closed afterwards.
    """

    skip = SKIP_REASON

    # trial waits for a Deferred returned by setUp; unittest's stub says None.
    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.redis = RedisServer(self.mktemp())
        self.addCleanup(self.redis.stop)
        self.logs = LogCapture()
        globalLogPublisher.addObserver(self.logs)
        self.addCleanup(globalLogPublisher.removeObserver, self.logs)
        return Deferred.fromCoroutine(self.redis.start())

    def redisHook(
        self, options: Mapping[str, Any], url: str | None = None, context: Any = None
    ) -> RateLimitHook:
        """
        A hook sharing buckets through C{url} (this test's server by
        default), closed after the test.
        """
        options = {"redis": url or self.redis.url, **options}
        hook = buildHook("ratelimit", options, context or HookContext(reactor=reactor))
        assert isinstance(hook, RateLimitHook)
        self.addCleanup(hook.close)
        return hook


class RedisContractTests(RedisTestMixin, LimiterContract, TestCase):
    """
    The limiter contract with buckets in a real Redis, on real time.
    """

    def makeHook(self, options: Mapping[str, Any]) -> RateLimitHook:
        return self.redisHook(options)

    async def advance(self, seconds: float) -> None:
        await task.deferLater(reactor, seconds, lambda: None)


class SkewedReactor:
    """
    The real reactor, but with a clock C{skew} seconds off.
    """

    def __init__(self, skew: float) -> None:
        self.skew = skew

    def seconds(self) -> float:
        """
        The skewed time.
        """
        now: float = reactor.seconds()
        return now + self.skew

    def callLater(self, delay: float, f: Any, *args: Any) -> Any:
        """
        Schedule on the real reactor.
        """
        return reactor.callLater(delay, f, *args)

    def callWhenRunning(self, f: Any) -> Any:
        """
        Run at once: the reactor is running.
        """
        return reactor.callWhenRunning(f)

    def connectTCP(self, *args: Any, **kwargs: Any) -> Any:
        """
        Connect on the real reactor.
        """
        return reactor.connectTCP(*args, **kwargs)


class RedisTests(RedisTestMixin, TestCase):
    """
    What only the Redis limiter does: share buckets between replicas, by
    the server's clock, in keys that expire, and survive outages.
    """

    timeout = 60

    async def alternate(self, hooks: Sequence[RateLimitHook], n: int) -> list[bool]:
        """
        Send C{n} requests, cycling through C{hooks}; which passed.
        """
        passed = []
        for i in range(n):
            outcome = await runHooks([hooks[i % len(hooks)]], hookRequest())
            self.assertIsNone(outcome.error)
            passed.append(outcome.response is None)
        return passed

    async def test_replicasShareBuckets(self) -> None:
        """
        Two hooks on separate connection pools (as two replicas would be)
        together let exactly the burst through.
        """
        options = {"rate": "10/m", "burst": 4}
        hooks = [self.redisHook(options), self.redisHook(options)]
        self.assertEqual(await self.alternate(hooks, 8), [True] * 4 + [False] * 4)

    async def test_serverClock(self) -> None:
        """
        Replicas whose clocks disagree by an hour still share one limit:
        the script times buckets by the Redis server's clock.
        """
        options = {"rate": "10/m", "burst": 4}
        hooks = [
            self.redisHook(options, context=HookContext(reactor=SkewedReactor(0))),
            self.redisHook(options, context=HookContext(reactor=SkewedReactor(3600))),
        ]
        self.assertEqual(await self.alternate(hooks, 8), [True] * 4 + [False] * 4)

    async def test_keysExpire(self) -> None:
        """
        Bucket keys are prefixed monedge:rl: and expire when the bucket is
        full again, so Redis holds only active buckets.
        """
        hook = self.redisHook({"rate": "2/s", "burst": 3})
        await runHooks([hook], hookRequest(clientAddress="192.0.2.1"))
        keys = self.redis.command("KEYS", "*")
        self.assertEqual(
            keys, [b"monedge:rl:2/s:3:service.api.orders:client:192.0.2.1"]
        )
        assert isinstance(keys, list) and isinstance(keys[0], bytes)
        self.assertTrue(keys[0].startswith(KEY_PREFIX.encode()))
        ttl = self.redis.command("PTTL", keys[0])
        assert isinstance(ttl, int)
        self.assertTrue(0 < ttl <= 500, ttl)

    async def test_noScriptFallsBackToEval(self) -> None:
        """
        After the server forgets the script (SCRIPT FLUSH, as after a
        restart), requests are still decided: NOSCRIPT falls back to EVAL,
        which caches the script again.
        """
        hook = self.redisHook({"rate": "10/m", "burst": 3})
        await runHooks([hook], hookRequest())
        self.assertEqual(self.redis.command("SCRIPT", "EXISTS", SCRIPT_SHA), [1])
        self.redis.command("SCRIPT", "FLUSH")
        self.assertEqual(await self.alternate([hook], 3), [True, True, False])
        self.assertEqual(hook.stats()["redis_errors"], 0)
        self.assertEqual(self.redis.command("SCRIPT", "EXISTS", SCRIPT_SHA), [1])

    async def test_unreachableFailsOpen(self) -> None:
        """
        With nothing listening at the Redis address and on-redis-error
        open, every request passes at once (without RateLimit fields), one
        warning is logged for the whole outage, and the requests are
        counted as decided without Redis.
        """
        hook = self.redisHook(
            {"rate": "1/h", "redis-timeout": "200ms"},
            url=f"redis://127.0.0.1:{freePort()}/0",
        )
        for _ in range(5):
            outcome = await runHooks(
                [hook], hookRequest(), HookResponseHead(200, Headers())
            )
            self.assertIsNone(outcome.error)
            self.assertIsNone(outcome.response)
            assert outcome.responseHeaders is not None
            self.assertFalse(outcome.responseHeaders.hasHeader(b"ratelimit"))
        self.assertEqual(self.logs.levels(), [LogLevel.warn])
        self.assertIn("unavailable", self.logs.formatted()[0])
        stats = hook.stats()
        self.assertEqual((stats["redis_errors"], stats["redis_outages"]), (5, 1))

    async def test_unreachableFailsClosed(self) -> None:
        """
        With Redis unreachable and on-redis-error closed, the hook answers
        500 hook_failed itself: no error reaches the hook chain (which
        would log it), and only the outage's line is logged.
        """
        hook = self.redisHook(
            {"rate": "1/h", "redis-timeout": "200ms", "on-redis-error": "closed"},
            url=f"redis://127.0.0.1:{freePort()}/0",
        )
        for _ in range(4):
            outcome = await runHooks([hook], hookRequest())
            self.assertIsNone(outcome.error)
            assert outcome.response is not None
            self.assertEqual(
                (outcome.response.status, outcome.response.code), (500, "hook_failed")
            )
        self.assertEqual(self.logs.levels(), [LogLevel.warn])

    async def test_outageStartAndEnd(self) -> None:
        """
        When Redis goes away and comes back, one line is logged as the
        outage starts and one as it ends (the PING sent every second
        notices, with no request needed), however many requests came in
        between; then requests are limited through Redis again.
        """
        hook = self.redisHook({"rate": "10/m", "redis-timeout": "200ms"})
        self.assertEqual(await self.alternate([hook], 1), [True])
        await self.redis.stop()
        for _ in range(5):
            self.assertEqual(await self.alternate([hook], 1), [True])
        self.assertTrue(redisLimiter(hook).down)
        self.assertEqual(self.logs.levels(), [LogLevel.warn])
        await self.redis.start()
        deadline = time.monotonic() + 10
        while redisLimiter(hook).down and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(redisLimiter(hook).down)
        self.assertEqual(self.logs.levels(), [LogLevel.warn, LogLevel.info])
        self.assertIn("answers again", self.logs.formatted()[1])
        self.assertFalse(any("log_failure" in event for event in self.logs.events))
        outcome = await runHooks(
            [hook], hookRequest(), HookResponseHead(200, Headers())
        )
        assert outcome.responseHeaders is not None
        self.assertTrue(outcome.responseHeaders.hasHeader(b"ratelimit"))
        self.assertEqual(hook.stats()["redis_outages"], 1)

    async def test_busyReactor(self) -> None:
        """
        400 requests asked in one reactor turn that stays busy for about
        0.4 s (1 ms of work after each, far past the 250 ms timeout) are
        all decided by Redis: exactly the burst of 5 passes, none counts as
        a Redis error, nothing is logged.  (The commands go out at once,
        and the replies that arrived meanwhile are read before any deadline
        is judged.)
        """
        hook = self.redisHook({"rate": "1/h", "burst": 5})
        await runHooks([hook], hookRequest(clientAddress="192.0.2.99"))
        pending = []
        for _ in range(400):
            pending.append(runHooks([hook], hookRequest()))
            busy = time.perf_counter() + 0.001
            while time.perf_counter() < busy:
                pass
        outcomes = await gatherResults(pending)
        passed = [outcome.response is None for outcome in outcomes]
        self.assertEqual(passed.count(True), 5)
        stats = hook.stats()
        self.assertEqual((stats["allowed"], stats["limited"]), (6, 395))
        self.assertEqual((stats["redis_errors"], stats["redis_outages"]), (0, 0))
        self.assertEqual(self.logs.events, [])


def _ratelimitHook(options: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [{"name": "ratelimit", "options": dict(options)}]


class RateLimitProxyTestCase(ProxyTestCase):
    """
    End-to-end helpers: send requests, check refusals.
    """

    def setUp(self) -> None:
        super().setUp()
        # Refresh the plugin cache here, so proxies started together do not
        # race to rewrite it.
        availableFactories()

    def assertRefused(
        self, response: Any, body: bytes, limit: int, window: int
    ) -> None:
        """
        C{response} is a 429 rate_limited JSON error with Retry-After and
        RateLimit fields (r=0, t equal to Retry-After).
        """
        self.assertEqual(response.code, 429, body)
        document = json.loads(body)
        self.assertEqual(document["status"], 429)
        self.assertEqual(document["code"], "rate_limited")
        self.assertTrue(document["request_id"])
        self.assertEqual(
            response.headers.getRawHeaders(b"content-type"), [b"application/json"]
        )
        [retry] = response.headers.getRawHeaders(b"retry-after")
        self.assertTrue(1 <= int(retry) <= window // limit, retry)
        self.assertEqual(
            response.headers.getRawHeaders(b"ratelimit-policy"),
            [f'"default";q={limit};w={window}'.encode()],
        )
        [value] = response.headers.getRawHeaders(b"ratelimit")
        self.assertEqual(field(value), ("default", 0, int(retry)))

    async def send(self, urls: Sequence[str], n: int, limit: int) -> list[int]:
        """
        Send C{n} GETs cycling through C{urls}; check every refusal and that
        the allowed responses' r counts down from C{limit - 1} to 0; return
        the status codes.
        """
        codes, remaining = [], []
        for i in range(n):
            response, body = await self.get(urls[i % len(urls)])
            codes.append(response.code)
            if response.code == 200:
                [value] = response.headers.getRawHeaders(b"ratelimit")
                remaining.append(field(value)[1])
            else:
                self.assertRefused(response, body, limit, 60)
        self.assertEqual(remaining, list(range(limit - 1, -1, -1)))
        return codes


class EndToEndTests(RateLimitProxyTestCase):
    """
    A real twistd monedge process enforces an in-memory limit.
    """

    async def test_inMemoryGlobalHook(self) -> None:
        """
        One proxy with a global in-memory ratelimit hook (--hook, 3/m):
        three requests pass with r 2, 1, 0, the rest are refused with 429.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.echo": {"endpoints": [upstream.address]}},
            ["--hook", json.dumps(_ratelimitHook({"rate": "3/m"})[0])],
        )
        codes = await self.send([proxy.url + "/echo/"], 5, 3)
        self.assertEqual(codes, [200] * 3 + [429] * 2)
        self.assertEqual(len(upstream.received), 3)


class RedisEndToEndTests(RateLimitProxyTestCase):
    """
    Real twistd monedge processes sharing one redis-server share its limit.
    """

    skip = SKIP_REASON

    async def test_twoProxiesShareRedis(self) -> None:
        """
        Two proxies sharing one redis-server, a service limited to 10/m
        (burst 10) per client: of 20 requests alternating between them,
        exactly 10 reach the upstream (with r counting down 9..0 across
        both), and the other 10 are refused with 429.
        """
        redis = RedisServer(self.directory + "/redis")
        self.addCleanup(redis.stop)
        await redis.start()
        upstream = self.startUpstream()
        options = {
            "rate": "10/m",
            "burst": 10,
            "key": "client",
            "redis": redis.url,
            "redis-timeout": "2s",
        }
        services = {
            "service.api.limited": {
                "endpoints": [upstream.address],
                "policy": {"hooks": _ratelimitHook(options)},
            }
        }
        proxies: list[ProxyProcess] = await gatherResults(
            [
                Deferred.fromCoroutine(self.startProxy(services)),
                Deferred.fromCoroutine(self.startProxy(services)),
            ]
        )
        codes = await self.send([p.url + "/limited/x" for p in proxies], 20, 10)
        self.assertEqual(codes, [200] * 10 + [429] * 10)
        self.assertEqual(len(upstream.received), 10)
        self.assertEqual(
            redis.command("KEYS", "monedge:rl:*"),
            [b"monedge:rl:10/m:10:service.api.limited:client:127.0.0.1"],
        )
