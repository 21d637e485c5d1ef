"""
Shared machinery for end-to-end tests: a real C{twistd monedge} process,
real upstreams and real clients, all on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import treq
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from monedge.testing import ProxyProcess, RecordingUpstream, Responder, writeRegistry

__all__ = ["ProxyTestCase", "deferRaw", "rawExchange", "readUntilClosed"]


class ProxyTestCase(TestCase):
    """
    A test case with helpers to start upstreams and a proxy process, each
    cleaned up after the test.
    """

    timeout = 120

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.registryPath = os.path.join(self.directory, "services.yaml")
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.http = treq.client.HTTPClient(Agent(reactor, pool=self.pool))

    def startUpstream(self, responder: Responder | None = None) -> RecordingUpstream:
        """
        A recording upstream on a free port, stopped after the test.
        """
        upstream = RecordingUpstream(responder)
        upstream.start(reactor)
        self.addCleanup(upstream.stop)
        return upstream

    def writeServices(self, services: Mapping[str, Mapping[str, Any]]) -> None:
        """
        (Re)write the proxy's static registry file.
        """
        writeRegistry(self.registryPath, services)

    async def startProxy(
        self,
        services: Mapping[str, Mapping[str, Any]],
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> ProxyProcess:
        """
        Write the registry and start a proxy on it (with C{env} added to its
        environment); stopped after the test.
        """
        self.writeServices(services)
        # Tests stop their proxy at once unless they test draining.
        quick = ["--drain-delay", "0s", "--drain-timeout", "10s"]
        proxy = ProxyProcess(self.registryPath, self.directory, [*quick, *args], env)
        self.addCleanup(proxy.stop)
        await proxy.start()
        return proxy

    async def get(self, url: str, **kwargs: Any) -> tuple[Any, bytes]:
        """
        GET C{url}; return the response and its whole body.
        """
        response = await self.http.get(url, **kwargs)
        body = await response.content()
        return response, body

    async def curl(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        """
        Run curl (in a thread, so the reactor keeps serving upstreams).
        """
        return await threads.deferToThread(
            subprocess.run,
            ["curl", "--silent", "--show-error", "--max-time", "30", *args],
            capture_output=True,
            timeout=60,
        )


def rawExchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """
    Send C{data} on a fresh connection and read until the server closes it
    or C{timeout} passes with nothing more.  Blocking: call it in a thread.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return readUntilClosed(s)


def readUntilClosed(s: socket.socket) -> bytes:
    """
    Read from C{s} until the server closes it, resets it, or the socket's
    timeout passes with nothing more.  Blocking: call it in a thread.
    """
    chunks = []
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def deferRaw(port: int, data: bytes, timeout: float = 5.0) -> Deferred[bytes]:
    """
    L{rawExchange} in a thread.
    """
    return threads.deferToThread(rawExchange, port, data, timeout)
