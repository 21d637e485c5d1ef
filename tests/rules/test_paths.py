"""
Tests for L{monedge.rules.paths}: the canonical path every request is routed on
and forwarded with, and every refusal.
"""

from __future__ import annotations

import random
import re
from urllib.parse import unquote_to_bytes

from twisted.trial.unittest import SynchronousTestCase

from monedge.rules.paths import PathError, RoutedPath, normalise, splitAbsoluteForm

#: Every code L{normalise} may refuse with.
CODES = frozenset(
    [
        "path_not_absolute",
        "path_dot_segment",
        "path_encoded_separator",
        "path_control_character",
        "path_invalid_utf8",
        "path_invalid_escape",
        "path_double_encoding",
    ]
)

#: target -> (name, path, rest, query)
ACCEPTED: list[tuple[bytes, tuple[str, bytes, bytes, bytes]]] = [
    # Plain paths.
    (b"/", ("", b"/", b"/", b"")),
    (b"/foo", ("foo", b"/foo", b"/", b"")),
    (b"/foo/bar", ("foo", b"/foo/bar", b"/bar", b"")),
    (b"/foo/bar/baz", ("foo", b"/foo/bar/baz", b"/bar/baz", b"")),
    (b"/foo-bar/x", ("foo-bar", b"/foo-bar/x", b"/x", b"")),
    (b"/Foo/x", ("Foo", b"/Foo/x", b"/x", b"")),
    (
        b"/foo/a.b/.well-known/x..y/...",
        ("foo", b"/foo/a.b/.well-known/x..y/...", b"/a.b/.well-known/x..y/...", b""),
    ),
    (
        b"/foo/!$&'()*+,=:@-._~",
        ("foo", b"/foo/!$&'()*+,=:@-._~", b"/!$&'()*+,=:@-._~", b""),
    ),
    # Trailing slashes are kept.
    (b"/foo/", ("foo", b"/foo/", b"/", b"")),
    (b"/foo/bar/", ("foo", b"/foo/bar/", b"/bar/", b"")),
    # Repeated slashes are merged.
    (b"//foo", ("foo", b"/foo", b"/", b"")),
    (b"//", ("", b"/", b"/", b"")),
    (b"///", ("", b"/", b"/", b"")),
    (b"/foo//bar", ("foo", b"/foo/bar", b"/bar", b"")),
    (b"/foo///bar//", ("foo", b"/foo/bar/", b"/bar/", b"")),
    (b"//foo//bar//baz", ("foo", b"/foo/bar/baz", b"/bar/baz", b"")),
    (b"/foo//", ("foo", b"/foo/", b"/", b"")),
    # The query is kept verbatim, whatever it holds.
    (b"/foo?x=1", ("foo", b"/foo", b"/", b"?x=1")),
    (b"/foo/bar?x=1&y=2", ("foo", b"/foo/bar", b"/bar", b"?x=1&y=2")),
    (b"/foo?", ("foo", b"/foo", b"/", b"")),
    (b"/foo/bar/?", ("foo", b"/foo/bar/", b"/bar/", b"")),
    (b"/?x", ("", b"/", b"/", b"?x")),
    (
        b"/foo?a=%zz&b=/../&c=%2f%2e%ff",
        ("foo", b"/foo", b"/", b"?a=%zz&b=/../&c=%2f%2e%ff"),
    ),
    (b"/foo?a?b", ("foo", b"/foo", b"/", b"?a?b")),
    (b"/foo?a=\\", ("foo", b"/foo", b"/", b"?a=\\")),
    (b"//foo//x?q//", ("foo", b"/foo/x", b"/x", b"?q//")),
    # Percent-decoding, then canonical re-encoding.
    (b"/%66oo/bar", ("foo", b"/foo/bar", b"/bar", b"")),
    (b"/%66%6F%6f", ("foo", b"/foo", b"/", b"")),
    (b"/foo/%41%7e%2D%5F", ("foo", b"/foo/A~-_", b"/A~-_", b"")),
    (b"/foo/a|b", ("foo", b"/foo/a%7Cb", b"/a%7Cb", b"")),
    (b"/foo/%7c", ("foo", b"/foo/%7C", b"/%7C", b"")),
    (b"/foo/%7C", ("foo", b"/foo/%7C", b"/%7C", b"")),
    (b"/foo/%e2%82%ac", ("foo", b"/foo/%E2%82%AC", b"/%E2%82%AC", b"")),
    (b"/foo/caf\xc3\xa9", ("foo", b"/foo/caf%C3%A9", b"/caf%C3%A9", b"")),
    (b"/caf%c3%a9/x", ("caf\u00e9", b"/caf%C3%A9/x", b"/x", b"")),
    (b"/foo/a%20b", ("foo", b"/foo/a%20b", b"/a%20b", b"")),
    (
        b'/foo/"<>^`{}',
        ("foo", b"/foo/%22%3C%3E%5E%60%7B%7D", b"/%22%3C%3E%5E%60%7B%7D", b""),
    ),
    (b"/foo/%5b%5d", ("foo", b"/foo/%5B%5D", b"/%5B%5D", b"")),
    (b"/foo/%2541", ("foo", b"/foo/%2541", b"/%2541", b"")),
    (b"/foo/100%25", ("foo", b"/foo/100%25", b"/100%25", b"")),
    (b"/foo/%2e%2e%2e", ("foo", b"/foo/...", b"/...", b"")),
    (b"/foo/%2ex", ("foo", b"/foo/.x", b"/.x", b"")),
    (b"//%66oo//%62ar/", ("foo", b"/foo/bar/", b"/bar/", b"")),
    # Parameters: kept, and not dot segments unless the part before ';' is.
    (b"/foo;v=1/bar", ("foo;v=1", b"/foo;v=1/bar", b"/bar", b"")),
    (b"/foo/..a;x", ("foo", b"/foo/..a;x", b"/..a;x", b"")),
    (b"/foo/;x", ("foo", b"/foo/;x", b"/;x", b"")),
]

#: code -> targets refused with it
REFUSED: dict[str, list[bytes]] = {
    "path_dot_segment": [
        b"/.",
        b"/..",
        b"/./foo",
        b"/../foo",
        b"/foo/.",
        b"/foo/..",
        b"/foo/./bar",
        b"/foo/../bar",
        b"/foo/bar/../../etc",
        b"/foo/./",
        b"/foo//../bar",
        b"/foo/%2e",
        b"/foo/%2E",
        b"/foo/%2e%2e",
        b"/foo/%2E%2e",
        b"/foo/.%2e/bar",
        b"/%2e%2e/foo",
        b"/foo/..;jsessionid",
        b"/foo/..;/bar",
        b"/foo/.;x",
        b"/foo/.;",
        b"/foo/%2e%2e;x",
        b"/foo/..%3bx",
        b"/foo/.?x",
        # Fullwidth full stop U+FF0E, and its NFKC kin, fold to '.'.
        b"/foo/%EF%BC%8E",
        b"/foo/%ef%bc%8e%ef%bc%8e",
        b"/foo/.%EF%BC%8E",
        b"/foo/%EF%BC%8E%EF%BC%8E;x",
        b"/foo/%E2%80%A5",
    ],
    "path_encoded_separator": [
        b"/foo/%2f",
        b"/foo/%2F",
        b"/foo/a%2fb",
        b"/%2ffoo",
        b"/foo/%2e%2e%2f",
        b"/foo/%5c",
        b"/foo/%5C",
        b"/foo/a%5cb",
        b"/foo\\bar",
        b"/foo/\\",
        b"/\\..\\etc",
        # Fullwidth solidus U+FF0F and reverse solidus U+FF3C fold to / and \.
        b"/foo/%EF%BC%8F",
        b"/foo/a%ef%bc%8fb",
        b"/foo/%EF%BC%BC",
        b"/foo/%EF%BC%8E%EF%BC%8E%EF%BC%8Fetc",
    ],
    "path_control_character": [
        b"/foo\x00",
        b"/foo/\x01",
        b"/foo/a\tb",
        b"/foo/a\rb",
        b"/foo/a\nb",
        b"/foo\x7f",
        b"/foo/%00",
        b"/foo/%0a",
        b"/foo/%0D",
        b"/foo/%09",
        b"/foo/%1f",
        b"/foo/%7f",
        b"/foo/%7F",
        b"/foo bar",
        b"/foo/ ",
        b"/ /foo",
        b"/foo?a b",
        b"/foo?a\x00",
        b"/foo?a\x7f",
        b"/foo?a\tb",
        b"/foo?\r\n",
        b"/foo#frag",
        b"/foo/#",
        b"/foo?x#y",
        b"/foo?#",
    ],
    "path_invalid_utf8": [
        b"/foo/%ff",
        b"/foo/%FF",
        b"/foo/%c0%af",
        b"/foo/%C0%AE",
        b"/foo/%e0%80%ae",
        b"/foo/%e2%82",
        b"/foo/%80",
        b"/foo/%ed%a0%80",
        b"/foo/\xff",
        b"/foo/\xc0\xaf",
        b"/%ff/foo",
    ],
    "path_invalid_escape": [
        b"/foo/%",
        b"/%",
        b"/foo/%zz",
        b"/foo/%4",
        b"/foo/%4/x",
        b"/foo/a%g0",
        b"/foo/%%41",
        b"/foo/%-1",
    ],
    "path_double_encoding": [
        b"/foo/%252e",
        b"/foo/%252E",
        b"/foo/%252e%252e",
        b"/foo/%252f",
        b"/foo/%252F",
        b"/foo/%255c",
        b"/foo/%255C",
        b"/foo/%2500",
        b"/foo/%25%32%65",
        b"/foo/a%252fb",
        b"/%252fetc",
    ],
    "path_not_absolute": [
        b"",
        b"foo",
        b"foo/bar",
        b"*",
        b"?x",
        b".",
        b"..",
        b"../foo",
        b"\\foo",
        b"%2ffoo",
        b"http://example.com/foo",
        b" /foo",
    ],
}

#: What a canonical path may hold: safe characters and upper-case escapes.
_CANONICAL = re.compile(rb"(?:/(?:[A-Za-z0-9!$&'()*+,;=:@\-._~]|%[0-9A-F]{2})*)+\Z")


def _routed(target: bytes) -> tuple[str, bytes, bytes, bytes]:
    result = normalise(target)
    return (result.name, result.path, result.rest, result.query)


class NormaliseAcceptedTests(SynchronousTestCase):
    """
    Targets L{normalise} accepts, and the canonical form it gives them.
    """

    def test_corpus(self) -> None:
        """
        Every target in the accepted corpus normalises to exactly the
        expected name, canonical path, rest and query.
        """
        wrong: dict[bytes, object] = {}
        for target, expected in ACCEPTED:
            try:
                actual = _routed(target)
            except PathError as e:
                wrong[target] = f"refused: {e.code}"
                continue
            if actual != expected:
                wrong[target] = actual
        self.assertEqual(wrong, {})

    def test_result(self) -> None:
        """
        The result is a L{RoutedPath} with the documented fields.
        """
        self.assertEqual(
            normalise(b"/foo/bar?q"),
            RoutedPath(name="foo", path=b"/foo/bar", rest=b"/bar", query=b"?q"),
        )

    def test_nameOnly(self) -> None:
        """
        A path of just C{/name}, with or without a trailing slash, has the
        rest C{/}.
        """
        self.assertEqual(normalise(b"/foo").rest, b"/")
        self.assertEqual(normalise(b"/foo/").rest, b"/")
        self.assertEqual(normalise(b"/foo?x").rest, b"/")

    def test_encodedNameRoutesDecoded(self) -> None:
        """
        C{%66oo} routes as C{foo}, and is forwarded as C{/foo}: the router
        and the upstream see the same segment.
        """
        result = normalise(b"/%66oo/%62ar")
        self.assertEqual(result.name, "foo")
        self.assertEqual(result.path, b"/foo/bar")
        self.assertEqual(result.rest, b"/bar")

    def test_lowercaseHexUppercased(self) -> None:
        """
        Escapes that stay escaped are re-encoded with upper-case hex.
        """
        self.assertEqual(normalise(b"/foo/%c3%a9%7c").path, b"/foo/%C3%A9%7C")

    def test_emptyQueryDropped(self) -> None:
        """
        An empty query (a bare C{?}) is dropped, like no query at all, since
        Twisted's client would not forward it; a non-empty one keeps its
        C{?}.
        """
        self.assertEqual(normalise(b"/foo?").query, b"")
        self.assertEqual(normalise(b"/foo").query, b"")
        self.assertEqual(normalise(b"/foo??").query, b"??")
        self.assertEqual(normalise(b"/foo?=").query, b"?=")


class NormaliseRefusedTests(SynchronousTestCase):
    """
    Targets L{normalise} refuses, each with its stable code.
    """

    def assertRefused(self, code: str) -> None:
        """
        Every target listed under C{code} in L{REFUSED} raises L{PathError}
        with that code and a message.
        """
        self.assertIn(code, CODES)
        wrong: dict[bytes, object] = {}
        for target in REFUSED[code]:
            try:
                result = normalise(target)
            except PathError as e:
                if e.code != code:
                    wrong[target] = e.code
                elif not e.message or str(e) != e.message:
                    wrong[target] = ("message", e.message)
            else:
                wrong[target] = result
        self.assertEqual(wrong, {})

    def test_dotSegment(self) -> None:
        """
        C{.} and C{..} segments, raw, percent-encoded in any case, with a
        C{;parameter}, or as fullwidth/leader characters that NFKC folds
        to dots, are C{path_dot_segment}.
        """
        self.assertRefused("path_dot_segment")

    def test_encodedSeparator(self) -> None:
        """
        Encoded C{/} or C{\\} (any case), a raw backslash, and fullwidth
        solidus or reverse solidus are C{path_encoded_separator}.
        """
        self.assertRefused("path_encoded_separator")

    def test_controlCharacter(self) -> None:
        """
        Control characters raw or encoded (C{%00}, C{%0a}, C{%7f}...), a
        raw space or C{#} in the path, and a space, control character or
        C{#} in the query are C{path_control_character}.
        """
        self.assertRefused("path_control_character")

    def test_invalidUTF8(self) -> None:
        """
        Bytes that do not decode as UTF-8, raw or encoded, including
        overlong forms (C{%c0%af}), truncated sequences and surrogates, are
        C{path_invalid_utf8}.
        """
        self.assertRefused("path_invalid_utf8")

    def test_invalidEscape(self) -> None:
        """
        A C{%} not followed by two hex digits is C{path_invalid_escape}.
        """
        self.assertRefused("path_invalid_escape")

    def test_doubleEncoding(self) -> None:
        """
        A segment that still encodes a dot, slash, backslash or NUL after
        one decoding (C{%252e}, C{%252f}, C{%255c}, C{%2500}) is
        C{path_double_encoding}.
        """
        self.assertRefused("path_double_encoding")

    def test_notAbsolute(self) -> None:
        """
        A target that does not start with C{/} is C{path_not_absolute}.
        """
        self.assertRefused("path_not_absolute")

    def test_pathErrorIsValueError(self) -> None:
        """
        L{PathError} is a L{ValueError} carrying C{code} and C{message}.
        """
        error = PathError("path_dot_segment", "nope")
        self.assertIsInstance(error, ValueError)
        self.assertEqual(
            (error.code, error.message, str(error)),
            ("path_dot_segment", "nope", "nope"),
        )

    def test_fullwidthSeparatorsEncoded(self) -> None:
        """
        U+FF0E (fullwidth full stop) and U+FF0F (fullwidth solidus), sent
        percent-encoded as UTF-8, are refused: NFKC folds them to '.' and
        '/'.
        """
        dot = "\uff0e".encode()
        slash = "\uff0f".encode()
        self.assertEqual((dot, slash), (b"\xef\xbc\x8e", b"\xef\xbc\x8f"))

        def escaped(raw: bytes) -> bytes:
            return b"".join(b"%%%02X" % (c,) for c in raw)

        for target, code in [
            (b"/foo/" + escaped(dot), "path_dot_segment"),
            (b"/foo/" + escaped(dot + dot), "path_dot_segment"),
            (b"/foo/" + escaped(slash), "path_encoded_separator"),
            (b"/foo/" + escaped(dot + dot + slash) + b"etc", "path_encoded_separator"),
            (b"/foo/" + dot + dot, "path_dot_segment"),
            (b"/foo/a" + slash + b"b", "path_encoded_separator"),
        ]:
            with self.assertRaises(PathError) as e:
                normalise(target)
            self.assertEqual(e.exception.code, code, target)

    def test_queryCheckedEvenIfPathPlain(self) -> None:
        """
        A plain path does not exempt its query from the space and control
        character rule.
        """
        with self.assertRaises(PathError) as e:
            normalise(b"/foo?a=1 HTTP/1.1")
        self.assertEqual(e.exception.code, "path_control_character")

    def test_notAbsoluteBeforeAnythingElse(self) -> None:
        """
        A target that does not start with C{/} is C{path_not_absolute},
        whatever else is wrong with it.
        """
        for target in [b"foo/../x", b"a b", b"%zz", b"..?x y"]:
            with self.assertRaises(PathError) as e:
                normalise(target)
            self.assertEqual(e.exception.code, "path_not_absolute", target)


class SplitAbsoluteFormTests(SynchronousTestCase):
    """
    L{splitAbsoluteForm} separates an absolute-form target's authority.
    """

    def test_table(self) -> None:
        """
        Absolute-form targets (any case of scheme) split into authority and
        origin-form; everything else is returned unchanged with no
        authority.
        """
        table: list[tuple[bytes, tuple[bytes | None, bytes]]] = [
            (b"http://example.com/foo?x", (b"example.com", b"/foo?x")),
            (b"https://example.com/foo", (b"example.com", b"/foo")),
            (b"HTTPS://Example.com:8443/a/b", (b"Example.com:8443", b"/a/b")),
            (b"hTtP://h/x", (b"h", b"/x")),
            (b"http://example.com", (b"example.com", b"/")),
            (b"http://example.com?x=1", (b"example.com", b"/?x=1")),
            (b"http://h?b/c", (b"h", b"/?b/c")),
            (b"http://h/a?b/c", (b"h", b"/a?b/c")),
            (b"http://[::1]:80/x", (b"[::1]:80", b"/x")),
            (b"http://user@h/x", (b"user@h", b"/x")),
            (b"http://", (b"", b"/")),
            (b"http://h//x", (b"h", b"//x")),
            (b"/foo", (None, b"/foo")),
            (b"/http://h/x", (None, b"/http://h/x")),
            (b"*", (None, b"*")),
            (b"//h/x", (None, b"//h/x")),
            (b"ftp://h/x", (None, b"ftp://h/x")),
            (b"http:/h/x", (None, b"http:/h/x")),
            (b"httpx://h/x", (None, b"httpx://h/x")),
            (b"", (None, b"")),
        ]
        wrong: dict[bytes, object] = {}
        for target, expected in table:
            actual = splitAbsoluteForm(target)
            if actual != expected:
                wrong[target] = actual
        self.assertEqual(wrong, {})

    def test_thenNormalised(self) -> None:
        """
        The origin-form remainder of an absolute-form target goes through
        the same path rules.
        """
        authority, target = splitAbsoluteForm(b"http://h/%66oo/%2e%2e")
        self.assertEqual(authority, b"h")
        with self.assertRaises(PathError) as e:
            normalise(target)
        self.assertEqual(e.exception.code, "path_dot_segment")
        self.assertEqual(
            normalise(splitAbsoluteForm(b"http://h?x")[1]),
            RoutedPath(name="", path=b"/", rest=b"/", query=b"?x"),
        )


#: Risky pieces for generated paths.
_PIECES = [
    b"/",
    b"//",
    b".",
    b"..",
    b";",
    b"a",
    b"Z",
    b"0",
    b"foo",
    b"-",
    b"~",
    b"%",
    b"%2e",
    b"%2E",
    b"%2f",
    b"%2F",
    b"%5c",
    b"%25",
    b"%252e",
    b"%00",
    b"%0a",
    b"%7f",
    b"%20",
    b"%41",
    b"%7c",
    b"%3b",
    b"%ff",
    b"%c0%af",
    b"%c3%a9",
    b"%ef%bc%8e",
    b"%ef%bc%8f",
    b"%e2%80%a5",
    b"%zz",
    b"%4",
    b"|",
    b"\\",
    b" ",
    b"#",
    b"?",
    b"=",
    b"&",
    b"+",
    b"@",
    b":",
    b"\x00",
    b"\x7f",
    b"\xc3\xa9",
    b"\xff",
    b'"',
    b"{",
]


def _generate(rng: random.Random) -> bytes:
    return b"/" + b"".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 10)))


class NormalisePropertyTests(SynchronousTestCase):
    """
    Invariants of L{normalise} over deterministically generated targets.
    """

    def test_invariants(self) -> None:
        """
        For every generated target, either L{PathError} is raised with a
        known code, or: normalising the canonical form again gives the
        same result (idempotent); C{path} and C{rest} start with C{/};
        C{rest} is C{path} after its first segment (a suffix of it, or C{/}
        for a one-segment path); C{name} is the decoded first segment of
        C{path}; C{path} holds only safe characters and upper-case escapes
        with no empty segment; decoded, it has no dot segment, control
        character or backslash; and the query is the original one (an
        empty one dropped).
        """
        rng = random.Random(1125)
        accepted = refused = 0
        for _ in range(800):
            target = _generate(rng)
            try:
                result = normalise(target)
            except PathError as e:
                self.assertIn(e.code, CODES, target)
                refused += 1
                continue
            accepted += 1
            again = normalise(result.path + result.query)
            self.assertEqual(again, result, target)
            self.assertTrue(result.path.startswith(b"/"), target)
            self.assertTrue(result.rest.startswith(b"/"), target)
            first, sep, tail = result.path[1:].partition(b"/")
            self.assertEqual(result.rest, b"/" + tail, target)
            if sep:
                self.assertTrue(result.path.endswith(result.rest), target)
            else:
                self.assertEqual(result.rest, b"/", target)
            self.assertEqual(result.name, unquote_to_bytes(first).decode("utf-8"))
            self.assertRegex(result.path, _CANONICAL)
            if result.path != b"/":
                self.assertNotIn(b"//", result.path, target)
            decoded = unquote_to_bytes(result.path)
            for segment in decoded.split(b"/"):
                self.assertNotIn(segment.partition(b";")[0], (b".", b".."), target)
            self.assertIsNone(re.search(rb"[\x00-\x1f\x7f\\]", decoded), target)
            query = target.partition(b"?")[2]
            self.assertEqual(result.query, b"?" + query if query else b"", target)
        # The generator exercises both outcomes.
        self.assertGreater(accepted, 100)
        self.assertGreater(refused, 100)
