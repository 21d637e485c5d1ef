"""
The C{auth} hook: option validation, identity-header stripping, the
api-key, jwt and external modes on a fake clock and a fake HTTP client, and
all three modes end to end through a real C{twistd monedge} process.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.plugin import IPlugin
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.server import Request
from zope.interface.verify import verifyObject

import monedge.builtin.auth.jwt as jwtmode
from monedge.builtin.auth import (
    CHALLENGE,
    CHALLENGE_INVALID,
    AuthHookFactory,
    AuthUnavailable,
    claimValue,
)
from monedge.hooks import (
    HookConfigError,
    HookContext,
    HookFailed,
    HookRequest,
    HookResponse,
    HookSet,
    availableFactories,
)
from monedge.interfaces import IHookFactory, IRequestHook
from monedge.registry import Endpoint, ServiceEntry
from monedge.rules.policy import HookSpec
from monedge.testing import MemoryRegistry, Received, freePort
from monedge.testing.hooks import HookOutcome, buildHook, hookRequest, runHooks
from tests.e2e import ProxyTestCase

ISSUER = "https://idp.example.com/"
AUDIENCE = "orders"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())


def rsaJWK(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    """
    The public half of C{key} as a JWK with C{kid}.
    """
    document: dict[str, Any] = json.loads(str(RSAAlgorithm.to_jwk(key.public_key())))
    document.update(kid=kid, use="sig")
    return document


def ecJWK(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    """
    The public half of C{key} as a JWK with C{kid}.
    """
    document: dict[str, Any] = json.loads(str(ECAlgorithm.to_jwk(key.public_key())))
    document.update(kid=kid, use="sig")
    return document


def jwkSet(*keys: dict[str, Any]) -> dict[str, Any]:
    """
    A JWK set of C{keys}.
    """
    return {"keys": list(keys)}


JWKS = jwkSet(rsaJWK(RSA_KEY, "rsa1"), ecJWK(EC_KEY, "ec1"))


def token(
    key: Any = RSA_KEY,
    kid: str | None = "rsa1",
    alg: str = "RS256",
    **claims: Any,
) -> bytes:
    """
    A signed JWT with valid standard claims, changed by C{claims} (a claim
    given as L{None} is left out).
    """
    now = int(time.time())
    payload = {
        "sub": "alice",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + 300,
        **claims,
    }
    payload = {k: v for k, v in payload.items() if v is not None}
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(payload, key, algorithm=alg, headers=headers).encode("ascii")


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def handMade(
    header: Mapping[str, Any],
    payload: Mapping[str, Any],
    sign: Callable[[bytes], bytes] = lambda data: b"",
) -> bytes:
    """
    A JWT built by hand, for tokens no library will sign.
    """
    signing = (
        _b64(json.dumps(header).encode()) + b"." + _b64(json.dumps(payload).encode())
    )
    return signing + b"." + _b64(sign(signing))


def claims(**extra: Any) -> dict[str, Any]:
    """
    Valid standard claims.
    """
    now = int(time.time())
    return {"sub": "alice", "iss": ISSUER, "aud": AUDIENCE, "exp": now + 300, **extra}


def bearer(value: bytes) -> dict[bytes, list[bytes]]:
    """
    Request headers with C{Authorization: Bearer value} and a forged
    identity header.
    """
    return {b"authorization": [b"Bearer " + value], b"x-user-id": [b"forged"]}


class Answer:
    """
    What the fake HTTP client answers: a treq response's C{code},
    C{headers}, C{json()} and C{content()}.
    """

    def __init__(
        self,
        code: int = 200,
        document: object = None,
        headers: Mapping[bytes, list[bytes]] | None = None,
        body: bytes = b"",
    ) -> None:
        self.code = code
        self.document = document
        self.headers = Headers(dict(headers or {}))
        self.body = body

    def json(self) -> Deferred[Any]:
        """
        The document, as treq's C{json()}.
        """
        return succeed(json.loads(json.dumps(self.document)))

    def content(self) -> Deferred[bytes]:
        """
        The body, as treq's C{content()}.
        """
        return succeed(self.body)


class FakeHTTP:
    """
    A stand-in for the hook context's treq client.  C{get} serves
    C{self.jwks} (or fails, or holds until the test fires it); C{request}
    asks C{self.responder}.
    """

    def __init__(self, jwks: object = JWKS) -> None:
        self.jwks = jwks
        self.failing: Exception | None = None
        self.code = 200
        self.hold = False
        self.held: list[Deferred[Any]] = []
        self.gets: list[tuple[str, dict[str, Any]]] = []
        self.requests: list[tuple[str, str, Headers, dict[str, Any]]] = []
        self.responder: Callable[[str, Headers], Answer] = lambda url, h: Answer()

    def get(self, url: str, **kwargs: Any) -> Deferred[Any]:
        """
        Record a GET of the JWK set and answer it.
        """
        self.gets.append((url, kwargs))
        if self.hold:
            held: Deferred[Any] = Deferred()
            self.held.append(held)
            return held
        if self.failing is not None:
            return fail(self.failing)
        return succeed(Answer(self.code, self.jwks))

    def request(
        self, method: str, url: str, headers: Headers, **kwargs: Any
    ) -> Deferred[Any]:
        """
        Record a request to the auth service and answer with the responder.
        """
        self.requests.append((method, url, headers, kwargs))
        try:
            return succeed(self.responder(url, headers))
        except Exception:
            return fail()


@contextmanager
def described(**case: object) -> Iterator[None]:
    """
    Name the case in a failure inside the block (trial runs no subtests).
    """
    try:
        yield
    except AssertionError as e:
        raise SynchronousTestCase.failureException(f"{case}: {e}") from e


def run(
    case: SynchronousTestCase,
    hook: object,
    request: HookRequest,
    clock: Clock | None = None,
) -> HookOutcome:
    """
    Run C{hook} on C{request}; the outcome, which must be ready now.
    """
    return case.successResultOf(runHooks([hook], request, clock=clock))


def challenge(answer: HookResponse | None) -> bytes | None:
    """
    The C{WWW-Authenticate} of an answer.
    """
    assert answer is not None
    found = [v for n, v in answer.headers if n.lower() == b"www-authenticate"]
    return found[0] if found else None


class Refused(SynchronousTestCase):
    """
    Assertions on refusals.
    """

    def assertRefused(
        self, outcome: HookOutcome, header: bytes = CHALLENGE_INVALID
    ) -> None:
        """
        The hook answered 401 unauthorized with C{header} as its
        challenge, and no identity went upstream.
        """
        self.assertIsNone(outcome.error)
        answer = outcome.response
        self.assertIsNotNone(answer, "the request passed")
        assert answer is not None
        self.assertEqual((answer.status, answer.code), (401, "unauthorized"))
        self.assertIsNone(answer.body)
        self.assertEqual(challenge(answer), header)
        self.assertFalse(outcome.upstreamHeaders.hasHeader(b"x-user-id"))

    def assertFailedClosed(self, outcome: HookOutcome) -> None:
        """
        The hook raised L{AuthUnavailable}: monedge answers 500.
        """
        self.assertIsNotNone(outcome.error)
        assert outcome.error is not None
        error = outcome.error.value
        assert isinstance(error, HookFailed), error
        self.assertIsInstance(error.reason.value, AuthUnavailable)
        self.assertEqual(len(self.flushLoggedErrors(AuthUnavailable)), 1)


# Options


class OptionTests(SynchronousTestCase):
    """
    Bad options are refused when the hook is built, with a one-line reason
    naming the option.
    """

    def setUp(self) -> None:
        """
        A keys file, a bad keys file, and a context with a registry and an HTTP client.
        """
        self.keysFile = self.mktemp()
        with open(self.keysFile, "w") as f:
            f.write(hashlib.sha256(b"k").hexdigest() + "\n")
        self.badKeysFile = self.mktemp()
        with open(self.badKeysFile, "w") as f:
            f.write("not-a-digest\n")
        self.context = HookContext(
            reactor=Clock(), registry=MemoryRegistry(), http=FakeHTTP()
        )

    def build(self, options: Mapping[str, Any]) -> object:
        """
        Build an auth hook with C{options} in the test's context.
        """
        return buildHook("auth", options, self.context)

    def test_badOptions(self) -> None:
        """
        Each invalid configuration raises HookConfigError whose one-line
        message names the offending option.
        """
        jwt_ = {"mode": "jwt", "jwks-url": "https://idp/jwks"}
        key = {"mode": "api-key", "keys-file": self.keysFile}
        ext = {"mode": "external", "url": "http://auth/check"}
        ids = {"identity-headers": ["X-User-Id"]}
        cases: list[tuple[dict[str, Any], str]] = [
            ({}, "mode:"),
            ({"mode": "oauth"}, "mode:"),
            ({**jwt_, "keys-file": "x"}, "unknown option 'keys-file'"),
            ({**jwt_, "colour": 1}, "unknown option 'colour'"),
            ({"mode": "jwt"}, "jwks-url:"),
            ({"mode": "jwt", "jwks-url": "ftp://idp/jwks"}, "jwks-url:"),
            ({"mode": "jwt", "jwks-url": "/jwks"}, "jwks-url:"),
            ({**jwt_, "algorithms": ["HS256"]}, "algorithms:"),
            ({**jwt_, "algorithms": ["none"]}, "algorithms:"),
            ({**jwt_, "algorithms": []}, "algorithms:"),
            ({**jwt_, "algorithms": "RS256"}, "algorithms:"),
            ({**jwt_, "audience": 7}, "audience:"),
            ({**jwt_, "audience": []}, "audience:"),
            ({**jwt_, "issuer": ""}, "issuer:"),
            ({**jwt_, "leeway": -1}, "leeway:"),
            ({**jwt_, "leeway": "soon"}, "leeway:"),
            ({**jwt_, "jwks-refresh-interval": 0}, "jwks-refresh-interval:"),
            ({**jwt_, "jwks-min-refresh": -5}, "jwks-min-refresh:"),
            (
                {**jwt_, "jwks-min-refresh": 0},
                "jwks-min-refresh: must be at least 1 s, got 0 s",
            ),
            (
                {**jwt_, "jwks-min-refresh": "500ms"},
                "jwks-min-refresh: must be at least 1 s, got 0.5 s",
            ),
            (
                {**jwt_, "jwks-refresh-interval": "1s"},
                "jwks-refresh-interval: must be at least 10 s, got 1 s",
            ),
            ({**jwt_, "claims-to-headers": ["sub"]}, "claims-to-headers:"),
            (
                {**jwt_, "claims-to-headers": {"sub": "X-User-Id"}},
                "claims-to-headers: X-User-Id must be listed in identity-headers",
            ),
            (
                {**jwt_, **ids, "claims-to-headers": {"sub": "X User"}},
                "claims-to-headers:",
            ),
            ({**jwt_, "identity-headers": "X-User-Id"}, "identity-headers:"),
            ({**jwt_, "identity-headers": ["Host"]}, "identity-headers:"),
            ({**jwt_, "identity-headers": ["bad:name"]}, "identity-headers:"),
            ({"mode": "api-key"}, "keys-file:"),
            ({"mode": "api-key", "keys-file": self.mktemp()}, "keys-file: cannot"),
            ({"mode": "api-key", "keys-file": self.badKeysFile}, "keys-file:"),
            ({**key, "header": "Authorization"}, "header:"),
            ({**key, "header": 5}, "header:"),
            ({**key, "key-id-header": "X-Key-Id"}, "key-id-header:"),
            ({**key, "url": "http://auth/"}, "unknown option 'url'"),
            ({"mode": "external"}, "url, service:"),
            ({**ext, "service": "service.api.auth"}, "url, service:"),
            ({"mode": "external", "url": "auth:80"}, "url:"),
            ({"mode": "external", "url": "http://[::1/"}, "url:"),
            ({"mode": "external", "url": "http://auth:port/"}, "url:"),
            (
                {"mode": "external", "url": "http://u:s3cret@auth/"},
                "url: credentials in the URL (user:password@) are not supported,"
                " got 'http://***@auth/'",
            ),
            (
                {**jwt_, "jwks-url": "https://token@idp/jwks"},
                "jwks-url: credentials in the URL",
            ),
            ({"mode": "external", "service": "auth"}, "service:"),
            ({**ext, "path": "/check"}, "path:"),
            (
                {"mode": "external", "service": "service.api.auth", "path": "check"},
                "path:",
            ),
            ({**ext, "forward-headers": "Cookie"}, "forward-headers:"),
            ({**ext, "forward-headers": ["Connection"]}, "forward-headers:"),
            ({**ext, "copy-headers": ["X-User-Id"]}, "copy-headers:"),
            ({**ext, "timeout": 0}, "timeout:"),
            (
                {**ext, "timeout": "5s"},
                "timeout: must be below the hook timeout (5 s), got 5 s",
            ),
            ({**ext, "max-in-flight": 0}, "max-in-flight: expected a whole number"),
            ({**ext, "max-in-flight": True}, "max-in-flight:"),
            ({**ext, "max-in-flight": "10"}, "max-in-flight:"),
            ({**ext, "max-in-flight": 65537}, "max-in-flight:"),
            ({**ext, "jwks-url": "https://idp/"}, "unknown option 'jwks-url'"),
        ]
        for options, fragment in cases:
            with described(options=options):
                error = self.assertRaises(HookConfigError, self.build, options)
                self.assertIn(fragment, str(error))
                self.assertNotIn("\n", str(error))

    def test_serviceNeedsARegistry(self) -> None:
        """
        The external mode's service option needs a registry to resolve it.
        """
        error = self.assertRaises(
            HookConfigError,
            buildHook,
            "auth",
            {"mode": "external", "service": "service.api.auth"},
            HookContext(reactor=Clock(), http=FakeHTTP()),
        )
        self.assertIn("service:", str(error))

    def test_goodOptionsBuild(self) -> None:
        """
        A full configuration of each mode builds a request hook; the
        factory is a plugin found under the name auth.
        """
        ids = ["X-User-Id", "X-Scopes", "X-Key-Id"]
        for options in [
            {
                "mode": "jwt",
                "jwks-url": "https://idp.example.com/jwks",
                "issuer": ISSUER,
                "audience": [AUDIENCE, "other"],
                "algorithms": ["ES256"],
                "leeway": "5s",
                "identity-headers": ids,
                "claims-to-headers": {"sub": "X-User-Id", "scope": "x-scopes"},
                "jwks-refresh-interval": "10m",
                "jwks-min-refresh": "1s",
            },
            {
                "mode": "api-key",
                "keys-file": self.keysFile,
                "header": "X-Key",
                "identity-headers": ids,
                "key-id-header": "X-Key-Id",
            },
            {
                "mode": "external",
                "url": "https://auth.example.com/check?a=1",
                "identity-headers": ids,
                "forward-headers": ["Authorization"],
                "copy-headers": ["X-User-Id"],
                "timeout": "500ms",
                "max-in-flight": 1,
            },
            {
                "mode": "external",
                "service": "service.api.auth",
                "path": "/verify",
                "identity-headers": ids,
            },
        ]:
            with described(mode=options["mode"]):
                hook = self.build(options)
                self.assertTrue(verifyObject(IRequestHook, hook))
        factory = availableFactories()["auth"]
        self.assertIsInstance(factory, AuthHookFactory)
        self.assertTrue(verifyObject(IHookFactory, factory))
        self.assertTrue(IPlugin.providedBy(factory))

    def test_floorsAndCeilings(self) -> None:
        """
        The limits on what clients can make the hook do are exactly the
        documented ones: the smallest jwks-min-refresh and
        jwks-refresh-interval are accepted, and external mode's timeout
        must be below the hook timeout in the hook's context.
        """
        jwt_ = {"mode": "jwt", "jwks-url": "https://idp/jwks"}
        self.build({**jwt_, "jwks-min-refresh": "1s", "jwks-refresh-interval": "10s"})
        ext = {"mode": "external", "url": "http://auth/check"}
        self.build({**ext, "timeout": "4999ms", "max-in-flight": 65536})
        context = HookContext(reactor=Clock(), http=FakeHTTP(), timeout=1.0)
        error = self.assertRaises(
            HookConfigError, buildHook, "auth", {**ext, "timeout": "1s"}, context
        )
        self.assertEqual(
            str(error), "timeout: must be below the hook timeout (1 s), got 1 s"
        )

    def test_badURLNotQuotedWithSecrets(self) -> None:
        """
        A refused URL is quoted in the error without its user-info or
        query, which may hold credentials.
        """
        for option, mode in [("jwks-url", "jwt"), ("url", "external")]:
            options = {"mode": mode, option: "ftp://user:pa ss@idp/x?key=hunter2"}
            error = self.assertRaises(HookConfigError, self.build, options)
            self.assertIn(f"{option}: expected an http or https URL", str(error))
            self.assertIn("ftp://***@idp/x?***", str(error))
            for secret in ["user", "pa ss", "hunter2"]:
                self.assertNotIn(secret, str(error))

    def test_hookSetNamesTheHook(self) -> None:
        """
        Through a HookSet (as monedge builds hooks), the error names the
        hook and the option.
        """
        hooks = HookSet(self.context)
        spec = HookSpec("auth", json.dumps({"mode": "jwt"}))
        error = self.assertRaises(HookConfigError, hooks.build, spec)
        self.assertEqual(str(error), "hook auth: jwks-url: required in mode jwt")


# Identity headers


class IdentityTests(Refused):
    """
    Every mode strips the identity headers first, whatever it decides.
    """

    def test_strippedInEveryMode(self) -> None:
        """
        Forged identity headers (any case, repeated) never reach the
        upstream, whether the hook refuses, fails or lets the request pass
        without setting them.
        """
        keysFile = self.mktemp()
        with open(keysFile, "w") as f:
            f.write(hashlib.sha256(b"good").hexdigest() + "\n")
        http = FakeHTTP()
        context = HookContext(reactor=Clock(), http=http)
        ids = ["X-User-Id", "X-Scopes"]
        hooks = {
            "jwt": buildHook(
                "auth",
                {
                    "mode": "jwt",
                    "jwks-url": "https://idp/jwks",
                    "issuer": ISSUER,
                    "audience": AUDIENCE,
                    "identity-headers": ids,
                },
                context,
            ),
            "api-key": buildHook(
                "auth",
                {"mode": "api-key", "keys-file": keysFile, "identity-headers": ids},
                context,
            ),
            "external": buildHook(
                "auth",
                {"mode": "external", "url": "http://auth/", "identity-headers": ids},
                context,
            ),
        }
        good = {"jwt": token(), "api-key": b"good", "external": b"anything"}
        forged = {
            b"X-User-Id": [b"admin", b"root"],
            b"x-scopes": [b"everything"],
            b"X-Other": [b"kept"],
        }
        for mode, hook in hooks.items():
            for credential in [good[mode], None]:
                with described(mode=mode, credential=credential):
                    headers = dict(forged)
                    if credential is not None:
                        headers[b"authorization"] = [b"Bearer " + credential]
                    outcome = run(self, hook, hookRequest(headers=headers))
                    if mode == "external" or credential is not None:
                        self.assertIsNone(outcome.response)
                    self.assertFalse(outcome.upstreamHeaders.hasHeader(b"x-user-id"))
                    self.assertFalse(outcome.upstreamHeaders.hasHeader(b"x-scopes"))
                    self.assertEqual(
                        outcome.upstreamHeaders.getRawHeaders(b"x-other"), [b"kept"]
                    )
        # Failing closed strips them too.

        def refuse(url: str, headers: Headers) -> Answer:
            raise ConnectionRefusedError()

        http.responder = refuse
        request = hookRequest(headers={**forged, b"authorization": [b"Bearer x"]})
        outcome = run(self, hooks["external"], request)
        self.assertFailedClosed(outcome)
        self.assertFalse(outcome.upstreamHeaders.hasHeader(b"x-user-id"))


# api-key


class APIKeyTests(Refused):
    """
    The api-key mode accepts keys whose SHA-256 is in the keys file.
    """

    def setUp(self) -> None:
        """
        A keys file with two keys and a hook on it, on a fake clock.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.keysFile = self.mktemp()
        self.writeKeys("# the orders team\n", b"alpha", "\n", b"beta", "  # ci\n")
        self.hook = buildHook(
            "auth",
            {
                "mode": "api-key",
                "keys-file": self.keysFile,
                "identity-headers": ["X-User-Id", "X-Key-Id"],
                "key-id-header": "X-Key-Id",
            },
            HookContext(reactor=self.clock),
        )

    def writeKeys(self, *parts: str | bytes) -> None:
        """
        Write the keys file: strings as they are, bytes as their digest.
        """
        text = "".join(
            hashlib.sha256(p).hexdigest() if isinstance(p, bytes) else p for p in parts
        )
        with open(self.keysFile, "w") as f:
            f.write(text)
        # A distinct mtime, however fast the test runs.
        stamp = getattr(self, "stamp", 1_700_000_000) + 10
        self.stamp = stamp
        os.utime(self.keysFile, (stamp, stamp))

    def ask(self, headers: Mapping[bytes, list[bytes]]) -> HookOutcome:
        """
        Run the hook on a request with C{headers}.
        """
        return run(self, self.hook, hookRequest(headers=headers))

    def test_listedKeyPasses(self) -> None:
        """
        A listed key in X-Api-Key or as a Bearer token passes, and the key
        id header carries the first 8 hex digits of its digest.
        """
        for headers in [
            {b"x-api-key": [b"alpha"]},
            {b"authorization": [b"Bearer alpha"]},
            {b"X-Api-Key": [b" alpha "], b"authorization": [b"Basic eDp5"]},
        ]:
            with described(headers=headers):
                outcome = self.ask({**headers, b"x-key-id": [b"forged"]})
                self.assertIsNone(outcome.response)
                self.assertEqual(
                    outcome.upstreamHeaders.getRawHeaders(b"x-key-id"),
                    [hashlib.sha256(b"alpha").hexdigest()[:8].encode()],
                )
        self.assertIsNone(self.ask({b"x-api-key": [b"beta"]}).response)

    def test_missingKey(self) -> None:
        """
        No key at all (or another Authorization scheme) is a 401 whose
        challenge carries no error.
        """
        self.assertRefused(self.ask({}), CHALLENGE)
        self.assertRefused(self.ask({b"authorization": [b"Basic eDp5"]}), CHALLENGE)

    def test_wrongKey(self) -> None:
        """
        An unlisted, empty or repeated key is a 401 invalid_token, and the
        key id header is not set.
        """
        for headers in [
            {b"x-api-key": [b"gamma"]},
            {b"x-api-key": [b"ALPHA"]},
            {b"x-api-key": [b""]},
            {b"x-api-key": [b"alpha", b"alpha"]},
            {b"authorization": [b"Bearer "]},
            {b"authorization": [b"Bearer gamma"]},
            # A digest is not a key.
            {b"x-api-key": [hashlib.sha256(b"alpha").hexdigest().encode()]},
        ]:
            with described(headers=headers):
                outcome = self.ask({**headers, b"x-key-id": [b"forged"]})
                self.assertRefused(outcome)
                self.assertFalse(outcome.upstreamHeaders.hasHeader(b"x-key-id"))

    def test_reload(self) -> None:
        """
        A changed keys file is re-read at most once a second, on the
        reactor clock: after a second a new key passes and a removed one
        fails.
        """
        self.writeKeys(b"gamma", "\n")
        self.clock.advance(0.5)
        # The file was checked less than a second ago: still the old keys.
        self.assertIsNone(self.ask({b"x-api-key": [b"alpha"]}).response)
        self.assertRefused(self.ask({b"x-api-key": [b"gamma"]}))
        self.clock.advance(0.5)
        self.assertIsNone(self.ask({b"x-api-key": [b"gamma"]}).response)
        self.assertRefused(self.ask({b"x-api-key": [b"alpha"]}))

    def test_badReloadKeepsKeys(self) -> None:
        """
        A keys file that becomes invalid or disappears is not applied: the
        last good keys stay in force.
        """
        self.writeKeys("zzz\n")
        self.clock.advance(1)
        self.assertIsNone(self.ask({b"x-api-key": [b"alpha"]}).response)
        os.remove(self.keysFile)
        self.clock.advance(1)
        self.assertIsNone(self.ask({b"x-api-key": [b"alpha"]}).response)
        self.writeKeys(b"gamma", "\n")
        self.clock.advance(1)
        self.assertIsNone(self.ask({b"x-api-key": [b"gamma"]}).response)
        self.assertRefused(self.ask({b"x-api-key": [b"alpha"]}))


# jwt


class JWTTests(Refused):
    """
    The jwt mode verifies bearer tokens against a fetched JWK set.
    """

    def setUp(self) -> None:
        """
        A jwt hook on a fake clock and a fake JWK set server.
        """
        self.clock = Clock()
        self.clock.advance(1000)
        self.http = FakeHTTP()
        self.hook = self.build()

    def build(self, **options: Any) -> Any:
        """
        A jwt hook on the fake JWK set, with C{options} added.
        """
        return buildHook(
            "auth",
            {
                "mode": "jwt",
                "jwks-url": "https://idp.example.com/jwks",
                "issuer": ISSUER,
                "audience": AUDIENCE,
                "identity-headers": ["X-User-Id", "X-Scopes", "X-Admin"],
                "claims-to-headers": {
                    "sub": "X-User-Id",
                    "scp": "X-Scopes",
                    "admin": "X-Admin",
                },
                **options,
            },
            HookContext(reactor=self.clock, http=self.http, timeout=3.0),
        )

    def ask(self, value: bytes, hook: object = None) -> HookOutcome:
        """
        Run C{hook} (by default the test's) on a request bearing C{value}
        and a forged X-User-Id.
        """
        return run(self, hook or self.hook, hookRequest(headers=bearer(value)))

    def test_interfaces(self) -> None:
        """
        The hook provides IRequestHook; the factory IHookFactory.
        """
        self.assertTrue(verifyObject(IRequestHook, self.hook))
        self.assertTrue(verifyObject(IHookFactory, AuthHookFactory()))

    def test_validTokensPass(self) -> None:
        """
        Valid RS256 and ES256 tokens pass; mapped claims become identity
        headers (lists joined with commas, booleans as true/false), and the
        forged value is gone.  The JWK set is fetched once, with the hook
        timeout.
        """
        for signed in [
            token(scp=["read", "write"], admin=False),
            token(EC_KEY, "ec1", "ES256", scp=["read", "write"], admin=False),
        ]:
            outcome = self.ask(signed)
            self.assertIsNone(outcome.response)
            self.assertIsNone(outcome.error)
            headers = outcome.upstreamHeaders
            self.assertEqual(headers.getRawHeaders(b"x-user-id"), [b"alice"])
            self.assertEqual(headers.getRawHeaders(b"x-scopes"), [b"read,write"])
            self.assertEqual(headers.getRawHeaders(b"x-admin"), [b"false"])
        self.assertEqual(
            self.http.gets, [("https://idp.example.com/jwks", {"timeout": 3.0})]
        )

    def test_absentClaimSetsNoHeader(self) -> None:
        """
        A mapped claim the token does not carry leaves its header unset
        (and the forged one removed).
        """
        outcome = self.ask(token(sub=None))
        self.assertIsNone(outcome.response)
        self.assertFalse(outcome.upstreamHeaders.hasHeader(b"x-user-id"))

    def test_missingToken(self) -> None:
        """
        No Authorization, or another scheme, is a 401 whose challenge has
        no error code (RFC 6750 3.1).
        """
        for headers in [{}, {b"authorization": [b"Basic eDp5"]}]:
            outcome = run(self, self.hook, hookRequest(headers=headers))
            self.assertRefused(outcome, CHALLENGE)
        self.assertEqual(self.http.gets, [])

    def test_invalidTokens(self) -> None:
        """
        A tampered payload, a wrong signature, an expired token, nbf or
        iat in the future, the wrong issuer or audience, a missing exp,
        alg none, HS256 signed with the public key as the secret, an RSA
        token naming the EC key, an algorithm not configured, and garbage:
        each is a 401 with error="invalid_token".
        """
        now = int(time.time())
        publicPEM = RSA_KEY.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        header, payload, signature = token().split(b".")
        forgedPayload = _b64(json.dumps(claims(sub="admin")).encode())
        cases = {
            "tampered": header + b"." + forgedPayload + b"." + signature,
            "wrong signature": token(OTHER_EC_KEY, "ec1", "ES256"),
            "expired": token(exp=now - 120),
            "nbf in the future": token(nbf=now + 120),
            "iat in the future": token(iat=now + 120),
            "wrong issuer": token(iss="https://evil.example.com/"),
            "no issuer": token(iss=None),
            "wrong audience": token(aud="billing"),
            "no audience": token(aud=None),
            "no exp": token(exp=None),
            "alg none": handMade({"alg": "none", "kid": "rsa1"}, claims()),
            "alg none, no kid": handMade({"alg": "none"}, claims()),
            "HS256 with the public key": handMade(
                {"alg": "HS256", "kid": "rsa1", "typ": "JWT"},
                claims(),
                lambda data: hmac.new(publicPEM, data, hashlib.sha256).digest(),
            ),
            "RS256 naming the EC key": token(RSA_KEY, "ec1", "RS256"),
            "RS384": token(RSA_KEY, "rsa1", "RS384"),
            "garbage": b"not.a.jwt",
            "not even dots": b"abc",
        }
        for name, value in cases.items():
            with described(case=name):
                self.assertRefused(self.ask(value))

    def test_leeway(self) -> None:
        """
        A token expired within the leeway (30 s by default) still passes;
        with leeway 0 it does not.
        """
        expired = token(exp=int(time.time()) - 10)
        self.assertIsNone(self.ask(expired).response)
        self.assertRefused(self.ask(expired, self.build(leeway=0)))

    def test_algorithmsRestrict(self) -> None:
        """
        With algorithms [ES256], a valid RS256 token is refused (and RSA
        keys are not even cached).
        """
        hook = self.build(algorithms=["ES256"])
        self.assertRefused(self.ask(token(), hook))
        self.assertIsNone(self.ask(token(EC_KEY, "ec1", "ES256"), hook).response)

    def test_noKidUsesTheOnlyKey(self) -> None:
        """
        A token without a kid is verified with the set's only key, and
        refused when the set has several.
        """
        self.http.jwks = jwkSet(rsaJWK(RSA_KEY, "rsa1"))
        hook = self.build()
        self.assertIsNone(self.ask(token(kid=None), hook).response)
        self.http.jwks = JWKS
        self.assertRefused(self.ask(token(kid=None)))

    def test_unknownKidRefreshes(self) -> None:
        """
        A token naming an unknown kid refetches the set and passes once
        the key is there; a second unknown kid within jwks-min-refresh does
        not fetch again (401); after it, it does.
        """
        self.http.jwks = jwkSet(rsaJWK(RSA_KEY, "rsa1"))
        self.assertIsNone(self.ask(token()).response)
        self.assertEqual(len(self.http.gets), 1)
        # The identity provider rotates in the EC key.
        self.http.jwks = JWKS
        self.clock.advance(10)
        self.assertIsNone(self.ask(token(EC_KEY, "ec1", "ES256")).response)
        self.assertEqual(len(self.http.gets), 2)
        self.clock.advance(9)
        self.assertRefused(self.ask(token(EC_KEY, "ec2", "ES256")))
        self.assertRefused(self.ask(token(EC_KEY, "ec3", "ES256")))
        self.assertEqual(len(self.http.gets), 2)
        self.clock.advance(1)
        self.assertRefused(self.ask(token(EC_KEY, "ec2", "ES256")))
        self.assertEqual(len(self.http.gets), 3)

    def test_periodicRefresh(self) -> None:
        """
        After jwks-refresh-interval the next request refetches the set in
        the background, answered meanwhile from the cache; a key removed
        from the set is then refused.
        """
        self.assertIsNone(self.ask(token()).response)
        self.clock.advance(299)
        self.assertIsNone(self.ask(token()).response)
        self.assertEqual(len(self.http.gets), 1)
        self.clock.advance(1)
        self.http.hold = True
        self.assertIsNone(self.ask(token()).response)
        self.assertEqual(len(self.http.gets), 2)
        [held] = self.http.held
        held.callback(Answer(200, jwkSet(ecJWK(EC_KEY, "ec1"))))
        self.assertRefused(self.ask(token()))
        self.assertIsNone(self.ask(token(EC_KEY, "ec1", "ES256")).response)
        self.assertEqual(len(self.http.gets), 2)

    def countDecodes(self) -> list[bytes]:
        """
        Count PyJWT's verifications from now on: the list of tokens it was
        asked to decode.
        """
        decoded: list[bytes] = []
        real = jwt.decode

        def decode(token: bytes, *args: Any, **kwargs: Any) -> Any:
            decoded.append(token)
            return real(token, *args, **kwargs)

        self.patch(jwt, "decode", decode)
        return decoded

    def test_verifiedTokenRemembered(self) -> None:
        """
        A token verified once is not verified again: the same token passes
        from memory, with the same identity headers, the forged one
        removed each time; another token is verified.
        """
        decoded = self.countDecodes()
        signed = token(scp=["read"])
        for _ in range(3):
            outcome = self.ask(signed)
            self.assertIsNone(outcome.response)
            headers = outcome.upstreamHeaders
            self.assertEqual(headers.getRawHeaders(b"x-user-id"), [b"alice"])
            self.assertEqual(headers.getRawHeaders(b"x-scopes"), [b"read"])
        self.assertEqual(decoded, [signed])
        other = token(sub="bob")
        self.assertEqual(
            self.ask(other).upstreamHeaders.getRawHeaders(b"x-user-id"), [b"bob"]
        )
        self.assertEqual(decoded, [signed, other])

    def test_rememberedTokenExpires(self) -> None:
        """
        A remembered token is remembered until its exp plus the leeway
        (30 s) on the hook's clock; then it is verified again.
        """
        decoded = self.countDecodes()
        now = int(time.time())
        self.clock.advance(now - self.clock.seconds())
        signed = token(exp=now + 60)
        self.assertIsNone(self.ask(signed).response)
        self.clock.advance(89)
        self.assertIsNone(self.ask(signed).response)
        self.assertEqual(len(decoded), 1)
        self.clock.advance(1)
        self.ask(signed)
        self.assertEqual(len(decoded), 2)

    def test_rememberedBounded(self) -> None:
        """
        At most MAX_VERIFIED tokens are remembered: a new one past that
        makes the oldest forgotten, so it is verified again.
        """
        self.patch(jwtmode, "MAX_VERIFIED", 2)
        decoded = self.countDecodes()
        first, second, third = (token(sub=name) for name in ("a", "b", "c"))
        for signed in (first, second, third, third, second, first):
            self.assertIsNone(self.ask(signed).response)
        self.assertEqual(decoded, [first, second, third, first])

    def test_refusalsNotRemembered(self) -> None:
        """
        A token refused (here for its audience) is verified, and refused,
        each time it comes.
        """
        decoded = self.countDecodes()
        wrong = token(aud="someone-else")
        for _ in range(2):
            self.assertRefused(self.ask(wrong))
        self.assertEqual(len(decoded), 2)

    def test_concurrentRequestsShareAFetch(self) -> None:
        """
        Requests arriving while the set is being fetched wait for that one
        fetch, and all pass when it arrives.
        """
        self.http.hold = True
        first = runHooks([self.hook], hookRequest(headers=bearer(token())))
        second = runHooks(
            [self.hook], hookRequest(headers=bearer(token(EC_KEY, "ec1", "ES256")))
        )
        self.assertNoResult(first)
        self.assertNoResult(second)
        [held] = self.http.held
        held.callback(Answer(200, JWKS))
        for d in (first, second):
            outcome = self.successResultOf(d)
            self.assertIsNone(outcome.response)
            self.assertEqual(
                outcome.upstreamHeaders.getRawHeaders(b"x-user-id"), [b"alice"]
            )

    def test_unavailableFailsClosed(self) -> None:
        """
        If the set cannot be fetched and no keys are cached, the hook
        raises (monedge answers 500 hook_failed); it retries no sooner than
        jwks-min-refresh, and passes once the set is back.
        """
        self.http.failing = ConnectionRefusedError()
        self.assertFailedClosed(self.ask(token()))
        self.clock.advance(5)
        self.assertFailedClosed(self.ask(token()))
        self.assertEqual(len(self.http.gets), 1)
        self.http.failing = None
        self.http.code = 503
        self.clock.advance(5)
        self.assertFailedClosed(self.ask(token()))
        self.assertEqual(len(self.http.gets), 2)
        self.http.code = 200
        self.clock.advance(10)
        self.assertIsNone(self.ask(token()).response)

    def test_unusableSetFailsClosed(self) -> None:
        """
        A set that is not JSON with keys, or has no usable RS256/ES256
        signing key, counts as a failed fetch.
        """
        for document in [
            [],
            {"keys": "none"},
            {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "rsa1"}]},
            {"keys": [{**rsaJWK(RSA_KEY, "rsa1"), "use": "enc"}]},
        ]:
            with described(document=document):
                self.http.jwks = document
                self.assertFailedClosed(self.ask(token(), self.build()))

    def test_failedRefreshKeepsKeys(self) -> None:
        """
        A refresh that fails keeps the cached keys answering; an unknown
        kid whose refetch fails fails closed.
        """
        self.assertIsNone(self.ask(token()).response)
        self.http.failing = ConnectionRefusedError()
        self.clock.advance(300)
        self.assertIsNone(self.ask(token()).response)
        self.assertEqual(len(self.http.gets), 2)
        self.clock.advance(10)
        self.assertFailedClosed(self.ask(token(EC_KEY, "ec9", "ES256")))

    def test_timeoutDuringFetch(self) -> None:
        """
        A request whose fetch outlasts the hook timeout fails closed; the
        fetch arriving later is still used.
        """
        self.http.hold = True
        d = runHooks(
            [self.hook], hookRequest(headers=bearer(token())), clock=self.clock
        )
        self.clock.advance(5)
        outcome = self.successResultOf(d)
        self.assertIsNotNone(outcome.error)
        self.flushLoggedErrors()
        self.http.held[0].callback(Answer(200, JWKS))
        self.http.hold = False
        self.assertIsNone(self.ask(token()).response)
        self.assertEqual(len(self.http.gets), 1)

    def test_jwksURLNotLoggedWithSecrets(self) -> None:
        """
        The JWK set is fetched from its whole URL, but a failed fetch is
        logged, and fails the request, naming the URL without its query
        (it may hold a credential).
        """
        from twisted.logger import capturedLogs, formatEvent

        url = "https://idp.example.com/jwks?key=hunter2"
        self.http.failing = ConnectionRefusedError(f"to {url}")
        with capturedLogs() as events:
            outcome = self.ask(token(), self.build(**{"jwks-url": url}))
        self.assertEqual(self.http.gets[0][0], url)
        assert outcome.error is not None
        failed = outcome.error.value
        assert isinstance(failed, HookFailed), failed
        shown = [str(failed.reason.value)]
        shown += [formatEvent(event) for event in events]
        self.assertIn(
            "auth: cannot fetch the JWK set https://idp.example.com/jwks?***",
            "\n".join(shown),
        )
        for text in shown:
            self.assertNotIn("hunter2", text)
        self.flushLoggedErrors(AuthUnavailable)

    def test_claimValue(self) -> None:
        """
        Claims become header values without control characters.
        """
        self.assertEqual(claimValue("a\r\nb"), b"a  b")
        self.assertEqual(claimValue(42), b"42")
        self.assertEqual(claimValue(True), b"true")
        self.assertEqual(claimValue(["a", 1]), b"a,1")
        self.assertEqual(claimValue({"b": 1, "a": [2]}), b'{"a":[2],"b":1}')
        self.assertEqual(claimValue("Zoë"), "Zoë".encode())
        self.assertIsNone(claimValue(None))


# external


def authAnswer(url: str, headers: Headers) -> Answer:
    """
    The fake auth service: allows C{Bearer good} as u1, else 403.
    """
    if headers.getRawHeaders(b"authorization") == [b"Bearer good"]:
        return Answer(
            200,
            headers={b"x-user-id": [b"u1"], b"x-secret": [b"s"]},
            body=b"ok",
        )
    return Answer(
        403,
        headers={
            b"content-type": [b"text/plain"],
            b"content-length": [b"7"],
            b"connection": [b"close, x-hop"],
            b"x-hop": [b"1"],
            b"date": [b"Mon, 01 Jan 2024 00:00:00 GMT"],
            b"set-cookie": [b"a=1", b"b=2"],
            b"x-request-id": [b"theirs"],
        },
        body=b"denied\n",
    )


class ExternalTests(Refused):
    """
    The external mode asks an auth service and obeys it.
    """

    def setUp(self) -> None:
        """
        An external hook on a fake auth service and an empty registry.
        """
        self.http = FakeHTTP()
        self.http.responder = authAnswer
        self.registry = MemoryRegistry()
        self.context = HookContext(
            reactor=Clock(), registry=self.registry, http=self.http
        )
        self.hook = self.build(url="http://auth.internal:8080/check")

    def build(self, **options: Any) -> Any:
        """
        An external hook copying X-User-Id, with C{options} added.
        """
        return buildHook(
            "auth",
            {
                "mode": "external",
                "identity-headers": ["X-User-Id"],
                "copy-headers": ["X-User-Id"],
                **options,
            },
            self.context,
        )

    def request(self, authorization: bytes) -> HookRequest:
        """
        A DELETE with C{authorization}, a cookie, a forged identity, a
        private header and monedge's forwarding headers.
        """
        request = hookRequest(
            method=b"DELETE",
            path=b"/orders/42",
            query=b"?force=1",
            headers={
                b"authorization": [authorization],
                b"cookie": [b"session=abc"],
                b"x-user-id": [b"forged"],
                b"x-private": [b"not for the auth service"],
                b"x-forwarded-for": [b"6.6.6.6"],
            },
        )
        # As monedge prepares them: forwarding headers of its own.
        request.upstreamHeaders.setRawHeaders(b"x-forwarded-for", [b"192.0.2.10"])
        request.upstreamHeaders.setRawHeaders(b"x-request-id", [b"rid"])
        return request

    def test_allowed(self) -> None:
        """
        A 2xx lets the request pass with the allowed headers of the answer
        copied upstream (and only those).  The auth service gets a GET with
        the method and URI, the forwarded headers, monedge's forwarding
        headers, no redirects followed, and the timeout.
        """
        outcome = run(self, self.hook, self.request(b"Bearer good"))
        self.assertIsNone(outcome.response)
        self.assertEqual(outcome.upstreamHeaders.getRawHeaders(b"x-user-id"), [b"u1"])
        self.assertFalse(outcome.upstreamHeaders.hasHeader(b"x-secret"))
        [(method, url, sent, kwargs)] = self.http.requests
        self.assertEqual((method, url), ("GET", "http://auth.internal:8080/check"))
        self.assertEqual(kwargs, {"timeout": 2.0, "allow_redirects": False})
        self.assertEqual(sent.getRawHeaders(b"x-forwarded-method"), [b"DELETE"])
        self.assertEqual(
            sent.getRawHeaders(b"x-forwarded-uri"), [b"/orders/42?force=1"]
        )
        self.assertEqual(sent.getRawHeaders(b"authorization"), [b"Bearer good"])
        self.assertEqual(sent.getRawHeaders(b"cookie"), [b"session=abc"])
        self.assertEqual(sent.getRawHeaders(b"x-forwarded-for"), [b"192.0.2.10"])
        self.assertEqual(sent.getRawHeaders(b"x-request-id"), [b"rid"])
        self.assertFalse(sent.hasHeader(b"x-private"))
        self.assertFalse(sent.hasHeader(b"x-user-id"))

    def test_deniedIsRelayed(self) -> None:
        """
        Any other status is relayed with its body and headers, less
        hop-by-hop ones, those Connection names, Content-Length and those
        monedge sets itself.
        """
        outcome = run(self, self.hook, self.request(b"Bearer bad"))
        answer = outcome.response
        assert answer is not None
        self.assertEqual(
            (answer.status, answer.body, answer.code), (403, b"denied\n", None)
        )
        self.assertEqual(
            sorted(answer.headers),
            [
                (b"Content-Type", b"text/plain"),
                (b"Set-Cookie", b"a=1"),
                (b"Set-Cookie", b"b=2"),
            ],
        )
        self.assertFalse(outcome.upstreamHeaders.hasHeader(b"x-user-id"))

    def test_challengeRelayed(self) -> None:
        """
        A 401 from the auth service reaches the client with its
        WWW-Authenticate.
        """
        self.http.responder = lambda url, headers: Answer(
            401, headers={b"www-authenticate": [b'Bearer realm="sso"']}, body=b"{}"
        )
        answer = run(self, self.hook, self.request(b"Bearer x")).response
        self.assertEqual(challenge(answer), b'Bearer realm="sso"')
        assert answer is not None
        self.assertEqual(answer.status, 401)

    def test_unreachableFailsClosed(self) -> None:
        """
        An auth service that cannot be reached (or times out) fails the
        request closed.
        """

        def refuse(url: str, headers: Headers) -> Answer:
            raise ConnectionRefusedError()

        self.http.responder = refuse
        self.assertFailedClosed(run(self, self.hook, self.request(b"Bearer good")))

    def test_unreachableNamedWithoutSecrets(self) -> None:
        """
        When the auth service fails, the failure names its URL without the
        query the URL was configured with (it may hold a credential), while
        the request itself goes to the whole URL.
        """
        url = "https://auth.internal/check?key=hunter2"
        hook = self.build(url=url)

        def refuse(url: str, headers: Headers) -> Answer:
            raise ConnectionRefusedError(f"connecting to {url}")

        self.http.responder = refuse
        outcome = run(self, hook, self.request(b"Bearer good"))
        assert outcome.error is not None
        failed = outcome.error.value
        assert isinstance(failed, HookFailed), failed
        message = str(failed.reason.value)
        self.assertIn("auth service https://auth.internal/check?*** failed", message)
        self.assertNotIn("hunter2", message)
        self.assertEqual(self.http.requests[0][1], url)
        self.flushLoggedErrors(AuthUnavailable)

    def test_maxInFlight(self) -> None:
        """
        Beyond max-in-flight calls to the auth service under way, a request
        fails closed at once, without a call; once one answers, calls are
        made again.
        """
        held: list[Deferred[Any]] = []

        def hold(method: str, url: str, headers: Headers, **kwargs: Any) -> Any:
            self.http.requests.append((method, url, headers, kwargs))
            d: Deferred[Any] = Deferred()
            held.append(d)
            return d

        self.http.request = hold  # type: ignore[method-assign]
        hook = self.build(url="http://auth.internal/check", **{"max-in-flight": 2})
        waiting = [runHooks([hook], self.request(b"Bearer good")) for _ in range(2)]
        self.assertEqual(len(self.http.requests), 2)
        self.assertNoResult(waiting[0])
        self.assertFailedClosed(run(self, hook, self.request(b"Bearer good")))
        self.assertEqual(len(self.http.requests), 2)
        held[0].callback(authAnswer("", Headers({b"authorization": [b"Bearer good"]})))
        self.assertIsNone(self.successResultOf(waiting[0]).response)
        third = runHooks([hook], self.request(b"Bearer good"))
        self.assertEqual(len(self.http.requests), 3)
        for d in held[1:]:
            d.callback(authAnswer("", Headers()))
        self.assertEqual(self.successResultOf(third).response.status, 403)  # type: ignore[union-attr]
        self.assertEqual(hook.inFlight, 0)

    def test_service(self) -> None:
        """
        With service, each request goes to the next eligible endpoint of
        the registry entry (skipping ones not ready) at request time; an
        unknown service or one without endpoints fails closed.
        """
        hook = self.build(service="service.api.authsvc", path="/verify")
        request = self.request(b"Bearer good")
        self.assertFailedClosed(run(self, hook, request))
        self.registry.put(ServiceEntry("service.api.authsvc", ()))
        self.assertFailedClosed(run(self, hook, self.request(b"Bearer good")))
        self.registry.put(
            ServiceEntry(
                "service.api.authsvc",
                (
                    Endpoint("10.0.0.1", 80),
                    Endpoint("10.0.0.2", 80, ready=False),
                    Endpoint("fd00::3", 8443, scheme="https"),
                ),
            )
        )
        for _ in range(3):
            outcome = run(self, hook, self.request(b"Bearer good"))
            self.assertEqual(
                outcome.upstreamHeaders.getRawHeaders(b"x-user-id"), [b"u1"]
            )
        self.assertEqual(
            [url for _, url, _, _ in self.http.requests],
            [
                "http://10.0.0.1:80/verify",
                "https://[fd00::3]:8443/verify",
                "http://10.0.0.1:80/verify",
            ],
        )


# End to end


def _document(body: bytes) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(body)
    return document


class EndToEndTests(ProxyTestCase):
    """
    The auth hook in a real twistd monedge process, with real upstreams,
    a real JWKS server and a real auth service on 127.0.0.1.
    """

    async def test_jwt(self) -> None:
        """
        A service with the jwt auth hook: no token is a 401 with a
        challenge and a JSON error with the request id; a bad token a 401
        invalid_token; a valid token reaches the upstream with the identity
        header from its claim, never the forged one (which is dropped when
        the claim is absent).  A service whose JWK
        set cannot be fetched fails closed with 500 hook_failed.
        """
        jwks = self.startUpstream(lambda request, seen: json.dumps(JWKS).encode())
        upstream = self.startUpstream()

        def auth(url: str) -> dict[str, Any]:
            return {
                "hooks": [
                    {
                        "name": "auth",
                        "options": {
                            "mode": "jwt",
                            "jwks-url": url,
                            "issuer": ISSUER,
                            "audience": AUDIENCE,
                            "identity-headers": ["X-User-Id"],
                            "claims-to-headers": {"sub": "X-User-Id"},
                        },
                    }
                ]
            }

        proxy = await self.startProxy(
            {
                "service.api.orders": {
                    "endpoints": [upstream.address],
                    "policy": auth(f"http://{jwks.address}/jwks.json"),
                },
                "service.api.closed": {
                    "endpoints": [upstream.address],
                    "policy": auth(f"http://127.0.0.1:{freePort()}/jwks.json"),
                },
            }
        )
        response, body = await self.get(proxy.url + "/orders/1")
        self.assertEqual(response.code, 401, body)
        self.assertEqual(
            response.headers.getRawHeaders(b"www-authenticate"), [CHALLENGE]
        )
        document = _document(body)
        self.assertEqual(document["code"], "unauthorized")
        self.assertEqual(
            document["request_id"],
            response.headers.getRawHeaders(b"x-request-id")[0].decode(),
        )
        response, body = await self.get(
            proxy.url + "/orders/1", headers=bearer(token(exp=int(time.time()) - 60))
        )
        self.assertEqual(response.code, 401, body)
        self.assertEqual(
            response.headers.getRawHeaders(b"www-authenticate"), [CHALLENGE_INVALID]
        )
        self.assertEqual(upstream.received, [])
        for signed in [
            token(),
            token(EC_KEY, "ec1", "ES256", sub="bob"),
            token(sub=None),
        ]:
            response, body = await self.get(
                proxy.url + "/orders/1", headers=bearer(signed)
            )
            self.assertEqual(response.code, 200, body)
        # Without a sub claim the forged header is gone, not replaced.
        self.assertEqual(
            [seen.header(b"x-user-id") for seen in upstream.received],
            [[b"alice"], [b"bob"], []],
        )
        self.assertEqual(len(jwks.received), 1)
        response, body = await self.get(
            proxy.url + "/closed/1", headers=bearer(token())
        )
        self.assertEqual(response.code, 500, body)
        self.assertEqual(_document(body)["code"], "hook_failed")
        self.assertEqual(len(upstream.received), 3)

    async def test_external(self) -> None:
        """
        External auth, by URL and by registry service: a denial (403 and
        its body) is relayed; an allowed request reaches the upstream with
        the auth service's X-User-Id and not the client's (and with none
        when the auth service allows without one); the auth service sees
        the method and URI.
        """

        def decide(request: Request, seen: Received) -> bytes:
            if seen.header(b"authorization") == [b"Bearer good"]:
                request.setHeader(b"x-user-id", b"u1")
                return b""
            if seen.header(b"authorization") == [b"Bearer anonymous"]:
                return b""
            request.setResponseCode(403)
            request.setHeader(b"content-type", b"text/plain")
            return b"denied by authsvc\n"

        authsvc = self.startUpstream(decide)
        upstream = self.startUpstream()

        def auth(**options: str) -> dict[str, Any]:
            return {
                "hooks": [
                    {
                        "name": "auth",
                        "options": {
                            "mode": "external",
                            "identity-headers": ["X-User-Id"],
                            "copy-headers": ["X-User-Id"],
                            **options,
                        },
                    }
                ]
            }

        proxy = await self.startProxy(
            {
                "service.api.orders": {
                    "endpoints": [upstream.address],
                    "policy": auth(url=f"http://{authsvc.address}/check"),
                },
                "service.api.billing": {
                    "endpoints": [upstream.address],
                    "policy": auth(service="service.api.authsvc", path="/verify"),
                },
                "service.api.authsvc": {"endpoints": [authsvc.address]},
            }
        )
        for prefix, check in [("/orders", b"/check"), ("/billing", b"/verify")]:
            response, body = await self.get(
                proxy.url + prefix + "/x?y=1", headers=bearer(b"bad")
            )
            self.assertEqual(response.code, 403, body)
            self.assertEqual(body, b"denied by authsvc\n")
            self.assertEqual(
                response.headers.getRawHeaders(b"content-type"), [b"text/plain"]
            )
            self.assertTrue(response.headers.getRawHeaders(b"x-request-id"))
            response, body = await self.get(
                proxy.url + prefix + "/x?y=1", headers=bearer(b"good")
            )
            self.assertEqual(response.code, 200, body)
            seen = authsvc.received[-1]
            self.assertEqual(seen.uri, check)
            self.assertEqual(seen.method, b"GET")
            self.assertEqual(seen.header(b"x-forwarded-method"), [b"GET"])
            self.assertEqual(
                seen.header(b"x-forwarded-uri"), [prefix.encode() + b"/x?y=1"]
            )
            response, body = await self.get(
                proxy.url + prefix + "/x", headers=bearer(b"anonymous")
            )
            self.assertEqual(response.code, 200, body)
        self.assertEqual(len(authsvc.received), 6)
        # Allowed without an identity, the forged header is gone.
        self.assertEqual(
            [seen.header(b"x-user-id") for seen in upstream.received],
            [[b"u1"], [], [b"u1"], []],
        )

    async def test_apiKeyGlobal(self) -> None:
        """
        The api-key mode as a global --hook, on a keys file: no key and a
        wrong key are 401s; the right key passes with its key id, and
        forged identity headers are dropped.
        """
        keysFile = os.path.join(self.directory, "keys.txt")
        with open(keysFile, "w") as f:
            f.write("# ci\n" + hashlib.sha256(b"s3cret").hexdigest() + "\n")
        upstream = self.startUpstream()
        hook = {
            "name": "auth",
            "options": {
                "mode": "api-key",
                "keys-file": keysFile,
                "identity-headers": ["X-Key-Id", "X-User-Id"],
                "key-id-header": "X-Key-Id",
            },
        }
        proxy = await self.startProxy(
            {"service.api.echo": {"endpoints": [upstream.address]}},
            ["--hook", json.dumps(hook)],
        )
        forged = {b"x-key-id": [b"forged"], b"x-user-id": [b"admin"]}
        response, body = await self.get(proxy.url + "/echo/", headers=forged)
        self.assertEqual(response.code, 401, body)
        self.assertEqual(
            response.headers.getRawHeaders(b"www-authenticate"), [CHALLENGE]
        )
        response, body = await self.get(
            proxy.url + "/echo/", headers={**forged, b"x-api-key": [b"guess"]}
        )
        self.assertEqual(response.code, 401, body)
        self.assertEqual(_document(body)["code"], "unauthorized")
        response, body = await self.get(
            proxy.url + "/echo/", headers={**forged, b"x-api-key": [b"s3cret"]}
        )
        self.assertEqual(response.code, 200, body)
        [seen] = upstream.received
        self.assertEqual(
            seen.header(b"x-key-id"),
            [hashlib.sha256(b"s3cret").hexdigest()[:8].encode()],
        )
        self.assertEqual(seen.header(b"x-user-id"), [])
        self.assertEqual(seen.header(b"x-api-key"), [b"s3cret"])
