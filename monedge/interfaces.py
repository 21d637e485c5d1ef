"""
Every interface monedge defines.  Implementations are found by these names;
the Resource tree, the admin site and the hooks depend only on what is
declared here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IBodyProducer, IResponse

    from monedge.registry import ServiceEntry


class IServiceRegistry(Interface):
    """
    A source of services, keyed by registry name (C{service.<tier>.<name>}).

    All methods are called on the reactor thread and must not block: an
    implementation that talks to something slow keeps its own table and
    answers from it.
    """

    reloadsSucceeded: int = Attribute(
        "How many times the registry's source was (re)read successfully."
    )
    reloadsFailed: int = Attribute(
        "How many times re-reading the source failed, keeping the old table."
    )
    lastSync: float | None = Attribute(
        "The clock time the registry last heard from its source successfully"
        " (a good reload, a list, a watch event), or None if never."
    )
    invalidConfig: int = Attribute(
        "How many invalid per-service settings were seen and replaced by"
        " defaults (each counted once)."
    )

    def lookup(name: str) -> ServiceEntry | None:
        """
        The service called C{name}, or L{None} if there is none.
        """

    def services() -> Mapping[str, ServiceEntry]:
        """
        A snapshot of every service, by name.
        """

    def subscribe(listener: Callable[[frozenset[str]], None]) -> Callable[[], None]:
        """
        Call C{listener} with the names of the services that changed (added,
        removed or modified), after every change.

        @return: a callable that unsubscribes C{listener}.
        """

    def isReady() -> bool:
        """
        Has the registry completed its first full sync?  Until then the
        proxy reports itself not ready.
        """

    def describe() -> Mapping[str, Any]:
        """
        The registry's own state (its kind, its source, how its last syncs
        or reloads went), as JSON-able data for the admin C{/routes} page.
        """


class IUpstreamClient(Interface):
    """
    Sends requests to upstream endpoints.  The proxy leaf depends only on
    this; the real one is L{monedge.upstream.UpstreamClient}.
    """

    def request(
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        connectTimeout: float,
    ) -> Deferred[IResponse]:
        """
        Send one request to C{url} (C{scheme://host:port/path?query}).

        @return: a L{Deferred} that fires with the response once its
            headers arrive, or fails with the connection error.  Cancelling
            it aborts the request and its connection.
        """

    def close() -> Deferred[None]:
        """
        Close every idle pooled connection.
        """
