"""
The benchmark's upstream: a minimal C{twisted.web} server that answers every
request with the 6-byte body C{hello\\n} over HTTP/1.1 keep-alive, with the
access log disabled.

    python bench/upstream.py --port 9000
"""

from __future__ import annotations

import argparse

from twisted.web.resource import Resource
from twisted.web.server import Request, Site

BODY = b"hello\n"


class Hello(Resource):
    """
    Answers every path and method with L{BODY}.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return BODY


def main(argv: list[str] | None = None) -> None:
    """
    Listen on 127.0.0.1 and serve until terminated.
    """
    parser = argparse.ArgumentParser(description="The benchmark's upstream.")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    site = Site(Hello())
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(args.port, site, backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
