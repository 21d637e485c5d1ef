"""
monedge's own HTTP/1.1 front end (L{monedge.edge.http1}), where the rest
of the suite does not reach it: its selection, the chunked-body framing
read beside llhttp, what llhttp is and is not shown, pipelining, and
request bodies that stream.
"""

from __future__ import annotations

import json
import re
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.iweb import UNKNOWN_LENGTH

from monedge.edge.http1 import HTTP1Channel, _ChunkFraming, _Malformed, _TooLarge
from monedge.registry import ServiceEntry
from monedge.rules.limits import Limits
from monedge.rules.policy import Policy
from monedge.testing import FakeResponse, endpoint
from monedge.upstream.replay import NotReplayable, bodyAgain
from tests.proxy.test_proxy import Harness


def _service(**policy: Any) -> ServiceEntry:
    return ServiceEntry(
        name="service.api.echo",
        endpoints=(endpoint("10.0.0.1:80"),),
        policy=Policy(**policy),
    )


def _harness(limits: Limits | None = None, **policy: Any) -> Harness:
    """
    A L{Harness} whose connections use L{HTTP1Channel}.
    """
    h = Harness([_service(**policy)], limits)
    h.site.channelFactory = HTTP1Channel
    return h


def _statuses(transport: StringTransport) -> list[int]:
    return [
        int(code) for code in re.findall(rb"HTTP/1\.[01] (\d{3}) ", transport.value())
    ]


def _body(call: Any) -> bytes:
    body: bytes = call.bodyBytes()
    return body


def _answer(call: Any, body: bytes = b"ok") -> None:
    response = FakeResponse(200, length=len(body))
    call.result.callback(response)
    response.deliver(body)
    response.end()


class SelectionTests(SynchronousTestCase):
    """
    The composition root serves HTTP/1.1 with monedge's own channel.
    """

    def test_composedWithTheChannel(self) -> None:
        """
        The site the composition root builds makes an L{HTTP1Channel} for
        each connection.
        """
        h = Harness([_service()])
        self.assertIs(h.site.channelFactory, HTTP1Channel)

    def test_largeReads(self) -> None:
        """
        A client connection is read up to 256 KiB at a time (Twisted's
        transports read 64 KiB), so a large upload takes fewer reads and
        fewer sends upstream.
        """

        class _Transport(StringTransport):
            bufferSize = 65536

        h = _harness()
        protocol = h.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 1))
        transport = _Transport()
        protocol.makeConnection(transport)
        self.assertEqual(transport.bufferSize, 256 * 1024)

    def test_alpnH2LeavesTheChannel(self) -> None:
        """
        A TLS connection whose ALPN chose h2 goes to Twisted's HTTP/2, and
        the new channel made for it stops timing it and counting it.
        """
        h = _harness()
        protocol = h.site.buildProtocol(IPv4Address("TCP", "192.0.2.7", 1))
        transport = StringTransport()
        transport.negotiatedProtocol = b"h2"  # type: ignore[attr-defined]
        protocol.makeConnection(transport)
        channel = protocol._channel
        self.assertIsInstance(channel, HTTP1Channel)
        protocol.dataReceived(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
            + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        )
        self.assertIsNot(protocol._channel, channel)
        self.assertNotIn(channel, h.site.channels)
        self.assertFalse(
            [
                c
                for c in h.clock.getDelayedCalls()
                if getattr(getattr(c, "func", None), "__self__", None) is channel
            ]
        )


class ReadingTests(SynchronousTestCase):
    """
    What the new channel accepts and refuses that llhttp alone would read
    differently.
    """

    def test_anyTokenMethod(self) -> None:
        """
        A method llhttp does not know, but which is a token, is forwarded,
        as today's channel forwards it.
        """
        h = _harness()
        h.send(b"FROB /echo/x HTTP/1.1\r\nHost: a\r\n\r\n")
        [call] = h.client.calls
        self.assertEqual(call.method, b"FROB")

    def test_upgradeWithABodyIsFramedByItsLength(self) -> None:
        """
        A request with C{Upgrade} and C{Connection: upgrade} and a body has
        its body read by its Content-Length (llhttp would take the body for
        the upgraded protocol's bytes), and a request after it is a request.
        """
        h = _harness()
        protocol, transport = h.send(
            b"POST /echo/a HTTP/1.1\r\nHost: a\r\nUpgrade: foo\r\n"
            b"Connection: upgrade\r\nContent-Length: 3\r\n\r\nabc"
            b"GET /echo/b HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        [first] = h.client.calls
        self.assertEqual(_body(first), b"abc")
        _answer(first)
        second = h.client.calls[1]
        self.assertEqual(second.url, b"http://10.0.0.1:80/b")

    def test_hugeContentLengthIsTooLarge(self) -> None:
        """
        A Content-Length over 64 bits, which llhttp would refuse as
        malformed, is refused as too large (413), as today.
        """
        h = _harness()
        _, transport = h.send(
            b"POST /echo/ HTTP/1.1\r\nHost: a\r\nContent-Length: "
            + b"9" * 30
            + b"\r\n\r\n"
        )
        self.assertEqual(_statuses(transport), [413])

    def test_controlByteInAValueRefused(self) -> None:
        """
        llhttp refuses a header value with a control byte (other than a
        tab) with 400; Twisted's channel refused only NUL, CR and LF.
        """
        h = _harness()
        _, transport = h.send(b"GET /echo/ HTTP/1.1\r\nHost: a\r\nX-A: b\x01c\r\n\r\n")
        self.assertEqual(_statuses(transport), [400])
        self.assertEqual(h.client.calls, [])
        self.assertTrue(transport.disconnecting)

    def test_chunkedBodyByteByByte(self) -> None:
        """
        A chunked body with an extension and a trailer, sent one byte at a
        time, is decoded whole and the request ends where it does.
        """
        h = _harness()
        protocol, transport = h.connect()
        raw = (
            b"POST /echo/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3;name=value\r\nabc\r\n10\r\n" + b"d" * 16 + b"\r\n0\r\nX-T: 1\r\n\r\n"
        )
        for i in range(len(raw)):
            protocol.dataReceived(raw[i : i + 1])
        [call] = h.client.calls
        self.assertEqual(_body(call), b"abc" + b"d" * 16)

    def test_bareLFInChunkedFramingRefused(self) -> None:
        """
        A chunk-size line ended by a bare LF is a 400, and the upstream
        request the headers started is given up, none of the body sent.
        """
        h = _harness()
        _, transport = h.send(
            b"POST /echo/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\nabc\r\n0\r\n\r\n"
        )
        self.assertEqual(_statuses(transport), [400])
        [call] = h.client.calls
        self.assertTrue(call.cancelled)
        self.assertEqual(_body(call), b"")

    def test_chunkOverTheLimitRefusedOnItsSizeLine(self) -> None:
        """
        A chunk that declares more than max-body-size is refused (413) as
        soon as its size line is read, before any of its bytes.
        """
        h = _harness(maxBodySize=10)
        _, transport = h.send(
            b"POST /echo/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nabcde\r\n6\r\n"
        )
        self.assertEqual(_statuses(transport), [413])
        self.assertTrue(transport.disconnecting)

    def test_http10AnsweredInKind(self) -> None:
        """
        An HTTP/1.0 request is answered with an HTTP/1.0 status line, no
        chunking, and the connection closed after it.
        """
        h = _harness()
        _, transport = h.send(b"GET /echo/ HTTP/1.0\r\nHost: a\r\n\r\n")
        [call] = h.client.calls
        response = FakeResponse(200)
        call.result.callback(response)
        response.deliver(b"hello")
        response.end()
        self.assertTrue(transport.value().startswith(b"HTTP/1.0 200 OK\r\n"))
        self.assertNotIn(b"chunked", transport.value())
        self.assertTrue(transport.value().endswith(b"\r\n\r\nhello"))
        self.assertTrue(transport.disconnecting)


class PipeliningTests(SynchronousTestCase):
    """
    One request is answered at a time; what comes behind it waits.
    """

    def test_chunkedThenPipelined(self) -> None:
        """
        A request pipelined after a chunked one in the same read waits for
        the first's response, then is answered in turn.
        """
        h = _harness()
        _, transport = h.send(
            b"POST /echo/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nhi\r\n0\r\n\r\n"
            b"GET /echo/b HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        [first] = h.client.calls
        self.assertEqual(_body(first), b"hi")
        _answer(first, b"one")
        second = h.client.calls[1]
        self.assertEqual(second.url, b"http://10.0.0.1:80/b")
        _answer(second, b"two")
        self.assertEqual(_statuses(transport), [200, 200])
        self.assertTrue(transport.value().endswith(b"two"))
        self.assertEqual([r["status"] for r in h.records()], [200, 200])

    def test_heldInputPausesReading(self) -> None:
        """
        Past 16 KiB pipelined behind a request being answered, the
        connection stops being read, and is read again once the answer is
        sent.
        """
        h = _harness()
        protocol, transport = h.send(b"GET /echo/a HTTP/1.1\r\nHost: a\r\n\r\n")
        later = (
            b"GET /echo/b HTTP/1.1\r\nHost: a\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n"
        )
        for _ in range(5):
            protocol.dataReceived(later)
        self.assertEqual(transport.producerState, "paused")
        _answer(h.client.calls[0])
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(h.client.calls), 2)

    def test_closeDropsWhatFollows(self) -> None:
        """
        After a request with C{Connection: close}, what the client sends
        is never read as a request.
        """
        h = _harness()
        _, transport = h.send(
            b"GET /echo/a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
            b"GET /echo/b HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        _answer(h.client.calls[0])
        self.assertEqual(len(h.client.calls), 1)
        self.assertIn(b"Connection: close", transport.value())
        self.assertTrue(transport.disconnecting)


class ClosingTests(SynchronousTestCase):
    """
    A connection may be closed several ways at once.
    """

    def test_closedTwice(self) -> None:
        """
        A connection closed after its last response, then again by the
        request's exchange, closes once and raises nothing.
        """
        h = _harness()
        protocol, transport = h.send(
            b"GET /echo/a HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        )
        request = protocol._channel.requests[0]
        _answer(h.client.calls[0])
        self.assertTrue(transport.disconnecting)
        request.loseConnection()
        protocol._channel.loseConnection()
        self.assertEqual([r["status"] for r in h.records()], [200])


class ChunkFramingTests(SynchronousTestCase):
    """
    L{_ChunkFraming} finds where a chunked body ends.
    """

    def test_endAndWhatFollows(self) -> None:
        """
        The offset returned is just past the body's last CRLF, wherever the
        reads split it.
        """
        body = b"4\r\nwiki\r\n5;x=y\r\npedia\r\n0\r\nA: b\r\n\r\n"
        framing = _ChunkFraming()
        self.assertEqual(framing.scan(body + b"GET", None), len(body))
        for split in range(1, len(body)):
            framing = _ChunkFraming()
            self.assertEqual(framing.scan(body[:split], None), -1)
            self.assertEqual(framing.scan(body[split:] + b"X", None), len(body) - split)
            self.assertEqual(framing.total, 9)

    def test_malformed(self) -> None:
        """
        A size that is not hex, a chunk without its CRLF, or a size line
        over 1024 bytes is malformed.
        """
        for bad in [b"x\r\n", b"2\r\nabXY", b"1" + b";" * 1100]:
            self.assertRaises(_Malformed, _ChunkFraming().scan, bad, None)

    def test_limit(self) -> None:
        """
        The declared sizes are counted against the limit as each size line
        is read.
        """
        framing = _ChunkFraming()
        framing.scan(b"5\r\nabcde\r\n", 10)
        self.assertRaises(_TooLarge, framing.scan, b"6\r\n", 10)


class RecordTests(SynchronousTestCase):
    """
    The access log sees the new channel's requests as it saw today's.
    """

    def test_refusalLoggedOnce(self) -> None:
        """
        A request refused on its headers (obsolete line folding) is logged
        once, as the refusal, and not again as a 499 when its connection
        closes.
        """
        h = _harness()
        protocol, transport = h.send(
            b"GET /echo/ HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n"
        )
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        protocol.connectionLost(Failure(ConnectionDone()))
        records = h.records()
        self.assertEqual([r["status"] for r in records], [400])
        self.assertEqual(
            json.loads(transport.value().partition(b"\r\n\r\n")[2])["message"],
            "obsolete line folding is refused",
        )


_POST = b"POST /echo/up HTTP/1.1\r\nHost: a\r\n"


class StreamingTests(SynchronousTestCase):
    """
    Request bodies stream: the request is decided on its head, and its body
    goes upstream as it comes, with backpressure both ways.
    """

    def test_decidedOnTheHead(self) -> None:
        """
        The upstream request starts as soon as the head is in, and each
        piece of the body reaches the upstream as it is read.
        """
        h = _harness()
        protocol, transport = h.send(_POST + b"Content-Length: 6\r\n\r\n")
        [call] = h.client.calls
        self.assertEqual(call.method, b"POST")
        assert call.body is not None
        self.assertEqual(call.body.length, 6)
        sink = call.takeBody()
        protocol.dataReceived(b"abc")
        self.assertEqual(sink.data, [b"abc"])
        self.assertFalse(sink.complete)
        protocol.dataReceived(b"def")
        self.assertEqual(sink.data, [b"abc", b"def"])
        self.assertTrue(sink.complete)
        _answer(call)
        self.assertEqual(_statuses(transport), [200])
        self.assertFalse(transport.disconnecting)

    def test_chunkedGoesUpChunkedWithTrailers(self) -> None:
        """
        A chunked body goes up with an unknown length (so chunked), and its
        trailer fields after it: those that may be trailers, checked.
        """
        h = _harness()
        protocol, _ = h.send(
            _POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
            b"X-Checksum: 123 \r\nConnection: close\r\nHost: evil\r\n\r\n"
        )
        [call] = h.client.calls
        assert call.body is not None
        self.assertIs(call.body.length, UNKNOWN_LENGTH)
        self.assertEqual(_body(call), b"abc")
        trailers = call.body.trailers  # type: ignore[attr-defined]
        self.assertEqual(list(trailers), [(b"X-Checksum", b"123")])

    def test_trailersOverTheLimit(self) -> None:
        """
        A trailer section longer than a header block may be is 431.
        """
        h = _harness(Limits(maxHeadersSize=100))
        _, transport = h.send(
            _POST + b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
            b"X-Long: " + b"v" * 200 + b"\r\n\r\n"
        )
        self.assertEqual(_statuses(transport), [431])
        [call] = h.client.calls
        self.assertTrue(call.cancelled)

    def test_slowUpstreamPausesTheClient(self) -> None:
        """
        Past 64 KiB waiting for the upstream, the client connection is
        paused, and resumed once the upstream has taken them; meanwhile the
        body deadline does not run.
        """
        h = _harness()
        protocol, transport = h.send(_POST + b"Content-Length: 200000\r\n\r\n")
        [call] = h.client.calls
        protocol.dataReceived(b"x" * 70000)
        self.assertEqual(transport.producerState, "paused")
        h.clock.advance(Limits().bodyTimeout + 1)
        self.assertEqual(_statuses(transport), [])
        sink = call.takeBody()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(b"".join(sink.data), b"x" * 70000)

    def test_upstreamPausingPausesTheClient(self) -> None:
        """
        An upstream connection that stops reading (pauses the body) makes
        the client connection pause once 64 KiB wait.
        """
        h = _harness()
        protocol, transport = h.send(_POST + b"Content-Length: 200000\r\n\r\n")
        [call] = h.client.calls
        sink = call.takeBody()
        assert call.body is not None
        call.body.pauseProducing()
        protocol.dataReceived(b"x" * 60000)
        self.assertEqual(transport.producerState, "producing")
        protocol.dataReceived(b"x" * 10000)
        self.assertEqual(transport.producerState, "paused")
        call.body.resumeProducing()
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(b"".join(sink.data)), 70000)

    def test_continueWhenTheUpstreamTakesTheBody(self) -> None:
        """
        C{100 Continue} goes out when the upstream starts taking the body,
        not before; never when the answer comes first.
        """
        h = _harness()
        _, transport = h.send(
            _POST + b"Content-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        [call] = h.client.calls
        self.assertEqual(transport.value(), b"")
        call.takeBody()
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        h2 = _harness()
        _, transport = h2.send(
            _POST + b"Content-Length: 3\r\nExpect: 100-continue\r\n\r\n"
        )
        [call] = h2.client.calls
        _answer(call, b"early")
        self.assertEqual(_statuses(transport), [200])
        self.assertNotIn(b"100 Continue", transport.value())

    def test_answerBeforeTheBodyCloses(self) -> None:
        """
        An answer that ends before the body was all read closes the
        connection: the rest is never read as a request.
        """
        h = _harness()
        protocol, transport = h.send(_POST + b"Content-Length: 100\r\n\r\nabc")
        [call] = h.client.calls
        _answer(call, b"early")
        self.assertEqual(_statuses(transport), [200])
        self.assertTrue(transport.disconnecting)
        protocol.dataReceived(b"GET /echo/smuggled HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(len(h.client.calls), 1)

    def test_tooLargeAfterTheAnswerStarted(self) -> None:
        """
        A chunked body that grows past max-body-size after the upstream's
        answer has started cuts the connection off (the answer cannot be
        replaced), and gives up the upstream request.
        """
        h = _harness(maxBodySize=10)
        protocol, transport = h.send(
            _POST + b"Transfer-Encoding: chunked\r\n\r\n5\r\nabcde\r\n"
        )
        [call] = h.client.calls
        response = FakeResponse(200)
        call.result.callback(response)
        response.deliver(b"partial")
        protocol.dataReceived(b"9\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertTrue(response.transport.stopped)
        [record] = h.records()
        self.assertEqual((record["status"], record["error"]), (413, "body_too_large"))

    def test_clientLeavesMidBody(self) -> None:
        """
        A client that leaves mid-body gives up the upstream request, whose
        body never completes; logged as 499.
        """
        h = _harness()
        protocol, _ = h.send(_POST + b"Content-Length: 10\r\n\r\nabc")
        [call] = h.client.calls
        sink = call.takeBody()
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(call.cancelled)
        self.assertFalse(sink.complete)
        self.assertIsNotNone(sink.failure)
        self.assertEqual([r["status"] for r in h.records()], [499])

    def test_replayOnlyWithinTheKeptBytes(self) -> None:
        """
        A body within --replay-body-size can be produced again once whole;
        a larger one never.
        """
        h = _harness(Limits(replayBodySize=4))
        protocol, _ = h.send(_POST + b"Content-Length: 3\r\n\r\nabc")
        [call] = h.client.calls
        again = bodyAgain(call.body)
        assert again is not None
        self.assertEqual(again.length, 3)
        protocol, _ = h.send(_POST + b"Content-Length: 5\r\n\r\nabcde")
        self.assertRaises(NotReplayable, bodyAgain, h.client.calls[1].body)


class BufferingTests(SynchronousTestCase):
    """
    A service with C{request-buffering: true} gets the whole body first,
    held in memory within the process's budget.
    """

    def test_wholeBodyFirst(self) -> None:
        """
        The upstream request starts only once the whole body is in, and is
        sent with its length; C{100 Continue} goes out when holding starts.
        """
        h = _harness(requestBuffering=True)
        protocol, transport = h.send(
            _POST + b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n\r\n"
        )
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        protocol.dataReceived(b"3\r\nabc\r\n")
        self.assertEqual(h.client.calls, [])
        protocol.dataReceived(b"2\r\nde\r\n0\r\n\r\n")
        [call] = h.client.calls
        assert call.body is not None
        self.assertEqual(call.body.length, 5)
        self.assertEqual(_body(call), b"abcde")

    def test_budgetGivenBack(self) -> None:
        """
        Once a buffered request is over, what its body held of the budget
        is given back.
        """
        h = _harness(requestBuffering=True)
        protocol, transport = h.send(_POST + b"Content-Length: 5\r\n\r\nabcde")
        budget = h.proxy.context.bufferBudget
        self.assertEqual(budget.held, 5)
        [call] = h.client.calls
        self.assertEqual(_body(call), b"abcde")
        _answer(call)
        self.assertEqual(_statuses(transport), [200])
        self.assertEqual(budget.held, 0)

    def test_noPauseWhileHolding(self) -> None:
        """
        A body held for buffering never pauses the client (nothing would
        resume it before the body is whole).
        """
        h = _harness(requestBuffering=True)
        protocol, transport = h.send(_POST + b"Content-Length: 200000\r\n\r\n")
        protocol.dataReceived(b"x" * 150000)
        self.assertEqual(transport.producerState, "producing")

    def test_budget(self) -> None:
        """
        A body that would take what the process holds past
        --request-buffer-budget is refused with 503 request_buffer_full,
        and the budget is given back.
        """
        h = _harness(Limits(requestBufferBudget=10), requestBuffering=True)
        protocol, transport = h.send(_POST + b"Content-Length: 20\r\n\r\n")
        protocol.dataReceived(b"x" * 8)
        protocol.dataReceived(b"x" * 8)
        self.assertEqual(_statuses(transport), [503])
        self.assertEqual(_error(transport), "request_buffer_full")
        self.assertEqual(h.proxy.context.bufferBudget.held, 0)
        self.assertEqual(h.client.calls, [])


class TrailersTests(SynchronousTestCase):
    """
    An upstream response's trailers reach a client that said
    C{TE: trailers}, and only such a client.
    """

    def answerWithTrailers(self, te: bytes) -> StringTransport:
        h = _harness()
        _, transport = h.send(b"GET /echo/ HTTP/1.1\r\nHost: a\r\n" + te + b"\r\n")
        [call] = h.client.calls
        if te:
            self.assertEqual(call.headers.getRawHeaders(b"te"), [b"trailers"])
        else:
            self.assertIsNone(call.headers.getRawHeaders(b"te"))
        response = FakeResponse(200)
        call.result.callback(response)
        response.deliver(b"data")
        response.monedgeTrailers = [  # type: ignore[attr-defined]
            (b"Grpc-Status", b"0"),
            (b"Connection", b"close"),
        ]
        response.end()
        return transport

    def test_toAClientThatTakesThem(self) -> None:
        """
        After the last chunk, the trailers that may cross.
        """
        transport = self.answerWithTrailers(b"TE: trailers\r\n")
        self.assertTrue(
            transport.value().endswith(b"4\r\ndata\r\n0\r\nGrpc-Status: 0\r\n\r\n")
        )

    def test_withABodyThatCameWhole(self) -> None:
        """
        A small response that came whole with its head (monedge's own
        client hands such a body over at once) keeps its trailers.
        """
        h = _harness()
        _, transport = h.send(b"GET /echo/ HTTP/1.1\r\nHost: a\r\nTE: trailers\r\n\r\n")
        [call] = h.client.calls
        response = FakeResponse(200)
        response.monedgeTrailers = [(b"Grpc-Status", b"0")]  # type: ignore[attr-defined]
        response.monedgeTakeBody = lambda: b"data"  # type: ignore[attr-defined]
        call.result.callback(response)
        self.assertTrue(
            transport.value().endswith(b"4\r\ndata\r\n0\r\nGrpc-Status: 0\r\n\r\n")
        )

    def test_notToOthers(self) -> None:
        """
        A client that did not say C{TE: trailers} gets none.
        """
        transport = self.answerWithTrailers(b"")
        self.assertTrue(transport.value().endswith(b"4\r\ndata\r\n0\r\n\r\n"))


def _error(transport: StringTransport) -> str:
    body = transport.value().split(b"\r\n\r\n", 1)[1]
    code: str = json.loads(body)["code"]
    return code


class TrailerRelayTests(SynchronousTestCase):
    """
    Upstream response trailers go to a client that said C{TE: trailers},
    and only to one.
    """

    def _exchange(self, te: bytes | None, whole: bool = False) -> tuple[Any, bytes]:
        """
        A request (with C{TE: te} if given) answered by a chunked upstream
        response with trailer fields (with C{whole}, one that came whole
        with its head, as monedge's client hands it over); the upstream
        call and what the client got.
        """
        h = _harness()
        extra = b"" if te is None else b"TE: " + te + b"\r\n"
        _, transport = h.send(b"GET /echo/ HTTP/1.1\r\nHost: a\r\n" + extra + b"\r\n")
        [call] = h.client.calls
        response = FakeResponse(200)
        response.monedgeTrailers = [  # type: ignore[attr-defined]
            (b"X-Sig", b"s1"),
            (b"Set-Cookie", b"a=b"),
        ]
        if whole:
            response.monedgeTakeBody = lambda: b"hello"  # type: ignore[attr-defined]
        call.result.callback(response)
        if not whole:
            response.deliver(b"hello")
            response.end()
        return call, transport.value()

    def test_clientAsks(self) -> None:
        """
        A client that sends C{TE: trailers} (in any case, in a list) makes
        monedge send C{TE: trailers} upstream, and gets the upstream's
        trailer fields after the last chunk, those that may be trailers.
        """
        for te in (b"trailers", b"gzip, Trailers"):
            call, sent = self._exchange(te)
            self.assertEqual(call.headers.getRawHeaders(b"te"), [b"trailers"], te)
            self.assertTrue(
                sent.endswith(b"5\r\nhello\r\n0\r\nX-Sig: s1\r\n\r\n"), (te, sent)
            )

    def test_clientDoesNotAsk(self) -> None:
        """
        A client without C{TE: trailers} gets the body without the trailer
        fields, and no C{TE} goes upstream.
        """
        for te in (None, b"gzip"):
            call, sent = self._exchange(te)
            self.assertIsNone(call.headers.getRawHeaders(b"te"), te)
            self.assertTrue(sent.endswith(b"5\r\nhello\r\n0\r\n\r\n"), (te, sent))

    def test_wholeResponse(self) -> None:
        """
        A chunked response that came whole with its head (the common small
        response, relayed in one write) keeps its trailer fields for a
        client that asked for them, and only for one.
        """
        _, sent = self._exchange(b"trailers", whole=True)
        self.assertTrue(sent.endswith(b"5\r\nhello\r\n0\r\nX-Sig: s1\r\n\r\n"), sent)
        _, sent = self._exchange(None, whole=True)
        self.assertTrue(sent.endswith(b"5\r\nhello\r\n0\r\n\r\n"), sent)
