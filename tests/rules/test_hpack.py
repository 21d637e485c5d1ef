"""
L{monedge.rules.hpack.LeanEncoder}: header blocks any HPACK decoder reads
back to the fields given, never touching the dynamic table, and the fields
C{h2} would refuse to send refused.
"""

from __future__ import annotations

from typing import Any

from h2.exceptions import ProtocolError
from hpack import Decoder, HeaderTuple, NeverIndexedHeaderTuple
from hpack.hpack import encode_integer
from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from monedge.rules import hpack
from monedge.rules.hpack import REQUEST_PSEUDO, KeptDecoder, LeanEncoder

TOKEN = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"


def decode(decoder: Decoder, block: bytes) -> list[tuple[bytes, bytes]]:
    """
    C{block} decoded, as (name, value) pairs of bytes.
    """
    return [(bytes(n), bytes(v)) for n, v in decoder.decode(block, raw=True)]


class EncodeTests(SynchronousTestCase):
    """
    Blocks decode to what was given, with no dynamic table.
    """

    def test_roundTrip(self) -> None:
        """
        A response head (a static pair, static names, names not in the
        table, a value over 127 bytes) decodes to the same fields, in
        order, and leaves the decoder's dynamic table empty.
        """
        fields = [
            (b":status", b"200"),
            (b"content-type", b"text/plain"),
            (b"content-length", b"6"),
            (b"x-request-id", b"9db0c36d6b494acd5d1efca96f78b762"),
            (b"x-long", b"v" * 300),
            (b"x-empty", b""),
        ]
        encoder = LeanEncoder()
        decoder = Decoder()
        for _ in range(2):
            self.assertEqual(decode(decoder, encoder.encode(fields)), fields)
        self.assertEqual(len(decoder.header_table.dynamic_entries), 0)

    def test_staticPairIsOneByte(self) -> None:
        """
        A field whose name and value are in the static table is its index:
        C{:status: 200} is the one byte 0x88.
        """
        self.assertEqual(LeanEncoder().encode([(b":status", b"200")]), b"\x88")

    def test_whitespaceStripped(self) -> None:
        """
        Whitespace around a value is dropped, as h2's normalisation did.
        """
        block = LeanEncoder().encode([(b":status", b"204"), (b"x-a", b" \tb \t")])
        self.assertEqual(
            decode(Decoder(), block), [(b":status", b"204"), (b"x-a", b"b")]
        )

    def test_credentialsNeverIndexed(self) -> None:
        """
        authorization, proxy-authorization, cookie and set-cookie are
        never-indexed literals; other fields are plain literals.
        """
        fields = [
            (b"set-cookie", b"a=b"),
            (b"cookie", b"c=d"),
            (b"authorization", b"Bearer x"),
            (b"proxy-authorization", b"Basic y"),
            (b"x-other", b"z"),
        ]
        decoded = Decoder().decode(LeanEncoder().encode(fields), raw=True)
        kinds = [type(field) for field in decoded]
        self.assertEqual(kinds, [NeverIndexedHeaderTuple] * 4 + [HeaderTuple])

    def test_tableSizeChangeSignalled(self) -> None:
        """
        A new dynamic table size (the peer's SETTINGS_HEADER_TABLE_SIZE) is
        signalled at the start of the next block only.
        """
        encoder = LeanEncoder()
        encoder.header_table_size = 0
        first = encoder.encode([(b":status", b"200")])
        self.assertEqual(first, b"\x20\x88")
        self.assertEqual(encoder.encode([(b":status", b"200")]), b"\x88")
        decoder = Decoder()
        self.assertEqual(decode(decoder, first), [(b":status", b"200")])

    @given(
        st.lists(
            st.tuples(
                st.text(TOKEN, min_size=1, max_size=40).map(str.encode),
                st.binary(max_size=300).map(
                    lambda v: v.translate(None, b"\x00\r\n").strip(b" \t")
                ),
            ),
            max_size=20,
        )
    )
    def test_anyFieldsRoundTrip(self, fields: list[tuple[bytes, bytes]]) -> None:
        """
        Any lowercase-token names with any values h2 may send decode back
        to themselves.
        """
        fields = [f for f in fields if f[0] not in CONNECTION and f[0] != b"te"]
        encoder = LeanEncoder()
        decoder = Decoder()
        self.assertEqual(decode(decoder, encoder.encode(fields)), fields)
        self.assertEqual(decode(decoder, encoder.encode(fields)), fields)


CONNECTION = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"transfer-encoding",
    b"upgrade",
}


class RefusalTests(SynchronousTestCase):
    """
    What h2's outbound validation refused, this refuses: ProtocolError.
    """

    def test_refused(self) -> None:
        """
        Uppercase or non-token names, a colon inside a name, pseudo-header
        fields after regular ones or unknown, connection management
        fields, te other than trailers, and NUL, CR or LF in a value.
        """
        for fields in [
            [(b"X-Upper", b"a")],
            [(b"x a", b"a")],
            [(b"x:a", b"a")],
            [(b"", b"a")],
            [(b"x-a", b"a"), (b":status", b"200")],
            [(b":path", b"/")],
            [(b"connection", b"close")],
            [(b"transfer-encoding", b"chunked")],
            [(b"upgrade", b"h2c")],
            [(b"te", b"gzip")],
            [(b"x-a", b"a\r\nb: c")],
            [(b"x-a", b"a\nb")],
            [(b"x-a", b"a\x00b")],
        ]:
            encoder = LeanEncoder()
            self.assertRaises(ProtocolError, encoder.encode, fields)

    def test_teTrailers(self) -> None:
        """
        te: trailers may be sent.
        """
        block = LeanEncoder().encode([(b"te", b"trailers")])
        self.assertEqual(decode(Decoder(), block), [(b"te", b"trailers")])


class RequestBlockTests(SynchronousTestCase):
    """
    A client's encoder (L{REQUEST_PSEUDO}) sends a request's pseudo-header
    fields and no response's; a server's, the reverse.
    """

    def test_requestRoundTrip(self) -> None:
        """
        A gRPC request's block decodes to its fields, GET's and POST's
        methods being static pairs.
        """
        fields = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"api.example.com"),
            (b":path", b"/payments.v1.Payments/Echo"),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
        ]
        block = LeanEncoder(REQUEST_PSEUDO).encode(fields)
        self.assertEqual(decode(Decoder(), block), fields)
        self.assertEqual(block[:2], b"\x83\x86")

    def test_pseudoBySide(self) -> None:
        """
        :status is refused in a request, :method in a response.
        """
        self.assertRaises(
            ProtocolError, LeanEncoder(REQUEST_PSEUDO).encode, [(b":status", b"200")]
        )
        self.assertRaises(ProtocolError, LeanEncoder().encode, [(b":method", b"GET")])


class KeptFieldsTests(SynchronousTestCase):
    """
    Encoded fields are kept, for every connection, within bounds.
    """

    def test_keptAndShared(self) -> None:
        """
        A field one encoder encoded is kept, and another encoder sends the
        same bytes for it.
        """
        first = LeanEncoder().encode([(b"x-shared", b"v")])
        self.assertIn((b"x-shared", b"v"), hpack._fields)
        self.assertEqual(LeanEncoder().encode([(b"x-shared", b"v")]), first)

    def test_bounded(self) -> None:
        """
        At most MAX_FIELDS fields are kept, and none with a value over
        KEPT_VALUE bytes; forgotten fields still encode the same.
        """
        self.patch(hpack, "_fields", {})
        self.patch(hpack, "MAX_FIELDS", 3)
        encoder = LeanEncoder()
        blocks = [encoder.encode([(b"x-n", b"%d" % i)]) for i in range(10)]
        self.assertLessEqual(len(hpack._fields), 3)
        again = [encoder.encode([(b"x-n", b"%d" % i)]) for i in range(10)]
        self.assertEqual(again, blocks)
        long = b"v" * (hpack.KEPT_VALUE + 1)
        encoder.encode([(b"x-long", long)])
        self.assertNotIn((b"x-long", long), hpack._fields)

    def test_refusedEveryTime(self) -> None:
        """
        A refused field is never kept: it is refused again.
        """
        encoder = LeanEncoder()
        for _ in range(2):
            self.assertRaises(ProtocolError, encoder.encode, [(b"x-a", b"a\rb")])


class DecoderTests(SynchronousTestCase):
    """
    L{KeptDecoder} (an HTTP/2 connection's, both ways) keeps the blocks
    that left the dynamic table as it was, decoded, and reads them again
    only when the table changed since.
    """

    def test_repeatedBlockKept(self) -> None:
        """
        The same bytes, the table unchanged, decode to the same fields
        (the kept ones: HPACK's decoder is not run again).
        """
        decoder = KeptDecoder()
        block = b"\x82\x84\x86"  # :method GET, :path /, :scheme http
        first = decoder.decode(block, raw=True)
        self.assertEqual(
            first, [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"http")]
        )
        calls: list[bytes] = []
        parent = Decoder.decode

        def counting(this: Any, data: bytes, raw: bool = False) -> Any:
            calls.append(data)
            return parent(this, data, raw)

        self.patch(Decoder, "decode", counting)
        again = decoder.decode(block, raw=True)
        self.assertEqual(again, first)
        self.assertIsNot(again, first)
        self.assertEqual(calls, [])

    def test_tableChangeDecodesAgain(self) -> None:
        """
        A block that refers to the dynamic table is decoded again once the
        table changed: the same index names another entry after one more
        is added.
        """
        decoder = KeptDecoder()
        decoder.decode(b"\x40\x01a\x011", raw=True)  # a: 1, indexed
        newest = b"\xbe"  # index 62: the newest dynamic entry
        self.assertEqual(decoder.decode(newest, raw=True), [(b"a", b"1")])
        self.assertEqual(decoder.decode(newest, raw=True), [(b"a", b"1")])
        decoder.decode(b"\x40\x01b\x012", raw=True)  # b: 2, indexed
        self.assertEqual(decoder.decode(newest, raw=True), [(b"b", b"2")])

    def test_blocksThatChangeTheTableNotKept(self) -> None:
        """
        A block that adds to the table is decoded each time: the second
        copy adds its entry again.
        """
        decoder = KeptDecoder()
        block = b"\x40\x01a\x011"
        decoder.decode(block, raw=True)
        decoder.decode(block, raw=True)
        self.assertEqual(len(decoder.header_table.dynamic_entries), 2)

    def test_bounded(self) -> None:
        """
        At most KEPT_BLOCKS blocks are kept, and none whose fields exceed
        KEPT_BLOCK_SIZE bytes.
        """
        decoder = KeptDecoder()
        for i in range(hpack.KEPT_BLOCKS * 3):
            value = b"%d" % (i,)
            decoder.decode(b"\x00\x01x" + bytes([len(value)]) + value, raw=True)
            self.assertLessEqual(len(decoder._kept), hpack.KEPT_BLOCKS)
        decoder._kept.clear()
        value = b"v" * hpack.KEPT_BLOCK_SIZE
        decoder.decode(
            b"\x00\x01x" + bytes(encode_integer(len(value), 7)) + value, raw=True
        )
        self.assertEqual(decoder._kept, {})
