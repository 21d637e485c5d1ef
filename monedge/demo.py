"""
A small demo upstream: answers every request with a JSON description of
what it received.  C{make run} starts two of these behind monedge.

    python -m monedge.demo --listen tcp:9001:interface=127.0.0.1 --name echo-9001
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from twisted.internet.endpoints import serverFromString
from twisted.web.resource import Resource
from twisted.web.server import Request

from monedge.testing import QuietSite


class EchoResource(Resource):
    """
    Describes the request it received, as JSON.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def render(self, request: Request) -> bytes:
        body = request.content.read() if request.content is not None else b""
        document = {
            "upstream": self.name,
            "method": request.method.decode("ascii", "replace"),
            "path": request.uri.decode("utf-8", "backslashreplace"),
            "headers": {
                name.decode("ascii", "replace").lower(): [
                    v.decode("utf-8", "backslashreplace") for v in values
                ]
                for name, values in request.requestHeaders.getAllRawHeaders()
            },
            "body_bytes": len(body),
        }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(document, indent=2, sort_keys=True).encode("utf-8") + b"\n"


def main(argv: list[str] | None = None, reactor: Any = None) -> None:
    """
    Run one echo upstream until interrupted.
    """
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", action="append", required=True)
    parser.add_argument("--name", default="echo")
    args = parser.parse_args(argv)
    if reactor is None:
        from twisted.internet import reactor as globalReactor

        reactor = globalReactor
    site = QuietSite(EchoResource(args.name))
    for description in args.listen:
        serverFromString(reactor, description).listen(site)
    reactor.run()


if __name__ == "__main__":
    main()
