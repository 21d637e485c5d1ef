"""
The C{auth} hook's C{external} mode: ask an auth service (a URL, or a path
on the next ready endpoint of a registry service) about each request, with
at most C{max-in-flight} calls under way; a 2xx lets the request pass with
the answer's C{copy-headers}, any other answer is relayed to the client.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

from monedge.builtin.auth.authenticator import Authenticator, AuthUnavailable
from monedge.builtin.auth.options import (
    headerNames,
    httpURL,
    identityHeader,
    seconds,
)
from monedge.hooks import HookConfigError, HookResponse
from monedge.interfaces import IHookRequest
from monedge.rules.convention import parseServiceName
from monedge.rules.headers import HOP_BY_HOP, connectionTokens
from monedge.rules.redact import redactText, redactURL
from monedge.upstream.balancer import eligible

#: The most calls to the auth service one external hook has in flight by
#: default (Envoy's default circuit breaker allows 1024 requests to a
#: cluster), and the most that may be configured; beyond, a request fails
#: closed.
DEFAULT_MAX_IN_FLIGHT = 1024
MAX_IN_FLIGHT = 65536

#: Headers the external mode sends the auth service from monedge's own
#: upstream headers (never from what the client sent under these names).
FORWARDING = (
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"X-Forwarded-Host",
    b"X-Forwarded-Port",
    b"X-Request-Id",
)

#: The options of the C{external} mode, beside those every mode has.
OPTIONS = frozenset(
    [
        "url",
        "service",
        "path",
        "forward-headers",
        "copy-headers",
        "timeout",
        "max-in-flight",
    ]
)

_PATH = re.compile(r"/[\x21-\x7e]*\Z")

#: Response headers never relayed from the auth service: framing, and
#: those monedge sets itself on its answer.
_NOT_RELAYED = frozenset(
    [*HOP_BY_HOP, b"content-length", b"date", b"server", b"x-request-id"]
)


class ExternalAuthHook(Authenticator):
    """
    Asks an auth service about each request.
    """

    def __init__(
        self,
        identity: Sequence[bytes],
        *,
        http: Any,
        url: str | None = None,
        registry: Any = None,
        service: str | None = None,
        path: str = "/",
        forward: Sequence[bytes] = (b"Authorization", b"Cookie"),
        copy: Sequence[bytes] = (),
        timeout: float = 2.0,
        maxInFlight: int = DEFAULT_MAX_IN_FLIGHT,
    ) -> None:
        super().__init__(identity)
        self._http = http
        self._url = url
        self._registry = registry
        self._service = service
        self._path = path
        self._forward = tuple(forward)
        self._copy = tuple(copy)
        self._timeout = timeout
        self._turn = 0
        self._maxInFlight = maxInFlight
        #: Calls to the auth service under way.
        self.inFlight = 0

    def authenticate(self, request: IHookRequest) -> Deferred[HookResponse | None]:
        """
        Ask the auth service, and pass or relay its answer.
        """
        return Deferred.fromCoroutine(self._ask(request))

    def target(self) -> str:
        """
        The auth service's URL: the configured one, or the next eligible
        endpoint of the configured service.

        @raise AuthUnavailable: if the service is unknown or has no
            eligible endpoint.
        """
        if self._url is not None:
            return self._url
        assert self._service is not None
        entry = self._registry.lookup(self._service)
        if entry is None:
            raise AuthUnavailable(f"auth service {self._service} is not registered")
        endpoints = eligible(entry.endpoints)
        if not endpoints:
            raise AuthUnavailable(f"auth service {self._service} has no ready endpoint")
        endpoint = endpoints[self._turn % len(endpoints)]
        self._turn += 1
        return f"{endpoint.scheme}://{endpoint.authority}{self._path}"

    async def _ask(self, request: IHookRequest) -> HookResponse | None:
        if self.inFlight >= self._maxInFlight:
            raise AuthUnavailable(
                f"{self.inFlight} calls to the auth service already in flight"
                " (max-in-flight)"
            )
        url = self.target()
        headers = Headers()
        for name in self._forward:
            values = request.headers.getRawHeaders(name)
            if values:
                headers.setRawHeaders(name, values)
        for name in FORWARDING:
            values = request.upstreamHeaders.getRawHeaders(name)
            if values:
                headers.setRawHeaders(name, values)
            else:
                headers.removeHeader(name)
        headers.setRawHeaders(b"X-Forwarded-Method", [request.method])
        headers.setRawHeaders(b"X-Forwarded-Uri", [request.path + request.query])
        self.inFlight += 1
        try:
            response = await self._http.request(
                "GET",
                url,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            )
            body: bytes = await response.content()
        except Exception as e:
            raise AuthUnavailable(
                f"auth service {redactURL(url)} failed: {type(e).__name__}:"
                f" {redactText(str(e))}"
            ) from e
        finally:
            self.inFlight -= 1
        code: int = response.code
        if 200 <= code < 300:
            for name in self._copy:
                values = response.headers.getRawHeaders(name)
                if values:
                    request.upstreamHeaders.setRawHeaders(name, values)
            return None
        return HookResponse(code, headers=relayedHeaders(response.headers), body=body)


def relayedHeaders(headers: Headers) -> tuple[tuple[bytes, bytes], ...]:
    """
    An auth service's response headers as relayed to the client: without
    hop-by-hop headers, those its C{Connection} names, C{Content-Length},
    and the headers monedge sets itself (C{Date}, C{Server},
    C{X-Request-Id}).
    """
    tokens = connectionTokens(headers.getRawHeaders(b"connection"))
    return tuple(
        (name, value)
        for name, values in headers.getAllRawHeaders()
        if name.lower() not in _NOT_RELAYED and name.lower() not in tokens
        for value in values
    )


def buildExternal(
    options: Mapping[str, Any],
    context: Any,
    identity: tuple[bytes, ...],
    lowered: frozenset[bytes],
) -> ExternalAuthHook:
    """
    An L{ExternalAuthHook} from the C{external} mode's C{options}, given the
    parsed C{identity} headers (and C{lowered}, their lower-cased names).

    @raise HookConfigError: naming the first bad option.
    """
    if ("url" in options) == ("service" in options):
        raise HookConfigError("url, service: mode external needs exactly one")
    url = service = None
    if "url" in options:
        url = httpURL(options["url"], "url")
        if "path" in options:
            raise HookConfigError("path: only with service (put it in url)")
    else:
        service = options["service"]
        if not isinstance(service, str) or parseServiceName(service) is None:
            raise HookConfigError(
                f"service: expected a registry name like service.api.auth,"
                f" got {service!r}"
            )
        if context.registry is None:
            raise HookConfigError("service: the hook context has no registry")
    path = options.get("path", "/")
    if not isinstance(path, str) or not _PATH.match(path):
        raise HookConfigError(f"path: expected an absolute path, got {path!r}")
    forward = headerNames(
        options.get("forward-headers", ["Authorization", "Cookie"]),
        "forward-headers",
    )
    copy = tuple(
        identityHeader(name, lowered, "copy-headers")
        for name in headerNames(options.get("copy-headers", []), "copy-headers")
    )
    timeout = seconds(options.get("timeout", 2), "timeout")
    hookTimeout = float(getattr(context, "timeout", 5.0))
    if timeout >= hookTimeout:
        raise HookConfigError(
            f"timeout: must be below the hook timeout ({hookTimeout:g} s),"
            f" got {timeout:g} s"
        )
    maxInFlight = options.get("max-in-flight", DEFAULT_MAX_IN_FLIGHT)
    if (
        isinstance(maxInFlight, bool)
        or not isinstance(maxInFlight, int)
        or not 1 <= maxInFlight <= MAX_IN_FLIGHT
    ):
        raise HookConfigError(
            f"max-in-flight: expected a whole number from 1 to {MAX_IN_FLIGHT},"
            f" got {maxInFlight!r}"
        )
    if context.http is None:
        raise HookConfigError("url: the hook context has no HTTP client")
    return ExternalAuthHook(
        identity,
        http=context.http,
        url=url,
        registry=context.registry,
        service=service,
        path=path,
        forward=forward,
        copy=copy,
        timeout=timeout,
        maxInFlight=maxInFlight,
    )
