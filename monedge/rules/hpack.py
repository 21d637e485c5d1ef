"""
The header blocks monedge sends over HTTP/2, HPACK-encoded (RFC 7541)
without the dynamic table, and checked as they are encoded.

HPACK lets an encoder choose its representations: this one sends a field
whose name and value are both in the static table as its index, and every
other field as a literal that is never added to the dynamic table (with
the name's static index when it has one), its value not Huffman-coded.
Nothing it sends depends on what it sent before, on any connection, so
the bytes of each field it encoded (with a short value) are kept, for every
connection, and a field seen before costs a dictionary lookup, where
C{hpack}'s own encoder searches both tables and Huffman-codes each value.  The peer's dynamic table stays empty; a change
of its size (SETTINGS_HEADER_TABLE_SIZE) is still signalled at the start of
the next block, as RFC 7541 (4.2) requires.

The checks are the ones C{h2} makes of what it sends (with its outbound
validation and normalisation off, which this replaces): names are
lowercase tokens, pseudo-header fields come first, no field is HTTP/1.1's
connection management, C{te} may only be C{trailers}, and no value holds
NUL, CR or LF; whitespace around a value is dropped.  A field that breaks
them raises L{h2.exceptions.ProtocolError}, as C{h2} does.  Credentials
(C{authorization}, C{proxy-authorization}, C{cookie}, C{set-cookie}) are
sent as never-indexed literals, so that no intermediary indexes them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from h2.exceptions import ProtocolError
from hpack import Decoder, Encoder
from hpack.hpack import encode_integer
from hpack.table import HeaderTable

__all__ = [
    "KEPT_BLOCKS",
    "KEPT_BLOCK_SIZE",
    "REQUEST_PSEUDO",
    "RESPONSE_PSEUDO",
    "KeptDecoder",
    "LeanEncoder",
]

#: Each static (name, value) pair's index, and each static name's first.
_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAMES: dict[bytes, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, 1):
    if _value:
        _STATIC_FIELDS.setdefault((_name, _value), _index)
    _STATIC_NAMES.setdefault(_name, _index)

#: A lowercase token (RFC 9110, 5.6.2), as an HTTP/2 field name must be.
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+")

#: HTTP/1.1's connection management: never in an HTTP/2 header block
#: (RFC 9113, 8.2.2).
_CONNECTION = frozenset(
    [
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"transfer-encoding",
        b"upgrade",
    ]
)

#: Fields sent as never-indexed literals (RFC 7541, 7.1.3).
_SENSITIVE = frozenset(
    [b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"]
)

#: Pseudo-header fields a response block may carry, and a request block.
RESPONSE_PSEUDO = frozenset([b":status"])
REQUEST_PSEUDO = frozenset([b":method", b":scheme", b":authority", b":path"])

#: What is kept of encoded fields, shared by every connection (an encoding
#: that uses no dynamic table is the same on any): each checked name's
#: representation without its value, at most L{MAX_NAMES}; and each whole
#: field with a value of at most L{KEPT_VALUE} bytes, at most L{MAX_FIELDS}
#: (past which they are forgotten, and kept again as they come).
MAX_NAMES = 4096
MAX_FIELDS = 4096
KEPT_VALUE = 128
_names: dict[bytes, bytes] = {}
_fields: dict[tuple[bytes, bytes], bytes] = {}


def _length(value: bytes) -> bytes:
    """
    A string's length prefix, with the Huffman bit clear (RFC 7541, 5.2).
    """
    size = len(value)
    if size < 127:
        return bytes((size,))
    return bytes(encode_integer(size, 7))


class LeanEncoder(Encoder):
    """
    An HPACK encoder that never uses the dynamic table, and checks each
    field as C{h2}'s outbound validation does.  Give it to an C{h2}
    connection as its C{encoder}, with C{validate_outbound_headers} and
    C{normalize_outbound_headers} off.

    @param pseudo: the pseudo-header fields a block may carry:
        L{RESPONSE_PSEUDO} (a server's, the default) or L{REQUEST_PSEUDO}
        (a client's).
    """

    def __init__(self, pseudo: frozenset[bytes] = RESPONSE_PSEUDO) -> None:
        super().__init__()
        self._pseudo = pseudo

    def encode(self, headers: Iterable[Any], huffman: bool = True) -> bytes:
        """
        The header block for C{headers}: (name, value) pairs of bytes,
        pseudo-header fields first.

        @raise ProtocolError: for a field C{h2} would refuse to send.
        """
        block: list[bytes] = []
        table = self.header_table
        if table.resized:
            block.append(self._encode_table_size_change())
            table.resized = False
        fields = _fields
        pseudo = self._pseudo
        regular = False
        for header in headers:
            name: bytes = header[0]
            value: bytes = header[1]
            if name[:1] == b":":
                if regular or name not in pseudo:
                    raise ProtocolError(f"pseudo-header field {name!r} out of place")
            else:
                regular = True
            encoded = fields.get((name, value))
            if encoded is None:
                encoded = _field(name, value)
            block.append(encoded)
        return b"".join(block)


def _field(name: bytes, value: bytes) -> bytes:
    """
    Check a field; its representation (kept if its value is short).

    @raise ProtocolError: for a field C{h2} would refuse to send.
    """
    stripped = value.strip(b" \t")
    if len(stripped.translate(None, b"\x00\r\n")) != len(stripped):
        raise ProtocolError(f"header field {name!r} has NUL, CR or LF")
    if name == b"te" and stripped.lower() != b"trailers":
        raise ProtocolError("te may only be trailers")
    static = _STATIC_FIELDS.get((name, stripped))
    if static is not None:
        encoded = bytes((0x80 | static,))
    else:
        prefix = _names.get(name)
        if prefix is None:
            prefix = _prefix(name)
        encoded = prefix + _length(stripped) + stripped
    if len(value) <= KEPT_VALUE:
        if len(_fields) >= MAX_FIELDS:
            _fields.clear()
        _fields[name, value] = encoded
    return encoded


def _prefix(name: bytes) -> bytes:
    """
    Check C{name}; its representation without the value: a literal
    without indexing (never indexed, for credentials) with the static
    index of the name, or the name itself.
    """
    bare = name[1:] if name[:1] == b":" else name
    if not _NAME.fullmatch(bare) or name in _CONNECTION:
        raise ProtocolError(f"header name {name!r} may not be sent")
    pattern = 0x10 if name in _SENSITIVE else 0x00
    index = _STATIC_NAMES.get(name)
    if index is not None:
        encoded = encode_integer(index, 4)
        encoded[0] |= pattern
        prefix = bytes(encoded)
    else:
        prefix = bytes((pattern,)) + _length(name) + name
    if len(_names) < MAX_NAMES:
        _names[name] = prefix
    return prefix


#: Header blocks a connection keeps decoded (L{KeptDecoder}), at most, and
#: the most bytes of fields one may decode to.
KEPT_BLOCKS = 4
KEPT_BLOCK_SIZE = 2048


class _CountedTable(HeaderTable):
    """
    HPACK's dynamic table, counting its changes (an entry added, a new
    size).
    """

    changes = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.changes += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, newmax: int) -> None:
        self.changes += 1
        table: Any = HeaderTable
        table.maxsize.fset(self, newmax)


class KeptDecoder(Decoder):
    """
    HPACK's decoder, keeping the blocks that changed nothing decoded.

    A block that changed nothing in the dynamic table is kept decoded, with
    the table's state it was read in: the same bytes again, the table
    unchanged since, decode to the same fields without HPACK's work (a peer
    that repeats a request or a response, as load generators, gRPC clients
    and servers do, sends the same few bytes of indexed fields each time).
    At most L{KEPT_BLOCKS} blocks of at most L{KEPT_BLOCK_SIZE} decoded
    bytes are kept, for the connection's one decoder.
    """

    def __init__(self) -> None:
        super().__init__()
        self.header_table = _CountedTable()
        self._kept: dict[bytes, tuple[int, list[Any]]] = {}

    def decode(self, data: bytes, raw: bool = False) -> Any:
        table = self.header_table
        assert isinstance(table, _CountedTable)
        changes = table.changes
        key = bytes(data)
        kept = self._kept.get(key)
        if kept is not None and kept[0] == changes and raw:
            return list(kept[1])
        headers: list[Any] = super().decode(data, raw)  # type: ignore[assignment]
        if (
            raw
            and table.changes == changes
            and sum(len(n) + len(v) for n, v in headers) <= KEPT_BLOCK_SIZE
        ):
            if len(self._kept) >= KEPT_BLOCKS:
                self._kept.clear()
            self._kept[key] = (changes, headers)
            return list(headers)
        return headers
