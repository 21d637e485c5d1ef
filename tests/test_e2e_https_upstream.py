"""
End-to-end C{https} upstreams: a real C{twistd monedge} verifying a real
TLS upstream on 127.0.0.1 against a test CA, by a configured name, with and
without a client certificate.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet import reactor
from twisted.internet.ssl import CertificateOptions
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from monedge.testing.tls import CertificateAuthority
from tests.e2e import ProxyTestCase


class _Secure(Resource):
    """
    Answers with the common name of the client's certificate, if any.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        transport: Any = request.channel.transport
        peer = transport.getPeerCertificate()
        name = None
        if peer is not None:
            subject = peer.to_cryptography().subject
            name = subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        return json.dumps({"secure": True, "client": name}).encode()


def _options(
    pem: bytes, clientCA: x509.Certificate | None = None
) -> CertificateOptions:
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, pem)
    certificate = crypto.load_certificate(crypto.FILETYPE_PEM, pem)
    if clientCA is None:
        return CertificateOptions(privateKey=key, certificate=certificate)
    return CertificateOptions(
        privateKey=key,
        certificate=certificate,
        verify=True,
        requireCertificate=True,
        caCerts=[crypto.X509.from_cryptography(clientCA)],
    )


class HTTPSUpstreamTests(ProxyTestCase):
    """
    monedge speaks TLS to https:// endpoints, verifying them.
    """

    def setUp(self) -> None:
        super().setUp()
        self.ca = CertificateAuthority()
        self.caFile = self.file("ca.pem", self.ca.certificatePEM)
        self.serverPEM = self.ca.issue(["upstream.internal"])

    def file(self, name: str, data: bytes) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def upstream(self, requireClient: bool = False) -> str:
        options = _options(
            self.serverPEM, self.ca.certificate if requireClient else None
        )
        site = Site(_Secure())
        port: Any = reactor.listenSSL(0, site, options, interface="127.0.0.1")  # type: ignore[attr-defined]
        self.addCleanup(port.stopListening)
        return f"https://127.0.0.1:{port.getHost().port}"

    async def status(self, endpoint: str, **policy: str) -> tuple[int, Any]:
        proxy = await self.startProxy(
            {"service.api.sec": {"endpoints": [endpoint], "policy": policy}}
        )
        response, body = await self.get(proxy.url + "/sec/x")
        await proxy.stop()
        return response.code, json.loads(body)

    async def test_verifiedByName(self) -> None:
        """
        With the test CA and the name in the upstream's certificate, the
        request goes through over TLS.
        """
        endpoint = self.upstream()
        code, body = await self.status(
            endpoint,
            **{"upstream-ca": self.caFile, "upstream-server-name": "upstream.internal"},
        )
        self.assertEqual((code, body), (200, {"secure": True, "client": None}))

    async def test_unverifiedRefused(self) -> None:
        """
        Without the CA (the system's trust store does not know it), or with
        a name the certificate does not carry, or the endpoint's IP as the
        name, the upstream is not trusted: 502, never a response from it.
        """
        endpoint = self.upstream()
        for policy in [
            {"upstream-server-name": "upstream.internal"},
            {"upstream-ca": self.caFile, "upstream-server-name": "other.internal"},
            {"upstream-ca": self.caFile},
        ]:
            code, body = await self.status(endpoint, **policy)
            self.assertEqual(code, 502, policy)
            self.assertEqual(body["code"], "upstream_reset", policy)

    async def test_mutualTLS(self) -> None:
        """
        An upstream that requires a client certificate refuses monedge
        without one, and sees monedge's certificate when it has one.
        """
        endpoint = self.upstream(requireClient=True)
        trust = {
            "upstream-ca": self.caFile,
            "upstream-server-name": "upstream.internal",
        }
        code, _ = await self.status(endpoint, **trust)
        self.assertEqual(code, 502)
        clientFile = self.file(
            "client.pem", self.ca.issue(["monedge.edge"], client=True)
        )
        code, body = await self.status(
            endpoint, **trust, **{"upstream-client-certificate": clientFile}
        )
        self.assertEqual(
            (code, body), (200, {"secure": True, "client": "monedge.edge"})
        )

    async def test_unreadableFile(self) -> None:
        """
        A CA file that cannot be read fails the request with 502
        upstream_connect_failed, and the log says which file.
        """
        endpoint = self.upstream()
        missing = os.path.join(self.directory, "missing.pem")
        proxy = await self.startProxy(
            {
                "service.api.sec": {
                    "endpoints": [endpoint],
                    "policy": {"upstream-ca": missing},
                }
            }
        )
        response, body = await self.get(proxy.url + "/sec/x")
        self.assertEqual(response.code, 502)
        self.assertEqual(json.loads(body)["code"], "upstream_connect_failed")
        await proxy.waitFor(lambda: "missing.pem" in proxy.log(), 5, "the log line")
