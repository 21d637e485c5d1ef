"""
Request bodies that stream: from the client to the upstream as they
arrive, with backpressure both ways, in a few buffers.

A L{StreamingBody} is the upstream client's body producer
(L{IBodyProducer}) on one side, and the front end's sink on the other:
the front end L{StreamingBody.write}s each piece of body it reads, then
L{StreamingBody.finish}es it (or L{StreamingBody.fail}s it, when the
client goes).  The front end's connection is the body's C{source}, an
L{IPushProducer}: it is paused while more than C{highWater} bytes wait
for the upstream (before the upstream connection is open, or while the
upstream reads slowly), and resumed once they have gone.  So the client is
read only as fast as the upstream takes the body.

twisted.web's request, the front end monedge serves with today, reads a
body whole before the exchange starts, and the exchange sends it as a
L{monedge.upstream.replay.BufferedBody}: a front end that reads bodies as
they come is what feeds a L{StreamingBody}.

Replays (L{monedge.upstream.replay}): a body that has started to stream
cannot be produced again, unless it is small.  The first C{replayLimit}
bytes are kept; a body that ended within them can be sent once more from
its first byte (L{StreamingBody.again}).

Request buffering (a service's C{request-buffering: true}): the exchange
asks the body to L{StreamingBody.buffer} itself, and starts the upstream
request only once it is L{StreamingBody.whenComplete}.  A buffered body
holds its bytes in memory, never on disk, within the service's
max-body-size and a L{BufferBudget} shared by the process: a body that
would take the budget past its size fails with L{BufferFull}.

Trailers: a chunked body's trailer fields, given to L{StreamingBody.finish},
are in L{StreamingBody.trailers} once it is complete, for the upstream
client to send after the last chunk.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

__all__ = [
    "DEFAULT_HIGH_WATER",
    "DEFAULT_REPLAY_LIMIT",
    "BufferBudget",
    "BufferFull",
    "HeldBody",
    "StreamingBody",
]

#: Body bytes held for the upstream before the client is paused.
DEFAULT_HIGH_WATER = 64 * 1024

#: Body bytes kept so that a small body can be sent once more.
DEFAULT_REPLAY_LIMIT = 64 * 1024


class BufferFull(Exception):
    """
    A buffered body would take the process's L{BufferBudget} past its size.
    """


class BufferBudget:
    """
    The bytes of request bodies that may be held in memory at once, over
    the whole process, for services with request buffering.

    @ivar size: the most bytes held at once.
    @ivar held: the bytes held now.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.held = 0

    def take(self, count: int) -> bool:
        """
        Hold C{count} more bytes, if the budget has room for them.
        """
        if self.held + count > self.size:
            return False
        self.held += count
        return True

    def give(self, count: int) -> None:
        """
        C{count} bytes are no longer held.
        """
        self.held -= count


@implementer(IBodyProducer, IPushProducer)
class HeldBody:
    """
    A body held whole in memory, as the pieces it came in (a streamed body
    kept for a replay, or buffered for its service): written piece by
    piece while the consumer takes them, paused with it, and as often as
    asked.  Its pieces are shared, never joined or copied.
    """

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self._pieces = pieces
        self.length = sum(len(piece) for piece in pieces)
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None
        self._next = 0
        self._paused = False

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """
        Write the pieces to C{consumer}: the result fires once all are
        written; cancelling it stops the body.
        """
        self._consumer = consumer
        done = self._done = Deferred(lambda d: self.stopProducing())
        self._write()
        return done

    def _write(self) -> None:
        consumer = self._consumer
        pieces = self._pieces
        while consumer is not None and not self._paused and self._next < len(pieces):
            piece = pieces[self._next]
            self._next += 1
            # The consumer may pause this body within the write.
            consumer.write(piece)
        if self._next >= len(pieces):
            self._consumer = None
            done, self._done = self._done, None
            if done is not None:
                done.callback(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._write()

    def stopProducing(self) -> None:
        self._consumer = None
        done, self._done = self._done, None
        if done is not None and not done.called:
            done.errback(Failure(CancelledError()))

    def replayable(self) -> bool:
        """
        Always: it is held whole.
        """
        return True

    def again(self) -> HeldBody:
        """
        The same body, from its first byte.
        """
        return HeldBody(self._pieces)


@implementer(IBodyProducer, IPushProducer)
class StreamingBody:
    """
    A request body streamed from a client connection (its C{source}) to an
    upstream connection (its consumer, once started).

    @ivar length: the body's declared length (its C{Content-Length}), or
        L{UNKNOWN_LENGTH} for a body the client sends chunked: the
        upstream client then sends it chunked too.
    @ivar received: body bytes received from the client so far.
    @ivar sent: body bytes written to the upstream so far.
    """

    def __init__(
        self,
        length: int | object,
        source: IPushProducer,
        highWater: int = DEFAULT_HIGH_WATER,
        replayLimit: int = DEFAULT_REPLAY_LIMIT,
    ) -> None:
        self.length = length
        self._source = source
        self._highWater = highWater
        self._replayLimit = replayLimit
        self.received = 0
        self.sent = 0
        #: Bytes received and not yet written to the consumer.
        self._pending: deque[bytes] = deque()
        self._pendingBytes = 0
        #: The first replayLimit bytes, while the body fits in them.
        self._kept: list[bytes] | None = []
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None
        self._finished = False
        self._failure: Failure | None = None
        #: The consumer asked for a pause (the upstream reads slowly).
        self._consumerPaused = False
        #: The source is paused by this body.
        self._sourcePaused = False
        self._stopped = False
        #: Called once, when the upstream starts taking the body (or it
        #: starts to be buffered): the front end's C{100 Continue}.
        self.started: Callable[[], None] | None = None
        #: The body's trailer fields, once it is complete.
        self.trailers: Sequence[tuple[bytes, bytes]] = ()
        #: The budget a buffered body's bytes are held in, once buffering.
        self._budget: BufferBudget | None = None
        self._budgeted = 0
        self._completeWaiters: list[Deferred[None]] = []
        #: The whole body, once handed over held (L{held}).
        self._heldBody: HeldBody | None = None

    # The front end's side

    def write(self, data: bytes) -> None:
        """
        The client sent C{data}, the next piece of the body.
        """
        if not data or self._finished or self._stopped:
            return
        budget = self._budget
        if budget is not None and self._consumer is None:
            if not budget.take(len(data)):
                raise BufferFull()
            self._budgeted += len(data)
        self.received += len(data)
        kept = self._kept
        if kept is not None:
            if self.received <= self._replayLimit:
                kept.append(data)
            else:
                self._kept = None
        if self._consumer is not None and not self._consumerPaused:
            self.sent += len(data)
            self._consumer.write(data)
            return
        self._pending.append(data)
        self._pendingBytes += len(data)
        self._checkSource()

    def finish(self, trailers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """
        The client sent the whole body, and then C{trailers}.
        """
        if self._finished or self._stopped:
            return
        self._finished = True
        self.trailers = trailers
        self._checkSource()
        waiters, self._completeWaiters = self._completeWaiters, []
        for waiter in waiters:
            waiter.callback(None)
        self._maybeDone()

    def fail(self, reason: Failure) -> None:
        """
        The body will never be whole (the client went, or sent a malformed
        body): the upstream request fails with C{reason}.
        """
        if self._finished or self._stopped:
            return
        self._finished = True
        self._failure = reason
        self._drop()
        done, self._done = self._done, None
        if done is not None:
            done.errback(reason)
        waiters, self._completeWaiters = self._completeWaiters, []
        for waiter in waiters:
            waiter.errback(reason)

    @property
    def complete(self) -> bool:
        """
        Whether the client has sent the whole body.
        """
        return self._finished and self._failure is None

    # IBodyProducer: the upstream client's side

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        """
        Write the body to C{consumer} (an upstream connection's transport):
        what has come so far, then each piece as it comes.  The result
        fires once the whole body is written, and fails if the client
        fails it; cancelling it stops the body.  The upstream client
        registers the body as its connection's producer meanwhile, and so
        pauses it when the upstream stops reading.
        """
        self._consumer = consumer
        self._done = Deferred(lambda d: self.stopProducing())
        done = self._done
        self._signalStart()
        if self._failure is not None:
            self._done = None
            done.errback(self._failure)
            return done
        self._flush()
        return done

    def pauseProducing(self) -> None:
        """
        The upstream is not reading: hold what comes, and pause the client
        once C{highWater} bytes are held.
        """
        self._consumerPaused = True

    def resumeProducing(self) -> None:
        """
        The upstream reads again: write what is held, and resume the
        client once it has gone.
        """
        self._consumerPaused = False
        self._flush()

    def stopProducing(self) -> None:
        """
        The upstream request is over before the body was written (the
        upstream answered early, failed, or the exchange gave up): drop
        the rest, and read the client no more slowly for it.
        """
        if self._stopped:
            return
        self._stopped = True
        self._drop()
        done, self._done = self._done, None
        self._resumeSource()
        if done is not None and not done.called:
            done.errback(Failure(CancelledError()))

    # Request buffering

    def buffer(self, budget: BufferBudget) -> None:
        """
        Hold the whole body before any of it is sent: the client is no
        longer paused for it, and what is held counts against C{budget}
        (what has come so far too).

        @raise BufferFull: if what has come already does not fit.
        """
        if self._budget is not None:
            return
        if not budget.take(self._pendingBytes):
            raise BufferFull()
        self._budget = budget
        self._budgeted = self._pendingBytes
        self._highWater = 1 << 62
        self._signalStart()
        self._checkSource()

    def whenComplete(self) -> Deferred[None]:
        """
        A L{Deferred} that fires once the client has sent the whole body,
        and fails if it never will.
        """
        if self._failure is not None:
            failed: Deferred[None] = Deferred()
            failed.errback(self._failure)
            return failed
        if self._finished:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._completeWaiters.append(waiter)
        return waiter

    def held(self) -> HeldBody | None:
        """
        The whole body, held, as a producer with a known length, if it is
        complete, has not started to go upstream, and has no trailers
        (which only a chunked upload carries).
        """
        if not self.complete or self._consumer is not None or self.trailers:
            return None
        held = self._heldBody
        if held is not None:
            return held.again()
        # The pieces move to the held body (this body keeps no reference):
        # they are in memory once, until the request is over (L{close}).
        held = self._heldBody = HeldBody(list(self._pending))
        self._pending.clear()
        self._pendingBytes = 0
        return held

    def close(self) -> None:
        """
        The request is over: let go of the body, and give back what it held
        of a buffering budget.
        """
        self._heldBody = None
        self._drop()

    # Replays

    def replayable(self) -> bool:
        """
        Whether the body can be produced again from its first byte: the
        client sent all of it, within the bytes kept for a replay.
        """
        return self.complete and self._kept is not None

    def again(self) -> HeldBody:
        """
        A new producer of the same body, from its first byte.

        @raise ValueError: if the body is not L{replayable}.
        """
        kept = self._kept
        if not self.complete or kept is None:
            raise ValueError("a streamed body can be sent again only if kept whole")
        return HeldBody(kept)

    # Inside

    def _signalStart(self) -> None:
        started, self.started = self.started, None
        if started is not None:
            started()

    def _drop(self) -> None:
        """
        Let go of every byte held.
        """
        self._pending.clear()
        self._pendingBytes = 0
        self._kept = None
        self._release()

    def _release(self) -> None:
        budget = self._budget
        if budget is not None and self._budgeted:
            budget.give(self._budgeted)
            self._budgeted = 0

    def _flush(self) -> None:
        consumer = self._consumer
        if consumer is None or self._stopped:
            return
        while self._pending and not self._consumerPaused:
            data = self._pending.popleft()
            self._pendingBytes -= len(data)
            self.sent += len(data)
            consumer.write(data)
        if not self._pending:
            self._release()
        self._checkSource()
        self._maybeDone()

    def _maybeDone(self) -> None:
        if not self._finished or self._pending or self._failure is not None:
            return
        done, self._done = self._done, None
        if done is not None:
            done.callback(None)

    def _checkSource(self) -> None:
        if self._pendingBytes > self._highWater:
            if not self._sourcePaused and not self._finished:
                self._sourcePaused = True
                self._source.pauseProducing()
        else:
            self._resumeSource()

    def _resumeSource(self) -> None:
        if self._sourcePaused:
            self._sourcePaused = False
            self._source.resumeProducing()
