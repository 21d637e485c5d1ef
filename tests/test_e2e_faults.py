"""
End-to-end fault scenarios: a real twistd monedge process between real
clients (treq, curl, raw sockets) and upstreams that misbehave on purpose,
all on 127.0.0.1.

Already covered elsewhere, and not repeated here: a single refusing
endpoint (test_e2e_core's StatusTests.test_upstreamRefused), an upstream
that never starts its answer (StatusTests.test_upstreamTimeout), a GET
retried past a refusing endpoint (BalancingTests.test_deadEndpointRetried),
and a registry file with a bad field on SIGHUP (test_e2e_lifecycle's
ReloadTests.test_invalidReloadKeepsTable).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, reactor, task, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IListeningPort
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.python.failure import Failure

from monedge.testing import ProxyProcess, freePort
from tests.e2e import ProxyTestCase

# Raw upstreams whose every byte is scripted


@dataclass
class ScriptedRequest:
    """
    One request as a L{ScriptedUpstream} received it.

    @ivar connection: the number of the connection it came on, from 1.
    @ivar index: its place on that connection, from 0.
    """

    method: bytes
    target: bytes
    head: bytes
    body: bytes
    connection: int
    index: int


#: What a L{ScriptedUpstream} does with each request, once it is all in.
Script = Callable[["ScriptedConnection", ScriptedRequest], None]


class ScriptedConnection(Protocol):
    """
    One connection to a L{ScriptedUpstream}: parses requests (a head and a
    C{Content-Length} body, if any) and hands each to the script, which
    answers through L{write}, L{reset}, L{close} and L{later}.
    """

    def __init__(self, upstream: ScriptedUpstream, number: int) -> None:
        self.upstream = upstream
        self.number = number
        self.count = 0
        self.lost: Deferred[None] = Deferred()
        self._buffer = b""
        self._request: ScriptedRequest | None = None
        self._remaining = 0
        self._calls: list[IDelayedCall] = []

    def connectionMade(self) -> None:
        self.upstream.open.append(self)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while self.transport is not None and self.transport.connected:  # type: ignore[attr-defined]
            request = self._request
            if request is None:
                head, found, rest = self._buffer.partition(b"\r\n\r\n")
                if not found:
                    return
                self._buffer = rest
                lines = head.split(b"\r\n")
                method, target, _ = lines[0].split(b" ", 2)
                self._remaining = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        self._remaining = int(value.strip())
                request = self._request = ScriptedRequest(
                    method, target, head, b"", self.number, self.count
                )
                self.count += 1
                self.upstream.requests.append(request)
            taken = self._buffer[: self._remaining]
            self._buffer = self._buffer[len(taken) :]
            request.body += taken
            self._remaining -= len(taken)
            if self._remaining:
                return
            self._request = None
            self.upstream.script(self, request)

    def write(self, data: bytes) -> None:
        """
        Send C{data} to the proxy.
        """
        assert self.transport is not None
        self.transport.write(data)

    def later(self, delay: float, f: Callable[[], object]) -> IDelayedCall:
        """
        Call C{f} after C{delay} seconds, unless the connection is gone.
        """
        call = reactor.callLater(delay, f)
        self._calls.append(call)
        return call

    def reset(self) -> None:
        """
        Reset the connection: SO_LINGER 0 and close, so the proxy gets an
        RST rather than a FIN.
        """
        transport: Any = self.transport
        if transport is None or not transport.connected:
            return
        transport.getHandle().setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
        )
        transport.abortConnection()

    def close(self) -> None:
        """
        Close the connection cleanly (a FIN).
        """
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls = []
        if self in self.upstream.open:
            self.upstream.open.remove(self)
        self.lost.callback(None)


class ScriptedUpstream(ServerFactory):
    """
    A raw HTTP/1.1 upstream on 127.0.0.1 that does what its script says
    with each request head, byte by byte, resets included.
    """

    noisy = False

    def __init__(self, script: Script) -> None:
        self.script = script
        self.requests: list[ScriptedRequest] = []
        self.open: list[ScriptedConnection] = []
        self.connections = 0
        self._port: IListeningPort | None = None

    def buildProtocol(self, addr: Any) -> ScriptedConnection:
        self.connections += 1
        return ScriptedConnection(self, self.connections)

    def start(self) -> None:
        """
        Listen on a free port.
        """
        self._port = reactor.listenTCP(0, self, interface="127.0.0.1")

    @property
    def address(self) -> str:
        """
        C{127.0.0.1:port}.
        """
        assert self._port is not None
        return f"127.0.0.1:{getattr(self._port.getHost(), 'port')}"  # noqa: B009

    async def stop(self) -> None:
        """
        Stop listening and drop every connection still open.
        """
        assert self._port is not None
        stopping = self._port.stopListening()
        if stopping is not None:
            await stopping
        waiting = [c.lost for c in self.open]
        for connection in list(self.open):
            if connection.transport is not None:
                connection.transport.abortConnection()  # type: ignore[attr-defined]
        await defer.gatherResults(waiting)

    def seen(self) -> list[tuple[int, int, str]]:
        """
        Every request so far as (connection, index, "METHOD target").
        """
        return [
            (r.connection, r.index, f"{r.method.decode()} {r.target.decode()}")
            for r in self.requests
        ]


def keepAliveAnswer(connection: ScriptedConnection, request: ScriptedRequest) -> None:
    """
    Answer 200 with a Content-Length, leaving the connection open; the body
    names the method and the connection.
    """
    body = f"{request.method.decode()} on connection {request.connection}".encode()
    connection.write(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
        % (len(body),)
    )
    if request.method != b"HEAD":
        connection.write(body)


FULL_LENGTH = 100_000
SENT = 30_000


def resetMidBody(chunked: bool) -> Script:
    """
    A script that starts a 100000-byte answer, sends 30000 bytes of it
    (framed by Content-Length or chunked), then resets the connection.
    """

    def script(connection: ScriptedConnection, request: ScriptedRequest) -> None:
        if chunked:
            connection.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                + b"%x\r\n" % (SENT,)
                + b"c" * SENT
                + b"\r\n"
            )
        else:
            connection.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (FULL_LENGTH,)
                + b"x" * SENT
            )
        # Long enough for the bytes to leave and be read before the RST,
        # which would otherwise discard them.
        connection.later(0.3, connection.reset)

    return script


def resetAtOnce(connection: ScriptedConnection, request: ScriptedRequest) -> None:
    """
    Reset the connection as soon as a request head arrives.
    """
    connection.reset()


def stallAfter(data: bytes) -> Script:
    """
    A script that sends C{data} and then nothing more, leaving the
    connection open.
    """

    def script(connection: ScriptedConnection, request: ScriptedRequest) -> None:
        connection.write(data)

    return script


def staleOnReuse(connection: ScriptedConnection, request: ScriptedRequest) -> None:
    """
    Answer the first request on each connection, keeping it alive; close a
    connection, unanswered, as soon as its second request arrives: the
    "closed just as it was reused" race, every time.
    """
    if request.index == 0:
        keepAliveAnswer(connection, request)
    else:
        connection.close()


def idleClose(seconds: float) -> Script:
    """
    A script that answers every request keeping the connection alive, and
    closes a connection idle for C{seconds}, as Node.js does after 5 s.
    """
    timers: dict[int, IDelayedCall] = {}

    def script(connection: ScriptedConnection, request: ScriptedRequest) -> None:
        keepAliveAnswer(connection, request)
        timer = timers.get(connection.number)
        if timer is not None and timer.active():
            timer.reset(seconds)
        else:
            timers[connection.number] = connection.later(seconds, connection.close)

    return script


# Raw clients


@dataclass
class RawResponse:
    """
    What a raw client read, how the connection ended (C{"closed"},
    C{"reset"} or C{"timeout"}, still open) and how long it took.
    """

    data: bytes
    ending: str
    elapsed: float

    @property
    def head(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[0]

    @property
    def body(self) -> bytes:
        return self.data.partition(b"\r\n\r\n")[2]

    @property
    def status(self) -> int:
        return int(self.head.split(b" ", 2)[1])

    def header(self, name: bytes) -> bytes | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None


def rawRequest(port: int, data: bytes, timeout: float) -> RawResponse:
    """
    Send C{data} on a new connection and read until the server closes or
    resets it, or C{timeout} passes with nothing more.  Blocking.
    """
    started = time.monotonic()
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    ending = "closed"
                    break
                chunks.append(chunk)
        except TimeoutError:
            ending = "timeout"
        except ConnectionResetError:
            ending = "reset"
    return RawResponse(b"".join(chunks), ending, time.monotonic() - started)


def deferRequest(port: int, data: bytes, timeout: float = 8.0) -> Deferred[RawResponse]:
    """
    L{rawRequest} in a thread.
    """
    return threads.deferToThread(rawRequest, port, data, timeout)


def keepAliveGet(path: str) -> bytes:
    """
    A GET that asks to keep the connection open: only a cut closes it.
    """
    return f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode()


def dechunk(body: bytes) -> tuple[bytes, bool]:
    """
    Decode a chunked body as far as it goes: the data, and whether the
    terminating zero-size chunk arrived.
    """
    data = b""
    while True:
        line, found, rest = body.partition(b"\r\n")
        if not found:
            return data, False
        size = int(line.split(b";")[0], 16)
        if size == 0:
            return data, rest.startswith(b"\r\n")
        if len(rest) < size + 2:
            return data + rest[:size], False
        data += rest[:size]
        body = rest[size + 2 :]


# Reading the proxy's state


def _later(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


def metric(text: str, series: str) -> float:
    """
    The value of C{series} (C{name{label="value",...}}) in Prometheus text:
    the sum of every sample of that name whose labels include those given
    (so C{kind="reset"} counts every service's), 0 if there is none.
    """
    name, _, rest = series.partition("{")
    wanted = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted.items() <= sample.labels.items()
    )


class FaultTestCase(ProxyTestCase):
    """
    Helpers to start scripted upstreams and read the proxy's logs and
    metrics.
    """

    async def startProxy(
        self,
        services: Mapping[str, Mapping[str, Any]],
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> ProxyProcess:
        """
        Start a proxy, as L{ProxyTestCase.startProxy} does, and check when
        the test ends that no fault made it log a traceback.
        """
        proxy = await super().startProxy(services, args, env)

        def noTraceback() -> None:
            log = proxy.log()
            for sign in ("Traceback", "Unhandled"):
                self.assertNotIn(sign, log, log[-3000:])

        # Cleanups run last first: this runs before the proxy is stopped.
        self.addCleanup(noTraceback)
        return proxy

    def startScripted(self, script: Script) -> ScriptedUpstream:
        """
        A scripted upstream on a free port, stopped after the test.
        """
        upstream = ScriptedUpstream(script)
        upstream.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(upstream.stop()))
        return upstream

    async def logged(self, proxy: ProxyProcess, path: str) -> dict[str, Any]:
        """
        The access-log record of the one request for C{path}, once written.
        """
        found: list[dict[str, Any]] = []

        def written() -> bool:
            found[:] = [r for r in proxy.accessLog() if r["path"] == path]
            return bool(found)

        await proxy.waitFor(written, 5, f"the access log record for {path}")
        [record] = found
        return record

    async def metrics(self, proxy: ProxyProcess) -> str:
        """
        The proxy's /metrics text.
        """
        _, body = await self.get(proxy.adminURL + "/metrics")
        return body.decode()

    async def routes(self, proxy: ProxyProcess) -> dict[str, Any]:
        """
        The proxy's /routes document.
        """
        _, body = await self.get(proxy.adminURL + "/routes")
        document: dict[str, Any] = json.loads(body)
        return document

    def assertErrorBody(
        self, status: int, headers: Any, body: bytes, code: str
    ) -> dict[str, Any]:
        """
        C{body} is monedge's documented JSON error for C{status} and
        C{code}, its request id the one in C{X-Request-Id}.
        """
        document: dict[str, Any] = json.loads(body)
        self.assertEqual(document["status"], status, body)
        self.assertEqual(document["code"], code, body)
        self.assertTrue(document["message"])
        self.assertEqual(
            document["request_id"], headers.getRawHeaders(b"x-request-id")[0].decode()
        )
        self.assertEqual(
            headers.getRawHeaders(b"content-type"), [b"application/json"], body
        )
        return document

    def assertCutOff(self, response: RawResponse) -> None:
        """
        A 200 whose Content-Length promised more than arrived, on a
        connection the proxy then closed.
        """
        self.assertEqual(response.status, 200, response.head)
        self.assertEqual(response.header(b"content-length"), b"%d" % (FULL_LENGTH,))
        self.assertLess(len(response.body), FULL_LENGTH)
        self.assertIn(response.ending, ("closed", "reset"), response.head)

    async def assertCurlCutOff(
        self, proxy: ProxyProcess, path: str, received: int, within: float = 30.0
    ) -> None:
        """
        curl, fetching C{path} through C{proxy}, gets a 200 with
        C{received} bytes and fails with 18 (partial file), within
        C{within} seconds.
        """
        started = time.monotonic()
        result = await self.curl(
            "-o", "/dev/null", "-w", "%{http_code} %{size_download}", proxy.url + path
        )
        self.assertLess(time.monotonic() - started, within)
        self.assertEqual(result.returncode, 18, result.stderr)
        self.assertEqual(result.stdout, b"200 %d" % (received,))

    async def assertLoggedCutOff(
        self, proxy: ProxyProcess, paths: Sequence[str], error: str
    ) -> None:
        """
        Each of C{paths} is in the access log as a 200 with C{error}, and
        the upstream-errors metric counts C{error} once for each.
        """
        for path in paths:
            record = await self.logged(proxy, path)
            self.assertEqual((record["status"], record["error"]), (200, error))
        self.assertEqual(
            metric(
                await self.metrics(proxy),
                f'monedge_upstream_errors_total{{kind="{error}"}}',
            ),
            len(paths),
        )


# 1. Refused connections


class RefusedTests(FaultTestCase):
    """
    A refused connection sent nothing, so it is retried on another
    endpoint whatever the method.
    """

    async def test_postRetriedOnLiveEndpoint(self) -> None:
        """
        With one refusing and one live endpoint, POSTs with a body all
        succeed, including those first sent to the refusing endpoint (seen
        in connect_refused): the body reaches the live upstream intact,
        once per request.
        """
        live = self.startUpstream()
        proxy = await self.startProxy(
            {
                "service.api.half": {
                    "endpoints": [f"127.0.0.1:{freePort()}", live.address]
                }
            }
        )
        series = 'monedge_upstream_errors_total{kind="connect_refused"}'
        sent = 0
        # Each request has an even chance of trying the refusing endpoint
        # first; stop once one has.
        while metric(await self.metrics(proxy), series) == 0:
            self.assertLess(sent, 30, "the refusing endpoint was never tried")
            body = b"payload %d" % (sent,)
            response = await self.http.post(proxy.url + f"/half/p{sent}", data=body)
            content = await response.content()
            self.assertEqual(response.code, 200, content)
            sent += 1
        self.assertEqual(metric(await self.metrics(proxy), series), 1)
        self.assertEqual(
            [(r.method, r.uri, r.body) for r in live.received],
            [(b"POST", b"/p%d" % (i,), b"payload %d" % (i,)) for i in range(sent)],
        )
        record = await self.logged(proxy, f"/half/p{sent - 1}")
        self.assertEqual(
            (record["status"], record["error"], record["endpoint"]),
            (200, None, live.address),
        )

    async def test_allRefusing502(self) -> None:
        """
        With only refusing endpoints, a POST is tried on one, retried once
        on the other, then answered 502 upstream_connect_failed with the
        documented JSON body; the access log records the code.
        """
        dead = [f"127.0.0.1:{freePort()}", f"127.0.0.1:{freePort()}"]
        proxy = await self.startProxy({"service.api.dead": {"endpoints": dead}})
        response = await self.http.post(proxy.url + "/dead/x", data=b"payload")
        body = await response.content()
        self.assertEqual(response.code, 502, body)
        document = self.assertErrorBody(
            502, response.headers, body, "upstream_connect_failed"
        )
        self.assertEqual(
            response.headers.getRawHeaders(b"cache-control"), [b"no-store"]
        )
        record = await self.logged(proxy, "/dead/x")
        self.assertEqual(record["status"], 502)
        self.assertEqual(record["error"], "upstream_connect_failed")
        self.assertEqual(record["request_id"], document["request_id"])
        self.assertIn(record["endpoint"], dead)
        self.assertEqual(
            metric(
                await self.metrics(proxy),
                'monedge_upstream_errors_total{kind="connect_refused"}',
            ),
            2,
        )


# 2. Resets


class ResetTests(FaultTestCase):
    """
    An upstream that resets its connection: before the response, a 502;
    after it started, a response that is visibly cut off, never one that
    looks complete.
    """

    async def test_resetMidContentLengthBody(self) -> None:
        """
        A Content-Length: 100000 answer reset after 30000 bytes reaches a
        raw client with the promised length, fewer bytes, and the
        connection closed although the client asked to keep it; curl fails
        with 18 (partial file). Each is logged as reset_mid_body, status
        200.
        """
        upstream = self.startScripted(resetMidBody(chunked=False))
        proxy = await self.startProxy(
            {"service.api.cut": {"endpoints": [upstream.address]}}
        )
        response = await deferRequest(proxy.port, keepAliveGet("/cut/raw"))
        self.assertCutOff(response)
        self.assertEqual(len(response.body), SENT)
        await self.assertCurlCutOff(proxy, "/cut/curl", SENT)
        await self.assertLoggedCutOff(
            proxy, ["/cut/raw", "/cut/curl"], "reset_mid_body"
        )
        for path in ("/cut/raw", "/cut/curl"):
            record = await self.logged(proxy, path)
            self.assertEqual(record["bytes_out"], SENT)

    async def test_resetMidChunkedBody(self) -> None:
        """
        A chunked answer reset mid-body reaches a raw client chunked, its
        data intact so far, without the terminating zero-size chunk, and
        the connection closed; curl fails with 18. Both are logged as
        reset_mid_body.
        """
        upstream = self.startScripted(resetMidBody(chunked=True))
        proxy = await self.startProxy(
            {"service.api.cut": {"endpoints": [upstream.address]}}
        )
        response = await deferRequest(proxy.port, keepAliveGet("/cut/raw"))
        self.assertEqual(response.status, 200, response.head)
        self.assertEqual(response.header(b"transfer-encoding"), b"chunked")
        self.assertIsNone(response.header(b"content-length"))
        data, complete = dechunk(response.body)
        self.assertFalse(complete, "the cut-off body ended with a zero-size chunk")
        self.assertEqual(data, b"c" * SENT)
        self.assertIn(response.ending, ("closed", "reset"))
        await self.assertCurlCutOff(proxy, "/cut/curl", SENT)
        await self.assertLoggedCutOff(
            proxy, ["/cut/raw", "/cut/curl"], "reset_mid_body"
        )

    async def test_resetBeforeResponse(self) -> None:
        """
        An upstream that resets the connection on receiving the request,
        before any response byte, is a 502 upstream_reset with the JSON
        error body (a fresh connection is not a stale one: nothing is
        retried, and the upstream saw the request once), logged with its
        code.
        """
        upstream = self.startScripted(resetAtOnce)
        proxy = await self.startProxy(
            {"service.api.rst": {"endpoints": [upstream.address]}}
        )
        response, body = await self.get(proxy.url + "/rst/x")
        self.assertEqual(response.code, 502, body)
        self.assertErrorBody(502, response.headers, body, "upstream_reset")
        self.assertEqual(upstream.seen(), [(1, 0, "GET /x")])
        record = await self.logged(proxy, "/rst/x")
        self.assertEqual((record["status"], record["error"]), (502, "upstream_reset"))
        self.assertEqual(
            metric(
                await self.metrics(proxy),
                'monedge_upstream_errors_total{kind="reset"}',
            ),
            1,
        )


# 3. Hangs


class HangTests(FaultTestCase):
    """
    An upstream that stops sending: within the head, the response timeout
    (504); within the body, the idle timeout cuts the response.
    """

    async def test_stallWithinHead(self) -> None:
        """
        An upstream that sends half a status line, or a status line and
        half its headers, then stalls, is a 504 upstream_timeout after the
        service's timeout (1 s here), not a hang and not a 502; logged with
        its code.  (An upstream that sends nothing at all is
        test_e2e_core's StatusTests.test_upstreamTimeout.)
        """
        halfLine = self.startScripted(stallAfter(b"HTTP/1.1 200 O"))
        halfHeaders = self.startScripted(
            stallAfter(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Len")
        )
        policy = {"timeout": "1s"}
        proxy = await self.startProxy(
            {
                "service.api.line": {"endpoints": [halfLine.address], "policy": policy},
                "service.api.head": {
                    "endpoints": [halfHeaders.address],
                    "policy": policy,
                },
            }
        )
        for path in ("/line/x", "/head/x"):
            started = time.monotonic()
            response, body = await self.get(proxy.url + path)
            elapsed = time.monotonic() - started
            self.assertEqual(response.code, 504, body)
            self.assertErrorBody(504, response.headers, body, "upstream_timeout")
            self.assertGreater(elapsed, 0.9)
            self.assertLess(elapsed, 5)
            record = await self.logged(proxy, path)
            self.assertEqual(
                (record["status"], record["error"]), (504, "upstream_timeout")
            )
        self.assertEqual(
            metric(
                await self.metrics(proxy),
                'monedge_upstream_errors_total{kind="timeout"}',
            ),
            2,
        )

    async def test_stallMidBody(self) -> None:
        """
        An upstream that sends its head and part of a Content-Length body,
        then nothing, is cut off by the service's idle-timeout (1 s here):
        a raw client sees the promised length, fewer bytes and the
        connection closed within the timeout plus slack; curl fails with
        18. Both are logged as body_idle_timeout, status 200.
        """
        upstream = self.startScripted(
            stallAfter(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (FULL_LENGTH,)
                + b"y" * 1000
            )
        )
        proxy = await self.startProxy(
            {
                "service.api.stall": {
                    "endpoints": [upstream.address],
                    "policy": {"idle-timeout": "1s", "timeout": "20s"},
                }
            }
        )
        response = await deferRequest(proxy.port, keepAliveGet("/stall/raw"))
        self.assertCutOff(response)
        self.assertEqual(response.body, b"y" * 1000)
        self.assertGreater(response.elapsed, 0.9)
        self.assertLess(response.elapsed, 5)
        await self.assertCurlCutOff(proxy, "/stall/curl", 1000, within=5)
        await self.assertLoggedCutOff(
            proxy, ["/stall/raw", "/stall/curl"], "body_idle_timeout"
        )


# 4. Stale pooled connections


class StalePoolTests(FaultTestCase):
    """
    A pooled upstream connection that the upstream closes just as monedge
    reuses it (docs/errors.md, the notes under "Codes"): an idempotent
    request is sent again, once, on a new connection; a POST or PATCH is
    not, and gets 502 upstream_reset.
    """

    async def startPool(self) -> tuple[ScriptedUpstream, ProxyProcess]:
        """
        A proxy in front of an upstream that closes each connection on its
        second request (L{staleOnReuse}).
        """
        upstream = self.startScripted(staleOnReuse)
        proxy = await self.startProxy(
            {"service.api.pool": {"endpoints": [upstream.address]}}
        )
        return upstream, proxy

    async def send(
        self, proxy: ProxyProcess, method: str, path: str, body: bytes | None = None
    ) -> tuple[int, bytes]:
        """
        Send C{method} for C{/pool/path}; the status and body.
        """
        response = await self.http.request(
            method, proxy.url + "/pool" + path, data=body
        )
        return response.code, await response.content()

    async def assertRetried(
        self, methods: list[str], body: bytes | None = None
    ) -> None:
        """
        After a GET opens and pools a connection, each of C{methods} (with
        C{body}) is sent on a stale pooled connection and then again on a
        new one, and succeeds; the upstream got the body both times.
        """
        upstream, proxy = await self.startPool()
        self.assertEqual(
            await self.send(proxy, "GET", "/prime"), (200, b"GET on connection 1")
        )
        expected = [(1, 0, "GET /prime")]
        for number, method in enumerate(methods, start=1):
            path = f"/{method.lower()}"
            code, answer = await self.send(proxy, method, path, body)
            self.assertEqual(code, 200, (method, answer))
            if method != "HEAD":
                self.assertEqual(
                    answer, f"{method} on connection {number + 1}".encode()
                )
            target = f"{method} {path}"
            expected += [(number, 1, target), (number + 1, 0, target)]
            record = await self.logged(proxy, "/pool" + path)
            self.assertEqual((record["status"], record["error"]), (200, None))
        self.assertEqual(upstream.seen(), expected)
        sent = [r.body for r in upstream.requests[1:]]
        self.assertEqual(sent, [body or b""] * len(sent))

    async def test_bodilessRetried(self) -> None:
        """
        GET, HEAD, and DELETE without a body, each sent on a pooled
        connection the upstream closes on receiving it, succeed: the
        upstream sees each twice, on two connections, and the access log
        shows a plain 200.
        """
        await self.assertRetried(["GET", "HEAD", "DELETE"])

    async def test_bodilessPutRetried(self) -> None:
        """
        A PUT without a body (idempotent, RFC 9110 9.2.2) on a stale pooled
        connection is sent again on a new one and succeeds.
        """
        await self.assertRetried(["PUT"])

    async def test_idempotentWithBodyRetried(self) -> None:
        """
        PUT and DELETE with a body on a stale pooled connection are sent
        again, body included, on a new connection, and succeed.
        """
        await self.assertRetried(["PUT", "DELETE"], b"the payload")

    async def test_postAndPatchNotRetried(self) -> None:
        """
        A POST or PATCH with a body on a stale pooled connection is 502
        upstream_reset, with the JSON error body, as docs/errors.md says
        (it may have been acted on): the upstream saw it once, and no new
        connection was opened for it. The next request succeeds on a new
        connection.
        """
        upstream, proxy = await self.startPool()
        expected = []
        for number, method in enumerate(["POST", "PATCH"], start=1):
            code, _ = await self.send(proxy, "GET", f"/prime{number}")
            self.assertEqual(code, 200)
            path = f"/{method.lower()}"
            response = await self.http.request(
                method, proxy.url + "/pool" + path, data=b"payload"
            )
            body = await response.content()
            self.assertEqual(response.code, 502, body)
            self.assertErrorBody(502, response.headers, body, "upstream_reset")
            record = await self.logged(proxy, "/pool" + path)
            self.assertEqual(
                (record["status"], record["error"]), (502, "upstream_reset")
            )
            expected += [
                (number, 0, f"GET /prime{number}"),
                (number, 1, f"{method} {path}"),
            ]
        self.assertEqual(upstream.seen(), expected)
        self.assertEqual(
            await self.send(proxy, "GET", "/after"), (200, b"GET on connection 3")
        )

    async def test_upstreamClosesIdleFirst(self) -> None:
        """
        An upstream that closes idle keep-alive connections after 1 s,
        sooner than monedge's pool (4 s): a request after 1.5 s of quiet
        succeeds, on a new connection.
        """
        upstream = self.startScripted(idleClose(1.0))
        proxy = await self.startProxy(
            {"service.api.idle": {"endpoints": [upstream.address]}}
        )
        response, body = await self.get(proxy.url + "/idle/one")
        self.assertEqual((response.code, body), (200, b"GET on connection 1"))
        await _later(1.5)
        response, body = await self.get(proxy.url + "/idle/two")
        self.assertEqual((response.code, body), (200, b"GET on connection 2"))
        self.assertEqual(upstream.seen(), [(1, 0, "GET /one"), (2, 0, "GET /two")])


# 5. Names that do not resolve


class UnresolvableTests(FaultTestCase):
    """
    An endpoint whose host name does not resolve fails like a refused
    connection: 502 upstream_connect_failed, or a retry on another
    endpoint.
    """

    async def test_unresolvableHost(self) -> None:
        """
        A service whose only endpoint is under the reserved .invalid TLD
        answers 502 upstream_connect_failed at once (well within the
        connect timeout), logged with its code; a service with a live
        endpoint beside it keeps succeeding, including requests first
        sent to the unresolvable one.
        """
        live = self.startUpstream()
        proxy = await self.startProxy(
            {
                "service.api.nowhere": {"endpoints": ["nowhere.monedge.invalid:8080"]},
                "service.api.mixed": {
                    "endpoints": ["http://elsewhere.monedge.invalid:8080", live.address]
                },
            }
        )
        started = time.monotonic()
        response, body = await self.get(proxy.url + "/nowhere/x")
        self.assertLess(time.monotonic() - started, 4)
        self.assertEqual(response.code, 502, body)
        self.assertErrorBody(502, response.headers, body, "upstream_connect_failed")
        record = await self.logged(proxy, "/nowhere/x")
        self.assertEqual(
            (record["status"], record["error"], record["endpoint"]),
            (502, "upstream_connect_failed", "nowhere.monedge.invalid:8080"),
        )
        series = 'monedge_upstream_errors_total{kind="connect_refused"}'
        # Wait for service mixed to try its unresolvable endpoint.
        before = metric(await self.metrics(proxy), series)
        sent = 0
        while metric(await self.metrics(proxy), series) == before:
            self.assertLess(sent, 30, "the unresolvable endpoint was never tried")
            response, body = await self.get(proxy.url + f"/mixed/{sent}")
            self.assertEqual(response.code, 200, body)
            sent += 1
        self.assertEqual(len(live.received), sent)


# 6. Registry file failures


class RegistryFailureTests(FaultTestCase):
    """
    A static registry file that disappears or cannot be read while monedge
    runs: the last good table keeps routing, and the failure is logged,
    counted and shown in /routes until a reload succeeds.  (A file with a
    bad field is test_e2e_lifecycle's test_invalidReloadKeepsTable.)
    """

    async def waitForReloads(
        self, proxy: ProxyProcess, ok: int, failed: int
    ) -> dict[str, Any]:
        """
        Poll /routes until the registry counts at least C{ok} good and
        C{failed} failed reads; return its registry section.
        """
        deadline = time.monotonic() + 5
        while True:
            registry: dict[str, Any] = (await self.routes(proxy))["registry"]
            reloads = registry["reloads"]
            if reloads["ok"] >= ok and reloads["failed"] >= failed:
                return registry
            self.assertLess(time.monotonic(), deadline, registry)
            await _later(0.1)

    async def test_deletedFile(self) -> None:
        """
        Deleting the file (seen by the 1 s poll) keeps the table: requests
        still route, /readyz stays 200, /routes shows the error, the
        failed-reload metric counts it, and the log says so.  Writing a
        good file back is picked up and clears the error.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream.address]}}
        )
        os.remove(self.registryPath)
        registry = await self.waitForReloads(proxy, ok=1, failed=1)
        self.assertIn("cannot read", registry["last_error"])
        self.assertIn(self.registryPath, registry["last_error"])
        response, _ = await self.get(proxy.url + "/svc/x")
        self.assertEqual(response.code, 200)
        ready, body = await self.get(proxy.adminURL + "/readyz")
        self.assertEqual(ready.code, 200, body)
        text = await self.metrics(proxy)
        self.assertEqual(
            metric(text, 'monedge_registry_reloads_total{result="failed"}'), 1
        )
        self.assertEqual(metric(text, "monedge_registry_services"), 1)
        self.assertIn(
            "registry reload failed, keeping the last good table", proxy.log()
        )
        other = self.startUpstream()
        self.writeServices(
            {
                "service.api.svc": {"endpoints": [upstream.address]},
                "service.api.new": {"endpoints": [other.address]},
            }
        )
        registry = await self.waitForReloads(proxy, ok=2, failed=1)
        self.assertIsNone(registry["last_error"])
        response, _ = await self.get(proxy.url + "/new/x")
        self.assertEqual(response.code, 200)

    async def test_unreadableFile(self) -> None:
        """
        A directory in the file's place (unreadable even by root), on
        SIGHUP, then a file that is not YAML at all, found by the poll: each
        keeps the last good table routing, and each is counted and shown
        in /routes.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream.address]}}
        )
        os.remove(self.registryPath)
        os.mkdir(self.registryPath)
        proxy.signal(signal.SIGHUP)
        registry = await self.waitForReloads(proxy, ok=1, failed=1)
        self.assertIn("cannot read", registry["last_error"])
        response, _ = await self.get(proxy.url + "/svc/x")
        self.assertEqual(response.code, 200)
        failed = registry["reloads"]["failed"]
        os.rmdir(self.registryPath)
        with open(self.registryPath, "w") as f:
            f.write("services: {service.api.svc: [unclosed\n")
        registry = await self.waitForReloads(proxy, ok=1, failed=failed + 1)
        self.assertIsNotNone(
            re.search(r"invalid YAML at line \d+", registry["last_error"]), registry
        )
        response, _ = await self.get(proxy.url + "/svc/y")
        self.assertEqual(response.code, 200)
        self.assertEqual(registry["reloads"]["ok"], 1)
