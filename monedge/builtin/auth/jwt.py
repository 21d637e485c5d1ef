"""
The C{auth} hook's C{jwt} mode: a C{Authorization: Bearer} JSON Web Token,
verified with PyJWT against the keys of a JWK set fetched with the hook HTTP
client, cached by C{kid} and refreshed within floors clients cannot lower;
its verified claims set identity headers.

A token verified once is remembered, by its SHA-256 digest, with its
C{exp} and the identity headers it set, until it expires (by the same rule
as PyJWT's, C{leeway} included) or the JWK set is fetched again: the same
token again costs a hash and a lookup instead of a JOSE decode and a
signature check.  At most L{MAX_VERIFIED} are remembered, the oldest
forgotten first; refusals are not remembered.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jwt
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from monedge.builtin.auth.authenticator import (
    Authenticator,
    AuthUnavailable,
    bearer,
    invalid,
    missing,
)
from monedge.builtin.auth.options import (
    CONTROL,
    headerName,
    httpURL,
    identityHeader,
    seconds,
    strings,
)
from monedge.hooks import HookConfigError, HookResponse
from monedge.interfaces import IHookRequest
from monedge.rules.redact import redactText, redactURL

#: The JWT signature algorithms the hook can accept.
ALGORITHMS = ("RS256", "ES256")

#: Floors and ceilings on what clients can make the hook do (docs/hooks.md):
#: the least seconds between JWK set fetches an unknown C{kid} or a failed
#: fetch may start, and the least C{jwks-refresh-interval}.
MIN_JWKS_REFRESH = 1.0
MIN_JWKS_REFRESH_INTERVAL = 10.0

#: How many verified tokens a hook remembers (about 200 bytes each).
MAX_VERIFIED = 10_000

#: The options of the C{jwt} mode, beside those every mode has.
OPTIONS = frozenset(
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
    return CONTROL.sub(" ", text).encode("utf-8")


class JWTAuthHook(Authenticator):
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
        #: token digest -> (exp, the identity headers its claims set).
        self._verified: dict[bytes, tuple[int, tuple[tuple[bytes, bytes], ...]]] = {}

    def authenticate(
        self, request: IHookRequest
    ) -> HookResponse | None | Deferred[HookResponse | None]:
        """
        Verify the bearer token: at once with a cached key, else after
        fetching the JWK set.
        """
        token = bearer(request.headers)
        if token is None:
            return missing("a bearer token is required")
        digest = hashlib.sha256(token).digest()
        known = self._verified.get(digest)
        if known is not None:
            exp, headers = known
            if exp > self._reactor.seconds() - self._leeway:
                self._refreshIfStale()
                for name, value in headers:
                    request.upstreamHeaders.setRawHeaders(name, [value])
                return None
            del self._verified[digest]
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return invalid("the bearer token is malformed")
        alg = header.get("alg")
        if alg not in self._algorithms:
            return invalid("the token's algorithm is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            return invalid("the token's kid is malformed")
        key = self._key(kid)
        if key is None:
            return Deferred.fromCoroutine(
                self._verifyUnknown(request, token, digest, alg, kid)
            )
        self._refreshIfStale()
        return self._verify(request, token, digest, alg, key)

    def _key(self, kid: str | None) -> jwt.PyJWK | None:
        """
        The cached key for C{kid}; a token without a C{kid} may use the
        only key of a one-key set.
        """
        if kid is None:
            return next(iter(self._keys.values())) if len(self._keys) == 1 else None
        return self._keys.get(kid)

    async def _verifyUnknown(
        self,
        request: IHookRequest,
        token: bytes,
        digest: bytes,
        alg: str,
        kid: str | None,
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
            return invalid("the token's signing key is unknown")
        return self._verify(request, token, digest, alg, key)

    def _verify(
        self,
        request: IHookRequest,
        token: bytes,
        digest: bytes,
        alg: str,
        key: jwt.PyJWK,
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
            return invalid("the token has expired")
        except jwt.ImmatureSignatureError:
            return invalid("the token is not valid yet")
        except jwt.InvalidAudienceError:
            return invalid("the token's audience is not accepted")
        except jwt.InvalidIssuerError:
            return invalid("the token's issuer is not accepted")
        except jwt.MissingRequiredClaimError as e:
            return invalid(f"the token lacks the {e.claim} claim")
        except jwt.InvalidSignatureError:
            return invalid("the token's signature is invalid")
        except jwt.PyJWTError:
            return invalid("the token is invalid")
        headers = []
        for claim, name in self._claims:
            value = claimValue(claims.get(claim))
            if value is not None:
                headers.append((name, value))
                request.upstreamHeaders.setRawHeaders(name, [value])
        verified = self._verified
        if verified and len(verified) >= MAX_VERIFIED:
            del verified[next(iter(verified))]
        # PyJWT checked that int(exp) works and is not past.
        verified[digest] = (int(claims["exp"]), tuple(headers))
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
        # A token verified with a key that has left the set, or changed,
        # must not pass on its memory.
        self._verified.clear()

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


def buildJWT(
    options: Mapping[str, Any],
    context: Any,
    identity: tuple[bytes, ...],
    lowered: frozenset[bytes],
) -> JWTAuthHook:
    """
    A L{JWTAuthHook} from the C{jwt} mode's C{options}, given the parsed
    C{identity} headers (and C{lowered}, their lower-cased names).

    @raise HookConfigError: naming the first bad option.
    """
    if "jwks-url" not in options:
        raise HookConfigError("jwks-url: required in mode jwt")
    url = httpURL(options["jwks-url"], "jwks-url")
    issuer = audience = None
    if "issuer" in options:
        issuer = strings(options["issuer"], "issuer")
    if "audience" in options:
        audience = strings(options["audience"], "audience")
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
    leeway = seconds(options.get("leeway", 30), "leeway", zero=True)
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
            identityHeader(
                headerName(header, "claims-to-headers"),
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
        refreshInterval=seconds(
            options.get("jwks-refresh-interval", 300),
            "jwks-refresh-interval",
            least=MIN_JWKS_REFRESH_INTERVAL,
        ),
        minRefresh=seconds(
            options.get("jwks-min-refresh", 10),
            "jwks-min-refresh",
            zero=True,
            least=MIN_JWKS_REFRESH,
        ),
        fetchTimeout=float(getattr(context, "timeout", 5.0)),
    )
