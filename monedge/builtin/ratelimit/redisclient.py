"""
A small pipelined Redis client for Twisted: RESP2 over TCP, each command
answered by a L{Deferred}.

    pool = RedisPool(reactor, RedisAddress.parse("redis://cache:6379/0"), 0.25)
    reply = await pool.execute("PING")        # "PONG"

It is what monedge needs from Redis (the C{ratelimit} hook's shared
buckets) and no more: no RESP3, pub/sub, TLS, Sentinel or Cluster.

The contract:

  - Pipelining.  A L{RedisPool} holds a few connections to one server
    (L{DEFAULT_POOL_SIZE}), opened by L{RedisPool.connect} or by the first
    command.  Each command goes on the connection with the fewest commands
    waiting and is written at once (not on the reactor's next turn),
    without waiting for earlier replies; replies come back in the order
    the commands went out.  So the commands of concurrent callers share
    connections and each costs one round trip.  A new connection first
    sends C{AUTH} and C{SELECT} (from the URL) and the pool's setup
    commands, ahead of any other command on it.
  - Timeouts.  A command may wait C{timeout} seconds for its reply,
    measured from its write to the connection; a command that finds no
    open connection is timed from the call to L{RedisPool.execute}, so
    waiting for a connection counts.  A deadline is judged only after the
    reactor has read what arrived: when the timer fires, the check waits
    for the next reactor iteration, so a reply that was already waiting on
    the socket while the reactor was busy with other work counts as in
    time.  A command that times out fails alone with L{RedisTimeout}; its
    reply, if it comes later, is read and dropped, and the connection is
    kept.  A connection that has left a command unanswered for
    C{deadAfter} seconds from its write (four timeouts, at least 1 s) is
    dropped.
  - Reconnection.  A lost connection fails the commands waiting on it
    with L{RedisNotConnected} and leaves the pool; the next command opens
    connections again, up to the pool's size.  There is no retry loop or
    back-off: when every attempt fails, the commands waiting for a
    connection fail at once with L{RedisNotConnected}, and the next
    command tries again.
  - Errors.  An error reply fails its command with L{RedisReplyError}
    (Redis's message).  A stream that is not RESP2 (L{RedisProtocolError})
    drops the connection, which fails the commands on it with
    L{RedisNotConnected}.  Nothing is logged and nothing is retried:
    callers decide what a failure means (the C{ratelimit} hook tells a
    single failure from an outage with PINGs of its own).

The reactor is injected: a pool needs C{seconds}, C{callLater} and
C{connectTCP} (through Twisted's client endpoints).
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

from monedge.rules.redact import redactText, redactURL
from monedge.twistedseam import sendAtOnce

#: Connections a pool holds unless told otherwise.
DEFAULT_POOL_SIZE = 2


class RedisReplyError(Exception):
    """
    Redis answered an error reply (C{-ERR ...}, C{-NOSCRIPT ...}); the
    message is Redis's.
    """


class RedisProtocolError(Exception):
    """
    What came from Redis is not a reply: the connection is dropped.
    """


class RedisTimeout(Exception):
    """
    No reply within the pool's timeout of the command's write; or, for a
    command that found no open connection, no connection within it.
    """


class RedisNotConnected(Exception):
    """
    The connection a command was on was lost, or none could be made.
    """


#: A RESP2 reply as L{RESPParser} gives it: an error reply is a
#: L{RedisReplyError} value, not raised.
Reply: TypeAlias = "int | bytes | str | None | list[Reply] | RedisReplyError"

#: The longest reply line and bulk string accepted from Redis.
_MAX_LINE = 64 * 1024
_MAX_BULK = 16 * 1024 * 1024
_MAX_DEPTH = 8


@dataclass(frozen=True)
class RedisAddress:
    """
    A Redis server, the credentials and the database to use: a parsed
    C{redis://} URL.
    """

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: object) -> RedisAddress:
        """
        Parse C{redis://[[user]:password@]host[:port][/db]}.

        @raise ValueError: with a one-line reason.
        """
        if not isinstance(url, str):
            raise ValueError(f"expected a redis:// URL, got {type(url).__name__}")
        # Errors name the URL without its password (monedge.rules.redact).
        shown = redactURL(url)
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise ValueError(f"invalid URL {shown!r}: {redactText(str(e))}") from None
        if parts.scheme != "redis":
            raise ValueError(f"expected a redis://host:port/db URL, got {shown!r}")
        if not parts.hostname:
            raise ValueError(f"the URL {shown!r} has no host")
        if parts.query or parts.fragment:
            raise ValueError(f"the URL {shown!r} may not have a query or fragment")
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError(f"the database must be a whole number, got {path!r}")
        return cls(
            host=parts.hostname,
            port=port or 6379,
            db=int(path) if path else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def __str__(self) -> str:
        return f"{self.host}:{self.port}/{self.db}"


def encodeCommand(*args: str | bytes | int) -> bytes:
    """
    A command as RESP2 sends it: an array of bulk strings.
    """
    parts = [b"*%d\r\n" % (len(args),)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode("utf-8")
        else:
            data = b"%d" % (arg,)
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class RESPParser:
    """
    Whole RESP2 replies from a byte stream, however it is split.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Reply]:
        """
        Take C{data}; return the replies it completes, in order.

        @raise RedisProtocolError: if the stream is not RESP2.
        """
        buffer = self._buffer
        buffer += data
        replies: list[Reply] = []
        position = 0
        while position < len(buffer):
            parsed = self._parse(buffer, position, 0)
            if parsed is None:
                break
            reply, position = parsed
            replies.append(reply)
        if position:
            del buffer[:position]
        return replies

    def _parse(
        self, buffer: bytearray, position: int, depth: int
    ) -> tuple[Reply, int] | None:
        """
        The reply at C{position} and where the next one starts, or L{None}
        if it is not all here yet.
        """
        end = buffer.find(b"\r\n", position)
        if end < 0:
            if len(buffer) - position > _MAX_LINE:
                raise RedisProtocolError("a reply line is too long")
            return None
        kind = buffer[position : position + 1]
        line = bytes(buffer[position + 1 : end])
        after = end + 2
        try:
            if kind == b"+":
                return line.decode("utf-8", "replace"), after
            if kind == b"-":
                return RedisReplyError(line.decode("utf-8", "replace")), after
            if kind == b":":
                return int(line), after
            if kind == b"$":
                length = int(line)
                if length < 0:
                    return None, after
                if length > _MAX_BULK:
                    raise RedisProtocolError(f"a {length}-byte bulk reply")
                if len(buffer) < after + length + 2:
                    return None
                return bytes(buffer[after : after + length]), after + length + 2
            if kind == b"*":
                count = int(line)
                if count < 0:
                    return None, after
                if depth >= _MAX_DEPTH:
                    raise RedisProtocolError("replies nested too deep")
                items: list[Reply] = []
                for _ in range(count):
                    parsed = self._parse(buffer, after, depth + 1)
                    if parsed is None:
                        return None
                    item, after = parsed
                    items.append(item)
                return items, after
        except ValueError:
            raise RedisProtocolError(f"not a number: {line[:40]!r}") from None
        raise RedisProtocolError(f"not a reply: {bytes(buffer[position:end])[:40]!r}")


class _Command:
    """
    One command: its bytes, its result, and when it was written and is due.
    """

    __slots__ = ("data", "result", "written", "deadline")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.result: Deferred[Reply] = Deferred()
        self.written = 0.0
        self.deadline = 0.0


class _Deadlines:
    """
    Fails the commands of a first-in first-out queue that are not answered
    by their deadline, on C{reactor}.

    A deadline is checked only after the reactor has read what arrived:
    when the timer fires, the check waits for the next reactor iteration
    (C{callLater(0)} runs after the next poll for input), so a reply that
    was already waiting on the socket, because the reactor was busy with
    other work when it came, is read and counted as in time.  A busy
    monedge never blames Redis for its own delay.
    """

    def __init__(
        self,
        reactor: Any,
        queue: deque[_Command],
        expire: Callable[[list[_Command], float], None],
    ) -> None:
        self._reactor = reactor
        self._queue = queue
        self._expire = expire
        self._timer: Any = None
        self._at = 0.0
        self._checking = False

    def arm(self, extra: float | None = None) -> None:
        """
        Make sure a check is due by the first unanswered command's
        deadline, and by C{extra} if given.
        """
        if self._checking:
            return  # the check under way arms again when it is done
        due = extra
        for command in self._queue:
            if not command.result.called:
                due = command.deadline if due is None else min(due, command.deadline)
                break
        if due is None:
            return
        timer = self._timer
        if timer is not None:
            if self._at <= due:
                return
            timer.cancel()
        self._at = due
        self._timer = self._reactor.callLater(
            max(0.0, due - self._reactor.seconds()), self._due
        )

    def cancel(self) -> None:
        """
        Stop checking.
        """
        timer, self._timer = self._timer, None
        self._checking = False
        if timer is not None and timer.active():
            timer.cancel()

    def _due(self) -> None:
        # Read first, then judge: see the class docstring.
        self._checking = True
        self._timer = self._reactor.callLater(0, self._check, self._reactor.seconds())

    def _check(self, due: float) -> None:
        self._timer = None
        self._checking = False
        expired = []
        for command in self._queue:
            if command.deadline > due:
                break
            if not command.result.called:
                expired.append(command)
        self._expire(expired, due)


class RedisConnection(Protocol):
    """
    One connection to Redis, with commands pipelined on it: each is written
    at once, and replies come back in the order the commands went out.

    A command not answered within the pool's timeout of its write fails
    alone; its reply, if it comes later, is read and dropped, and the
    connection is kept.  A connection that has been silent for C{deadAfter}
    seconds with commands waiting is dropped.
    """

    #: A TCP transport (a test's StringTransport), set by makeConnection.
    transport: Any

    def __init__(self, pool: RedisPool) -> None:
        self._pool = pool
        self._parser = RESPParser()
        self.pending: deque[_Command] = deque()
        self._deadlines = _Deadlines(pool.reactor, self.pending, self._expired)
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        sendAtOnce(self.transport)
        self._pool._connected(self)

    def send(self, command: _Command) -> None:
        """
        Write C{command}; its result fires with the reply, or fails with
        L{RedisReplyError}, L{RedisTimeout} or L{RedisNotConnected}.
        """
        now = self._pool.reactor.seconds()
        command.written = now
        if not command.deadline:
            command.deadline = now + self._pool.timeout
        self.pending.append(command)
        self.transport.write(command.data)
        self._deadlines.arm(command.written + self._pool.deadAfter)

    def dataReceived(self, data: bytes) -> None:
        try:
            replies = self._parser.feed(data)
        except RedisProtocolError:
            self.transport.abortConnection()
            return
        pending = self.pending
        for reply in replies:
            if not pending:
                self.transport.abortConnection()
                return
            command = pending.popleft()
            if command.result.called:
                continue  # it timed out: the late reply is dropped
            if isinstance(reply, RedisReplyError):
                command.result.errback(reply)
            else:
                command.result.callback(reply)
        if pending:
            self._deadlines.arm(pending[0].written + self._pool.deadAfter)

    def _expired(self, expired: list[_Command], due: float) -> None:
        timeout = self._pool.timeout
        for command in expired:
            if not command.result.called:
                command.result.errback(
                    RedisTimeout(f"no reply within {timeout:g} s of the write")
                )
        pending = self.pending
        if pending and pending[0].written + self._pool.deadAfter <= due:
            self.transport.abortConnection()
        elif pending:
            self._deadlines.arm(pending[0].written + self._pool.deadAfter)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._deadlines.cancel()
        pending, self.pending = list(self.pending), deque()
        self._pool._lost(self)
        message = f"the connection to Redis was lost: {reason.getErrorMessage()}"
        for command in pending:
            if not command.result.called:
                command.result.errback(RedisNotConnected(message))
        self.lost.callback(None)


class _RedisFactory(Factory):
    noisy = False

    def __init__(self, pool: RedisPool) -> None:
        self._pool = pool

    def buildProtocol(self, addr: object) -> RedisConnection:
        return RedisConnection(self._pool)


def redisEndpoint(reactor: Any, address: RedisAddress, timeout: float) -> Any:
    """
    A client endpoint for C{address}: an IP literal is connected to
    directly, a name is resolved on each connection.
    """
    try:
        ip = ipaddress.ip_address(address.host)
    except ValueError:
        return HostnameEndpoint(reactor, address.host, address.port, timeout=timeout)
    kind = TCP6ClientEndpoint if ip.version == 6 else TCP4ClientEndpoint
    return kind(reactor, address.host, address.port, timeout=timeout)


class RedisPool:
    """
    A few pipelined connections to one Redis server, opened when needed:
    each command goes on the connection with the fewest waiting, so the
    commands of concurrent requests share connections and each takes one
    round trip.

    While no connection is open, commands wait for one; the wait counts
    against their timeout.  A command fails with L{RedisNotConnected} at
    once if no connection can be made.  Nothing is logged: callers decide
    what a failure means.

    @ivar timeout: seconds a command may wait for its reply, from its write.
    @ivar deadAfter: seconds a connection with commands waiting may stay
        silent before it is dropped.
    """

    def __init__(
        self,
        reactor: Any,
        address: RedisAddress,
        timeout: float,
        setup: Sequence[Sequence[str | bytes | int]] = (),
        size: int = DEFAULT_POOL_SIZE,
        endpoint: Any = None,
    ) -> None:
        self.reactor = reactor
        self.address = address
        self.timeout = timeout
        self.deadAfter = max(1.0, 4 * timeout)
        self._setup = [encodeCommand(*command) for command in setup]
        self._size = size
        self._endpoint = endpoint or redisEndpoint(reactor, address, self.deadAfter)
        self.connections: list[RedisConnection] = []
        self._attempts: list[Deferred[Any]] = []
        self._waiting: deque[_Command] = deque()
        self._waitDeadlines = _Deadlines(reactor, self._waiting, self._waitExpired)
        self._closed = False

    def execute(self, *args: str | bytes | int) -> Deferred[Reply]:
        """
        Send one command; fire with its reply.
        """
        command = _Command(encodeCommand(*args))
        if self._closed:
            command.result.errback(RedisNotConnected("the pool is closed"))
            return command.result
        if len(self.connections) + len(self._attempts) < self._size:
            self.connect()
        connections = self.connections
        if connections:
            best = connections[0]
            for connection in connections:
                if len(connection.pending) < len(best.pending):
                    best = connection
            best.send(command)
        else:
            command.deadline = self.reactor.seconds() + self.timeout
            self._waiting.append(command)
            self._waitDeadlines.arm()
        return command.result

    def connect(self) -> None:
        """
        Open connections until there are as many as the pool holds (or
        attempts under way for them).
        """
        missing = self._size - len(self.connections) - len(self._attempts)
        # A bounded loop: an attempt that fails at once must not retry here.
        for _ in range(missing if not self._closed else 0):
            attempt: Deferred[Any] = self._endpoint.connect(_RedisFactory(self))
            self._attempts.append(attempt)
            attempt.addBoth(self._attempted, attempt)

    def _attempted(self, result: object, attempt: Deferred[Any]) -> None:
        self._attempts.remove(attempt)
        if isinstance(result, Failure) and not self.connections and not self._attempts:
            self._failWaiting(
                RedisNotConnected(f"cannot connect: {result.getErrorMessage()}")
            )

    def _connected(self, connection: RedisConnection) -> None:
        if self._closed:
            connection.transport.loseConnection()
            return
        self.connections.append(connection)
        # Pipelined ahead of every other command: AUTH and SELECT apply to
        # them, and the script is there for their EVALSHA.
        address = self.address
        handshake = []
        if address.password is not None:
            handshake.append(
                encodeCommand("AUTH", address.username, address.password)
                if address.username
                else encodeCommand("AUTH", address.password)
            )
        if address.db:
            handshake.append(encodeCommand("SELECT", address.db))
        for data in [*handshake, *self._setup]:
            command = _Command(data)
            # A failed step shows in the commands after it (NOAUTH,
            # NOSCRIPT), which their callers handle.
            command.result.addErrback(lambda _: None)
            connection.send(command)
        waiting, self._waiting = self._waiting, deque()
        self._waitDeadlines.cancel()
        self._waitDeadlines = _Deadlines(self.reactor, self._waiting, self._waitExpired)
        for command in waiting:
            if not command.result.called:
                connection.send(command)

    def _lost(self, connection: RedisConnection) -> None:
        if connection in self.connections:
            self.connections.remove(connection)

    def _waitExpired(self, expired: list[_Command], due: float) -> None:
        timeout = self.timeout
        for command in expired:
            self._waiting.remove(command)
            command.result.errback(
                RedisTimeout(f"no connection to Redis within {timeout:g} s")
            )
        self._waitDeadlines.arm()

    def _failWaiting(self, reason: Exception) -> None:
        waiting, self._waiting = self._waiting, deque()
        self._waitDeadlines.cancel()
        self._waitDeadlines = _Deadlines(self.reactor, self._waiting, self._waitExpired)
        for command in waiting:
            if not command.result.called:
                command.result.errback(reason)

    def close(self) -> Deferred[None]:
        """
        Close every connection and fail what waits; fire when all are
        closed.
        """
        self._closed = True
        for attempt in list(self._attempts):
            attempt.cancel()
        self._failWaiting(RedisNotConnected("the pool is closed"))
        lost = [connection.lost for connection in self.connections]
        for connection in list(self.connections):
            connection.transport.loseConnection()
        done: Deferred[Any] = gatherResults(lost)
        return done.addCallback(lambda _: None)
