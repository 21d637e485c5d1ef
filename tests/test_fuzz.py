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

from fuzz import checker, h2checker
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
H2_REGRESSIONS = os.path.join(REGRESSIONS, "http2")


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


class HTTP2SeedTests(SynchronousTestCase):
    """
    The HTTP/2 target's seeds and regressions pass its checker
    (L{fuzz.h2checker}).
    """

    def test_seeds(self) -> None:
        """
        Every seed conversation (GET, POST with DATA, trailers, PING,
        SETTINGS, several streams with refusals, a reset, a GOAWAY), built
        with the h2 package's client, keeps every invariant: nothing
        logged as an error, well-formed frames within the client's
        windows, exactly one final answer or reset per stream, and the
        connection closed once every limit has passed.
        """
        self.assertEqual(
            sorted(h2checker.H2_SEEDS),
            [
                "get",
                "goaway",
                "ping",
                "post-data",
                "reset",
                "settings",
                "streams",
                "trailers",
            ],
        )
        failures = []
        for name, raw in h2checker.H2_SEEDS.items():
            try:
                h2checker.checkFrameBytes(raw)
            except AssertionError as e:
                failures.append(f"seed {name!r}: {e}")
        self.assertEqual(failures, [])

    def test_regressions(self) -> None:
        """
        Every reproducer in fuzz/regressions/http2/ passes the checker.
        """
        failures = []
        for name in sorted(os.listdir(H2_REGRESSIONS)):
            with open(os.path.join(H2_REGRESSIONS, name), "rb") as f:
                try:
                    h2checker.checkFrameBytes(f.read())
                except AssertionError as e:
                    failures.append(f"regression {name!r}: {e}")
        self.assertEqual(failures, [])

    def test_overLimitPostClosesItsStream(self) -> None:
        """
        fuzz/regressions/http2/post-over-limit-left-open: a POST whose
        Content-Length is over its service's max-body-size, sent whole, is
        answered 413 and its stream is done: once the keep-alive timeout
        has passed, monedge closes the connection (the stream stayed open
        in the channel, so the connection never went idle).
        """
        path = os.path.join(H2_REGRESSIONS, "post-over-limit-left-open")
        with open(path, "rb") as f:
            h2checker.checkFrameBytes(f.read())

    def test_dataAfterResetIgnored(self) -> None:
        """
        fuzz/regressions/http2/data-after-reset-reset-again: a POST refused
        on its head (here its path) is answered at once and its stream
        reset with NO_ERROR to stop the body; DATA the client had already
        sent on it, read after the reset, is ignored (RFC 9113, 5.1), not
        answered with a second RST_STREAM (STREAM_CLOSED).  Fed whole, the
        DATA is read with the head and all is well; split, it came after.
        """
        path = os.path.join(H2_REGRESSIONS, "data-after-reset-reset-again")
        with open(path, "rb") as f:
            h2checker.checkFrameBytes(f.read())

    def test_stalledTrailersStreamAnswered(self) -> None:
        """
        fuzz/regressions/http2/stalled-trailers-stream-left-unanswered: a
        POST whose trailers' header block never ends stalls the connection
        (no other frame may come inside a header block); when the header
        deadline passes, the GOAWAY (NO_ERROR) is preceded by RST_STREAM
        (CANCEL) for the stream in flight, which is never left unanswered.
        """
        path = os.path.join(H2_REGRESSIONS, "stalled-trailers-stream-left-unanswered")
        with open(path, "rb") as f:
            h2checker.checkFrameBytes(f.read())

    def test_trailersAfterResetIgnored(self) -> None:
        """
        fuzz/regressions/http2/trailers-after-reset-reset-again: trailers
        (a HEADERS frame) the client sent on a stream monedge had answered
        early and reset are ignored (RFC 9113, 5.1), as DATA is, not reset
        a second time.
        """
        path = os.path.join(H2_REGRESSIONS, "trailers-after-reset-reset-again")
        with open(path, "rb") as f:
            h2checker.checkFrameBytes(f.read())

    def test_dataOnNeverOpenedStream(self) -> None:
        """
        fuzz/regressions/http2/data-on-never-opened-stream: DATA on a stream
        the client never opened (closed implicitly by a later one) is a
        connection error, GOAWAY (STREAM_CLOSED), not a RST_STREAM answered
        for each such frame.
        """
        path = os.path.join(H2_REGRESSIONS, "data-on-never-opened-stream")
        with open(path, "rb") as f:
            h2checker.checkFrameBytes(f.read())

    def test_seedsWritten(self) -> None:
        """
        fuzz/seeds.py's HTTP/2 writer writes one file per seed and per
        regression, with the exact bytes, and a dictionary of quoted tokens.
        """
        directory = self.mktemp()
        written = h2checker.writeH2Seeds(directory, H2_REGRESSIONS)
        self.assertEqual(
            len(written), len(h2checker.H2_SEEDS) + len(os.listdir(H2_REGRESSIONS))
        )
        contents = set()
        for path in written:
            with open(path, "rb") as f:
                contents.add(f.read())
        self.assertTrue(set(h2checker.H2_SEEDS.values()) <= contents)
        dictionary = os.path.join(directory, "fuzz.dict")
        h2checker.writeH2Dictionary(dictionary)
        with open(dictionary) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), len(h2checker.H2_DICTIONARY))
        self.assertTrue(all(re.match(r'"[^"]*"\Z', line) for line in lines))


class HTTP2CheckerTests(SynchronousTestCase):
    """
    The HTTP/2 checker is not vacuous: each invariant fails when broken.
    """

    def outcome(self, data: bytes) -> h2checker.H2Outcome:
        return h2checker.runH2Connection([data])

    def test_answersRead(self) -> None:
        """
        The checker reads the answers of the seed with several streams:
        200s from the upstream, and monedge's own 404, 413 and 400.
        """
        data = h2checker.H2_SEEDS["streams"]
        outcome = self.outcome(data)
        server = h2checker.readServer(outcome.output, h2checker.readClient(data))
        statuses = {
            s: h2checker._status(stream.final() or [])
            for s, stream in server.streams.items()
        }
        self.assertEqual(statuses, {1: 200, 3: 200, 5: 404, 7: 413, 9: 400, 11: 200})

    def test_unansweredStream(self) -> None:
        """
        A stream the client opened that the server never answers is
        caught (here, the server's output cut before its answer).
        """
        data = h2checker.H2_SEEDS["get"]
        outcome = self.outcome(data)
        settings = outcome.output[: 9 + int.from_bytes(outcome.output[:3], "big")]
        outcome.output = settings
        outcome.closed = True
        with self.assertRaises(AssertionError) as raised:
            h2checker.checkH2Outcome(outcome, h2checker.readClient(data))
        self.assertIn("never answered", str(raised.exception))

    def test_frameAfterTheEnd(self) -> None:
        """
        A frame on a stream after the server ended it is caught.
        """
        data = h2checker.H2_SEEDS["get"]
        outcome = self.outcome(data)
        outcome.output += b"\x00\x00\x01\x00\x00\x00\x00\x00\x01x"
        with self.assertRaises(AssertionError) as raised:
            h2checker.checkH2Outcome(outcome, h2checker.readClient(data))
        self.assertIn("had ended", str(raised.exception))

    def test_dataPastTheWindow(self) -> None:
        """
        More DATA than the client's window allowed is caught: the seed
        whose SETTINGS set a 16-byte initial window (and grant 1 KiB)
        read as if the window were smaller.
        """
        data = h2checker.H2_SEEDS["settings"]
        outcome = self.outcome(data)
        client = h2checker.readClient(data)
        client.streams[1].window = 1
        with self.assertRaises(AssertionError) as raised:
            h2checker.checkH2Outcome(outcome, client)
        self.assertIn("stream window", str(raised.exception))

    def test_crossedAnswer(self) -> None:
        """
        An upstream that answers with another call's tag is caught.
        """
        data = h2checker.H2_SEEDS["streams"]
        self.patch(
            h2checker,
            "BodyReadingUpstream",
            type(
                "Lying",
                (h2checker.BodyReadingUpstream,),
                {"__init__": lambda self: checker.TaggingUpstream.__init__(self, 1)},
            ),
        )
        outcome = self.outcome(data)
        with self.assertRaises(AssertionError) as raised:
            h2checker.checkH2Outcome(outcome, h2checker.readClient(data))
        self.assertIn("call", str(raised.exception))


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

    def test_importAndRunHTTP2(self) -> None:
        """
        fuzz/http2_frames.py imports (under atheris' import
        instrumentation) and its TestOneInput runs on a few inputs, garbage
        included, without atheris' fuzz loop.
        """
        path = os.path.join(ROOT, "fuzz", "http2_frames.py")
        spec = importlib.util.spec_from_file_location("_fuzz_http2_frames", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for data in [b"", b"\x00\xff" * 9, h2checker.H2_SEEDS["trailers"]]:
            module.TestOneInput(data)


class FuzzRunTests(SynchronousTestCase):
    """
    A short real fuzz session (bounded by the subprocess timeout).
    """

    def test_shortRun(self) -> None:
        """
        fuzz/run.sh with FUZZ_SECONDS=5 (and the HTTP/2 run skipped) exits
        0 and reports a number of executions above 0 in its one-line
        summary.
        """
        self.assertRuns("5", "0", "fuzz")

    def test_shortHTTP2Run(self) -> None:
        """
        fuzz/run.sh with FUZZ_HTTP2_SECONDS=5 (and the request path's run
        skipped) runs the HTTP/2 target: it exits 0 and reports a number of
        executions above 0 in its one-line summary.
        """
        self.assertRuns("0", "5", "fuzz http2")

    def assertRuns(self, seconds: str, http2Seconds: str, label: str) -> None:
        """
        fuzz/run.sh with these durations exits 0 and its C{label} summary
        line reports executions.
        """
        env = dict(
            os.environ,
            FUZZ_SECONDS=seconds,
            FUZZ_HTTP2_SECONDS=http2Seconds,
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
        match = re.search(
            rf"^{re.escape(label)}: ok executions=(\d+) ", output, re.MULTILINE
        )
        self.assertIsNotNone(match, output)
        assert match is not None
        self.assertGreater(int(match.group(1)), 0)
