"""
The C{cors} hook, run as monedge runs hooks (L{monedge.testing.hooks}): its
options, its answers to preflights, and the headers it adds to answers to
cross-origin requests.
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import yaml
from twisted.internet.task import Clock
from twisted.plugin import IPlugin
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from monedge.builtin.cors import (
    DEFAULT_ALLOW_HEADERS,
    DEFAULT_EXPOSE_HEADERS,
    DEFAULT_MAX_AGE,
    DEFAULT_METHODS,
    OPTIONS,
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
from monedge.rules.syntax import parseDuration
from monedge.tap import Options
from monedge.testing.hooks import HookOutcome, buildHook, hookRequest, runHooks
from tests.test_docs import block, readDoc, span, table

APP = b"https://app.example.com"
PATH = b"/payments.v1.Payments/Create"

#: What grpc-web-javascript asks for before a unary call.
GRPC_WEB_HEADERS = b"content-type,x-grpc-web,x-user-agent,grpc-timeout"


def preflight(
    origin: bytes = APP, method: bytes = b"POST", asked: bytes | None = GRPC_WEB_HEADERS
) -> dict[bytes, list[bytes]]:
    headers = {b"origin": [origin], b"access-control-request-method": [method]}
    if asked is not None:
        headers[b"access-control-request-headers"] = [asked]
    return headers


class CorsTestCase(SynchronousTestCase):
    """
    Helpers: run a cors hook on a request (and, if it passes, an upstream
    response).
    """

    def runCors(
        self,
        options: Mapping[str, Any],
        headers: Mapping[bytes, Sequence[bytes]],
        method: bytes = b"OPTIONS",
        response: Headers | None = None,
    ) -> HookOutcome:
        hook = buildHook("cors", options)
        head = None if response is None else HookResponseHead(200, response)
        outcome = self.successResultOf(
            runHooks(
                [hook], hookRequest(method=method, path=PATH, headers=headers), head
            )
        )
        self.assertIsNone(outcome.error)
        return outcome

    def answerHeaders(self, answer: HookResponse | None) -> dict[bytes, bytes]:
        assert answer is not None
        self.assertEqual(answer.status, 204)
        self.assertIsNone(answer.body)
        self.assertIsNone(answer.code)
        names = [name.lower() for name, _ in answer.headers]
        self.assertEqual(len(names), len(set(names)), "a header twice")
        return {name.lower(): value for name, value in answer.headers}


class FactoryTests(SynchronousTestCase):
    """
    The plugin is found, and its factory and hook provide the interfaces.
    """

    def test_interfaces(self) -> None:
        """
        C{cors} is a built-in plugin whose factory provides IHookFactory
        and IPlugin, and whose hook is both a request and a response hook.
        """
        factory = availableFactories()["cors"]
        verifyObject(IHookFactory, factory)
        verifyObject(IPlugin, factory)
        hook = factory.build({"allow-origins": ["https://a.example"]}, None)
        verifyObject(IRequestHook, hook)
        verifyObject(IResponseHook, hook)


class OptionTests(SynchronousTestCase):
    """
    Options are checked when the hook is built, and fail closed.
    """

    def test_invalid(self) -> None:
        """
        Every bad option is refused with a reason naming it: allow-origins
        missing, empty, not a list, an origin with a path or no scheme, "*"
        among origins; a method or header that is not a token; a bad
        max-age; a non-boolean allow-credentials; "*" with credentials; an
        unknown option.
        """
        origins = ["https://app.example.com"]
        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "allow-origins: required"),
            ({"allow-origins": []}, "allow-origins: expected a list"),
            ({"allow-origins": "https://a.example"}, "allow-origins: expected"),
            ({"allow-origins": ["https://a.example/"]}, "allow-origins: not an"),
            ({"allow-origins": ["a.example"]}, "allow-origins: not an origin"),
            ({"allow-origins": [7]}, "allow-origins: not an origin"),
            ({"allow-origins": ["*", "https://a.example"]}, 'allow-origins: "*"'),
            ({"allow-origins": origins, "allow-methods": ["P OST"]}, "allow-methods"),
            ({"allow-origins": origins, "allow-methods": "*"}, "allow-methods"),
            ({"allow-origins": origins, "allow-headers": ["a:b"]}, "allow-headers"),
            ({"allow-origins": origins, "expose-headers": "x"}, "expose-headers"),
            ({"allow-origins": origins, "max-age": "ten"}, "max-age"),
            ({"allow-origins": origins, "max-age": 0}, "max-age"),
            ({"allow-origins": origins, "allow-credentials": "yes"}, "allow-cred"),
            (
                {"allow-origins": "*", "allow-credentials": True},
                'allow-credentials: cannot be true with allow-origins "*"',
            ),
            ({"allow-origins": origins, "allow-origin": origins}, "unknown option"),
        ]
        for options, reason in cases:
            with self.assertRaises(HookConfigError, msg=options) as caught:
                buildHook("cors", options)
            self.assertIn(reason, str(caught.exception), options)

    def test_invalidServiceHooks(self) -> None:
        """
        A bad cors configuration in a service's hooks makes its chain
        unbuildable (the service then answers 503 hook_config_invalid),
        with the reason prefixed by the hook's name.
        """
        hooks = HookSet(HookContext(reactor=Clock()))
        spec = HookSpec("cors", json.dumps({"allow-origins": "*", "max-age": -1}))
        with self.assertRaises(HookConfigError) as caught:
            hooks.chain((spec,))
        self.assertIn("hook cors: max-age:", str(caught.exception))


class PreflightTests(CorsTestCase):
    """
    The hook answers every preflight itself: granted with the CORS headers,
    refused without them.
    """

    def test_granted(self) -> None:
        """
        A gRPC-Web preflight from an allowed origin, with the defaults, is
        answered 204 with the origin, the allowed methods and headers,
        the max age, and Vary; nothing goes upstream.
        """
        outcome = self.runCors({"allow-origins": [APP.decode()]}, preflight())
        headers = self.answerHeaders(outcome.response)
        self.assertEqual(
            headers,
            {
                b"access-control-allow-origin": APP,
                b"access-control-allow-methods": b"GET, HEAD, POST, PUT, PATCH, DELETE",
                b"access-control-allow-headers": (
                    b"content-type, x-grpc-web, x-user-agent, grpc-timeout,"
                    b" authorization"
                ),
                b"access-control-max-age": b"600",
                b"vary": b"Origin, Access-Control-Request-Method,"
                b" Access-Control-Request-Headers",
            },
        )

    def test_options(self) -> None:
        """
        The options shape the answer: credentials (the origin, never "*",
        and Allow-Credentials), the methods and headers listed, max-age as
        a duration in whole seconds; an origin configured with capitals
        matches the browser's lowercase one.
        """
        options = {
            "allow-origins": ["https://App.Example.com", "https://b.example:8443"],
            "allow-methods": ["POST"],
            "allow-headers": ["Content-Type", "X-Grpc-Web"],
            "max-age": "1h",
            "allow-credentials": True,
        }
        outcome = self.runCors(options, preflight(asked=b"x-grpc-web , content-type"))
        headers = self.answerHeaders(outcome.response)
        self.assertEqual(headers[b"access-control-allow-origin"], APP)
        self.assertEqual(headers[b"access-control-allow-credentials"], b"true")
        self.assertEqual(headers[b"access-control-allow-methods"], b"POST")
        self.assertEqual(
            headers[b"access-control-allow-headers"], b"content-type, x-grpc-web"
        )
        self.assertEqual(headers[b"access-control-max-age"], b"3600")
        outcome = self.runCors(
            options, preflight(b"https://b.example:8443", asked=None)
        )
        headers = self.answerHeaders(outcome.response)
        self.assertEqual(
            headers[b"access-control-allow-origin"], b"https://b.example:8443"
        )

    def test_anyOrigin(self) -> None:
        """
        With allow-origins "*" (no credentials) any origin is granted and
        told "*"; with allow-headers "*" the headers asked for are echoed.
        """
        options = {"allow-origins": "*", "allow-headers": "*"}
        outcome = self.runCors(
            options, preflight(b"https://x.example", asked=b"X-A,x-b")
        )
        headers = self.answerHeaders(outcome.response)
        self.assertEqual(headers[b"access-control-allow-origin"], b"*")
        self.assertEqual(headers[b"access-control-allow-headers"], b"x-a, x-b")
        self.assertNotIn(b"access-control-allow-credentials", headers)

    def test_refused(self) -> None:
        """
        A preflight from an origin not allowed, or asking for a method or
        a header not allowed, is answered 204 with Vary and no
        Access-Control-* header (the browser then refuses the call), and
        never goes upstream.
        """
        options = {"allow-origins": [APP.decode()]}
        for headers in [
            preflight(b"https://evil.example"),
            preflight(b"null"),
            preflight(APP + b"/"),
            preflight(method=b"PROPFIND"),
            preflight(asked=GRPC_WEB_HEADERS + b",x-secret"),
        ]:
            outcome = self.runCors(options, headers)
            answer = self.answerHeaders(outcome.response)
            self.assertEqual(list(answer), [b"vary"], headers)

    def test_notPreflights(self) -> None:
        """
        An OPTIONS without Access-Control-Request-Method, or with two
        Origins, is no preflight: it passes (to the upstream).
        """
        options = {"allow-origins": [APP.decode()]}
        for headers in [
            {b"origin": [APP]},
            {b"access-control-request-method": [b"POST"]},
            {**preflight(), b"origin": [APP, APP]},
        ]:
            outcome = self.runCors(options, headers)
            self.assertIsNone(outcome.response, headers)


class ResponseTests(CorsTestCase):
    """
    Requests other than preflights pass; answers to allowed origins are
    marked readable.
    """

    def test_allowedOrigin(self) -> None:
        """
        A call from an allowed origin passes unchanged; its response gets
        the origin, the exposed headers and Vary: Origin (added to the
        upstream's Vary), replacing any CORS header the upstream sent.
        """
        upstream = Headers(
            {
                b"vary": [b"Accept-Encoding"],
                b"access-control-allow-origin": [b"*"],
                b"content-type": [b"application/grpc-web+proto"],
            }
        )
        request = {b"origin": [APP], b"content-type": [b"application/grpc-web+proto"]}
        outcome = self.runCors(
            {"allow-origins": [APP.decode()]}, request, b"POST", upstream
        )
        self.assertIsNone(outcome.response)
        self.assertEqual(outcome.upstreamHeaders.getRawHeaders(b"origin"), [APP])
        headers = outcome.responseHeaders
        assert headers is not None
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [APP])
        self.assertEqual(
            headers.getRawHeaders(b"access-control-expose-headers"),
            [b"grpc-status, grpc-message, grpc-status-details-bin"],
        )
        self.assertEqual(
            headers.getRawHeaders(b"vary"), [b"Accept-Encoding", b"Origin"]
        )
        self.assertFalse(headers.hasHeader(b"access-control-allow-credentials"))

    def test_credentialsAndNoExpose(self) -> None:
        """
        With credentials, the answer names the origin and allows
        credentials; with expose-headers [] none is exposed.
        """
        options = {
            "allow-origins": [APP.decode()],
            "allow-credentials": True,
            "expose-headers": [],
        }
        outcome = self.runCors(options, {b"origin": [APP]}, b"GET", Headers())
        headers = outcome.responseHeaders
        assert headers is not None
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [APP])
        self.assertEqual(
            headers.getRawHeaders(b"access-control-allow-credentials"), [b"true"]
        )
        self.assertFalse(headers.hasHeader(b"access-control-expose-headers"))

    def test_untouched(self) -> None:
        """
        A request without Origin, or from an origin not allowed, passes and
        its response is left as the upstream sent it.
        """
        for request in [{}, {b"origin": [b"https://evil.example"]}]:
            upstream = Headers({b"x-a": [b"1"]})
            outcome = self.runCors(
                {"allow-origins": [APP.decode()]}, request, b"POST", upstream
            )
            self.assertIsNone(outcome.response)
            headers = outcome.responseHeaders
            assert headers is not None
            self.assertEqual(list(headers.getAllRawHeaders()), [(b"X-A", [b"1"])])


class DocsTests(SynchronousTestCase):
    """
    docs/hooks.md and docs/protocols.md say what the hook does.
    """

    def test_optionsTable(self) -> None:
        """
        hooks.md's cors-options table lists every option the hook reads,
        in order, with the defaults the code has.
        """
        rows = table(readDoc("hooks.md"), "cors-options")
        self.assertEqual(tuple(span(row["Option"]) for row in rows), OPTIONS)
        defaults = {span(row["Option"]): row["Default"].strip("`") for row in rows}
        self.assertEqual(defaults["allow-origins"], "required")
        for name, value in [
            ("allow-methods", DEFAULT_METHODS),
            ("allow-headers", DEFAULT_ALLOW_HEADERS),
            ("expose-headers", DEFAULT_EXPOSE_HEADERS),
        ]:
            self.assertEqual(defaults[name], "[" + ", ".join(value) + "]")
        self.assertEqual(parseDuration(defaults["max-age"]), DEFAULT_MAX_AGE)
        self.assertEqual(defaults["allow-credentials"], "false")

    def test_examples(self) -> None:
        """
        hooks.md's policy example and protocols.md's --hook example build
        a cors hook, the latter through monedge's own option parsing.
        """
        [hook] = yaml.safe_load(block(readDoc("hooks.md"), "cors-options"))["hooks"]
        self.assertEqual(hook["name"], "cors")
        buildHook("cors", hook["options"])
        command = block(readDoc("protocols.md"), "cors-hook").replace("\\\n", " ")
        words = shlex.split(command)
        options = Options()
        options.opt_hook(words[words.index("--hook") + 1])
        hooks = HookSet(HookContext(reactor=Clock()), globalSpecs=options["hook"])
        chain = hooks.chain(())
        assert chain is not None
        self.assertEqual(chain.names, ["cors"])
