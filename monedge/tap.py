"""
The C{twistd monedge} plugin: command-line options and the service they
build.

    twistd -n --pidfile= monedge --port 30080 --registry static:services.yaml
"""

from __future__ import annotations

import gc
import json
import os
import re
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import yaml
from OpenSSL import SSL
from twisted.application.service import IService, Service
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage
from twisted.web.http import H2_ENABLED

from monedge.edge.server import Limits, ListenerFactory, ProxySite
from monedge.edge.tls import CertificateFileError, CertificateStore
from monedge.hooks import HookConfigError, HookContext, HookSet
from monedge.interfaces import IServiceRegistry
from monedge.observe.accesslog import AccessLog, AccessLogFileError, openAccessLog
from monedge.observe.metrics import Metrics
from monedge.proxy.exchange import ProxyContext
from monedge.proxy.resource import RootResource
from monedge.registry.kubernetes import KubernetesRegistry, apiClientFromConfig
from monedge.registry.static import RegistryFileError, StaticRegistry
from monedge.rules.convention import HostTiers
from monedge.rules.headers import (
    CLIENT_CONTROLLED_NAMES,
    CLIENT_CONTROLLED_PREFIXES,
    ForwardingRules,
)
from monedge.rules.policy import parseHooks
from monedge.rules.syntax import isToken, parseDuration
from monedge.rules.trust import Trust, parseNetwork
from monedge.runtime.admin import adminSite, groupAdminSite
from monedge.runtime.lifecycle import (
    Listener,
    ProxyService,
    describeError,
    exitAtStartup,
    reportStartupErrors,
)
from monedge.runtime.workers import (
    ADOPTABLE,
    AdoptedEndpoint,
    NoConnections,
    OrphanWatch,
    WorkerAdminClient,
    WorkerGroup,
    listenerKind,
    parseInherited,
    twistdCommand,
)
from monedge.twistedseam import checkTwistedVersion, leanDispatch
from monedge.upstream.balancer import Balancer
from monedge.upstream.client import (
    DEFAULT_MAX_PER_HOST,
    DEFAULT_POOL_IDLE,
    FastUpstreamClient,
)
from monedge.upstream.tunnel import TunnelSet

_log = Logger()

#: The listen backlog for a bare port number: large enough for bursts.
BACKLOG = 1024

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")


def endpointDescription(value: str) -> str:
    """
    A port number becomes a TCP endpoint on every interface with a large
    backlog; anything else is taken as an endpoint string.
    """
    if value.isdigit():
        port = int(value)
        if not 0 < port < 65536:
            raise usage.UsageError(f"port out of range: {value}")
        return f"tcp:{port}:backlog={BACKLOG}"
    return value


def _checkEndpoint(option: str, description: str) -> None:
    from twisted.internet import reactor

    try:
        serverFromString(reactor, description)
    except (ValueError, KeyError, TypeError, OSError, SSL.Error) as e:
        raise usage.UsageError(
            f"--{option}: invalid endpoint {description!r}: {e}"
        ) from None


def _headerName(option: str, name: str) -> str:
    """
    A header name given to C{option}, lowercased.

    @raise usage.UsageError: if it is not an HTTP token.
    """
    name = name.strip().lower()
    if not isToken(name):
        raise usage.UsageError(f"--{option}: not a header name: {name!r}")
    return name


def _choice(option: str, value: str, *choices: str) -> None:
    if value not in choices:
        expected = ", ".join(choices[:-1]) + " or " + choices[-1]
        raise usage.UsageError(f"--{option}: expected {expected}, got {value!r}")


def _positive(option: str, value: str, parse: Any = float) -> Any:
    try:
        number = parse(value)
    except ValueError:
        raise usage.UsageError(
            f"--{option}: expected a number, got {value!r}"
        ) from None
    if number < 0:
        raise usage.UsageError(f"--{option}: must not be negative, got {value!r}")
    return number


def _duration(option: str, value: str, allowZero: bool = False) -> float:
    if allowZero and value.strip() in ("0", "0s"):
        return 0.0
    try:
        return parseDuration(value)
    except ValueError as e:
        raise usage.UsageError(f"--{option}: {e}") from None


class Options(usage.Options):
    """
    Options for C{twistd monedge}.
    """

    synopsis = "[options]"
    longdesc = (
        "monedge routes a request for <host>/<name>/<rest> to the service "
        "service.<tier>.<name>, with no per-service routing configuration. "
        "The tier is 'api' unless --host-tier maps the request's host."
    )

    optFlags: list[list[str | None]] = [
        [
            "no-real-ip",
            None,
            "Do not set X-Real-IP to the client's address (it is then a"
            " client-controlled header like the others).",
        ],
    ]

    optParameters: list[list[str | None]] = [
        [
            "port",
            "p",
            "30080",
            "Proxy listener: a port number (all interfaces) or an endpoint string.",
        ],
        [
            "admin-port",
            None,
            "30081",
            "Admin listener (/healthz, /readyz, /metrics, /routes).",
        ],
        [
            "registry",
            "r",
            "static:services.yaml",
            "Service registry: static:PATH (a YAML file, reloaded on change and"
            " SIGHUP) or kubernetes (Services and EndpointSlices, watched).",
        ],
        [
            "kubeconfig",
            None,
            None,
            "With --registry kubernetes: a kubeconfig file (default: in-cluster"
            " configuration in a pod, else ~/.kube/config).",
        ],
        [
            "initial-sync-timeout",
            None,
            "30s",
            "With --registry kubernetes: report ready after this long even"
            " without a first full sync; 0s to wait for the sync however long.",
        ],
        [
            "trusted-hops",
            None,
            None,
            "Proxies in front of monedge whose X-Forwarded-* and X-Request-Id are"
            " trusted (0: replace the client's). Default 0, or 1 with"
            " --trusted-proxies.",
        ],
        [
            "drain-delay",
            None,
            "5s",
            "On SIGTERM, keep serving (not ready) this long; 0s for none.",
        ],
        ["drain-timeout", None, "25s", "Then wait this long for requests in flight."],
        [
            "header-timeout",
            None,
            "10s",
            "Deadline for a client's request headers (408).",
        ],
        [
            "keepalive-timeout",
            None,
            "75s",
            "Idle time before a client connection is closed.",
        ],
        ["max-header-count", None, "100", "Most request headers (431 beyond)."],
        [
            "max-headers-size",
            None,
            "32768",
            "Most bytes of request headers (431 beyond).",
        ],
        ["max-request-line", None, "8192", "Longest request line (414 beyond)."],
        [
            "underscore-headers",
            None,
            "drop",
            "Request headers whose names have an underscore: drop, reject (400)"
            " or allow.",
        ],
        [
            "body-timeout",
            None,
            "30s",
            "Deadline for each read of a request body (408 when it stalls).",
        ],
        [
            "send-timeout",
            None,
            "60s",
            "How long a client may leave a response unread before it is dropped.",
        ],
        [
            "max-connections",
            None,
            "20000",
            "Most open client connections per listener (503 beyond); 0 for no limit.",
        ],
        [
            "max-header-line",
            None,
            "8192",
            "Longest single request header (431 beyond).",
        ],
        [
            "upstream-idle-timeout",
            None,
            f"{DEFAULT_POOL_IDLE:g}s",
            "Idle time before a pooled upstream connection is closed; keep it below"
            " the upstreams' keep-alive.",
        ],
        [
            "tls-port",
            None,
            None,
            "A TLS proxy listener (a port number or a tcp: endpoint string),"
            " serving the certificates in --tls-dir by SNI.",
        ],
        [
            "tls-dir",
            None,
            None,
            "A directory of PEM files (key, certificate, chain), each serving"
            " the names in its certificate; default.pem for clients without SNI."
            " Reloaded when it changes.",
        ],
        [
            "upstream-pool-size",
            None,
            str(DEFAULT_MAX_PER_HOST),
            "Idle connections kept per upstream endpoint.",
        ],
        [
            "max-upstream-headers-size",
            None,
            "65536",
            "Most bytes of an upstream response's head (502 beyond).",
        ],
        [
            "max-upstream-header-count",
            None,
            "100",
            "Most header fields in an upstream response's head (502 beyond).",
        ],
        [
            "access-log",
            None,
            "-",
            "Access log: '-' for stdout, 'none', or a file path.",
        ],
        [
            "hooks",
            None,
            None,
            "A YAML file listing global hooks ([{name, options}]), run before"
            " each service's own.",
        ],
        [
            "hook-timeout",
            None,
            "5s",
            "How long a hook may take (500 hook_failed beyond).",
        ],
        [
            "workers",
            None,
            "1",
            "Proxy processes sharing the listeners (one per core), supervised by"
            " this one; 'auto' for one per usable CPU.",
        ],
        ["worker-id", None, None, "Internal: set by --workers for each worker."],
        ["worker-parent", None, None, "Internal: set by --workers."],
        ["worker-admin", None, None, "Internal: set by --workers."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self["host-tier"] = []
        self["namespace"] = []
        self["hook"] = []
        self["trusted-proxies"] = []
        self["identity-header"] = []
        self["trusted-header"] = []
        self["worker-fd"] = []
        self.rawArgs: list[str] = []

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        # Workers are started with the same options, so keep them.
        self.rawArgs = list(sys.argv[1:] if options is None else options)
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if self.parent is None:
                raise
            # On twistd's command line: one line on standard error, not
            # twistd's usage text (all of --help) then the message.
            exitAtStartup(str(e))

    def opt_worker_fd(self, value: str) -> None:
        """Internal: an inherited listening socket, FD:FAMILY, set by --workers."""
        try:
            self["worker-fd"].append(parseInherited(value))
        except ValueError as e:
            raise usage.UsageError(f"--worker-fd: {e}") from None

    def opt_hook(self, spec: str) -> None:
        """A global hook: NAME, or YAML/JSON {name: NAME, options: {...}}. Repeatable."""
        text = spec if spec.lstrip().startswith("{") else json.dumps(spec.strip())
        try:
            self["hook"].extend(parseHooks(f"[{text}]"))
        except ValueError as e:
            raise usage.UsageError(f"--hook: {e}") from None

    def opt_namespace(self, namespace: str) -> None:
        """With --registry kubernetes: a namespace to watch (default: all). Repeatable."""
        if not _DNS_LABEL.match(namespace):
            raise usage.UsageError(f"--namespace: invalid namespace {namespace!r}")
        self["namespace"].append(namespace)

    def opt_trusted_proxies(self, cidr: str) -> None:
        """CIDR: forwarding headers are believed only from peers (and hops) in these ranges. Repeatable."""
        try:
            parseNetwork(cidr)
        except ValueError as e:
            raise usage.UsageError(f"--trusted-proxies: {e}") from None
        self["trusted-proxies"].append(cidr.strip())

    def opt_identity_header(self, name: str) -> None:
        """NAME: a header the edge owns (X-User-Id, say): removed from every request to every service. Repeatable."""
        self["identity-header"].append(_headerName("identity-header", name))

    def opt_trusted_header(self, name: str) -> None:
        """NAME: a client-controlled header (docs/security.md) that trusted proxies set: passed on from trusted peers. Repeatable."""
        name = _headerName("trusted-header", name)
        raw = name.encode("ascii")
        if raw not in CLIENT_CONTROLLED_NAMES and not raw.startswith(
            CLIENT_CONTROLLED_PREFIXES
        ):
            raise usage.UsageError(
                f"--trusted-header: {name} is not a client-controlled header"
                " (any other header passes already; see docs/security.md)"
            )
        self["trusted-header"].append(name)

    def opt_listen(self, endpoint: str) -> None:
        """An extra proxy listener: an endpoint string (tcp:, ssl:, unix:). Repeatable."""
        self["listen"].append(endpoint)

    def opt_host_tier(self, mapping: str) -> None:
        """HOST=TIER: HOST routes to service.TIER.<name>; unmapped hosts then 404. Repeatable."""
        host, sep, tier = mapping.partition("=")
        if not sep:
            raise usage.UsageError(f"--host-tier: expected HOST=TIER, got {mapping!r}")
        self["host-tier"].append((host.strip(), tier.strip()))

    def postOptions(self) -> None:
        self["port"] = endpointDescription(self["port"])
        self["admin-port"] = endpointDescription(self["admin-port"])
        for option in ("port", "admin-port"):
            _checkEndpoint(option, self[option])
        for description in self["listen"]:
            _checkEndpoint("listen", description)
        try:
            self["host-tiers"] = HostTiers.fromPairs(self["host-tier"])
        except ValueError as e:
            raise usage.UsageError(f"--host-tier: {e}") from None
        self._trustOptions()
        self["drain-delay"] = _duration("drain-delay", self["drain-delay"], True)
        self["max-connections"] = _positive(
            "max-connections", self["max-connections"], int
        )
        for option in (
            "drain-timeout",
            "header-timeout",
            "body-timeout",
            "send-timeout",
            "keepalive-timeout",
            "upstream-idle-timeout",
        ):
            self[option] = _duration(option, self[option])
        self["initial-sync-timeout"] = _duration(
            "initial-sync-timeout", self["initial-sync-timeout"], True
        )
        for option in (
            "max-header-count",
            "max-headers-size",
            "max-request-line",
            "max-header-line",
            "max-upstream-headers-size",
            "max-upstream-header-count",
        ):
            self[option] = _positive(option, self[option], int)
            if self[option] == 0:
                raise usage.UsageError(f"--{option}: must be at least 1")
        self["upstream-pool-size"] = _positive(
            "upstream-pool-size", self["upstream-pool-size"], int
        )
        _choice(
            "underscore-headers", self["underscore-headers"], "drop", "reject", "allow"
        )
        self["hook-timeout"] = _duration("hook-timeout", self["hook-timeout"])
        self._tlsOptions()
        self._workerOptions()
        try:
            self["access-log-stream"] = openAccessLog(self["access-log"])
        except AccessLogFileError as e:
            raise usage.UsageError(f"--access-log {e}") from None
        specs = list(self["hook"])
        if self["hooks"]:
            try:
                with open(self["hooks"], encoding="utf-8") as f:
                    document = yaml.safe_load(f)
            except OSError as e:
                raise usage.UsageError(
                    f"--hooks {self['hooks']}: cannot read: {describeError(e)}"
                ) from None
            except (UnicodeDecodeError, yaml.YAMLError) as e:
                raise usage.UsageError(
                    f"--hooks {self['hooks']}: not YAML: {e}"
                ) from None
            if isinstance(document, dict):
                if "hooks" not in document:
                    raise usage.UsageError(
                        f"--hooks: {self['hooks']}: expected a list, or a mapping"
                        " with a 'hooks' key"
                    )
                document = document["hooks"]
            try:
                specs[:0] = parseHooks(document)
            except ValueError as e:
                raise usage.UsageError(f"--hooks: {self['hooks']}: {e}") from None
        self["hook-specs"] = tuple(specs)
        self["registry-object"] = registry = self._registry(self["registry"])
        # Hooks are built here, not in makeService, so that a bad one is a
        # one-line usage error rather than a traceback.
        from twisted.internet import reactor

        self["metrics"] = metrics = Metrics()
        self["hook-set"] = hooks = HookSet(
            HookContext(
                reactor=reactor,
                registry=registry,
                http=hookHTTPClient(reactor),
                timeout=self["hook-timeout"],
                metrics=metrics,
            ),
            globalSpecs=self["hook-specs"],
            observe=metrics.observeHook,
        )
        checkHooks(hooks, registry)

    def _trustOptions(self) -> None:
        hops = self["trusted-hops"]
        proxies = self["trusted-proxies"]
        if hops is None:
            hops = 1 if proxies else 0
        else:
            hops = _positive("trusted-hops", hops, int)
            if proxies and hops == 0:
                raise usage.UsageError(
                    "--trusted-proxies: --trusted-hops 0 trusts no proxy;"
                    " give at least 1 (or leave it out for 1)"
                )
        self["trusted-hops"] = hops
        if "x-real-ip" in self["trusted-header"] and not self["no-real-ip"]:
            raise usage.UsageError(
                "--trusted-header: X-Real-IP is monedge's own unless --no-real-ip"
            )
        self["forwarding"] = ForwardingRules(
            Trust.fromOptions(hops, proxies),
            identityHeaders=self["identity-header"],
            trustedHeaders=self["trusted-header"],
            realIp=not self["no-real-ip"],
        )

    def _tlsOptions(self) -> None:
        port, directory = self["tls-port"], self["tls-dir"]
        self["tls-store"] = None
        if port is None and directory is None:
            return
        if port is None or directory is None:
            raise usage.UsageError("--tls-port and --tls-dir go together")
        port = self["tls-port"] = endpointDescription(port)
        if listenerKind(port) not in ("tcp", "tcp6"):
            raise usage.UsageError(
                f"--tls-port: expected a port number or a tcp: endpoint, got {port!r}"
            )
        _checkEndpoint("tls-port", port)
        from twisted.internet import reactor

        try:
            self["tls-store"] = CertificateStore(
                directory,
                reactor,
                protocols=(b"h2", b"http/1.1") if H2_ENABLED else (b"http/1.1",),
            )
        except CertificateFileError as e:
            raise usage.UsageError(f"--tls-dir: {e}") from None

    def _workerOptions(self) -> None:
        workers = self["workers"]
        if workers == "auto":
            self["workers"] = len(os.sched_getaffinity(0))
        else:
            self["workers"] = _positive("workers", workers, int)
            if self["workers"] == 0:
                raise usage.UsageError("--workers: must be at least 1")
        if self["worker-id"] is not None:
            # A worker of a group: it adopts its supervisor's sockets.
            if (
                not self["worker-fd"]
                or self["worker-admin"] is None
                or self["worker-parent"] is None
            ):
                raise usage.UsageError(
                    "--worker-id: also needs --worker-fd, --worker-admin and"
                    " --worker-parent"
                )
            self["worker-id"] = _positive("worker-id", self["worker-id"], int)
            self["worker-parent"] = _positive(
                "worker-parent", self["worker-parent"], int
            )
            self["workers"] = 1
            return
        if self["workers"] > 1:
            for description in [self["port"], *self["listen"]]:
                if listenerKind(description) not in ADOPTABLE:
                    raise usage.UsageError(
                        f"--workers: cannot share the listener {description!r};"
                        f" with --workers, listeners must be {', '.join(ADOPTABLE)}"
                    )

    def _registry(self, spec: str) -> IServiceRegistry:
        kind, sep, argument = spec.partition(":")
        if kind == "static" and sep and argument:
            try:
                return StaticRegistry(argument)
            except RegistryFileError as e:
                raise usage.UsageError(f"--registry: {e}") from None
        if spec == "kubernetes":
            kubeconfig = self["kubeconfig"]
            source = (
                f"--kubeconfig {kubeconfig}" if kubeconfig else "--registry kubernetes"
            )
            if kubeconfig:
                try:
                    open(kubeconfig, "rb").close()
                except OSError as e:
                    raise usage.UsageError(
                        f"{source}: cannot read: {describeError(e)}"
                    ) from None
            try:
                apiClient = apiClientFromConfig(kubeconfig)
            except ValueError as e:
                raise usage.UsageError(f"{source}: {e}") from None
            return KubernetesRegistry(
                apiClient,
                tiers=self["host-tiers"].tiers(),
                namespaces=self["namespace"],
                initialSyncTimeout=self["initial-sync-timeout"],
            )
        raise usage.UsageError(
            f"--registry: unknown registry {spec!r} (expected static:PATH or kubernetes)"
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


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the proxy from parsed options: one proxy process, or with
    C{--workers N} a supervisor of N of them.
    """
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
        # The process's own: a listener or file that cannot be opened from
        # here on ends it with one line (monedge.runtime.lifecycle).
        reportStartupErrors()
        # monedge relies on Twisted internals (monedge.twistedseam): a
        # Twisted it was not written for stops it here, with one line
        # (twistd's log has not started: that line is all there is).
        try:
            checkTwistedVersion()
        except usage.UsageError as e:
            exitAtStartup(str(e))
        # The process's own reactor (twistd's): dispatch its events without
        # the legacy log context (monedge.twistedseam), and once running, move
        # everything built at startup (modules, clients, the registry) out
        # of the cyclic garbage collector's sight, so that a full
        # collection, and its pause, covers only what came later.  A
        # reactor passed in (a test's) is left as it is.
        leanDispatch(reactor)
        reactor.callWhenRunning(gc.freeze)
    if options["trusted-hops"] and not options["trusted-proxies"]:
        _log.warn(
            "--trusted-hops {hops} without --trusted-proxies: any peer may set"
            " its own X-Forwarded-For, and with it its client address",
            hops=options["trusted-hops"],
        )
    if options["workers"] > 1:
        return makeGroup(options, reactor)
    registry: IServiceRegistry = options["registry-object"]
    hostTiers: HostTiers = options["host-tiers"]
    raiseFileLimit()
    metrics: Metrics = options["metrics"]
    metrics.watchRegistry(registry, reactor.seconds)
    balancer = Balancer(reactor)
    # One client sends every request upstream, WebSocket handshakes
    # included (it can hand an upgraded connection to a tunnel).
    client = FastUpstreamClient(
        reactor,
        maxPerHost=options["upstream-pool-size"],
        poolIdle=options["upstream-idle-timeout"],
        maxHeadersSize=options["max-upstream-headers-size"],
        maxHeaderCount=options["max-upstream-header-count"],
    )
    hooks: HookSet = options["hook-set"]
    hooks.context.reactor = reactor
    tunnels = TunnelSet()
    metrics.tunnelsOpen.set_function(lambda: len(tunnels.open))
    context = ProxyContext(client, balancer, reactor, hooks, client, tunnels)
    root = RootResource(registry, context, metrics, hostTiers)
    limits = Limits(
        maxRequestLine=options["max-request-line"],
        maxHeaderLine=options["max-header-line"],
        maxHeadersSize=options["max-headers-size"],
        maxHeaderCount=options["max-header-count"],
        headerTimeout=options["header-timeout"],
        keepAliveTimeout=options["keepalive-timeout"],
        bodyTimeout=options["body-timeout"],
        sendTimeout=options["send-timeout"],
        maxConnections=options["max-connections"],
        underscoreHeaders=options["underscore-headers"],
    )
    site = ProxySite(
        root,
        reactor=reactor,
        metrics=metrics,
        accessLog=AccessLog(options["access-log-stream"], reactor),
        forwarding=options["forwarding"],
        limits=limits,
    )
    top = ProxyService(
        site,
        registry,
        client,
        reactor,
        drainDelay=options["drain-delay"],
        drainTimeout=options["drain-timeout"],
        hooks=hooks,
        tunnels=tunnels,
    )
    if IService.providedBy(registry):
        registry.setServiceParent(top)
    store: CertificateStore | None = options["tls-store"]
    reloads = [r for r in [getattr(registry, "reload", None)] if r is not None]
    if store is not None:
        CertificatePolling(store).setServiceParent(top)
        reloads.append(store.reload)
    if reloads:
        ReloadOnHangup(lambda: [r() for r in reloads], reactor).setServiceParent(top)
    # The plain listeners serve the site; the TLS one, last, wraps it.
    # Each listener counts its own connections against --max-connections.
    limit = options["max-connections"]
    configured = proxyListeners(options)
    factories: list[Any] = [
        ListenerFactory(site, limit, description) for _, description in configured
    ]
    if store is not None:
        factories[-1] = TLSMemoryBIOFactory(
            store.contextFactory(), False, factories[-1]
        )
    if options["worker-id"] is not None:
        for (option, description), (fd, family), factory in zip(
            configured, options["worker-fd"], factories, strict=True
        ):
            endpoint = AdoptedEndpoint(reactor, fd, family)
            top.addListener(Listener(option, description, endpoint, factory))
        OrphanWatch(reactor, options["worker-parent"]).setServiceParent(top)
        adminOption, adminPort = "worker-admin", options["worker-admin"]
    else:
        for (option, description), factory in zip(configured, factories, strict=True):
            endpoint = serverFromString(reactor, description)
            top.addListener(Listener(option, description, endpoint, factory))
        adminOption, adminPort = "admin-port", options["admin-port"]
    admin = adminSite(
        top.readiness,
        metrics,
        registry,
        hostTiers,
        balancer,
        reactor,
        options["hook-specs"],
    )
    Listener(
        adminOption, adminPort, serverFromString(reactor, adminPort), admin
    ).setServiceParent(top)
    return top


def proxyListeners(options: Options) -> list[tuple[str, str]]:
    """
    Every proxy listener, as (option, endpoint string): C{--port}, each
    C{--listen}, then C{--tls-port} if given.
    """
    listeners = [("port", options["port"])]
    listeners += [("listen", description) for description in options["listen"]]
    if options["tls-port"]:
        listeners.append(("tls-port", options["tls-port"]))
    return listeners


def makeGroup(options: Options, reactor: Any) -> IService:
    """
    The C{--workers N} supervisor: it binds the listeners, runs N workers
    with this process's options, and serves the group's admin site.
    """
    raiseFileLimit()
    # Each worker opens the access log itself; the supervisor writes none.
    stream = options["access-log-stream"]
    if stream is not None and stream is not sys.stdout:
        stream.close()
    try:
        runtimeDirectory = tempfile.mkdtemp(prefix="monedge-workers-")
    except OSError as e:
        raise usage.UsageError(
            "--workers: cannot make a directory for the workers' admin sockets"
            f" in $TMPDIR: {describeError(e)}"
        ) from None
    group = WorkerGroup(
        reactor,
        options["workers"],
        [
            Listener(
                option,
                description,
                serverFromString(reactor, description),
                NoConnections(),
            )
            for option, description in proxyListeners(options)
        ],
        twistdCommand(options.rawArgs),
        runtimeDirectory,
        drainDelay=options["drain-delay"],
        drainTimeout=options["drain-timeout"],
    )
    admin = groupAdminSite(group, WorkerAdminClient(reactor, group).fetch, reactor)
    adminPort = options["admin-port"]
    Listener(
        "admin-port", adminPort, serverFromString(reactor, adminPort), admin
    ).setServiceParent(group)
    return group
