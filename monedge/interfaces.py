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
    from monedge.registry.kubeapi import Compactor, ObjectList, WatchEvent
    from monedge.upstream.endpoints import UpstreamTLS


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


class IKubernetesAPI(Interface):
    """
    What the Kubernetes registry needs of the API server: a list of one
    kind of object with the C{resourceVersion} it was taken at, and a watch
    of that kind from a C{resourceVersion}.  The registry's watch logic
    depends only on this; the real one is
    L{monedge.registry.kubeclient.KubernetesClientAPI} (the official
    C{kubernetes} client, in threads), and
    L{monedge.testing.kubernetes.MemoryKubernetes} is the in-memory fake.

    C{kind} is one of L{monedge.registry.kubeapi.KINDS}; C{namespace} is a
    namespace, or L{None} for every namespace.  Every method is called on
    the reactor thread and returns at once; results, failures and watch
    events arrive on the reactor thread, in the order the API sent them.

    Failures: L{monedge.registry.kubeapi.ResourceExpired} (410 Gone: list
    again), L{monedge.registry.kubeapi.KubernetesAPIError} for any other
    refusal by the API server, and any other exception when the API could
    not be reached or the connection broke.
    """

    def listObjects(
        kind: str,
        namespace: str | None,
        labelSelector: str | None = None,
        compact: Compactor | None = None,
    ) -> Deferred[ObjectList]:
        """
        Every object of C{kind} (in C{namespace}, with labels matching
        C{labelSelector} if given), as of one C{resourceVersion}; paging,
        if any, is the implementation's own.  With C{compact}, each object
        is what C{compact} makes of it, run where the object is decoded
        (never on the reactor thread for a real API), and those it drops
        are left out.

        @return: a L{Deferred} that fires with a
            L{monedge.registry.kubeapi.ObjectList}, or fails as the
            interface says.  Cancelling it abandons the list.
        """

    def watchObjects(
        kind: str,
        namespace: str | None,
        resourceVersion: str,
        receive: Callable[[WatchEvent], None],
        labelSelector: str | None = None,
        compact: Compactor | None = None,
    ) -> Deferred[None]:
        """
        Watch C{kind} (in C{namespace}, with labels matching
        C{labelSelector} if given: an object that stops matching is
        C{DELETED}) from C{resourceVersion}: call C{receive} with each
        L{monedge.registry.kubeapi.WatchEvent} after that version, in
        order: C{ADDED}, C{MODIFIED}, C{DELETED} and C{BOOKMARK}.
        C{receive} may be called before this returns.  With C{compact},
        each event's object is compacted as
        L{monedge.registry.kubeapi.compactEvent} says (where it is
        decoded, as for a list).

        @return: a L{Deferred} that fires with L{None} when the server ends
            the watch (its timeout: watch again from the last version
            seen), or fails as the interface says: with
            L{monedge.registry.kubeapi.ResourceExpired} if
            C{resourceVersion} is older than the server's history (at once
            or mid-watch).  C{receive} is not called once it has fired (a
            watch from the last version C{receive} was given hears again
            what it was not given).  Cancelling it stops the watch:
            C{receive} is not called again.
        """


class IUpstreamClient(Interface):
    """
    Sends requests to upstream endpoints.  The proxy leaf depends only on
    this; the real one is L{monedge.upstream.client.FastUpstreamClient}.
    """

    def request(
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        connectTimeout: float,
        tls: UpstreamTLS | None = None,
    ) -> Deferred[IResponse]:
        """
        Send one request to C{url} (C{scheme://host:port/path?query}); for
        C{https}, with the TLS settings C{tls} (None: verify the host
        against the system's trust store).

        @return: a L{Deferred} that fires with the response once its
            headers arrive, or fails with the connection error.  Cancelling
            it aborts the request and its connection.
        """

    def close() -> Deferred[None]:
        """
        Close every idle pooled connection.
        """


class IUpstreamUpgrader(Interface):
    """
    Sends requests that ask to switch protocols (WebSocket), each on a
    connection of its own.
    """

    def upgrade(
        url: bytes,
        headers: Headers,
        connectTimeout: float,
        tls: UpstreamTLS | None = None,
    ) -> Deferred[IResponse]:
        """
        Send a C{GET} to C{url} with C{headers} (which carry the C{Upgrade}
        request) on a new connection.

        @return: a L{Deferred} that fires with the response once its
            headers arrive. A 101 response also has C{monedgeHandshake},
            all its headers (C{Upgrade} and C{Connection} included), and
            C{monedgeTakeOver(side)}, which hands the connection to a
            L{monedge.upstream.tunnel.TunnelSide} and returns the connection's
            transport and any bytes that followed the 101. Any other response is an ordinary one, and
            its connection is never reused.
        """


class IHookRequest(Interface):
    """
    What a hook sees of a request: a small, stable view, not twisted.web's
    request object.  Request hooks may change L{upstreamHeaders}; everything
    else is read-only.
    """

    method: bytes = Attribute("The request method, e.g. C{b'GET'}.")
    path: bytes = Attribute(
        "The canonical path as routed, first segment included (C{/orders/42})."
    )
    query: bytes = Attribute("The query string with its C{?}, or C{b''}.")
    headers: Headers = Attribute("The request headers as the client sent them.")
    upstreamHeaders: Headers = Attribute(
        "The headers that will be sent upstream (hop-by-hop headers already"
        " removed, forwarding headers already set); request hooks may change"
        " them."
    )
    clientAddress: str = Attribute(
        "The client's address: the TCP peer, or with --trusted-hops N the"
        " address the trusted hops reported (the first X-Forwarded-For entry"
        " monedge sends upstream)."
    )
    service: str = Attribute("The registry name of the matched service.")
    requestId: str = Attribute("The request's id, as in X-Request-Id.")
    state: dict[str, Any] = Attribute(
        "A per-request scratch mapping, empty at first, for a hook to carry"
        " its own state from onRequest to onResponse.  Key it by something"
        " unique to the hook object."
    )
    answerHeaders: Headers = Attribute(
        "Headers added to any answer given instead of the upstream's: a"
        " later hook's response, or monedge's own refusal (no endpoint, a"
        " timeout, a limit), on which no response hook runs.  Empty at"
        " first; request hooks may add to it.  The upstream's responses are"
        " for response hooks to change."
    )


class IHookResponse(Interface):
    """
    The head of an upstream response, as response hooks see it.
    """

    status: int = Attribute("The upstream's status code.")
    headers: Headers = Attribute(
        "The response headers that will be sent to the client (hop-by-hop"
        " headers already removed); response hooks may change them."
    )


class IRequestHook(Interface):
    """
    Runs before a request is sent upstream.
    """

    def onRequest(request: IHookRequest) -> object:
        """
        Let the request pass (return L{None}, possibly after changing
        C{request.upstreamHeaders}), or answer the client instead (return a
        L{monedge.hooks.HookResponse}).  May return a L{Deferred} of either.
        """


class IResponseHook(Interface):
    """
    Runs when the upstream's response headers arrive, before they are sent
    to the client.
    """

    def onResponse(request: IHookRequest, response: IHookResponse) -> object:
        """
        Change C{response.headers} if need be.  May return a L{Deferred}
        (of L{None}).
        """


class IHookFactory(Interface):
    """
    A named maker of hooks, found with
    C{twisted.plugin.getPlugins(IHookFactory, monedge.plugins)}.  Plugin
    objects provide L{twisted.plugin.IPlugin} too.
    """

    name: str = Attribute("The name hooks are configured by (C{auth}).")
    description: str = Attribute("One line saying what the hook does.")

    def build(options: Mapping[str, Any], context: Any) -> object:
        """
        Make a hook from its configuration.

        @param options: the hook's options, as configured (parsed YAML/JSON).
        @param context: a L{monedge.hooks.HookContext}: the reactor, the
            service registry and an HTTP client, for hooks that need them.
        @return: an object providing L{IRequestHook}, L{IResponseHook} or
            both.
        @raise monedge.hooks.HookConfigError: for invalid options, with a
            one-line reason.
        """
