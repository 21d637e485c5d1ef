"""
A floor for any Twisted proxy: a raw TCP relay on Twisted's reactor.

    python bench/relay.py --port 8000 --upstream-port 9000

Each client connection gets its own upstream connection, and bytes are
copied both ways as they arrive: no HTTP parsing, routing, pooling, headers,
logging or metrics. The CPU it spends per proxied request (measure it with
bench/cpu.sh) is what the reactor and the four socket operations of a
proxied request cost on their own. See docs/performance.md.
"""

from __future__ import annotations

import argparse
from typing import Any

from twisted.internet import protocol
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol


class Back(protocol.Protocol):
    """
    The upstream side: bytes go to the client as they arrive.
    """

    def __init__(self, front: Front) -> None:
        self.front = front

    def connectionMade(self) -> None:
        self.front.upstreamReady(self)

    def dataReceived(self, data: bytes) -> None:
        self.front.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.front.transport.loseConnection()  # type: ignore[union-attr]


class Front(protocol.Protocol):
    """
    The client side: bytes go upstream once that connection is open.
    """

    def __init__(self, reactor: Any, upstreamPort: int) -> None:
        self.reactor = reactor
        self.upstreamPort = upstreamPort
        self.back: Back | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.upstreamPort)
        connectProtocol(endpoint, Back(self)).addErrback(
            lambda _: self.transport.loseConnection()  # type: ignore[union-attr]
        )

    def upstreamReady(self, back: Back) -> None:
        self.back = back
        if self.pending:
            back.transport.write(b"".join(self.pending))  # type: ignore[union-attr]
            self.pending = []

    def dataReceived(self, data: bytes) -> None:
        if self.back is None:
            self.pending.append(data)
        else:
            self.back.transport.write(data)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if self.back is not None:
            self.back.transport.loseConnection()  # type: ignore[union-attr]


def main() -> None:
    from twisted.internet import reactor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args()
    factory = protocol.Factory.forProtocol(
        lambda: Front(reactor, args.upstream_port)  # type: ignore[arg-type]
    )
    reactor.listenTCP(args.port, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
