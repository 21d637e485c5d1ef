"""
Prometheus metrics, on a registry of monedge's own (so that several proxies
in one test process do not collide).

Label children are looked up once per service and cached on the route, not
per request.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from monedge.record import MONEDGE, RequestRecord
from monedge.rules.grpc import STATUS_NAMES

if TYPE_CHECKING:
    from monedge.interfaces import IServiceRegistry

#: Latency buckets, in seconds, from 1 ms to a minute.
BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
)

#: The service label for requests that reached no service.
NO_SERVICE = "-"


class _RegistryCollector(Collector):
    """
    Registry size and reloads, read from the registry at scrape time.
    """

    def __init__(self, registry: IServiceRegistry, clock: Callable[[], float]) -> None:
        self._registry = registry
        self._clock = clock

    def collect(self) -> Iterator[Metric]:
        size = GaugeMetricFamily(
            "monedge_registry_services", "Services in the registry."
        )
        size.add_metric([], len(self._registry.services()))
        yield size
        reloads = CounterMetricFamily(
            "monedge_registry_reloads",
            "Registry (re)loads, by result.",
            labels=["result"],
        )
        reloads.add_metric(["ok"], self._registry.reloadsSucceeded)
        reloads.add_metric(["failed"], self._registry.reloadsFailed)
        yield reloads
        invalid = CounterMetricFamily(
            "monedge_registry_invalid_config",
            "Invalid per-service settings replaced by defaults.",
        )
        invalid.add_metric([], self._registry.invalidConfig)
        yield invalid
        age = GaugeMetricFamily(
            "monedge_registry_last_sync_age_seconds",
            "Seconds since the registry last heard from its source (-1: never).",
        )
        lastSync = self._registry.lastSync
        age.add_metric([], -1.0 if lastSync is None else self._clock() - lastSync)
        yield age


class _Histogram:
    """
    One histogram's counts, kept as plain numbers.

    @ivar buckets: observations per bucket (not cumulative), the last for
        those above every bound.
    """

    __slots__ = ("buckets", "total", "since")

    def __init__(self) -> None:
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.since = time.time()

    def observe(self, seconds: float) -> None:
        # A bucket counts what is at most its bound: the first bound not
        # below the value.
        self.buckets[bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds


class ServiceMetrics:
    """
    One service's request counts, latency histograms and requests in
    flight, kept as plain numbers and exported by L{_RequestCollector}:
    counting a request is a few additions, with none of the locks and
    per-bucket loops of C{prometheus_client}'s own metrics (monedge counts
    from the reactor thread alone).

    @ivar classes: requests answered, by status class (2 for 2xx, ...) and
        origin (L{monedge.record.UPSTREAM} when the upstream sent the status, L{monedge.record.MONEDGE}
        when monedge or a hook chose it).
    @ivar created: when each of those was first counted.
    @ivar latency: time from the request's arrival to its last byte.
    @ivar upstream: time from sending the request upstream to the
        response's head.
    @ivar inFlight: requests received and not yet answered.
    """

    __slots__ = (
        "_metrics",
        "_service",
        "classes",
        "created",
        "latency",
        "upstream",
        "inFlight",
    )

    def __init__(self, metrics: Metrics, service: str) -> None:
        self._metrics = metrics
        self._service = service
        self.classes: dict[tuple[int, str], int] = {}
        self.created: dict[tuple[int, str], float] = {}
        self.latency = _Histogram()
        self.upstream = _Histogram()
        self.inFlight = 0

    def count(self, record: RequestRecord) -> None:
        """
        Count one finished request from its record (L{monedge.record}): its
        status class and origin, its total latency, and how long the
        upstream took to answer, if it did.
        """
        key = (record.status // 100, record.origin)
        classes = self.classes
        counted = classes.get(key)
        if counted is None:
            self.created[key] = time.time()
            counted = 0
        classes[key] = counted + 1
        total = record.totalLatency
        self.latency.observe(0.0 if total is None else total)
        upstreamSeconds = record.upstreamLatency
        if upstreamSeconds is not None:
            self.upstream.observe(upstreamSeconds)
        grpc = record.grpcStatus
        if grpc is not None:
            name = STATUS_NAMES.get(grpc, "UNKNOWN")
            self._metrics.grpcCalls.labels(self._service, name, record.origin).inc()
            if record.origin == MONEDGE:
                self._metrics.grpcRefusals.labels(self._service, name).inc()

    def observe(
        self,
        status: int,
        seconds: float,
        origin: str = MONEDGE,
        upstreamSeconds: float | None = None,
    ) -> None:
        """
        Count one finished request from its figures alone, as L{count}
        counts its record: C{origin} says who chose C{status}, and
        C{upstreamSeconds} how long the upstream took to answer, if it did.
        """
        record = RequestRecord(0.0)
        record.upstreamLatency = upstreamSeconds
        record.finished(status, seconds)
        record.origin = origin
        self.count(record)

    def upstreamError(self, kind: str) -> None:
        """
        Count an upstream failure of C{kind}.
        """
        self._metrics.upstreamErrors.labels(self._service, kind).inc()

    def tunnelOpened(self) -> None:
        """
        Count an upgraded connection that became a tunnel.
        """
        self._metrics.tunnelsOpened.labels(self._service).inc()


#: The C{le} label of each latency bucket, as C{prometheus_client} writes it.
_BOUNDS = [floatToGoString(bound) for bound in BUCKETS] + ["+Inf"]

_REQUESTS_HELP = (
    "Requests answered, by service, status class and origin (upstream: the"
    " upstream sent the status; monedge: monedge or a hook chose it)."
)
_LATENCY_HELP = "Time from the request's arrival to its last byte, by service."
_UPSTREAM_HELP = (
    "Time from sending a request upstream to the response's head, by service."
)
_IN_FLIGHT_HELP = "Requests received and not yet answered, by service."


def _histogram(
    name: str, help: str, services: list[tuple[str, ServiceMetrics]], which: str
) -> Metric:
    """
    One histogram family of every service, as C{prometheus_client}'s
    C{Histogram} writes it.
    """
    family = Metric(name, help, "histogram")
    for service, children in services:
        histogram: _Histogram = getattr(children, which)
        cumulative = 0
        for bound, inBucket in zip(_BOUNDS, list(histogram.buckets), strict=True):
            cumulative += inBucket
            family.add_sample(
                f"{name}_bucket", {"service": service, "le": bound}, float(cumulative)
            )
        family.add_sample(f"{name}_count", {"service": service}, float(cumulative))
        family.add_sample(f"{name}_sum", {"service": service}, histogram.total)
        family.add_sample(f"{name}_created", {"service": service}, histogram.since)
    return family


class _RequestCollector(Collector):
    """
    Exports every service's L{ServiceMetrics}: the counter
    C{monedge_requests}, the histograms C{monedge_request_duration_seconds}
    and C{monedge_upstream_response_seconds}, sample for sample as
    C{prometheus_client}'s C{Counter} and C{Histogram} would, and the gauge
    C{monedge_requests_in_flight}.
    """

    def __init__(self, services: dict[str, ServiceMetrics]) -> None:
        self._services = services

    def describe(self) -> Iterator[Metric]:
        yield Metric("monedge_requests", _REQUESTS_HELP, "counter")
        yield Metric("monedge_request_duration_seconds", _LATENCY_HELP, "histogram")
        yield Metric("monedge_upstream_response_seconds", _UPSTREAM_HELP, "histogram")
        yield Metric("monedge_requests_in_flight", _IN_FLIGHT_HELP, "gauge")

    def collect(self) -> Iterator[Metric]:
        services = list(self._services.items())
        requests = Metric("monedge_requests", _REQUESTS_HELP, "counter")
        for service, children in services:
            for (statusClass, origin), counted in list(children.classes.items()):
                labels = {
                    "service": service,
                    "code_class": f"{statusClass}xx",
                    "origin": origin,
                }
                requests.add_sample("monedge_requests_total", labels, float(counted))
                requests.add_sample(
                    "monedge_requests_created",
                    labels,
                    children.created[(statusClass, origin)],
                )
        yield requests
        yield _histogram(
            "monedge_request_duration_seconds", _LATENCY_HELP, services, "latency"
        )
        yield _histogram(
            "monedge_upstream_response_seconds", _UPSTREAM_HELP, services, "upstream"
        )
        inFlight = Metric("monedge_requests_in_flight", _IN_FLIGHT_HELP, "gauge")
        for service, children in services:
            inFlight.add_sample(
                "monedge_requests_in_flight",
                {"service": service},
                float(children.inFlight),
            )
        yield inFlight


class _ConnectionCollector(Collector):
    """
    Open client connections, by listener and protocol, read from the
    listeners at scrape time.
    """

    def __init__(self) -> None:
        self.listeners: list[Any] = []

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "monedge_client_connections",
            "Client connections open now, by listener and protocol"
            " (http/1.1, h2, websocket).",
            labels=["listener", "protocol"],
        )
        for listener in self.listeners:
            counts = {protocol: 0 for protocol in PROTOCOLS}
            for protocol in listener.protocols():
                counts[protocol] = counts.get(protocol, 0) + 1
            for protocol, count in counts.items():
                family.add_metric([listener.name, protocol], count)
        yield family


#: The protocols a client connection is counted under.
PROTOCOLS = ("http/1.1", "h2", "websocket")


class _BuildCollector(Collector):
    """
    C{monedge_build_info}: 1, labelled with the versions running.
    """

    def collect(self) -> Iterator[Metric]:
        import platform

        import twisted
        from monedge import __version__

        info = GaugeMetricFamily(
            "monedge_build_info",
            "Always 1: the monedge, Python and Twisted versions running.",
            labels=["version", "python", "twisted"],
        )
        info.add_metric(
            [__version__, platform.python_version(), twisted.__version__], 1
        )
        yield info


class Metrics:
    """
    Every metric monedge exports.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._services: dict[str, ServiceMetrics] = {}
        self.registry.register(_RequestCollector(self._services))
        self._connections = _ConnectionCollector()
        self.registry.register(self._connections)
        self.registry.register(_BuildCollector())
        ProcessCollector(registry=self.registry)
        self.upstreamErrors = Counter(
            "monedge_upstream_errors",
            "Upstream failures, by service and kind.",
            ["service", "kind"],
            registry=self.registry,
        )
        self.hookDecisions = Counter(
            "monedge_hook_decisions",
            "Hook runs, by hook and decision (pass, respond, error).",
            ["hook", "decision"],
            registry=self.registry,
        )
        self.hookDuration = Histogram(
            "monedge_hook_duration_seconds",
            "Time each hook took, by hook.",
            ["hook"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.connectionsRefused = Counter(
            "monedge_connections_refused",
            "Client connections refused because their listener had too many.",
            registry=self.registry,
        )
        self.grpcCalls = Counter(
            "monedge_grpc_calls",
            "gRPC calls ended with a grpc-status, by service, status name and"
            " origin (upstream or monedge).",
            ["service", "grpc_status", "origin"],
            registry=self.registry,
        )
        self.grpcRefusals = Counter(
            "monedge_grpc_refusals",
            "gRPC calls monedge refused itself, by service and grpc-status"
            " name (docs/errors.md).",
            ["service", "grpc_status"],
            registry=self.registry,
        )
        self.tunnelsOpen = Gauge(
            "monedge_tunnels_open",
            "Upgraded (WebSocket) connections open now.",
            registry=self.registry,
        )
        self.tunnelsOpened = Counter(
            "monedge_tunnels_opened",
            "Upgraded (WebSocket) connections opened, by service.",
            ["service"],
            registry=self.registry,
        )

    def observeHook(self, hook: str, decision: str, seconds: float) -> None:
        """
        Count one hook run.
        """
        self.hookDecisions.labels(hook, decision).inc()
        self.hookDuration.labels(hook).observe(seconds)

    def forService(self, service: str) -> ServiceMetrics:
        """
        The cached metric children for C{service}.
        """
        children = self._services.get(service)
        if children is None:
            children = self._services[service] = ServiceMetrics(self, service)
        return children

    def watchListener(self, listener: Any) -> None:
        """
        Export C{listener}'s open connections by protocol: it has a C{name}
        and C{protocols()}, the protocol of each open connection (a
        L{monedge.edge.server.ListenerFactory}).
        """
        self._connections.listeners.append(listener)

    def watchRegistry(
        self, registry: IServiceRegistry, clock: Callable[[], float] | None = None
    ) -> None:
        """
        Export C{registry}'s size, reload counts and sync age (measured with
        C{clock}, by default the wall clock, as the reactor's is).
        """
        self.registry.register(_RegistryCollector(registry, clock or time.time))


#: Gauges that describe shared state rather than a share of the work: a
#: group reports the largest worker's value instead of the sum.
GROUP_MAX_GAUGES = frozenset(
    {
        "monedge_registry_services",
        "monedge_registry_last_sync_age_seconds",
        "monedge_build_info",
        "process_start_time_seconds",
        "process_max_fds",
    }
)


def mergeExpositions(texts: Sequence[str]) -> list[Metric]:
    """
    Merge several processes' Prometheus text expositions into one group's.

    Counters, histograms and gauges are summed per label set, except the
    gauges in L{GROUP_MAX_GAUGES} (the largest value wins) and C{_created}
    timestamps (the earliest wins).
    """
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
                values[family.name] = {}
            samples = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                previous = samples.get(key)
                if previous is None:
                    samples[key] = sample.value
                elif sample.name.endswith("_created"):
                    samples[key] = min(previous, sample.value)
                elif family.name in GROUP_MAX_GAUGES:
                    samples[key] = max(previous, sample.value)
                else:
                    samples[key] = previous + sample.value
    for name, merged in families.items():
        for (sampleName, labels), value in values[name].items():
            merged.add_sample(sampleName, dict(labels), value)
    return list(families.values())


class StaticCollector(Collector):
    """
    Yields metric families built elsewhere (a group's merged metrics).
    """

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        yield from self._families
