"""
The composition root: the one place that builds the running proxy from a
L{Configuration} and a reactor.

L{buildProxy} wires the request path (registry, metrics, hooks, upstream
client, balancer, resource tree, site); any part may be passed in instead
of built, which is how the tests, the fuzz target and the benchmarks run
the same wiring on fakes.  L{makeProxyService} adds what a process runs
around it (listeners, the admin site, reload on SIGHUP, certificate
polling, a worker's adopted sockets); L{makeService} is that or, with
C{--workers N}, L{makeGroup}.

A value that parses but cannot be used (a registry file that does not
validate, a hook whose options are bad, a TLS directory that does not load,
an access log that cannot be opened) is found here, while building: a
L{usage.UsageError} with one line, which L{monedge.runtime.lifecycle} prints as
the process's last words.
"""

from __future__ import annotations

import enum
import gc
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, Literal

from twisted.application.service import IService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from monedge.edge import http1
from monedge.edge.server import ListenerFactory, ProxySite
from monedge.edge.tls import CertificateFileError, CertificateStore
from monedge.hooks import HookConfigError, HookContext, HookSet
from monedge.interfaces import IServiceRegistry, IUpstreamClient, IUpstreamUpgrader
from monedge.observe.accesslog import AccessLog, AccessLogFileError, openAccessLog
from monedge.observe.lag import ReactorLag
from monedge.observe.metrics import Metrics
from monedge.proxy.exchange import ProxyContext
from monedge.proxy.resource import RootResource
from monedge.registry.kubeapi import KINDS
from monedge.registry.kubeclient import KubernetesClientAPI, apiClientFromConfig
from monedge.registry.kubernetes import KubernetesRegistry
from monedge.registry.static import RegistryFileError, StaticRegistry
from monedge.runtime.admin import adminSite, groupAdminSite
from monedge.runtime.config import Configuration
from monedge.runtime.lifecycle import Listener, ProxyService, describeError
from monedge.runtime.workers import (
    AdoptedEndpoint,
    NoConnections,
    OrphanWatch,
    WorkerAdminClient,
    WorkerGroup,
    twistdCommand,
)
from monedge.upstream.balancer import Balancer
from monedge.upstream.client import FastUpstreamClient
from monedge.upstream.dispatch import ProtocolDispatch
from monedge.upstream.h2client import H2UpstreamClient
from monedge.upstream.streaming import BufferBudget
from monedge.upstream.tunnel import TunnelSet

_log = Logger()


class Build(enum.Enum):
    """
    The default of a L{buildProxy} part that may also be passed as L{None}:
    build it as the configuration says.
    """

    BUILD = "build"


#: Build the part (see L{Build}).
BUILD: Literal[Build.BUILD] = Build.BUILD


def buildRegistry(config: Configuration, reactor: Any) -> IServiceRegistry:
    """
    The service registry C{--registry} names (not started), timed on
    C{reactor}.

    @raise usage.UsageError: if it cannot be used: a static file that does
        not validate, a Kubernetes configuration that does not load.
    """
    spec = config.registry
    kind, sep, argument = spec.partition(":")
    if kind == "static" and sep and argument:
        try:
            return StaticRegistry(argument, clock=reactor)
        except RegistryFileError as e:
            raise usage.UsageError(f"--registry: {e}") from None
    if spec == "kubernetes":
        kubeconfig = config.kubeconfig
        source = f"--kubeconfig {kubeconfig}" if kubeconfig else "--registry kubernetes"
        try:
            apiClient = apiClientFromConfig(kubeconfig)
        except ValueError as e:
            raise usage.UsageError(f"{source}: {e}") from None
        # A thread for each list or watch that may run at once: each kind,
        # in each namespace watched.
        api = KubernetesClientAPI(
            apiClient,
            reactor=reactor,
            maxThreads=len(KINDS) * max(1, len(config.namespaces)),
        )
        return KubernetesRegistry(
            api,
            clock=reactor,
            tiers=config.hostTiers.tiers(),
            namespaces=list(config.namespaces),
            initialSyncTimeout=config.initialSyncTimeout,
            selector=config.selector,
            # Relists are diffed in the API's threads, and what a sync
            # built is frozen out of the collector's generations.
            offReactor=api.run,
            freeze=gc.freeze if config.freezeAfterSync else None,
        )
    raise usage.UsageError(
        f"--registry: unknown registry {spec!r} (expected static:PATH or kubernetes)"
    )


def hookHTTPClient(reactor: Any) -> Any:
    """
    The HTTP client hooks call out with (JWKS, external auth): treq's API on
    a persistent pool, keeping no cookies.
    """
    from http.cookiejar import CookieJar, DefaultCookiePolicy

    import treq
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.cachedConnectionTimeout = 4
    jar = CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))
    return treq.client.HTTPClient(Agent(reactor, pool=pool), cookiejar=jar)  # type: ignore[arg-type]


def checkHooks(hooks: HookSet, registry: IServiceRegistry) -> None:
    """
    Build the global hooks and every registered service's hooks now, so
    that an unknown name or bad options stop monedge at startup.

    @raise usage.UsageError: naming the hook and what is wrong.
    """
    try:
        hooks.chain(())
    except HookConfigError as e:
        raise usage.UsageError(f"--hook: {e}") from None
    for name, entry in sorted(registry.services().items()):
        try:
            hooks.chain(entry.policy.hooks)
        except HookConfigError as e:
            raise usage.UsageError(f"{name}: {e}") from None


def buildHooks(
    config: Configuration, reactor: Any, registry: IServiceRegistry, metrics: Metrics
) -> HookSet:
    """
    The hooks: the global ones and each service's, with an HTTP client to
    call out with, all built once here so that a bad one stops startup.

    @raise usage.UsageError: naming the hook and what is wrong.
    """
    hooks = HookSet(
        HookContext(
            reactor=reactor,
            registry=registry,
            http=hookHTTPClient(reactor),
            timeout=config.hookTimeout,
            metrics=metrics,
        ),
        globalSpecs=config.hookSpecs,
        observe=metrics.observeHook,
    )
    checkHooks(hooks, registry)
    return hooks


def certificateStore(config: Configuration, reactor: Any) -> CertificateStore | None:
    """
    The certificates C{--tls-dir} holds, loaded, or L{None} without TLS.

    @raise usage.UsageError: if they do not load.
    """
    if config.tlsDir is None:
        return None
    try:
        return CertificateStore(
            config.tlsDir,
            reactor,
            protocols=(b"h2", b"http/1.1"),
        )
    except CertificateFileError as e:
        raise usage.UsageError(f"--tls-dir: {e}") from None


def openAccessLogStream(config: Configuration) -> IO[str] | None:
    """
    The stream C{--access-log} names, opened (stdout for C{-}, L{None} for
    C{none}).

    @raise usage.UsageError: if the file cannot be opened.
    """
    try:
        return openAccessLog(config.accessLog)
    except AccessLogFileError as e:
        raise usage.UsageError(f"--access-log {e}") from None


@dataclass
class Proxy:
    """
    One proxy's request path, as L{buildProxy} built it.
    """

    config: Configuration
    reactor: Any
    #: The proxy's site: what each proxy listener's factory serves.
    site: ProxySite
    root: RootResource
    context: ProxyContext
    registry: IServiceRegistry
    #: Sends every request upstream (and, as the upgrader, WebSocket
    #: handshakes).
    client: IUpstreamClient
    metrics: Metrics
    hooks: HookSet | None
    balancer: Balancer
    tunnels: TunnelSet
    accessLog: AccessLog
    #: The C{--tls-dir} certificates, or L{None} without TLS.
    store: CertificateStore | None


def buildProxy(
    config: Configuration,
    reactor: Any,
    *,
    registry: IServiceRegistry | None = None,
    client: IUpstreamClient | None = None,
    metrics: Metrics | None = None,
    accessLog: AccessLog | None = None,
    balancer: Balancer | None = None,
    hooks: HookSet | None | Build = BUILD,
    upgrader: IUpstreamUpgrader | None | Build = BUILD,
    siteFactory: Callable[..., ProxySite] = ProxySite,
) -> Proxy:
    """
    Build the proxy's request path from C{config} on C{reactor}.  Each part
    passed in is used instead of the one C{config} describes:

    @param registry: the service registry (default: C{--registry}'s).
    @param client: the upstream client (default: a L{FastUpstreamClient}
        with the upstream options).
    @param metrics: the metrics (default: new ones, which export the
        registry's state; metrics passed in are the caller's to set up).
    @param accessLog: the access log (default: C{--access-log}'s, written
        once per reactor iteration).
    @param balancer: the load balancer (default: one on C{reactor}).
    @param hooks: the hooks, L{None} for none (default: the global hooks and
        each service's, checked now).
    @param upgrader: what sends WebSocket handshakes, L{None} to refuse them
        (default: the upstream client).
    @param siteFactory: the site class, called with L{ProxySite}'s keyword
        arguments.

    @raise usage.UsageError: with one line, for a value that cannot be used.
    """
    store = certificateStore(config, reactor)
    if accessLog is None:
        accessLog = AccessLog(openAccessLogStream(config), reactor)
    if registry is None:
        registry = buildRegistry(config, reactor)
    if metrics is None:
        metrics = Metrics()
        metrics.watchRegistry(registry, reactor.seconds)
    if isinstance(hooks, Build):
        hooks = buildHooks(config, reactor, registry, metrics)
    if client is None:
        # One client sends every request upstream, WebSocket handshakes
        # included (it can hand an upgraded connection to a tunnel).
        # HTTP/1.1, or HTTP/2 for services whose policy says h2c or h2.
        client = ProtocolDispatch(
            FastUpstreamClient(
                reactor,
                maxPerHost=config.upstreamPoolSize,
                poolIdle=config.upstreamIdleTimeout,
                maxHeadersSize=config.maxUpstreamHeadersSize,
                maxHeaderCount=config.maxUpstreamHeaderCount,
            ),
            H2UpstreamClient(
                reactor,
                poolIdle=config.upstreamIdleTimeout,
                pingInterval=config.upstreamPingInterval,
                pingTimeout=config.upstreamPingTimeout,
            ),
        )
    if isinstance(upgrader, Build):
        upgrader = client if IUpstreamUpgrader.providedBy(client) else None
    if balancer is None:
        balancer = Balancer(reactor)
    tunnels = TunnelSet()
    metrics.tunnelsOpen.set_function(lambda: len(tunnels.open))
    context = ProxyContext(
        client,
        balancer,
        reactor,
        hooks,
        upgrader,
        tunnels,
        BufferBudget(config.limits.requestBufferBudget),
    )
    root = RootResource(
        registry,
        context,
        metrics,
        config.hostTiers,
        grpcPrefixes=config.grpcPackagePrefixes,
    )
    site = siteFactory(
        resource=root,
        reactor=reactor,
        metrics=metrics,
        accessLog=accessLog,
        forwarding=config.forwarding,
        limits=config.limits,
    )
    if getattr(site, "channelFactory", None) is None:
        # HTTP/1.1 is monedge's own front end (monedge.edge.http1), unless
        # the site class brings a channel of its own (the fuzz target's).
        site.channelFactory = http1.HTTP1Channel
    return Proxy(
        config=config,
        reactor=reactor,
        site=site,
        root=root,
        context=context,
        registry=registry,
        client=client,
        metrics=metrics,
        hooks=hooks,
        balancer=balancer,
        tunnels=tunnels,
        accessLog=accessLog,
        store=store,
    )


class ReloadOnHangup(Service):
    """
    Calls C{reload} on the reactor thread when SIGHUP arrives, while running.
    """

    def __init__(self, reload: Callable[[], object], reactor: Any) -> None:
        self._reload = reload
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(
            signal.SIGHUP, lambda *_: self._reactor.callFromThread(self._reload)
        )

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None


class CertificatePolling(Service):
    """
    Polls the C{--tls-dir} while running.
    """

    def __init__(self, store: CertificateStore) -> None:
        self._store = store

    def startService(self) -> None:
        super().startService()
        self._store.start()

    def stopService(self) -> None:
        super().stopService()
        self._store.stop()


def raiseFileLimit() -> tuple[int, int]:
    """
    Raise the soft limit on open files to the hard limit (as nginx's
    worker_rlimit_nofile would): every client and upstream connection is a
    file, and a container's default soft limit (often 1024) caps the
    connections far below what memory allows.

    @return: the soft limit before and after.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, hard
    return soft, soft


def makeService(config: Configuration, reactor: Any) -> IService:
    """
    Build what C{config} runs on C{reactor}: one proxy process, or with
    C{--workers N} a supervisor of N of them.

    @raise usage.UsageError: with one line, for a value that cannot be used.
    """
    if config.trustedHops and not config.trustedProxies:
        _log.warn(
            "--trusted-hops {hops} without --trusted-proxies: any peer may set"
            " its own X-Forwarded-For, and with it its client address",
            hops=config.trustedHops,
        )
    if config.workers > 1:
        return makeGroup(config, reactor)
    return makeProxyService(config, reactor)


def makeProxyService(
    config: Configuration, reactor: Any, proxy: Proxy | None = None
) -> ProxyService:
    """
    One proxy process: the proxy (L{buildProxy}'s, unless given), its
    listeners (bound here, or in a worker adopted from its supervisor), the
    admin site, reload on SIGHUP and certificate polling.
    """
    raiseFileLimit()
    if proxy is None:
        proxy = buildProxy(config, reactor)
    registry, store, site = proxy.registry, proxy.store, proxy.site
    top = ProxyService(
        site,
        registry,
        proxy.client,
        reactor,
        drainDelay=config.drainDelay,
        drainTimeout=config.drainTimeout,
        hooks=proxy.hooks,
        tunnels=proxy.tunnels,
    )
    if IService.providedBy(registry):
        registry.setServiceParent(top)
    ReactorLag(reactor, proxy.metrics.reactorLag.observe).setServiceParent(top)
    reloads = [r for r in [getattr(registry, "reload", None)] if r is not None]
    if store is not None:
        CertificatePolling(store).setServiceParent(top)
        reloads.append(store.reload)
    if reloads:
        ReloadOnHangup(lambda: [r() for r in reloads], reactor).setServiceParent(top)
    # The plain listeners serve the site; the TLS one, last, wraps it.
    # Each listener counts its own connections against --max-connections.
    limit = config.limits.maxConnections
    configured = config.proxyListeners()
    factories: list[Any] = [
        ListenerFactory(site, limit, description) for _, description in configured
    ]
    if store is not None:
        factories[-1] = TLSMemoryBIOFactory(
            store.contextFactory(), False, factories[-1]
        )
    if config.workerId is not None:
        assert config.workerParent is not None and config.workerAdmin is not None
        for (option, description), (fd, family), factory in zip(
            configured, config.workerFds, factories, strict=True
        ):
            endpoint = AdoptedEndpoint(reactor, fd, family)
            top.addListener(Listener(option, description, endpoint, factory))
        OrphanWatch(reactor, config.workerParent).setServiceParent(top)
        adminOption, adminPort = "worker-admin", config.workerAdmin
    else:
        for (option, description), factory in zip(configured, factories, strict=True):
            endpoint = serverFromString(reactor, description)
            top.addListener(Listener(option, description, endpoint, factory))
        adminOption, adminPort = "admin-port", config.adminPort
    admin = adminSite(
        top.readiness,
        proxy.metrics,
        registry,
        config.hostTiers,
        proxy.balancer,
        reactor,
        config.hookSpecs,
    )
    Listener(
        adminOption, adminPort, serverFromString(reactor, adminPort), admin
    ).setServiceParent(top)
    return top


def checkUsable(config: Configuration, reactor: Any) -> None:
    """
    What L{buildProxy} checks while building, checked by building it and
    letting it go: a C{--workers} supervisor refuses what its workers
    would, with the same one line, before starting any.

    @raise usage.UsageError: with one line, for a value that cannot be used.
    """
    certificateStore(config, reactor)
    # Each worker opens the access log itself; the supervisor writes none.
    stream = openAccessLogStream(config)
    if stream is not None and stream is not sys.stdout:
        stream.close()
    registry = buildRegistry(config, reactor)
    buildHooks(config, reactor, registry, Metrics())


def makeGroup(config: Configuration, reactor: Any) -> IService:
    """
    The C{--workers N} supervisor: it binds the listeners, runs N workers
    with this process's options, and serves the group's admin site.
    """
    checkUsable(config, reactor)
    raiseFileLimit()
    try:
        runtimeDirectory = tempfile.mkdtemp(prefix="monedge-workers-")
    except OSError as e:
        raise usage.UsageError(
            "--workers: cannot make a directory for the workers' admin sockets"
            f" in $TMPDIR: {describeError(e)}"
        ) from None
    group = WorkerGroup(
        reactor,
        config.workers,
        [
            Listener(
                option,
                description,
                serverFromString(reactor, description),
                NoConnections(),
            )
            for option, description in config.proxyListeners()
        ],
        twistdCommand(list(config.rawArgs)),
        runtimeDirectory,
        drainDelay=config.drainDelay,
        drainTimeout=config.drainTimeout,
    )
    admin = groupAdminSite(group, WorkerAdminClient(reactor, group).fetch, reactor)
    adminPort = config.adminPort
    Listener(
        "admin-port", adminPort, serverFromString(reactor, adminPort), admin
    ).setServiceParent(group)
    return group
