"""
Testing hooks without sockets: a request as hooks see it, a way to build a
hook by name, and a way to run hooks as monedge would and look at what
happened.

    from monedge.testing.hooks import buildHook, hookRequest, runHooks

    hook = buildHook("headers", {"request": {"set": {"X-Team": "orders"}}})
    outcome = self.successResultOf(runHooks([hook], hookRequest()))
    self.assertEqual(outcome.upstreamHeaders.getRawHeaders(b"x-team"), [b"orders"])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from monedge.hooks import (
    DEFAULT_HOOK_TIMEOUT,
    HookChain,
    HookConfigError,
    HookContext,
    HookRequest,
    HookResponse,
    HookResponseHead,
    availableFactories,
)


def hookRequest(
    method: bytes = b"GET",
    path: bytes = b"/orders/42",
    query: bytes = b"",
    headers: Mapping[bytes, Sequence[bytes]] | None = None,
    clientAddress: str = "192.0.2.10",
    service: str = "service.api.orders",
    requestId: str = "0123456789abcdef0123456789abcdef",
) -> HookRequest:
    """
    A request as hooks see it; its upstream headers start as a copy of
    C{headers}.
    """
    incoming = Headers({k: list(v) for k, v in (headers or {}).items()})
    return HookRequest(
        method=method,
        path=path,
        query=query,
        headers=incoming,
        upstreamHeaders=incoming.copy(),
        clientAddress=clientAddress,
        service=service,
        requestId=requestId,
    )


def buildHook(
    name: str,
    options: Mapping[str, Any] | None = None,
    context: HookContext | None = None,
) -> object:
    """
    Build the hook plugin called C{name}, as monedge would from its
    configuration.

    @raise monedge.hooks.HookConfigError: for bad options.
    """
    factories = availableFactories()
    factory = factories.get(name)
    if factory is None:
        known = ", ".join(sorted(factories))
        raise HookConfigError(f"unknown hook {name!r} (known: {known})")
    return factory.build(dict(options or {}), context or HookContext(reactor=Clock()))


@dataclass
class HookOutcome:
    """
    What running hooks did.

    @ivar response: the answer a request hook gave the client, or L{None}
        if every request hook let the request pass.
    @ivar upstreamHeaders: the headers that would go upstream.
    @ivar responseHeaders: the response headers after the response hooks
        (L{None} if no response was given to run them on).
    @ivar error: the failure if a hook raised or timed out (monedge would
        answer 500 hook_failed).
    """

    response: HookResponse | None
    upstreamHeaders: Headers
    responseHeaders: Headers | None
    error: Failure | None


def runHooks(
    hooks: Sequence[object],
    request: HookRequest,
    response: HookResponseHead | None = None,
    clock: Clock | None = None,
    timeout: float = DEFAULT_HOOK_TIMEOUT,
) -> Deferred[HookOutcome]:
    """
    Run C{hooks} in order on C{request} as monedge would; if every request
    hook passes and C{response} is given, run the response hooks on it in
    reverse order.  The result fires at once for hooks that do not wait;
    for hooks that do, advance C{clock} (or fire what they wait on).
    """
    clock = clock or Clock()
    chain = HookChain(
        [(type(h).__name__, h) for h in hooks], clock, timeout, lambda *args: None
    )

    def passed(answer: HookResponse | None) -> Any:
        if answer is not None or response is None:
            return HookOutcome(answer, request.upstreamHeaders, None, None)
        return chain.runResponse(request, response).addCallback(
            lambda _: HookOutcome(None, request.upstreamHeaders, response.headers, None)
        )

    def failed(reason: Failure) -> HookOutcome:
        return HookOutcome(None, request.upstreamHeaders, None, reason)

    return chain.runRequest(request).addCallback(passed).addErrback(failed)
