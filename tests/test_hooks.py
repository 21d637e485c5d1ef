"""
The hook machinery: chains, ordering, timeouts, failure semantics,
configuration, the headers hook, and hooks on the proxy path.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.plugin import IPlugin
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer
from zope.interface.verify import verifyObject

from monedge.hooks import (
    HookChain,
    HookConfigError,
    HookContext,
    HookFailed,
    HookResponse,
    HookResponseHead,
    HookSet,
    availableFactories,
)
from monedge.interfaces import (
    IHookFactory,
    IHookRequest,
    IHookResponse,
    IRequestHook,
    IResponseHook,
)
from monedge.registry import ServiceEntry
from monedge.rules.policy import HookSpec, Policy
from monedge.testing import FakeResponse, endpoint
from monedge.testing.hooks import buildHook, hookRequest, runHooks
from tests.proxy.test_proxy import GET, Harness, _jsonBody, _status


@implementer(IRequestHook, IResponseHook)
class Recorder:
    """
    A hook that records its calls in a shared log, and answers as told.
    """

    def __init__(
        self, name: str, log: list[str], answer: object = None, mark: bool = False
    ) -> None:
        self.name = name
        self.log = log
        self.answer = answer
        self.mark = mark

    def onRequest(self, request: IHookRequest) -> object:
        self.log.append(f"request:{self.name}")
        request.upstreamHeaders.addRawHeader(b"x-seen", self.name.encode())
        if self.mark:
            request.answerHeaders.addRawHeader(b"x-answer", self.name.encode())
        return self.answer

    def onResponse(self, request: IHookRequest, response: IHookResponse) -> None:
        self.log.append(f"response:{self.name}")
        response.headers.addRawHeader(b"x-response", self.name.encode())


@implementer(IHookFactory, IPlugin)
class RecorderFactory:
    """
    Builds L{Recorder}s; C{answer} in the options makes it answer 403,
    C{mark} makes it add C{X-Answer} to answers given instead of the
    upstream's.
    """

    name = "recorder"
    description = "test hook"

    def __init__(self, log: list[str]) -> None:
        self.log = log

    def build(self, options: Any, context: Any) -> Recorder:
        if "bad" in options:
            raise HookConfigError("bad option")
        answer = (
            HookResponse.error(403, "forbidden", "no")
            if options.get("answer")
            else None
        )
        return Recorder(
            options.get("label", "r"), self.log, answer, bool(options.get("mark"))
        )


class ChainTests(SynchronousTestCase):
    """
    A chain runs request hooks in order and response hooks in reverse.
    """

    def chain(
        self, hooks: list[object], clock: Clock | None = None
    ) -> tuple[HookChain, list[tuple[str, str]]]:
        observed: list[tuple[str, str]] = []
        chain = HookChain(
            [(f"h{i}", h) for i, h in enumerate(hooks)],
            clock or Clock(),
            5.0,
            lambda hook, decision, seconds: observed.append((hook, decision)),
        )
        return chain, observed

    def test_order(self) -> None:
        """
        Request hooks run first to last; response hooks last to first;
        each sees the others' changes.
        """
        log: list[str] = []
        chain, observed = self.chain([Recorder("a", log), Recorder("b", log)])
        request = hookRequest()
        self.assertIsNone(self.successResultOf(chain.runRequest(request)))
        head = HookResponseHead(200, Headers())
        self.successResultOf(chain.runResponse(request, head))
        self.assertEqual(log, ["request:a", "request:b", "response:b", "response:a"])
        self.assertEqual(request.upstreamHeaders.getRawHeaders(b"x-seen"), [b"a", b"b"])
        self.assertEqual(head.headers.getRawHeaders(b"x-response"), [b"b", b"a"])
        self.assertEqual(
            observed, [("h0", "pass"), ("h1", "pass"), ("h1", "pass"), ("h0", "pass")]
        )

    def test_answerStopsTheChain(self) -> None:
        """
        A request hook that answers stops the later ones.
        """
        log: list[str] = []
        answer = HookResponse.error(401, "unauthorized", "no token")
        chain, observed = self.chain([Recorder("a", log, answer), Recorder("b", log)])
        self.assertEqual(self.successResultOf(chain.runRequest(hookRequest())), answer)
        self.assertEqual(log, ["request:a"])
        self.assertEqual(observed, [("h0", "respond")])

    def test_raisingHookFails(self) -> None:
        """
        A hook that raises fails the chain with HookFailed naming it; its
        traceback is logged at most once a minute.
        """

        @implementer(IRequestHook)
        class Broken:
            def onRequest(self, request: IHookRequest) -> None:
                raise RuntimeError("boom")

        clock = Clock()
        chain, observed = self.chain([Broken()], clock)
        failure = self.failureResultOf(chain.runRequest(hookRequest()), HookFailed)
        self.assertEqual(failure.value.hook, "h0")
        self.assertEqual(observed, [("h0", "error")])
        # Within a minute, further failures log a line, not a traceback.
        self.failureResultOf(chain.runRequest(hookRequest()), HookFailed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        clock.advance(61)
        self.failureResultOf(chain.runRequest(hookRequest()), HookFailed)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_coroutineHooksRun(self) -> None:
        """
        An async def hook is run, and its answer counts.
        """

        @implementer(IRequestHook)
        class Async:
            async def onRequest(self, request: IHookRequest) -> HookResponse:
                return HookResponse.error(403, "forbidden", "no")

        chain, observed = self.chain([Async()])
        answer = self.successResultOf(chain.runRequest(hookRequest()))
        assert answer is not None
        self.assertEqual(answer.status, 403)
        self.assertEqual(observed, [("h0", "respond")])

    def test_wrongReturnFailsClosed(self) -> None:
        """
        A request hook that returns something other than None or a
        HookResponse, or a response hook that returns anything, fails.
        """

        @implementer(IRequestHook, IResponseHook)
        class Confused:
            def onRequest(self, request: IHookRequest) -> object:
                return 403

            def onResponse(
                self, request: IHookRequest, response: IHookResponse
            ) -> object:
                return HookResponse.error(403, "forbidden", "no")

        chain, _ = self.chain([Confused()])
        self.failureResultOf(chain.runRequest(hookRequest()), HookFailed)
        head = HookResponseHead(200, Headers())
        self.failureResultOf(chain.runResponse(hookRequest(), head), HookFailed)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    def test_slowHookTimesOut(self) -> None:
        """
        A hook whose Deferred does not fire within the timeout fails the
        chain; one that fires in time passes.
        """
        waiting: Deferred[None] = Deferred()

        @implementer(IRequestHook)
        class Slow:
            def onRequest(self, request: IHookRequest) -> Deferred[None]:
                return waiting

        clock = Clock()
        chain, _ = self.chain([Slow()], clock)
        d = chain.runRequest(hookRequest())
        self.assertNoResult(d)
        clock.advance(5.1)
        self.failureResultOf(d, HookFailed)
        self.flushLoggedErrors()

        waiting = Deferred()
        d = chain.runRequest(hookRequest())
        clock.advance(1)
        waiting.callback(None)
        self.assertIsNone(self.successResultOf(d))

    def test_synchronousHooksSetNoTimer(self) -> None:
        """
        Hooks that return at once leave nothing pending: the chain's result has
        fired by the time C{runRequest} and C{runResponse} return, and no
        timeout was scheduled for any of them.
        """
        log: list[str] = []
        clock = Clock()
        chain, observed = self.chain([Recorder("a", log), Recorder("b", log)], clock)
        request = hookRequest()
        self.assertIsNone(self.successResultOf(chain.runRequest(request)))
        self.successResultOf(
            chain.runResponse(request, HookResponseHead(200, Headers()))
        )
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(len(observed), 4)

    def test_answersNowWhenEveryHookDid(self) -> None:
        """
        runRequestNow and runResponseNow give the chain's answer itself
        when every hook returned at once (None, or the answering hook's
        HookResponse), and a Deferred when one waits or fails.
        """
        log: list[str] = []
        chain, _ = self.chain([Recorder("a", log), Recorder("b", log)])
        request = hookRequest()
        self.assertIsNone(chain.runRequestNow(request))
        self.assertIsNone(
            chain.runResponseNow(request, HookResponseHead(200, Headers()))
        )
        answer = HookResponse.error(403, "forbidden", "no")
        chain, _ = self.chain([Recorder("a", log, answer), Recorder("b", log)])
        self.assertIs(chain.runRequestNow(hookRequest()), answer)

        waiting: Deferred[None] = Deferred()

        @implementer(IRequestHook, IResponseHook)
        class Waits:
            def onRequest(self, request: IHookRequest) -> Deferred[None]:
                return waiting

            def onResponse(
                self, request: IHookRequest, response: IHookResponse
            ) -> Deferred[None]:
                return waiting

        chain, _ = self.chain([Waits()])
        pending = chain.runRequestNow(hookRequest())
        assert isinstance(pending, Deferred)
        self.assertNoResult(pending)
        waiting.callback(None)
        self.assertIsNone(self.successResultOf(pending))

        @implementer(IRequestHook)
        class Raises:
            def onRequest(self, request: IHookRequest) -> None:
                raise RuntimeError("broken")

        chain, _ = self.chain([Raises()])
        failed = chain.runRequestNow(hookRequest())
        assert isinstance(failed, Deferred)
        self.failureResultOf(failed, HookFailed)
        self.flushLoggedErrors(RuntimeError)

    def test_asynchronousHookInTheMiddle(self) -> None:
        """
        In a chain of a synchronous hook, one that waits, and another
        synchronous one, the third runs only once the second's Deferred
        fires; only the second is given a timeout, and the third's answer
        is the chain's.
        """
        log: list[str] = []
        waiting: Deferred[None] = Deferred()
        answer = HookResponse.error(403, "forbidden", "no")

        @implementer(IRequestHook)
        class Waits:
            def onRequest(self, request: IHookRequest) -> Deferred[None]:
                log.append("request:waits")
                return waiting

        clock = Clock()
        chain, observed = self.chain(
            [Recorder("a", log), Waits(), Recorder("c", log, answer)], clock
        )
        d = chain.runRequest(hookRequest())
        self.assertNoResult(d)
        self.assertEqual(log, ["request:a", "request:waits"])
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        waiting.callback(None)
        self.assertEqual(self.successResultOf(d), answer)
        self.assertEqual(log, ["request:a", "request:waits", "request:c"])
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(observed, [("h0", "pass"), ("h1", "pass"), ("h2", "respond")])


class HookSetTests(SynchronousTestCase):
    """
    Configured hooks are built once, global ones first.
    """

    def hookSet(
        self, log: list[str], globalSpecs: tuple[HookSpec, ...] = ()
    ) -> HookSet:
        return HookSet(
            HookContext(reactor=Clock()),
            globalSpecs=globalSpecs,
            factories={"recorder": RecorderFactory(log)},
        )

    def test_globalThenService(self) -> None:
        """
        Global hooks run before the service's own.
        """
        log: list[str] = []
        hooks = self.hookSet(
            log, (HookSpec("recorder", json.dumps({"label": "global"})),)
        )
        chain = hooks.chain((HookSpec("recorder", json.dumps({"label": "service"})),))
        assert chain is not None
        self.successResultOf(chain.runRequest(hookRequest()))
        self.assertEqual(log, ["request:global", "request:service"])

    def test_noHooksNoChain(self) -> None:
        """
        With no hooks at all there is no chain, so the proxy path pays
        nothing.
        """
        self.assertIsNone(self.hookSet([]).chain(()))

    def test_builtOnce(self) -> None:
        """
        The same spec builds one hook object, shared by every service.
        """
        hooks = self.hookSet([])
        spec = HookSpec("recorder", "{}")
        self.assertIs(hooks.build(spec), hooks.build(spec))

    def test_configErrors(self) -> None:
        """
        An unknown name lists the known ones; bad options name the hook.
        """
        hooks = self.hookSet([])
        with self.assertRaises(HookConfigError) as caught:
            hooks.chain((HookSpec("nosuch", "{}"),))
        self.assertIn("known: recorder", str(caught.exception))
        with self.assertRaises(HookConfigError) as caught:
            hooks.chain((HookSpec("recorder", json.dumps({"bad": 1})),))
        self.assertIn("hook recorder: bad option", str(caught.exception))

    def test_builtinsDiscovered(self) -> None:
        """
        The built-in headers hook is found as a plugin and provides the
        interfaces.
        """
        factory = availableFactories()["headers"]
        verifyObject(IHookFactory, factory)
        hook = factory.build({}, HookContext(reactor=Clock()))
        verifyObject(IRequestHook, hook)
        verifyObject(IResponseHook, hook)
        verifyObject(IHookRequest, hookRequest())
        verifyObject(IHookResponse, HookResponseHead(200, Headers()))


class HeadersHookTests(SynchronousTestCase):
    """
    The headers hook sets, adds and removes headers, with placeholders.
    """

    def test_rules(self) -> None:
        """
        Request and response rules apply, placeholders are filled, and
        removal comes before set and add.
        """
        hook = buildHook(
            "headers",
            {
                "request": {
                    "remove": ["X-Debug"],
                    "set": {"X-Client": "{client_address}"},
                    "add": {"X-Trace": "{request_id}/{service}"},
                },
                "response": {"set": {"Strict-Transport-Security": "max-age=60"}},
            },
        )
        request = hookRequest(headers={b"x-debug": [b"1"], b"x-trace": [b"up"]})
        head = HookResponseHead(200, Headers())
        outcome = self.successResultOf(runHooks([hook], request, head))
        upstream = outcome.upstreamHeaders
        self.assertIsNone(upstream.getRawHeaders(b"x-debug"))
        self.assertEqual(upstream.getRawHeaders(b"x-client"), [b"192.0.2.10"])
        self.assertEqual(
            upstream.getRawHeaders(b"x-trace"),
            [b"up", b"0123456789abcdef0123456789abcdef/service.api.orders"],
        )
        assert outcome.responseHeaders is not None
        self.assertEqual(
            outcome.responseHeaders.getRawHeaders(b"strict-transport-security"),
            [b"max-age=60"],
        )

    def test_invalidOptions(self) -> None:
        """
        Unknown placeholders, bad header names, control characters and
        unknown keys are configuration errors.
        """
        cases: list[dict[str, Any]] = [
            {"request": {"set": {"X-A": "{nope}"}}},
            {"request": {"set": {"Bad Name": "x"}}},
            {"request": {"set": {"X-A": "a\nb"}}},
            {"request": {"rename": {}}},
            {"upstream": {}},
            {"request": {"remove": "X-A"}},
        ]
        for options in cases:
            with self.assertRaises(HookConfigError, msg=repr(options)):
                buildHook("headers", options)

    def test_placeholderValuesCannotSplitHeaders(self) -> None:
        """
        A placeholder whose value holds CR or LF cannot start a new header.
        """
        hook = buildHook("headers", {"request": {"set": {"X-Path": "{path}"}}})
        request = hookRequest(path=b"/a\r\nX-Evil: 1")
        outcome = self.successResultOf(runHooks([hook], request))
        [value] = outcome.upstreamHeaders.getRawHeaders(b"x-path", [])
        self.assertNotIn(b"\n", value)


def _withHooks(
    h: Harness, log: list[str], *specs: HookSpec, service: tuple[HookSpec, ...] = ()
) -> None:
    """
    Give the harness's proxy a hook set with the recorder plugin.
    """
    h.root._context.hooks = HookSet(
        HookContext(reactor=h.clock),
        globalSpecs=specs,
        factories={"recorder": RecorderFactory(log), **availableFactories()},
        observe=h.metrics.observeHook,
    )
    h.registry.replaceAll(
        [
            ServiceEntry(
                "service.api.echo",
                (endpoint("10.0.0.1:80"),),
                Policy(hooks=service),
            )
        ]
    )


class ProxyHookTests(SynchronousTestCase):
    """
    Hooks on the real proxy path (in memory).
    """

    def test_requestAndResponseHooks(self) -> None:
        """
        Request hooks change what goes upstream; response hooks change
        what reaches the client; both are counted.
        """
        log: list[str] = []
        h = Harness([])
        _withHooks(h, log, HookSpec("recorder", '{"label": "g"}'))
        _, transport = h.send(GET)
        [call] = h.client.calls
        self.assertEqual(call.headers.getRawHeaders(b"x-seen"), [b"g"])
        response = FakeResponse(200, length=0)
        call.result.callback(response)
        response.end()
        self.assertIn(b"X-Response: g", transport.value())
        from prometheus_client import generate_latest

        text = generate_latest(h.metrics.registry).decode()
        self.assertIn(
            'monedge_hook_decisions_total{decision="pass",hook="recorder"} 2.0', text
        )

    def test_hookAnswersClient(self) -> None:
        """
        A request hook's answer goes to the client as a JSON error with the
        request id, and nothing goes upstream.
        """
        log: list[str] = []
        h = Harness([])
        _withHooks(h, log, service=(HookSpec("recorder", '{"answer": true}'),))
        _, transport = h.send(GET)
        self.assertEqual(h.client.calls, [])
        self.assertEqual(_status(transport), 403)
        body = _jsonBody(transport)
        self.assertEqual(body["code"], "forbidden")
        self.assertTrue(body["request_id"])

    def test_answerHeadersOnOtherAnswers(self) -> None:
        """
        Headers a request hook adds to answerHeaders go on a later hook's
        answer and on monedge's own refusals after the hooks ran, never on
        the upstream's response (response hooks own that).
        """
        marking = HookSpec("recorder", '{"label": "m", "mark": true}')
        answering = HookSpec("recorder", '{"label": "a", "answer": true}')
        h = Harness([])
        _withHooks(h, [], marking, service=(answering,))
        _, transport = h.send(GET)
        self.assertEqual(_status(transport), 403)
        self.assertIn(b"X-Answer: m\r\n", transport.value())
        h = Harness([])
        _withHooks(h, [], marking)
        _, transport = h.send(GET)
        h.client.calls[0].result.errback(ConnectionRefusedError())
        self.assertEqual(_status(transport), 502)
        self.assertIn(b"X-Answer: m\r\n", transport.value())
        _, transport = h.send(GET)
        response = FakeResponse(200, length=0)
        h.client.calls[1].result.callback(response)
        response.end()
        self.assertEqual(_status(transport), 200)
        self.assertNotIn(b"X-Answer", transport.value())

    def test_failingHookIs500(self) -> None:
        """
        A hook that raises gives 500 hook_failed and nothing goes upstream.
        """
        h = Harness([])
        log: list[str] = []
        _withHooks(h, log)

        @implementer(IRequestHook)
        class Broken:
            def onRequest(self, request: IHookRequest) -> None:
                raise RuntimeError("boom")

        hooks = h.root._context.hooks
        assert hooks is not None
        hooks._built[HookSpec("recorder", '{"label": "x"}')] = Broken()
        h.registry.replaceAll(
            [
                ServiceEntry(
                    "service.api.echo",
                    (endpoint("10.0.0.1:80"),),
                    Policy(hooks=(HookSpec("recorder", '{"label": "x"}'),)),
                )
            ]
        )
        _, transport = h.send(GET)
        self.assertEqual(_status(transport), 500)
        self.assertEqual(_jsonBody(transport)["code"], "hook_failed")
        self.assertEqual(h.client.calls, [])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_invalidServiceHooksIs503(self) -> None:
        """
        A service whose hooks cannot be built answers 503
        hook_config_invalid: never a silent pass.
        """
        h = Harness([])
        _withHooks(h, [], service=(HookSpec("nosuch", "{}"),))
        _, transport = h.send(GET)
        self.assertEqual(_status(transport), 503)
        self.assertEqual(_jsonBody(transport)["code"], "hook_config_invalid")
        self.assertEqual(h.client.calls, [])
        self.flushLoggedErrors()

    def test_failingResponseHookIs500(self) -> None:
        """
        A response hook that raises gives 500 hook_failed instead of the
        upstream's response, and the upstream body is dropped.
        """

        @implementer(IResponseHook)
        class Broken:
            def onResponse(
                self, request: IHookRequest, response: IHookResponse
            ) -> None:
                raise RuntimeError("boom")

        h = Harness([])
        _withHooks(h, [], service=(HookSpec("recorder", '{"label": "y"}'),))
        hooks = h.root._context.hooks
        assert hooks is not None
        hooks._built[HookSpec("recorder", '{"label": "y"}')] = Broken()
        h.root._cache.clear()
        _, transport = h.send(GET)
        response = FakeResponse(200, Headers({b"x-secret": [b"1"]}))
        h.client.calls[0].result.callback(response)
        self.assertTrue(response.transport.stopped)
        self.assertEqual(_status(transport), 500)
        self.assertNotIn(b"X-Secret", transport.value())
        self.flushLoggedErrors()


class RateLimitMetricsTests(SynchronousTestCase):
    """
    The ratelimit hook's counters reach monedge's /metrics.
    """

    def test_decisionsExported(self) -> None:
        """
        Allowed and limited requests are counted under the policy's name,
        with the bucket count and the Redis error counters.
        """
        from prometheus_client import generate_latest

        from monedge.observe.metrics import Metrics

        metrics = Metrics()
        hook = buildHook(
            "ratelimit",
            {"rate": "2/s", "burst": 2, "name": "api"},
            HookContext(reactor=Clock(), metrics=metrics),
        )
        for _ in range(3):
            self.successResultOf(runHooks([hook], hookRequest()))
        text = generate_latest(metrics.registry).decode()
        self.assertIn(
            'monedge_ratelimit_decisions_total{decision="allowed",policy="api"} 2.0',
            text,
        )
        self.assertIn(
            'monedge_ratelimit_decisions_total{decision="limited",policy="api"} 1.0',
            text,
        )
        self.assertIn('monedge_ratelimit_buckets{policy="api"} 1.0', text)
        self.assertIn('monedge_ratelimit_redis_outages_total{policy="api"} 0.0', text)
