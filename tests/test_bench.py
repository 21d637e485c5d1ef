"""
The measuring tools docs/performance.md documents under "Instructions per
request" run as documented and print what they say.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

from twisted.trial.unittest import SynchronousTestCase, TestCase

from monedge.registry import Endpoint
from monedge.registry.kubernetes import compactService, compactSlice, endpointsFor
from monedge.testing.kubernetes import (
    MemoryKubernetes,
    realisticEndpointSlice,
    realisticService,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*command: str, timeout: float) -> str:
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": ROOT, "PY": sys.executable},
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(f"{command} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


class BenchToolTests(TestCase):
    """
    bench/inprocess.py, bench/instructions.sh, bench/upload.py,
    bench/h2load.py, bench/grpcunary.py and bench/scale.py, on small counts.
    """

    def test_inprocess(self) -> None:
        """
        bench/inprocess.py proxies requests through the real site in memory
        and prints the CPU per request; with --profile, a profile whose
        busiest files include monedge's request path.
        """
        out = _run(
            sys.executable,
            "bench/inprocess.py",
            "--requests",
            "300",
            "--rounds",
            "2",
            timeout=120,
        )
        self.assertRegex(
            out, r"^\d+\.\d us CPU per request \(median of 2 rounds of 300;"
        )
        out = _run(
            sys.executable,
            "bench/inprocess.py",
            "--requests",
            "300",
            "--profile",
            "--top",
            "5",
            timeout=120,
        )
        self.assertIn("function calls", out)
        self.assertRegex(out, r"us  /\S+/monedge/edge/server\.py")

    def test_instructions(self) -> None:
        """
        bench/instructions.sh, as its header's example runs it, runs monedge
        under callgrind on a registry routing to the upstream, sends
        exactly the requests asked and prints a positive count of
        instructions per request.
        """
        header = open(os.path.join(ROOT, "bench", "instructions.sh")).read()
        example = re.search(
            r"#   (bench/instructions\.sh /bench/ .*?)\nset -eu", header, re.S
        )
        assert example is not None
        words = example.group(1).replace("#", " ").split()
        self.assertEqual(words[1:3], ["/bench/", "2000"])
        words[2] = "100"
        with tempfile.TemporaryDirectory() as directory:
            words = [
                w.replace("/tmp/a.log", os.path.join(directory, "a.log")) for w in words
            ]
            out = _run(*words, timeout=300)
            self.assertIn("100 succeeded", out)
            match = re.search(r"^(\d+) instructions per request", out, re.M)
            assert match is not None, out
            self.assertGreater(int(match.group(1)), 1000)

    def test_upload(self) -> None:
        """
        bench/upload.py uploads through monedge and straight to the
        upstream, checks the size the upstream counted, and reports
        monedge's memory, temporary files (none: bodies stream), CPU time
        and when the upstream saw the request; with many concurrent
        uploads to a slow upstream, likewise.
        """
        out = _run(sys.executable, "bench/upload.py", "one", "--mib", "4", timeout=120)
        self.assertIn("4,194,304 bytes counted", out)
        self.assertRegex(out, r"through monedge: [\d.]+ s")
        self.assertRegex(out, r"monedge RSS: .* growth -?[\d.]+ MiB")
        self.assertRegex(out, r"temp files: +0\.0 MiB")
        self.assertRegex(out, r"first byte: +the upstream saw the request [\d.]+ s in")
        self.assertRegex(out, r"monedge CPU: +[\d.]+ s user, [\d.]+ s system")
        out = _run(
            sys.executable,
            "bench/upload.py",
            "many",
            "--count",
            "3",
            "--mib",
            "1",
            "--rate",
            "4",
            "--chunked",
            timeout=120,
        )
        self.assertIn("3 concurrent x 1 MiB (chunked)", out)
        self.assertIn("3 answered", out)
        self.assertRegex(out, r"temp files: +0\.0 MiB")
        self.assertRegex(out, r"first byte: +\d+ of 3 bodies reached the upstream")

    def test_h2load(self) -> None:
        """
        bench/h2load.py, on a tiny run without nginx, loads monedge over h2
        on its TLS listener, HTTP/1.1 over TLS, h2c and plain HTTP/1.1,
        every request answered, and prints and writes a row for each with
        its CPU per request.
        """
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "h2load.json")
            out = _run(
                sys.executable,
                "bench/h2load.py",
                "--requests",
                "200",
                "--warmup",
                "50",
                "--rounds",
                "1",
                "--no-nginx",
                "--json",
                path,
                timeout=60,
            )
            with open(path) as f:
                document = json.load(f)
        summary = {row["protocol"]: row for row in document["summary"]}
        self.assertEqual(
            sorted(summary), ["HTTP/1.1", "HTTP/1.1 (TLS)", "h2 (TLS)", "h2c"]
        )
        for protocol, row in summary.items():
            self.assertEqual(row["server"], "monedge")
            self.assertEqual((row["requests"], row["errors"]), (200, 0), protocol)
            self.assertGreater(row["cpuMicrosecondsPerRequest"], 0, protocol)
            self.assertGreater(row["p99ms"], 0, protocol)
            self.assertRegex(
                out,
                rf"\| monedge +\| {re.escape(protocol)} +\| +[\d,]+ .*\| 0 of 200 \|",
            )
        (run,) = document["runs"]["monedge h2 (TLS)"]
        self.assertEqual(run["protocol"], "h2")
        self.assertEqual(run["loggedStatuses"], {"200": 200})
        self.assertEqual(document["errorsLogged"], {"monedge": []})
        self.assertIn("monedge's log: no error logged", out)

    def test_grpc(self) -> None:
        """
        bench/grpcunary.py, on a tiny run, makes unary gRPC calls with h2load to
        the grpcio server directly and through monedge (an h2c service):
        every call answered 200 and served by the server (its own count),
        grpcio's sample calls succeeding, monedge's access log holding no
        failed call; it prints and writes a row for each target with
        calls/s and p99, monedge's CPU per call, and the ratio of the two.
        """
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "grpc.json")
            out = _run(
                sys.executable,
                "bench/grpcunary.py",
                "--calls",
                "200",
                "--warmup",
                "50",
                "--rounds",
                "1",
                "--json",
                path,
                timeout=60,
            )
            with open(path) as f:
                document = json.load(f)
        summary = {row["target"]: row for row in document["summary"]}
        self.assertEqual(sorted(summary), ["direct", "monedge"])
        for target, row in summary.items():
            self.assertEqual((row["calls"], row["errors"]), (200, 0), target)
            self.assertGreater(row["callsPerSecond"], 0, target)
            self.assertGreater(row["p99ms"], 0, target)
            # /proc counts CPU in ticks: a tiny run may show none.
            self.assertGreaterEqual(row["upstreamCpuMicrosecondsPerCall"], 0, target)
            self.assertRegex(out, rf"\| {target} +\| +[\d,]+ .*\| 0 of 200 \|")
            (run,) = document["runs"][target]
            self.assertEqual(run["protocol"], "h2c")
            self.assertEqual(run["loggedStatuses"], {"200": 200})
            self.assertEqual(run["servedByUpstream"], 200)
        self.assertGreater(summary["monedge"]["monedgeCpuMicrosecondsPerCall"], 0)
        self.assertGreater(document["monedgeAgainstDirect"], 0)
        self.assertRegex(out, r"monedge / direct = [\d.]+x the calls/s")
        # The warm-up, the measured calls and the checks all went through.
        # and the upstream's grpc-status, OK, reached monedge's access log.
        self.assertEqual(list(document["accessLog"]), ["200 0"])
        self.assertGreaterEqual(document["accessLog"]["200 0"], 250)
        self.assertEqual(document["accessLogBad"], 0)
        self.assertEqual(document["errorsLogged"], {"monedge": [], "gRPC server": []})

    def test_scale(self) -> None:
        """
        bench/scale.py, on 50 routable Services and one-second phases,
        starts the fake API server and monedge on the Kubernetes registry,
        and reports every phase with every request answered: ready time and
        RSS, wrk over all 50 routes, paced traffic quiet and under /metrics
        and /routes scrapes (which answer 200), a relist after 410 Gone
        (monedge watches both kinds again; its reactor lag histogram counts
        the phase), and EndpointSlice churn with
        change-to-routing lags measured; it prints the two tables.
        """
        with tempfile.TemporaryDirectory() as directory:
            path = os.path.join(directory, "scale.json")
            out = _run(
                sys.executable,
                "bench/scale.py",
                "--sizes",
                "50",
                "--duration",
                "1",
                "--warmup",
                "1",
                "--settle",
                "0.2",
                "--churn-seconds",
                "2",
                "--json",
                path,
                timeout=90,
            )
            with open(path) as f:
                document = json.load(f)
        (size,) = document["sizes"]
        self.assertEqual(size["services"], 50)
        self.assertEqual(size["fake"]["services"], 100)
        self.assertGreater(size["readySeconds"], 0)
        self.assertGreater(size["rssMiB"], 10)
        saturation = size["saturation"]
        self.assertGreater(saturation["requests"], 0)
        self.assertEqual(saturation["errors"], 0)
        for label in ("quiet", "metrics", "routes"):
            paced = size["paced"][label]
            self.assertEqual((paced["requests"], paced["failed"]), (1000, 0), label)
            self.assertGreater(paced["p99ms"], 0, label)
        for label in ("metrics", "routes"):
            self.assertEqual(size["scrapes"][label]["statuses"], [200], label)
            self.assertGreater(size["scrapes"][label]["bytes"], 0, label)
        relist = size["relist"]
        self.assertGreater(relist["listPages"], 0)
        self.assertEqual(relist["whole"]["failed"], 0)
        self.assertGreater(relist["window"]["requests"], 0)
        # monedge's reactor lag histogram, read around the relist: its
        # timers ran about 100 times a second meanwhile.
        self.assertGreater(relist["reactorLags"]["+Inf"], 100)
        self.assertIn("stallsOver50ms", relist)
        churn = size["churn"]
        self.assertGreater(churn["updates"], 0)
        self.assertEqual(churn["whole"]["failed"], 0)
        self.assertGreater(len(churn["lagsMs"]), 0)
        self.assertEqual(churn["lagTimeouts"], 0)
        self.assertRegex(out, r"\| 50 +\| [\d.]+ s +\| \d+ MiB +\| [\d,]+ +\|")
        self.assertIn("churn lag p99", out)


class RealisticObjectsTests(SynchronousTestCase):
    """
    The API objects bench/scale.py fills its fake with.
    """

    def test_shapes(self) -> None:
        """
        L{realisticService} and L{realisticEndpointSlice} are shaped like a
        cluster's objects (managed fields, kubectl's last-applied
        configuration of a few KB, a uid, a cluster IP, each endpoint's
        Pod, node and zone), the fake stores them, and the registry reads
        the slice's three endpoints, on its C{http} port, with the
        readiness asked for.
        """
        service = realisticService("service-api-s7", "shop", 7)
        slice_ = realisticEndpointSlice(
            "service-api-s7",
            ["127.0.0.1", "127.0.0.2", "127.0.0.3"],
            9000,
            "shop",
            7,
            ready=[True, True, False],
        )
        metadata = service["metadata"]
        self.assertEqual(len(metadata["managedFields"]), 3)
        applied = metadata["annotations"][
            "kubectl.kubernetes.io/last-applied-configuration"
        ]
        self.assertGreater(len(applied), 2000)
        self.assertEqual(json.loads(applied)["metadata"]["name"], "service-api-s7")
        self.assertTrue(metadata["uid"])
        self.assertTrue(service["spec"]["clusterIP"].startswith("10."))
        self.assertEqual(
            slice_["metadata"]["labels"]["kubernetes.io/service-name"],
            "service-api-s7",
        )
        self.assertEqual(
            [e["targetRef"]["kind"] for e in slice_["endpoints"]], ["Pod"] * 3
        )
        self.assertTrue(all(e["nodeName"] and e["zone"] for e in slice_["endpoints"]))
        self.assertEqual(realisticService("service-api-s7", "shop", 7), service)
        cluster = MemoryKubernetes()
        cluster.apply(service)
        cluster.apply(slice_)
        self.assertEqual(len(cluster.services()), 1)
        self.assertEqual(len(cluster.endpointSlices()), 1)
        name = "service.api.s7"
        endpoints = endpointsFor(
            compactService(service, name), [compactSlice(slice_, name)]
        )
        self.assertEqual(
            [(e.host, e.port, e.ready) for e in endpoints],
            [
                ("127.0.0.1", 9000, True),
                ("127.0.0.2", 9000, True),
                ("127.0.0.3", 9000, False),
            ],
        )
        self.assertIsInstance(endpoints[0], Endpoint)
