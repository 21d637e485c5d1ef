"""
A raw HTTP/2 client for attack tests: it writes frames built with
C{hyperframe} and C{hpack} (well-formed or not, in any number, with or
without reading), and reads and checks every frame the server sends.

It keeps no HTTP/2 state machine of its own, so that it can do what a
hostile client does (open more streams than allowed, send DATA on a closed
stream, never acknowledge a window); a well-behaved client is
C{h2.connection.H2Connection} (L{h2Get}).  Blocking: call it in a thread.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import hpack
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

__all__ = [
    "PREFACE",
    "GoAway",
    "H2Peer",
    "StreamResult",
    "continuationFrame",
    "dataFrame",
    "h2Get",
    "headersFrames",
    "pingFrame",
    "rawFrame",
    "rstStreamFrame",
    "settingsFrame",
    "windowUpdateFrame",
]

#: The client connection preface (RFC 9113, 3.4).
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

#: The largest frame payload a peer must accept before SETTINGS say more.
DEFAULT_MAX_FRAME = 16384

#: Frame types, as on the wire.
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0,
    1,
    3,
    4,
    6,
    7,
    8,
    9,
)


def rawFrame(frameType: int, flags: int, streamId: int, payload: bytes) -> bytes:
    """
    A frame written byte by byte: for frames C{hyperframe} would not build
    (a wrong length, a reserved stream).
    """
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([frameType, flags])
        + struct.pack(">I", streamId)
        + payload
    )


def settingsFrame(settings: dict[int, int] | None = None, ack: bool = False) -> bytes:
    """
    A SETTINGS frame (or its ACK).
    """
    if ack:
        return bytes(SettingsFrame(0, flags=["ACK"]).serialize())
    return bytes(SettingsFrame(0, settings=dict(settings or {})).serialize())


def pingFrame(opaque: bytes = b"\0" * 8, ack: bool = False) -> bytes:
    """
    A PING frame (or its ACK) carrying C{opaque}.
    """
    return bytes(
        PingFrame(0, opaque_data=opaque, flags=["ACK"] if ack else []).serialize()
    )


def dataFrame(streamId: int, data: bytes, endStream: bool = False) -> bytes:
    """
    A DATA frame.
    """
    return bytes(
        DataFrame(
            streamId, data=data, flags=["END_STREAM"] if endStream else []
        ).serialize()
    )


def rstStreamFrame(streamId: int, errorCode: int) -> bytes:
    """
    A RST_STREAM frame.
    """
    return bytes(RstStreamFrame(streamId, error_code=errorCode).serialize())


def windowUpdateFrame(streamId: int, increment: int) -> bytes:
    """
    A WINDOW_UPDATE frame.
    """
    return bytes(WindowUpdateFrame(streamId, window_increment=increment).serialize())


def continuationFrame(streamId: int, block: bytes, endHeaders: bool = False) -> bytes:
    """
    A CONTINUATION frame carrying part of a header block.
    """
    return bytes(
        ContinuationFrame(
            streamId, data=block, flags=["END_HEADERS"] if endHeaders else []
        ).serialize()
    )


def headersFrames(
    streamId: int,
    block: bytes,
    endStream: bool = True,
    endHeaders: bool = True,
    maxFrame: int = DEFAULT_MAX_FRAME,
) -> bytes:
    """
    A header block as one HEADERS frame and as many CONTINUATION frames as
    C{maxFrame} needs; without C{endHeaders}, the last frame does not end
    the block.
    """
    pieces = [block[i : i + maxFrame] for i in range(0, len(block), maxFrame)] or [b""]
    flags = ["END_STREAM"] if endStream else []
    if len(pieces) == 1 and endHeaders:
        flags.append("END_HEADERS")
    out = [bytes(HeadersFrame(streamId, data=pieces[0], flags=flags).serialize())]
    for index, piece in enumerate(pieces[1:], start=2):
        last = index == len(pieces) and endHeaders
        out.append(continuationFrame(streamId, piece, last))
    return b"".join(out)


@dataclass
class StreamResult:
    """
    What the server sent on one stream.

    @ivar headers: the response's header block (C{:status} included), once
        it has arrived.
    @ivar trailers: a second header block, if any.
    @ivar body: the DATA received.
    @ivar flowControlled: the flow-controlled bytes of that DATA (padding
        included).
    @ivar ended: whether the server ended the stream (END_STREAM).
    @ivar reset: the error code of the server's RST_STREAM, if it sent one.
    @ivar frames: the frames the server sent on it, in order: C{HEADERS}
        and C{DATA}, with C{+END_STREAM} on the one that ended it.
    """

    headers: list[tuple[bytes, bytes]] | None = None
    trailers: list[tuple[bytes, bytes]] | None = None
    body: bytearray = field(default_factory=bytearray)
    flowControlled: int = 0
    ended: bool = False
    reset: int | None = None
    frames: list[str] = field(default_factory=list)

    @property
    def status(self) -> int | None:
        """
        The C{:status} of the response, if its head has arrived.
        """
        if self.headers is None:
            return None
        for name, value in self.headers:
            if name == b":status":
                return int(value)
        return None

    def header(self, name: bytes) -> list[bytes]:
        """
        Every value of response header C{name}.
        """
        return [v for n, v in self.headers or () if n == name]


@dataclass(frozen=True)
class GoAway:
    """
    A GOAWAY frame the server sent.
    """

    errorCode: int
    lastStreamId: int
    debug: bytes


class H2Peer:
    """
    One client connection to an HTTP/2 server, with the preface and the
    client's SETTINGS already sent.

    @ivar streams: what the server sent on each stream, by stream id.
    @ivar goaways: every GOAWAY the server sent, in order.
    @ivar pingAcks: how many PING ACKs the server sent.
    @ivar settingsAcks: how many SETTINGS ACKs the server sent.
    @ivar serverSettings: the server's settings, as its SETTINGS frames
        said.
    @ivar closed: whether the server closed (or reset) the connection.
    @ivar writeFailed: whether a write failed because the server had
        closed the connection.
    @ivar violations: what the server did that HTTP/2 forbids it.
    @ivar sent: how many bytes this client has written.
    @ivar autoWindow: give back, with WINDOW_UPDATE frames, the window of
        every DATA frame received (a reading client); off, the windows are
        the test's to manage.
    @ivar autoAck: acknowledge the server's SETTINGS and PINGs, as a
        client must.
    """

    def __init__(
        self,
        port: int,
        context: ssl.SSLContext | None,
        serverName: str,
        settings: dict[int, int] | None = None,
        connectionWindow: int = 0,
        timeout: float = 10.0,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        if context is not None:
            self.socket: socket.socket = context.wrap_socket(
                raw, server_hostname=serverName
            )
            protocol = self.socket.selected_alpn_protocol()
            if protocol != "h2":
                self.socket.close()
                raise AssertionError(f"ALPN chose {protocol!r}, not h2")
        else:
            self.socket = raw
        self.socket.setblocking(False)
        self.scheme = b"https" if context is not None else b"http"
        self.authority = serverName.encode("ascii")
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.streams: dict[int, StreamResult] = {}
        self.goaways: list[GoAway] = []
        self.pingAcks = 0
        self.settingsAcks = 0
        self.serverSettings: dict[int, int] = {}
        self.closed = False
        self.writeFailed = False
        self.violations: list[str] = []
        self.sent = 0
        self.autoWindow = True
        self.autoAck = True
        self._buffer = bytearray()
        self._outgoing = bytearray()
        self._block: tuple[int, bool, bytearray] | None = None
        self._sawSettings = False
        self._notHTTP2 = False
        first = settingsFrame({0x2: 0, **(settings or {})})
        if connectionWindow:
            first += windowUpdateFrame(0, connectionWindow)
        self.write(PREFACE + first)

    # Writing

    def requestBlock(
        self,
        path: bytes,
        method: bytes = b"GET",
        extra: Iterable[tuple[bytes, bytes]] = (),
    ) -> bytes:
        """
        The HPACK block of a request's headers: the pseudo-headers, then
        C{extra} in order.  (Encoding changes the encoder's table: send
        the blocks in the order they were made.)
        """
        headers = [
            (b":method", method),
            (b":scheme", self.scheme),
            (b":authority", self.authority),
            (b":path", path),
            *extra,
        ]
        return bytes(self.encoder.encode(headers))

    def request(
        self,
        streamId: int,
        path: bytes,
        method: bytes = b"GET",
        extra: Iterable[tuple[bytes, bytes]] = (),
        endStream: bool = True,
    ) -> bytes:
        """
        The frames of a request's head on C{streamId}.
        """
        return headersFrames(
            streamId, self.requestBlock(path, method, extra), endStream=endStream
        )

    def write(self, data: bytes, read: bool = True, timeout: float = 5.0) -> int:
        """
        Write C{data}, reading (and handling) what the server sends
        meanwhile unless C{read} is false; stop early when the server
        closes the connection or C{timeout} passes without the data all
        written.  Return how many bytes were written.
        """
        view = memoryview(data)
        done = 0
        deadline = time.monotonic() + timeout
        while done < len(view) and not self.writeFailed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readers = [self.socket] if read and not self.closed else []
            readable, writable, _ = select.select(
                readers, [self.socket], [], min(remaining, 0.5)
            )
            if readable:
                self._readAvailable()
            if not writable:
                continue
            try:
                count = self.socket.send(view[done : done + 65536])
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                continue
            except OSError:
                self.writeFailed = True
                break
            done += count
            self.sent += count
        return done

    def _flush(self) -> None:
        if self._outgoing and not self.writeFailed:
            data = bytes(self._outgoing)
            self._outgoing.clear()
            self.write(data, read=False, timeout=2.0)

    # Reading

    def readUntil(self, condition: Callable[[], bool], timeout: float) -> bool:
        """
        Read and handle what the server sends until C{condition()} holds,
        the server closes the connection, or C{timeout} seconds pass;
        return whether C{condition()} holds.
        """
        deadline = time.monotonic() + timeout
        while not condition():
            self._flush()
            if self.closed:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            pending = isinstance(self.socket, ssl.SSLSocket) and self.socket.pending()
            if pending or select.select([self.socket], [], [], min(remaining, 0.2))[0]:
                self._readAvailable()
        self._flush()
        return condition()

    def handshake(self, timeout: float = 5.0) -> bool:
        """
        Read until the server has acknowledged this client's SETTINGS (its
        own SETTINGS come first); whether it did.
        """
        return self.readUntil(lambda: self.settingsAcks > 0, timeout)

    def idle(self, seconds: float) -> None:
        """
        Read (and answer) what the server sends for C{seconds}.
        """
        self.readUntil(lambda: False, seconds)

    def readUntilClosed(self, timeout: float) -> bool:
        """
        Read until the server closes the connection; whether it did within
        C{timeout} seconds.
        """
        return self.readUntil(lambda: self.closed, timeout)

    def close(self) -> None:
        """
        Close the connection from this side.
        """
        self.socket.close()

    def _readAvailable(self) -> None:
        while not self.closed:
            try:
                chunk = self.socket.recv(65536)
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
                return
            except OSError:
                self.closed = True
                return
            if not chunk:
                self.closed = True
                return
            self._buffer += chunk
            self._parse()

    def _parse(self) -> None:
        buffer = self._buffer
        offset = 0
        while len(buffer) - offset >= 9 and not self._notHTTP2:
            length = int.from_bytes(buffer[offset : offset + 3], "big")
            if len(buffer) - offset < 9 + length:
                break
            header = memoryview(bytes(buffer[offset : offset + 9]))
            payload = memoryview(bytes(buffer[offset + 9 : offset + 9 + length]))
            offset += 9 + length
            if not self._sawSettings and buffer[offset - 9 - length + 3] != SETTINGS:
                self._notHTTP2 = True
                self.violations.append(
                    f"the server does not speak HTTP/2: {bytes(buffer[:64])!r}"
                )
                break
            self._sawSettings = True
            try:
                frame, _ = Frame.parse_frame_header(header)
                frame.parse_body(payload)
            except Exception as e:
                self.violations.append(f"a malformed frame: {e!r} {bytes(header)!r}")
                continue
            self._handle(frame)
        del buffer[:offset]

    def stream(self, streamId: int) -> StreamResult:
        """
        What the server sent on C{streamId} so far.
        """
        found = self.streams.get(streamId)
        if found is None:
            found = self.streams[streamId] = StreamResult()
        return found

    def _handle(self, frame: Frame) -> None:
        if self._block is not None and not isinstance(frame, ContinuationFrame):
            self.violations.append(f"a {type(frame).__name__} inside a header block")
        if isinstance(frame, SettingsFrame):
            if "ACK" in frame.flags:
                self.settingsAcks += 1
            else:
                self.serverSettings.update(frame.settings)
                if self.autoAck:
                    self._outgoing += settingsFrame(ack=True)
        elif isinstance(frame, PingFrame):
            if "ACK" in frame.flags:
                self.pingAcks += 1
            elif self.autoAck:
                self._outgoing += pingFrame(frame.opaque_data, ack=True)
        elif isinstance(frame, GoAwayFrame):
            self.goaways.append(
                GoAway(frame.error_code, frame.last_stream_id, frame.additional_data)
            )
        elif isinstance(frame, RstStreamFrame):
            stream = self.stream(frame.stream_id)
            if stream.reset is not None:
                self.violations.append(f"stream {frame.stream_id} reset twice")
            stream.reset = frame.error_code
        elif isinstance(frame, HeadersFrame | ContinuationFrame):
            self._headerFragment(frame)
        elif isinstance(frame, DataFrame):
            stream = self._open(frame.stream_id, "DATA")
            stream.body += frame.data
            stream.flowControlled += frame.flow_controlled_length
            stream.frames.append("DATA")
            if "END_STREAM" in frame.flags:
                stream.ended = True
                stream.frames[-1] += "+END_STREAM"
            if self.autoWindow and frame.flow_controlled_length:
                self._outgoing += windowUpdateFrame(0, frame.flow_controlled_length)
                if not stream.ended:
                    self._outgoing += windowUpdateFrame(
                        frame.stream_id, frame.flow_controlled_length
                    )
        elif isinstance(frame, PushPromiseFrame):
            self.violations.append("a PUSH_PROMISE with push disabled")

    def _open(self, streamId: int, what: str) -> StreamResult:
        stream = self.stream(streamId)
        if streamId == 0 or streamId % 2 == 0:
            self.violations.append(f"{what} on stream {streamId}")
        if stream.ended or stream.reset is not None:
            self.violations.append(f"{what} on stream {streamId} after it ended")
        return stream

    def _headerFragment(self, frame: HeadersFrame | ContinuationFrame) -> None:
        if isinstance(frame, HeadersFrame):
            if self._block is not None:
                self.violations.append("HEADERS inside a header block")
            self._block = (frame.stream_id, "END_STREAM" in frame.flags, bytearray())
        elif self._block is None or self._block[0] != frame.stream_id:
            self.violations.append(f"a stray CONTINUATION on {frame.stream_id}")
            return
        self._block[2].extend(frame.data)
        if "END_HEADERS" not in frame.flags:
            return
        streamId, endStream, block = self._block
        self._block = None
        stream = self._open(streamId, "HEADERS")
        try:
            headers = [
                (bytes(n), bytes(v)) for n, v in self.decoder.decode(bytes(block), True)
            ]
        except Exception as e:
            self.violations.append(f"an undecodable header block: {e!r}")
            return
        if stream.headers is None:
            stream.headers = headers
        else:
            stream.trailers = headers
        stream.frames.append("HEADERS")
        if endStream:
            stream.ended = True
            stream.frames[-1] += "+END_STREAM"

    # Conclusions

    def answered(self, streamId: int) -> bool:
        """
        Whether the server ended or reset C{streamId}.
        """
        stream = self.streams.get(streamId)
        return stream is not None and (stream.ended or stream.reset is not None)

    def allAnswered(self, streamIds: Sequence[int]) -> Callable[[], bool]:
        """
        A condition for L{readUntil}: every one of C{streamIds} answered.
        """
        return lambda: all(self.answered(s) for s in streamIds)

    @property
    def goaway(self) -> GoAway | None:
        """
        The first GOAWAY the server sent, if any.
        """
        return self.goaways[0] if self.goaways else None


def h2Get(
    port: int,
    context: ssl.SSLContext | None,
    serverName: str,
    path: str,
    timeout: float = 10.0,
) -> tuple[int, bytes]:
    """
    One GET on a new connection with the C{h2} package's own client (a
    well-behaved peer): its status and body.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with raw:
        sock: socket.socket = raw
        if context is not None:
            sock = context.wrap_socket(raw, server_hostname=serverName)
        connection = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        connection.initiate_connection()
        stream = connection.get_next_available_stream_id()
        connection.send_headers(
            stream,
            [
                (b":method", b"GET"),
                (b":scheme", b"https" if context is not None else b"http"),
                (b":authority", serverName.encode("ascii")),
                (b":path", path.encode("ascii")),
            ],
            end_stream=True,
        )
        sock.sendall(connection.data_to_send())
        status, body = 0, bytearray()
        while True:
            data = sock.recv(65536)
            if not data:
                raise AssertionError(f"connection closed before the answer to {path}")
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif isinstance(event, h2.events.StreamEnded):
                    sock.sendall(connection.data_to_send())
                    connection.close_connection()
                    sock.sendall(connection.data_to_send())
                    return status, bytes(body)
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"{path} reset: {event.error_code!r}")
            sock.sendall(connection.data_to_send())
