"""
monedge's request metrics (L{monedge.observe.metrics.ServiceMetrics}) export the
same samples as C{prometheus_client}'s own C{Counter} and C{Histogram}
would for the same observations.
"""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from monedge.observe.metrics import BUCKETS, SERVICE_BUCKETS, Metrics
from monedge.record import RequestRecord

#: (service, status, seconds, origin, upstream seconds): on and around
#: bucket bounds, above the last, several status classes, both origins and
#: several services.
OBSERVATIONS = [
    ("service.api.a", 200, 0.0, "upstream", 0.0),
    ("service.api.a", 200, 0.001, "upstream", 0.0009),
    ("service.api.a", 204, 0.0010001, "upstream", 0.001),
    ("service.api.a", 404, 0.0025, "upstream", 0.002),
    ("service.api.a", 404, 0.0025, "monedge", None),
    ("service.api.a", 502, 2.5, "monedge", None),
    ("service.api.a", 200, 61.0, "upstream", 60.5),
    ("service.api.b", 101, 0.3, "upstream", 0.01),
    ("service.api.b", 499, 0.04, "monedge", 0.03),
    ("-", 400, 0.0, "monedge", None),
]

_FAMILIES = {
    "monedge_requests",
    "monedge_request_duration_seconds",
    "monedge_upstream_response_seconds",
}


#: The families hooks' runs are counted in.
_HOOK_FAMILIES = {"monedge_hook_decisions", "monedge_hook_duration_seconds"}


def _samples(
    text: str, families: set[str] = _FAMILIES
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of C{families} (the request families) in an exposition,
    by name and labels, but C{_created} timestamps (monedge exports none).
    """
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name not in families:
            continue
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                key = (sample.name, tuple(sorted(sample.labels.items())))
                found[key] = sample.value
    return found


class RequestMetricsTests(SynchronousTestCase):
    """
    The exposition of monedge's request counter and latency histogram.
    """

    def test_sameAsPrometheusClient(self) -> None:
        """
        The same observations give the same sample names, labels and
        values (and the same HELP and TYPE lines) as
        C{prometheus_client}'s C{Counter} and C{Histogram} with the
        per-service buckets, but no C{_created} samples; the admin site's
        exposition has the same lines as C{generate_latest}.
        """
        reference = CollectorRegistry()
        requests = Counter(
            "monedge_requests",
            "Requests answered, by service, status class and origin (upstream: the"
            " upstream sent the status; monedge: monedge or a hook chose it).",
            ["service", "code_class", "origin"],
            registry=reference,
        )
        latency = Histogram(
            "monedge_request_duration_seconds",
            "Time from the request's arrival to its last byte, by service.",
            ["service"],
            buckets=SERVICE_BUCKETS,
            registry=reference,
        )
        upstream = Histogram(
            "monedge_upstream_response_seconds",
            "Time from sending a request upstream to the response's head, by service.",
            ["service"],
            buckets=SERVICE_BUCKETS,
            registry=reference,
        )
        metrics = Metrics()
        for service, status, seconds, origin, upstreamSeconds in OBSERVATIONS:
            requests.labels(service, f"{status // 100}xx", origin).inc()
            latency.labels(service).observe(seconds)
            children = upstream.labels(service)
            if upstreamSeconds is not None:
                children.observe(upstreamSeconds)
            metrics.forService(service).observe(
                status, seconds, origin, upstreamSeconds
            )
        # A service routed to but not answered yet has empty histograms, as
        # Histogram children made when its route was.
        metrics.forService("service.api.idle")
        latency.labels("service.api.idle")
        upstream.labels("service.api.idle")
        expected = generate_latest(reference).decode()
        actual = b"".join(metrics.exposition(batch=2)).decode()
        self.assertEqual(_samples(actual), _samples(expected))
        self.assertEqual(_samples(generate_latest(metrics.registry).decode()),
                         _samples(expected))  # fmt: skip
        self.assertGreater(len(_samples(expected)), 90)
        comments = [
            line
            for line in expected.splitlines()
            if line.startswith("#") and "_created" not in line
        ]
        for line in comments:
            self.assertIn(line, actual)
        self.assertNotIn("_created", actual)

    def test_hooksSameAsPrometheusClient(self) -> None:
        """
        Hook runs, counted as plain numbers, give the same samples and the
        same HELP and TYPE lines as C{prometheus_client}'s labelled
        C{Counter} and C{Histogram} (with L{BUCKETS}) given the same runs,
        and no C{_created} samples.
        """
        reference = CollectorRegistry()
        decisions = Counter(
            "monedge_hook_decisions",
            "Hook runs, by hook and decision (pass, respond, error).",
            ["hook", "decision"],
            registry=reference,
        )
        durations = Histogram(
            "monedge_hook_duration_seconds",
            "Time each hook took, by hook.",
            ["hook"],
            buckets=BUCKETS,
            registry=reference,
        )
        metrics = Metrics()
        runs = [
            ("auth", "pass", 0.003),
            ("auth", "pass", 0.0025),
            ("auth", "respond", 0.2),
            ("auth", "error", 61.0),
            ("headers", "pass", 0.0),
        ]
        for hook, decision, seconds in runs:
            decisions.labels(hook, decision).inc()
            durations.labels(hook).observe(seconds)
            metrics.observeHook(hook, decision, seconds)
        expected = generate_latest(reference).decode()
        actual = b"".join(metrics.exposition()).decode()
        hooks = _samples(actual, _HOOK_FAMILIES)
        self.assertEqual(hooks, _samples(expected, _HOOK_FAMILIES))
        # Four (hook, decision) pairs; two hooks' buckets, count and sum.
        self.assertEqual(len(hooks), 4 + 2 * (len(BUCKETS) + 3))
        for line in expected.splitlines():
            if line.startswith("#") and "_created" not in line:
                self.assertIn(line, actual)
        self.assertNotIn("_created", actual)

    def test_countReadsTheRecord(self) -> None:
        """
        A finished request is counted from its record alone: its status
        class and origin, its total latency, and the upstream's latency
        when the upstream answered.
        """
        record = RequestRecord(10.0)
        record.upstreamSent("10.0.0.1:80", 10.01)
        record.upstreamAnswered(10.03)
        record.finished(204, 10.05, 204)
        children = Metrics().forService("service.api.a")
        children.count(record)
        self.assertEqual(children.classes, {(2, "upstream"): 1})
        self.assertEqual(children.latency.total, record.totalLatency)
        self.assertEqual(children.upstream.total, record.upstreamLatency)
        refused = RequestRecord(None)
        refused.failed("uri_too_long")
        refused.finished(414, 11.0)
        children.count(refused)
        self.assertEqual(children.classes[(4, "monedge")], 1)
        self.assertEqual(children.upstream.total, record.upstreamLatency)

    def test_expositionIsGenerateLatest(self) -> None:
        """
        The admin site's exposition, written in small steps, is byte for
        byte what C{prometheus_client}'s C{generate_latest} writes for the
        same families without their C{_created} samples: every family
        once, its samples together, label values escaped.
        """
        metrics = Metrics()
        for service, status, seconds, origin, upstreamSeconds in OBSERVATIONS:
            metrics.forService(service).observe(
                status, seconds, origin, upstreamSeconds
            )
        odd = metrics.forService('service.api.we"ird\\name\n')
        odd.upstreamError("reset")
        odd.tunnelOpened()
        metrics.forService("service.api.a").upstreamError("timeout")
        metrics.observeHook("auth", "pass", 0.003)
        metrics.connectionsRefused.inc()
        steps = list(metrics.exposition(batch=1))
        self.assertGreater(len(steps), 20)
        actual = b"".join(steps).decode()
        created = re.compile(r"^# (HELP|TYPE) \w+_created |^\w+_created[{ ]")
        expected = "".join(
            line
            for line in generate_latest(metrics.registry)
            .decode()
            .splitlines(keepends=True)
            if not created.match(line)
        )

        def steady(text: str) -> list[str]:
            return [line for line in text.splitlines() if "process_" not in line]

        self.assertEqual(steady(actual), steady(expected))
        names = [family.name for family in text_string_to_metric_families(actual)]
        self.assertEqual(len(names), len(set(names)))
        self.assertIn(
            'monedge_upstream_errors_total{kind="reset",'
            'service="service.api.we\\"ird\\\\name\\n"} 1.0',
            actual,
        )


class OperatorMetricsTests(SynchronousTestCase):
    """
    The metrics an operator needs beyond request counts: in flight by
    service, connections by listener and protocol, build info and the
    process collector.
    """

    def exposition(
        self, metrics: Metrics
    ) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(
                generate_latest(metrics.registry).decode()
            )
            for sample in family.samples
        }

    def test_inFlightByService(self) -> None:
        """
        Each service's requests in flight are its own gauge sample.
        """
        metrics = Metrics()
        metrics.forService("service.api.a").inFlight = 3
        metrics.forService("-").inFlight = 1
        samples = self.exposition(metrics)
        name = "monedge_requests_in_flight"
        self.assertEqual(samples[(name, (("service", "service.api.a"),))], 3.0)
        self.assertEqual(samples[(name, (("service", "-"),))], 1.0)

    def test_connectionsByListenerAndProtocol(self) -> None:
        """
        Every watched listener shows every protocol, counted from the
        connections it has open at scrape time.
        """

        class Listener:
            def __init__(self, name: str, protocols: list[str]) -> None:
                self.name = name
                self.open = protocols

            def protocols(self) -> list[str]:
                return list(self.open)

        metrics = Metrics()
        plain = Listener("tcp:30080", ["http/1.1", "http/1.1", "websocket"])
        tls = Listener("tcp:30443", ["h2"])
        metrics.watchListener(plain)
        metrics.watchListener(tls)
        samples = self.exposition(metrics)

        def count(listener: str, protocol: str) -> float:
            labels = (("listener", listener), ("protocol", protocol))
            return samples[("monedge_client_connections", labels)]

        self.assertEqual(count("tcp:30080", "http/1.1"), 2.0)
        self.assertEqual(count("tcp:30080", "websocket"), 1.0)
        self.assertEqual(count("tcp:30080", "h2"), 0.0)
        self.assertEqual(count("tcp:30443", "h2"), 1.0)
        plain.open = []
        self.assertEqual(
            self.exposition(metrics)[
                ("monedge_client_connections",
                 (("listener", "tcp:30080"), ("protocol", "http/1.1")))
            ],
            0.0,
        )  # fmt: skip

    def test_buildAndProcess(self) -> None:
        """
        Build info is 1 with monedge's version; the process collector's
        samples are there.
        """
        import monedge

        samples = self.exposition(Metrics())
        [(labels, value)] = [
            (dict(labels), value)
            for (name, labels), value in samples.items()
            if name == "monedge_build_info"
        ]
        self.assertEqual(value, 1.0)
        self.assertEqual(labels["version"], monedge.__version__)
        self.assertGreater(samples[("process_resident_memory_bytes", ())], 0)
        self.assertGreater(samples[("process_start_time_seconds", ())], 0)


class RegisteredCollectorTests(SynchronousTestCase):
    """
    Collectors a hook registers on C{Metrics.registry} are exported by the
    admin site's exposition, after monedge's own, until unregistered.
    """

    def test_hookCollectorExported(self) -> None:
        """
        A counter registered after monedge's is on the page, with no
        C{_created} sample; once unregistered it is gone.
        """
        metrics = Metrics()
        counter = Counter(
            "plugin_things", "Things a plugin counted.", registry=metrics.registry
        )
        counter.inc(3)
        body = b"".join(metrics.exposition()).decode()
        self.assertIn("plugin_things_total 3.0\n", body)
        self.assertNotIn("plugin_things_created", body)
        self.assertLess(body.index("monedge_requests"), body.index("plugin_things"))
        metrics.registry.unregister(counter)
        self.assertNotIn("plugin_things", b"".join(metrics.exposition()).decode())
