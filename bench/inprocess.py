"""
monedge's CPU cost per request with no system calls: a deterministic
measure for telling small optimisations apart, where bench/cpu.sh's noise
(about 10% between runs) hides them.

The proxy is built by C{monedge.runtime.compose.makeService}, the composition
root twistd uses, from the given options (every default feature on, the
access log written to C{/dev/null}), on a memory reactor.  Each request
is fed to a client connection's protocol over a L{StringTransport}; the
real upstream client sends it over a memory transport, whose peer answers with a 6-byte 200 at once.  It reports the
CPU microseconds per request (the median of several rounds), and with
C{--profile} a cProfile of one round.

    .venv/bin/python bench/inprocess.py [--requests N] [--rounds R]
        [--profile] [--floor] [-- extra monedge options]

With C{--floor} it measures C{bench/minimal.py --client fast}'s resource
instead of monedge: the same measure for the floor.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: What wrk sends: a Host header only.
REQUEST = b"GET /bench/ HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 6\r\n"
    b"Date: Fri, 04 Dec 2026 15:00:00 GMT\r\nServer: upstream\r\n\r\nhello\n"
)
UPSTREAM = ("127.0.0.1", 9101)


class _UpstreamTransport(StringTransport):
    """
    The upstream's end of a memory connection: a complete request written
    to it queues its connection for an answer.
    """

    def __init__(self, reactor: _Reactor, protocol: Any) -> None:
        super().__init__(
            hostAddress=IPv4Address("TCP", "127.0.0.1", 50000),
            peerAddress=IPv4Address("TCP", *UPSTREAM),
        )
        self._reactor = reactor
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        if data.endswith(b"\r\n\r\n"):
            self._reactor.waiting.append(self._protocol)

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))


class _Reactor(MemoryReactorClock):
    """
    A memory reactor whose TCP connections are made at once, to an
    upstream that answers every request with L{RESPONSE}.
    """

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []

    def connectTCP(self, host: str, port: int, factory: Any, *a: Any, **k: Any) -> Any:
        connector = super().connectTCP(host, port, factory, *a, **k)
        protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        protocol.makeConnection(_UpstreamTransport(self, protocol))
        return connector

    def answer(self) -> None:
        waiting, self.waiting = self.waiting, []
        for protocol in waiting:
            protocol.dataReceived(RESPONSE)


def monedgeSite(reactor: _Reactor, extra: list[str], directory: Path) -> Any:
    from monedge.edge.server import ListenerFactory
    from monedge.runtime.compose import makeService
    from monedge.tap import Options

    registry = directory / "services.yaml"
    registry.write_text(
        "services:\n  service.api.bench:\n"
        f'    endpoints: ["{UPSTREAM[0]}:{UPSTREAM[1]}"]\n'
    )
    options = Options()
    options.parseOptions(
        [
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--admin-port",
            "tcp:0:interface=127.0.0.1",
            "--registry",
            f"static:{registry}",
            "--access-log",
            "/dev/null",
            *extra,
        ]
    )
    service = makeService(options.config, reactor)
    service.startService()
    for listener in service.listeners:  # type: ignore[attr-defined]
        factory = listener.factory
        if isinstance(factory, ListenerFactory):
            return factory
    raise RuntimeError("no proxy listener")


def floorSite(reactor: _Reactor) -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    from minimal import Proxy, _Fast  # type: ignore[import-not-found]
    from twisted.web.server import Site

    from monedge.upstream.client import FastUpstreamClient

    upstream = b"http://%s:%d" % (UPSTREAM[0].encode(), UPSTREAM[1])
    site = Site(Proxy(_Fast(FastUpstreamClient(reactor)), upstream), reactor=reactor)
    site.log = lambda request: None  # type: ignore[method-assign]
    return site


def run(factory: Any, reactor: _Reactor, requests: int) -> float:
    """
    Send C{requests} requests on one connection; the CPU seconds taken.
    """
    peer = IPv4Address("TCP", "127.0.0.1", 40000)
    protocol = factory.buildProtocol(peer)
    client = StringTransport(
        hostAddress=IPv4Address("TCP", "127.0.0.1", 8080), peerAddress=peer
    )
    protocol.makeConnection(client)
    start = time.process_time()
    for _ in range(requests):
        protocol.dataReceived(REQUEST)
        reactor.answer()
        if not client.io.tell():
            raise RuntimeError("no response")
        client.clear()
    spent = time.process_time() - start
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--floor", action="store_true")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args()
    import tempfile

    reactor = _Reactor()
    with tempfile.TemporaryDirectory() as directory:
        factory = (
            floorSite(reactor)
            if args.floor
            else monedgeSite(reactor, args.extra, Path(directory))
        )
        first = run(factory, reactor, 200)
        del first
        check = StringTransport()
        del check
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            run(factory, reactor, args.requests)
            profiler.disable()
            stats = pstats.Stats(profiler)
            stats.sort_stats("tottime").print_stats(args.top)
            stats.sort_stats("cumulative").print_stats(args.top)
            byFile: dict[str, float] = {}
            for (path, _, _), (_, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
                key = path.rsplit("site-packages/", 1)[-1]
                byFile[key] = byFile.get(key, 0.0) + tottime
            for key, spent in sorted(byFile.items(), key=lambda kv: -kv[1])[:25]:
                print(f"{spent / args.requests * 1e6:8.2f} us  {key}")
            return
        rounds = [run(factory, reactor, args.requests) for _ in range(args.rounds)]
    perRequest = [r / args.requests * 1e6 for r in rounds]
    print(
        f"{statistics.median(perRequest):.1f} us CPU per request "
        f"(median of {args.rounds} rounds of {args.requests}; "
        f"min {min(perRequest):.1f}, max {max(perRequest):.1f})"
    )


if __name__ == "__main__":
    main()
