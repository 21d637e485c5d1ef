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
"""

from __future__ import annotations

from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

__all__ = ["DEFAULT_HIGH_WATER", "DEFAULT_REPLAY_LIMIT", "HeldBody", "StreamingBody"]

#: Body bytes held for the upstream before the client is paused.
DEFAULT_HIGH_WATER = 64 * 1024

#: Body bytes kept so that a small body can be sent once more.
DEFAULT_REPLAY_LIMIT = 64 * 1024


@implementer(IBodyProducer)
class HeldBody:
    """
    A small body held whole in memory (a streamed body kept for a replay):
    written in one piece, and as often as asked.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def replayable(self) -> bool:
        """
        Always: it is held whole.
        """
        return True

    def again(self) -> HeldBody:
        """
        The same body, from its first byte.
        """
        return HeldBody(self._data)


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
        self._pending: list[bytes] = []
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

    # The front end's side

    def write(self, data: bytes) -> None:
        """
        The client sent C{data}, the next piece of the body.
        """
        if not data or self._finished or self._stopped:
            return
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

    def finish(self) -> None:
        """
        The client sent the whole body.
        """
        if self._finished or self._stopped:
            return
        self._finished = True
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
        self._pending.clear()
        self._pendingBytes = 0
        self._kept = None
        done, self._done = self._done, None
        if done is not None:
            done.errback(reason)

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
        self._pending.clear()
        self._pendingBytes = 0
        self._kept = None
        done, self._done = self._done, None
        self._resumeSource()
        if done is not None and not done.called:
            done.errback(Failure(CancelledError()))

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
        return HeldBody(b"".join(kept))

    # Inside

    def _flush(self) -> None:
        consumer = self._consumer
        if consumer is None or self._stopped:
            return
        while self._pending and not self._consumerPaused:
            data = self._pending.pop(0)
            self._pendingBytes -= len(data)
            self.sent += len(data)
            consumer.write(data)
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
