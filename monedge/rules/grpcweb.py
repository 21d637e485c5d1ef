"""
gRPC-Web at the edge: the content-types, the streaming base64 codec of
C{application/grpc-web-text}, and the trailer frame a gRPC-Web response
carries in its body.

    application/grpc-web-text+proto   (client)
        ->  application/grpc+proto, te: trailers, body base64-decoded
    application/grpc+proto, DATA, trailers   (upstream)
        ->  application/grpc-web-text+proto, DATA and a trailer frame,
            base64-encoded

This module is pure: no I/O, no Twisted.  The translation itself is
L{monedge.proxy.grpcweb}'s; C{docs/protocols.md} describes both.
"""

from __future__ import annotations

import binascii
import re
import struct
from collections.abc import Iterable

from monedge.rules.headers import trailerFields

#: A gRPC-Web content-type's media type: binary or text, and its codec.
_GRPC_WEB = re.compile(rb"application/grpc-web(-text)?(\+[!-~]+)?\Z")

#: The flag byte of a gRPC-Web trailer frame (the message frames' is 0).
TRAILER_FLAG = 0x80

#: The codec a gRPC-Web response names when its request named none: gRPC's
#: default, as Envoy's grpc_web filter answers.
DEFAULT_CODEC = b"+proto"


class GrpcWebType:
    """
    A gRPC-Web request's content-type, parsed.

    @ivar text: C{application/grpc-web-text}: bodies are base64.
    @ivar codec: the C{+codec} suffix, C{+proto} say, or C{b""}.
    """

    __slots__ = ("text", "codec")

    def __init__(self, text: bool, codec: bytes) -> None:
        self.text = text
        self.codec = codec

    def upstream(self) -> bytes:
        """
        The content-type of the gRPC call it becomes upstream.
        """
        return b"application/grpc" + self.codec

    def response(self) -> bytes:
        """
        The content-type of the answer to the client: the request's kind
        (binary or text), with its codec, else C{+proto}.
        """
        kind = b"application/grpc-web-text" if self.text else b"application/grpc-web"
        return kind + (self.codec or DEFAULT_CODEC)

    def __repr__(self) -> str:
        return f"GrpcWebType(text={self.text!r}, codec={self.codec!r})"


def grpcWebType(value: bytes | None) -> GrpcWebType | None:
    """
    C{value}, a Content-Type, as a gRPC-Web type; L{None} if it is not one
    (C{application/grpc} itself included).  Parameters after C{;} are
    ignored; the type is case-insensitive.

    >>> grpcWebType(b"application/grpc-web-text+proto").upstream()
    b'application/grpc+proto'
    """
    if value is None:
        return None
    media = value.split(b";", 1)[0].strip().lower()
    match = _GRPC_WEB.match(media)
    if match is None:
        return None
    return GrpcWebType(match.group(1) is not None, match.group(2) or b"")


def trailerFrame(trailers: Iterable[tuple[bytes, bytes]]) -> bytes:
    """
    The gRPC-Web frame that carries a response's trailers in its body: the
    flag byte C{0x80}, the block's length (4 bytes, big-endian), then a
    C{name:value\\r\\n} line a field, names lower-case.  Only the fields
    that may cross as trailers do (L{trailerFields}).
    """
    kept = trailerFields(trailers, "allow") or []
    block = b"".join(name.lower() + b":" + value + b"\r\n" for name, value in kept)
    return struct.pack(">BI", TRAILER_FLAG, len(block)) + block


class InvalidBase64(ValueError):
    """
    A C{grpc-web-text} body is not base64.
    """


class Base64Decoder:
    """
    Decodes a base64 body as it streams: in whole 4-character groups, the
    rest carried to the next chunk.  Padding may end any group, not only
    the last: clients may encode each message on its own.
    """

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> bytes:
        """
        The bytes C{data} completes, after what was carried.

        @raise InvalidBase64: if the body is not base64.
        """
        data = self._rest + data
        end = len(data) - len(data) % 4
        self._rest = data[end:]
        out = []
        start = 0
        while start < end:
            # Up to the end of the next padded group (or of the data): a
            # run that strict decoding takes whole.
            pad = data.find(b"=", start, end)
            stop = end if pad < 0 else pad - pad % 4 + 4
            try:
                out.append(binascii.a2b_base64(data[start:stop], strict_mode=True))
            except binascii.Error as e:
                raise InvalidBase64(str(e)) from None
            start = stop
        return b"".join(out)

    def finish(self) -> None:
        """
        The body has ended.

        @raise InvalidBase64: if a partial group is left.
        """
        if self._rest:
            raise InvalidBase64("the body ends inside a base64 group")


class Base64Encoder:
    """
    Encodes a body as it streams: in whole 3-byte groups, the rest carried,
    so that the whole body is one base64 text, padded only at its end.
    """

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, data: bytes) -> bytes:
        """
        The base64 of what C{data} completes, after what was carried.
        """
        data = self._rest + data
        end = len(data) - len(data) % 3
        self._rest = data[end:]
        return binascii.b2a_base64(data[:end], newline=False) if end else b""

    def finish(self) -> bytes:
        """
        The base64 of what is left, padded.
        """
        rest, self._rest = self._rest, b""
        return binascii.b2a_base64(rest, newline=False) if rest else b""
