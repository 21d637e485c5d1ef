"""
Tests for L{monedge.rules.grpcweb}: gRPC-Web content-types, the trailer
frame, and the streaming base64 codec of C{-text} bodies.
"""

from __future__ import annotations

import base64

from twisted.trial.unittest import SynchronousTestCase

from monedge.rules.grpcweb import (
    Base64Decoder,
    Base64Encoder,
    InvalidBase64,
    grpcWebType,
    trailerFrame,
)


class ContentTypeTests(SynchronousTestCase):
    """
    L{grpcWebType} parses gRPC-Web's content-types, and says what they
    become upstream and in the answer.
    """

    def test_types(self) -> None:
        """
        Binary and text, with and without a codec, any case and parameters:
        upstream C{application/grpc} with the codec kept; the answer the
        same kind, with the codec, else C{+proto}.
        """
        cases = [
            (b"application/grpc-web", False, b"application/grpc",
             b"application/grpc-web+proto"),
            (b"application/grpc-web+proto", False, b"application/grpc+proto",
             b"application/grpc-web+proto"),
            (b"Application/GRPC-Web+json; charset=utf-8", False,
             b"application/grpc+json", b"application/grpc-web+json"),
            (b"application/grpc-web-text", True, b"application/grpc",
             b"application/grpc-web-text+proto"),
            (b"application/grpc-web-text+proto", True, b"application/grpc+proto",
             b"application/grpc-web-text+proto"),
        ]  # fmt: skip
        for value, text, upstream, response in cases:
            kind = grpcWebType(value)
            assert kind is not None, value
            self.assertEqual(kind.text, text, value)
            self.assertEqual(kind.upstream(), upstream, value)
            self.assertEqual(kind.response(), response, value)

    def test_notGrpcWeb(self) -> None:
        """
        gRPC itself, other types, near misses and no type are not gRPC-Web.
        """
        for value in [
            None,
            b"application/grpc",
            b"application/grpc+proto",
            b"application/grpc-webx",
            b"application/grpc-web-textual",
            b"application/grpc-web+",
            b"text/plain",
        ]:
            self.assertIsNone(grpcWebType(value), value)


class TrailerFrameTests(SynchronousTestCase):
    """
    L{trailerFrame} encodes trailers as gRPC-Web's last body frame.
    """

    def test_frame(self) -> None:
        """
        Flag 0x80, the block's big-endian length, then C{name:value\\r\\n}
        lines with lower-case names, in order.
        """
        frame = trailerFrame(
            [(b"grpc-status", b"6"), (b"Grpc-Message", b"exists"), (b"X-A", b"1")]
        )
        block = b"grpc-status:6\r\ngrpc-message:exists\r\nx-a:1\r\n"
        self.assertEqual(frame, b"\x80" + len(block).to_bytes(4, "big") + block)

    def test_filtered(self) -> None:
        """
        Fields that may not be trailers (framing, hop-by-hop), and
        malformed ones, are left out, as for HTTP trailers.
        """
        frame = trailerFrame(
            [
                (b"grpc-status", b"0"),
                (b"content-length", b"5"),
                (b"connection", b"close"),
                (b"x-bad", b"a\r\nb"),
            ]
        )
        self.assertEqual(frame[5:], b"grpc-status:0\r\n")

    def test_empty(self) -> None:
        """
        No trailers make an empty trailer frame.
        """
        self.assertEqual(trailerFrame([]), b"\x80\0\0\0\0")


class DecoderTests(SynchronousTestCase):
    """
    L{Base64Decoder} decodes a body as it streams.
    """

    def decodeAll(self, pieces: list[bytes]) -> bytes:
        """
        C{pieces} through one decoder, ended.
        """
        decoder = Base64Decoder()
        out = b"".join(decoder.feed(piece) for piece in pieces)
        decoder.finish()
        return out

    def test_anySplit(self) -> None:
        """
        However the text is cut into chunks, the bytes come out whole.
        """
        data = bytes(range(256)) * 3
        encoded = base64.b64encode(data)
        for size in [1, 2, 3, 4, 5, 7, 64, len(encoded)]:
            pieces = [encoded[i : i + size] for i in range(0, len(encoded), size)]
            self.assertEqual(self.decodeAll(pieces), data, size)

    def test_paddingMidStream(self) -> None:
        """
        Frames encoded one by one, each padded, decode as one body, in
        whatever chunks they come.
        """
        frames = [b"\0\0\0\0\x02hi", b"\0\0\0\0\x01x", b"\0\0\0\0\x03abc"]
        encoded = b"".join(base64.b64encode(frame) for frame in frames)
        self.assertIn(b"=", encoded[:-4])
        for size in [1, 3, 5, len(encoded)]:
            pieces = [encoded[i : i + size] for i in range(0, len(encoded), size)]
            self.assertEqual(self.decodeAll(pieces), b"".join(frames), size)

    def test_invalid(self) -> None:
        """
        Characters outside base64's alphabet, padding that does not end a
        group, and whitespace are refused.
        """
        for text in [b"AAA*", b"A===", b"=AAA", b"AA=A", b"AAAA AAA", b"AA\nAA"]:
            self.assertRaises(InvalidBase64, self.decodeAll, [text])

    def test_partialGroupAtEnd(self) -> None:
        """
        A body that ends inside a 4-character group is refused at its end.
        """
        decoder = Base64Decoder()
        self.assertEqual(decoder.feed(b"aGlo"), b"hih")
        self.assertEqual(decoder.feed(b"aQ"), b"")
        self.assertRaises(InvalidBase64, decoder.finish)


class EncoderTests(SynchronousTestCase):
    """
    L{Base64Encoder} encodes a body as it streams, padded only at its end.
    """

    def test_oneText(self) -> None:
        """
        Pieces of any size make the base64 of the whole, with no padding
        before the end.
        """
        data = bytes(range(256)) * 2
        for size in [1, 2, 4, 5, 100, len(data)]:
            encoder = Base64Encoder()
            pieces = [
                encoder.feed(data[i : i + size]) for i in range(0, len(data), size)
            ]
            self.assertNotIn(b"=", b"".join(pieces))
            out = b"".join(pieces) + encoder.finish()
            self.assertEqual(out, base64.b64encode(data), size)

    def test_nothingLeft(self) -> None:
        """
        A body of whole groups needs no ending.
        """
        encoder = Base64Encoder()
        self.assertEqual(encoder.feed(b"abc"), b"YWJj")
        self.assertEqual(encoder.finish(), b"")
