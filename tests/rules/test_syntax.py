"""
Tests for L{monedge.rules.syntax}: the value grammars every option parser and
hook shares.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from monedge.rules.syntax import (
    bearerToken,
    isToken,
    parseBool,
    parseDuration,
    parseSize,
)

WEEK = 7 * 24 * 3600
MIB = 1 << 20


class TokenTests(SynchronousTestCase):
    """
    L{isToken} accepts exactly RFC 9110 tokens.
    """

    def test_tokens(self) -> None:
        """
        Letters, digits and the tchar punctuation are tokens, in any case.
        """
        for value in ("X-User-Id", "x-user-id", "a", "!#$%&'*+-.^_`|~09AZaz"):
            self.assertTrue(isToken(value), value)

    def test_notTokens(self) -> None:
        """
        Empty strings, separators, spaces, controls, non-ASCII and anything
        but a string are not.
        """
        for value in ("", "X User", "X:Y", "a\n", "é", "(x)", b"X-Y", None, 3):
            self.assertFalse(isToken(value), value)


class BearerTests(SynchronousTestCase):
    """
    L{bearerToken} reads one C{Authorization: Bearer} credential.
    """

    def test_token(self) -> None:
        """
        The token after the scheme, the scheme in any case, with the
        surrounding spaces dropped.
        """
        for value in (b"Bearer abc.def", b"bearer abc.def", b"  BEARER   abc.def "):
            self.assertEqual(bearerToken([value]), b"abc.def", value)

    def test_none(self) -> None:
        """
        No header, or only other schemes, is no bearer credential.
        """
        self.assertIsNone(bearerToken(None))
        self.assertIsNone(bearerToken([]))
        self.assertIsNone(bearerToken([b"Basic eDp5"]))
        self.assertIsNone(bearerToken([b"Bearerabc"]))

    def test_malformed(self) -> None:
        """
        An empty token, or more than one Authorization header with a
        bearer among them, is malformed (C{b""}): a client cannot make two
        readers of the request take two different credentials.
        """
        self.assertEqual(bearerToken([b"Bearer"]), b"")
        self.assertEqual(bearerToken([b"Bearer   "]), b"")
        self.assertEqual(bearerToken([b"Bearer a", b"Bearer b"]), b"")
        self.assertEqual(bearerToken([b"Basic eDp5", b"Bearer b"]), b"")


class ParseDurationTests(SynchronousTestCase):
    """
    L{parseDuration} reads durations in seconds.
    """

    def test_units(self) -> None:
        """
        C{ms}, C{s}, C{m} and C{h} suffixes, and bare numbers of seconds,
        give seconds; whitespace around the parts is allowed.
        """
        for value, seconds in [
            ("30s", 30.0),
            ("500ms", 0.5),
            ("2m", 120.0),
            ("1h", 3600.0),
            ("1.5s", 1.5),
            ("0.25h", 900.0),
            ("45", 45.0),
            ("2.5", 2.5),
            (" 30 s ", 30.0),
            ("1ms", 0.001),
            ("168h", float(WEEK)),
            ("10080m", float(WEEK)),
        ]:
            self.assertAlmostEqual(parseDuration(value), seconds, msg=value)

    def test_numbers(self) -> None:
        """
        YAML ints and floats are seconds.
        """
        self.assertEqual(parseDuration(30), 30.0)
        self.assertIsInstance(parseDuration(30), float)
        self.assertEqual(parseDuration(0.5), 0.5)
        self.assertEqual(parseDuration(WEEK), float(WEEK))

    def test_notPositive(self) -> None:
        """
        Zero and negative durations are refused.
        """
        for value in [0, 0.0, -1, -0.5, "0", "0s", "0ms", "0.0h"]:
            with self.assertRaises(ValueError, msg=repr(value)):
                parseDuration(value)

    def test_tooLong(self) -> None:
        """
        More than seven days is refused; exactly seven days is allowed.
        """
        self.assertEqual(parseDuration("604800s"), float(WEEK))
        for value in [WEEK + 1, WEEK + 0.5, "604801", "169h", "700000000ms"]:
            with self.assertRaises(ValueError, msg=repr(value)):
                parseDuration(value)

    def test_notFinite(self) -> None:
        """
        NaN and infinity are not durations.
        """
        for value in [float("nan"), float("inf"), float("-inf"), "nan", "inf"]:
            with self.assertRaises(ValueError, msg=repr(value)):
                parseDuration(value)

    def test_garbage(self) -> None:
        """
        Booleans, None, unknown units, signs, exponents and other text are
        refused with a message quoting the value.
        """
        values: list[object] = [
            True,
            False,
            None,
            "",
            "s",
            "30 seconds",
            "1d",
            "30S",
            "1e3",
            "+5s",
            "-5s",
            "5s5",
            "1h30m",
            ".5s",
            "5.s",
            [],
            {},
        ]
        for value in values:
            with self.assertRaises(ValueError) as e:
                parseDuration(value)
            self.assertIn(repr(value), str(e.exception))


class ParseSizeTests(SynchronousTestCase):
    """
    L{parseSize} reads byte counts.
    """

    def test_units(self) -> None:
        """
        Binary (KiB, MiB, GiB and nginx-style k, m, g), decimal (KB, MB,
        GB) and byte suffixes, and bare numbers, give bytes.
        """
        for value, size in [
            ("0", 0),
            ("1024", 1024),
            ("1B", 1),
            ("512KiB", 512 * 1024),
            ("10MiB", 10 * MIB),
            ("1GiB", 1 << 30),
            ("10k", 10 * 1024),
            ("10K", 10 * 1024),
            ("10m", 10 * MIB),
            ("10M", 10 * MIB),
            ("2g", 2 << 30),
            ("2G", 2 << 30),
            ("1KB", 1000),
            ("1MB", 1000**2),
            ("1GB", 1000**3),
            (" 10 MiB ", 10 * MIB),
        ]:
            self.assertEqual(parseSize(value), size, value)

    def test_ints(self) -> None:
        """
        YAML ints are bytes.
        """
        self.assertEqual(parseSize(0), 0)
        self.assertEqual(parseSize(4096), 4096)

    def test_negative(self) -> None:
        """
        A negative size is refused.
        """
        for value in [-1, "-1", "-1MiB"]:
            with self.assertRaises(ValueError, msg=repr(value)):
                parseSize(value)

    def test_garbage(self) -> None:
        """
        Booleans, floats, fractions, wrong-case units and other text are
        refused with a message quoting the value.
        """
        for value in [
            True,
            False,
            None,
            1.5,
            10.0,
            "",
            "MiB",
            "1.5MiB",
            "10mib",
            "10kb",
            "10Kb",
            "10 bytes",
            "10TiB",
            "1e6",
            "+10",
        ]:
            with self.assertRaises(ValueError) as e:
                parseSize(value)
            self.assertIn(repr(value), str(e.exception))


class ParseBoolTests(SynchronousTestCase):
    """
    L{parseBool} reads booleans.
    """

    def test_valid(self) -> None:
        """
        YAML booleans and C{true}/C{false} in any case, with surrounding
        whitespace, are booleans.
        """
        for value, expected in [
            (True, True),
            (False, False),
            ("true", True),
            ("false", False),
            ("TRUE", True),
            ("False", False),
            (" true ", True),
        ]:
            self.assertIs(parseBool(value), expected, repr(value))

    def test_invalid(self) -> None:
        """
        Other strings and non-booleans, including 0/1 and yes/no, are
        refused with a message quoting the value.
        """
        values: list[object] = [
            0,
            1,
            None,
            "",
            "yes",
            "no",
            "on",
            "1",
            "t",
            "truee",
            [],
        ]
        for value in values:
            with self.assertRaises(ValueError) as e:
                parseBool(value)
            self.assertIn(repr(value), str(e.exception))
