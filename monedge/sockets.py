"""
Writes that go to the socket at once.

Twisted's TCP transports buffer every C{write} and send it on the next
reactor iteration: C{startWriting} asks epoll to watch the socket for
writability, the next C{epoll_wait} says it is, C{doWrite} sends, and
C{stopWriting} asks epoll to stop watching.  That is two C{epoll_ctl}
system calls, a reactor iteration and a good deal of Python for every
write, and a proxied request makes two writes (upstream and back), each on
an otherwise idle keep-alive connection whose kernel buffer has room.

L{sendAtOnce} gives one transport a C{write} that, when nothing is waiting
in its buffer, sends at once and buffers only what the kernel did not
take.  Everything else (flow control, producers, half-close, errors) stays
Twisted's: a failed or partial send falls back to the buffered path, which
finds the error or sends the rest as before.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.tcp import Connection

__all__ = ["sendAtOnce"]


def sendAtOnce(transport: Any) -> None:
    """
    Make C{transport} send what it is given at once when its buffer is
    empty.  A transport that is not a plain Twisted TCP connection (TLS, a
    test's L{StringTransport}) is left as it is.
    """
    # Not hasattr(transport, "socket"): a TLS transport hands attribute
    # lookups on to the TCP connection beneath it.
    if not isinstance(transport, Connection):
        return
    send = transport.socket.send
    buffered = type(transport).write.__get__(transport)

    def write(data: bytes) -> None:
        if (
            data
            and not transport._tempDataBuffer
            and transport.offset == len(transport.dataBuffer)
            and transport.connected
            and not transport.disconnecting
            and not transport._writeDisconnected
            and not transport._writeDisconnecting
        ):
            try:
                sent = send(data)
            except OSError:
                # EAGAIN, or a real error the buffered path will report.
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        buffered(data)

    def writeSequence(iovec: Iterable[bytes]) -> None:
        write(b"".join(iovec))

    transport.write = write  # type: ignore[method-assign]
    transport.writeSequence = writeSequence  # type: ignore[method-assign]
