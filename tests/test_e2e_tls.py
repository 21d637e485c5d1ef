"""
End-to-end TLS termination: a real C{twistd monedge} with C{--tls-port} and
C{--tls-dir}, certificates made at test time, and real TLS clients (Python's
C{ssl} and curl) on 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time

from cryptography import x509
from twisted.internet import threads

from monedge.testing import ProxyProcess, freePort
from monedge.testing.tls import CertificateAuthority
from tests.e2e import ProxyTestCase


def _peerNames(port: int, serverName: str | None, caFile: str) -> list[str]:
    """
    Connect with C{serverName} as SNI (none if None); the DNS names of the
    certificate presented.
    """
    context = ssl.create_default_context(cafile=caFile)
    context.check_hostname = False
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=serverName) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    certificate = x509.load_der_x509_certificate(der)
    sans = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return sans.value.get_values_for_type(x509.DNSName)


class TLSTests(ProxyTestCase):
    """
    monedge terminates TLS with the certificate each client asks for.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ca = CertificateAuthority()
        self.caFile = os.path.join(self.directory, "ca.pem")
        with open(self.caFile, "wb") as f:
            f.write(self.ca.certificatePEM)
        self.tlsDir = os.path.join(self.directory, "tls")
        os.makedirs(self.tlsDir)
        self.write("default.pem", ["default.example"])
        self.write("api.pem", ["api.example.com"])
        self.write("apps.pem", ["*.apps.example.com"])
        self.tlsPort = freePort()

    def write(self, name: str, names: list[str], pem: bytes | None = None) -> None:
        path = os.path.join(self.tlsDir, name)
        temporary = path + ".tmp"
        with open(temporary, "wb") as f:
            f.write(pem if pem is not None else self.ca.issue(names))
        os.replace(temporary, path)

    async def startTLS(self, upstream: str) -> ProxyProcess:
        return await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream]}},
            [
                "--tls-port",
                f"tcp:{self.tlsPort}:interface=127.0.0.1",
                "--tls-dir",
                self.tlsDir,
            ],
        )

    def names(self, serverName: str | None) -> list[str]:
        return _peerNames(self.tlsPort, serverName, self.caFile)

    async def test_sniSelection(self) -> None:
        """
        Each SNI name gets its certificate; a wildcard covers one label; no
        SNI, or an unknown name, gets default.pem's.
        """
        upstream = self.startUpstream()
        await self.startTLS(upstream.address)

        def run() -> list[list[str]]:
            return [
                self.names("api.example.com"),
                self.names("shop.apps.example.com"),
                self.names("other.example"),
                self.names(None),
            ]

        self.assertEqual(
            await threads.deferToThread(run),
            [
                ["api.example.com"],
                ["*.apps.example.com"],
                ["default.example"],
                ["default.example"],
            ],
        )

    async def test_curl(self) -> None:
        """
        curl over TLS, verifying the certificate against the test CA, gets
        the upstream's answer; the upstream sees X-Forwarded-Proto https
        and the TLS listener's port.
        """
        upstream = self.startUpstream()
        await self.startTLS(upstream.address)
        result = await self.curl(
            "--cacert",
            self.caFile,
            "--resolve",
            f"api.example.com:{self.tlsPort}:127.0.0.1",
            "--http1.1",
            "--write-out",
            "\n%{http_code} %{ssl_verify_result}",
            f"https://api.example.com:{self.tlsPort}/svc/x",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.endswith(b"\n200 0"), result.stdout)
        [seen] = upstream.received
        self.assertEqual(seen.header(b"x-forwarded-proto"), [b"https"])
        self.assertEqual(seen.header(b"x-forwarded-port"), [str(self.tlsPort).encode()])

    async def test_oldVersionsRefused(self) -> None:
        """
        A client that offers at most TLS 1.1 fails its handshake.
        """
        upstream = self.startUpstream()
        await self.startTLS(upstream.address)

        def run() -> str:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
            with socket.create_connection(
                ("127.0.0.1", self.tlsPort), timeout=10
            ) as raw:
                try:
                    with context.wrap_socket(raw, server_hostname="api.example.com"):
                        return "connected"
                except (ssl.SSLError, ConnectionResetError) as e:
                    return type(e).__name__

        self.assertNotEqual(await threads.deferToThread(run), "connected")

    async def test_reload(self) -> None:
        """
        A certificate added to the directory is served within seconds; a
        file rewritten with garbage keeps serving its last good one, and
        the failure is logged.
        """
        upstream = self.startUpstream()
        proxy = await self.startTLS(upstream.address)
        self.write("new.pem", ["new.example"])
        self.write("api.pem", [], b"not a certificate")

        def waitForNew() -> list[str]:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                names = self.names("new.example")
                if names == ["new.example"]:
                    return names
                time.sleep(0.2)
            return names

        self.assertEqual(await threads.deferToThread(waitForNew), ["new.example"])
        self.assertEqual(
            await threads.deferToThread(self.names, "api.example.com"),
            ["api.example.com"],
        )
        await proxy.waitFor(
            lambda: (
                "TLS certificate not reloaded, keeping the last good one" in proxy.log()
            ),
            5,
            "the reload error in the log",
        )

    async def test_badCertificateStopsStartup(self) -> None:
        """
        A file that does not load stops monedge at startup with one line
        naming it.
        """
        self.write("broken.pem", [], b"-----BEGIN PRIVATE KEY-----\nxx\n")
        self.writeServices({})
        result = await threads.deferToThread(
            subprocess.run,
            [
                os.path.join(os.path.dirname(sys.executable), "twistd"),
                "-n",
                "--pidfile=",
                "monedge",
                "--port",
                f"tcp:{freePort()}:interface=127.0.0.1",
                "--admin-port",
                f"tcp:{freePort()}:interface=127.0.0.1",
                "--registry",
                f"static:{self.registryPath}",
                "--tls-port",
                str(self.tlsPort),
                "--tls-dir",
                self.tlsDir,
            ],
            capture_output=True,
            timeout=60,
            env={
                **os.environ,
                "PYTHONPATH": os.path.dirname(
                    os.path.dirname(os.path.abspath(__file__))
                ),
            },
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn(b"--tls-dir:", result.stderr + result.stdout)
        self.assertIn(b"broken.pem", result.stderr + result.stdout)
        self.assertNotIn(b"Traceback", result.stderr + result.stdout)

    async def test_alpnAndRefusalsOverTLS(self) -> None:
        """
        An HTTP/1.1 client that sends nothing after its handshake gets the
        JSON 408 over TLS when the header deadline passes, with nothing
        worse in the log. (HTTP/2 clients are in test_e2e_http2.)
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream.address]}},
            [
                "--tls-port",
                f"tcp:{self.tlsPort}:interface=127.0.0.1",
                "--tls-dir",
                self.tlsDir,
                "--header-timeout",
                "1s",
            ],
        )

        def run() -> tuple[str | None, bytes]:
            context = ssl.create_default_context(cafile=self.caFile)
            context.set_alpn_protocols(["http/1.1"])
            with socket.create_connection(
                ("127.0.0.1", self.tlsPort), timeout=10
            ) as raw:
                with context.wrap_socket(raw, server_hostname="api.example.com") as tls:
                    chosen = tls.selected_alpn_protocol()
                    data = b""
                    try:
                        while True:
                            chunk = tls.recv(65536)
                            if not chunk:
                                break
                            data += chunk
                    except (ssl.SSLError, OSError):
                        pass
                    return chosen, data

        chosen, data = await threads.deferToThread(run)
        self.assertEqual(chosen, "http/1.1")
        self.assertTrue(data.startswith(b"HTTP/1.1 408"), data)
        self.assertIn(b'"code":"request_timeout"', data)
        self.assertNotIn("Traceback", proxy.log())

    async def test_webSocketOverTLS(self) -> None:
        """
        A wss:// client through the TLS listener reaches a WebSocket
        upstream: a thousand echoes and a clean close.
        """
        from websockets.sync.client import connect

        from tests.test_e2e_websocket import EchoServer

        server = EchoServer()
        self.addCleanup(server.stop)
        await self.startTLS(server.address)

        def run() -> list[int]:
            context = ssl.create_default_context(cafile=self.caFile)
            wrong = []
            with connect(
                f"wss://127.0.0.1:{self.tlsPort}/svc/echo",
                ssl=context,
                server_hostname="api.example.com",
                open_timeout=10,
            ) as ws:
                for i in range(1000):
                    ws.send(f"m{i}")
                    if ws.recv(timeout=10) != f"m{i}":
                        wrong.append(i)
                ws.close(1000, "done")
            return wrong

        self.assertEqual(await threads.deferToThread(run), [])
        deadline = time.monotonic() + 5
        while not server.closes and time.monotonic() < deadline:
            await threads.deferToThread(time.sleep, 0.05)
        self.assertEqual(server.closes, [(1000, "done")])

    async def test_sslEndpointListener(self) -> None:
        """
        --listen ssl:... with one key and certificate (Twisted's endpoint
        syntax) terminates TLS too: curl verifies it and the upstream sees
        https.
        """
        upstream = self.startUpstream()
        pem = os.path.join(self.tlsDir, "api.pem")
        port = freePort()
        await self.startProxy(
            {"service.api.svc": {"endpoints": [upstream.address]}},
            [
                "--listen",
                f"ssl:{port}:interface=127.0.0.1:privateKey={pem}:certKey={pem}",
            ],
        )
        result = await self.curl(
            "--cacert",
            self.caFile,
            "--resolve",
            f"api.example.com:{port}:127.0.0.1",
            "--write-out",
            "\n%{http_code}",
            f"https://api.example.com:{port}/svc/x",
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertTrue(result.stdout.endswith(b"\n200"), result.stdout)
        [seen] = upstream.received
        self.assertEqual(seen.header(b"x-forwarded-proto"), [b"https"])
