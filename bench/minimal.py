"""
A minimal reverse proxy on Twisted's Agent and a persistent
HTTPConnectionPool, streaming bodies with backpressure: the baseline the
performance issue compares monedge against ("a minimal ~100-line Agent +
HTTPConnectionPool streaming proxy").  No routing, no header policy, no
limits, no logging: every request to /bench/<rest> goes to the upstream's
/<rest>.

    python bench/minimal.py --port 9300 --upstream-port 9101

With C{--client fast} it sends through monedge's own upstream client
(L{monedge.upstream.client.FastUpstreamClient}) instead of C{Agent}: the floor of a
C{twisted.web} resource-tree proxy on monedge's data path, with none of
monedge's features (docs/performance.md, "How close the floor is").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"proxy-connection",
    b"te",
    b"trailer",
    b"transfer-encoding",
    b"upgrade",
    b"content-length",
}


class Relay(Protocol):
    """
    Streams the upstream body to the client, pausing the upstream when the
    client is slow.
    """

    def __init__(self, request: Request) -> None:
        self.request = request

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Failure = Failure(Exception())) -> None:  # noqa: B008
        self.request.unregisterProducer()
        if not self.request._disconnected:
            self.request.finish()


class Proxy(Resource):
    """
    Every request goes to the upstream, with the /bench prefix removed.
    """

    isLeaf = True

    def __init__(self, agent: Any, upstream: bytes) -> None:
        super().__init__()
        self.agent = agent
        self.upstream = upstream

    def render(self, request: Request) -> int:  # type: ignore[override]
        path = request.uri.removeprefix(b"/bench")
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in HOP_BY_HOP:
                headers.setRawHeaders(name, values)
        content = request.content
        body = None
        if content is not None and content.seek(0, 2):
            content.seek(0)
            body = FileBodyProducer(content)
        d = self.agent.request(request.method, self.upstream + path, headers, body)

        def respond(response: Any) -> None:
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in HOP_BY_HOP:
                    request.responseHeaders.setRawHeaders(name, values)
            if response.length is not None and isinstance(response.length, int):
                request.setHeader(b"content-length", b"%d" % (response.length,))
            response.deliverBody(Relay(request))

        def fail(failure: Failure) -> None:
            if not request._disconnected:
                request.setResponseCode(502)
                request.finish()

        d.addCallbacks(respond, fail)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET


class _Fast:
    """
    monedge's upstream client behind C{Agent}'s C{request} signature.
    """

    def __init__(self, client: Any) -> None:
        self.client = client

    def request(
        self, method: bytes, url: bytes, headers: Headers, body: Any
    ) -> Deferred[Any]:
        d: Deferred[Any] = self.client.request(method, url, headers, body, 10.0)
        return d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--client", choices=["agent", "fast"], default="agent")
    args = parser.parse_args()
    client: Any
    if args.client == "fast":
        # This tree's client, as bench/run.py's monedge is this tree's.
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from monedge.upstream.client import FastUpstreamClient

        client = _Fast(FastUpstreamClient(reactor))
    else:
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 256
        client = Agent(reactor, pool=pool)
    site = Site(Proxy(client, b"http://127.0.0.1:%d" % args.upstream_port))
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(args.port, site, interface="127.0.0.1", backlog=1024)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
