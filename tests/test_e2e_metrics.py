"""
End to end: the metrics an operator needs, scraped from a real
C{twistd monedge}'s /metrics while real clients use it.
"""

from __future__ import annotations

import json
import socket
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor, task, threads
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET, Request

from monedge.testing import ProxyProcess, Received, freePort
from tests.e2e import ProxyTestCase

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class OperatorMetricsTests(ProxyTestCase):
    timeout = 60
    """
    /metrics tells upstream errors, upstream latency, connections, requests
    in flight and who chose each status, and a healthy static registry's
    sync age stays small.
    """

    async def scrape(self, proxy: ProxyProcess) -> Samples:
        """
        Every sample on /metrics, by name and sorted labels.
        """
        _, body = await self.get(proxy.adminURL + "/metrics")
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    async def test_operatorMetrics(self) -> None:
        """
        After a routed request, a hook's refusal, an unreachable service and
        a slow request: the status origin tells upstream from monedge, the
        upstream latency histogram counts what upstreams answered, upstream
        errors are per service and kind, a request waiting on its upstream
        is in flight for its service, an open connection is counted on its
        listener as HTTP/1.1, and build and process metrics are there.
        """
        waiting: list[Request] = []

        def responder(request: Request, seen: Received) -> bytes | int | None:
            if request.uri.startswith(b"/slow"):
                waiting.append(request)
                return NOT_DONE_YET
            return None

        upstream = self.startUpstream(responder)
        proxy = await self.startProxy(
            {
                "service.api.echo": {"endpoints": [upstream.address]},
                "service.api.gone": {"endpoints": [f"127.0.0.1:{freePort()}"]},
                "service.api.guarded": {
                    "endpoints": [upstream.address],
                    "policy": {
                        "hooks": [{"name": "ratelimit", "options": {"rate": "1/h"}}]
                    },
                },
            }
        )
        response, _ = await self.get(proxy.url + "/echo/x")
        self.assertEqual(response.code, 200)
        codes = [(await self.get(proxy.url + "/guarded/x"))[0].code for _ in range(2)]
        self.assertEqual(codes, [200, 429])
        response, _ = await self.get(proxy.url + "/gone/x")
        self.assertEqual(response.code, 502)
        slow = Deferred.fromCoroutine(self.get(proxy.url + "/echo/slow"))
        idle = await threads.deferToThread(
            socket.create_connection, ("127.0.0.1", proxy.port)
        )
        self.addCleanup(idle.close)
        while not waiting:
            await task.deferLater(reactor, 0.02, lambda: None)
        samples = await self.scrape(proxy)

        def value(name: str, **labels: str) -> float:
            return samples.get((name, tuple(sorted(labels.items()))), 0.0)

        total = "monedge_requests_total"
        self.assertEqual(
            value(
                total, service="service.api.echo", code_class="2xx", origin="upstream"
            ),
            1.0,
        )
        self.assertEqual(
            value(
                total, service="service.api.guarded", code_class="4xx", origin="monedge"
            ),
            1.0,
        )
        self.assertEqual(
            value(
                total, service="service.api.gone", code_class="5xx", origin="monedge"
            ),
            1.0,
        )
        self.assertEqual(
            value(
                "monedge_upstream_errors_total",
                service="service.api.gone",
                kind="connect_refused",
            ),
            1.0,
        )
        self.assertEqual(
            value(
                "monedge_upstream_response_seconds_count", service="service.api.echo"
            ),
            1.0,
        )
        self.assertEqual(
            value(
                "monedge_upstream_response_seconds_count", service="service.api.gone"
            ),
            0.0,
        )
        self.assertEqual(
            value("monedge_requests_in_flight", service="service.api.echo"), 1.0
        )
        listener = f"tcp:{proxy.port}:interface=127.0.0.1:backlog=1024"
        # The slow request's connection and the idle one.
        self.assertEqual(
            value("monedge_client_connections", listener=listener, protocol="http/1.1"),
            2.0,
        )
        self.assertEqual(
            value("monedge_client_connections", listener=listener, protocol="h2"), 0.0
        )
        [info] = [labels for (name, labels) in samples if name == "monedge_build_info"]
        self.assertIn(("version", "0.1.0"), info)
        self.assertGreater(value("process_resident_memory_bytes"), 0)
        waiting[0].write(b"done")
        waiting[0].finish()
        response, body = await slow
        self.assertEqual(body, b"done")
        idle.close()
        await self.settles(
            proxy,
            lambda s: (
                s.get(
                    ("monedge_requests_in_flight", (("service", "service.api.echo"),))
                )
                == 0.0
                and s.get(
                    (
                        "monedge_client_connections",
                        (("listener", listener), ("protocol", "http/1.1")),
                    )
                )
                == 0.0
            ),
        )

    async def settles(self, proxy: ProxyProcess, condition: Any) -> None:
        """
        Scrape until C{condition(samples)} holds, for at most 5 s.
        """
        for _ in range(100):
            if condition(await self.scrape(proxy)):
                return
            await task.deferLater(reactor, 0.05, lambda: None)
        self.fail("the metrics never settled")

    async def test_staticSyncAgeStaysFresh(self) -> None:
        """
        On a healthy static registry that does not change, the last sync
        age stays below a few poll intervals instead of growing with
        uptime.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.echo": {"endpoints": [upstream.address]}}
        )
        ages = []
        for _ in range(3):
            await task.deferLater(reactor, 1.2, lambda: None)
            samples = await self.scrape(proxy)
            ages.append(samples[("monedge_registry_last_sync_age_seconds", ())])
        self.assertTrue(all(0 <= age < 2.5 for age in ages), ages)


class AdminPagesAtScaleTests(ProxyTestCase):
    """
    On a real C{twistd monedge}, /metrics is streamed whole for many
    services and /routes answers a page at a time.
    """

    timeout = 60

    async def test_metricsAndRoutesPages(self) -> None:
        """
        With 300 services of which 60 were routed to, /metrics parses and
        has every routed service's request count and histogram (no
        C{_created} series); /routes gives C{limit} services and a C{next}
        cursor that leads to the rest, C{service} and C{q} filter, and a
        bad limit is a 400 with a JSON error.
        """
        upstream = self.startUpstream()
        services = {
            f"service.api.s{number:03d}": {"endpoints": [upstream.address]}
            for number in range(300)
        }
        proxy = await self.startProxy(services)
        for number in range(0, 300, 5):
            response, _ = await self.get(f"{proxy.url}/s{number:03d}/x")
            self.assertEqual(response.code, 200)
        response, body = await self.get(proxy.adminURL + "/metrics")
        self.assertEqual(response.code, 200)
        text = body.decode()
        self.assertNotIn("_created", text)
        samples = {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        for number in range(0, 300, 5):
            labels = (("service", f"service.api.s{number:03d}"),)
            self.assertEqual(
                samples[("monedge_request_duration_seconds_count", labels)], 1.0
            )
            self.assertEqual(
                samples[
                    (
                        "monedge_requests_total",
                        (("code_class", "2xx"), ("origin", "upstream")) + labels,
                    )
                ],
                1.0,
            )
        self.assertIn(("process_resident_memory_bytes", ()), samples)

        names: list[str] = []
        url = proxy.adminURL + "/routes?limit=120"
        while True:
            response, body = await self.get(url)
            self.assertEqual(response.code, 200)
            document = json.loads(body)
            self.assertLessEqual(len(document["services"]), 120)
            names.extend(service["name"] for service in document["services"])
            if document["next"] is None:
                break
            url = proxy.adminURL + "/routes?limit=120&after=" + document["next"]
        self.assertEqual(names, sorted(services))
        response, body = await self.get(
            proxy.adminURL + "/routes?service=service.api.s007"
        )
        document = json.loads(body)
        self.assertEqual(
            [s["name"] for s in document["services"]], ["service.api.s007"]
        )
        response, body = await self.get(proxy.adminURL + "/routes?q=s29")
        self.assertEqual(len(json.loads(body)["services"]), 10)
        response, body = await self.get(proxy.adminURL + "/routes?limit=5000")
        self.assertEqual(response.code, 400)
        self.assertEqual(json.loads(body)["code"], "bad_request")
