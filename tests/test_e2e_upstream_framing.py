"""
End-to-end: strict framing of upstream responses, against a real
C{twistd monedge} and raw upstreams whose every byte is scripted.

A response never carries more body than it declared, and none in answer to
HEAD or with a 1xx, 204 or 304 status; bytes after a response's end (a
second response in the same segment, garbage, bytes on an idle pooled
connection) are never relayed to any client, and the upstream connection
is discarded with one warning line naming the endpoint.  Response heads
are bounded (C{--max-upstream-headers-size}, C{--max-upstream-header-count}):
past a limit monedge stops reading and answers 502
C{upstream_headers_too_large}.
"""

from __future__ import annotations

import json
import re
import socket
import time
from dataclasses import dataclass, field

from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from monedge.tap import Options
from monedge.testing import ProxyProcess, writeRegistry
from tests.e2e import ProxyTestCase
from tests.test_e2e_faults import (
    ScriptedConnection,
    ScriptedRequest,
    ScriptedUpstream,
)

#: What must never appear in monedge's log because of an upstream's bytes.
BAD_LOG = re.compile(r"Traceback|Unhandled|critical|AttributeError", re.IGNORECASE)

#: The size of the endless header the "huge" upstream sends.
HUGE = 64 * 1024 * 1024

#: Each scripted answer, by the first segment of the upstream's target.
ANSWERS: dict[bytes, bytes] = {
    b"ok": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    # Two responses in one segment.
    b"two": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
    b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nX-Second: 1\r\n\r\nsecond answer",
    # Bytes after a Content-Length body.
    b"extra": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA BYTES",
    # A response after a chunked body.
    b"chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad",
    # Bodies on responses that have none.
    b"nocontent": b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello",
    b"notmodified": b'HTTP/1.1 304 Not Modified\r\nETag: "a"\r\n\r\nhello',
    b"head": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
    # An interim response, then garbage.
    b"interim": b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\ngarbage\r\n\r\n",
    # Header counts: Envoy's limit, and one more.
    b"hundred": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(99))
    + b"Content-Length: 2\r\n\r\nok",
    b"many": b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-H%d: v\r\n" % i for i in range(100))
    + b"Content-Length: 2\r\n\r\nok",
    # A 1500-byte head.
    b"kilo": b"HTTP/1.1 200 OK\r\nX-Pad: "
    + b"p" * (1500 - 46)
    + b"\r\nContent-Length: 2\r\n\r\nok",
}


def script(connection: ScriptedConnection, request: ScriptedRequest) -> None:
    """
    Answer by the first segment of the target: each answer is written in
    one piece (one segment on loopback); C{idle} answers, then sends a
    stale response on the idle connection; C{huge} sends a head with an
    endless 64 MiB header.
    """
    kind = request.target.split(b"/")[1]
    if kind == b"idle":
        connection.write(ANSWERS[b"ok"])
        connection.later(
            0.05,
            lambda: connection.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
            ),
        )
        return
    if kind == b"huge":
        connection.write(b"HTTP/1.1 200 OK\r\nX-Huge: " + b"h" * HUGE)
        return
    connection.write(ANSWERS.get(kind, b"HTTP/1.1 404 Not Found\r\n\r\n"))


@dataclass
class Answer:
    """
    One response as a raw client read it.
    """

    status: int
    headers: dict[bytes, list[bytes]] = field(default_factory=dict)
    body: bytes = b""


class RawClient:
    """
    A blocking HTTP/1.1 client on one connection that reads each response
    exactly by its framing, and keeps whatever follows for the next one.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""

    def _more(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed; unread: {self.buffer[:200]!r}")
        self.buffer += chunk

    def _take(self, count: int) -> bytes:
        while len(self.buffer) < count:
            self._more()
        taken, self.buffer = self.buffer[:count], self.buffer[count:]
        return taken

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            self._more()
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def exchange(self, method: bytes, path: bytes, close: bool = False) -> Answer:
        """
        Send one request (asking to close the connection after it, if
        C{close}) and read its response.
        """
        last = b"Connection: close\r\n" if close else b""
        self.sock.sendall(
            method + b" " + path + b" HTTP/1.1\r\nHost: a\r\n" + last + b"\r\n"
        )
        answer = Answer(int(self._line().split(b" ", 2)[1]))
        while line := self._line():
            name, _, value = line.partition(b":")
            answer.headers.setdefault(name.strip().lower(), []).append(value.strip())
        if method == b"HEAD" or answer.status in (204, 304):
            return answer
        if answer.headers.get(b"transfer-encoding") == [b"chunked"]:
            while size := int(self._line(), 16):
                answer.body += self._take(size)
                self._take(2)
            while self._line():
                pass
            return answer
        answer.body = self._take(int(answer.headers[b"content-length"][0]))
        return answer

    def close(self) -> None:
        self.sock.close()


def _exchanges(
    port: int, requests: list[tuple[bytes, bytes]], last: bytes
) -> list[Answer]:
    """
    Send C{requests} one after another on one connection, then a last
    C{GET} of C{last} that closes it; every answer, and the connection must
    then hold nothing more.  Blocking.
    """
    client = RawClient(port)
    try:
        answers = [client.exchange(method, path) for method, path in requests]
        answers.append(client.exchange(b"GET", last, close=True))
        while True:
            chunk = client.sock.recv(65536)
            if not chunk:
                break
            client.buffer += chunk
        if client.buffer:
            raise AssertionError(f"more after the last answer: {client.buffer!r}")
    finally:
        client.close()
    return answers


class FramingTests(ProxyTestCase):
    """
    Strict framing with monedge's upstream client.
    """

    async def startFraming(self, *args: str) -> tuple[ScriptedUpstream, ProxyProcess]:
        upstream = ScriptedUpstream(script)
        upstream.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(upstream.stop()))
        proxy = await self.startProxy(
            {"service.api.f": {"endpoints": [upstream.address]}}, args
        )
        return upstream, proxy

    def exchanges(
        self,
        proxy: ProxyProcess,
        requests: list[tuple[bytes, bytes]],
        last: bytes = b"/f/ok",
    ) -> Deferred[list[Answer]]:
        """
        L{_exchanges} in a thread.
        """
        return threads.deferToThread(_exchanges, proxy.port, requests, last)

    def assertCleanLog(self, proxy: ProxyProcess) -> None:
        """
        Nothing in monedge's log is a traceback, an unhandled error or a
        critical line.
        """
        log = proxy.log()
        bad = [line for line in log.splitlines() if BAD_LOG.search(line)]
        self.assertEqual(bad, [], log[-3000:])

    def discarded(self, proxy: ProxyProcess, upstream: ScriptedUpstream) -> int:
        """
        How many warnings say an upstream connection was discarded.
        """
        line = (
            f"upstream {upstream.address} sent bytes after the end of a response;"
            " connection discarded"
        )
        return proxy.log().count(line)

    async def test_bytesAfterTheEnd(self) -> None:
        """
        Two responses in one segment, bytes after a Content-Length body, a
        response after a chunked body, a body on a 204, a 304 or a HEAD
        answer: the client gets exactly the first response, with its own
        length and body (none where none is allowed), on a connection that
        then carries its next request; nothing after it reaches any client;
        each upstream connection is discarded, with a warning naming it.
        """
        upstream, proxy = await self.startFraming()
        cases = [
            (b"GET", b"/f/two", 200, b"first"),
            (b"GET", b"/f/extra", 200, b"ok"),
            (b"GET", b"/f/chunked", 200, b"ok"),
            (b"GET", b"/f/nocontent", 204, b""),
            (b"GET", b"/f/notmodified", 304, b""),
            (b"HEAD", b"/f/head", 200, b""),
        ]
        answers = await self.exchanges(proxy, [(m, p) for m, p, _, _ in cases])
        for (_, path, status, body), answer in zip(cases, answers, strict=False):
            self.assertEqual((answer.status, answer.body), (status, body), path)
            self.assertNotIn(b"x-second", answer.headers, path)
        self.assertEqual(answers[0].headers[b"content-length"], [b"5"])
        self.assertEqual(answers[-1].body, b"ok")
        self.assertEqual(self.discarded(proxy, upstream), len(cases))
        # Each request came on a connection of its own: none was reused
        # after bytes past a response's end.
        self.assertEqual(
            [r.connection for r in upstream.requests],
            list(range(1, len(cases) + 2)),
        )
        self.assertCleanLog(proxy)

    async def test_bytesWhileIdle(self) -> None:
        """
        A response sent on a connection idle in the pool is never handed
        to the next request: that goes out on a new connection and gets its
        own answer.
        """
        upstream, proxy = await self.startFraming()
        [first] = await self.exchanges(proxy, [], last=b"/f/idle")
        self.assertEqual((first.status, first.body), (200, b"ok"))
        [idle] = upstream.open
        await proxy.waitFor(
            lambda: not upstream.open, 5, "the idle connection to be closed"
        )
        self.assertEqual(self.discarded(proxy, upstream), 1)
        [again] = await self.exchanges(proxy, [])
        self.assertEqual((again.status, again.body), (200, b"ok"))
        self.assertNotEqual(upstream.requests[-1].connection, idle.number)
        self.assertCleanLog(proxy)

    async def test_interimThenGarbage(self) -> None:
        """
        An interim response followed by bytes that are not a response is
        502 upstream_reset.
        """
        upstream, proxy = await self.startFraming()
        [answer, after] = await self.exchanges(proxy, [(b"GET", b"/f/interim")])
        self.assertEqual(answer.status, 502)
        self.assertEqual(json.loads(answer.body)["code"], "upstream_reset")
        self.assertEqual(after.body, b"ok")
        self.assertCleanLog(proxy)

    async def test_headerCount(self) -> None:
        """
        A response with 100 header fields is relayed; one with 101 is 502
        upstream_headers_too_large.
        """
        upstream, proxy = await self.startFraming()
        [hundred, many, after] = await self.exchanges(
            proxy, [(b"GET", b"/f/hundred"), (b"GET", b"/f/many")]
        )
        self.assertEqual((hundred.status, hundred.body), (200, b"ok"))
        self.assertEqual(len([n for n in hundred.headers if n.startswith(b"x-h")]), 99)
        self.assertEqual(many.status, 502)
        self.assertEqual(json.loads(many.body)["code"], "upstream_headers_too_large")
        self.assertEqual(after.body, b"ok")
        self.assertCleanLog(proxy)

    async def test_headersSizeOption(self) -> None:
        """
        With --max-upstream-headers-size 1024, a 1500-byte response head is
        502 upstream_headers_too_large, logged and counted as such.
        """
        upstream, proxy = await self.startFraming("--max-upstream-headers-size", "1024")
        [kilo, after] = await self.exchanges(proxy, [(b"GET", b"/f/kilo")])
        self.assertEqual(after.body, b"ok")
        self.assertCleanLog(proxy)
        self.assertEqual(kilo.status, 502)
        self.assertEqual(json.loads(kilo.body)["code"], "upstream_headers_too_large")
        self.assertIn(
            f"upstream {upstream.address} sent response heads over 1024 bytes;"
            " connection dropped",
            proxy.log(),
        )
        records = proxy.accessLog()
        self.assertEqual(
            [(r["path"], r["status"], r["error"]) for r in records[:1]],
            [("/f/kilo", 502, "upstream_headers_too_large")],
        )
        _, body = await self.get(proxy.adminURL + "/metrics")
        [series] = [
            line
            for line in body.decode().splitlines()
            if line.startswith("monedge_upstream_errors_total{")
            and 'kind="headers_too_large"' in line
        ]
        self.assertTrue(series.endswith(" 1.0"), series)

    async def test_hugeHeadersBounded(self) -> None:
        """
        An upstream that sends a 64 MiB header is cut off once 64 KiB have
        come: 502 upstream_headers_too_large within seconds, the upstream
        connection closed, and monedge's memory barely moves (it grew by
        245 MiB when it relayed them).
        """
        upstream, proxy = await self.startFraming()
        baseline = proxy.rss()
        started = time.monotonic()
        [answer, after] = await self.exchanges(proxy, [(b"GET", b"/f/huge")])
        elapsed = time.monotonic() - started
        grown = proxy.rss() - baseline
        await proxy.waitFor(
            lambda: not upstream.open, 5, "the upstream connection to close"
        )
        self.assertEqual(after.body, b"ok")
        self.assertCleanLog(proxy)
        self.assertEqual(answer.status, 502)
        self.assertEqual(json.loads(answer.body)["code"], "upstream_headers_too_large")
        self.assertLess(elapsed, 5)
        self.assertLess(grown, 16 * 1024 * 1024, f"RSS grew by {grown} bytes")


class OptionTests(SynchronousTestCase):
    """
    The two upstream head limits are options, validated like the others.
    """

    def parse(self, *args: str) -> Options:
        registry = self.mktemp()
        writeRegistry(registry, {})
        options = Options()
        options.parseOptions(["--registry", f"static:{registry}", *args])
        return options

    def test_defaults(self) -> None:
        """
        64 KiB and 100 fields by default.
        """
        options = self.parse()
        self.assertEqual(
            (
                options["max-upstream-headers-size"],
                options["max-upstream-header-count"],
            ),
            (65536, 100),
        )

    def test_values(self) -> None:
        """
        Positive whole numbers are taken; anything else is a one-line usage
        error naming the option.
        """
        from twisted.python.usage import UsageError

        options = self.parse(
            "--max-upstream-headers-size", "1024", "--max-upstream-header-count", "7"
        )
        self.assertEqual(
            (
                options["max-upstream-headers-size"],
                options["max-upstream-header-count"],
            ),
            (1024, 7),
        )
        for option in ("--max-upstream-headers-size", "--max-upstream-header-count"):
            for value in ("0", "-1", "64KiB", "1.5"):
                with self.assertRaises(UsageError) as caught:
                    self.parse(option, value)
                message = str(caught.exception)
                self.assertIn(option, message)
                self.assertNotIn("\n", message)
