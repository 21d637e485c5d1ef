"""
L{monedge.twistedseam}: what monedge relies on that Twisted does not
promise, each pinned against the installed Twisted, so that an upgrade
that changes one fails here first; and the version check that refuses a
Twisted the seam was not written for.
"""

from __future__ import annotations

import configparser
import os
import re
from typing import Any

from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import HTTPConnectionPool
from twisted.web.http import HTTPChannel, Request
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

import tests
from monedge.testing import ProxyProcess, writeRegistry
from monedge.twistedseam import (
    TWISTED_BELOW,
    TWISTED_LOWEST,
    canonicalHeaderName,
    checkTwistedVersion,
    chunkSize,
    parseRequestLine,
    quietConnectionPool,
    rawHeaderTable,
    requestDisconnected,
)

#: The repository root: the parent of the tests package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tests.__file__)))


class VersionTests(SynchronousTestCase):
    """
    L{checkTwistedVersion} accepts the Twisted releases the seam was
    written for and refuses any other with one line.
    """

    def test_installed(self) -> None:
        """
        The installed Twisted, the one these tests run on, passes.
        """
        checkTwistedVersion()

    def test_range(self) -> None:
        """
        Every 26.x from 26.10.0 passes, pre-releases and local builds of
        them included.
        """
        for version in ["26.10.0", "26.10.1", "26.11.0", "26.99.7", "26.12.0rc1"]:
            checkTwistedVersion(version)

    def test_outside(self) -> None:
        """
        An older release, the next major one (a pre-release of it too) and
        anything later are refused, naming the version found and the range.
        """
        for version in ["26.9.0", "25.5.0", "27.0.0", "27.0.0rc1", "28.1.0"]:
            with self.assertRaises(UsageError) as caught:
                checkTwistedVersion(version)
            self.assertEqual(
                str(caught.exception),
                f"Twisted {version} is installed, but this monedge is written"
                " for Twisted >= 26.10.0, < 27 (it relies on Twisted internals:"
                " monedge/twistedseam.py)",
            )

    def test_unreadable(self) -> None:
        """
        A version with no C{MAJOR.MINOR.MICRO} at its start is refused.
        """
        for version in ["", "trunk", "26.10", "v26.10.0"]:
            self.assertRaises(UsageError, checkTwistedVersion, version)

    def test_setupAgrees(self) -> None:
        """
        setup.cfg asks pip for the same range the check allows.
        """
        config = configparser.ConfigParser()
        config.read(os.path.join(ROOT, "setup.cfg"))
        requirements = config["options"]["install_requires"].splitlines()
        [twisted] = [line for line in requirements if line.startswith("Twisted")]
        lowest = ".".join(map(str, TWISTED_LOWEST))
        self.assertRegex(
            twisted, rf"^Twisted\[[a-z0-9,]+\] >= {re.escape(lowest)}, < 27$"
        )
        self.assertEqual(TWISTED_BELOW, (27, 0, 0))


class StartupTests(TestCase):
    """
    A real C{twistd monedge} on a Twisted it was not written for.
    """

    timeout = 60

    async def test_otherTwistedRefused(self) -> None:
        """
        It exits with status 1 and the version check's one line on standard
        error, and no traceback anywhere.  (The Twisted version is changed
        before monedge is imported, by a C{sitecustomize} module.)
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        site = os.path.join(directory, "site")
        os.makedirs(site)
        with open(os.path.join(site, "sitecustomize.py"), "w") as f:
            f.write("import twisted.copyright\ntwisted.copyright.version = '27.0.0'\n")
        registry = os.path.join(directory, "services.yaml")
        writeRegistry(registry, {})
        process = ProxyProcess(
            registry, directory, env={"PYTHONPATH": os.pathsep.join([site, ROOT])}
        )
        exited = await process.run()
        self.assertEqual(exited.status, 1)
        self.assertEqual(
            exited.stderr,
            "monedge: Twisted 27.0.0 is installed, but this monedge is written for"
            " Twisted >= 26.10.0, < 27 (it relies on Twisted internals:"
            " monedge/twistedseam.py)\n",
        )
        self.assertEqual(exited.stdout, "")
        self.assertNotIn("Traceback", exited.log)


class HeadersTests(SynchronousTestCase):
    """
    L{rawHeaderTable} is the table a L{Headers} answers from.
    """

    def test_read(self) -> None:
        """
        Names added in any case are found under their canonical form, with
        their values in order.
        """
        headers = Headers()
        headers.addRawHeader(b"x-forwarded-for", b"192.0.2.1")
        headers.addRawHeader(b"X-FORWARDED-FOR", b"192.0.2.2")
        headers.addRawHeader(b"host", b"example.com")
        self.assertEqual(
            rawHeaderTable(headers),
            {
                b"X-Forwarded-For": [b"192.0.2.1", b"192.0.2.2"],
                b"Host": [b"example.com"],
            },
        )

    def test_write(self) -> None:
        """
        A value set in the table under a canonical name is the header's.
        """
        headers = Headers()
        rawHeaderTable(headers)[b"X-Request-Id"] = [b"abc"]
        self.assertEqual(headers.getRawHeaders(b"x-request-id"), [b"abc"])
        self.assertEqual(
            list(headers.getAllRawHeaders()), [(b"X-Request-Id", [b"abc"])]
        )


class RequestTests(SynchronousTestCase):
    """
    L{requestDisconnected} follows a request's connection.
    """

    def test_disconnected(self) -> None:
        """
        False until the request's connection is lost, then true.
        """
        channel = HTTPChannel()
        channel.makeConnection(StringTransport())
        request = Request(channel)
        self.assertFalse(requestDisconnected(request))
        request.connectionLost(Exception("gone"))
        self.assertTrue(requestDisconnected(request))


class _Held(Resource):
    """
    Answers nothing: the request stays in progress.
    """

    isLeaf = True

    def render(self, request: Any) -> int:
        return NOT_DONE_YET


class ReadersTests(SynchronousTestCase):
    """
    Twisted's own rules for reading a request, as the HTTP/1.1 front end
    uses them.
    """

    def test_parseRequestLine(self) -> None:
        """
        A request line is three space-separated parts, any token as the
        method; anything else is refused with L{ValueError}.
        """
        self.assertEqual(
            parseRequestLine(b"PURGE /a?b HTTP/1.1"), (b"PURGE", b"/a?b", b"HTTP/1.1")
        )
        for bad in [b"GET", b"GET /a", b"GET /a HTTP/1.1 x"]:
            self.assertRaises(ValueError, parseRequestLine, bad)

    def test_canonicalHeaderName(self) -> None:
        """
        A header name is stored in Twisted's canonical case; a name that
        is not a token is refused with L{ValueError}.
        """
        self.assertEqual(canonicalHeaderName(b"x-forwarded-for"), b"X-Forwarded-For")
        self.assertRaises(ValueError, canonicalHeaderName, b"bad name")

    def test_chunkSize(self) -> None:
        """
        A chunk size is hex digits only: no sign, no spaces, no C{0x}.
        """
        self.assertEqual(chunkSize(b"1F"), 31)
        for bad in [b"-1", b" 1", b"0x1", b"", b"g"]:
            self.assertRaises(ValueError, chunkSize, bad)


class PoolTests(SynchronousTestCase):
    """
    L{quietConnectionPool}'s connections are not logged.
    """

    def test_quiet(self) -> None:
        """
        A persistent pool whose connection factory is not noisy.
        """
        pool = quietConnectionPool(MemoryReactorClock())
        self.assertIsInstance(pool, HTTPConnectionPool)
        self.assertTrue(pool.persistent)
        self.assertFalse(pool._factory.noisy)
