"""
Hooks: code that runs before a request goes upstream and after its
response comes back, found as plugins and configured per proxy and per
service.

    global hooks (--hook, in order)  then  the service's hooks (policy order)
    request hooks run in that order; response hooks in the reverse order

A hook that raises, or does not answer within the hook timeout, fails the
request with 500 C{hook_failed}: hooks always fail closed.  A service whose
hook configuration is invalid answers 503 C{hook_config_invalid} until it is
fixed.  See docs/hooks.md.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.logger import Logger
from twisted.plugin import getPlugins
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from zope.interface import implementer

from monedge.interfaces import (
    IHookFactory,
    IHookRequest,
    IHookResponse,
    IRequestHook,
    IResponseHook,
)
from monedge.rules.policy import HookSpec
from monedge.rules.redact import redactText

#: Seconds a hook may take before the request fails with hook_failed.
DEFAULT_HOOK_TIMEOUT = 5.0

#: A failing hook's traceback is logged at most once in this many seconds.
TRACEBACK_INTERVAL = 60.0

#: The most built hooks kept; beyond, the cache starts afresh (hooks still
#: in use stay alive in their chains).
MAX_BUILT_HOOKS = 1024


class HookConfigError(ValueError):
    """
    Invalid hook configuration: an unknown name or bad options.
    """


class HookFailed(Exception):
    """
    A hook raised or timed out.

    @ivar hook: the hook's name.
    """

    def __init__(self, hook: str, reason: Failure) -> None:
        super().__init__(f"hook {hook} failed: {reason.getErrorMessage()}")
        self.hook = hook
        self.reason = reason


@dataclass(frozen=True)
class HookResponse:
    """
    A request hook's answer to the client, instead of the upstream's.

    With C{body} L{None} and a C{code}, the body is monedge's JSON error
    (C{status}, C{code}, C{message}, C{request_id}).
    """

    status: int
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes | None = None
    code: str | None = None
    message: str | None = None

    @classmethod
    def error(
        cls,
        status: int,
        code: str,
        message: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> HookResponse:
        """
        A JSON error answer, like monedge's own refusals.
        """
        return cls(status=status, headers=tuple(headers), code=code, message=message)


@implementer(IHookRequest)
@dataclass
class HookRequest:
    """
    The request as hooks see it (see L{IHookRequest}).
    """

    method: bytes
    path: bytes
    query: bytes
    headers: Headers
    upstreamHeaders: Headers
    clientAddress: str
    service: str
    requestId: str
    state: dict[str, Any] = field(default_factory=dict)
    answerHeaders: Headers = field(default_factory=Headers)


@implementer(IHookResponse)
@dataclass
class HookResponseHead:
    """
    An upstream response's status and headers, as response hooks see them.
    """

    status: int
    headers: Headers


@dataclass
class HookContext:
    """
    What hooks may use: the reactor, the service registry, an HTTP client
    for hooks that call out (treq's API over monedge's own agent, no cookie
    jar), the hook timeout and the metrics.
    """

    reactor: Any
    registry: Any = None
    http: Any = None
    timeout: float = DEFAULT_HOOK_TIMEOUT
    #: monedge's L{monedge.observe.metrics.Metrics}: a hook may register its own
    #: collectors on C{metrics.registry}.
    metrics: Any = None


def availableFactories() -> dict[str, IHookFactory]:
    """
    Every hook factory on the plugin path, by name: the built-in ones and
    any module dropped into a C{monedge/plugins/} directory on C{sys.path}.
    """
    import monedge.plugins

    found: dict[str, IHookFactory] = {}
    for factory in getPlugins(IHookFactory, monedge.plugins):
        found.setdefault(factory.name, factory)
    return found


def _invoke(call: Callable[[], object]) -> Deferred[Any]:
    """
    C{call()}'s result as a L{Deferred}, an exception as a failed one.
    """
    try:
        result = call()
    except BaseException:
        return fail()
    if isinstance(result, Deferred):
        return result
    if isinstance(result, Coroutine):
        return Deferred.fromCoroutine(result)
    return succeed(result)


@dataclass
class _Step:
    name: str
    hook: object


class HookChain:
    """
    The hooks one service runs, in order, with timeouts, metrics and the
    fail-closed rule.
    """

    _log = Logger()

    def __init__(
        self,
        steps: Sequence[tuple[str, object]],
        reactor: Any,
        timeout: float,
        observe: Callable[[str, str, float], None],
    ) -> None:
        self._request = [_Step(n, h) for n, h in steps if IRequestHook.providedBy(h)]
        self._response = [
            _Step(n, h) for n, h in reversed(steps) if IResponseHook.providedBy(h)
        ]
        self.names = [n for n, _ in steps]
        self._reactor = reactor
        self._timeout = timeout
        self._observe = observe
        self._lastTraceback: dict[str, float] = {}

    @property
    def hasResponseHooks(self) -> bool:
        return bool(self._response)

    def _checked(
        self, step: _Step, result: object, started: float, answers: bool
    ) -> object:
        """
        A hook's result, once it is known: checked, and its run counted.

        @raise TypeError: if a request hook returned anything but L{None}
            or a L{HookResponse}, or a response hook anything but L{None}.
        """
        if result is not None and not (answers and isinstance(result, HookResponse)):
            # A hook that returns anything else has a bug: fail closed
            # rather than guess whether it meant to refuse.
            what = "a request" if answers else "a response"
            raise TypeError(
                f"{what} hook returned {type(result).__name__}; expected None"
                + (" or a HookResponse" if answers else "")
            )
        decision = "respond" if isinstance(result, HookResponse) else "pass"
        self._observe(step.name, decision, self._reactor.seconds() - started)
        return result

    def _failed(self, step: _Step, reason: Failure, started: float) -> Failure:
        """
        A hook raised, failed or timed out: count it, log it (with its
        traceback at most once a minute per hook), and fail closed.
        """
        now = self._reactor.seconds()
        self._observe(step.name, "error", now - started)
        # One traceback per hook per minute: an identity provider that
        # is down must not write one per request.
        last = self._lastTraceback.get(step.name)
        if last is None or now - last >= TRACEBACK_INTERVAL:
            self._lastTraceback[step.name] = now
            self._log.failure(
                "hook {hook} failed; the request fails closed",
                failure=reason,
                hook=step.name,
            )
        else:
            self._log.warn(
                "hook {hook} failed ({error}); the request fails closed",
                hook=step.name,
                error=reason.getErrorMessage(),
            )
        return Failure(HookFailed(step.name, reason))

    def _run(
        self,
        steps: Sequence[_Step],
        call: Callable[[object], object],
        answers: bool,
    ) -> Deferred[Any]:
        """
        L{_runNow}'s result, always as a L{Deferred}.
        """
        result = self._runNow(steps, call, answers)
        if isinstance(result, Deferred):
            return result
        return succeed(result)

    def _runNow(
        self,
        steps: Sequence[_Step],
        call: Callable[[object], object],
        answers: bool,
    ) -> object:
        """
        Run C{call(hook)} for each of C{steps} in order, until a request
        hook answers.

        Hooks that return at once (most: the built-in ones with what they
        need in hand) are run in a plain loop, with no L{Deferred} or
        timer of their own: the result is the answer (L{None} or a
        L{HookResponse}) itself.  From the first hook that returns a
        L{Deferred} or a coroutine that has not finished, the rest are
        chained to it, it gets the timeout, and the result is a
        L{Deferred}; a hook that fails makes it a failed one.
        """
        for index, step in enumerate(steps):
            started = self._reactor.seconds()
            try:
                result = call(step.hook)
                if isinstance(result, Coroutine):
                    result = Deferred.fromCoroutine(result)
                if isinstance(result, Deferred):
                    return self._waitFor(step, result, started, answers).addCallback(
                        self._rest, steps[index + 1 :], call, answers
                    )
                result = self._checked(step, result, started, answers)
            except BaseException:
                return fail(self._failed(step, Failure(), started))
            if isinstance(result, HookResponse):
                return result
        return None

    def _waitFor(
        self, step: _Step, d: Deferred[Any], started: float, answers: bool
    ) -> Deferred[Any]:
        """
        A hook's L{Deferred}: bounded by the timeout unless it has fired,
        its result checked and counted, its failure failing closed.
        """
        if not d.called:
            d.addTimeout(self._timeout, self._reactor)
        d.addCallback(lambda result: self._checked(step, result, started, answers))
        d.addErrback(lambda reason: self._failed(step, reason, started))
        return d

    def _rest(
        self,
        result: object,
        steps: Sequence[_Step],
        call: Callable[[object], object],
        answers: bool,
    ) -> object:
        if isinstance(result, HookResponse):
            return result
        return self._runNow(steps, call, answers)

    def runRequest(self, request: IHookRequest) -> Deferred[HookResponse | None]:
        """
        Run the request hooks in order until one answers.
        """
        return self._run(
            self._request,
            lambda hook: hook.onRequest(request),  # type: ignore[attr-defined]
            True,
        )

    def runResponse(
        self, request: IHookRequest, response: IHookResponse
    ) -> Deferred[None]:
        """
        Run the response hooks, last configured first.
        """
        return self._run(
            self._response,
            lambda hook: hook.onResponse(request, response),  # type: ignore[attr-defined]
            False,
        )

    def runRequestNow(
        self, request: IHookRequest
    ) -> HookResponse | None | Deferred[HookResponse | None]:
        """
        L{runRequest}, its answer given as it is when every hook answered
        at once (no L{Deferred} to make and fire on every request), and as
        a L{Deferred} otherwise (a hook that waits, or fails).
        """
        return cast(
            "HookResponse | None | Deferred[HookResponse | None]",
            self._runNow(
                self._request,
                lambda hook: hook.onRequest(request),  # type: ignore[attr-defined]
                True,
            ),
        )

    def runResponseNow(
        self, request: IHookRequest, response: IHookResponse
    ) -> Deferred[None] | None:
        """
        L{runResponse}: L{None} when every hook returned at once, else a
        L{Deferred}.
        """
        return cast(
            "Deferred[None] | None",
            self._runNow(
                self._response,
                lambda hook: hook.onResponse(request, response),  # type: ignore[attr-defined]
                False,
            ),
        )


@dataclass
class HookSet:
    """
    Builds and caches hooks from their specs, and the chain for each
    service: the global hooks, then the service's own.

    @ivar globalSpecs: the hooks every service runs first.
    """

    context: HookContext
    globalSpecs: tuple[HookSpec, ...] = ()
    observe: Callable[[str, str, float], None] = lambda hook, decision, seconds: None
    factories: Mapping[str, IHookFactory] = field(default_factory=availableFactories)
    _built: dict[HookSpec, object] = field(default_factory=dict)

    def build(self, spec: HookSpec) -> object:
        """
        The hook for C{spec}, built once.

        @raise HookConfigError: for an unknown name or invalid options.
        """
        hook = self._built.get(spec)
        if hook is None:
            factory = self.factories.get(spec.name)
            if factory is None:
                known = ", ".join(sorted(self.factories)) or "none"
                raise HookConfigError(f"unknown hook {spec.name!r} (known: {known})")
            try:
                hook = factory.build(json.loads(spec.options), self.context)
            except HookConfigError as e:
                # The reason is logged and shown at startup: it may quote an
                # option, so never with a URL's user-info or query.
                raise HookConfigError(
                    f"hook {spec.name}: {redactText(str(e))}"
                ) from None
            if not (IRequestHook.providedBy(hook) or IResponseHook.providedBy(hook)):
                raise HookConfigError(
                    f"hook {spec.name}: its factory built neither a request"
                    " nor a response hook"
                )
            if len(self._built) >= MAX_BUILT_HOOKS:
                self._built.clear()
            self._built[spec] = hook
        return hook

    def close(self) -> Deferred[Any]:
        """
        At shutdown: call C{close()} on every built hook that has one
        (connection pools, timers), and wait for them.
        """
        closing = [
            _invoke(close)
            for hook in self._built.values()
            if callable(close := getattr(hook, "close", None))
        ]
        return DeferredList(closing, consumeErrors=True)

    def chain(self, specs: Sequence[HookSpec]) -> HookChain | None:
        """
        The chain for a service with hooks C{specs}, or L{None} if there is
        nothing to run.

        @raise HookConfigError: if any hook cannot be built.
        """
        allSpecs = [*self.globalSpecs, *specs]
        if not allSpecs:
            return None
        steps = [(spec.name, self.build(spec)) for spec in allSpecs]
        return HookChain(
            steps, self.context.reactor, self.context.timeout, self.observe
        )
