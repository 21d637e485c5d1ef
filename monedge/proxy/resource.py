"""
The Resource tree: a root whose children resolve lazily through the naming
convention, and a proxy leaf per service.

    RootResource.getChild  ->  convention + registry  ->  ServiceResource
                                                     or  ErrorResource (400/404/405)

Route objects are cached, bounded, and dropped as soon as the registry
reports a change to their service.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET

from monedge.hooks import HookChain, HookConfigError, HookRequest, HookResponse
from monedge.interfaces import IServiceRegistry
from monedge.observe.metrics import Metrics, ServiceMetrics
from monedge.proxy.exchange import (
    ClientRequest,
    ProxyContext,
    ProxyExchange,
    writeHookResponse,
)
from monedge.proxy.grpcweb import grpcWebCall
from monedge.record import RequestRecord
from monedge.registry import ServiceEntry
from monedge.rules.convention import HostTiers, isValidName, normaliseHost, serviceName
from monedge.rules.errors import (
    ErrorResource,
    ProxyError,
    isGrpcRequest,
    renderError,
)
from monedge.rules.grpc import (
    grpcServiceLabel,
    isCorsPreflight,
    isGrpcContentType,
    parseGrpcTimeout,
)
from monedge.rules.headers import connectionTokens, upstreamHeaders
from monedge.rules.paths import PathError, RoutedPath, normalise, splitAbsoluteForm
from monedge.twistedseam import HeaderTable
from monedge.upstream.balancer import eligible
from monedge.upstream.endpoints import UpstreamTLS
from monedge.upstream.upgrade import checkWebSocketRequest, wantsWebSocket

#: Methods that are never proxied: CONNECT would open a tunnel, TRACE
#: reflects headers (cookies, auth) back to scripts.
_REFUSED_METHODS = frozenset([b"CONNECT", b"TRACE"])

#: The fewest routes kept at once: the cache grows to hold every service
#: of a larger registry, so that a request is never for an evicted route.
ROUTE_CACHE_SIZE = 10_000

#: The most normalised Host values remembered at once.
HOST_CACHE_SIZE = 1024


def _resolvedClient(upstream: Headers, peer: bytes) -> str:
    """
    The client as monedge resolved it: the first X-Forwarded-For entry it
    sends upstream (the peer itself with no trusted hops).
    """
    forwarded = upstream.getRawHeaders(b"x-forwarded-for")
    first = forwarded[0].split(b",", 1)[0].strip() if forwarded else peer
    return first.decode("ascii", "replace")


class ServiceResource(Resource):
    """
    The leaf for one service: proxies every request to it.
    """

    isLeaf = True
    #: Not an error leaf (L{monedge.rules.errors.ErrorResource} has one): the
    #: request asks every decision for it, and a missing attribute costs an
    #: exception each time.
    error = None

    _log = Logger()

    def __init__(
        self, entry: ServiceEntry, context: ProxyContext, metrics: ServiceMetrics
    ) -> None:
        super().__init__()
        self.entry = entry
        self.policy = entry.policy
        self.metrics = metrics
        self._context = context
        self._candidates = context.balancer.states(eligible(entry.endpoints))
        #: The service's name in paths (C{foo} of C{service.api.foo}).
        self._label = entry.name.rsplit(".", 1)[1]
        self._prefix = b"/" + self._label.encode("ascii")
        policy = entry.policy
        self._tls = UpstreamTLS(
            policy.upstreamCA,
            policy.upstreamServerName,
            policy.upstreamClientCertificate,
        )
        self.hooks: HookChain | None = None
        self.hookError: str | None = None
        if context.hooks is not None:
            try:
                self.hooks = context.hooks.chain(entry.policy.hooks)
            except HookConfigError as e:
                # Never a silent pass: the service is refused until fixed.
                self.hookError = str(e)
                self._log.error(
                    "{service}: invalid hook configuration, answering 503: {error}",
                    service=entry.name,
                    error=self.hookError,
                )

    def render(self, request: ClientRequest) -> int | bytes:
        if self.hookError is not None:
            # The detail is in the log; the client gets the generic message.
            return renderError(
                request, ProxyError("hook_config_invalid"), request.requestId
            )
        record = request.record
        routed = record.routedPath
        assert routed is not None
        upgradeKey = None
        # Most requests have no Upgrade: wantsWebSocket would say no at
        # once, but not before a call (this runs per request).
        if b"Upgrade" in request.headerTable and wantsWebSocket(request.requestHeaders):
            try:
                if request.hasBody:
                    raise ProxyError("bad_upgrade", "a WebSocket handshake has no body")
                upgradeKey = checkWebSocketRequest(
                    request.method, request.clientproto, request.requestHeaders
                )
            except ProxyError as e:
                return renderError(request, e, request.requestId)
        deadline: float | None = None
        grpc = isGrpcRequest(request)
        if grpc:
            if b"Grpc-Timeout" in request.headerTable:
                # The call's deadline, counted from its arrival.
                deadline = parseGrpcTimeout(request.headerTable[b"Grpc-Timeout"][0])
                if deadline is None:
                    return renderError(
                        request, ProxyError("grpc_timeout_invalid"), request.requestId
                    )
            # A call may stream for long: the stream idle timeout governs
            # its body, not the front end's body timeout.
            request.stopBodyTimeout()
        policy = self.policy
        if policy.stripPrefix and not grpc and routed.name == self._label:
            # (strip-prefix never applies to a gRPC call: its path is its
            # method's name; nor to a preflight routed by the gRPC rule,
            # whose first segment is not the service's name.)
            target = routed.rest + routed.query
            prefix: bytes | None = self._prefix
        else:
            target = routed.path + routed.query
            prefix = None
        headers = upstreamHeaders(
            request.requestHeaders,
            host=record.host,
            peer=request.peerAddress,
            proto=b"https" if request.isSecure() else b"http",
            port=request.listenerPort,
            prefix=prefix,
            requestId=request.requestId,
            rules=request.site.forwarding,
        )
        if (
            request.sendsTrailers
            and b"TE" in request.headerTable
            and b"trailers" in connectionTokens(request.headerTable[b"TE"])
        ):
            # The client takes trailers, so monedge passes them on: the
            # upstream may send them (TE is hop-by-hop: this is monedge's).
            headers.setRawHeaders(b"te", [b"trailers"])
        web = grpcWebCall(request.requestHeaders, policy.protocol) if grpc else None
        if web is not None:
            # A gRPC-Web call to a gRPC server: it goes as gRPC.
            web.requestHeaders(headers)
        if upgradeKey is not None:
            # The one upgrade monedge carries, on a connection of its own.
            headers.setRawHeaders(b"connection", [b"Upgrade"])
            headers.setRawHeaders(b"upgrade", [b"websocket"])
        exchange = ProxyExchange(
            request,
            self._context,
            self._candidates,
            policy,
            self.metrics,
            headers,
            target,
        )
        exchange.upgradeKey = upgradeKey
        exchange.grpc = grpc
        exchange.deadline = deadline
        exchange.grpcWeb = web
        exchange.tls = self._tls
        chain = self.hooks
        if chain is None:
            exchange.start()
            return NOT_DONE_YET
        hookRequest = HookRequest(
            method=request.method,
            path=routed.path,
            query=routed.query,
            headers=request.requestHeaders,
            upstreamHeaders=headers,
            clientAddress=_resolvedClient(headers, request.peerAddress),
            service=self.entry.name,
            requestId=request.requestId.decode("ascii"),
        )
        exchange.answerHeaders = hookRequest.answerHeaders
        if chain.hasResponseHooks:
            exchange.responseHooks = lambda head: chain.runResponseNow(
                hookRequest, head
            )
        answered = chain.runRequestNow(hookRequest)
        if isinstance(answered, Deferred):
            answered.addCallbacks(
                lambda answer: self._hooksDone(request, exchange, answer),
                lambda failure: exchange.hookFailed(failure),
            )
        else:
            # Every hook answered at once: no Deferred to wait on.
            self._hooksDone(request, exchange, answered)
        return NOT_DONE_YET

    def _hooksDone(
        self,
        request: ClientRequest,
        exchange: ProxyExchange,
        answer: HookResponse | None,
    ) -> None:
        if request.disconnected:
            return
        if answer is None:
            exchange.start()
        else:
            writeHookResponse(request, answer, exchange.answerHeaders)


class RootResource(Resource):
    """
    The root of the proxy's tree.  It has no static children: every child
    is resolved in L{getChild} from the request's Host and first path
    segment.
    """

    def __init__(
        self,
        registry: IServiceRegistry,
        context: ProxyContext,
        metrics: Metrics,
        hostTiers: HostTiers | None = None,
        cacheSize: int = ROUTE_CACHE_SIZE,
        grpcPrefixes: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        self._registry = registry
        self._context = context
        self._metrics = metrics
        self.hostTiers = hostTiers or HostTiers({})
        #: C{--grpc-package-prefix}: reverse-DNS prefixes removed from a
        #: gRPC call's package before its first label names the service.
        self.grpcPrefixes = grpcPrefixes
        self._cache: OrderedDict[str, ServiceResource] = OrderedDict()
        self._cacheSize = self._cacheLimit = cacheSize
        self._hosts: dict[bytes, str | None] = {}
        self._retainCall: IDelayedCall | None = None
        #: The walk forgetting departed endpoints, while it runs.
        self._retaining: Iterator[None] | None = None
        self._retainAgain = False
        self._unsubscribe = registry.subscribe(self._registryChanged)

    def _registryChanged(self, names: frozenset[str]) -> None:
        for name in names:
            self._cache.pop(name, None)
        # Forgetting departed endpoints walks the whole registry: do it at
        # most once a second, however fast a watch delivers changes.
        if self._retainCall is None:
            self._retainCall = self._context.clock.callLater(1.0, self._retain)
        elif self._retaining is not None:
            # Changes during a walk are taken in by another walk after it.
            self._retainAgain = True

    def _retain(self) -> None:
        services = self._registry.services()
        # The cache holds every service the registry has (a route evicted
        # by the traffic of others would be rebuilt on its next request).
        self._cacheLimit = max(self._cacheSize, len(services))
        # The walk over 10,000 services' endpoints takes some 25 ms: it is
        # done a thousand at a time, a reactor turn each, between requests.
        self._retaining = self._context.balancer.retainSteps(
            entry.endpoints for entry in services.values()
        )
        self._retainAgain = False
        self._retainStep()

    def _retainStep(self) -> None:
        clock = self._context.clock
        steps = self._retaining
        assert steps is not None
        for _ in steps:
            self._retainCall = clock.callLater(0, self._retainStep)
            return
        self._retaining = None
        self._retainCall = None
        if self._retainAgain:
            self._retainCall = clock.callLater(1.0, self._retain)

    def _hostname(self, host: bytes) -> str | None:
        """
        L{normaliseHost}, remembered: a proxy sees few distinct Hosts.  The
        memory is bounded, so many distinct Hosts only cost recomputation.
        """
        cache = self._hosts
        try:
            return cache[host]
        except KeyError:
            if len(cache) >= HOST_CACHE_SIZE:
                cache.clear()
            hostname = cache[host] = normaliseHost(host)
            return hostname

    def route(self, service: str) -> ServiceResource | None:
        """
        The leaf for C{service}, from the cache or built from the registry;
        L{None} if the registry has no such exposed service.
        """
        cache = self._cache
        leaf = cache.get(service)
        if leaf is not None:
            cache.move_to_end(service)
            return leaf
        entry = self._registry.lookup(service)
        if entry is None or not entry.policy.expose:
            return None
        leaf = ServiceResource(entry, self._context, self._metrics.forService(service))
        cache[service] = leaf
        if len(cache) > self._cacheLimit:
            cache.popitem(last=False)
        return leaf

    def decide(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: HeaderTable,
        record: RequestRecord,
    ) -> IResource:
        """
        Work out which leaf answers a request, from its method, raw target
        and header table (L{rawHeaderTable}), and record the decision: the
        host and routed path, the leaf and its service.
        """
        service: str | None = None
        try:
            leaf, service = self._decide(method, target, version, headers, record)
        except ProxyError as e:
            leaf = ErrorResource(e)
        except PathError as e:
            leaf = ErrorResource(ProxyError(e.code, e.message))
        record.decided(leaf, service)
        return leaf

    def _decide(
        self,
        method: bytes,
        target: bytes,
        version: bytes,
        headers: HeaderTable,
        record: RequestRecord,
    ) -> tuple[IResource, str]:
        if method in _REFUSED_METHODS:
            raise ProxyError("method_not_allowed")
        # Twisted's Headers keep canonical names: read the table directly
        # (getRawHeaders would encode the name first; this runs per request).
        hosts = headers.get(b"Host")
        if hosts is not None and len(hosts) != 1:
            raise ProxyError("missing_host")
        host = hosts[0] if hosts else None
        authority, target = splitAbsoluteForm(target)
        if authority is not None:
            if host is None:
                host = authority
            elif normaliseHost(authority) != normaliseHost(host):
                raise ProxyError("host_mismatch")
        if host is None and version == b"HTTP/1.1":
            raise ProxyError("missing_host")
        routed: RoutedPath = normalise(target)
        record.routed(host, routed)
        hostname = self._hostname(host) if host is not None else None
        if host is not None and hostname is None:
            raise ProxyError("bad_request", "the Host header is malformed")
        tier = self.hostTiers.tierFor(hostname)
        if tier is None:
            raise ProxyError("unknown_host")
        name = routed.name
        if not isValidName(name):
            # Not an HTTP route: a gRPC call's, if it is one (a dot or a
            # capital in the first segment; the content-type read only then).
            types = headers.get(b"Content-Type")
            if not (types and isGrpcContentType(types[0])) and not isCorsPreflight(
                method,
                headers.get(b"Origin"),
                headers.get(b"Access-Control-Request-Method"),
            ):
                raise ProxyError("route_not_found")
            label = grpcServiceLabel(routed.path, self.grpcPrefixes)
            if label is None:
                raise ProxyError("route_not_found")
            name = label
        service = serviceName(tier, name)
        leaf = self.route(service)
        if leaf is None:
            raise ProxyError("route_not_found")
        return leaf, service

    def getChild(self, path: bytes, request: ClientRequest) -> IResource:
        decision = request.record.decision
        if decision is None:
            decision = self.decide(
                request.method,
                request.uri,
                request.clientproto,
                request.headerTable,
                request.record,
            )
        return decision
