"""
The C{ratelimit} hooks' Prometheus metrics: one collector per registry
reads every hook's counters at scrape time, by policy name.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from monedge.builtin.ratelimit.hook import RateLimitHook


class RateLimitCollector(Collector):
    """
    Every ratelimit hook's counters, read at scrape time, by policy name.
    """

    def __init__(self) -> None:
        self.hooks: weakref.WeakSet[RateLimitHook] = weakref.WeakSet()

    def collect(self) -> Iterator[Metric]:
        decisions = CounterMetricFamily(
            "monedge_ratelimit_decisions",
            "Rate-limit decisions, by policy name and decision.",
            labels=["policy", "decision"],
        )
        errors = CounterMetricFamily(
            "monedge_ratelimit_redis_errors",
            "Requests decided without Redis because it failed, by policy.",
            labels=["policy"],
        )
        outages = CounterMetricFamily(
            "monedge_ratelimit_redis_outages",
            "Times Redis became unreachable, by policy.",
            labels=["policy"],
        )
        buckets = GaugeMetricFamily(
            "monedge_ratelimit_buckets",
            "In-memory buckets held, by policy.",
            labels=["policy"],
        )
        totals: dict[str, dict[str, int]] = {}
        for hook in list(self.hooks):
            mine = totals.setdefault(hook.name, {})
            for counter, value in hook.stats().items():
                mine[counter] = mine.get(counter, 0) + value
        for policy, counts in sorted(totals.items()):
            decisions.add_metric([policy, "allowed"], counts.get("allowed", 0))
            decisions.add_metric([policy, "limited"], counts.get("limited", 0))
            errors.add_metric([policy], counts.get("redis_errors", 0))
            outages.add_metric([policy], counts.get("redis_outages", 0))
            buckets.add_metric([policy], counts.get("keys", 0))
        yield decisions
        yield errors
        yield outages
        yield buckets


_collectors: weakref.WeakKeyDictionary[Any, RateLimitCollector] = (
    weakref.WeakKeyDictionary()
)


def collectorFor(registry: Any) -> RateLimitCollector:
    """
    The one collector registered on C{registry} for every ratelimit hook.
    """
    collector = _collectors.get(registry)
    if collector is None:
        collector = _collectors[registry] = RateLimitCollector()
        registry.register(collector)
    return collector
