"""
Tests for L{monedge.rules.syntax}: the value grammars every option parser and
hook shares.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from monedge.rules.syntax import bearerToken, isToken


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
