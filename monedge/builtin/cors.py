"""
The C{cors} hook: Cross-Origin Resource Sharing for browsers, gRPC-Web
calls included.  It answers preflights itself and marks the answers to
cross-origin requests from allowed origins as readable.

    hooks:
      - name: cors
        options:
          allow-origins: ["https://app.example.com"]

A preflight (C{OPTIONS} with C{Origin} and C{Access-Control-Request-Method})
never goes upstream: from an allowed origin, asking for allowed methods
and headers, it is answered 204 with the C{Access-Control-Allow-*} headers;
otherwise 204 without them, which the browser takes as a refusal.  Another
request from an allowed origin passes, and its upstream response gets
C{Access-Control-Allow-Origin} (with C{-Expose-Headers} and
C{-Allow-Credentials}).  A request without C{Origin}, or from an origin not
allowed, passes untouched.  See docs/hooks.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.plugin import IPlugin
from twisted.web.http_headers import Headers
from zope.interface import implementer

from monedge.hooks import HookConfigError, HookResponse
from monedge.interfaces import (
    IHookFactory,
    IHookRequest,
    IHookResponse,
    IRequestHook,
    IResponseHook,
)
from monedge.rules.grpc import isCorsPreflight
from monedge.rules.syntax import isToken, parseDuration

#: Every option the hook reads.
OPTIONS = (
    "allow-origins",
    "allow-methods",
    "allow-headers",
    "expose-headers",
    "max-age",
    "allow-credentials",
)

#: The methods a preflight may ask for, unless C{allow-methods} says.
DEFAULT_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

#: The request headers a preflight may ask for, unless C{allow-headers}
#: says: what gRPC-Web clients send (grpc-web-javascript, Connect,
#: improbable-eng), and a credential.
DEFAULT_ALLOW_HEADERS = (
    "content-type",
    "x-grpc-web",
    "x-user-agent",
    "grpc-timeout",
    "authorization",
)

#: The response headers scripts may read, unless C{expose-headers} says:
#: a gRPC-Web answer's status when it comes in the head (trailers-only).
DEFAULT_EXPOSE_HEADERS = ("grpc-status", "grpc-message", "grpc-status-details-bin")

#: How long a browser may cache a preflight's answer, unless C{max-age}
#: says (Chromium caps it at 2 hours, Firefox at 24).
DEFAULT_MAX_AGE = 600

#: An origin as browsers serialise it: a scheme, a host, maybe a port.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[a-z0-9._~\-\[\]:%]+\Z")

_VARY = b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"


def _tokens(
    options: Mapping[str, Any], name: str, default: tuple[str, ...], star: bool
) -> tuple[str, ...] | None:
    """
    A list option of HTTP tokens (L{None} for C{"*"} when C{star}).
    """
    value = options.get(name, list(default))
    if star and (value == "*" or value == ["*"]):
        return None
    if not isinstance(value, list):
        raise HookConfigError(
            f"{name}: expected a list"
            + (' or "*"' if star else "")
            + f", got {type(value).__name__}"
        )
    for item in value:
        if not isToken(item):
            raise HookConfigError(f"{name}: not a token: {item!r}")
    return tuple(value)


def _origins(options: Mapping[str, Any]) -> frozenset[bytes] | None:
    """
    C{allow-origins}: the exact origins, or L{None} for C{"*"}.
    """
    if "allow-origins" not in options:
        raise HookConfigError(
            "allow-origins: required: a list of origins such as"
            ' "https://app.example.com", or "*"'
        )
    value = options["allow-origins"]
    if value == "*" or value == ["*"]:
        return None
    if not isinstance(value, list) or not value:
        raise HookConfigError(
            f'allow-origins: expected a list of origins, or "*", got {value!r}'
        )
    origins = set()
    for item in value:
        if item == "*":
            raise HookConfigError('allow-origins: "*" cannot be listed with origins')
        if not isinstance(item, str) or not _ORIGIN.match(item.lower()):
            raise HookConfigError(
                f"allow-origins: not an origin (scheme://host[:port], no path):"
                f" {item!r}"
            )
        origins.add(item.lower().encode("ascii"))
    return frozenset(origins)


@dataclass(frozen=True)
class CorsPolicy:
    """
    The hook's checked options.

    @ivar origins: the allowed origins, or L{None} for any.
    @ivar methods: the methods a preflight may ask for.
    @ivar allowHeaders: the request headers a preflight may ask for
        (lowercase), or L{None} for any (each preflight's are echoed).
    @ivar exposeHeaders: the response headers scripts may read.
    """

    origins: frozenset[bytes] | None
    methods: tuple[str, ...]
    allowHeaders: tuple[str, ...] | None
    exposeHeaders: tuple[str, ...]
    maxAge: int
    credentials: bool

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> CorsPolicy:
        """
        @raise HookConfigError: naming the option that is wrong.
        """
        extra = set(options) - set(OPTIONS)
        if extra:
            raise HookConfigError(
                f"unknown option {sorted(map(str, extra))[0]!r}"
                f" (known: {', '.join(OPTIONS)})"
            )
        origins = _origins(options)
        methods = _tokens(options, "allow-methods", DEFAULT_METHODS, False)
        assert methods is not None
        allowHeaders = _tokens(options, "allow-headers", DEFAULT_ALLOW_HEADERS, True)
        expose = _tokens(options, "expose-headers", DEFAULT_EXPOSE_HEADERS, False)
        assert expose is not None
        try:
            maxAge = int(parseDuration(options.get("max-age", DEFAULT_MAX_AGE)))
        except ValueError as e:
            raise HookConfigError(f"max-age: {e}") from None
        credentials = options.get("allow-credentials", False)
        if not isinstance(credentials, bool):
            raise HookConfigError(
                f"allow-credentials: expected true or false, got {credentials!r}"
            )
        if credentials and origins is None:
            # Browsers refuse credentials with "*": so does the hook, rather
            # than allow every origin to read answers with the user's cookies.
            raise HookConfigError(
                'allow-credentials: cannot be true with allow-origins "*":'
                " list the origins"
            )
        return cls(
            origins,
            methods,
            None if allowHeaders is None else tuple(h.lower() for h in allowHeaders),
            expose,
            maxAge,
            credentials,
        )

    def allows(self, origin: bytes) -> bool:
        return self.origins is None or origin in self.origins


def _one(headers: Headers, name: bytes) -> bytes | None:
    """
    The header's one value, or L{None} if it is absent or repeated.
    """
    values = headers.getRawHeaders(name)
    return values[0] if values is not None and len(values) == 1 else None


def _addVary(headers: Headers, value: bytes) -> None:
    if value not in headers.getRawHeaders(b"vary", []):
        headers.addRawHeader(b"vary", value)


@implementer(IRequestHook, IResponseHook)
class CorsHook:
    """
    Answers preflights; marks allowed cross-origin answers readable.
    """

    def __init__(self, policy: CorsPolicy) -> None:
        self.policy = policy
        #: The per-request state key: this hook saw an allowed origin.
        self._key = f"cors:{id(self)}"
        p = policy
        self._methods = ", ".join(p.methods).encode("ascii")
        self._allowHeaders = (
            None if p.allowHeaders is None else ", ".join(p.allowHeaders).encode()
        )
        self._expose = ", ".join(p.exposeHeaders).encode("ascii")
        self._maxAge = b"%d" % (p.maxAge,)

    def _allowOrigin(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        """
        The headers that let C{origin} read an answer.
        """
        if self.policy.credentials:
            return [
                (b"Access-Control-Allow-Origin", origin),
                (b"Access-Control-Allow-Credentials", b"true"),
            ]
        # With "*" and no credentials, the one answer suits every origin.
        which = b"*" if self.policy.origins is None else origin
        return [(b"Access-Control-Allow-Origin", which)]

    def onRequest(self, request: IHookRequest) -> HookResponse | None:
        headers = request.headers
        origin = _one(headers, b"origin")
        if origin is None:
            return None
        asked = _one(headers, b"access-control-request-method")
        if not isCorsPreflight(request.method, origin, asked):
            if self.policy.allows(origin):
                request.state[self._key] = origin
                # Any answer but the upstream's (a later hook's refusal,
                # monedge's own) is readable too: a gRPC-Web page sees its
                # grpc-status, not a network error.
                self._markReadable(request.answerHeaders, origin)
            return None
        assert asked is not None
        answer = [(b"Vary", _VARY)]
        granted = self._preflight(origin, asked, headers)
        if granted is not None:
            answer.extend(granted)
        # Refused or not, the preflight ends here: the browser reads a
        # refusal from the missing Access-Control-Allow-* headers.
        return HookResponse(204, headers=tuple(answer))

    def _preflight(
        self, origin: bytes, asked: bytes, headers: Headers
    ) -> list[tuple[bytes, bytes]] | None:
        """
        The CORS headers granting a preflight, or L{None} to refuse it.
        """
        policy = self.policy
        if not policy.allows(origin):
            return None
        if asked.decode("latin-1") not in policy.methods:
            return None
        requested = [
            name.strip().lower()
            for value in headers.getRawHeaders(b"access-control-request-headers", [])
            for name in value.decode("latin-1").split(",")
            if name.strip()
        ]
        allowed = policy.allowHeaders
        if allowed is None:
            # Any header: echo the ones asked for (a literal "*" would not
            # cover Authorization, nor anything with credentials).
            if not all(isToken(name) for name in requested):
                return None
            allowHeaders = ", ".join(requested).encode("ascii")
        elif any(name not in allowed for name in requested):
            return None
        else:
            allowHeaders = self._allowHeaders or b""
        granted = self._allowOrigin(origin)
        granted.append((b"Access-Control-Allow-Methods", self._methods))
        if allowHeaders:
            granted.append((b"Access-Control-Allow-Headers", allowHeaders))
        granted.append((b"Access-Control-Max-Age", self._maxAge))
        return granted

    def onResponse(self, request: IHookRequest, response: IHookResponse) -> None:
        origin = request.state.get(self._key)
        if origin is None:
            return
        self._markReadable(response.headers, origin)

    def _markReadable(self, headers: Headers, origin: bytes) -> None:
        """
        Set the headers that let C{origin} read an answer in C{headers}.
        """
        for name, value in self._allowOrigin(origin):
            # Set, not added: two values (the upstream's own and this one)
            # would make the browser refuse the answer.
            headers.setRawHeaders(name, [value])
        if self._expose:
            headers.setRawHeaders(b"Access-Control-Expose-Headers", [self._expose])
        _addVary(headers, b"Origin")


@implementer(IHookFactory, IPlugin)
class CorsHookFactory:
    """
    Makes C{cors} hooks.
    """

    name = "cors"
    description = (
        "CORS: answer preflights, let allowed origins read answers (gRPC-Web too)."
    )

    def build(self, options: Mapping[str, Any], context: Any) -> CorsHook:
        return CorsHook(CorsPolicy.parse(options))
