"""
The measuring tools docs/performance.md documents under "Instructions per
request" run as documented and print what they say; the pure functions of
bench/run.py and bench/h2load.py compute what they say.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import jwt
import yaml
from twisted.trial.unittest import SynchronousTestCase, TestCase

from monedge.registry import Endpoint
from monedge.registry.kubernetes import compactService, compactSlice, endpointsFor
from monedge.rules.policy import parseHooks
from monedge.testing.kubernetes import (
    MemoryKubernetes,
    realisticEndpointSlice,
    realisticService,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The bench scripts import each other as top-level modules, from bench/.
sys.path.insert(0, os.path.join(ROOT, "bench"))

import h2load  # noqa: E402
import run as benchRun  # noqa: E402


def _run(*command: str, timeout: float, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        command,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": ROOT, "PY": sys.executable, **(env or {})},
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
        instructions per request; with BENCH_H2LOAD, over HTTP/2 (h2c).
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
            for env in [{}, {"BENCH_H2LOAD": "-c5 -m4"}]:
                out = _run(*words, timeout=300, env=env)
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

    def test_run(self) -> None:
        """
        bench/run.py, on a tiny run without nginx or HAProxy, loads every
        wrk row with no error, the hooks row included (which answered 200
        with its token and 401 without before the load, or the run would
        have stopped), then monedge with h2load over HTTP/2 and HTTP/1.1
        over TLS, every request answered; and states issue 18's targets
        that these rows measure.
        """
        out = _run(
            sys.executable,
            "bench/run.py",
            "--duration",
            "1",
            "--warmup",
            "0",
            "--rounds",
            "1",
            "--no-nginx",
            "--no-haproxy",
            "--h2-requests",
            "100",
            "--h2-warmup",
            "0",
            "--no-json",
            timeout=120,
        )
        for label in (
            "monedge",
            "monedge (access log off)",
            "monedge (auth, ratelimit, headers)",
            "ReverseProxyResource",
            "minimal Agent proxy",
            "direct",
        ):
            self.assertRegex(
                out, rf"\n\| {re.escape(label)} +\| +[\d,]+ \|.*\| +0 \|", label
            )
        for protocol in ("h2 (TLS)", "HTTP/1.1 (TLS)"):
            self.assertRegex(
                out,
                rf"\| monedge +\| {re.escape(protocol)} +\| +[\d,]+ .*\| 0 of 100 \|",
            )
        self.assertIn("issue 18's targets, in this run:", out)
        self.assertRegex(
            out,
            r"monedge, every default feature on: req/s ÷ ReverseProxyResource's "
            r"\(≥ 3x\): [\d.]+x",
        )
        self.assertRegex(
            out,
            r"auth \(jwt\), ratelimit \(memory\) and headers on: req/s ÷ "
            r"ReverseProxyResource's bare req/s \(≥ 2x\): [\d.]+x",
        )
        self.assertNotIn("nginx's", out.split("issue 18's targets")[1])


def _wrkSummary(
    target: str, rate: float, perCpuSecond: float = 1.0, p99ms: float = 1.0
) -> benchRun.Summary:
    return benchRun.Summary(
        target=target,
        url="http://127.0.0.1:1/bench/",
        requestsPerSecond=rate,
        rounds=[rate],
        p50ms=p99ms / 2,
        p99ms=p99ms,
        errors=0,
        cpuPercent=90.0,
        requestsPerCpuSecond=perCpuSecond,
        upstreamCpuPercent=50.0,
        rssMiB=60.0,
    )


def _h2Summary(
    server: str, protocol: str, cpu: list[float], tls: str = ""
) -> h2load.Summary:
    return h2load.Summary(
        target=f"{server} {protocol}",
        server=server,
        protocol=protocol,
        url="https://127.0.0.1:1/bench/",
        requestsPerSecond=1000.0,
        rounds=[1000.0] * len(cpu),
        p50ms=10.0,
        p99ms=20.0,
        requests=1000,
        errors=0,
        cpuMicrosecondsPerRequest=sorted(cpu)[len(cpu) // 2],
        cpuPerRequestRounds=cpu,
        cpuPercent=50.0,
        upstreamCpuPercent=30.0,
        rssMiB=60.0,
        tls=tls,
    )


class RunFunctionTests(SynchronousTestCase):
    """
    bench/run.py's and bench/h2load.py's functions for the hooks row, the
    h2load rows and issue 18's targets.
    """

    def test_wrkHeaders(self) -> None:
        """
        L{benchRun.Wrk.command} sends each header given with C{-H}, before
        the URL (wrk's last argument), and none when none is given.
        """
        wrk = benchRun.Wrk("/usr/bin/wrk", ["taskset", "-c", "1"], 1, 50)
        url = "http://127.0.0.1:1/bench/"
        bare = wrk.command(url, 2)
        self.assertEqual(
            bare,
            [
                "taskset",
                "-c",
                "1",
                "/usr/bin/wrk",
                "-t1",
                "-c50",
                "-d2s",
                "--latency",
                url,
            ],
        )
        self.assertEqual(
            wrk.command(url, 2, {"Authorization": "Bearer t", "X-A": "a"}),
            [*bare[:-1], "-HAuthorization: Bearer t", "-HX-A: a", url],
        )

    def test_hooksDocument(self) -> None:
        """
        The hooks row's C{--hooks} file is the YAML docs/performance.md's
        "Hooks" section shows, with the JWK set's URL of the run, and
        monedge reads it as the three hooks, auth, ratelimit and headers, in
        that order.
        """
        url = "http://127.0.0.1:9/jwks.json"
        with open(os.path.join(ROOT, "docs", "performance.md")) as f:
            section = f.read().split("## Hooks (issue 18")[1]
        shown = yaml.safe_load(section.split("```yaml\n")[1].split("```")[0])
        shown["hooks"][0]["options"]["jwks-url"] = url
        self.assertEqual(benchRun.hooksDocument(url), shown)
        with tempfile.TemporaryDirectory() as directory:
            path = Path(directory) / "hooks.yaml"
            benchRun.writeHooks(path, url)
            written = yaml.safe_load(path.read_text())
        self.assertEqual(written, shown)
        specs = parseHooks(written["hooks"])
        self.assertEqual(
            [spec.name for spec in specs], ["auth", "ratelimit", "headers"]
        )
        self.assertEqual(specs[0].asJSON()["options"]["jwks-url"], url)

    def test_jwtCredentials(self) -> None:
        """
        L{benchRun.jwtCredentials} makes a JWK set of one RS256 key with
        the bench's key id, and a token that key signs for subject
        C{bench}, with no audience, expiring after the lifetime asked.
        """
        document, token = benchRun.jwtCredentials(lifetime=600)
        (key,) = document["keys"]
        self.assertEqual(
            (key["kty"], key["kid"], key["alg"], key["use"]),
            ("RSA", benchRun.KID, "RS256", "sig"),
        )
        self.assertEqual(jwt.get_unverified_header(token)["kid"], benchRun.KID)
        claims = jwt.decode(
            token,
            jwt.PyJWK(key).key,
            algorithms=["RS256"],
            options={"require": ["exp"]},
        )
        self.assertEqual(set(claims), {"sub", "exp"})
        self.assertEqual(claims["sub"], "bench")
        self.assertLess(abs(claims["exp"] - (time.time() + 600)), 5)

    def test_jwksServer(self) -> None:
        """
        L{benchRun.JwksServer} serves its document as JSON at its URL on
        127.0.0.1, answers 404 elsewhere, and once stopped, no longer
        listens.
        """
        server = benchRun.JwksServer({"keys": [{"kid": "k"}]})
        server.start()
        try:
            self.assertTrue(server.url.startswith("http://127.0.0.1:"))
            with urllib.request.urlopen(server.url, timeout=10) as response:
                self.assertEqual(response.headers["Content-Type"], "application/json")
                self.assertEqual(json.load(response), {"keys": [{"kid": "k"}]})
            with self.assertRaises(urllib.error.HTTPError) as raised:
                urllib.request.urlopen(server.url.replace("jwks", "other"), timeout=10)
            self.assertEqual(raised.exception.code, 404)
            raised.exception.close()
        finally:
            server.stop()
        with self.assertRaises(urllib.error.URLError):
            urllib.request.urlopen(server.url, timeout=10)

    def test_issue18Goals(self) -> None:
        """
        L{benchRun.issue18Goals} states each of issue 18's targets from the
        rows: monedge's req/s against ReverseProxyResource's (at least 3x),
        its requests per CPU second against nginx's (at least 0.6x), its
        p99 against nginx's (at most 2x), the hooks row's req/s against
        ReverseProxyResource's (at least 2x), and monedge's CPU per request
        against nginx's over HTTP/2 and HTTP/1.1 over TLS (at most 2x
        each); each met or not by the ratio measured.
        """
        summaries = [
            _wrkSummary(benchRun.MONEDGE, 9000, 10000, 12.0),
            _wrkSummary(benchRun.HOOKED, 6000),
            _wrkSummary(benchRun.RPR, 4000),
            _wrkSummary(benchRun.NGINX, 15000, 40000, 8.0),
        ]
        tls = [
            _h2Summary("monedge", h2load.H2, [300.0]),
            _h2Summary("nginx", h2load.H2, [100.0]),
            _h2Summary("monedge", h2load.H1_TLS, [150.0]),
            _h2Summary("nginx", h2load.H1_TLS, [100.0]),
        ]
        goals = benchRun.issue18Goals(summaries, tls, 50)
        self.assertEqual(
            [(g.measured, g.bound, g.atLeast, g.met) for g in goals],
            [
                (2.25, 3.0, True, False),
                (0.25, 0.6, True, False),
                (1.5, 2.0, False, True),
                (1.5, 2.0, True, False),
                (3.0, 2.0, False, False),
                (1.5, 2.0, False, True),
            ],
        )
        self.assertEqual(
            goals[0].line(),
            "monedge, every default feature on: req/s ÷ ReverseProxyResource's "
            "(≥ 3x): 2.25x, 9,000 against 4,000 req/s: NOT met",
        )
        self.assertEqual(
            goals[2].line(),
            "monedge, every default feature on: p99 at c=50 ÷ nginx's (≤ 2x): "
            "1.50x, 12.00 against 8.00 ms: met",
        )
        self.assertEqual(
            goals[4].line(),
            "HTTP/2 over TLS (h2load -c50 -m10): CPU per request ÷ nginx's "
            "(≤ 2x): 3.00x, 300 against 100 µs: NOT met",
        )
        self.assertEqual(
            goals[5].name,
            "HTTP/1.1 over TLS (h2load --h1 -c50): CPU per request ÷ nginx's",
        )

    def test_issue18GoalsMissingRows(self) -> None:
        """
        A target whose rows the run left out (nginx, the hooks row, the
        h2load rows) is left out of L{benchRun.issue18Goals}; a target met
        exactly at its bound is met.
        """
        goals = benchRun.issue18Goals(
            [_wrkSummary(benchRun.MONEDGE, 9000), _wrkSummary(benchRun.RPR, 3000)],
            [_h2Summary("monedge", h2load.H2, [300.0])],
        )
        self.assertEqual(
            [(g.name, g.measured, g.met) for g in goals],
            [
                (
                    "monedge, every default feature on: req/s ÷ ReverseProxyResource's",
                    3.0,
                    True,
                )
            ],
        )

    def test_parseArguments(self) -> None:
        """
        bench/run.py takes the hooks and h2load rows by default, with 20,000
        requests a measured h2load run after a fifth as many untimed;
        C{--no-hooks} and C{--no-h2} leave them out; fewer h2load requests
        than its 50 clients are refused.
        """
        args = benchRun.parseArguments([])
        self.assertEqual(
            (args.no_hooks, args.no_h2, args.h2_requests, args.h2_warmup),
            (False, False, 20000, 4000),
        )
        args = benchRun.parseArguments(
            ["--no-hooks", "--no-h2", "--h2-requests", "100", "--h2-warmup", "0"]
        )
        self.assertEqual(
            (args.no_hooks, args.no_h2, args.h2_requests, args.h2_warmup),
            (True, True, 100, 0),
        )
        self.assertEqual(benchRun.parseArguments(["--h2-requests", "60"]).h2_warmup, 50)
        for wrong in (["--h2-requests", "49"], ["--h2-warmup", "10"]):
            stderr = io.StringIO()
            with self.assertRaises(SystemExit), contextlib.redirect_stderr(stderr):
                benchRun.parseArguments(wrong)
            self.assertIn("must be at least 50, h2load's clients", stderr.getvalue())

    def test_h2loadShown(self) -> None:
        """
        L{h2load.H2load.shown} gives h2load's command line for each
        protocol, without the pinning prefix: C{-m} streams for HTTP/2,
        C{--h1} for HTTP/1.1, https for TLS.
        """
        loader = h2load.H2load("/usr/bin/h2load", ["taskset", "-c", "1"], 50, 10)
        self.assertEqual(
            loader.shown([h2load.H2, h2load.H1_TLS], 1000),
            "/usr/bin/h2load -m10 -c50 -n1000 https://127.0.0.1:PORT/bench/; "
            "/usr/bin/h2load --h1 -c50 -n1000 https://127.0.0.1:PORT/bench/",
        )

    def test_h2loadRatioLines(self) -> None:
        """
        L{h2load.ratioLines} gives monedge's CPU per request as a multiple
        of nginx's for each protocol measured on both, overall and per
        round, then the TLS negotiated by each server.
        """
        summaries = [
            _h2Summary("monedge", h2load.H2, [300.0, 400.0, 500.0], "TLSv1.3 A"),
            _h2Summary("nginx", h2load.H2, [100.0, 100.0, 200.0], "TLSv1.3 B"),
            _h2Summary("monedge", h2load.H1_TLS, [150.0]),
        ]
        self.assertEqual(
            h2load.ratioLines(summaries),
            [
                "monedge / nginx, h2 (TLS)       =  4.00x CPU per request; "
                "per round 3.00 / 4.00 / 2.50",
                "TLS negotiated: TLSv1.3 A (monedge), TLSv1.3 B (nginx)",
            ],
        )


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
