"""
The Redis client (L{monedge.builtin.ratelimit.redisclient}) on a memory reactor: RESP2
encoding and parsing, C{redis://} URLs, and the pool's pipelining, timeouts
from the write judged after the reactor has read, and connections lost or
never made.  The ratelimit hook's tests use L{FakeRedis} and L{BusyReactor}
too.
"""

from __future__ import annotations

import hashlib
from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from monedge.builtin.ratelimit.redisclient import (
    DEFAULT_POOL_SIZE,
    RedisAddress,
    RedisNotConnected,
    RedisPool,
    RedisProtocolError,
    RedisReplyError,
    RedisTimeout,
    RESPParser,
    encodeCommand,
)


class BusyReactor(MemoryReactorClock):
    """
    A memory reactor whose timed calls run as a real reactor's do: a call
    scheduled while timed calls run waits for the next iteration, so
    whatever the test feeds in between (the poll for input) comes first.
    """

    def iterate(self, seconds: float = 0.0) -> None:
        """
        Let C{seconds} pass and run the timed calls due, but not those they
        schedule.
        """
        self.rightNow += seconds
        due = sorted(
            (call for call in self.calls if call.getTime() <= self.rightNow),
            key=lambda call: call.getTime(),
        )
        for call in due:
            if call in self.calls:
                self.calls.remove(call)
                call.called = 1
                call.func(*call.args, **call.kw)


class FakeRedis:
    """
    Plays a Redis server for the pools on a memory reactor: accepts or
    refuses their connection attempts, reads the commands written, and
    answers them: PING, AUTH, SELECT, ECHO and SCRIPT LOAD; EVALSHA of an
    unknown script with NOSCRIPT.  A subclass answers more in C{answer}.
    """

    def __init__(self, reactor: BusyReactor) -> None:
        self.reactor = reactor
        self.protocols: list[Any] = []
        self.transports: list[StringTransport] = []
        self._seen = 0
        self._read: list[int] = []
        self._parsers: list[RESPParser] = []
        self._unanswered: list[list[list[bytes]]] = []
        #: The SHA-1 of every script loaded.
        self.scripts: set[str] = set()

    def _attempts(self) -> list[tuple[Any, Any]]:
        """
        The connection attempts not yet accepted or refused: each factory
        and connector.
        """
        reactor = self.reactor
        attempts = [
            (client[2], connector)
            for client, connector in zip(
                reactor.tcpClients[self._seen :],
                reactor.connectors[self._seen :],
                strict=True,
            )
        ]
        self._seen = len(reactor.tcpClients)
        return attempts

    def accept(self) -> None:
        """
        Complete every connection attempt made so far.
        """
        for factory, _ in self._attempts():
            protocol = factory.buildProtocol(None)
            transport = StringTransport()
            self.protocols.append(protocol)
            self.transports.append(transport)
            self._read.append(0)
            self._parsers.append(RESPParser())
            self._unanswered.append([])
            protocol.makeConnection(transport)

    def refuse(self) -> None:
        """
        Fail every connection attempt made so far.
        """
        for factory, connector in self._attempts():
            factory.clientConnectionFailed(
                connector, Failure(ConnectionRefusedError("refused"))
            )

    def commands(self, index: int) -> list[list[bytes]]:
        """
        The commands written on connection C{index} and not yet answered.
        """
        value = self.transports[index].value()
        fresh = value[self._read[index] :]
        self._read[index] = len(value)
        for command in self._parsers[index].feed(fresh):
            assert isinstance(command, list)
            self._unanswered[index].append([bytes(part) for part in command])  # type: ignore[arg-type]
        return list(self._unanswered[index])

    def written(self) -> list[bytes]:
        """
        The name of every unanswered command on every connection.
        """
        return [c[0] for i in range(len(self.protocols)) for c in self.commands(i)]

    def answer(self, command: list[bytes]) -> bytes:
        """
        The reply to C{command}, as RESP2 bytes.
        """
        name = command[0].upper()
        if name == b"PING":
            return b"+PONG\r\n"
        if name in (b"AUTH", b"SELECT"):
            return b"+OK\r\n"
        if name == b"ECHO":
            return b"$%d\r\n%s\r\n" % (len(command[1]), command[1])
        if name == b"SCRIPT" and command[1].upper() == b"LOAD":
            sha = hashlib.sha1(command[2]).hexdigest()
            self.scripts.add(sha)
            return b"$40\r\n" + sha.encode() + b"\r\n"
        if name == b"EVALSHA" and command[1].decode() not in self.scripts:
            return b"-NOSCRIPT No matching script.\r\n"
        return b"-ERR unknown command\r\n"

    def serve(self, index: int | None = None, count: int | None = None) -> None:
        """
        Answer the unanswered commands (the first C{count}) on connection
        C{index}, or on all of them.
        """
        for i in range(len(self.protocols)) if index is None else [index]:
            if self.transports[i].disconnected:
                continue
            commands = self.commands(i)[:count]
            del self._unanswered[i][: len(commands)]
            if commands:
                self.protocols[i].dataReceived(
                    b"".join(self.answer(c) for c in commands)
                )

    def drop(self, index: int) -> None:
        """
        Close connection C{index} from the server's side.
        """
        self.transports[index].loseConnection()
        self.protocols[index].connectionLost(Failure(ConnectionDone("closed")))


class RESPTests(SynchronousTestCase):
    """
    Commands are encoded as RESP2 arrays; replies are parsed however the
    stream is split.
    """

    def test_encode(self) -> None:
        """
        Each argument is a bulk string: str as UTF-8, int in decimal.
        """
        self.assertEqual(
            encodeCommand("EVALSHA", b"ab", 1, "k\u00e9"),
            b"*4\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n1\r\n$3\r\nk\xc3\xa9\r\n",
        )

    def test_everySplit(self) -> None:
        """
        Simple strings, errors, integers, bulk and nil bulk strings, and
        nested and nil arrays come out the same wherever the stream is cut.
        """
        stream = (
            b"+PONG\r\n-NOSCRIPT No matching script.\r\n:-42\r\n$5\r\nab\r\nc\r\n"
            b"$-1\r\n*2\r\n:1\r\n*1\r\n$0\r\n\r\n*-1\r\n"
        )
        expected = ["PONG", "NOSCRIPT No matching script.", -42, b"ab\r\nc", None]
        expected += [[1, [b""]], None]
        for cut in range(len(stream) + 1):
            parser = RESPParser()
            replies = parser.feed(stream[:cut]) + parser.feed(stream[cut:])
            got = [str(r) if isinstance(r, RedisReplyError) else r for r in replies]
            self.assertEqual(got, expected, cut)
            self.assertIsInstance(replies[1], RedisReplyError)

    def test_garbage(self) -> None:
        """
        A stream that is not RESP2 is refused.
        """
        for garbage in [
            b"HTTP/1.1 200 OK\r\n",
            b":forty\r\n",
            b"$" + b"9" * 20 + b"\r\n",
        ]:
            with self.subTest(garbage=garbage):
                with self.assertRaises(RedisProtocolError):
                    RESPParser().feed(garbage)


class AddressTests(SynchronousTestCase):
    """
    C{redis://} URLs name the server, the credentials and the database.
    """

    def test_parse(self) -> None:
        """
        The port defaults to 6379 and the database to 0; percent-encoded
        credentials are decoded, with or without a user.
        """
        cases = [
            ("redis://cache", RedisAddress("cache")),
            ("redis://10.0.0.5:6380/2", RedisAddress("10.0.0.5", 6380, 2)),
            ("redis://:s%40cret@cache/", RedisAddress("cache", password="s@cret")),
            (
                "redis://edge:pw@[::1]:7000/1",
                RedisAddress("::1", 7000, 1, "edge", "pw"),
            ),
        ]
        for url, address in cases:
            with self.subTest(url=url):
                self.assertEqual(RedisAddress.parse(url), address)
        self.assertEqual(str(RedisAddress.parse("redis://cache")), "cache:6379/0")

    def test_refused(self) -> None:
        """
        Anything but a redis:// URL with a host, a port in range and a
        whole-number database, and no query or fragment, is a ValueError
        with a reason, which names the URL without its password (even one
        with an C{@} in it).
        """
        for url in [
            6379,
            "http://cache:6379/0",
            "redis://:6379/0",
            "redis://cache:99999/0",
            "redis://cache:6379/x",
            "redis://cache:6379/0?a=b",
            "redis://cache:6379/0#f",
            "http://:p@ss@cache:6379/0",
            "redis://:p@ss@cache:99999/0",
            "redis://user:p@ss@cache:6379/0?a=b",
            "redis://:p@ss@:6379/0",
        ]:
            with self.subTest(url=url):
                with self.assertRaises(ValueError) as caught:
                    RedisAddress.parse(url)
                message = str(caught.exception)
                self.assertTrue(message)
                self.assertNotIn("p@ss", message)
                self.assertNotIn("ss@", message)


ADDRESS = RedisAddress("127.0.0.1", 6379)


class RedisPoolTests(SynchronousTestCase):
    """
    The connection pool: pipelining, the timeout from the write, and
    connections lost or never made.
    """

    def setUp(self) -> None:
        self.reactor = BusyReactor()
        self.redis = FakeRedis(self.reactor)

    def pool(self, size: int = DEFAULT_POOL_SIZE) -> RedisPool:
        """
        A pool of C{size} connections with a 250 ms timeout, connected.
        """
        pool = RedisPool(
            self.reactor, ADDRESS, 0.25, setup=[("SCRIPT", "LOAD", "x")], size=size
        )
        pool.connect()
        self.redis.accept()
        self.redis.serve()
        return pool

    def test_pipelined(self) -> None:
        """
        Commands of concurrent requests are all written at once, shared
        between the pool's two connections, before any reply (one round
        trip each); each reply fires its own command's result.
        """
        pool = self.pool()
        results = [pool.execute("ECHO", i) for i in range(10)]
        self.assertEqual(len(self.redis.protocols), DEFAULT_POOL_SIZE)
        self.assertEqual([len(self.redis.commands(i)) for i in range(2)], [5, 5])
        self.assertFalse(any(r.called for r in results))
        for i in range(2):
            self.redis.protocols[i].dataReceived(
                b"".join(b":%d\r\n" % (int(c[1]),) for c in self.redis.commands(i))
            )
        self.assertEqual([self.successResultOf(r) for r in results], list(range(10)))

    def test_handshake(self) -> None:
        """
        A new connection sends AUTH (with the user, if any), SELECT (for a
        database other than 0) and the setup commands ahead of any other.
        """
        address = RedisAddress("127.0.0.1", 6379, 3, "edge", "s3cret")
        pool = RedisPool(self.reactor, address, 0.25, setup=[("SCRIPT", "LOAD", "x")])
        result = pool.execute("PING")
        self.redis.accept()
        self.assertEqual(
            self.redis.commands(0),
            [
                [b"AUTH", b"edge", b"s3cret"],
                [b"SELECT", b"3"],
                [b"SCRIPT", b"LOAD", b"x"],
                [b"PING"],
            ],
        )
        self.redis.serve()
        self.assertEqual(self.successResultOf(result), "PONG")

    def test_busyReactorIsNotATimeout(self) -> None:
        """
        When the reactor was busy past a command's deadline, a reply that
        arrived meanwhile is read before the deadline is judged: the
        command succeeds.
        """
        pool = self.pool()
        result = pool.execute("PING")
        self.reactor.iterate(1.0)  # busy elsewhere; the deadline has passed
        self.redis.serve()  # the reactor's next poll finds the reply
        self.reactor.iterate()
        self.assertEqual(self.successResultOf(result), "PONG")

    def test_slowReplyFailsAlone(self) -> None:
        """
        A command unanswered 250 ms after its write fails with RedisTimeout;
        the connection is kept, its late reply is dropped, and the next
        command gets its own reply.
        """
        pool = self.pool()
        slow = pool.execute("PING")
        self.reactor.iterate(0.2)
        self.assertNoResult(slow)
        self.reactor.iterate(0.06)
        self.reactor.iterate()
        self.failureResultOf(slow, RedisTimeout)
        after = pool.execute("ECHO", "x")
        self.redis.serve()
        self.assertEqual(self.successResultOf(after), b"x")
        self.assertFalse(any(t.disconnected for t in self.redis.transports))

    def test_eachCommandTimedFromItsWrite(self) -> None:
        """
        A command written after an earlier one timed out is judged by its
        own deadline (250 ms after its write), not by a check set for
        later (on the same connection).
        """
        pool = self.pool(size=1)
        first = pool.execute("PING")
        self.reactor.iterate(0.3)
        self.reactor.iterate()
        self.failureResultOf(first, RedisTimeout)
        second = pool.execute("PING")
        self.assertEqual(len(self.redis.commands(0)), 2)
        self.reactor.iterate(0.2)
        self.reactor.iterate()
        self.assertNoResult(second)
        self.reactor.iterate(0.06)
        self.reactor.iterate()
        self.failureResultOf(second, RedisTimeout)

    def test_silentConnectionDropped(self) -> None:
        """
        A connection that stays silent for a second with commands waiting
        is dropped (and what waits on it fails); the next command opens a
        new one.
        """
        pool = self.pool()
        pool.execute("PING").addErrback(lambda _: None)
        self.reactor.iterate(0.9)
        self.reactor.iterate()
        self.assertFalse(any(t.disconnected for t in self.redis.transports))
        self.reactor.iterate(0.1)
        self.reactor.iterate()
        self.assertEqual([t.disconnected for t in self.redis.transports], [True, False])
        self.redis.protocols[0].connectionLost(Failure(ConnectionDone("aborted")))
        self.assertEqual(len(pool.connections), 1)
        pool.execute("PING")
        self.assertEqual(len(self.reactor.tcpClients), 3)

    def test_waitsForConnection(self) -> None:
        """
        A command sent before any connection is open is written as one
        opens, after its handshake.
        """
        pool = RedisPool(self.reactor, ADDRESS, 0.25, setup=[("SCRIPT", "LOAD", "x")])
        result = pool.execute("PING")
        self.assertEqual(len(self.reactor.tcpClients), DEFAULT_POOL_SIZE)
        self.reactor.iterate(0.1)
        self.redis.accept()
        self.assertEqual(self.redis.written(), [b"SCRIPT", b"PING", b"SCRIPT"])
        self.redis.serve()
        self.assertEqual(self.successResultOf(result), "PONG")

    def test_noConnectionWithinTimeout(self) -> None:
        """
        A command waiting for a connection fails once the timeout passes
        without one.
        """
        pool = RedisPool(self.reactor, ADDRESS, 0.25)
        result = pool.execute("PING")
        self.reactor.iterate(0.3)
        self.reactor.iterate()
        self.assertIsInstance(self.failureResultOf(result).value, RedisTimeout)

    def test_cannotConnect(self) -> None:
        """
        When every connection attempt fails, waiting commands fail at once
        with RedisNotConnected, and the next command tries again.
        """
        pool = RedisPool(self.reactor, ADDRESS, 0.25)
        result = pool.execute("PING")
        self.redis.refuse()
        failure = self.failureResultOf(result, RedisNotConnected)
        self.assertIn("refused", failure.getErrorMessage())
        pool.execute("PING").addErrback(lambda _: None)
        self.assertEqual(len(self.reactor.tcpClients), 2 * DEFAULT_POOL_SIZE)

    def test_connectionLost(self) -> None:
        """
        Commands waiting on a lost connection fail with RedisNotConnected;
        later ones go on the connection left.
        """
        pool = self.pool()
        first = pool.execute("PING")
        self.redis.drop(0)
        self.failureResultOf(first, RedisNotConnected)
        second = pool.execute("PING")
        self.assertEqual(self.redis.commands(1), [[b"PING"]])
        self.redis.serve(1)
        self.assertEqual(self.successResultOf(second), "PONG")

    def test_close(self) -> None:
        """
        close() closes every connection, fails what waits, and fires once
        they are all closed; no timer is left behind.
        """
        pool = self.pool()
        result = pool.execute("PING")
        closed = pool.close()
        self.assertNoResult(closed)
        self.assertTrue(all(t.disconnecting for t in self.redis.transports))
        for protocol in self.redis.protocols:
            protocol.connectionLost(Failure(ConnectionDone("closed")))
        self.successResultOf(closed)
        self.failureResultOf(result, RedisNotConnected)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.failureResultOf(pool.execute("PING"), RedisNotConnected)
