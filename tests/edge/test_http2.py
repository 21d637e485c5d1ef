"""
monedge's own HTTP/2 server (L{monedge.edge.http2}) and the protocol
switch that hands connections to it (L{monedge.edge.switch}), on memory
transports, with the C{h2} library as the client.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import h2.utilities
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from monedge.edge import http2
from monedge.edge.http1 import HTTP1Channel
from monedge.edge.http2 import PREFACE, H2Channel, H2Request
from monedge.registry import ServiceEntry
from monedge.rules.limits import Limits
from monedge.rules.policy import Policy
from monedge.testing import FakeResponse, endpoint
from tests.proxy.test_proxy import Harness

HOST = "api.example.com"


def _service(**policy: Any) -> ServiceEntry:
    return ServiceEntry(
        name="service.api.echo",
        endpoints=(endpoint("10.0.0.1:80"),),
        policy=Policy(**policy),
    )


def _harness(limits: Limits | None = None, **policy: Any) -> Harness:
    h = Harness([_service(**policy)], limits)
    h.site.channelFactory = HTTP1Channel
    return h


def _request(
    path: str = "/echo/a",
    method: str = "GET",
    extra: Sequence[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    return [
        (":method", method),
        (":path", path),
        (":scheme", "https"),
        (":authority", HOST),
        *extra,
    ]


class _Consumer:
    """
    Where a streamed request body goes upstream.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.data.append(data)


class Client:
    """
    An h2 client on one memory connection to the proxy.
    """

    def __init__(self, h: Harness, preface: bool = True) -> None:
        self.h = h
        self.protocol, self.transport = h.connect()
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        self.conn = h2.connection.H2Connection(config)
        self.events: list[Any] = []
        if preface:
            self.conn.initiate_connection()
            self.pump()

    @property
    def channel(self) -> H2Channel:
        channel = self.protocol.channel
        assert isinstance(channel, H2Channel)
        return channel

    def sendRaw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)
        self.read()

    def read(self) -> None:
        # What the streams wrote goes at the end of the reactor turn.
        self.h.clock.advance(0)
        out = self.transport.value()
        self.transport.clear()
        if out:
            self.events += self.conn.receive_data(out)

    def pump(self) -> None:
        for _ in range(20):
            data = self.conn.data_to_send()
            if data and not self.transport.disconnecting:
                self.protocol.dataReceived(data)
            self.h.clock.advance(0)
            out = self.transport.value()
            if not data and not out:
                return
            self.read()

    def get(self, headers: list[tuple[str, str]], end: bool = True) -> int:
        stream = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream, headers, end_stream=end)
        self.pump()
        return stream

    def of(self, kind: type, stream: int | None = None) -> list[Any]:
        return [
            e
            for e in self.events
            if isinstance(e, kind)
            and (stream is None or getattr(e, "stream_id", None) == stream)
        ]

    def status(self, stream: int) -> int | None:
        for event in self.of(h2.events.ResponseReceived, stream):
            return int(dict(event.headers)[b":status"])
        return None

    def body(self, stream: int) -> bytes:
        return b"".join(e.data for e in self.of(h2.events.DataReceived, stream))

    def resets(self, stream: int | None = None) -> list[int]:
        return [e.error_code for e in self.of(h2.events.StreamReset, stream)]

    def goaway(self) -> int | None:
        for event in self.of(h2.events.ConnectionTerminated):
            return int(event.error_code)
        return None


def _frames(data: bytes) -> list[Any]:
    """
    The frames in C{data}.
    """
    found = []
    while len(data) >= 9:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        found.append(frame)
        data = data[9 + length :]
    return found


def _rawRequest(c: Client, stream: int, fields: list[tuple[str, str]]) -> list[Any]:
    """
    Send a request the h2 client would refuse to, as a raw HEADERS frame
    on C{stream}; the frames the server sent back.
    """
    frame = HeadersFrame(stream)
    frame.data = c.conn.encoder.encode(fields)
    frame.flags.add("END_HEADERS")
    frame.flags.add("END_STREAM")
    c.transport.clear()
    c.protocol.dataReceived(frame.serialize())
    c.h.clock.advance(0)
    frames = _frames(c.transport.value())
    c.transport.clear()
    return frames


def _answer(call: Any, body: bytes = b"ok", headers: Headers | None = None) -> Any:
    response = FakeResponse(200, headers=headers, length=len(body))
    call.result.callback(response)
    response.deliver(body)
    response.end()
    return response


class SwitchTests(SynchronousTestCase):
    """
    Every connection starts on the HTTP/1.1 channel and goes to HTTP/2 when
    ALPN says C{h2} or a cleartext connection starts with the preface.
    """

    def test_priorKnowledge(self) -> None:
        """
        A cleartext connection that starts with the HTTP/2 preface, even
        split over reads, is served by an H2Channel, and the HTTP/1.1
        channel made for it stops counting it.
        """
        h = _harness()
        protocol, transport = h.connect()
        first = protocol.channel
        protocol.dataReceived(PREFACE[:5])
        self.assertIs(protocol.channel, first)
        protocol.dataReceived(PREFACE[5:] + SettingsFrame(0).serialize())
        self.assertIsInstance(protocol.channel, H2Channel)
        self.assertNotIn(first, h.site.channels)
        self.assertIn(protocol.channel, h.site.channels)
        # The server's SETTINGS frame (type 4) comes first.
        self.assertEqual(transport.value()[3], 4)

    def test_http11Unchanged(self) -> None:
        """
        A request starting like the preface (C{P...}) but HTTP/1.1 stays
        on the HTTP/1.1 channel and is answered.
        """
        h = _harness()
        protocol, transport = h.connect()
        first = protocol.channel
        protocol.dataReceived(b"P")
        protocol.dataReceived(
            b"OST /echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertIs(protocol.channel, first)
        _answer(h.client.calls[0])
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "))

    def test_alpn(self) -> None:
        """
        A TLS connection whose ALPN chose h2 goes to HTTP/2 on its first
        bytes.
        """
        h = _harness()
        protocol, transport = h.connect()
        transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        protocol.dataReceived(PREFACE)
        self.assertIsInstance(protocol.channel, H2Channel)
        self.assertEqual(h.site.metrics and h.proxy.site.channels, h.site.channels)

    def test_protocolsReported(self) -> None:
        """
        The listener reports an HTTP/2 connection as C{h2}.
        """
        from monedge.edge.server import ListenerFactory

        h = _harness()
        listener = ListenerFactory(h.site, 0)
        protocol = listener.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        protocol.dataReceived(PREFACE)
        self.assertEqual(listener.protocols(), ["h2"])


class RequestTests(SynchronousTestCase):
    """
    Streams are requests with HTTP/1.1's rules, answered on their stream.
    """

    def test_get(self) -> None:
        """
        A GET is proxied with Host from :authority and canonical header
        names, and its answer comes back with lower-case names and without
        hop-by-hop headers; it is logged once.
        """
        h = _harness()
        c = Client(h)
        stream = c.get(_request(extra=[("x-thing", "1")]))
        call = h.client.calls[0]
        self.assertEqual(call.headers.getRawHeaders(b"host"), [HOST.encode()])
        self.assertEqual(call.headers.getRawHeaders(b"x-thing"), [b"1"])
        headers = Headers({b"X-Up": [b"1"], b"Keep-Alive": [b"5"]})
        _answer(call, b"hello", headers)
        c.pump()
        self.assertEqual(c.status(stream), 200)
        self.assertEqual(c.body(stream), b"hello")
        names = [n for n, _ in c.of(h2.events.ResponseReceived, stream)[0].headers]
        self.assertIn(b"x-up", names)
        self.assertNotIn(b"keep-alive", names)
        self.assertEqual(len(c.of(h2.events.StreamEnded, stream)), 1)
        records = h.records()
        self.assertEqual([r["status"] for r in records], [200])
        self.assertEqual(h.site.inFlight, 0)

    def test_hostAgain(self) -> None:
        """
        A host header equal to :authority is the one host; a different one
        is 400 missing_host on that stream only.
        """
        h = _harness()
        c = Client(h)
        same = c.get(_request(extra=[("host", HOST)]))
        self.assertEqual(len(h.client.calls), 1)
        # The h2 client will not send a host that differs: raw frames.
        frames = _rawRequest(c, 3, [*_request(), ("host", "other.example")])
        self.assertEqual(frames[0].stream_id, 3)
        self.assertIn((":status", "400"), c.conn.decoder.decode(frames[0].data))
        body = b"".join(f.data for f in frames if isinstance(f, DataFrame))
        self.assertEqual(json.loads(body)["code"], "missing_host")
        self.assertEqual(len(h.client.calls), 1)
        _answer(h.client.calls[0])
        c.read()
        self.assertEqual(c.status(same), 200)

    def test_underscores(self) -> None:
        """
        A header name with an underscore is dropped, or with
        C{--underscore-headers reject} refused 400, wherever it is in the
        block.
        """
        h = _harness()
        c = Client(h)
        c.get(_request(extra=[("a", "1"), ("x_user", "admin"), ("b", "2")]))
        self.assertIsNone(h.client.calls[0].headers.getRawHeaders(b"x_user"))
        h = _harness(Limits(underscoreHeaders="reject"))
        c = Client(h)
        stream = c.get(_request(extra=[("a", "1"), ("x_user", "admin")]))
        self.assertEqual(c.status(stream), 400)
        self.assertEqual(h.client.calls, [])

    def test_headersTooLarge(self) -> None:
        """
        Too many headers, or too many bytes of them, is 431 on the stream,
        and the connection carries on.
        """
        h = _harness(Limits(maxHeaderCount=5, maxHeadersSize=200))
        c = Client(h)
        many = c.get(_request(extra=[(f"x-{i}", "v") for i in range(6)]))
        self.assertEqual(c.status(many), 431)
        large = c.get(_request(extra=[("x-big", "v" * 300)]))
        self.assertEqual(c.status(large), 431)
        ok = c.get(_request())
        self.assertEqual(len(h.client.calls), 1)
        _answer(h.client.calls[0])
        c.pump()
        self.assertEqual(c.status(ok), 200)

    def test_longTarget(self) -> None:
        """
        A :path past C{--max-request-line} is 414.
        """
        h = _harness(Limits(maxRequestLine=100))
        c = Client(h)
        stream = c.get(_request(path="/echo/" + "a" * 100))
        self.assertEqual(c.status(stream), 414)

    def test_badMethod(self) -> None:
        """
        A method that is not a token is 400.
        """
        h = _harness()
        c = Client(h)
        stream = c.get(_request(method="G(T"))
        self.assertEqual(c.status(stream), 400)

    def test_malformedIsAStreamError(self) -> None:
        """
        A malformed request (an upper-case name, a connection-specific
        header) resets its stream with PROTOCOL_ERROR; the connection and
        its other streams carry on.
        """
        h = _harness()
        c = Client(h)
        ok = c.get(_request())
        for stream, extra in [(3, ("connection", "close")), (5, ("te", "gzip"))]:
            frames = _rawRequest(c, stream, [*_request(), extra])
            self.assertEqual(
                [(type(f), f.stream_id) for f in frames], [(RstStreamFrame, stream)]
            )
            self.assertEqual(frames[0].error_code, ErrorCodes.PROTOCOL_ERROR)
        _answer(h.client.calls[0])
        c.read()
        self.assertEqual(c.status(ok), 200)
        self.assertIsNone(c.goaway())

    def test_cookieCrumbs(self) -> None:
        """
        Cookie crumbs become one Cookie header upstream (RFC 9113, 8.2.3).
        """
        h = _harness()
        c = Client(h)
        c.get(_request(extra=[("cookie", "a=1"), ("cookie", "b=2")]))
        self.assertEqual(
            h.client.calls[0].headers.getRawHeaders(b"cookie"), [b"a=1; b=2"]
        )


class BodyTests(SynchronousTestCase):
    """
    Request bodies stream to the upstream, with backpressure through the
    flow-control window.
    """

    def test_streams(self) -> None:
        """
        The exchange starts on the headers; DATA reaches the upstream as
        it comes; END_STREAM ends the body.
        """
        h = _harness()
        c = Client(h)
        stream = c.get(_request(method="POST"), end=False)
        self.assertEqual(len(h.client.calls), 1)
        body: Any = h.client.calls[0].body
        consumer = _Consumer()
        body.startProducing(consumer)
        c.conn.send_data(stream, b"abc")
        c.pump()
        self.assertEqual(consumer.data, [b"abc"])
        c.conn.send_data(stream, b"def", end_stream=True)
        c.pump()
        self.assertEqual(b"".join(consumer.data), b"abcdef")
        self.assertTrue(body.complete)

    def test_backpressure(self) -> None:
        """
        While the upstream is not reading, DATA is not acknowledged: the
        client's window closes at 65,535 bytes, and opens again once the
        upstream reads.
        """
        h = _harness()
        c = Client(h)
        stream = c.get(_request(method="POST"), end=False)
        body: Any = h.client.calls[0].body
        for _ in range(100):
            window = c.conn.local_flow_control_window(stream)
            if not window:
                break
            c.conn.send_data(stream, b"x" * min(16384, window))
            c.pump()
        self.assertEqual(c.conn.local_flow_control_window(stream), 0)
        # The body's high water mark, and one window past it.
        self.assertLessEqual(body.received, 65536 + 65535)
        consumer = _Consumer()
        body.startProducing(consumer)
        c.pump()
        self.assertGreater(c.conn.local_flow_control_window(stream), 0)

    def test_tooLargeDeclared(self) -> None:
        """
        A content-length over max-body-size is 413 at once; a body larger
        than the window the client has is then stopped with RST_STREAM
        (NO_ERROR), one that fits in it is let finish (and dropped).
        """
        h = _harness(maxBodySize=10)
        c = Client(h)
        stream = c.get(
            _request(method="POST", extra=[("content-length", "100000")]), end=False
        )
        self.assertEqual(c.status(stream), 413)
        self.assertEqual(c.resets(stream), [ErrorCodes.NO_ERROR])
        small = c.get(
            _request(method="POST", extra=[("content-length", "100")]), end=False
        )
        self.assertEqual(c.status(small), 413)
        self.assertEqual(c.resets(small), [])
        self.assertEqual(h.client.calls, [])
        self.assertEqual([r["status"] for r in h.records()], [413, 413])

    def test_tooLargeStreamed(self) -> None:
        """
        A body without a length that grows past max-body-size is 413 as
        soon as it does, and its exchange is dropped.
        """
        h = _harness(maxBodySize=10)
        c = Client(h)
        stream = c.get(_request(method="POST"), end=False)
        c.conn.send_data(stream, b"x" * 20)
        c.pump()
        self.assertEqual(c.status(stream), 413)
        self.assertTrue(h.client.calls[0].cancelled)
        self.assertEqual([r["status"] for r in h.records()], [413])
        self.assertEqual(h.site.inFlight, 0)

    def test_routeErrorWithBody(self) -> None:
        """
        A route error on a request with a body is answered at once, the
        body stopped with RST_STREAM(NO_ERROR).
        """
        h = _harness()
        c = Client(h)
        stream = c.get(_request(path="/nope/a", method="POST"), end=False)
        self.assertEqual(c.status(stream), 404)
        self.assertEqual(c.resets(stream), [ErrorCodes.NO_ERROR])

    def test_trailers(self) -> None:
        """
        Request trailers go to the upstream with the body, without fields
        that may not be trailers; response trailers end the stream in a
        HEADERS frame, without hop-by-hop fields.
        """
        h = _harness()
        c = Client(h)
        stream = c.get(_request(method="POST"), end=False)
        request = c.channel.requests[stream]
        c.conn.send_data(stream, b"x")
        c.conn.send_headers(
            stream, [("grpc-status", "0"), ("content-length", "1")], end_stream=True
        )
        c.pump()
        self.assertEqual(request.requestTrailers, [(b"Grpc-Status", b"0")])
        body: Any = h.client.calls[0].body
        self.assertEqual(list(body.trailers), [(b"Grpc-Status", b"0")])
        request.setTrailers([(b"Grpc-Status", b"0"), (b"Connection", b"x")])
        _answer(h.client.calls[0])
        c.pump()
        trailers = c.of(h2.events.TrailersReceived, stream)
        self.assertEqual(trailers[0].headers, [(b"grpc-status", b"0")])

    def test_clientResets(self) -> None:
        """
        A stream the client resets cancels its exchange, fails its body,
        and is logged 499, once.
        """
        h = _harness()
        c = Client(h)
        stream = c.get(_request(method="POST"), end=False)
        call = h.client.calls[0]
        c.conn.reset_stream(stream)
        c.pump()
        self.assertTrue(call.cancelled)
        self.assertEqual([r["status"] for r in h.records()], [499])
        self.assertEqual(h.site.inFlight, 0)
        self.assertEqual(c.channel.requests, {})


class LimitTests(SynchronousTestCase):
    """
    Each attack on an HTTP/2 connection is bounded.
    """

    def test_refusedBeyondTheLimit(self) -> None:
        """
        Streams beyond the advertised 100 are refused with REFUSED_STREAM,
        never GOAWAY, and the others are answered.
        """
        h = _harness()
        c = Client(h)
        # Past the client's own idea of the limit: raw frames.
        c.conn.remote_settings.acknowledge()
        c.conn.remote_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1000
        c.conn.remote_settings.acknowledge()
        streams = [c.get(_request()) for _ in range(101)]
        self.assertEqual(len(h.client.calls), 100)
        self.assertEqual(c.resets(streams[100]), [ErrorCodes.REFUSED_STREAM])
        self.assertIsNone(c.goaway())
        for call in h.client.calls:
            _answer(call)
        c.pump()
        self.assertEqual(c.status(streams[0]), 200)
        self.assertEqual(c.status(streams[99]), 200)

    def test_settingsAdvertised(self) -> None:
        """
        The server's SETTINGS say 100 streams and a header list size.
        """
        h = _harness()
        c = Client(h)
        settings = c.conn.remote_settings
        self.assertEqual(settings.max_concurrent_streams, 100)
        self.assertEqual(settings.max_header_list_size, c.channel.maxHeaderListSize)

    def test_continuationFlood(self) -> None:
        """
        A header block that grows past the header limits (CONTINUATION
        after CONTINUATION) is a connection error, ENHANCE_YOUR_CALM, and
        the connection closes; nothing like it is held.
        """
        h = _harness()
        c = Client(h)
        frame = HeadersFrame(1)
        frame.data = c.conn.encoder.encode(_request())
        c.sendRaw(frame.serialize())
        for _ in range(10):
            more = ContinuationFrame(1)
            more.data = b"\x00" * 16000
            c.protocol.dataReceived(more.serialize())
            if c.transport.disconnecting:
                break
        c.read()
        self.assertEqual(c.goaway(), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(c.transport.disconnecting)

    def test_compressionError(self) -> None:
        """
        A header block HPACK cannot decode is GOAWAY(COMPRESSION_ERROR),
        then close.
        """
        h = _harness()
        c = Client(h)
        frame = HeadersFrame(1)
        frame.data = b"\x80"  # index 0
        frame.flags.add("END_HEADERS")
        frame.flags.add("END_STREAM")
        c.sendRaw(frame.serialize())
        self.assertEqual(c.goaway(), ErrorCodes.COMPRESSION_ERROR)
        self.assertTrue(c.transport.disconnecting)

    def test_pingFlood(self) -> None:
        """
        More than MAX_CONTROL_FRAMES PINGs in the window is
        GOAWAY(ENHANCE_YOUR_CALM), and the connection closes.
        """
        h = _harness()
        c = Client(h)
        ping = PingFrame(0, opaque_data=b"12345678").serialize()
        c.protocol.dataReceived(ping * (http2.MAX_CONTROL_FRAMES + 1))
        c.read()
        self.assertEqual(c.goaway(), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(c.transport.disconnecting)

    def test_pingsInTime(self) -> None:
        """
        PINGs spread over time are answered.
        """
        h = _harness(Limits(headerTimeout=100))
        c = Client(h)
        for _ in range(3):
            c.conn.ping(b"12345678")
            c.pump()
            h.clock.advance(http2.FLOOD_WINDOW + 1)
        self.assertEqual(len(c.of(h2.events.PingAckReceived)), 3)

    def test_rapidReset(self) -> None:
        """
        A client that opens and resets streams past MAX_RESETS in the window
        gets GOAWAY(ENHANCE_YOUR_CALM); in-flight counts stay balanced.
        """
        h = _harness()
        c = Client(h)
        for _ in range(http2.MAX_RESETS + 1):
            stream = c.conn.get_next_available_stream_id()
            c.conn.send_headers(stream, _request())
            c.conn.reset_stream(stream)
            c.pump()
            if c.goaway() is not None:
                break
        self.assertEqual(c.goaway(), ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(c.transport.disconnecting)
        self.assertEqual(h.site.inFlight, 0)

    def test_zeroWindow(self) -> None:
        """
        A client with a zero window costs no work while it waits (no timer
        fires before the send timeout), then the stream is reset and
        logged once.
        """
        h = _harness(Limits(sendTimeout=5))
        c = Client(h)
        c.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
        c.pump()
        stream = c.get(_request())
        _answer(h.client.calls[0], b"x" * 100)
        c.pump()
        self.assertEqual(c.status(stream), 200)
        self.assertEqual(c.body(stream), b"")
        calls = [call for call in h.clock.getDelayedCalls() if call.active()]
        self.assertTrue(all(call.getTime() >= 5 for call in calls))
        h.clock.advance(5)
        c.read()
        self.assertEqual(c.resets(stream), [ErrorCodes.CANCEL])
        # Logged once, when the response was all handed over (as HTTP/1.1
        # logs a response written to its transport).
        self.assertEqual([r["status"] for r in h.records()], [200])
        self.assertEqual(c.channel.requests, {})

    def test_negativeWindow(self) -> None:
        """
        A window that SETTINGS_INITIAL_WINDOW_SIZE takes below zero holds
        the response until WINDOW_UPDATEs bring it above zero (h2spec
        6.9.2/2).
        """
        h = _harness()
        c = Client(h)
        c.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 3})
        c.pump()
        stream = c.get(_request())
        _answer(h.client.calls[0], b"abcdef")
        c.pump()
        self.assertEqual(c.body(stream), b"abc")
        c.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2})
        c.pump()
        c.conn.increment_flow_control_window(1, stream)
        c.pump()
        self.assertEqual(c.body(stream), b"abc")
        c.conn.increment_flow_control_window(3, stream)
        c.pump()
        self.assertEqual(c.body(stream), b"abcdef")

    def test_headerDeadline(self) -> None:
        """
        A connection with no HEADERS within the header timeout is closed
        with GOAWAY.
        """
        h = _harness(Limits(headerTimeout=3))
        c = Client(h)
        h.clock.advance(3)
        c.read()
        self.assertEqual(c.goaway(), ErrorCodes.NO_ERROR)
        self.assertTrue(c.transport.disconnecting)

    def test_bodyTimeout(self) -> None:
        """
        A body that makes no progress for the body timeout is answered 408
        on its stream.
        """
        h = _harness(Limits(bodyTimeout=4))
        c = Client(h)
        stream = c.get(_request(method="POST"), end=False)
        h.clock.advance(4)
        c.read()
        self.assertEqual(c.status(stream), 408)
        self.assertEqual(h.site.inFlight, 0)

    def test_keepAliveIdle(self) -> None:
        """
        With no stream open for the keep-alive timeout, GOAWAY(NO_ERROR)
        and close.
        """
        h = _harness(Limits(keepAliveTimeout=7))
        c = Client(h)
        stream = c.get(_request())
        _answer(h.client.calls[0])
        c.pump()
        self.assertEqual(c.status(stream), 200)
        h.clock.advance(6)
        self.assertFalse(c.transport.disconnecting)
        h.clock.advance(2)
        c.read()
        self.assertEqual(c.goaway(), ErrorCodes.NO_ERROR)
        self.assertTrue(c.transport.disconnecting)

    def test_clientGoAway(self) -> None:
        """
        The client's GOAWAY closes the connection; its open stream is
        logged 499.
        """
        h = _harness()
        c = Client(h)
        c.get(_request())
        c.conn.close_connection()
        c.pump()
        self.assertTrue(c.transport.disconnecting)
        c.protocol.connectionLost(None)
        self.assertEqual([r["status"] for r in h.records()], [499])
        self.assertEqual(h.site.inFlight, 0)
        self.assertNotIn(c.channel, h.site.channels)


class CheckedFieldsTests(SynchronousTestCase):
    """
    A connection remembers the last few requests' fields it checked.
    """

    def test_repeatedRequestNotCheckedAgain(self) -> None:
        """
        A request whose fields are the same as an earlier one's is not
        validated again, and is answered as the first was; a malformed one
        after them is still refused.
        """
        checks: list[Any] = []
        validate = h2.utilities.validate_headers

        def counting(headers: Any, flags: Any) -> Any:
            checks.append(headers)
            return validate(headers, flags)

        self.patch(http2, "validate_headers", counting)
        h = _harness()
        c = Client(h)
        first = c.get(_request())
        second = c.get(_request())
        self.assertEqual(len(checks), 1)
        for call in h.client.calls:
            _answer(call)
        c.read()
        self.assertEqual([c.status(first), c.status(second)], [200, 200])
        frames = _rawRequest(
            c,
            c.conn.get_next_available_stream_id(),
            [
                (":method", "GET"),
                (":path", "/echo/a"),
                (":scheme", "https"),
                (":authority", HOST),
                ("connection", "close"),
            ],
        )
        self.assertEqual(len(checks), 2)
        resets = [f for f in frames if isinstance(f, RstStreamFrame)]
        self.assertEqual([f.error_code for f in resets], [ErrorCodes.PROTOCOL_ERROR])


class SendingTests(SynchronousTestCase):
    """
    What the streams write is framed and sent at the end of the reactor
    turn: one send for all the responses a turn produced.
    """

    def writes(self, c: Client) -> list[bytes]:
        """
        Record every write to C{c}'s transport from now on.
        """
        written: list[bytes] = []
        write = c.transport.write

        def recording(data: bytes) -> None:
            written.append(data)
            write(data)

        c.transport.write = recording  # type: ignore[method-assign]
        return written

    def test_endStreamOnTheLastData(self) -> None:
        """
        A response whose body is written and finished in one turn is one
        HEADERS frame and one DATA frame carrying END_STREAM (no empty DATA
        frame after it), sent at the end of the turn, in one write.
        """
        h = _harness()
        c = Client(h)
        stream = c.get(_request())
        c.transport.clear()
        written = self.writes(c)
        _answer(h.client.calls[0], b"hello")
        self.assertEqual(written, [])
        h.clock.advance(0)
        self.assertEqual(len(written), 1)
        frames = _frames(written[0])
        self.assertEqual(
            [type(f).__name__ for f in frames], ["HeadersFrame", "DataFrame"]
        )
        self.assertEqual(frames[1].data, b"hello")
        self.assertIn("END_STREAM", frames[1].flags)
        c.read()
        self.assertEqual(c.status(stream), 200)
        self.assertEqual(c.body(stream), b"hello")

    def test_oneSendPerTurn(self) -> None:
        """
        Responses to several streams answered in one turn leave together,
        in one write, each complete.
        """
        h = _harness()
        c = Client(h)
        streams = [c.get(_request()) for _ in range(3)]
        c.transport.clear()
        written = self.writes(c)
        for call, body in zip(h.client.calls, [b"a", b"b", b"c"], strict=True):
            _answer(call, body)
        h.clock.advance(0)
        self.assertEqual(len(written), 1)
        c.read()
        self.assertEqual([c.body(s) for s in streams], [b"a", b"b", b"c"])
        self.assertEqual([c.status(s) for s in streams], [200, 200, 200])

    def test_streamedBodyInTurns(self) -> None:
        """
        A body written over several turns goes out turn by turn, without
        waiting for its end, and ends with END_STREAM on its last DATA
        frame.
        """
        h = _harness()
        c = Client(h)
        stream = c.get(_request())
        response = FakeResponse(200, length=6)
        h.client.calls[0].result.callback(response)
        response.deliver(b"abc")
        c.read()
        self.assertEqual(c.body(stream), b"abc")
        self.assertEqual(c.of(h2.events.StreamEnded, stream), [])
        c.transport.clear()
        written = self.writes(c)
        response.deliver(b"def")
        response.end()
        h.clock.advance(0)
        frames = _frames(b"".join(written))
        self.assertEqual([type(f).__name__ for f in frames], ["DataFrame"])
        self.assertIn("END_STREAM", frames[0].flags)
        c.read()
        self.assertEqual(c.body(stream), b"abcdef")
        self.assertEqual(len(c.of(h2.events.StreamEnded, stream)), 1)


class DrainTests(SynchronousTestCase):
    """
    Draining: GOAWAY(NO_ERROR, last stream), the open streams answered,
    then close.
    """

    def test_drain(self) -> None:
        """
        The streams open when draining starts are answered after the
        GOAWAY; then the connection closes.
        """
        h = _harness()
        c = Client(h)
        first = c.get(_request())
        h.site.startDraining()
        _answer(h.client.calls[0])
        c.h.clock.advance(0)
        frames = _frames(c.transport.value())
        kinds = [type(f).__name__ for f in frames]
        self.assertEqual(kinds[0], "GoAwayFrame")
        self.assertEqual(frames[0].last_stream_id, first)
        self.assertEqual(frames[0].error_code, 0)
        self.assertIn("HeadersFrame", kinds)
        self.assertIn("END_STREAM", frames[-1].flags)
        self.assertTrue(c.transport.disconnecting)

    def test_idleClosed(self) -> None:
        """
        closeIdleConnections closes an idle HTTP/2 connection with GOAWAY.
        """
        h = _harness()
        c = Client(h)
        self.assertEqual(h.site.closeIdleConnections(), 1)
        c.read()
        self.assertEqual(c.goaway(), ErrorCodes.NO_ERROR)
        self.assertTrue(c.transport.disconnecting)


class TypeTests(SynchronousTestCase):
    """
    The request class is what the exchange expects.
    """

    def test_isHTTP2(self) -> None:
        """
        An H2Request says it is HTTP/2, with version HTTP/2.
        """
        self.assertEqual(H2Request.clientproto, b"HTTP/2")
