"""
Client endpoints for upstream addresses, built once and reused: IP literals
connect directly (no name resolution per connection), names go through
L{HostnameEndpoint}, C{https} wraps TLS with the service's settings
(L{UpstreamTLS}).
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass
from typing import Any

from OpenSSL import SSL
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    optionsForClientTLS,
    trustRootFromCertificates,
)

#: Endpoint objects kept for reuse (more are rebuilt, not leaked).
MAX_ENDPOINTS = 4096


class UpstreamTLSError(Exception):
    """
    A service's upstream TLS settings cannot be used (a file that does not
    load); the message says which.
    """


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    """
    How to talk TLS to a service's C{https} endpoints.

    @ivar ca: a PEM bundle of the certificate authorities to trust; L{None}
        for the system's trust store.
    @ivar serverName: the name sent as SNI and verified in the
        certificate; L{None} for the endpoint's host.
    @ivar clientCertificate: a PEM file (key, then certificate) presented
        to the upstream (mutual TLS); L{None} for none.
    """

    ca: str | None = None
    serverName: str | None = None
    clientCertificate: str | None = None


_files: dict[str, tuple[tuple[float, int], bytes]] = {}


def _stamp(path: str) -> tuple[float, int]:
    """
    What tells a file's versions apart: its modification time and size.
    """
    info = os.stat(path)
    return info.st_mtime, info.st_size


def _read(path: str) -> bytes:
    """
    A file's bytes, cached until it changes.
    """
    try:
        stamp = _stamp(path)
        cached = _files.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UpstreamTLSError(f"{path}: {e.strerror}") from None
    _files[path] = (stamp, data)
    return data


def clientTLS(settings: UpstreamTLS, host: str, alpn: tuple[bytes, ...] = ()) -> Any:
    """
    The TLS connection creator for an endpoint at C{host}, offering the
    protocols C{alpn} (none: no ALPN).

    @raise UpstreamTLSError: if a file does not load.
    """
    trustRoot: Any = None
    client: Any = None
    try:
        if settings.ca is not None:
            authorities = [
                Certificate.loadPEM(pem)
                for pem in re.findall(
                    rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
                    _read(settings.ca),
                    re.DOTALL,
                )
            ]
            if not authorities:
                raise UpstreamTLSError(f"{settings.ca}: no certificate")
            trustRoot = trustRootFromCertificates(authorities)
        if settings.clientCertificate is not None:
            client = PrivateCertificate.loadPEM(_read(settings.clientCertificate))
    except (SSL.Error, ValueError, TypeError) as e:
        raise UpstreamTLSError(f"cannot load the upstream TLS files: {e}") from None
    return optionsForClientTLS(
        settings.serverName or host,
        trustRoot=trustRoot,
        clientCertificate=client,
        acceptableProtocols=list(alpn) or None,
    )


def clientEndpoint(
    reactor: Any,
    scheme: bytes,
    host: bytes,
    port: int,
    timeout: float,
    tls: UpstreamTLS | None = None,
    alpn: tuple[bytes, ...] = (),
) -> IStreamClientEndpoint:
    """
    A new endpoint for C{scheme://host:port} with a connect C{timeout}
    (offering C{alpn} over TLS).

    @raise UpstreamTLSError: for C{https}, if C{tls}'s files do not load.
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
        endpoint = wrapClientTLS(clientTLS(tls or UpstreamTLS(), text, alpn), endpoint)
    return endpoint


class EndpointCache:
    """
    Endpoints by address and connect timeout, bounded.
    """

    def __init__(self, reactor: Any) -> None:
        self._reactor = reactor
        self._endpoints: dict[
            tuple[bytes, bytes, int, float, UpstreamTLS | None, tuple[bytes, ...]],
            IStreamClientEndpoint,
        ] = {}

    def get(
        self,
        scheme: bytes,
        host: bytes,
        port: int,
        timeout: float,
        tls: UpstreamTLS | None = None,
        alpn: tuple[bytes, ...] = (),
    ) -> IStreamClientEndpoint:
        """
        The endpoint for C{scheme://host:port}, built on first use (TLS
        files are read again when they change), offering C{alpn} over TLS.

        @raise UpstreamTLSError: if C{tls}'s files do not load.
        """
        if scheme != b"https":
            tls = None
            alpn = ()
        key = (scheme, host, port, timeout, tls, alpn)
        endpoint = self._endpoints.get(key)
        if endpoint is None or (tls is not None and self._stale(tls)):
            if len(self._endpoints) >= MAX_ENDPOINTS:
                self._endpoints.clear()
            endpoint = self._endpoints[key] = clientEndpoint(
                self._reactor, scheme, host, port, timeout, tls, alpn
            )
        return endpoint

    def _stale(self, tls: UpstreamTLS) -> bool:
        for path in (tls.ca, tls.clientCertificate):
            if path is None:
                continue
            cached = _files.get(path)
            try:
                stamp = _stamp(path)
            except OSError:
                return True
            if cached is None or cached[0] != stamp:
                return True
        return False
