"""
The HTTP/2 attack suite (issue 15, items 8 and 10): each known attack on an
HTTP/2 server, one case per class, against a real C{twistd monedge} over
real sockets (TLS with ALPN C{h2}, and cleartext with prior knowledge).

Every case asserts three things:

 - what the client gets: GOAWAY with which error code and then the
   connection closed, RST_STREAM with which code on which stream, or the
   answers of well-behaved streams on the same connection;
 - what it cost monedge: CPU time (utime + stime from C{/proc/PID/stat})
   and resident memory (C{VmRSS} and C{VmHWM} from C{/proc/PID/status})
   over the attack, each under a bound;
 - that monedge still answers a well-behaved client afterwards, over
   HTTP/2 (the C{h2} package's own client) and over HTTP/1.1.

The clients are L{tests.h2peer.H2Peer}: frames built with C{hyperframe} and
C{hpack}, so that a case can be as hostile as it likes.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from twisted.internet import threads
from twisted.internet.defer import Deferred
from twisted.web.server import NOT_DONE_YET, Request

from monedge.testing import ProxyProcess, Received, RecordingUpstream, freePort
from monedge.testing.tls import CertificateAuthority
from tests.e2e import ProxyTestCase
from tests.h2peer import (
    DATA,
    HEADERS,
    SETTINGS,
    WINDOW_UPDATE,
    H2Peer,
    continuationFrame,
    dataFrame,
    h2Get,
    headersFrames,
    pingFrame,
    rawFrame,
    rstStreamFrame,
    settingsFrame,
    windowUpdateFrame,
)

HOST = "api.example.com"

T = TypeVar("T")

#: The most CPU time monedge may spend on one bounded flood.
CPU_BOUND = 0.5
#: The most CPU time monedge may spend on a connection it is only waiting
#: on, over L{IDLE_SECONDS}.
IDLE_CPU_BOUND = 0.05
IDLE_SECONDS = 1.5
#: The most monedge's resident memory may grow over one case.
RSS_BOUND = 50 * 1024 * 1024

#: monedge's --send-timeout in the zero-window case.
SEND_TIMEOUT = 2.0

#: The response body of C{/svc/big}: larger than every window in play.
BIG_BODY = bytes(range(256)) * 1024


@dataclass(frozen=True)
class Usage:
    """
    A process's CPU time so far and its memory, from C{/proc}.

    @ivar cpu: user and system CPU time, in seconds.
    @ivar rss: resident set size, in bytes.
    @ivar peak: the most the resident set size has been, in bytes.
    """

    cpu: float
    rss: int
    peak: int

    @classmethod
    def of(cls, pid: int) -> Usage:
        """
        The usage of process C{pid} now.
        """
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        # Fields 14 and 15 of proc(5), counted after the command's ")".
        ticks = int(fields[11]) + int(fields[12])
        memory = {}
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    memory[name] = int(value.split()[0]) * 1024
        return cls(ticks / os.sysconf("SC_CLK_TCK"), memory["VmRSS"], memory["VmHWM"])


class HoldingUpstream:
    """
    An upstream responder that holds every request for C{/hold...} until
    L{release}, answers C{/big} with L{BIG_BODY}, and anything else with
    the default JSON echo.
    """

    def __init__(self) -> None:
        self.held: list[Request] = []
        self.released = False

    def __call__(self, request: Request, seen: Received) -> bytes | int | None:
        if seen.uri.startswith(b"/hold") and not self.released:
            self.held.append(request)
            return NOT_DONE_YET
        if seen.uri.startswith(b"/big"):
            request.setHeader(b"content-type", b"application/octet-stream")
            return BIG_BODY
        return None

    def release(self) -> None:
        """
        Answer every held request still waiting, and hold no more.
        """
        self.released = True
        held, self.held = self.held, []
        for request in held:
            if request.finished or request.channel is None:
                continue
            request.setHeader(b"content-type", b"application/json")
            request.write(b'{"held": true}')
            request.finish()


class _AttackCases(ProxyTestCase):
    """
    The attack cases, over the transport a subclass chooses.
    """

    timeout = 60
    #: Whether the client speaks TLS (ALPN h2) or cleartext HTTP/2 with
    #: prior knowledge.
    useTLS = True

    def setUp(self) -> None:
        super().setUp()
        self.ca = CertificateAuthority()
        self.tlsDir = os.path.join(self.directory, "tls")
        os.makedirs(self.tlsDir)
        with open(os.path.join(self.tlsDir, "default.pem"), "wb") as f:
            f.write(self.ca.issue([HOST]))
        caFile = os.path.join(self.directory, "ca.pem")
        with open(caFile, "wb") as f:
            f.write(self.ca.certificatePEM)
        self.context = ssl.create_default_context(cafile=caFile)
        self.context.set_alpn_protocols(["h2"])
        self.tlsPort = freePort()
        self.holding = HoldingUpstream()
        self.addCleanup(self.holding.release)

    async def startEdge(self, *args: str) -> tuple[ProxyProcess, RecordingUpstream]:
        """
        An upstream (L{HoldingUpstream}) and a monedge in front of it with
        a TLS listener: C{/svc/...} routes to the upstream.
        """
        upstream = self.startUpstream(self.holding)
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream.address]}},
            [
                "--tls-port",
                f"tcp:{self.tlsPort}:interface=127.0.0.1",
                "--tls-dir",
                self.tlsDir,
                *args,
            ],
        )
        self.proxy = proxy
        self.upstream = upstream
        # The proxy is up once its plain and admin ports answer; the TLS
        # listener may come a moment later.
        await proxy.waitFor(
            lambda: accepts(self.tlsPort), 10, "the TLS listener to accept"
        )
        return proxy, upstream

    @property
    def port(self) -> int:
        """
        The port this transport's clients connect to.
        """
        return self.tlsPort if self.useTLS else self.proxy.port

    def connect(
        self, settings: dict[int, int] | None = None, connectionWindow: int = 0
    ) -> H2Peer:
        """
        A raw client connection, its preface sent.  Blocking.
        """
        peer = H2Peer(
            self.port,
            self.context if self.useTLS else None,
            HOST,
            settings,
            connectionWindow,
        )
        self.addCleanup(peer.close)
        return peer

    def usage(self) -> Usage:
        """
        monedge's usage now.
        """
        assert self.proxy.process is not None
        return Usage.of(self.proxy.process.pid)

    def inThread(self, function: Callable[[], T]) -> Deferred[T]:
        """
        Run a blocking client in a thread, so that the reactor serves the
        upstream meanwhile.
        """
        return threads.deferToThread(function)

    def assertCost(
        self, before: Usage, after: Usage, cpu: float = CPU_BOUND, what: str = ""
    ) -> None:
        """
        monedge spent at most C{cpu} seconds of CPU between C{before} and
        C{after}, and its memory grew by at most L{RSS_BOUND} (at its peak
        as well as at the end).
        """
        spent = after.cpu - before.cpu
        grown = max(after.rss, after.peak) - before.rss
        self.assertLessEqual(spent, cpu, f"{what}: {spent:.2f} s of CPU")
        self.assertLessEqual(grown, RSS_BOUND, f"{what}: RSS grew {grown >> 20} MiB")

    def assertConnectionError(
        self, peer: H2Peer, code: ErrorCodes, what: str = ""
    ) -> None:
        """
        The server sent one GOAWAY, with C{code}, and then closed the
        connection; it sent nothing HTTP/2 forbids.
        """
        self.assertTrue(
            peer.closed,
            f"{what}: the connection is still open"
            f" ({len(peer.goaways)} GOAWAYs: {peer.goaways[:3]})",
        )
        self.assertEqual(
            [ErrorCodes(g.errorCode) for g in peer.goaways[:3]],
            [code],
            f"{what}: {len(peer.goaways)} GOAWAYs",
        )
        self.assertEqual(peer.violations, [], what)

    async def assertStillServes(self) -> None:
        """
        monedge answers a well-behaved HTTP/2 client (the C{h2} package's)
        on a new connection of this transport, and an HTTP/1.1 client.
        """
        status, body = await self.inThread(
            lambda: h2Get(
                self.port, self.context if self.useTLS else None, HOST, "/svc/after"
            )
        )
        self.assertEqual(status, 200, body)
        self.assertIn(b'"/after"', body)
        response, _ = await self.get(self.proxy.url + "/svc/after")
        self.assertEqual(response.code, 200)

    # The cases

    async def pingFlood(self) -> None:
        count = 100_000
        await self.startEdge()

        def attack() -> tuple[H2Peer, int, Usage]:
            peer = self.connect()
            peer.handshake()
            before = self.usage()
            flood = b"".join(pingFrame(i.to_bytes(8, "big")) for i in range(count))
            written = peer.write(flood, read=False)
            peer.readUntilClosed(5)
            return peer, written, before

        peer, written, before = await self.inThread(attack)
        after = self.usage()
        self.assertConnectionError(peer, ErrorCodes.ENHANCE_YOUR_CALM, "PING flood")
        self.assertLess(peer.pingAcks, count)
        self.assertCost(before, after, what="PING flood")
        await self.assertStillServes()

    async def settingsFlood(self) -> None:
        count = 100_000
        await self.startEdge()

        def attack() -> tuple[H2Peer, Usage]:
            peer = self.connect()
            peer.handshake()
            before = self.usage()
            flood = settingsFrame({SettingCodes.MAX_CONCURRENT_STREAMS: 100}) * count
            peer.write(flood, read=False)
            peer.readUntilClosed(5)
            return peer, before

        peer, before = await self.inThread(attack)
        after = self.usage()
        self.assertConnectionError(peer, ErrorCodes.ENHANCE_YOUR_CALM, "SETTINGS flood")
        # One ACK for the preface's SETTINGS, and not one for each of the
        # flood's.
        self.assertLess(peer.settingsAcks, count)
        self.assertCost(before, after, what="SETTINGS flood")
        await self.assertStillServes()

    def floodBlock(self, peer: H2Peer) -> tuple[bytes, bytes]:
        """
        The start of an endless header block on stream 1 (a HEADERS frame
        without END_HEADERS), and one 16 KB CONTINUATION frame of valid
        HPACK fields that never ends it.
        """
        first = headersFrames(1, peer.requestBlock(b"/svc/flood"), endHeaders=False)
        field = b"\x00\x07x-flood\x64" + b"a" * 100
        return first, continuationFrame(1, field * 148)

    async def continuationFlood(self) -> None:
        await self.startEdge()

        def attack() -> tuple[H2Peer, Usage]:
            peer = self.connect()
            peer.handshake()
            before = self.usage()
            first, more = self.floodBlock(peer)
            # 1 MiB of header block: 32 times the header limit.
            peer.write(first + more * 64)
            peer.readUntilClosed(5)
            return peer, before

        peer, before = await self.inThread(attack)
        after = self.usage()
        self.assertConnectionError(peer, CONTINUATION_FLOOD_CODE, "CONTINUATION flood")
        self.assertEqual(self.upstreamCount(), 0)
        self.assertCost(before, after, what="CONTINUATION flood")
        await self.assertStillServes()

    async def continuationFloodIgnoringGoaway(self) -> None:
        budget = 64 * 1024 * 1024
        await self.startEdge()

        def attack() -> tuple[H2Peer, Usage, float]:
            peer = self.connect()
            peer.handshake()
            before = self.usage()
            first, more = self.floodBlock(peer)
            started = time.monotonic()
            peer.write(first)
            batch = more * 64
            # Go on past the GOAWAY, as the attack does, until monedge
            # closes the connection (or the budget is spent).
            while not peer.writeFailed and peer.sent < budget:
                if time.monotonic() - started > 8:
                    break
                peer.write(batch, timeout=2)
            peer.readUntilClosed(3)
            return peer, before, time.monotonic() - started

        peer, before, elapsed = await self.inThread(attack)
        after = self.usage()
        self.assertTrue(
            peer.writeFailed,
            f"monedge read {peer.sent >> 20} MiB of CONTINUATION frames"
            f" in {elapsed:.1f} s without closing the connection",
        )
        self.assertLess(peer.sent, budget)
        self.assertConnectionError(
            peer, CONTINUATION_FLOOD_CODE, "CONTINUATION flood, GOAWAY ignored"
        )
        self.assertEqual(self.upstreamCount(), 0)
        self.assertCost(before, after, what="CONTINUATION flood, GOAWAY ignored")
        await self.assertStillServes()

    async def rapidReset(self) -> None:
        pairs = 5_000
        await self.startEdge()

        def attack() -> tuple[H2Peer, Usage]:
            peer = self.connect()
            peer.handshake()
            before = self.usage()
            flood = bytearray()
            for index in range(pairs):
                stream = 1 + 2 * index
                flood += peer.request(stream, b"/svc/reset")
                flood += rstStreamFrame(stream, ErrorCodes.CANCEL)
            peer.write(bytes(flood))
            peer.readUntilClosed(5)
            return peer, before

        peer, before = await self.inThread(attack)
        after = self.usage()
        self.assertConnectionError(peer, ErrorCodes.ENHANCE_YOUR_CALM, "Rapid Reset")
        self.assertLessEqual(self.upstreamCount(), RAPID_RESET_UPSTREAM_BOUND)
        self.assertCost(before, after, what="Rapid Reset")
        await self.assertStillServes()

    def upstreamCount(self) -> int:
        """
        How many requests the upstream has received.
        """
        return len(self.upstream.received)

    async def connectionErrors(self) -> None:
        await self.startEdge()
        cases: list[tuple[str, Callable[[H2Peer], bytes], ErrorCodes]] = [
            (
                "DATA on stream 0",
                lambda peer: rawFrame(DATA, 0, 0, b"x"),
                ErrorCodes.PROTOCOL_ERROR,
            ),
            (
                "HEADERS on an even stream",
                lambda peer: peer.request(2, b"/svc/even"),
                ErrorCodes.PROTOCOL_ERROR,
            ),
            (
                "SETTINGS of 5 bytes",
                lambda peer: rawFrame(SETTINGS, 0, 0, b"\0" * 5),
                ErrorCodes.FRAME_SIZE_ERROR,
            ),
            (
                "a frame over SETTINGS_MAX_FRAME_SIZE",
                lambda peer: (
                    peer.request(1, b"/svc/big", b"POST", endStream=False)
                    + rawFrame(DATA, 0, 1, b"x" * 16385)
                ),
                ErrorCodes.FRAME_SIZE_ERROR,
            ),
            (
                "an undecodable HPACK block",
                lambda peer: rawFrame(HEADERS, 0x5, 1, b"\x80"),
                ErrorCodes.COMPRESSION_ERROR,
            ),
            (
                "a connection window over 2^31-1",
                lambda peer: rawFrame(
                    WINDOW_UPDATE, 0, 0, (2**31 - 1).to_bytes(4, "big")
                ),
                ErrorCodes.FLOW_CONTROL_ERROR,
            ),
        ]

        def attack() -> tuple[list[tuple[str, H2Peer, ErrorCodes]], Usage]:
            before = self.usage()
            results = []
            for name, build, code in cases:
                peer = self.connect()
                peer.handshake()
                peer.write(build(peer))
                peer.readUntilClosed(3)
                results.append((name, peer, code))
            return results, before

        results, before = await self.inThread(attack)
        after = self.usage()
        for name, peer, code in results:
            self.assertConnectionError(peer, code, name)
        self.assertEqual(self.upstreamCount(), 0)
        self.assertCost(before, after, what="connection errors")
        await self.assertStillServes()

    def waitForHeld(self, count: int, timeout: float = 5.0) -> bool:
        """
        Wait, in a client thread, until the upstream holds C{count}
        requests; whether it does.
        """
        deadline = time.monotonic() + timeout
        while len(self.holding.held) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return len(self.holding.held) >= count

    async def streamsBeyondTheLimit(self) -> None:
        await self.startEdge()
        streams = [1 + 2 * i for i in range(101)]
        allowed, extra = streams[:100], streams[100]

        def attack() -> tuple[H2Peer, Usage, bool]:
            peer = self.connect()
            peer.handshake()
            before = self.usage()
            peer.write(b"".join(peer.request(s, b"/svc/hold/%d" % s) for s in streams))
            peer.readUntil(lambda: peer.answered(extra), 5)
            return peer, before, self.waitForHeld(100)

        peer, before, held = await self.inThread(attack)
        self.assertEqual(
            peer.serverSettings.get(SettingCodes.MAX_CONCURRENT_STREAMS), 100
        )
        self.assertEqual(peer.goaways, [])
        self.assertEqual(peer.stream(extra).reset, ErrorCodes.REFUSED_STREAM)
        self.assertIsNone(peer.stream(extra).headers)
        self.assertTrue(held, f"the upstream holds {len(self.holding.held)}")
        self.assertEqual([s for s in allowed if peer.answered(s)], [])
        self.holding.release()

        def rest() -> H2Peer:
            peer.readUntil(peer.allAnswered(allowed), 5)
            # A stream opened now that the others are done is answered.
            peer.write(peer.request(extra + 2, b"/svc/later"))
            peer.readUntil(lambda: peer.answered(extra + 2), 5)
            return peer

        await self.inThread(rest)
        after = self.usage()
        statuses = {
            s: (peer.stream(s).status, bytes(peer.stream(s).body)) for s in allowed
        }
        self.assertEqual(
            [s for s, answer in statuses.items() if answer != (200, b'{"held": true}')],
            [],
            statuses,
        )
        self.assertEqual(peer.stream(extra + 2).status, 200)
        self.assertEqual((peer.goaways, peer.closed, peer.violations), ([], False, []))
        uris = sorted(r.uri for r in self.upstream.received)
        self.assertEqual(uris, sorted([b"/hold/%d" % s for s in allowed] + [b"/later"]))
        self.assertCost(before, after, what="101 streams")
        await self.assertStillServes()

    async def zeroWindow(self) -> None:
        await self.startEdge("--send-timeout", f"{SEND_TIMEOUT:g}s")

        def attack() -> tuple[H2Peer, Usage, Usage, float]:
            peer = self.connect({SettingCodes.INITIAL_WINDOW_SIZE: 0})
            peer.autoWindow = False
            peer.handshake()
            started = time.monotonic()
            peer.write(peer.request(1, b"/svc/big"))
            # The upstream answered: monedge has a body it may not send.
            peer.readUntil(lambda: len(self.upstream.received) > 0, 5)
            peer.idle(0.2)
            before = self.usage()
            peer.idle(IDLE_SECONDS)
            idle = self.usage()
            peer.readUntil(lambda: peer.answered(1) or peer.closed, SEND_TIMEOUT + 2)
            return peer, before, idle, time.monotonic() - started

        peer, before, idle, elapsed = await self.inThread(attack)
        after = self.usage()
        self.assertLessEqual(
            idle.cpu - before.cpu,
            IDLE_CPU_BOUND,
            f"{idle.cpu - before.cpu:.2f} s of CPU waiting on a zero window",
        )
        stream = peer.stream(1)
        self.assertEqual(stream.flowControlled, 0, "DATA sent into a zero window")
        self.assertFalse(stream.ended)
        # The send timeout ends the stream alone, not the connection.
        self.assertEqual(
            (stream.reset, peer.goaways, peer.closed),
            (ErrorCodes.CANCEL, [], False),
            f"after {elapsed:.1f} s",
        )
        self.assertTrue(
            SEND_TIMEOUT * 0.9 <= elapsed <= SEND_TIMEOUT + 2,
            f"reset after {elapsed:.1f} s, not the send timeout's {SEND_TIMEOUT} s",
        )
        self.assertEqual(peer.violations, [])
        self.assertCost(before, after, what="zero window")
        await self.assertStillServes()

    async def windowGoesNegative(self) -> None:
        await self.startEdge()

        def attack() -> tuple[H2Peer, Usage, list[int]]:
            # Only the stream's window binds: the connection's is wide.
            peer = self.connect(connectionWindow=16 * 1024 * 1024)
            peer.autoWindow = False
            peer.handshake()
            before = self.usage()
            stream = peer.stream(1)
            seen = []
            peer.write(peer.request(1, b"/svc/big"))
            peer.readUntil(lambda: stream.flowControlled >= 65535, 5)
            peer.idle(0.3)
            seen.append(stream.flowControlled)
            # Mid-response, the initial window drops to 16 KiB: the
            # stream's window is now 16384 - 65535 = -49151.
            acks = peer.settingsAcks
            peer.write(settingsFrame({SettingCodes.INITIAL_WINDOW_SIZE: 16384}))
            peer.readUntil(lambda: peer.settingsAcks > acks, 5)
            # Back to zero: still nothing may be sent.
            peer.write(windowUpdateFrame(1, 49151))
            peer.idle(0.5)
            seen.append(stream.flowControlled)
            # 16 KiB of window: exactly 16 KiB more.
            peer.write(windowUpdateFrame(1, 16384))
            peer.readUntil(lambda: stream.flowControlled >= 65535 + 16384, 5)
            peer.idle(0.3)
            seen.append(stream.flowControlled)
            # Then read as a client does, to the end.
            peer.autoWindow = True
            peer.write(windowUpdateFrame(1, 65536))
            peer.readUntil(lambda: peer.answered(1), 5)
            peer.write(peer.request(3, b"/svc/next"))
            peer.readUntil(lambda: peer.answered(3), 5)
            return peer, before, seen

        peer, before, seen = await self.inThread(attack)
        after = self.usage()
        self.assertEqual(seen, [65535, 65535, 65535 + 16384])
        stream = peer.stream(1)
        self.assertEqual((stream.status, stream.ended, stream.reset), (200, True, None))
        self.assertTrue(bytes(stream.body) == BIG_BODY, f"{len(stream.body)} bytes")
        self.assertEqual(peer.stream(3).status, 200)
        self.assertEqual((peer.goaways, peer.closed, peer.violations), ([], False, []))
        self.assertCost(before, after, what="negative window")
        await self.assertStillServes()

    async def headerLimits(self) -> None:
        await self.startEdge()
        # Over --max-header-count (100), and over --max-headers-size
        # (32 KiB) by a few bytes, each header under --max-header-line.
        many = [(b"x-many-%d" % i, b"v") for i in range(101)]
        large = [(b"x-large-%d" % i, b"b" * 8000) for i in range(4)]
        large.append((b"x-large-4", b"b" * 800))
        underscores = [
            (b"x_first", b"1"),
            (b"x-keep-1", b"a"),
            (b"x_middle", b"2"),
            (b"x-keep-2", b"b"),
            (b"x_last", b"3"),
        ]
        requests = [
            (1, b"/svc/many", many),
            (3, b"/svc/large", large),
            (5, b"/svc/underscores", underscores),
            (7, b"/svc/host-same", [(b"host", HOST.encode())]),
            (9, b"/svc/host-other", [(b"host", b"other.example.com")]),
            (11, b"/svc/fine", [(b"x-fine-%d" % i, b"v") for i in range(50)]),
        ]
        streams = [s for s, _, _ in requests]

        def attack() -> tuple[H2Peer, Usage]:
            peer = self.connect()
            peer.handshake()
            before = self.usage()
            for stream, path, extra in requests:
                peer.write(peer.request(stream, path, extra=extra))
            peer.readUntil(peer.allAnswered(streams), 5)
            return peer, before

        peer, before = await self.inThread(attack)
        after = self.usage()
        answers = {s: errorAnswer(peer, s) for s in streams}
        self.assertEqual(
            answers,
            {
                1: (431, "headers_too_large"),
                3: (431, "headers_too_large"),
                5: (200, None),
                7: (200, None),
                9: (400, "missing_host"),
                11: (200, None),
            },
        )
        self.assertEqual((peer.goaways, peer.closed, peer.violations), ([], False, []))
        received = {r.uri: r for r in self.upstream.received}
        self.assertEqual(sorted(received), [b"/fine", b"/host-same", b"/underscores"])
        seen = received[b"/underscores"]
        self.assertEqual(
            [
                n.lower()
                for n, _ in seen.headers
                if n.lower().startswith(b"x")
                and not n.lower().startswith((b"x-forwarded", b"x-real", b"x-request"))
            ],
            [b"x-keep-1", b"x-keep-2"],
        )
        self.assertEqual(received[b"/host-same"].header(b"host"), [HOST.encode()])
        self.assertCost(before, after, what="header limits")
        await self.assertStillServes()

    async def streamErrors(self) -> None:
        await self.startEdge()

        def attack() -> tuple[H2Peer, Usage]:
            peer = self.connect()
            peer.handshake()
            before = self.usage()
            # Stream 1 waits on the upstream: half-closed (remote) at
            # monedge, where DATA is a stream error (RFC 9113, 5.1).
            peer.write(peer.request(1, b"/svc/hold/1"))
            self.waitForHeld(1)
            peer.write(dataFrame(1, b"late"))
            # Malformed requests (RFC 9113, 8.1.1): an unknown
            # pseudo-header, an upper-case name.
            peer.write(peer.request(3, b"/svc/bad", extra=[(b":foo", b"bar")]))
            peer.write(peer.request(5, b"/svc/bad", extra=[(b"X-Upper", b"x")]))
            peer.write(peer.request(7, b"/svc/fine"))
            peer.readUntil(peer.allAnswered([1, 3, 5, 7]), 5)
            return peer, before

        peer, before = await self.inThread(attack)
        after = self.usage()
        self.assertEqual(
            {s: (peer.stream(s).status, peer.stream(s).reset) for s in (1, 3, 5, 7)},
            {
                1: (None, ErrorCodes.STREAM_CLOSED),
                3: (None, ErrorCodes.PROTOCOL_ERROR),
                5: (None, ErrorCodes.PROTOCOL_ERROR),
                7: (200, None),
            },
        )
        self.assertEqual((peer.goaways, peer.closed, peer.violations), ([], False, []))
        self.assertEqual(
            sorted(r.uri for r in self.upstream.received), [b"/fine", b"/hold/1"]
        )
        self.assertCost(before, after, what="stream errors")
        await self.assertStillServes()


def accepts(port: int) -> bool:
    """
    Whether something accepts connections on C{port} of 127.0.0.1.
    """
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


def errorAnswer(peer: H2Peer, streamId: int) -> tuple[int | None, str | None]:
    """
    The status a stream was answered with, and the error code of its JSON
    body (L{None} for a 2xx).
    """
    stream = peer.streams.get(streamId)
    if stream is None or not stream.ended:
        return None, f"not answered: {stream}"
    if stream.status is not None and stream.status < 400:
        return stream.status, None
    try:
        code = json.loads(bytes(stream.body))["code"]
    except (ValueError, KeyError):
        return stream.status, f"body {bytes(stream.body)[:100]!r}"
    return stream.status, str(code)


#: The GOAWAY code for a header block that grows past the limit.
CONTINUATION_FLOOD_CODE = ErrorCodes.ENHANCE_YOUR_CALM

#: The most requests a Rapid Reset flood may get to the upstream.
RAPID_RESET_UPSTREAM_BOUND = 100


class TLSAttackTests(_AttackCases):
    """
    Each attack over TLS with ALPN C{h2}.
    """

    useTLS = True

    async def test_pingFlood(self) -> None:
        """
        100,000 PINGs sent without reading a byte: monedge stops
        answering, sends GOAWAY with ENHANCE_YOUR_CALM and closes, having
        spent under half a second of CPU and no memory to speak of.
        """
        await self.pingFlood()

    async def test_settingsFlood(self) -> None:
        """
        100,000 SETTINGS frames (each owed an ACK) sent without reading:
        GOAWAY with ENHANCE_YOUR_CALM, closed, CPU and memory bounded.
        """
        await self.settingsFlood()

    async def test_continuationFlood(self) -> None:
        """
        A HEADERS frame without END_HEADERS followed by 1 MiB of
        CONTINUATION frames (CVE-2024-27316): a connection error once the
        block passes the header limit (GOAWAY, then closed), nothing
        upstream, memory bounded.
        """
        await self.continuationFlood()

    async def test_continuationFloodIgnoringGoaway(self) -> None:
        """
        The same flood from a client that ignores the GOAWAY and keeps
        sending (up to 64 MiB): monedge closes the connection, so the
        client's writes fail long before the budget is spent, and its
        memory does not grow with what was sent.
        """
        await self.continuationFloodIgnoringGoaway()

    async def test_rapidReset(self) -> None:
        """
        5,000 HEADERS + RST_STREAM pairs (Rapid Reset, CVE-2023-44487):
        GOAWAY with ENHANCE_YOUR_CALM and closed, at most
        L{RAPID_RESET_UPSTREAM_BOUND} requests reach the upstream, CPU and
        memory bounded.
        """
        await self.rapidReset()

    async def test_connectionErrors(self) -> None:
        """
        Each connection-level error gets a GOAWAY with its own code and
        then monedge closes the connection: DATA on stream 0 and HEADERS
        on an even stream (PROTOCOL_ERROR), a SETTINGS frame of 5 bytes and
        a frame over the maximum frame size (FRAME_SIZE_ERROR), an
        undecodable HPACK block (COMPRESSION_ERROR), a connection window
        past 2^31-1 (FLOW_CONTROL_ERROR).
        """
        await self.connectionErrors()

    async def test_streamsBeyondTheLimit(self) -> None:
        """
        101 streams opened at once on a limit of 100 (the server's
        SETTINGS_MAX_CONCURRENT_STREAMS), held open by a slow upstream:
        the 101st is refused with RST_STREAM REFUSED_STREAM and never
        reaches the upstream, the other 100 are all answered, there is no
        GOAWAY, and a stream opened afterwards is answered.
        """
        await self.streamsBeyondTheLimit()

    async def test_zeroWindow(self) -> None:
        """
        A client that advertises a zero initial window and never updates
        it: monedge sends no DATA, spends next to no CPU while it waits,
        and the send timeout (here 2 s) ends the stream with RST_STREAM
        CANCEL, the connection left open.
        """
        await self.zeroWindow()

    async def test_windowGoesNegative(self) -> None:
        """
        SETTINGS_INITIAL_WINDOW_SIZE lowered mid-response makes the
        stream's window negative: monedge sends nothing until
        WINDOW_UPDATEs make it positive, then exactly what the window
        allows, and the response completes byte for byte on a connection
        that goes on serving.
        """
        await self.windowGoesNegative()

    async def test_headerLimits(self) -> None:
        """
        HTTP/1.1's header rules hold over HTTP/2, on the stream alone: 101
        headers, or headers over 32 KiB, are 431 headers_too_large;
        underscore names are dropped wherever they are in the block;
        a C{host} equal to C{:authority} is the one Host, a different one
        is 400 missing_host; the connection goes on serving.
        """
        await self.headerLimits()

    async def test_streamErrors(self) -> None:
        """
        Stream-level errors reset only their stream: DATA on a half-closed
        stream is RST_STREAM STREAM_CLOSED, a malformed request (an unknown
        pseudo-header, an upper-case name) RST_STREAM PROTOCOL_ERROR, and a
        well-formed stream on the same connection is answered.
        """
        await self.streamErrors()


class CleartextAttackTests(_AttackCases):
    """
    The attacks that reach the protocol switch's sniffing, over cleartext
    HTTP/2 with prior knowledge on the plain listener.
    """

    useTLS = False

    async def test_priorKnowledge(self) -> None:
        """
        A client that starts with the HTTP/2 preface on the plain listener
        speaks HTTP/2 (the C{h2} package's client is answered), and an
        HTTP/1.1 client on the same port is answered as before.
        """
        await self.startEdge()
        await self.assertStillServes()

    async def test_pingFlood(self) -> None:
        """
        The PING flood over cleartext: GOAWAY with ENHANCE_YOUR_CALM,
        closed, CPU and memory bounded.
        """
        await self.pingFlood()

    async def test_continuationFloodIgnoringGoaway(self) -> None:
        """
        The CONTINUATION flood that ignores GOAWAY, over cleartext:
        monedge closes the connection, memory bounded.
        """
        await self.continuationFloodIgnoringGoaway()

    async def test_rapidReset(self) -> None:
        """
        Rapid Reset over cleartext: GOAWAY with ENHANCE_YOUR_CALM, closed,
        the upstream sees a bounded number of requests.
        """
        await self.rapidReset()

    async def test_connectionErrors(self) -> None:
        """
        Connection-level errors over cleartext: GOAWAY with each error's
        code, then closed.
        """
        await self.connectionErrors()
