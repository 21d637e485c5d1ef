"""
What the C{auth} hook's three authenticators share: the identity headers are
stripped from every request before anything is decided, so only the hook can
set them; a request without credentials or with wrong ones is answered 401
with an RFC 6750 challenge; and one the hook cannot decide about fails
closed with L{AuthUnavailable}.
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from zope.interface import implementer

from monedge.hooks import HookResponse
from monedge.interfaces import IHookRequest, IRequestHook
from monedge.rules.syntax import bearerToken

#: C{WWW-Authenticate} for a request that brought no credentials.
CHALLENGE = b'Bearer realm="monedge"'

#: C{WWW-Authenticate} for a request whose credentials are wrong.
CHALLENGE_INVALID = b'Bearer realm="monedge", error="invalid_token"'


class AuthUnavailable(Exception):
    """
    The hook cannot decide whether a request is authenticated (no JWK set,
    the auth service unreachable): the request fails closed with 500
    C{hook_failed}.
    """


def bearer(headers: Headers) -> bytes | None:
    """
    The bearer token in C{Authorization} (L{bearerToken}'s rule).
    """
    return bearerToken(headers.getRawHeaders(b"authorization"))


def missing(message: str) -> HookResponse:
    """
    The 401 answer to a request that brought no credentials.
    """
    return HookResponse.error(
        401, "unauthorized", message, headers=[(b"www-authenticate", CHALLENGE)]
    )


def invalid(message: str) -> HookResponse:
    """
    The 401 answer to a request whose credentials are wrong.
    """
    return HookResponse.error(
        401,
        "unauthorized",
        message,
        headers=[(b"www-authenticate", CHALLENGE_INVALID)],
    )


@implementer(IRequestHook)
class Authenticator:
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
