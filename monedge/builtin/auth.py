"""
The C{auth} hook: authenticate requests at the edge, in one of three modes,
and tell the upstream who the caller is in headers only monedge can set.

    hooks:
      - name: auth
        options:
          mode: jwt
          identity-headers: [X-User-Id, X-Scopes]
          jwks-url: https://idp.example.com/.well-known/jwks.json
          issuer: https://idp.example.com/
          audience: orders
          claims-to-headers: {sub: X-User-Id, scope: X-Scopes}

Every mode first removes every C{identity-headers} name from the headers
going upstream, whatever else happens, so a client can never forge them;
only the hook sets them again, from what it verified.

Modes:

  - C{jwt}: a C{Authorization: Bearer} JSON Web Token, verified with PyJWT
    against the keys of a JWK set fetched with the hook HTTP client.  Only
    RS256 and ES256 are accepted (never C{none} or an HMAC algorithm), and a
    key is only ever used with its own algorithm.  Keys are cached by
    C{kid}; an unknown C{kid} refetches the set (at most once per
    C{jwks-min-refresh}), and a request arriving after
    C{jwks-refresh-interval} refetches it in the background while the
    cached keys keep answering.  C{exp} is required; C{nbf}, C{iat}, and,
    when configured, C{iss} and C{aud} are checked with C{leeway}.  With no
    C{audience} configured a token that carries an C{aud} claim is refused
    (PyJWT's rule): configure the audience.
  - C{api-key}: the key in a header (C{X-Api-Key}) or C{Authorization:
    Bearer}; its SHA-256 must be listed in C{keys-file}, re-read when the
    file changes (checked at most once a second).
  - C{external}: ask an auth service (C{url}, or C{path} on the next ready
    endpoint of a registry C{service}) with a C{GET} carrying
    C{X-Forwarded-Method}, C{X-Forwarded-Uri} (the routed path and query),
    the C{forward-headers} the client sent, and monedge's own
    C{X-Forwarded-For}/C{-Proto}/C{-Host}/C{-Port} and C{X-Request-Id};
    redirects are not followed.  A 2xx lets the request pass, with the
    C{copy-headers} of the answer copied upstream; any other answer is
    relayed to the client with its body and headers (less hop-by-hop ones,
    C{Content-Length}, C{Date}, C{Server} and C{X-Request-Id}).

A request without credentials, or with invalid ones, is answered 401
C{unauthorized} with C{WWW-Authenticate} (RFC 6750): C{Bearer
realm="monedge"} when there were none, with C{error="invalid_token"} when
they were wrong.

Failing closed: when the hook cannot decide -- the JWK set cannot be
fetched and no keys are cached, a token names an unknown C{kid} while the
last fetch of the set failed (the key may be new), the auth service is
unreachable, times out, or has no ready endpoint -- it raises
L{AuthUnavailable}, and monedge answers 500 C{hook_failed}.  No
request passes unauthenticated, and the client is not told its credentials
are wrong when they were never checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import jwt
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from monedge.balancer import eligible
from monedge.convention import parseServiceName
from monedge.headers import HOP_BY_HOP, connectionTokens
from monedge.hooks import HookConfigError, HookResponse
from monedge.interfaces import IHookFactory, IHookRequest, IRequestHook
from monedge.policy import parseDuration
from monedge.redact import redactText, redactURL
from monedge.syntax import bearerToken, isToken

#: The modes, by option value.
MODES = ("jwt", "api-key", "external")

#: The JWT signature algorithms the hook can accept.
ALGORITHMS = ("RS256", "ES256")

#: Floors and ceilings on what clients can make the hook do (docs/hooks.md):
#: the least seconds between JWK set fetches an unknown C{kid} or a failed
#: fetch may start, and the least C{jwks-refresh-interval}.
MIN_JWKS_REFRESH = 1.0
MIN_JWKS_REFRESH_INTERVAL = 10.0

#: The most calls to the auth service one external hook has in flight by
#: default (Envoy's default circuit breaker allows 1024 requests to a
#: cluster), and the most that may be configured; beyond, a request fails
#: closed.
DEFAULT_MAX_IN_FLIGHT = 1024
MAX_IN_FLIGHT = 65536

#: C{WWW-Authenticate} for a request that brought no credentials.
CHALLENGE = b'Bearer realm="monedge"'

#: C{WWW-Authenticate} for a request whose credentials are wrong.
CHALLENGE_INVALID = b'Bearer realm="monedge", error="invalid_token"'

#: Headers the external mode sends the auth service from monedge's own
#: upstream headers (never from what the client sent under these names).
FORWARDING = (
    b"X-Forwarded-For",
    b"X-Forwarded-Proto",
    b"X-Forwarded-Host",
    b"X-Forwarded-Port",
    b"X-Request-Id",
)

_COMMON = frozenset(["mode", "identity-headers"])
_MODE_OPTIONS = {
    "jwt": frozenset(
        [
            "jwks-url",
            "issuer",
            "audience",
            "algorithms",
            "leeway",
            "claims-to-headers",
            "jwks-refresh-interval",
            "jwks-min-refresh",
        ]
    ),
    "api-key": frozenset(["keys-file", "header", "key-id-header"]),
    "external": frozenset(
        [
            "url",
            "service",
            "path",
            "forward-headers",
            "copy-headers",
            "timeout",
            "max-in-flight",
        ]
    ),
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_DIGEST = re.compile(r"[0-9a-f]{64}\Z")
_PATH = re.compile(r"/[\x21-\x7e]*\Z")

#: Header names an identity, forwarded or copied header may not have:
#: framing and routing that monedge owns.
_RESERVED = frozenset([*HOP_BY_HOP, b"host", b"content-length", b"expect"])

#: Response headers never relayed from the auth service: framing, and
#: those monedge sets itself on its answer.
_NOT_RELAYED = frozenset(
    [*HOP_BY_HOP, b"content-length", b"date", b"server", b"x-request-id"]
)


class AuthUnavailable(Exception):
    """
    The hook cannot decide whether a request is authenticated (no JWK set,
    the auth service unreachable): the request fails closed with 500
    C{hook_failed}.
    """


# Options


def _headerName(value: object, option: str) -> bytes:
    if not isToken(value):
        raise HookConfigError(f"{option}: invalid header name {value!r}")
    if value.lower().encode("ascii") in _RESERVED:
        raise HookConfigError(f"{option}: {value} is a header monedge owns")
    return value.encode("ascii")


def _headerNames(value: object, option: str) -> tuple[bytes, ...]:
    if not isinstance(value, list):
        raise HookConfigError(f"{option}: expected a list of header names")
    return tuple(_headerName(v, option) for v in value)


def _identity(name: bytes, identity: frozenset[bytes], option: str) -> bytes:
    if name.lower() not in identity:
        raise HookConfigError(
            f"{option}: {name.decode()} must be listed in identity-headers"
        )
    return name


def _seconds(
    value: object, option: str, zero: bool = False, least: float = 0.0
) -> float:
    if zero and not isinstance(value, bool) and value in (0, "0", "0s"):
        seconds = 0.0
    else:
        try:
            seconds = parseDuration(value)
        except ValueError as e:
            raise HookConfigError(f"{option}: {e}") from None
    if seconds < least:
        raise HookConfigError(
            f"{option}: must be at least {least:g} s, got {seconds:g} s"
        )
    return seconds


def _url(value: object, option: str) -> str:
    if not isinstance(value, str):
        raise HookConfigError(f"{option}: expected an http or https URL")
    try:
        parts = urlsplit(value)
        valid = (
            parts.scheme in ("http", "https")
            and bool(parts.hostname)
            and (parts.port is None or parts.port > 0)
        )
    except ValueError:  # A malformed IPv6 literal or port.
        valid = False
    if not valid or _CONTROL.search(value) or " " in value:
        raise HookConfigError(
            f"{option}: expected an http or https URL, got {redactURL(value)!r}"
        )
    if "@" in parts.netloc:
        # The HTTP client would not send them: refused rather than failing
        # every request.
        raise HookConfigError(
            f"{option}: credentials in the URL (user:password@) are not"
            f" supported, got {redactURL(value)!r}"
        )
    return value


def _strings(value: object, option: str) -> str | tuple[str, ...]:
    if isinstance(value, str) and value:
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, str) and v for v in value)
    ):
        return tuple(value)
    raise HookConfigError(f"{option}: expected a string or a list of strings")


# Credentials


def _bearer(headers: Headers) -> bytes | None:
    """
    The bearer token in C{Authorization} (L{bearerToken}'s rule).
    """
    return bearerToken(headers.getRawHeaders(b"authorization"))


def _missing(message: str) -> HookResponse:
    return HookResponse.error(
        401, "unauthorized", message, headers=[(b"www-authenticate", CHALLENGE)]
    )


def _invalid(message: str) -> HookResponse:
    return HookResponse.error(
        401,
        "unauthorized",
        message,
        headers=[(b"www-authenticate", CHALLENGE_INVALID)],
    )


def claimValue(value: object) -> bytes | None:
    """
    A claim as a header value: strings and numbers as they are, booleans as
    C{true}/C{false}, lists of those joined with commas, anything else as
    compact JSON; control characters become spaces.  L{None} for a missing
    (null) claim.
    """
    if value is None:
        return None

    def scalar(v: object) -> str | None:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (str, int, float)):
            return str(v)
        return None

    text = scalar(value)
    if text is None and isinstance(value, list):
        parts = [scalar(v) for v in value]
        if all(p is not None for p in parts):
            text = ",".join(p for p in parts if p is not None)
    if text is None:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return _CONTROL.sub(" ", text).encode("utf-8")


# Hooks


@implementer(IRequestHook)
class _AuthHook:
    """
    The part every mode shares: strip the identity headers, then
    authenticate.
    """

    _log = Logger()

    def __init__(self, identity: Sequence[bytes]) -> None:
        self.identityHeaders = tuple(identity)

    def onRequest(
        self, request: IHookRequest
    ) -> HookResponse | None | Deferred[HookResponse | None]:
        """
        Strip the identity headers from the upstream request, then let the
        request pass (setting them from what was verified) or answer it.
        """
        for name in self.identityHeaders:
            request.upstreamHeaders.removeHeader(name)
        return self.authenticate(request)

    def authenticate(
        self, request: IHookRequest
    ) -> HookResponse | None | Deferred[HookResponse | None]:
        """
        Decide, once the identity headers are gone.
        """
        raise NotImplementedError()


class JWTAuthHook(_AuthHook):
    """
    Verifies bearer JWTs against a cached, refreshed JWK set.
    """

    def __init__(
        self,
        identity: Sequence[bytes],
        *,
        reactor: Any,
        http: Any,
        jwksURL: str,
        algorithms: Sequence[str],
        issuer: str | tuple[str, ...] | None = None,
        audience: str | tuple[str, ...] | None = None,
        leeway: float = 30.0,
        claims: Sequence[tuple[str, bytes]] = (),
        refreshInterval: float = 300.0,
        minRefresh: float = 10.0,
        fetchTimeout: float = 5.0,
    ) -> None:
        super().__init__(identity)
        self._reactor = reactor
        self._http = http
        self.jwksURL = jwksURL
        #: The URL as logs and errors show it (no user-info or query).
        self.shownURL = redactURL(jwksURL)
        self._algorithms = tuple(algorithms)
        self._issuer = issuer
        self._audience = audience
        self._leeway = leeway
        self._claims = tuple(claims)
        self._refreshInterval = refreshInterval
        self._minRefresh = minRefresh
        self._fetchTimeout = fetchTimeout
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._loaded = False
        self._lastAttempt: float | None = None
        self._lastSuccess: float | None = None
        self._lastError: str | None = "never fetched"
        self._waiters: list[Deferred[None]] | None = None

    def authenticate(
        self, request: IHookRequest
    ) -> HookResponse | None | Deferred[HookResponse | None]:
        """
        Verify the bearer token: at once with a cached key, else after
        fetching the JWK set.
        """
        token = _bearer(request.headers)
        if token is None:
            return _missing("a bearer token is required")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return _invalid("the bearer token is malformed")
        alg = header.get("alg")
        if alg not in self._algorithms:
            return _invalid("the token's algorithm is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return _invalid("the token's kid is malformed")
        key = self._key(kid)
        if key is None:
            return Deferred.fromCoroutine(self._verifyUnknown(request, token, alg, kid))
        self._refreshIfStale()
        return self._verify(request, token, alg, key)

    def _key(self, kid: str | None) -> jwt.PyJWK | None:
        """
        The cached key for C{kid}; a token without a C{kid} may use the
        only key of a one-key set.
        """
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _verifyUnknown(
        self, request: IHookRequest, token: bytes, alg: str, kid: str | None
    ) -> HookResponse | None:
        if self._waiters is not None or self._mayFetch():
            await self._refresh()
        elif not self._loaded:
            raise AuthUnavailable(
                f"no keys from {self.shownURL} yet (last fetch: {self._lastError})"
            )
        key = self._key(kid)
        if key is None:
            if self._lastError is not None:
                # The set in hand may be stale: the key may be new.
                raise AuthUnavailable(
                    f"unknown kid {kid!r} and the last fetch of {self.shownURL}"
                    f" failed: {self._lastError}"
                )
            return _invalid("the token's signing key is unknown")
        return self._verify(request, token, alg, key)

    def _verify(
        self, request: IHookRequest, token: bytes, alg: str, key: jwt.PyJWK
    ) -> HookResponse | None:
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp"]},
            )
        except jwt.ExpiredSignatureError:
            return _invalid("the token has expired")
        except jwt.ImmatureSignatureError:
            return _invalid("the token is not valid yet")
        except jwt.InvalidAudienceError:
            return _invalid("the token's audience is not accepted")
        except jwt.InvalidIssuerError:
            return _invalid("the token's issuer is not accepted")
        except jwt.MissingRequiredClaimError as e:
            return _invalid(f"the token lacks the {e.claim} claim")
        except jwt.InvalidSignatureError:
            return _invalid("the token's signature is invalid")
        except jwt.PyJWTError:
            return _invalid("the token is invalid")
        for claim, name in self._claims:
            value = claimValue(claims.get(claim))
            if value is not None:
                request.upstreamHeaders.setRawHeaders(name, [value])
        return None

    # The JWK set

    def _mayFetch(self) -> bool:
        last = self._lastAttempt
        return last is None or self._reactor.seconds() - last >= self._minRefresh

    def _refreshIfStale(self) -> None:
        last = self._lastSuccess
        if (
            last is not None
            and self._waiters is None
            and self._reactor.seconds() - last >= self._refreshInterval
            and self._mayFetch()
        ):
            # Logged in _fetched; the cached keys keep answering meanwhile.
            self._refresh().addErrback(lambda _: None)

    def _refresh(self) -> Deferred[None]:
        """
        Fetch the JWK set, or join the fetch under way; fires when it is
        done, or fails with L{AuthUnavailable}.
        """
        waiter: Deferred[None] = Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        self._lastAttempt = self._reactor.seconds()
        Deferred.fromCoroutine(self._fetch()).addBoth(self._fetched)
        return waiter

    async def _fetch(self) -> None:
        response = await self._http.get(self.jwksURL, timeout=self._fetchTimeout)
        if response.code != 200:
            await response.content()
            raise AuthUnavailable(f"the JWK set answered {response.code}")
        self._keys = usableKeys(await response.json(), self._algorithms)

    def _fetched(self, result: object) -> None:
        waiters, self._waiters = self._waiters or [], None
        if isinstance(result, Failure):
            error = result.value
            reason = redactText(
                str(error)
                if isinstance(error, AuthUnavailable)
                else f"{type(error).__name__}: {result.getErrorMessage()}"
            )
            self._lastError = reason
            self._log.error(
                "auth: cannot fetch the JWK set {url}: {reason}"
                " (keeping {count} cached keys)",
                url=self.shownURL,
                reason=reason,
                count=len(self._keys),
            )
            failure = Failure(AuthUnavailable(f"JWK set {self.shownURL}: {reason}"))
        else:
            self._loaded = True
            self._lastSuccess = self._reactor.seconds()
            self._lastError = None
        for waiter in waiters:
            if waiter.called:
                continue  # Its request timed out and cancelled it.
            if isinstance(result, Failure):
                waiter.errback(failure)
            else:
                waiter.callback(None)


def usableKeys(
    document: object, algorithms: Sequence[str]
) -> dict[str | None, jwt.PyJWK]:
    """
    The signing keys in a JWK set that can verify one of C{algorithms}, by
    C{kid}; keys for encryption, of other types or malformed are skipped.

    @raise AuthUnavailable: if the document is not a JWK set or has no
        usable key.
    """
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise AuthUnavailable("the JWK set is not a JSON object with a keys list")
    keys: dict[str | None, jwt.PyJWK] = {}
    for item in document["keys"]:
        if not isinstance(item, dict) or item.get("use", "sig") != "sig":
            continue
        kid = item.get("kid")
        if kid is not None and not isinstance(kid, str):
            continue
        try:
            key = jwt.PyJWK(item)
        except jwt.PyJWTError:
            continue
        if key.algorithm_name in algorithms:
            keys.setdefault(kid, key)
    if not keys:
        raise AuthUnavailable("the JWK set has no usable RS256 or ES256 key")
    return keys


class APIKeyAuthHook(_AuthHook):
    """
    Accepts requests whose API key's SHA-256 is listed in a file.
    """

    def __init__(
        self,
        identity: Sequence[bytes],
        *,
        reactor: Any,
        keysFile: str,
        header: bytes = b"X-Api-Key",
        keyIdHeader: bytes | None = None,
    ) -> None:
        super().__init__(identity)
        self._reactor = reactor
        self.keysFile = keysFile
        self._header = header
        self._keyIdHeader = keyIdHeader
        self._signature = _fileSignature(keysFile)
        self.digests = readDigests(keysFile)
        self._lastCheck: float = reactor.seconds()

    def authenticate(self, request: IHookRequest) -> HookResponse | None:
        """
        Look the key's digest up in the (re-read if changed) keys file.
        """
        self._reloadIfChanged()
        values = request.headers.getRawHeaders(self._header)
        if values:
            key = values[0].strip() if len(values) == 1 else b""
        else:
            token = _bearer(request.headers)
            if token is None:
                return _missing("an API key is required")
            key = token
        if not key:
            return _invalid("the API key is malformed")
        # The digest is not secret, so looking it up in a set leaks nothing
        # about any key (what a constant-time comparison would protect).
        digest = hashlib.sha256(key).hexdigest()
        if digest not in self.digests:
            return _invalid("the API key is not valid")
        if self._keyIdHeader is not None:
            request.upstreamHeaders.setRawHeaders(
                self._keyIdHeader, [digest[:8].encode("ascii")]
            )
        return None

    def _reloadIfChanged(self) -> None:
        now: float = self._reactor.seconds()
        if now - self._lastCheck < 1.0:
            return
        self._lastCheck = now
        try:
            signature = _fileSignature(self.keysFile)
            if signature == self._signature:
                return
            digests = readDigests(self.keysFile)
        except (OSError, ValueError) as e:
            self._log.error(
                "auth: cannot reload {path}, keeping {count} keys: {error}",
                path=self.keysFile,
                count=len(self.digests),
                error=str(e),
            )
            return
        self._signature = signature
        self.digests = digests
        self._log.info(
            "auth: reloaded {path}: {count} keys",
            path=self.keysFile,
            count=len(digests),
        )


def _fileSignature(path: str) -> tuple[int, int, int]:
    status = os.stat(path)
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def readDigests(path: str) -> frozenset[str]:
    """
    The SHA-256 hex digests in a keys file: one per line, C{#} starting a
    comment, blank lines ignored.

    @raise OSError: if the file cannot be read.
    @raise ValueError: naming the first line that is not a digest.
    """
    digests = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip().lower()
            if not text:
                continue
            if not _DIGEST.match(text):
                raise ValueError(f"line {number} is not a SHA-256 hex digest")
            digests.add(text)
    return frozenset(digests)


class ExternalAuthHook(_AuthHook):
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


# The factory


@implementer(IHookFactory, IPlugin)
class AuthHookFactory:
    """
    Makes C{auth} hooks.
    """

    name = "auth"
    description = (
        "Authenticate requests (JWT, API key or an external auth service)"
        " and set identity headers."
    )

    def build(self, options: Mapping[str, Any], context: Any) -> _AuthHook:
        """
        Make an C{auth} hook; see the module docstring for its options.

        @raise HookConfigError: naming the first bad option.
        """
        mode = options.get("mode")
        if mode not in MODES:
            raise HookConfigError(
                f"mode: expected one of {', '.join(MODES)}, got {mode!r}"
            )
        known = _COMMON | _MODE_OPTIONS[mode]
        extra = sorted(set(map(str, options)) - known)
        if extra:
            raise HookConfigError(
                f"unknown option {extra[0]!r} for mode {mode}"
                f" (known: {', '.join(sorted(known))})"
            )
        identity = _headerNames(options.get("identity-headers", []), "identity-headers")
        lowered = frozenset(n.lower() for n in identity)
        if mode == "jwt":
            return self._jwt(options, context, identity, lowered)
        if mode == "api-key":
            return self._apiKey(options, context, identity, lowered)
        return self._external(options, context, identity, lowered)

    def _jwt(
        self,
        options: Mapping[str, Any],
        context: Any,
        identity: tuple[bytes, ...],
        lowered: frozenset[bytes],
    ) -> JWTAuthHook:
        if "jwks-url" not in options:
            raise HookConfigError("jwks-url: required in mode jwt")
        url = _url(options["jwks-url"], "jwks-url")
        issuer = audience = None
        if "issuer" in options:
            issuer = _strings(options["issuer"], "issuer")
        if "audience" in options:
            audience = _strings(options["audience"], "audience")
        algorithms = options.get("algorithms", list(ALGORITHMS))
        if (
            not isinstance(algorithms, list)
            or not algorithms
            or any(a not in ALGORITHMS for a in algorithms)
        ):
            raise HookConfigError(
                f"algorithms: expected a non-empty list of {', '.join(ALGORITHMS)},"
                f" got {algorithms!r}"
            )
        leeway = _seconds(options.get("leeway", 30), "leeway", zero=True)
        mapping = options.get("claims-to-headers", {})
        if not isinstance(mapping, dict) or not all(
            isinstance(c, str) and c for c in mapping
        ):
            raise HookConfigError(
                "claims-to-headers: expected a mapping of claim name to header name"
            )
        claims = [
            (
                claim,
                _identity(
                    _headerName(header, "claims-to-headers"),
                    lowered,
                    "claims-to-headers",
                ),
            )
            for claim, header in mapping.items()
        ]
        if context.http is None:
            raise HookConfigError("jwks-url: the hook context has no HTTP client")
        return JWTAuthHook(
            identity,
            reactor=context.reactor,
            http=context.http,
            jwksURL=url,
            algorithms=algorithms,
            issuer=issuer,
            audience=audience,
            leeway=leeway,
            claims=claims,
            refreshInterval=_seconds(
                options.get("jwks-refresh-interval", 300),
                "jwks-refresh-interval",
                least=MIN_JWKS_REFRESH_INTERVAL,
            ),
            minRefresh=_seconds(
                options.get("jwks-min-refresh", 10),
                "jwks-min-refresh",
                zero=True,
                least=MIN_JWKS_REFRESH,
            ),
            fetchTimeout=float(getattr(context, "timeout", 5.0)),
        )

    def _apiKey(
        self,
        options: Mapping[str, Any],
        context: Any,
        identity: tuple[bytes, ...],
        lowered: frozenset[bytes],
    ) -> APIKeyAuthHook:
        path = options.get("keys-file")
        if not isinstance(path, str) or not path:
            raise HookConfigError("keys-file: required in mode api-key (a path)")
        header = _headerName(options.get("header", "X-Api-Key"), "header")
        if header.lower() == b"authorization":
            raise HookConfigError(
                "header: Authorization is always read, as a Bearer token"
            )
        keyIdHeader = None
        if "key-id-header" in options:
            keyIdHeader = _identity(
                _headerName(options["key-id-header"], "key-id-header"),
                lowered,
                "key-id-header",
            )
        try:
            return APIKeyAuthHook(
                identity,
                reactor=context.reactor,
                keysFile=path,
                header=header,
                keyIdHeader=keyIdHeader,
            )
        except OSError as e:
            raise HookConfigError(
                f"keys-file: cannot read {path}: {e.strerror or e}"
            ) from None
        except ValueError as e:
            raise HookConfigError(f"keys-file: {path}: {e}") from None

    def _external(
        self,
        options: Mapping[str, Any],
        context: Any,
        identity: tuple[bytes, ...],
        lowered: frozenset[bytes],
    ) -> ExternalAuthHook:
        if ("url" in options) == ("service" in options):
            raise HookConfigError("url, service: mode external needs exactly one")
        url = service = None
        if "url" in options:
            url = _url(options["url"], "url")
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
        forward = _headerNames(
            options.get("forward-headers", ["Authorization", "Cookie"]),
            "forward-headers",
        )
        copy = tuple(
            _identity(name, lowered, "copy-headers")
            for name in _headerNames(options.get("copy-headers", []), "copy-headers")
        )
        timeout = _seconds(options.get("timeout", 2), "timeout")
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
