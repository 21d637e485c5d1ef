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
from typing import TYPE_CHECKING, Any, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
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

#: Reactor lag buckets, in seconds, from 1 ms to 5 s: finer from 10 to
#: 50 ms, where a stall starts to show in a request's latency.  With
#: timers 10 ms apart, a lag of at most 40 ms means no stall over 50 ms.
LAG_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.03,
    0.04,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
)

#: Per-service latency buckets, in seconds, from 5 ms to 10 s: those of
#: ingress-nginx's request and upstream histograms. Every service carries
#: two histograms, so each bound costs two series a service; hooks, few,
#: keep L{BUCKETS}.
SERVICE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)

_C = TypeVar("_C", bound="Collector")

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

    __slots__ = ("bounds", "buckets", "total")

    def __init__(self, bounds: Sequence[float] = SERVICE_BUCKETS) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, seconds: float) -> None:
        # A bucket counts what is at most its bound: the first bound not
        # below the value.
        self.buckets[bisect_left(self.bounds, seconds)] += 1
        self.total += seconds


_HOOK_DECISIONS_HELP = "Hook runs, by hook and decision (pass, respond, error)."
_HOOK_DURATION_HELP = "Time each hook took, by hook."


class _HookCollector(Collector):
    """
    Exports each hook's decisions and durations, kept as plain numbers by
    L{Metrics.observeHook}: counting a hook run is two additions and a
    bisection, where C{prometheus_client}'s labelled children took a lock
    and a lookup for each of its two metrics (3.3 microseconds a run).
    """

    def __init__(
        self, decisions: dict[tuple[str, str], int], durations: dict[str, _Histogram]
    ) -> None:
        self._decisions = decisions
        self._durations = durations

    def describe(self) -> Iterator[Metric]:
        yield Metric("monedge_hook_decisions", _HOOK_DECISIONS_HELP, "counter")
        yield Metric("monedge_hook_duration_seconds", _HOOK_DURATION_HELP, "histogram")

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "monedge_hook_decisions",
            _HOOK_DECISIONS_HELP,
            labels=["hook", "decision"],
        )
        for (hook, decision), count in list(self._decisions.items()):
            decisions.add_metric([hook, decision], count)
        yield decisions
        durations = HistogramMetricFamily(
            "monedge_hook_duration_seconds",
            _HOOK_DURATION_HELP,
            labels=["hook"],
        )
        for hook, histogram in list(self._durations.items()):
            cumulative, buckets = 0, []
            for bound, inBucket in zip(_HOOK_BOUNDS, histogram.buckets, strict=True):
                cumulative += inBucket
                buckets.append((bound, cumulative))
            durations.add_metric([hook], buckets, histogram.total)
        yield durations


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
    @ivar latency: time from the request's arrival to its last byte.
    @ivar upstream: time from sending the request upstream to the
        response's head.
    @ivar inFlight: requests received and not yet answered.
    @ivar errors: upstream failures, by kind.
    @ivar tunnels: upgraded connections opened.
    @ivar label: the C{service} label, as the exposition writes it.
    """

    __slots__ = (
        "_metrics",
        "_service",
        "classes",
        "latency",
        "upstream",
        "inFlight",
        "errors",
        "tunnels",
        "label",
    )

    def __init__(self, metrics: Metrics, service: str) -> None:
        self._metrics = metrics
        self._service = service
        self.classes: dict[tuple[int, str], int] = {}
        self.latency = _Histogram()
        self.upstream = _Histogram()
        self.inFlight = 0
        self.errors: dict[str, int] = {}
        self.tunnels = 0
        self.label = f'service="{_escapeLabel(service)}"'

    def count(self, record: RequestRecord) -> None:
        """
        Count one finished request from its record (L{monedge.record}): its
        status class and origin, its total latency, and how long the
        upstream took to answer, if it did.
        """
        key = (record.status // 100, record.origin)
        classes = self.classes
        classes[key] = classes.get(key, 0) + 1
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
        errors = self.errors
        errors[kind] = errors.get(kind, 0) + 1

    def tunnelOpened(self) -> None:
        """
        Count an upgraded connection that became a tunnel.
        """
        self.tunnels += 1


#: The C{le} label of each per-service bucket, as C{prometheus_client} writes it.
_BOUNDS = [floatToGoString(bound) for bound in SERVICE_BUCKETS] + ["+Inf"]

#: The C{le} label of each hook duration bucket.
_HOOK_BOUNDS = [floatToGoString(bound) for bound in BUCKETS] + ["+Inf"]

_REQUESTS_HELP = (
    "Requests answered, by service, status class and origin (upstream: the"
    " upstream sent the status; monedge: monedge or a hook chose it)."
)
_LATENCY_HELP = "Time from the request's arrival to its last byte, by service."
_UPSTREAM_HELP = (
    "Time from sending a request upstream to the response's head, by service."
)
_IN_FLIGHT_HELP = "Requests received and not yet answered, by service."
_ERRORS_HELP = "Upstream failures, by service and kind."
_TUNNELS_HELP = "Upgraded (WebSocket) connections opened, by service."


def _escapeLabel(value: str) -> str:
    """
    C{value} as a label value of the text format: backslash, double quote
    and newline escaped.
    """
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    """
    C{value} as C{prometheus_client} writes a sample's value, quickly for
    the common case of a count.
    """
    if type(value) is int and 0 <= value < 1_000_000:
        return f"{value}.0"
    return str(floatToGoString(value))


#: One service's numbers at one moment, copied so that the exposition can be
#: written over several reactor turns while requests go on being counted:
#: its label, status classes, latency buckets and sum, upstream buckets and
#: sum, requests in flight, upstream errors and tunnels opened. A tuple of
#: tuples, numbers and strings, which the garbage collector stops tracking
#: at its first pass, so that a large exposition does not bring a full
#: collection on.
_Snapshot = tuple[
    str,
    tuple[tuple[tuple[int, str], int], ...],
    tuple[int, ...],
    float,
    tuple[int, ...],
    float,
    int,
    tuple[tuple[str, int], ...],
    int,
]


def _snapshot(children: ServiceMetrics) -> _Snapshot:
    return (
        children.label,
        tuple(children.classes.items()),
        tuple(children.latency.buckets),
        children.latency.total,
        tuple(children.upstream.buckets),
        children.upstream.total,
        children.inFlight,
        tuple(children.errors.items()) if children.errors else (),
        children.tunnels,
    )


def _requestLines(snapshot: _Snapshot) -> str:
    label = snapshot[0]
    return "".join(
        [
            f'monedge_requests_total{{code_class="{statusClass}xx",'
            f'origin="{_escapeLabel(origin)}",{label}}} {_number(counted)}\n'
            for (statusClass, origin), counted in snapshot[1]
        ]
    )


def _histogramLines(
    name: str, label: str, buckets: tuple[int, ...], total: float
) -> list[str]:
    lines = []
    cumulative = 0
    for bound, inBucket in zip(_BOUNDS, buckets, strict=True):
        cumulative += inBucket
        lines.append(f'{name}_bucket{{le="{bound}",{label}}} {_number(cumulative)}\n')
    lines.append(f"{name}_count{{{label}}} {_number(cumulative)}\n")
    lines.append(f"{name}_sum{{{label}}} {floatToGoString(total)}\n")
    return lines


def _latencyLines(snapshot: _Snapshot) -> str:
    return "".join(
        _histogramLines(
            "monedge_request_duration_seconds",
            snapshot[0],
            snapshot[2],
            snapshot[3],
        )
    )


def _upstreamLines(snapshot: _Snapshot) -> str:
    return "".join(
        _histogramLines(
            "monedge_upstream_response_seconds",
            snapshot[0],
            snapshot[4],
            snapshot[5],
        )
    )


def _inFlightLines(snapshot: _Snapshot) -> str:
    return f"monedge_requests_in_flight{{{snapshot[0]}}} {_number(snapshot[6])}\n"


def _errorLines(snapshot: _Snapshot) -> str:
    label = snapshot[0]
    return "".join(
        [
            f'monedge_upstream_errors_total{{kind="{_escapeLabel(kind)}",{label}}}'
            f" {_number(counted)}\n"
            for kind, counted in snapshot[7]
        ]
    )


def _tunnelLines(snapshot: _Snapshot) -> str:
    if not snapshot[8]:
        return ""
    return f"monedge_tunnels_opened_total{{{snapshot[0]}}} {_number(snapshot[8])}\n"


#: The per-service families: name, help, type, and each service's lines.
_SERVICE_FAMILIES: tuple[tuple[str, str, str, Callable[[_Snapshot], str]], ...] = (
    ("monedge_requests", _REQUESTS_HELP, "counter", _requestLines),
    ("monedge_request_duration_seconds", _LATENCY_HELP, "histogram", _latencyLines),
    ("monedge_upstream_response_seconds", _UPSTREAM_HELP, "histogram", _upstreamLines),
    ("monedge_requests_in_flight", _IN_FLIGHT_HELP, "gauge", _inFlightLines),
    ("monedge_upstream_errors", _ERRORS_HELP, "counter", _errorLines),
    ("monedge_tunnels_opened", _TUNNELS_HELP, "counter", _tunnelLines),
)


def _header(name: str, help: str, kind: str) -> str:
    """
    A family's HELP and TYPE lines, as C{prometheus_client} writes them.
    """
    exposed = f"{name}_total" if kind == "counter" else name
    escaped = help.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {exposed} {escaped}\n# TYPE {exposed} {kind}\n"


def _parseLines(name: str, help: str, kind: str, lines: str) -> Metric:
    """
    A family of the per-service lines, for L{_RequestCollector.collect}.
    """
    [family] = text_string_to_metric_families(_header(name, help, kind) + lines)
    return family


class _RequestCollector(Collector):
    """
    Exports every service's L{ServiceMetrics} to C{prometheus_client}
    (tests, and a registry's C{generate_latest}): the counters
    C{monedge_requests}, C{monedge_upstream_errors} and
    C{monedge_tunnels_opened}, the histograms
    C{monedge_request_duration_seconds} and
    C{monedge_upstream_response_seconds}, and the gauge
    C{monedge_requests_in_flight}. The admin site writes the same lines
    directly, in slices: see L{Metrics.exposition}.
    """

    def __init__(self, services: dict[str, ServiceMetrics]) -> None:
        self._services = services

    def describe(self) -> Iterator[Metric]:
        for name, help, kind, _ in _SERVICE_FAMILIES:
            yield Metric(name, help, kind)

    def collect(self) -> Iterator[Metric]:
        snapshots = [_snapshot(children) for children in list(self._services.values())]
        for name, help, kind, lines in _SERVICE_FAMILIES:
            text = "".join([lines(snapshot) for snapshot in snapshots])
            if text:
                yield _parseLines(name, help, kind, text)
            else:
                yield Metric(name, help, kind)


class _WithoutCreated:
    """
    Some families, without C{prometheus_client}'s C{_created} samples.
    """

    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            created = family.name + "_created"
            copy.samples = [s for s in family.samples if s.name != created]
            yield copy


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


class _OrderedRegistry(CollectorRegistry):
    """
    A collector registry that remembers its collectors in the order they
    were registered, monedge's own and those hooks add (the ratelimit
    hook's, a plugin's), so that the admin site exports every one.
    """

    def __init__(self) -> None:
        super().__init__(auto_describe=True)
        self.collectors: list[Collector] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        self.collectors.append(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        self.collectors.remove(collector)


class Metrics:
    """
    Every metric monedge exports.

    @ivar registry: every collector, for C{prometheus_client}
        (C{generate_latest}); the admin site writes L{exposition} instead.
    """

    def __init__(self) -> None:
        self.registry = _OrderedRegistry()
        self._services: dict[str, ServiceMetrics] = {}
        self._requests = _RequestCollector(self._services)
        self.registry.register(self._requests)
        self._connections = self._register(_ConnectionCollector())
        self._register(_BuildCollector())
        self._register(ProcessCollector(registry=None))
        self._hookDecisions: dict[tuple[str, str], int] = {}
        self._hookDurations: dict[str, _Histogram] = {}
        self._register(_HookCollector(self._hookDecisions, self._hookDurations))
        self.connectionsRefused = self._register(
            Counter(
                "monedge_connections_refused",
                "Client connections refused because their listener had too many.",
                registry=None,
            )
        )
        self.grpcCalls = self._register(
            Counter(
                "monedge_grpc_calls",
                "gRPC calls ended with a grpc-status, by service, status name and"
                " origin (upstream or monedge).",
                ["service", "grpc_status", "origin"],
                registry=None,
            )
        )
        self.grpcRefusals = self._register(
            Counter(
                "monedge_grpc_refusals",
                "gRPC calls monedge refused itself, by service and grpc-status"
                " name (docs/errors.md).",
                ["service", "grpc_status"],
                registry=None,
            )
        )
        self.tunnelsOpen = self._register(
            Gauge(
                "monedge_tunnels_open",
                "Upgraded (WebSocket) connections open now.",
                registry=None,
            )
        )
        self.reactorLag = self._register(
            Histogram(
                "monedge_reactor_lag_seconds",
                "How late the reactor ran a timer set every 10 ms: how long"
                " any event waited for the reactor thread then.",
                buckets=LAG_BUCKETS,
                registry=None,
            )
        )

    def _register(self, collector: _C) -> _C:
        """
        Register C{collector}: it is exported after the per-service families.
        """
        self.registry.register(collector)
        return collector

    def exposition(self, batch: int = 100) -> Iterator[bytes]:
        """
        Every metric in the Prometheus text format (version 0.0.4), as
        chunks of bytes to write one after the other, with no C{_created}
        samples.

        Each step of the iterator does a bounded amount of work, so that a
        cooperator can spread a large exposition over many reactor turns:
        it copies or writes at most C{batch} services, or collects one of
        the other collectors (which export a few series each, or one a
        service for the few that failed or speak gRPC). A step that has
        nothing to write yet yields C{b""}.

        Each service's numbers are copied first, all of a service's at the
        same moment, so its series agree with each other (its requests
        counted with the histograms' counts) however long the rest takes.
        """
        services = list(self._services.values())
        yield b""
        snapshots: list[_Snapshot] = []
        for start in range(0, len(services), batch):
            snapshots.extend(
                [_snapshot(children) for children in services[start : start + batch]]
            )
            yield b""
        for name, help, kind, lines in _SERVICE_FAMILIES:
            header = _header(name, help, kind)
            for start in range(0, len(snapshots), batch):
                text = "".join(
                    [lines(snapshot) for snapshot in snapshots[start : start + batch]]
                )
                yield (header + text).encode("utf-8")
                header = ""
            if header:
                yield header.encode("utf-8")
        # Then every other collector, monedge's and those hooks registered,
        # in the order they came.
        for collector in list(self.registry.collectors):
            if collector is not self._requests:
                yield generate_latest(_WithoutCreated(list(collector.collect())))

    def observeHook(self, hook: str, decision: str, seconds: float) -> None:
        """
        Count one hook run.
        """
        key = (hook, decision)
        decisions = self._hookDecisions
        decisions[key] = decisions.get(key, 0) + 1
        durations = self._hookDurations.get(hook)
        if durations is None:
            durations = self._hookDurations[hook] = _Histogram(BUCKETS)
        durations.observe(seconds)

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
        self._register(_RegistryCollector(registry, clock or time.time))


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
