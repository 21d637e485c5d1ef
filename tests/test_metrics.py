"""
monedge's request metrics (L{monedge.metrics.ServiceMetrics}) export the
same samples as C{prometheus_client}'s own C{Counter} and C{Histogram}
would for the same observations.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from monedge.metrics import BUCKETS, Metrics

#: (service, status, seconds): on and around bucket bounds, above the last,
#: several status classes and services.
OBSERVATIONS = [
    ("service.api.a", 200, 0.0),
    ("service.api.a", 200, 0.001),
    ("service.api.a", 204, 0.0010001),
    ("service.api.a", 404, 0.0025),
    ("service.api.a", 502, 2.5),
    ("service.api.a", 200, 61.0),
    ("service.api.b", 101, 0.3),
    ("service.api.b", 499, 0.04),
    ("-", 400, 0.0),
]

_FAMILIES = {"monedge_requests", "monedge_request_duration_seconds"}


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of the request families in an exposition, by name and
    labels; C{_created} timestamps as 0 (they are times, not counts).
    """
    found = {}
    for family in text_string_to_metric_families(text):
        if family.name not in _FAMILIES:
            continue
        for sample in family.samples:
            value = 0.0 if sample.name.endswith("_created") else sample.value
            found[(sample.name, tuple(sorted(sample.labels.items())))] = value
    return found


class RequestMetricsTests(SynchronousTestCase):
    """
    The exposition of monedge's request counter and latency histogram.
    """

    def test_sameAsPrometheusClient(self) -> None:
        """
        The same observations give the same sample names, labels and
        values (and the same HELP and TYPE lines) as
        C{prometheus_client}'s C{Counter} and C{Histogram}, a C{_created}
        sample included for every child.
        """
        reference = CollectorRegistry()
        requests = Counter(
            "monedge_requests",
            "Requests answered, by service and status class.",
            ["service", "code_class"],
            registry=reference,
        )
        latency = Histogram(
            "monedge_request_duration_seconds",
            "Time from the request's arrival to its last byte, by service.",
            ["service"],
            buckets=BUCKETS,
            registry=reference,
        )
        metrics = Metrics()
        for service, status, seconds in OBSERVATIONS:
            requests.labels(service, f"{status // 100}xx").inc()
            latency.labels(service).observe(seconds)
            metrics.forService(service).observe(status, seconds)
        # A service routed to but not answered yet has an empty histogram,
        # as a Histogram child made when its route was.
        metrics.forService("service.api.idle")
        latency.labels("service.api.idle")
        expected = generate_latest(reference).decode()
        actual = generate_latest(metrics.registry).decode()
        self.assertEqual(_samples(actual), _samples(expected))
        self.assertGreater(len(_samples(expected)), 60)
        comments = [line for line in expected.splitlines() if line.startswith("#")]
        for line in comments:
            self.assertIn(line, actual)

    def test_createdIsWhenFirstCounted(self) -> None:
        """
        A status class's C{_created} is the time it was first counted, and
        a service's histogram's the time its metrics were made.
        """
        metrics = Metrics()
        children = metrics.forService("service.api.a")
        children.observe(200, 0.01)
        created = children.created[2]
        children.observe(200, 0.01)
        self.assertEqual(children.created[2], created)
        families = {f.name: f for f in metrics.registry.collect()}
        [total] = [
            s
            for s in families["monedge_requests"].samples
            if s.name == "monedge_requests_created"
        ]
        self.assertEqual(total.value, created)
        [since] = [
            s
            for s in families["monedge_request_duration_seconds"].samples
            if s.name.endswith("_created")
        ]
        self.assertEqual(since.value, children.since)
