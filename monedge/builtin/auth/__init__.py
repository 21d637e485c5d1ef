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

The hook is a package, one idea a module: L{options} (the grammar of
option values), L{authenticator} (what the modes share: identity headers
stripped first, the 401 answers, L{AuthUnavailable}), L{jwt}, L{apikey} and
L{external} (the three modes), and L{hook} (the factory that picks one).
This module re-exports the names used outside the package.
"""

from monedge.builtin.auth.authenticator import (
    CHALLENGE,
    CHALLENGE_INVALID,
    AuthUnavailable,
)
from monedge.builtin.auth.external import DEFAULT_MAX_IN_FLIGHT, MAX_IN_FLIGHT
from monedge.builtin.auth.hook import AuthHookFactory
from monedge.builtin.auth.jwt import (
    MIN_JWKS_REFRESH,
    MIN_JWKS_REFRESH_INTERVAL,
    claimValue,
)

__all__ = [
    "CHALLENGE",
    "CHALLENGE_INVALID",
    "DEFAULT_MAX_IN_FLIGHT",
    "MAX_IN_FLIGHT",
    "MIN_JWKS_REFRESH",
    "MIN_JWKS_REFRESH_INTERVAL",
    "AuthHookFactory",
    "AuthUnavailable",
    "claimValue",
]
