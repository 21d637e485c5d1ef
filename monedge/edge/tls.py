"""
TLS termination with many certificates, chosen by SNI (C{--tls-dir}).

The directory holds PEM files (C{*.pem}), each a private key followed by
its certificate and any intermediate certificates. A file serves the host
names in its certificate's subjectAltName (C{DNS:} entries, C{*.example.com}
wildcards included); C{default.pem} (else the first file by name) serves
clients that send no SNI or a name no file covers.

Every file is loaded at startup, and a file that does not load stops
monedge. The directory is then polled: a file added, changed or removed is
picked up within the poll interval, and a file that no longer loads keeps
serving its last good certificate (logged and counted).

Every context has the same settings: TLS 1.2 at least, forward-secret AEAD
suites only for TLS 1.2 (L{CIPHERS}), no session tickets, and the ALPN
protocols given.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IReactorTime
from twisted.internet.ssl import (
    AcceptableCiphers,
    CertificateOptions,
    TLSVersion,
)
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: The file that serves clients without SNI, if present.
DEFAULT_FILE = "default.pem"

#: TLS 1.2 suites offered: forward-secret key exchange and AEAD only (TLS 1.3
#: suites are OpenSSL's, all of which qualify).
CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(
    "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!SHA1"
)


class CertificateFileError(Exception):
    """
    A certificate file that cannot be served; the message says why.
    """


@dataclass(frozen=True)
class LoadedCertificate:
    """
    One PEM file, loaded.

    @ivar names: the DNS names it serves, lowercased (wildcards as
        C{*.example.com}).
    @ivar notAfter: when its certificate expires (POSIX seconds).
    """

    path: str
    stamp: tuple[float, int]
    names: tuple[str, ...]
    notAfter: float
    options: CertificateOptions

    def context(self) -> SSL.Context:
        """
        The OpenSSL context that presents this certificate.
        """
        return self.options.getContext()


def _stamp(path: str) -> tuple[float, int]:
    info = os.stat(path)
    return info.st_mtime, info.st_size


def loadCertificate(
    path: str, protocols: Sequence[bytes] = (b"http/1.1",)
) -> LoadedCertificate:
    """
    Load and check one PEM file: a private key, then its certificate and
    chain; the key must match the certificate.

    @raise CertificateFileError: naming the file and the problem.
    """
    try:
        stamp = _stamp(path)
        with open(path, "rb") as f:
            pem = f.read()
    except OSError as e:
        raise CertificateFileError(f"{path}: {e.strerror}") from None
    try:
        key = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as e:
        raise CertificateFileError(f"{path}: no usable private key ({e})") from None
    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError as e:
        raise CertificateFileError(f"{path}: no certificate ({e})") from None
    leaf, chain = certificates[0], certificates[1:]
    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = tuple(
            sorted(
                name.lower() for name in sans.value.get_values_for_type(x509.DNSName)
            )
        )
    except x509.ExtensionNotFound:
        names = ()
    try:
        options = CertificateOptions(
            privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
            certificate=crypto.X509.from_cryptography(leaf),
            extraCertChain=[crypto.X509.from_cryptography(c) for c in chain],
            raiseMinimumTo=TLSVersion.TLSv1_2,
            acceptableProtocols=list(protocols),
            acceptableCiphers=CIPHERS,
        )
        # Builds the context now: a key that does not match its
        # certificate fails here, not in a client's handshake.
        options.getContext()
    except (SSL.Error, ValueError, TypeError) as e:
        raise CertificateFileError(f"{path}: cannot be served ({e})") from None
    return LoadedCertificate(
        path=path,
        stamp=stamp,
        names=names,
        notAfter=leaf.not_valid_after_utc.timestamp(),
        options=options,
    )


def _pemFiles(directory: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError as e:
        raise CertificateFileError(f"{directory}: {e.strerror}") from None
    return sorted(
        os.path.join(directory, name)
        for name in names
        if name.endswith(".pem") and not name.startswith(".")
    )


class CertificateStore:
    """
    The certificates in a directory, by host name, kept up to date.

    @param directory: the C{--tls-dir}.
    @param clock: for polling.
    @param interval: seconds between polls.
    """

    _log = Logger()

    def __init__(
        self,
        directory: str,
        clock: IReactorTime,
        interval: float = 2.0,
        protocols: Sequence[bytes] = (b"http/1.1",),
    ) -> None:
        self.directory = directory
        self._clock = clock
        self._protocols = tuple(protocols)
        self._files: dict[str, LoadedCertificate] = {}
        self._exact: dict[bytes, SSL.Context] = {}
        self._wildcard: dict[bytes, SSL.Context] = {}
        self._default: LoadedCertificate | None = None
        self.reloadsFailed = 0
        self.reloadsSucceeded = 0
        paths = _pemFiles(directory)
        if not paths:
            raise CertificateFileError(f"{directory}: no .pem files")
        for path in paths:
            self._files[path] = loadCertificate(path, self._protocols)
        self._index()
        self._poll = LoopingCall(self.reload)
        self._poll.clock = clock
        self._interval = interval

    def _index(self) -> None:
        exact: dict[bytes, SSL.Context] = {}
        wildcard: dict[bytes, SSL.Context] = {}
        for loaded in self._files.values():
            context = loaded.context()
            for name in loaded.names:
                encoded = name.encode("ascii", "replace")
                if name.startswith("*."):
                    wildcard.setdefault(encoded[2:], context)
                else:
                    exact.setdefault(encoded, context)
        defaultPath = os.path.join(self.directory, DEFAULT_FILE)
        self._default = self._files.get(defaultPath) or self._files[min(self._files)]
        self._exact, self._wildcard = exact, wildcard

    def contextFor(self, serverName: bytes | None) -> SSL.Context | None:
        """
        The context for a client's SNI name: an exact name, else a wildcard
        covering exactly one more label, else the default's.
        """
        if serverName:
            name = serverName.lower().rstrip(b".")
            context = self._exact.get(name)
            if context is not None:
                return context
            _, dot, parent = name.partition(b".")
            if dot:
                context = self._wildcard.get(parent)
                if context is not None:
                    return context
        assert self._default is not None
        return self._default.context()

    def contextFactory(self) -> CertificateOptions:
        """
        The context factory for a TLS listener: the default certificate's
        settings, switching context by SNI.
        """
        assert self._default is not None
        default = loadCertificate(self._default.path, self._protocols)
        return CertificateOptions(
            privateKey=default.options.privateKey,
            certificate=default.options.certificate,
            extraCertChain=default.options.extraCertChain,
            raiseMinimumTo=TLSVersion.TLSv1_2,
            acceptableProtocols=list(self._protocols),
            acceptableCiphers=CIPHERS,
            contextForServerName=self.contextFor,
        )

    def describe(self) -> list[dict[str, Any]]:
        """
        Each file, the names it serves and its expiry, for logs and tests.
        """
        assert self._default is not None
        return [
            {
                "file": os.path.basename(path),
                "names": list(loaded.names),
                "not_after": loaded.notAfter,
                "default": loaded is self._default,
            }
            for path, loaded in sorted(self._files.items())
        ]

    def reload(self) -> None:
        """
        Pick up files added, changed or removed; a file that does not load
        keeps its last good certificate.
        """
        try:
            paths = _pemFiles(self.directory)
        except CertificateFileError as e:
            self.reloadsFailed += 1
            self._log.error("TLS certificates not reloaded: {error}", error=str(e))
            return
        changed = False
        for path in set(self._files) - set(paths):
            if len(self._files) == 1:
                break
            del self._files[path]
            changed = True
            self._log.info("TLS certificate removed: {path}", path=path)
        for path in paths:
            previous = self._files.get(path)
            try:
                if previous is not None and previous.stamp == _stamp(path):
                    continue
                self._files[path] = loadCertificate(path, self._protocols)
            except (CertificateFileError, OSError) as e:
                self.reloadsFailed += 1
                self._log.error(
                    "TLS certificate not reloaded, {kept}: {error}",
                    kept="keeping the last good one" if previous else "not served",
                    error=str(e),
                )
                continue
            changed = True
            self._log.info("TLS certificate loaded: {path}", path=path)
        if changed:
            self._index()
            self.reloadsSucceeded += 1

    def start(self) -> None:
        """
        Start polling the directory.
        """
        if not self._poll.running:
            self._poll.start(self._interval, now=False)

    def stop(self) -> None:
        """
        Stop polling.
        """
        if self._poll.running:
            self._poll.stop()
