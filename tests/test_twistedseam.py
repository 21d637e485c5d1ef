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
from twisted.web.server import NOT_DONE_YET, Site

import tests
from monedge.testing import ProxyProcess, writeRegistry
from monedge.twistedseam import (
    TWISTED_BELOW,
    TWISTED_LOWEST,
    HTTPChannelBase,
    channelOf,
    checkTwistedVersion,
    chunkRemaining,
    quietConnectionPool,
    rawHeaderTable,
    releaseTransport,
    requestDisconnected,
    requestLine,
    requestLineSoFar,
    takeHeldInput,
    unparsedInput,
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


class _Channel(HTTPChannelBase):
    """
    Records the seam's public hooks.
    """

    allowContinue = True

    def __init__(self) -> None:
        super().__init__()
        self.badRequests = 0

    def continueAllowed(self) -> bool:
        return self.allowContinue

    def badRequest(self) -> None:
        self.badRequests += 1
        super().badRequest()


class ChannelTests(SynchronousTestCase):
    """
    What the seam reads from and changes in Twisted's L{HTTPChannel}.
    """

    def connect(
        self, channel: HTTPChannel | None = None
    ) -> tuple[Any, StringTransport]:
        channel = _Channel() if channel is None else channel
        channel.requestFactory = Request
        site = Site(_Held(), reactor=MemoryReactorClock())
        channel.site = site  # type: ignore[attr-defined]
        channel.factory = site
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_requestLine(self) -> None:
        """
        The request line is known from its end until the request is all
        in; L{requestLineSoFar} is L{None}s before and after.
        """
        channel, _ = self.connect(HTTPChannel())
        self.assertEqual(requestLineSoFar(channel), (None, None, None))
        channel.dataReceived(b"POST /a?b HTTP/1.1\r\nContent-Length: 2\r\n")
        self.assertEqual(requestLine(channel), (b"POST", b"/a?b", b"HTTP/1.1"))
        self.assertEqual(requestLineSoFar(channel), (b"POST", b"/a?b", b"HTTP/1.1"))
        channel.dataReceived(b"\r\nhi")
        self.assertEqual(requestLineSoFar(channel), (None, None, None))

    def test_unparsedInput(self) -> None:
        """
        Part of a line is kept unparsed until the rest comes.
        """
        channel, _ = self.connect()
        self.assertEqual(unparsedInput(channel), b"")
        channel.dataReceived(b"GET /a HT")
        self.assertEqual(unparsedInput(channel), b"GET /a HT")
        channel.dataReceived(b"TP/1.1\r\n")
        self.assertEqual(unparsedInput(channel), b"")

    def test_heldInput(self) -> None:
        """
        What arrives while a request is answered is held, and once taken,
        it is not parsed later.
        """
        channel, _ = self.connect()
        channel.dataReceived(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HT")
        channel.dataReceived(b"TP/1.1\r\n")
        self.assertEqual(takeHeldInput(channel), b"GET /b HTTP/1.1\r\n")
        self.assertEqual(takeHeldInput(channel), b"")
        request = channel.requests[0]
        request.finish()
        self.assertEqual(channel.requests, [])
        self.assertEqual(unparsedInput(channel), b"")

    def test_chunkRemaining(self) -> None:
        """
        While a chunk is read: what its size line declared and has not
        come yet.  Between chunks, and without a chunked body, L{None}.
        """
        channel, _ = self.connect()
        channel.dataReceived(b"POST /a HTTP/1.1\r\nHost: x\r\n")
        self.assertIsNone(chunkRemaining(channel))
        channel.dataReceived(b"Transfer-Encoding: chunked\r\n\r\n")
        self.assertIsNone(chunkRemaining(channel))
        channel.dataReceived(b"10\r\nabc")
        self.assertEqual(chunkRemaining(channel), 13)
        channel.dataReceived(b"0123456789abc\r\n")
        self.assertIsNone(chunkRemaining(channel))

    def test_releaseTransport(self) -> None:
        """
        The channel stops being its transport's producer.
        """
        channel, transport = self.connect()
        self.assertIs(transport.producer, channel)
        releaseTransport(channel)
        self.assertIsNone(transport.producer)

    def test_continue(self) -> None:
        """
        C{100 Continue} is sent for C{Expect: 100-continue} only if
        L{HTTPChannelBase.continueAllowed} says so.
        """
        head = b"POST /a HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        for allowed in [True, False]:
            channel, transport = self.connect()
            channel.allowContinue = allowed
            channel.dataReceived(head)
            self.assertEqual(
                transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n" if allowed else b""
            )

    def test_badRequest(self) -> None:
        """
        A request line Twisted cannot parse goes to
        L{HTTPChannelBase.badRequest}, whose own answer is Twisted's 400.
        """
        channel, transport = self.connect()
        channel.dataReceived(b"GET\r\n")
        self.assertEqual(channel.badRequests, 1)
        self.assertEqual(transport.value(), b"HTTP/1.1 400 Bad Request\r\n\r\n")


class ChannelOfTests(SynchronousTestCase):
    """
    L{channelOf} says which channel a client connection's protocol
    (L{monedge.edge.switch.ProtocolSwitch}) speaks through.
    """

    def test_switch(self) -> None:
        """
        The switch's channel.
        """
        from monedge.edge.switch import ProtocolSwitch

        channel = HTTPChannel()
        self.assertIs(channelOf(ProtocolSwitch(None, channel)), channel)

    def test_otherProtocol(self) -> None:
        """
        Any other protocol has no channel.
        """
        self.assertIsNone(channelOf(object()))


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
