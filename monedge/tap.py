"""
The C{twistd monedge} plugin: command-line options, checked into a
L{monedge.runtime.config.Configuration}, and the service L{monedge.runtime.compose} builds
from it.

    twistd -n --pidfile= monedge --port 30080 --registry static:services.yaml
"""

from __future__ import annotations

import dataclasses
import errno
import gc
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

import yaml
from OpenSSL import SSL
from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from monedge.registry.kubeapi import checkLabelSelector
from monedge.rules.convention import HostTiers
from monedge.rules.grpc import checkPackagePrefix
from monedge.rules.headers import (
    CLIENT_CONTROLLED_NAMES,
    CLIENT_CONTROLLED_PREFIXES,
    ForwardingRules,
)
from monedge.rules.limits import Limits
from monedge.rules.policy import parseHooks
from monedge.rules.syntax import isToken, parseDuration, parseSize
from monedge.rules.trust import Trust, parseNetwork
from monedge.runtime import compose
from monedge.runtime.config import Configuration
from monedge.runtime.lifecycle import (
    describeError,
    exitAtStartup,
    reportStartupErrors,
)
from monedge.runtime.workers import (
    ADOPTABLE,
    listenerKind,
    parseInherited,
)
from monedge.twistedseam import checkTwistedVersion, leanDispatch
from monedge.upstream.client import DEFAULT_MAX_PER_HOST, DEFAULT_POOL_IDLE
from monedge.upstream.h2client import DEFAULT_PING_INTERVAL, DEFAULT_PING_TIMEOUT

#: The listen backlog for a bare port number: large enough for bursts.
BACKLOG = 1024

#: The cyclic collector's thresholds in monedge's own process (CPython's
#: default is (700, 10, 10)): see L{makeService}.
GC_THRESHOLDS = (50_000, 20, 20)

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


#: What endpoint strings are parsed with to check them: the endpoints
#: parsing builds only keep their reactor, so parsing needs none (and
#: imports none: Options builds nothing on the global reactor).
_NO_REACTOR: Any = object()


def _checkEndpoint(option: str, description: str) -> None:
    try:
        serverFromString(_NO_REACTOR, description)
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


def _checkAccessLog(value: str) -> None:
    """
    An C{--access-log} file's directory exists.  The file is opened when the
    proxy is built (L{monedge.runtime.compose.openAccessLogStream}), with the same
    message for any other reason it cannot be.
    """
    if value in ("-", "none"):
        return
    if not os.path.isdir(os.path.dirname(os.path.abspath(value))):
        reason = os.strerror(errno.ENOENT).lower()
        raise usage.UsageError(f"--access-log {value}: cannot open: {reason}")


class Options(usage.Options):
    """
    Options for C{twistd monedge}.  Parsing them checks every value, and
    sets L{config}, the configuration they give: plain values, nothing
    built (L{monedge.runtime.compose} builds the proxy from it).
    """

    #: The configuration, once the options are parsed.
    config: Configuration

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
            "selector",
            None,
            None,
            "With --registry kubernetes: a label selector; only the Services"
            " it matches are listed and watched (default: all).",
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
            "replay-body-size",
            None,
            "64KiB",
            "Most bytes of a streamed request body kept so that it can be sent"
            " once more on a stale pooled upstream connection.",
        ],
        [
            "request-buffer-budget",
            None,
            "256MiB",
            "Most bytes of request bodies held in memory at once for services"
            " with request-buffering (503 beyond).",
        ],
        [
            "upstream-idle-timeout",
            None,
            f"{DEFAULT_POOL_IDLE:g}s",
            "Idle time before a pooled upstream connection is closed; keep it below"
            " the upstreams' keep-alive.",
        ],
        [
            "upstream-ping-interval",
            None,
            f"{DEFAULT_PING_INTERVAL:g}s",
            "Silence on an HTTP/2 upstream connection with requests in flight"
            " before monedge sends a PING; 0 for none.",
        ],
        [
            "upstream-ping-timeout",
            None,
            f"{DEFAULT_PING_TIMEOUT:g}s",
            "How long an HTTP/2 upstream connection may answer nothing to a PING"
            " before it is dropped, its requests failing.",
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
        self["grpc-package-prefix"] = []
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

    def opt_grpc_package_prefix(self, prefix: str) -> None:
        """PREFIX: a reverse-DNS package prefix (com.example) removed before a gRPC call's package names its service. Repeatable."""
        try:
            self["grpc-package-prefix"].append(checkPackagePrefix(prefix.strip()))
        except ValueError as e:
            raise usage.UsageError(f"--grpc-package-prefix: {e}") from None

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
        if self["selector"] is not None:
            try:
                self["selector"] = checkLabelSelector(self["selector"])
            except ValueError as e:
                raise usage.UsageError(f"--selector: {e}") from None
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
            "upstream-ping-timeout",
        ):
            self[option] = _duration(option, self[option])
        self["upstream-ping-interval"] = _duration(
            "upstream-ping-interval", self["upstream-ping-interval"], True
        )
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
        for option in ("replay-body-size", "request-buffer-budget"):
            try:
                self[option] = parseSize(self[option])
            except ValueError as e:
                raise usage.UsageError(f"--{option}: {e}") from None
        self["upstream-pool-size"] = _positive(
            "upstream-pool-size", self["upstream-pool-size"], int
        )
        _choice(
            "underscore-headers", self["underscore-headers"], "drop", "reject", "allow"
        )
        self["hook-timeout"] = _duration("hook-timeout", self["hook-timeout"])
        self._tlsOptions()
        self._workerOptions()
        _checkAccessLog(self["access-log"])
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
        self._checkRegistry(self["registry"])
        self.config = self._configuration()

    def _configuration(self) -> Configuration:
        """
        The configuration the options, checked, give.
        """
        return Configuration(
            port=self["port"],
            adminPort=self["admin-port"],
            listen=tuple(self["listen"]),
            tlsPort=self["tls-port"],
            tlsDir=self["tls-dir"],
            registry=self["registry"],
            kubeconfig=self["kubeconfig"],
            namespaces=tuple(self["namespace"]),
            selector=self["selector"],
            initialSyncTimeout=self["initial-sync-timeout"],
            hostTiers=self["host-tiers"],
            grpcPackagePrefixes=tuple(self["grpc-package-prefix"]),
            trustedHops=self["trusted-hops"],
            trustedProxies=tuple(self["trusted-proxies"]),
            forwarding=self["forwarding"],
            drainDelay=self["drain-delay"],
            drainTimeout=self["drain-timeout"],
            limits=Limits(
                maxRequestLine=self["max-request-line"],
                maxHeaderLine=self["max-header-line"],
                maxHeadersSize=self["max-headers-size"],
                maxHeaderCount=self["max-header-count"],
                headerTimeout=self["header-timeout"],
                keepAliveTimeout=self["keepalive-timeout"],
                bodyTimeout=self["body-timeout"],
                sendTimeout=self["send-timeout"],
                maxConnections=self["max-connections"],
                underscoreHeaders=self["underscore-headers"],
                replayBodySize=self["replay-body-size"],
                requestBufferBudget=self["request-buffer-budget"],
            ),
            upstreamPoolSize=self["upstream-pool-size"],
            upstreamIdleTimeout=self["upstream-idle-timeout"],
            upstreamPingInterval=self["upstream-ping-interval"],
            upstreamPingTimeout=self["upstream-ping-timeout"],
            maxUpstreamHeadersSize=self["max-upstream-headers-size"],
            maxUpstreamHeaderCount=self["max-upstream-header-count"],
            accessLog=self["access-log"],
            hookSpecs=self["hook-specs"],
            hookTimeout=self["hook-timeout"],
            workers=self["workers"],
            workerId=self["worker-id"],
            workerParent=self["worker-parent"],
            workerAdmin=self["worker-admin"],
            workerFds=tuple(self["worker-fd"]),
            rawArgs=tuple(self.rawArgs),
        )

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

    def _checkRegistry(self, spec: str) -> None:
        """
        C{--registry} names a registry monedge has, and a file it names can
        be read (whether it validates is found when the registry is built,
        by L{monedge.runtime.compose.buildRegistry}).
        """
        kind, sep, argument = spec.partition(":")
        if kind == "static" and sep and argument:
            try:
                open(argument, "rb").close()
            except OSError as e:
                raise usage.UsageError(
                    f"--registry: {argument}: cannot read: {e.strerror}"
                ) from None
            return
        if spec == "kubernetes":
            kubeconfig = self["kubeconfig"]
            if kubeconfig:
                try:
                    open(kubeconfig, "rb").close()
                except OSError as e:
                    raise usage.UsageError(
                        f"--kubeconfig {kubeconfig}: cannot read: {describeError(e)}"
                    ) from None
            return
        raise usage.UsageError(
            f"--registry: unknown registry {spec!r} (expected static:PATH or kubernetes)"
        )


def makeService(options: Options, reactor: Any = None) -> IService:
    """
    Build the proxy from parsed options (L{monedge.runtime.compose.makeService}):
    one proxy process, or with C{--workers N} a supervisor of N of them.
    Without a reactor, this is twistd's process, set up here first.
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
        # Young collections 70 times rarer than CPython's default (one per
        # 700 allocations): a request's objects die by reference count
        # before one runs, so far fewer are promoted, and full collections,
        # whose pause grows with the services a registry holds, come
        # seldom.  Measured at 10,000 services (docs/performance.md, Scale):
        # p99 at saturation 63-93 ms with the default, 16-18 ms with this.
        gc.set_threshold(*GC_THRESHOLDS)
        # A value that parses but cannot be used (a registry file that does
        # not validate, a bad hook, a TLS directory or access log that does
        # not open) is found while building; twistd's log has not started,
        # so it too ends the process with its one line and nothing else.
        # The Kubernetes registry freezes again after each full sync, so
        # that the state it builds (long-lived) leaves the collector's
        # generations too.
        config = dataclasses.replace(options.config, freezeAfterSync=True)
        try:
            return compose.makeService(config, reactor)
        except usage.UsageError as e:
            exitAtStartup(str(e))
    return compose.makeService(options.config, reactor)
