"""
Client endpoints for upstream addresses, built once and reused: IP literals
connect directly (no name resolution per connection), names go through
L{HostnameEndpoint}, C{https} wraps TLS.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import optionsForClientTLS

#: Endpoint objects kept for reuse (more are rebuilt, not leaked).
MAX_ENDPOINTS = 4096


def clientEndpoint(
    reactor: Any, scheme: bytes, host: bytes, port: int, timeout: float
) -> IStreamClientEndpoint:
    """
    A new endpoint for C{scheme://host:port} with a connect C{timeout}.
    """
    text = host.decode("ascii")
    endpoint: IStreamClientEndpoint
    try:
        version = ipaddress.ip_address(text).version
    except ValueError:
        endpoint = HostnameEndpoint(reactor, host, port, timeout=timeout)
    else:
        kind = TCP4ClientEndpoint if version == 4 else TCP6ClientEndpoint
        endpoint = kind(reactor, text, port, timeout=timeout)
    if scheme == b"https":
        endpoint = wrapClientTLS(optionsForClientTLS(text), endpoint)
    return endpoint


class EndpointCache:
    """
    Endpoints by address and connect timeout, bounded.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._endpoints: dict[
            tuple[bytes, bytes, int, float], IStreamClientEndpoint
        ] = {}

    def get(
        self, scheme: bytes, host: bytes, port: int, timeout: float
    ) -> IStreamClientEndpoint:
        """
        The endpoint for C{scheme://host:port}, built on first use.
        """
        key = (scheme, host, port, timeout)
        endpoint = self._endpoints.get(key)
        if endpoint is None:
            if len(self._endpoints) >= MAX_ENDPOINTS:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = clientEndpoint(
                self._reactor, scheme, host, port, timeout
            )
        return endpoint
