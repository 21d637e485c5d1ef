"""
The baseline proxy: Twisted's own L{twisted.web.proxy.ReverseProxyResource}
as the root of a L{Site}, forwarding every path unchanged to the upstream
(so C{/bench/} reaches it as C{/bench/}), with logging disabled: no access
log, and no "Starting factory" line for each upstream connection.

    python bench/rpr.py --port 9100 --upstream-port 9000
"""

from __future__ import annotations

import argparse

from twisted.web.proxy import ProxyClientFactory, ReverseProxyResource
from twisted.web.server import Site


def main(argv: list[str] | None = None) -> None:
    """
    Listen on 127.0.0.1 and proxy until terminated.
    """
    parser = argparse.ArgumentParser(description="ReverseProxyResource baseline.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    # ReverseProxyResource opens one client connection per request, and
    # its factory would log twice for each: silence it, as monedge is run
    # with --access-log none.
    ProxyClientFactory.noisy = False
    site = Site(ReverseProxyResource("127.0.0.1", args.upstream_port, b""))
    site.log = lambda request: None  # type: ignore[method-assign]
    reactor.listenTCP(args.port, site, backlog=1024, interface="127.0.0.1")  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
