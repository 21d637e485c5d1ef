"""
Secrets stay inside: L{monedge.rules.redact}'s rules on a table of inputs, the
admin C{/routes} document (one process and a C{--workers} group) built
from configuration full of secrets, and configuration errors that quote
options.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from monedge.hooks import HookConfigError, HookContext, HookSet
from monedge.registry import Endpoint, ServiceEntry
from monedge.rules.convention import HostTiers
from monedge.rules.policy import HookSpec, Policy, parseHooks
from monedge.rules.redact import (
    REDACTED,
    isSecretName,
    redactHook,
    redactHookOptions,
    redactString,
    redactText,
    redactURL,
    redactValue,
)
from monedge.runtime.admin import GroupRoutes, Routes
from monedge.testing import MemoryRegistry
from monedge.testing.hooks import buildHook
from monedge.upstream.balancer import Balancer

if TYPE_CHECKING:
    from monedge.runtime.workers import Worker, WorkerGroup

#: (a URL, as it is shown).
URLS: list[tuple[str, str]] = [
    ("https://idp.example.com/jwks", "https://idp.example.com/jwks"),
    ("http://127.0.0.1:9001", "http://127.0.0.1:9001"),
    ("https://[::1]:8443/a/b", "https://[::1]:8443/a/b"),
    ("redis://10.0.0.5:6379/0", "redis://10.0.0.5:6379/0"),
    ("redis://:pass@host:6379/0", "redis://***@host:6379/0"),
    ("redis://:p@ss@host:6379/0", "redis://***@host:6379/0"),
    ("redis://user:p@ss:w@rd@host/1", "redis://***@host/1"),
    ("redis://:pa/ss@host:6379/0", "redis://***@host:6379/0"),
    ("redis://:pa?ss@host:6379/0", "redis://***@host:6379/0"),
    ("redis://:pa#ss@host:6379/0", "redis://***@host:6379/0"),
    ("redis://:pa ss@host:6379/0", "redis://***@host:6379/0"),
    ("redis://:%40t%2F@host", "redis://***@host"),
    ("redis://default@host", "redis://***@host"),
    ("https://ghp_tok3n@github.com/x", "https://***@github.com/x"),
    ("https://idp/jwks?api_key=k3y", "https://idp/jwks?***"),
    ("https://idp/jwks?a=1&token=t#frag", "https://idp/jwks?***"),
    ("https://idp/jwks#access_token=t", "https://idp/jwks#***"),
    ("https://idp/?", "https://idp/?***"),
    ("HTTPS://U:P@IDP/X?Q", "HTTPS://***@IDP/X?***"),
    ("https://idp/a@b", "https://***@b"),
    ("https://idp/x?email=a@b", "https://***@b"),
    ("  https://u:p@idp/", "  https://***@idp/"),
    ("not a url", "not a url"),
    ("host:6379", "host:6379"),
    ("", ""),
]

#: (free text, as it is shown).
TEXTS: list[tuple[str, str]] = [
    ("no url here", "no url here"),
    (
        "redis: the URL 'redis://:p@ss@/0' has no host",
        "redis: the URL 'redis://***@/0' has no host",
    ),
    (
        "auth service https://u:s@auth/check?k=v failed: refused",
        "auth service https://***@auth/check?*** failed: refused",
    ),
    (
        "two: http://a:b@x/ and https://y/?t=1, done",
        "two: http://***@x/ and https://y/?*** done",
    ),
    (
        "expected \"host:port\", got 'https://user:pw@10.0.0.1:443'",
        "expected \"host:port\", got 'https://***@10.0.0.1:443'",
    ),
    (
        "cannot use 'https://u:pw@h/x?t=1' or \"redis://:a b@r\"",
        "cannot use 'https://***@h/x?***' or \"redis://***@r\"",
    ),
    ("got 'redis://:it''s@h/0', then", "got 'redis://***@h/0', then"),
    ("ConnectionRefusedError: 111", "ConnectionRefusedError: 111"),
    ("a://b", "a://b"),
]

#: Option names that are secrets by name, and some that are not.
SECRET_NAMES = [
    "password",
    "redis-password",
    "Passwd",
    "secret",
    "client-secret",
    "token",
    "access_token",
    "credentials",
    "private-key",
    "api-key",
    "apikey",
    "API_KEY",
    "signing-key",
    "hmac_key",
    "authorization",
    "Authorisation",
    "cookie",
    "session-id",
    "signature",
    "bearer",
]
PLAIN_NAMES = [
    "key",
    "keys-file",
    "key-id-header",
    "name",
    "url",
    "jwks-url",
    "redis",
    "rate",
    "forward-headers",
    "identity-headers",
    "timeout",
]


class RedactURLTests(SynchronousTestCase):
    """
    L{redactURL} hides a URL's user-info, query and fragment, and nothing
    else.
    """

    def test_table(self) -> None:
        """
        Each URL in the table is shown as the table says.
        """
        for url, shown in URLS:
            self.assertEqual(redactURL(url), shown, url)

    def test_idempotent(self) -> None:
        """
        Redacting what was redacted changes nothing, for every function.
        """
        for _, shown in URLS:
            self.assertEqual(redactURL(shown), shown)
            self.assertEqual(redactString(shown), shown)
        for _, shown in TEXTS:
            self.assertEqual(redactText(shown), shown)

    def test_wholeStringIsOneURL(self) -> None:
        """
        A configured string that starts with a URL is one URL to its end,
        so a password with a space in it is hidden whole; in free text, a
        URL ends at whitespace.
        """
        self.assertEqual(
            redactString("redis://:two words@host/0"), "redis://***@host/0"
        )
        self.assertEqual(
            redactString("see redis://:pw@host/0 now"), "see redis://***@host/0 now"
        )


class RedactTextTests(SynchronousTestCase):
    """
    L{redactText} redacts every URL in a line of text.
    """

    def test_table(self) -> None:
        """
        Each text in the table is shown as the table says.
        """
        for text, shown in TEXTS:
            self.assertEqual(redactText(text), shown, text)


class SecretNameTests(SynchronousTestCase):
    """
    Options whose names say they hold secrets are hidden whole.
    """

    def test_names(self) -> None:
        """
        Each secret name is recognised, and none of the built-in hooks'
        plain option names is.
        """
        for name in SECRET_NAMES:
            self.assertTrue(isSecretName(name), name)
        for name in PLAIN_NAMES:
            self.assertFalse(isSecretName(name), name)

    def test_redactValue(self) -> None:
        """
        Nested mappings and lists: secret-named values hidden whatever
        they are, URLs redacted, everything else (numbers, booleans, null,
        keys) kept.
        """
        self.assertEqual(
            redactValue(
                {
                    "password": {"nested": "x"},
                    "client-secret": 42,
                    "upstreams": [
                        {"url": "https://u:p@h/x?y", "weight": 2},
                        "redis://:pw@r/0",
                    ],
                    "enabled": True,
                    "note": None,
                    "text": "plain",
                }
            ),
            {
                "password": REDACTED,
                "client-secret": REDACTED,
                "upstreams": [
                    {"url": "https://***@h/x?***", "weight": 2},
                    "redis://***@r/0",
                ],
                "enabled": True,
                "note": None,
                "text": "plain",
            },
        )


class HeadersHookDisplayTests(SynchronousTestCase):
    """
    The headers hook's rules are shown as header names under their
    actions, never with their values.
    """

    def test_namesOnly(self) -> None:
        """
        set and add show the header names they set; remove its list; any
        value is gone.
        """
        options = {
            "request": {
                "set": {
                    "Authorization": "Bearer s3cret",
                    "X-Client": "{client_address}",
                },
                "remove": ["X-Debug"],
            },
            "response": {"add": {"X-Api-Key": "k3y"}},
        }
        shown = redactHookOptions("headers", options)
        self.assertEqual(
            shown,
            {
                "request": {
                    "set": ["Authorization", "X-Client"],
                    "remove": ["X-Debug"],
                },
                "response": {"add": ["X-Api-Key"]},
            },
        )
        self.assertEqual(redactValue(shown), shown)
        self.assertNotIn("s3cret", json.dumps(shown))

    def test_malformedHidden(self) -> None:
        """
        Options the hook would refuse show no value either: anything not
        in the rules' shape is hidden whole.
        """
        for options, shown in [
            ("Bearer s3cret", REDACTED),
            (["s3cret"], REDACTED),
            ({"request": "s3cret"}, {"request": REDACTED}),
            ({"extra": {"set": {"A": "s3cret"}}}, {"extra": REDACTED}),
            ({"request": {"set": "s3cret"}}, {"request": {"set": REDACTED}}),
            ({"request": {"oops": {"A": "s"}}}, {"request": {"oops": REDACTED}}),
            (
                {"request": {"remove": ["A", 7]}},
                {"request": {"remove": ["A", REDACTED]}},
            ),
        ]:
            self.assertEqual(redactHookOptions("headers", options), shown, options)

    def test_otherHooksByTheGeneralRule(self) -> None:
        """
        Other hooks' options follow the general rule: URL user-info and
        queries, and secret-named options.
        """
        self.assertEqual(
            redactHook(
                {
                    "name": "ratelimit",
                    "options": {"rate": "10/s", "redis": "redis://:p@ss@h:6379/0"},
                }
            ),
            {
                "name": "ratelimit",
                "options": {"rate": "10/s", "redis": "redis://***@h:6379/0"},
            },
        )
        self.assertEqual(
            redactHook({"name": "add-header", "options": {"name": "X", "token": "t"}}),
            {"name": "add-header", "options": {"name": "X", "token": REDACTED}},
        )


#: Every secret the configuration below holds; none may be shown.
SECRETS = [
    "hdr-s3cret-1",
    "hdr-s3cret-2",
    "ext-s3cret-3",
    "ext-s3cret-4",
    "jwks-s3cret-5",
    "redis-p@ss",
    "tok-s3cret-6",
    "glob-s3cret-7",
    "reg-s3cret-8",
    "src-s3cret-9",
]

SERVICE_HOOKS: list[Any] = [
    {
        "name": "headers",
        "options": {
            "request": {"set": {"Authorization": "Bearer hdr-s3cret-1"}},
            "response": {"add": {"X-Api-Key": "hdr-s3cret-2"}},
        },
    },
    {
        "name": "auth",
        "options": {
            "mode": "external",
            "url": "https://edge:ext-s3cret-3@auth.internal/check?key=ext-s3cret-4",
        },
    },
    {
        "name": "auth",
        "options": {
            "mode": "jwt",
            "jwks-url": "https://idp.example.com/jwks?client_secret=jwks-s3cret-5",
        },
    },
    {
        "name": "ratelimit",
        "options": {"rate": "10/s", "redis": "redis://:redis-p@ss@10.0.0.5:6379/0"},
    },
    {"name": "third-party", "options": {"api-token": "tok-s3cret-6"}},
]

GLOBAL_HOOKS: list[Any] = [
    {"name": "headers", "options": {"request": {"set": {"X-Edge": "glob-s3cret-7"}}}}
]


class _FailingRegistry(MemoryRegistry):
    """
    A registry whose description reports an error quoting a URL with
    credentials, as a failed static reload can.
    """

    def describe(self) -> Mapping[str, Any]:
        return {
            "kind": "static",
            "last_error": "services.yaml: services.x.endpoints[0]: expected"
            " \"host:port\", got 'https://user:reg-s3cret-8@10.0.0.1:443'",
        }


class _Worker:
    """
    What the group's /routes reads of a worker.
    """

    alive = True

    def __init__(self, number: int) -> None:
        self.number = number

    def asJSON(self) -> dict[str, Any]:
        return {"worker": self.number, "alive": self.alive}


class _Group:
    """
    What the group's /routes reads of a worker group.
    """

    def __init__(self, count: int) -> None:
        self.workers = [_Worker(number) for number in range(count)]


class _Request(DummyRequest):
    """
    A DummyRequest with the disconnection flag a real request has.
    """

    _disconnected = False


def routesDocument() -> dict[str, Any]:
    """
    The /routes document for a registry and global hooks full of secrets.
    """
    registry = _FailingRegistry()
    registry.put(
        ServiceEntry(
            "service.api.orders",
            (Endpoint("10.0.0.1", 8080),),
            Policy(hooks=parseHooks(SERVICE_HOOKS)),
            source={"kind": "static", "file": "https://u:src-s3cret-9@cfg/x.yaml"},
        )
    )
    routes = Routes(
        registry, HostTiers({}), Balancer(Clock()), parseHooks(GLOBAL_HOOKS)
    )
    return routes.document()


class RoutesTests(SynchronousTestCase):
    """
    /routes shows the configuration without any secret in it.
    """

    def test_noSecretShown(self) -> None:
        """
        None of the configuration's secrets appears anywhere in the
        document, while what identifies each hook and URL does.
        """
        text = json.dumps(routesDocument())
        for secret in SECRETS:
            self.assertNotIn(secret, text)
        for shown in [
            "https://***@auth.internal/check?***",
            "https://idp.example.com/jwks?***",
            "redis://***@10.0.0.5:6379/0",
            "https://***@10.0.0.1:443",
            '"api-token": "***"',
        ]:
            self.assertIn(shown, text)

    def test_hooksShown(self) -> None:
        """
        Each hook is listed by name with its redacted options, the global
        ones under global_hooks: the headers hooks as header names.
        """
        document = routesDocument()
        [service] = document["services"]
        hooks = service["policy"]["hooks"]
        self.assertEqual(
            [hook["name"] for hook in hooks],
            ["headers", "auth", "auth", "ratelimit", "third-party"],
        )
        self.assertEqual(
            hooks[0]["options"],
            {"request": {"set": ["Authorization"]}, "response": {"add": ["X-Api-Key"]}},
        )
        self.assertEqual(
            document["global_hooks"],
            [{"name": "headers", "options": {"request": {"set": ["X-Edge"]}}}],
        )

    def test_policyAsJSONIsConfiguration(self) -> None:
        """
        Policy.asJSON stays the configuration as data (it reads back as
        the same policy): the redaction is /routes' own, on the way out.
        """
        from monedge.rules.policy import parsePolicy

        policy = Policy(hooks=parseHooks(SERVICE_HOOKS))
        self.assertEqual(parsePolicy(policy.asJSON()), policy)

    def test_groupRoutesRedacts(self) -> None:
        """
        With --workers, /routes is the answering worker's table, itself
        redacted again: a worker's table with a secret in it (from a worker
        of another version) is shown without it.
        """
        leaky = {
            "registry": {"last_error": "got 'redis://:redis-p@ss@h/0'"},
            "global_hooks": [{"name": "x", "options": {"password": "tok-s3cret-6"}}],
        }

        def fetch(worker: Worker, path: str) -> Deferred[tuple[int, bytes]]:
            self.assertEqual(path, "/routes")
            return succeed((200, json.dumps(leaky).encode()))

        page = GroupRoutes(cast("WorkerGroup", _Group(1)), fetch)
        request = _Request([b""])
        page.render(request)
        self.assertEqual(request.finished, 1)
        body = b"".join(request.written).decode()
        for secret in SECRETS:
            self.assertNotIn(secret, body)
        document = json.loads(body)
        self.assertEqual(document["registry"]["last_error"], "got 'redis://***@h/0'")
        self.assertEqual(document["answered_by"], 0)
        self.assertEqual(
            document["global_hooks"],
            [{"name": "x", "options": {"password": REDACTED}}],
        )


class ConfigErrorTests(SynchronousTestCase):
    """
    Configuration errors, which are logged and printed at startup, quote
    no secret.
    """

    def test_hookSetRedactsReasons(self) -> None:
        """
        A hook's refusal that quotes a URL (any plugin's) reaches the
        operator through HookSet without the URL's user-info or query.
        """
        from zope.interface import implementer

        from monedge.interfaces import IHookFactory

        @implementer(IHookFactory)
        class Quoting:
            name = "quoting"
            description = "refuses every configuration, quoting it"

            def build(self, options: Mapping[str, Any], context: Any) -> object:
                raise HookConfigError(f"upstream: cannot use {options['upstream']!r}")

        hooks = HookSet(HookContext(reactor=Clock()), factories={"quoting": Quoting()})
        spec = HookSpec("quoting", json.dumps({"upstream": "https://u:pw@h/x?t=1"}))
        error = self.assertRaises(HookConfigError, hooks.build, spec)
        self.assertEqual(
            str(error), "hook quoting: upstream: cannot use 'https://***@h/x?***'"
        )

    def test_headersHookErrorsQuoteNoValue(self) -> None:
        """
        The headers hook's refusals name the header, never its value.
        """
        for options, expected in [
            (
                {"request": {"set": {"Authorization": 12345678}}},
                "request.set.Authorization: expected a string, got int",
            ),
            (
                {"request": {"set": {"X-Config": '{"token": "s3cret"}'}}},
                "request.set.X-Config: unknown placeholder (known: ",
            ),
            (
                {"request": {"set": {"X-Client": "{client_adress}"}}},
                "request.set.X-Client: unknown placeholder {client_adress} (known: ",
            ),
        ]:
            error = self.assertRaises(HookConfigError, buildHook, "headers", options)
            self.assertTrue(str(error).startswith(expected), str(error))
            self.assertNotIn("s3cret", str(error))
            self.assertNotIn("12345678", str(error))

    def test_hooksPolicyErrorQuotesNoOptions(self) -> None:
        """
        A hooks setting that is not a list is refused without quoting it:
        it may hold options with secrets.  A bare name is still named.
        """
        error = self.assertRaises(
            ValueError,
            parseHooks,
            {"name": "ratelimit", "options": {"redis": "redis://:pw@h/0"}},
        )
        self.assertEqual(str(error), "expected a list of hooks, got a mapping")
        error = self.assertRaises(ValueError, parseHooks, "ratelimit")
        self.assertEqual(str(error), "expected a list of hooks, got 'ratelimit'")
