"""
The certificate store behind --tls-dir: loading, SNI selection, wildcards,
the default certificate, and reloads that never lose a good certificate.
"""

from __future__ import annotations

import os

from cryptography import x509
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from monedge.edge.tls import CertificateFileError, CertificateStore
from monedge.testing.tls import CertificateAuthority


def _names(context: object) -> list[str]:
    """
    The DNS names of the certificate a context presents.
    """
    from OpenSSL import SSL

    assert isinstance(context, SSL.Context)
    connection = SSL.Connection(context, None)
    certificate = connection.get_certificate()
    assert certificate is not None
    cert = certificate.to_cryptography()
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return sans.value.get_values_for_type(x509.DNSName)


class StoreTests(SynchronousTestCase):
    """
    A directory of PEM files, served by name.
    """

    def setUp(self) -> None:
        self.ca = CertificateAuthority()
        self.directory = self.mktemp()
        os.makedirs(self.directory)
        self.write("default.pem", ["default.example"])
        self.write("api.pem", ["api.example.com", "www.example.com"])
        self.write("wild.pem", ["*.apps.example.com"])
        self.clock = Clock()

    def write(self, name: str, names: list[str], pem: bytes | None = None) -> str:
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(pem if pem is not None else self.ca.issue(names))
        # A new modification time for every write, as a real edit has.
        stamp = os.stat(path).st_mtime + len(os.listdir(self.directory)) + 1
        os.utime(path, (stamp, stamp))
        return path

    def test_selection(self) -> None:
        """
        Exact names (any case, a trailing dot ignored) get their file's
        certificate; a wildcard covers one more label only; anything else,
        or no SNI, gets default.pem's.
        """
        store = CertificateStore(self.directory, self.clock)
        self.assertEqual(
            _names(store.contextFor(b"api.example.com")),
            ["api.example.com", "www.example.com"],
        )
        self.assertEqual(
            _names(store.contextFor(b"WWW.Example.COM.")),
            ["api.example.com", "www.example.com"],
        )
        self.assertEqual(
            _names(store.contextFor(b"shop.apps.example.com")), ["*.apps.example.com"]
        )
        for other in [
            b"a.b.apps.example.com",
            b"apps.example.com",
            b"other.test",
            None,
            b"",
        ]:
            self.assertEqual(
                _names(store.contextFor(other)), ["default.example"], other
            )

    def test_defaultIsFirstWithoutDefaultFile(self) -> None:
        """
        Without default.pem, the first file by name is the default.
        """
        os.remove(os.path.join(self.directory, "default.pem"))
        store = CertificateStore(self.directory, self.clock)
        self.assertEqual(
            _names(store.contextFor(None)), ["api.example.com", "www.example.com"]
        )

    def test_badFilesAtStartup(self) -> None:
        """
        A file that does not load, an empty directory or a missing one is a
        CertificateFileError naming it.
        """
        other = CertificateAuthority().issue(["x.example"])
        mismatched = self.ca.issue(["x.example"]).split(b"-----BEGIN CERTIFICATE")[0]
        mismatched += (
            b"-----BEGIN CERTIFICATE" + other.split(b"-----BEGIN CERTIFICATE")[1]
        )
        for pem in [b"not a pem", self.ca.certificatePEM, mismatched]:
            path = self.write("bad.pem", [], pem)
            error = self.assertRaises(
                CertificateFileError, CertificateStore, self.directory, self.clock
            )
            self.assertIn("bad.pem", str(error))
            os.remove(path)
        empty = self.mktemp()
        os.makedirs(empty)
        self.assertRaises(CertificateFileError, CertificateStore, empty, self.clock)
        self.assertRaises(
            CertificateFileError, CertificateStore, empty + "-missing", self.clock
        )

    def test_reload(self) -> None:
        """
        Polling picks up a new file, a changed one and a removed one.
        """
        store = CertificateStore(self.directory, self.clock, interval=2)
        store.start()
        self.addCleanup(store.stop)
        self.write("new.pem", ["new.example"])
        self.assertEqual(_names(store.contextFor(b"new.example")), ["default.example"])
        self.clock.advance(2)
        self.assertEqual(_names(store.contextFor(b"new.example")), ["new.example"])
        self.write("new.pem", ["new.example", "more.example"])
        self.clock.advance(2)
        self.assertEqual(
            _names(store.contextFor(b"more.example")), ["new.example", "more.example"]
        )
        os.remove(os.path.join(self.directory, "new.pem"))
        self.clock.advance(2)
        self.assertEqual(_names(store.contextFor(b"new.example")), ["default.example"])
        self.assertEqual(store.reloadsSucceeded, 3)

    def test_badReloadKeepsTheLastGood(self) -> None:
        """
        A file rewritten with something that does not load keeps serving
        its last good certificate; the failure is counted.
        """
        store = CertificateStore(self.directory, self.clock, interval=2)
        store.start()
        self.addCleanup(store.stop)
        self.write("api.pem", [], b"garbage")
        self.clock.advance(2)
        self.assertEqual(
            _names(store.contextFor(b"api.example.com")),
            ["api.example.com", "www.example.com"],
        )
        self.assertEqual(store.reloadsFailed, 1)

    def test_strongCiphersOnly(self) -> None:
        """
        The TLS 1.2 suites offered all have forward-secret key exchange and
        AEAD encryption.
        """
        from OpenSSL import SSL

        store = CertificateStore(self.directory, self.clock)
        context = store.contextFor(b"api.example.com")
        assert context is not None
        suites = SSL.Connection(context, None).get_cipher_list()
        tls12 = [s for s in suites if not s.startswith("TLS_")]
        self.assertTrue(tls12)
        for suite in tls12:
            self.assertTrue(suite.startswith(("ECDHE-", "DHE-")), suite)
            self.assertTrue("GCM" in suite or "CHACHA20" in suite, suite)
