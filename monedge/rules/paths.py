"""
Path safety: turn a raw request target into the one canonical path that is
both routed on and forwarded, or refuse it.

The router and the upstream must never disagree about what a path means, so
monedge decodes every segment once, refuses anything whose meaning depends
on who decodes it (dot segments, encoded separators, control characters,
invalid UTF-8, double encoding), and forwards the segments it routed on in
canonical form: escaped unreserved characters decoded, every other escape
kept (uppercase).  Raw bytes above 0x7F never get here: Twisted's
request-line parser refuses them first.  Every rule is listed in
``docs/convention.md``; each refusal is a L{PathError} with a stable code.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

#: Characters a canonical segment keeps unencoded: RFC 3986 unreserved,
#: sub-delims, ``:`` and ``@``.
_SEGMENT_SAFE = "!$&'()*+,;=:@-._~"

#: A path made only of these bytes needs no decoding (the fast path).
_PLAIN = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/]*\Z")

#: Bytes allowed raw in a path before decoding: the plain set, ``%``, and
#: characters that are unsafe but unambiguous (re-encoded canonically).
#: Control characters, space, ``\`` and ``#`` are refused.
_RAW_REFUSED = re.compile(rb"[\x00-\x20\x7f\\#]")

_QUERY_REFUSED = re.compile(rb"[\x00-\x20\x7f#]")

_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")

#: A decoded segment that still holds an encoded dot, slash, backslash or
#: NUL was encoded twice: some upstream may decode it again.
_DOUBLE_ENCODED = re.compile(rb"%(?:2e|2f|5c|00)", re.IGNORECASE)

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class PathError(ValueError):
    """
    A request target that monedge refuses with 400.

    @ivar code: the stable error code, as listed in docs/convention.md.
    @ivar message: a one-line explanation for the client.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class RoutedPath:
    """
    A request target after normalisation.

    @ivar name: the first segment, decoded: the service name to look up
        (validated against the convention by the caller).
    @ivar path: the full canonical path, always starting with C{/}.
    @ivar rest: the canonical path after the first segment, always starting
        with C{/}: what the upstream receives when the prefix is stripped.
    @ivar query: the query string with its C{?}, or C{b""} (also for an
        empty query).
    """

    name: str
    path: bytes
    rest: bytes
    query: bytes


def splitAbsoluteForm(target: bytes) -> tuple[bytes | None, bytes]:
    """
    Split an absolute-form request target (C{http://host/path}) into its
    authority and its origin-form remainder.  An origin-form target is
    returned unchanged with no authority.
    """
    lowered = target[:8].lower()
    if lowered.startswith(b"http://"):
        rest = target[7:]
    elif lowered.startswith(b"https://"):
        rest = target[8:]
    else:
        return None, target
    cut = len(rest)
    for stop in (b"/", b"?"):
        index = rest.find(stop)
        if 0 <= index < cut:
            cut = index
    authority, remainder = rest[:cut], rest[cut:]
    if not remainder.startswith(b"/"):
        remainder = b"/" + remainder
    return authority, remainder


def _decodeSegment(raw: bytes) -> bytes:
    """
    Decode one raw segment, refusing everything ambiguous, and return its
    canonical encoding.
    """
    if _ESCAPE.search(raw):
        raise PathError("path_invalid_escape", "the path has a malformed %-escape")
    decoded = unquote_to_bytes(raw)
    if b"/" in decoded or b"\\" in decoded:
        raise PathError("path_encoded_separator", "the path has an encoded '/' or '\\'")
    if _CONTROL.search(decoded):
        raise PathError(
            "path_control_character", "the path has a NUL or control character"
        )
    if _DOUBLE_ENCODED.search(decoded):
        raise PathError(
            "path_double_encoding", "the path has a doubly encoded separator or dot"
        )
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        raise PathError("path_invalid_utf8", "the path is not valid UTF-8") from None
    _refuseDotSegment(text)
    if not text.isascii():
        # Fullwidth dots and slashes (U+FF0E, U+FF0F) and their kin become
        # '.' and '/' under NFKC, which some upstreams apply.
        folded = unicodedata.normalize("NFKC", text)
        if "/" in folded or "\\" in folded:
            raise PathError(
                "path_encoded_separator",
                "the path has a character that normalises to '/' or '\\'",
            )
        _refuseDotSegment(folded)
    return _canonical(raw)


_UNRESERVED = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_RAW_SAFE = _UNRESERVED | frozenset(_SEGMENT_SAFE.encode("ascii"))


def _canonical(raw: bytes) -> bytes:
    """
    The canonical form of a validated raw segment (RFC 3986 6.2.2): an
    escaped unreserved character is decoded, every other escape is kept
    with uppercase hex (C{%3b} stays an escaped C{;}, never a parameter
    delimiter), and any other unsafe raw byte is escaped.
    """
    out = bytearray()
    index, length = 0, len(raw)
    while index < length:
        byte = raw[index]
        if byte == 0x25:
            value = int(raw[index + 1 : index + 3], 16)
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += b"%%%02X" % (value,)
            index += 3
            continue
        if byte in _RAW_SAFE:
            out.append(byte)
        else:
            out += b"%%%02X" % (byte,)
        index += 1
    return bytes(out)


def _refuseDotSegment(text: str) -> None:
    """
    Refuse C{.} and C{..}, also with a C{;parameter} (C{..;/} is C{..} to
    some servlet containers).
    """
    if text.partition(";")[0] in (".", ".."):
        raise PathError("path_dot_segment", "the path has a '.' or '..' segment")


def normalise(target: bytes) -> RoutedPath:
    """
    Normalise an origin-form request target.

    @param target: the raw target, C{/path?query}.
    @raise PathError: if the target is refused.
    """
    path, sep, query = target.partition(b"?")
    if not path.startswith(b"/"):
        raise PathError("path_not_absolute", "the request target must start with '/'")
    if sep and _QUERY_REFUSED.search(query):
        raise PathError(
            "path_control_character", "the query has a space or control character"
        )
    # An empty query ("/x?") is dropped: Twisted's client would drop it on
    # the way upstream anyway, and the router must see what is forwarded.
    fullQuery = b"?" + query if query else b""

    p = path + b"/"
    if (
        _PLAIN.match(path)
        # find, not "in": on bytes, CPython 3.11's "in" first tries the
        # operand as an integer and builds a TypeError to discard.
        and path.find(b"//") < 0
        and p.find(b"/./") < 0
        and p.find(b"/../") < 0
        and path.find(b";") < 0
    ):
        canonical = path
        name, _, tail = path[1:].partition(b"/")
        nameText = name.decode("ascii")
    else:
        if _RAW_REFUSED.search(path):
            if b"\\" in path:
                raise PathError("path_encoded_separator", "the path has a '\\'")
            raise PathError(
                "path_control_character",
                "the path has a space, '#' or control character",
            )
        rawSegments = path.split(b"/")
        trailing = len(rawSegments) > 1 and rawSegments[-1] == b""
        segments = [_decodeSegment(s) for s in rawSegments if s]
        canonical = b"/" + b"/".join(segments)
        if trailing and segments:
            canonical += b"/"
        name, _, tail = canonical[1:].partition(b"/")
        nameText = unquote_to_bytes(name).decode("utf-8")
    rest = b"/" + tail
    return RoutedPath(name=nameText, path=canonical, rest=rest, query=fullQuery)
