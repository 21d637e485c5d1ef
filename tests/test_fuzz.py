"""
The request-path fuzz target: its checker (L{fuzz.checker}), its
seed corpus and its regressions, its atheris entry point, and a short real
fuzz run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from collections.abc import Callable

from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from fuzz import checker
from fuzz.checker import (
    TaggingUpstream,
    checkOutcome,
    checkRequestBytes,
    frameRequests,
    runConnection,
    splitPoints,
)
from monedge.interfaces import IUpstreamClient
from tests import corpus_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGRESSIONS = os.path.join(ROOT, "fuzz", "regressions")


def _corpus() -> list[tuple[str, bytes]]:
    return corpus_cases.everyCase(checker.LISTENER_PORT)


def _regressions() -> list[tuple[str, bytes]]:
    found = []
    for name in sorted(os.listdir(REGRESSIONS)):
        path = os.path.join(REGRESSIONS, name)
        if name != "README.md" and os.path.isfile(path):
            with open(path, "rb") as f:
                found.append((name, f.read()))
    return found


PIPELINED = (
    b"GET /echo/one HTTP/1.1\r\nHost: a.example\r\n\r\n"
    b"GET /other/two HTTP/1.1\r\nHost: a.example\r\n\r\n"
    b"GET /legacy/three HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"
)


def _checkWith(data: bytes, upstream: Callable[[], TaggingUpstream]) -> None:
    """
    Run C{data} on one connection with the upstream C{upstream()} makes,
    and check the outcome.
    """
    outcome = runConnection([data], upstream=upstream())
    checkOutcome(outcome, frameRequests(data))


class SeedTests(SynchronousTestCase):
    """
    The seed corpus is the regression run: every seed passes the checker.
    """

    def test_corpusCases(self) -> None:
        """
        Every case of the raw-socket corpus (tests/corpus_cases.py) keeps
        every invariant: no error logged, well-formed responses paired with
        requests, monedge's own framing upstream, nothing crossed.
        """
        cases = _corpus()
        self.assertGreater(len(cases), 100)
        for name, raw in cases:
            try:
                checkRequestBytes(raw)
            except AssertionError as e:
                self.fail(f"corpus case {name!r}: {e}")

    def test_extraSeeds(self) -> None:
        """
        The well-formed extra seeds (pipelined GETs, bodies, chunked,
        WebSocket, absolute form, HEAD, 100-continue, HTTP/1.0, partial
        requests) keep every invariant.
        """
        for name, raw in checker.EXTRA_SEEDS.items():
            try:
                checkRequestBytes(raw)
            except AssertionError as e:
                self.fail(f"extra seed {name!r}: {e}")

    def test_regressions(self) -> None:
        """
        Every crash reproducer checked into fuzz/regressions/ now passes.
        """
        for name, raw in _regressions():
            try:
                checkRequestBytes(raw)
            except AssertionError as e:
                self.fail(f"regression {name!r}: {e}")

    def test_headRefusalHasNoBody(self) -> None:
        """
        fuzz/regressions/head-refusal-body: a HEAD request refused on its
        headers (a NUL in a header line) gets the 400's head and no body,
        so the response stream parses as one HEAD response.
        """
        with open(os.path.join(REGRESSIONS, "head-refusal-body"), "rb") as f:
            checkRequestBytes(f.read())

    def test_headChunkedOverLimit(self) -> None:
        """
        fuzz/regressions/head-chunked-over-limit: a chunked HEAD request
        whose body passes the route's max-body-size is refused with a 413
        head and no body.  Twisted has not set the request's method while
        the body arrives, so the checker frames that answer by the method
        its own framer read.
        """
        with open(os.path.join(REGRESSIONS, "head-chunked-over-limit"), "rb") as f:
            checkRequestBytes(f.read())

    def test_pipelinedPartialHeadDeadline(self) -> None:
        """
        fuzz/regressions/pipelined-partial-head-deadline: a request whose
        head is cut short behind requests answered in the same read gets
        its 408 at the header deadline, one answer per request.
        """
        with open(
            os.path.join(REGRESSIONS, "pipelined-partial-head-deadline"), "rb"
        ) as f:
            checkRequestBytes(f.read())

    def test_seedsWritten(self) -> None:
        """
        The seed directory holds one file per corpus case and extra seed,
        and a copy of every regression, with the exact bytes.
        """
        directory = self.mktemp()
        cases = _corpus()
        written = checker.writeSeeds(directory, cases, REGRESSIONS)
        self.assertEqual(
            len(written), len(cases) + len(checker.EXTRA_SEEDS) + len(_regressions())
        )
        contents = set()
        for path in written:
            with open(path, "rb") as f:
                contents.add(f.read())
        self.assertTrue({raw for _, raw in cases} <= contents)
        dictionary = os.path.join(directory, "http.dict")
        checker.writeDictionary(dictionary)
        with open(dictionary) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), len(checker.DICTIONARY))
        self.assertTrue(all(re.match(r'"[^"]*"\Z', line) for line in lines))


class CheckerTests(SynchronousTestCase):
    """
    The checker is not vacuous: each invariant fails when it is broken.
    """

    def test_upstreamProvidesInterface(self) -> None:
        """
        The checker's upstream is an L{IUpstreamClient} like the real one.
        """
        self.assertTrue(verifyObject(IUpstreamClient, checker.TaggingUpstream()))

    def test_pipelinedInOrder(self) -> None:
        """
        Pipelined requests with the honest upstream pass: three calls, in
        request order, each request answered with its own call's tag.
        """
        outcome = runConnection([PIPELINED])
        summary = checkOutcome(outcome, frameRequests(PIPELINED))
        self.assertEqual(
            [c.url for c in outcome.calls],
            [
                b"http://10.0.0.1:80/one",
                b"http://10.0.0.2:8080/two",
                b"http://10.0.0.3:80/legacy/three",
            ],
        )
        self.assertEqual([s[0] for s in summary[:3]], [200, 200, 200])

    def test_crossedResponses(self) -> None:
        """
        An upstream that answers each call with another call's tag (as if
        answers were delivered out of order) is caught as crossed.
        """
        with self.assertRaises(AssertionError) as raised:
            _checkWith(PIPELINED, lambda: TaggingUpstream(tagOffset=1))
        self.assertIn("responses crossed", str(raised.exception))

    def test_hopByHopUpstream(self) -> None:
        """
        A hop-by-hop header injected into the headers monedge sends up is
        caught.
        """

        def inject(headers: Headers) -> None:
            headers.addRawHeader(b"transfer-encoding", b"chunked")

        with self.assertRaises(AssertionError) as raised:
            _checkWith(PIPELINED, lambda: TaggingUpstream(mangle=inject))
        self.assertIn("hop-by-hop", str(raised.exception))

    def test_secondHostUpstream(self) -> None:
        """
        A second Host header sent up is caught.
        """

        def inject(headers: Headers) -> None:
            headers.addRawHeader(b"host", b"evil.example")

        with self.assertRaises(AssertionError) as raised:
            _checkWith(PIPELINED, lambda: TaggingUpstream(mangle=inject))
        self.assertIn("Host", str(raised.exception))

    def test_spoofedForwardingHeader(self) -> None:
        """
        A forwarding header that is not monedge's own is caught.
        """

        def inject(headers: Headers) -> None:
            headers.setRawHeaders(b"x-forwarded-for", [b"1.2.3.4"])

        with self.assertRaises(AssertionError) as raised:
            _checkWith(PIPELINED, lambda: TaggingUpstream(mangle=inject))
        self.assertIn("forwarding header", str(raised.exception))

    def test_errorLogged(self) -> None:
        """
        An error logged while the proxy runs is caught (here, by an
        upstream that logs one for every call).
        """
        log = Logger()

        class Noisy(TaggingUpstream):
            def answer(self) -> int:
                if self.pending:
                    log.error("upstream exploded")
                return super().answer()

        self.patch(checker, "TaggingUpstream", Noisy)
        with self.assertRaises(AssertionError) as raised:
            checkRequestBytes(PIPELINED)
        self.assertIn("logged at error level", str(raised.exception))

    def test_malformedResponses(self) -> None:
        """
        The response parser refuses a truncated body, a response with both
        Content-Length and Transfer-Encoding, and a bad status line, and
        the error check refuses a traceback and a non-JSON error.
        """
        bad = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
        ]
        for data in bad:
            with self.assertRaises(AssertionError):
                checker.parseResponses(data, [b"GET"], closed=False)
        [response], _ = checker.parseResponses(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/html\r\n"
            b"Content-Length: 9\r\n\r\nTraceback",
            [b"GET"],
            closed=False,
        )
        with self.assertRaises(AssertionError):
            checker.checkErrorResponse(response)

    def test_strictFramer(self) -> None:
        """
        The independent framer frames pipelined requests with bodies and
        stops at ambiguous framing (Content-Length with Transfer-Encoding).
        """
        framed = frameRequests(
            b"POST /echo/a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc"
            b"PUT /echo/b HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
            b"POST /echo/c HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        self.assertEqual(
            [(f.method, f.target) for f in framed],
            [(b"POST", b"/echo/a"), (b"PUT", b"/echo/b")],
        )

    def test_pathChecks(self) -> None:
        """
        The pure path check accepts canonical and refused targets alike
        (per docs/convention.md) and its agreement check holds on them.
        """
        for target in [
            b"/echo/%7euser/%41%62c",
            b"//echo///a//",
            b"/%65cho/x?y",
            b"/echo/../x",
            b"/echo/a%2fb",
            b"*",
            b"/",
        ]:
            checker.checkPath(target)

    def test_splitPoints(self) -> None:
        """
        The split feed is chosen by the input, covers it exactly, and has
        no empty chunk (a transport never delivers one).
        """
        for data in [PIPELINED, b"x", b"GET / HTTP/1.1\r\n\r\n" * 5]:
            chunks, answer = splitPoints(data)
            self.assertEqual(b"".join(chunks), data)
            self.assertTrue(all(chunks))
            self.assertEqual(len(chunks), len(answer))
            self.assertEqual(splitPoints(data), (chunks, answer))


class EntryPointTests(SynchronousTestCase):
    """
    The atheris entry point.
    """

    def test_importAndRun(self) -> None:
        """
        fuzz/request_path.py imports (under atheris' import instrumentation)
        and its TestOneInput runs on a few inputs, garbage included,
        without atheris' fuzz loop.
        """
        path = os.path.join(ROOT, "fuzz", "request_path.py")
        spec = importlib.util.spec_from_file_location("_fuzz_request_path", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for data in [b"", b"\x00\xff", PIPELINED, checker.EXTRA_SEEDS["post-chunked"]]:
            module.TestOneInput(data)


class FuzzRunTests(SynchronousTestCase):
    """
    A short real fuzz session (bounded by the subprocess timeout).
    """

    def test_shortRun(self) -> None:
        """
        fuzz/run.sh with FUZZ_SECONDS=5 exits 0 and reports a number of
        executions above 0 in its one-line summary.
        """
        env = dict(
            os.environ,
            FUZZ_SECONDS="5",
            VENV=os.path.dirname(os.path.dirname(sys.executable)),
        )
        env.pop("FUZZ_KEEP", None)
        result = subprocess.run(
            [os.path.join(ROOT, "fuzz", "run.sh")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=110,
        )
        output = result.stdout.decode("utf-8", "replace")
        self.assertEqual(result.returncode, 0, output + result.stderr.decode()[-3000:])
        match = re.search(r"^fuzz: ok executions=(\d+) ", output, re.MULTILINE)
        self.assertIsNotNone(match, output)
        assert match is not None
        self.assertGreater(int(match.group(1)), 0)
