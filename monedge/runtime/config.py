"""
monedge's configuration: the values C{twistd monedge}'s options were
parsed and validated into (L{monedge.tap.Options}), and nothing built from
them.

A L{Configuration} holds plain values only (strings, numbers, tuples and
frozen value objects): no open file, no reactor, no service.
L{monedge.runtime.compose} builds the running proxy from one and a reactor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from monedge.rules.convention import HostTiers
from monedge.rules.headers import DEFAULT_RULES, ForwardingRules
from monedge.rules.limits import DEFAULT_LIMITS, Limits
from monedge.rules.policy import HookSpec


@dataclass(frozen=True, slots=True)
class Configuration:
    """
    Every value the proxy is built from, named after the option it comes
    from (docs/configuration.md documents each option).  The defaults are
    the options' defaults (tests/runtime/test_config.py checks that they agree).
    """

    #: C{--port}: the proxy listener's endpoint string (a bare port number
    #: already made one).
    port: str = "tcp:30080:backlog=1024"
    #: C{--admin-port}: the admin listener's endpoint string.
    adminPort: str = "tcp:30081:backlog=1024"
    #: Each C{--listen}: extra proxy listeners' endpoint strings.
    listen: tuple[str, ...] = ()
    #: C{--tls-port}: the TLS proxy listener's endpoint string, or None.
    tlsPort: str | None = None
    #: C{--tls-dir}: the directory of PEM files it serves, or None.
    tlsDir: str | None = None

    #: C{--registry}: C{static:PATH} or C{kubernetes}.
    registry: str = "static:services.yaml"
    #: C{--kubeconfig}: with the Kubernetes registry, its kubeconfig, or None.
    kubeconfig: str | None = None
    #: Each C{--namespace}: the namespaces watched (none: all).
    namespaces: tuple[str, ...] = ()
    #: C{--selector}: the label selector Services are listed and watched
    #: with (checked), or None for all.
    selector: str | None = None
    #: Whether the registry calls C{gc.freeze()} after each full sync: only
    #: in monedge's own process (L{monedge.tap.makeService}), never in a
    #: test's.
    freezeAfterSync: bool = False
    #: C{--initial-sync-timeout}, seconds; 0 to wait for the first sync.
    initialSyncTimeout: float = 30.0
    #: Each C{--host-tier}: which tier each Host serves.
    hostTiers: HostTiers = field(default_factory=lambda: HostTiers({}))
    #: Each C{--grpc-package-prefix}: package prefixes removed before a
    #: gRPC call's package names its service.
    grpcPackagePrefixes: tuple[str, ...] = ()

    #: C{--trusted-hops}, resolved (1 with C{--trusted-proxies} alone).
    trustedHops: int = 0
    #: Each C{--trusted-proxies}: CIDR ranges, as given (stripped).
    trustedProxies: tuple[str, ...] = ()
    #: The forwarding rules the trust options, C{--identity-header},
    #: C{--trusted-header} and C{--no-real-ip} combine into.
    forwarding: ForwardingRules = DEFAULT_RULES

    #: C{--drain-delay} and C{--drain-timeout}, seconds.
    drainDelay: float = 5.0
    drainTimeout: float = 25.0

    #: The client-side limits: C{--max-request-line}, C{--max-header-line},
    #: C{--max-headers-size}, C{--max-header-count}, C{--header-timeout},
    #: C{--keepalive-timeout}, C{--body-timeout}, C{--send-timeout},
    #: C{--max-connections} and C{--underscore-headers}.
    limits: Limits = DEFAULT_LIMITS

    #: C{--upstream-pool-size}: idle connections kept per upstream endpoint.
    upstreamPoolSize: int = 256
    #: C{--upstream-idle-timeout}, seconds.
    upstreamIdleTimeout: float = 4.0
    #: C{--upstream-ping-interval} (0 for none) and C{--upstream-ping-timeout},
    #: seconds: the HTTP/2 upstream keepalive.
    upstreamPingInterval: float = 30.0
    upstreamPingTimeout: float = 10.0
    #: C{--max-upstream-headers-size}, bytes.
    maxUpstreamHeadersSize: int = 65536
    #: C{--max-upstream-header-count}.
    maxUpstreamHeaderCount: int = 100

    #: C{--access-log}: C{-} (stdout), C{none}, or a file path.
    accessLog: str = "-"
    #: The global hooks: the C{--hooks} file's, then each C{--hook}.
    hookSpecs: tuple[HookSpec, ...] = ()
    #: C{--hook-timeout}, seconds.
    hookTimeout: float = 5.0

    #: C{--workers}, resolved (C{auto} counted; 1 in a worker).
    workers: int = 1
    #: C{--worker-id}: set in a worker of a group, else None.
    workerId: int | None = None
    #: C{--worker-parent}: the supervisor's process id, in a worker.
    workerParent: int | None = None
    #: C{--worker-admin}: the admin endpoint a worker serves its supervisor.
    workerAdmin: str | None = None
    #: Each C{--worker-fd}: inherited listening sockets, (fd, family).
    workerFds: tuple[tuple[int, int], ...] = ()

    #: The command-line arguments as given: a group's workers are started
    #: with them.
    rawArgs: tuple[str, ...] = ()

    def proxyListeners(self) -> tuple[tuple[str, str], ...]:
        """
        Every proxy listener, as (option, endpoint string): C{--port}, each
        C{--listen}, then C{--tls-port} if given.
        """
        listeners = [("port", self.port)]
        listeners += [("listen", description) for description in self.listen]
        if self.tlsPort:
            listeners.append(("tls-port", self.tlsPort))
        return tuple(listeners)
