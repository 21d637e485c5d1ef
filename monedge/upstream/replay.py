"""
Which requests may be sent twice, and bodies that can be.

The upstream client (L{monedge.upstream.client}) sends a request again,
once, on a new connection when the pooled keep-alive connection it went
out on turns out to have been closed before any byte of the response came
back.  That is safe only for an idempotent method (RFC 9110, section
9.2.2) whose body, if it has one, can be produced again from its first
byte: L{mayReplay} is that rule, and L{bodyAgain} makes such a body.  A
L{BufferedBody} can always be produced again; a streamed body
(L{monedge.upstream.streaming.StreamingBody}) only if the client sent it
whole within the bytes kept for a replay, which is known only when the
connection is found stale.
"""

from __future__ import annotations

from typing import IO, Any, Protocol, cast

from twisted.internet import task
from twisted.web.client import FileBodyProducer
from twisted.web.iweb import IBodyProducer

__all__ = [
    "BufferedBody",
    "IDEMPOTENT",
    "NotReplayable",
    "Replayable",
    "bodyAgain",
    "mayReplay",
]

#: The idempotent methods (RFC 9110, section 9.2.2).
IDEMPOTENT = frozenset([b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"])


class _KeptOpen:
    """
    A file whose C{close} is ignored: L{FileBodyProducer} closes its input
    when done, and a body that may be sent again must stay readable.
    """

    def __init__(self, content: IO[bytes]) -> None:
        self._content = content

    def read(self, size: int = -1) -> bytes:
        return self._content.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._content.seek(offset, whence)

    def tell(self) -> int:
        return self._content.tell()

    def close(self) -> None:
        pass


class BufferedBody(FileBodyProducer):
    """
    A request body held in full before it is sent (twisted.web reads the
    whole body before a resource renders), which can therefore be sent
    again: see L{again}.
    """

    def __init__(self, content: IO[bytes], cooperator: Any = task) -> None:
        content.seek(0, 0)
        super().__init__(_KeptOpen(content), cooperator)
        self._content = content
        self._cooperator = cooperator

    def replayable(self) -> bool:
        """
        Always: the body is held whole.
        """
        return True

    def again(self) -> BufferedBody:
        """
        A new producer of the same body, from its first byte.
        """
        return BufferedBody(self._content, self._cooperator)


class Replayable(Protocol):
    """
    A body that may be produced again from its first byte, when it says
    so.
    """

    def replayable(self) -> bool:
        """
        Whether L{again} may be called now.
        """

    def again(self) -> IBodyProducer:
        """
        A new producer of the same body, from its first byte.
        """


def mayReplay(method: bytes, body: IBodyProducer | None) -> bool:
    """
    Whether a request may be sent again after its connection was found
    closed before any of the response: its method is idempotent and its
    body, if any, is one that may be produced again (L{Replayable}; whether
    it can be by then, L{bodyAgain} says).
    """
    # An attribute test, not isinstance on a Protocol (this runs per request).
    return method in IDEMPOTENT and (body is None or hasattr(body, "replayable"))


class NotReplayable(Exception):
    """
    The body cannot be produced again now: it streamed, and was not kept
    whole.
    """


def bodyAgain(body: IBodyProducer | None) -> IBodyProducer | None:
    """
    The body to send again: L{None} for none, else a new producer of
    C{body}.

    @raise NotReplayable: if C{body} cannot be produced again now (a
        streamed body not kept whole).
    """
    if body is None:
        return None
    if hasattr(body, "replayable"):
        replayable = cast(Replayable, body)
        if replayable.replayable():
            return replayable.again()
    raise NotReplayable()
