"""
The admin site, on its own port: liveness, readiness, Prometheus metrics
and the route table.

    GET /healthz   200 while the process lives
    GET /readyz    200 when serving; 503 while draining or before the
                   registry's first sync
    GET /metrics   Prometheus text format
    GET /routes    every service, its endpoints and effective policy (JSON)
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from twisted.web import pages
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request, Site

from monedge.balancer import Balancer, eligible
from monedge.convention import HostTiers, parseServiceName
from monedge.interfaces import IServiceRegistry
from monedge.metrics import Metrics
from monedge.policy import HookSpec


def _json(request: Request, status: int, document: object) -> bytes:
    body = json.dumps(document, indent=2, sort_keys=True).encode("utf-8") + b"\n"
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return body


class _Leaf(Resource):
    isLeaf = True

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)  # type: ignore[no-any-return, attr-defined]


class Health(_Leaf):
    """
    C{/healthz}: the process is alive and its reactor turns.
    """

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, {"status": "ok"})


class Ready(_Leaf):
    """
    C{/readyz}: whether a load balancer should send traffic here.
    """

    def __init__(self, readiness: Callable[[], tuple[bool, str]]) -> None:
        super().__init__()
        self._readiness = readiness

    def render_GET(self, request: Request) -> bytes:
        ready, reason = self._readiness()
        return _json(request, 200 if ready else 503, {"ready": ready, "reason": reason})


class PrometheusMetrics(_Leaf):
    """
    C{/metrics}, from monedge's own collector registry.
    """

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self._metrics = metrics

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self._metrics.registry)


class Routes(_Leaf):
    """
    C{/routes}: the route table as the proxy sees it.
    """

    def __init__(
        self,
        registry: IServiceRegistry,
        hostTiers: HostTiers,
        balancer: Balancer,
        globalHooks: Sequence[HookSpec] = (),
    ) -> None:
        super().__init__()
        self._registry = registry
        self._hostTiers = hostTiers
        self._balancer = balancer
        self._globalHooks = tuple(globalHooks)

    def render_GET(self, request: Request) -> bytes:
        return _json(request, 200, self.document())

    def document(self) -> dict[str, Any]:
        """
        The route table as JSON-able data.
        """
        tiers = self._hostTiers.tiers()
        hostsByTier: dict[str, list[str]] = {}
        for host, tier in self._hostTiers.mapping.items():
            hostsByTier.setdefault(tier, []).append(host)
        services = []
        for name, entry in sorted(self._registry.services().items()):
            parsed = parseServiceName(name)
            routable = parsed is not None and parsed[0] in tiers and entry.policy.expose
            usable = set(eligible(entry.endpoints))
            endpoints = []
            for state in self._balancer.states(entry.endpoints):
                description = state.endpoint.asJSON()
                description["eligible"] = state.endpoint in usable
                description["outstanding"] = state.outstanding
                description["connect_failures"] = state.failures
                endpoints.append(description)
            if parsed is None or parsed[0] not in tiers:
                hosts: list[str] = []
            elif self._hostTiers.mapping:
                hosts = sorted(hostsByTier[parsed[0]])
            else:
                hosts = ["*"]
            services.append(
                {
                    "name": name,
                    "routable": routable,
                    "path": f"/{parsed[1]}/" if parsed else None,
                    "hosts": hosts,
                    "policy": entry.policy.asJSON(),
                    "endpoints": endpoints,
                    "source": dict(entry.source),
                }
            )
        return {
            "registry": dict(self._registry.describe()),
            "global_hooks": [spec.asJSON() for spec in self._globalHooks],
            "tiers": sorted(tiers),
            "services": services,
        }


class AdminRoot(Resource):
    """
    The admin site's root.
    """

    def getChild(self, path: bytes, request: Request) -> IResource:
        return pages.notFound()


def adminSite(
    readiness: Callable[[], tuple[bool, str]],
    metrics: Metrics,
    registry: IServiceRegistry,
    hostTiers: HostTiers,
    balancer: Balancer,
    reactor: Any,
    globalHooks: Sequence[HookSpec] = (),
) -> Site:
    """
    Build the admin site.
    """
    root = AdminRoot()
    root.putChild(b"healthz", Health())
    root.putChild(b"readyz", Ready(readiness))
    root.putChild(b"metrics", PrometheusMetrics(metrics))
    root.putChild(b"routes", Routes(registry, hostTiers, balancer, globalHooks))
    site = Site(root, reactor=reactor)
    site.displayTracebacks = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return site
