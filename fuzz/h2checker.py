"""
The invariants behind monedge's HTTP/2 fuzz target
(C{fuzz/http2_frames.py}) and its seed tests (C{tests/test_fuzz.py}).

L{checkFrameBytes} treats its input as the bytes a client sends on one
HTTP/2 connection after the client preface.  It feeds the preface and them
to a real listener connection (monedge's protocol switch, which hands the
connection to its L{monedge.edge.http2.H2Channel}, with the real request,
resource tree and exchange) over a L{StringTransport}, once whole and once
split at points derived from the input, with an upstream client that reads
every request body and answers each request with a small 200 tagged with
the call's index; it runs a L{MemoryReactorClock} past every limit, and
checks:

 1. no exception escapes the channel, and nothing is logged at error or
    critical level or with a failure (a traceback);
 2. what the client receives is well-formed HTTP/2: a SETTINGS frame
    first, frames no larger than the client allowed, header blocks that
    decode, no PUSH_PROMISE, no frame on a stream after the server ended
    it, and no more DATA than the client's flow-control windows allowed;
 3. every stream gets exactly one final answer or reset: a final response
    head, then its body, ended once (a RST_STREAM may follow, to stop a
    request body or refuse what the client sent after), or one RST_STREAM;
    every stream the client opened (an independent reading of the client's
    frames) is answered, unless the client reset it or sent GOAWAY, or the
    server ended the connection with an error GOAWAY; a response carries
    only C{:status} as a pseudo-header, lower-case names and no
    connection-specific header; and once every limit has passed, monedge
    has closed the connection (no stream is left open);
 4. every 4xx and 5xx is monedge's JSON error, with a catalogued code and
    the response's request id; every 200 is the upstream's answer to one
    call, never given to two streams.

A broken invariant raises L{AssertionError}.
"""

from __future__ import annotations

import io
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.settings
import hpack
from hyperframe.exceptions import HyperframeError
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IConsumer
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from fuzz.checker import (
    _ADVANCES,
    _CONFIGURATION,
    LISTENER_PORT,
    PEER,
    Response,
    TaggingUpstream,
    _describe,
    _metrics,
    answerBody,
    buildRegistry,
    checkErrorResponse,
    fail,
    splitPoints,
    watchLog,
)
from monedge.observe.accesslog import AccessLog
from monedge.runtime.compose import buildProxy
from monedge.upstream.balancer import Balancer
from monedge.upstream.endpoints import UpstreamTLS

#: The client connection preface (RFC 9113, 3.4); the fuzz input follows it.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: The flow-control window and frame size before SETTINGS change them.
DEFAULT_WINDOW = 65535
DEFAULT_FRAME = 16384

#: Response headers that are HTTP/1.1's connection management (RFC 9113,
#: 8.2.2).
_CONNECTION_SPECIFIC = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
    ]
)

_NO_ERROR = 0


# The upstream


@implementer(IConsumer)
class _Collector:
    """
    The consumer a request body is produced into.
    """

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, data: bytes) -> None:
        self.data += data

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass


class BodyReadingUpstream(TaggingUpstream):
    """
    A L{TaggingUpstream} that also reads every request body, as the real
    upstream client does, so that the channel's body path (and its
    flow-control acknowledgements) runs.
    """

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        connectTimeout: float,
        tls: UpstreamTLS | None = None,
    ) -> Deferred[IResponse]:
        result = super().request(method, url, headers, body, connectTimeout, tls)
        if body is not None:
            done = body.startProducing(_Collector())
            # A body the client abandons fails: that is the exchange's to
            # handle, not an error of the upstream's.
            done.addErrback(lambda _: None)
        return result


# The client's side, read independently


@dataclass
class ClientStream:
    """
    One stream the client opened, as its own frames say.
    """

    streamId: int
    method: bytes = b""
    reset: bool = False
    #: The most flow-controlled bytes the server may have sent on it: the
    #: largest initial window in force while it was open, plus the
    #: client's WINDOW_UPDATEs for it.
    window: int = 0


@dataclass
class ClientModel:
    """
    What the client's bytes do, read without monedge's code: the streams
    it opens (a complete header block on a new odd stream), the windows it
    grants and the largest frame it accepts.  C{broken} when the bytes stop
    being frames (the server is then free to end the connection).
    """

    streams: dict[int, ClientStream] = field(default_factory=dict)
    connectionWindow: int = DEFAULT_WINDOW
    maxFrame: int = DEFAULT_FRAME
    #: The largest HPACK table the client allowed the server's encoder.
    headerTable: int = 4096
    broken: bool = False
    goaway: bool = False


def readClient(data: bytes) -> ClientModel:
    """
    Read the client's frames in C{data} (after the preface).
    """
    model = ClientModel()
    decoder = hpack.Decoder(max_header_list_size=1 << 24)
    initial = DEFAULT_WINDOW
    highest = 0
    block: tuple[int, bytearray] | None = None
    pos = 0
    while len(data) - pos >= 9:
        length = int.from_bytes(data[pos : pos + 3], "big")
        if len(data) - pos - 9 < length:
            break
        try:
            frame, _ = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
            frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        except (HyperframeError, ValueError):
            model.broken = True
            break
        pos += 9 + length
        if block is not None and not isinstance(frame, ContinuationFrame):
            model.broken = True
            break
        if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
            for code, value in frame.settings.items():
                if code == h2.settings.SettingCodes.INITIAL_WINDOW_SIZE:
                    initial = value
                    for stream in model.streams.values():
                        stream.window = max(stream.window, value)
                elif code == h2.settings.SettingCodes.MAX_FRAME_SIZE:
                    model.maxFrame = max(model.maxFrame, value)
                elif code == h2.settings.SettingCodes.HEADER_TABLE_SIZE:
                    model.headerTable = max(model.headerTable, value)
        elif isinstance(frame, WindowUpdateFrame):
            if frame.stream_id == 0:
                model.connectionWindow += frame.window_increment
            elif frame.stream_id in model.streams:
                model.streams[frame.stream_id].window += frame.window_increment
        elif isinstance(frame, RstStreamFrame):
            if frame.stream_id in model.streams:
                model.streams[frame.stream_id].reset = True
        elif isinstance(frame, GoAwayFrame):
            # The client is going: monedge may close at once (h2 sends
            # nothing after a peer's GOAWAY).
            model.goaway = True
        elif isinstance(frame, HeadersFrame | ContinuationFrame):
            if isinstance(frame, HeadersFrame):
                block = (frame.stream_id, bytearray())
            elif block is None or block[0] != frame.stream_id:
                model.broken = True
                break
            block[1].extend(frame.data)
            if "END_HEADERS" not in frame.flags:
                continue
            streamId, raw = block
            block = None
            try:
                headers = decoder.decode(bytes(raw), raw=True)
            except Exception:
                model.broken = True
                break
            if streamId in model.streams or streamId % 2 == 0:
                continue
            if streamId <= highest:
                continue
            highest = streamId
            method = b""
            for fieldName, fieldValue in headers:
                if bytes(fieldName) == b":method":
                    method = bytes(fieldValue)
            model.streams[streamId] = ClientStream(streamId, method, window=initial)
    return model


# The server's side


@dataclass
class ServerStream:
    """
    What the server sent on one stream.
    """

    heads: list[list[tuple[bytes, bytes]]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    flowControlled: int = 0
    ended: bool = False
    reset: int | None = None

    def final(self) -> list[tuple[bytes, bytes]] | None:
        """
        The final (non-1xx) response head, if any.
        """
        for head in self.heads:
            if _status(head) >= 200:
                return head
        return None


def _status(head: Sequence[tuple[bytes, bytes]]) -> int:
    for name, value in head:
        if name == b":status":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


@dataclass
class ServerOutput:
    """
    The frames the client received, by stream.
    """

    streams: dict[int, ServerStream] = field(default_factory=dict)
    goaways: list[tuple[int, int]] = field(default_factory=list)
    data: int = 0


def readServer(output: bytes, client: ClientModel) -> ServerOutput:
    """
    Parse what the server sent, checking invariant 2 as it goes.
    """
    result = ServerOutput()
    decoder = hpack.Decoder(max_header_list_size=1 << 24)
    decoder.max_allowed_table_size = client.headerTable
    block: tuple[int, bool, bytearray] | None = None
    pos = 0
    first = True
    while pos < len(output):
        if len(output) - pos < 9:
            raise fail("a truncated frame header", output[pos:])
        length = int.from_bytes(output[pos : pos + 3], "big")
        if len(output) - pos - 9 < length:
            raise fail("a truncated frame", output[pos : pos + 40])
        try:
            frame, _ = Frame.parse_frame_header(
                memoryview(output[pos : pos + 9]), strict=True
            )
            frame.parse_body(memoryview(output[pos + 9 : pos + 9 + length]))
        except (HyperframeError, ValueError) as e:
            raise fail("a malformed frame", repr(e), output[pos : pos + 40]) from None
        pos += 9 + length
        if first and not isinstance(frame, SettingsFrame):
            raise fail("the server's first frame is not SETTINGS", frame)
        first = False
        if length > client.maxFrame:
            raise fail("a frame larger than the client allows", frame)
        if block is not None and not isinstance(frame, ContinuationFrame):
            raise fail("a frame inside a header block", frame)
        if isinstance(frame, PushPromiseFrame):
            raise fail("a PUSH_PROMISE", frame)
        if isinstance(frame, GoAwayFrame):
            result.goaways.append((frame.error_code, frame.last_stream_id))
            continue
        if isinstance(frame, SettingsFrame | PingFrame | WindowUpdateFrame):
            continue
        streamId = frame.stream_id
        stream = result.streams.setdefault(streamId, ServerStream())
        if isinstance(frame, RstStreamFrame):
            if stream.reset is not None:
                raise fail("a stream reset twice", streamId)
            stream.reset = frame.error_code
            continue
        if stream.ended or stream.reset is not None:
            raise fail("a frame on a stream the server had ended", frame)
        if isinstance(frame, HeadersFrame):
            block = (streamId, "END_STREAM" in frame.flags, bytearray(frame.data))
        elif isinstance(frame, ContinuationFrame):
            if block is None or block[0] != streamId:
                raise fail("a stray CONTINUATION", frame)
            block[2].extend(frame.data)
        if isinstance(frame, HeadersFrame | ContinuationFrame):
            assert block is not None
            if "END_HEADERS" not in frame.flags:
                continue
            _, endStream, raw = block
            block = None
            try:
                head = [
                    (bytes(n), bytes(v)) for n, v in decoder.decode(bytes(raw), True)
                ]
            except Exception as e:
                raise fail("an undecodable response head", repr(e)) from None
            if stream.final() is not None and not endStream:
                raise fail("a second final response head", streamId, head)
            if stream.final() is not None:
                # Trailers: no pseudo-header.
                if any(name.startswith(b":") for name, _ in head):
                    raise fail("a pseudo-header in trailers", head)
            else:
                checkResponseHead(head)
                stream.heads.append(head)
            if endStream:
                if stream.final() is None:
                    raise fail("a stream ended without a final response", streamId)
                stream.ended = True
        elif isinstance(frame, DataFrame):
            if stream.final() is None:
                raise fail("DATA before the response head", streamId)
            stream.body += frame.data
            stream.flowControlled += frame.flow_controlled_length
            result.data += frame.flow_controlled_length
            if "END_STREAM" in frame.flags:
                stream.ended = True
    if block is not None:
        raise fail("the output ends inside a header block")
    return result


def checkResponseHead(head: Sequence[tuple[bytes, bytes]]) -> None:
    """
    A response head: C{:status} first and only, a valid status, lower-case
    names, nothing connection-specific.
    """
    if not head or head[0][0] != b":status":
        raise fail("a response head without :status first", head)
    status = _status(head)
    if not 100 <= status <= 599 or status == 101:
        raise fail("a response status out of range", head)
    for name, _ in head[1:]:
        if name.startswith(b":"):
            raise fail("a pseudo-header other than :status", head)
        if name != name.lower() or not name:
            raise fail("a header name that is not lower case", head)
        if name in _CONNECTION_SPECIFIC:
            raise fail("a connection-specific header", head)


# One connection


@dataclass
class H2Outcome:
    """
    What one HTTP/2 connection did.
    """

    output: bytes
    closed: bool
    upstream: TaggingUpstream


def runH2Connection(
    chunks: Sequence[bytes], answerAfter: Sequence[bool] = ()
) -> H2Outcome:
    """
    Open one cleartext connection to a fresh proxy, send the client preface
    and C{chunks} (one C{dataReceived} each, stopping once the proxy closes
    the connection), answer the upstream after chunk I{i} if
    C{answerAfter[i]}, then answer the upstream and run the clock past
    every limit, and let the client go.
    """
    clock = MemoryReactorClock()
    upstream = BodyReadingUpstream()
    site = buildProxy(
        _CONFIGURATION,
        clock,
        registry=buildRegistry(),
        client=upstream,
        metrics=_metrics(),
        accessLog=AccessLog(io.StringIO()),
        balancer=Balancer(clock, rng=random.Random(7)),
        hooks=None,
        upgrader=None,
    ).site
    address = IPv4Address("TCP", PEER, 40000)
    protocol = site.buildProtocol(address)
    transport = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", LISTENER_PORT),
        peerAddress=address,
    )
    protocol.makeConnection(transport)
    protocol.dataReceived(PREFACE)
    for index, chunk in enumerate(chunks):
        if transport.disconnecting:
            break
        protocol.dataReceived(chunk)
        if index < len(answerAfter) and answerAfter[index]:
            upstream.answer()
    for step in _ADVANCES:
        upstream.answer()
        clock.advance(step)
    upstream.answer()
    closed = bool(transport.disconnecting)
    protocol.connectionLost(Failure(ConnectionDone()))
    clock.advance(1.0)
    return H2Outcome(transport.value(), closed, upstream)


def checkH2Outcome(outcome: H2Outcome, client: ClientModel) -> list[tuple[Any, ...]]:
    """
    Invariants 2 to 4 on one connection; return a summary of each
    stream's answer.
    """
    server = readServer(outcome.output, client)
    errorGoaway = any(code != _NO_ERROR for code, _ in server.goaways)
    if server.data > client.connectionWindow:
        raise fail("more DATA than the connection window", server.data)
    calls = outcome.upstream.calls
    tags: set[int] = set()
    summary: list[tuple[Any, ...]] = []
    for streamId, stream in sorted(server.streams.items()):
        if streamId == 0 or streamId % 2 == 0:
            raise fail("a frame on a stream the client cannot have opened", streamId)
        opened = client.streams.get(streamId)
        if opened is not None and stream.flowControlled > opened.window:
            raise fail(
                "more DATA than the stream window", streamId, stream.flowControlled
            )
        head = stream.final()
        if head is None:
            summary.append((streamId, "reset", stream.reset))
            continue
        status = _status(head)
        summary.append((streamId, status, stream.reset))
        if not stream.ended:
            # Cut off: a reset, or the connection ended under it.
            continue
        response = Response(b"HTTP/2", status, head[1:], bytes(stream.body), b"")
        isHead = opened is not None and opened.method == b"HEAD"
        if status >= 400:
            checkErrorResponse(response, head=isHead)
        elif status == 200:
            tag = response.header(b"x-fuzz-call")
            if len(tag) != 1 or not tag[0].isdigit() or int(tag[0]) >= len(calls):
                raise fail("a 200 that is no upstream call's", streamId, head)
            index = int(tag[0])
            if index in tags:
                raise fail("one call's answer on two streams", streamId, index)
            tags.add(index)
            expected = b"" if isHead else answerBody(calls[index])
            if response.body != expected:
                raise fail("a 200 with another call's body", streamId, response.body)
    if not outcome.closed:
        raise fail(
            "the connection is still open once every limit has passed"
            " (a stream left open?)",
            summary,
        )
    if not (errorGoaway or client.broken or client.goaway):
        last = min((lastId for _, lastId in server.goaways), default=None)
        for streamId, opened in client.streams.items():
            if opened.reset or (last is not None and streamId > last):
                continue
            answer = server.streams.get(streamId)
            if answer is None or not (answer.ended or answer.reset is not None):
                raise fail("a stream the client opened is never answered", streamId)
    return summary


def checkFrameBytes(data: bytes) -> None:
    """
    Check every invariant on C{data}, the bytes a client sends on one
    HTTP/2 connection after the preface, fed whole and split.

    @raise AssertionError: if one is broken.
    """
    client = readClient(data)
    chunks, answerAfter = splitPoints(data)
    with watchLog() as bad:
        whole = runH2Connection([data] if data else [])
        split = runH2Connection(chunks if data else [], answerAfter)
    if bad:
        raise fail(
            "something was logged at error level", *(_describe(e) for e in bad[:3])
        )
    checkH2Outcome(whole, client)
    checkH2Outcome(split, client)


# The seeds


def _conversation() -> h2.connection.H2Connection:
    connection = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    connection.initiate_connection()
    return connection


def _request(
    path: bytes, method: bytes = b"GET", *extra: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method),
        (b":scheme", b"http"),
        (b":authority", b"api.example.com"),
        (b":path", path),
        *extra,
    ]


def _afterPreface(connection: h2.connection.H2Connection) -> bytes:
    data = connection.data_to_send()
    assert data.startswith(PREFACE)
    return bytes(data[len(PREFACE) :])


def _get() -> bytes:
    c = _conversation()
    c.send_headers(
        1, _request(b"/echo/a?x=1", b"GET", (b"accept", b"*/*")), end_stream=True
    )
    return _afterPreface(c)


def _post() -> bytes:
    c = _conversation()
    c.send_headers(
        1,
        _request(b"/echo/upload", b"POST", (b"content-length", b"11")),
        end_stream=False,
    )
    c.send_data(1, b"hello ")
    c.send_data(1, b"world", end_stream=True)
    return _afterPreface(c)


def _trailers() -> bytes:
    c = _conversation()
    c.send_headers(1, _request(b"/other/grpc", b"POST", (b"te", b"trailers")))
    c.send_data(1, b"\x00\x00\x00\x00\x02hi")
    c.send_headers(1, [(b"x-checksum", b"abc")], end_stream=True)
    return _afterPreface(c)


def _ping() -> bytes:
    c = _conversation()
    c.ping(b"12345678")
    c.send_headers(1, _request(b"/echo/p"), end_stream=True)
    c.ping(b"abcdefgh")
    return _afterPreface(c)


def _settings() -> bytes:
    c = _conversation()
    c.update_settings(
        {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 16,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: 32768,
            h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0,
        }
    )
    c.send_headers(1, _request(b"/echo/s"), end_stream=True)
    c.increment_flow_control_window(1024, stream_id=1)
    return _afterPreface(c)


def _streams() -> bytes:
    c = _conversation()
    c.send_headers(1, _request(b"/echo/one"), end_stream=True)
    c.send_headers(3, _request(b"/legacy/two", b"HEAD"), end_stream=True)
    c.send_headers(5, _request(b"/nope/x"), end_stream=True)
    c.send_headers(
        7, _request(b"/small/x", b"POST", (b"content-length", b"17")), end_stream=False
    )
    c.send_data(7, b"x" * 17, end_stream=True)
    c.send_headers(9, _request(b"/echo/%2e%2e/x"), end_stream=True)
    c.send_headers(
        11,
        _request(b"/echo/h", b"GET", (b"x_user", b"1"), (b"host", b"api.example.com")),
        end_stream=True,
    )
    return _afterPreface(c)


def _reset() -> bytes:
    c = _conversation()
    c.send_headers(1, _request(b"/echo/r", b"POST"), end_stream=False)
    c.send_data(1, b"part")
    c.reset_stream(1)
    c.send_headers(3, _request(b"/echo/after"), end_stream=True)
    return _afterPreface(c)


def _goaway() -> bytes:
    c = _conversation()
    c.send_headers(1, _request(b"/echo/g"), end_stream=True)
    c.close_connection()
    return _afterPreface(c)


#: Valid conversations built with the h2 package's client, by name: each
#: the bytes after the preface.
H2_SEEDS: dict[str, bytes] = {
    "get": _get(),
    "post-data": _post(),
    "trailers": _trailers(),
    "ping": _ping(),
    "settings": _settings(),
    "streams": _streams(),
    "reset": _reset(),
    "goaway": _goaway(),
}

#: Tokens for libFuzzer's dictionary: frame headers and header names.
H2_DICTIONARY: tuple[bytes, ...] = (
    b"\x00\x00\x00\x04\x01\x00\x00\x00\x00",  # SETTINGS ACK
    b"\x00\x00\x08\x06\x00\x00\x00\x00\x00",  # PING
    b"\x00\x00\x04\x08\x00\x00\x00\x00\x00",  # WINDOW_UPDATE, connection
    b"\x00\x00\x04\x03\x00\x00\x00\x00\x01",  # RST_STREAM, stream 1
    b"\x00\x00\x08\x07\x00\x00\x00\x00\x00",  # GOAWAY
    b"\x01\x05\x00\x00\x00\x01",  # HEADERS END_STREAM|END_HEADERS, stream 1
    b"\x09\x04\x00\x00\x00\x01",  # CONTINUATION END_HEADERS, stream 1
    b"\x00\x01\x00\x00\x00\x01",  # DATA END_STREAM, stream 1
    b":path",
    b":method",
    b":authority",
    b":scheme",
    b"content-length",
    b"host",
    b"te",
    b"trailers",
    b"/echo/",
    b"/small/",
)


def writeH2Seeds(directory: str, regressions: str | None = None) -> list[str]:
    """
    Write the HTTP/2 seed corpus into C{directory}: L{H2_SEEDS}, and every
    file in C{regressions} but its C{README.md}.

    @return: the paths written.
    """
    os.makedirs(directory, exist_ok=True)
    written = []
    sources = [(f"h2-{name}", data) for name, data in H2_SEEDS.items()]
    if regressions is not None and os.path.isdir(regressions):
        for entry in sorted(os.listdir(regressions)):
            path = os.path.join(regressions, entry)
            if entry != "README.md" and os.path.isfile(path):
                with open(path, "rb") as f:
                    sources.append((f"regression-{entry}", f.read()))
    for name, data in sources:
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        written.append(path)
    return written


def writeH2Dictionary(path: str) -> None:
    """
    Write L{H2_DICTIONARY} in libFuzzer's C{-dict} format.
    """
    with open(path, "w", encoding="ascii") as f:
        for token in H2_DICTIONARY:
            escaped = "".join(
                chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}"
                for b in token
            )
            f.write(f'"{escaped}"\n')
