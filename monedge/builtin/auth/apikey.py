"""
The C{auth} hook's C{api-key} mode: the key in a header (C{X-Api-Key}) or
C{Authorization: Bearer}, accepted when its SHA-256 is listed in a keys
file, re-read when the file changes (checked at most once a second).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from monedge.builtin.auth.authenticator import (
    Authenticator,
    bearer,
    invalid,
    missing,
)
from monedge.builtin.auth.options import headerName, identityHeader
from monedge.hooks import HookConfigError, HookResponse
from monedge.interfaces import IHookRequest

#: The options of the C{api-key} mode, beside those every mode has.
OPTIONS = frozenset(["keys-file", "header", "key-id-header"])

_DIGEST = re.compile(r"[0-9a-f]{64}\Z")


class APIKeyAuthHook(Authenticator):
    """
    Accepts requests whose API key's SHA-256 is listed in a file.
    """

    def __init__(
        self,
        identity: Sequence[bytes],
        *,
        reactor: Any,
        keysFile: str,
        header: bytes = b"X-Api-Key",
        keyIdHeader: bytes | None = None,
    ) -> None:
        super().__init__(identity)
        self._reactor = reactor
        self.keysFile = keysFile
        self._header = header
        self._keyIdHeader = keyIdHeader
        self._signature = _fileSignature(keysFile)
        self.digests = readDigests(keysFile)
        self._lastCheck: float = reactor.seconds()

    def authenticate(self, request: IHookRequest) -> HookResponse | None:
        """
        Look the key's digest up in the (re-read if changed) keys file.
        """
        self._reloadIfChanged()
        values = request.headers.getRawHeaders(self._header)
        if values:
            key = values[0].strip() if len(values) == 1 else b""
        else:
            token = bearer(request.headers)
            if token is None:
                return missing("an API key is required")
            key = token
        if not key:
            return invalid("the API key is malformed")
        # The digest is not secret, so looking it up in a set leaks nothing
        # about any key (what a constant-time comparison would protect).
        digest = hashlib.sha256(key).hexdigest()
        if digest not in self.digests:
            return invalid("the API key is not valid")
        if self._keyIdHeader is not None:
            request.upstreamHeaders.setRawHeaders(
                self._keyIdHeader, [digest[:8].encode("ascii")]
            )
        return None

    def _reloadIfChanged(self) -> None:
        now: float = self._reactor.seconds()
        if now - self._lastCheck < 1.0:
            return
        self._lastCheck = now
        try:
            signature = _fileSignature(self.keysFile)
            if signature == self._signature:
                return
            digests = readDigests(self.keysFile)
        except (OSError, ValueError) as e:
            self._log.error(
                "auth: cannot reload {path}, keeping {count} keys: {error}",
                path=self.keysFile,
                count=len(self.digests),
                error=str(e),
            )
            return
        self._signature = signature
        self.digests = digests
        self._log.info(
            "auth: reloaded {path}: {count} keys",
            path=self.keysFile,
            count=len(digests),
        )


def _fileSignature(path: str) -> tuple[int, int, int]:
    status = os.stat(path)
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def readDigests(path: str) -> frozenset[str]:
    """
    The SHA-256 hex digests in a keys file: one per line, C{#} starting a
    comment, blank lines ignored.

    @raise OSError: if the file cannot be read.
    @raise ValueError: naming the first line that is not a digest.
    """
    digests = set()
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip().lower()
            if not text:
                continue
            if not _DIGEST.match(text):
                raise ValueError(f"line {number} is not a SHA-256 hex digest")
            digests.add(text)
    return frozenset(digests)


def buildAPIKey(
    options: Mapping[str, Any],
    context: Any,
    identity: tuple[bytes, ...],
    lowered: frozenset[bytes],
) -> APIKeyAuthHook:
    """
    An L{APIKeyAuthHook} from the C{api-key} mode's C{options}, given the
    parsed C{identity} headers (and C{lowered}, their lower-cased names).

    @raise HookConfigError: naming the first bad option.
    """
    path = options.get("keys-file")
    if not isinstance(path, str) or not path:
        raise HookConfigError("keys-file: required in mode api-key (a path)")
    header = headerName(options.get("header", "X-Api-Key"), "header")
    if header.lower() == b"authorization":
        raise HookConfigError("header: Authorization is always read, as a Bearer token")
    keyIdHeader = None
    if "key-id-header" in options:
        keyIdHeader = identityHeader(
            headerName(options["key-id-header"], "key-id-header"),
            lowered,
            "key-id-header",
        )
    try:
        return APIKeyAuthHook(
            identity,
            reactor=context.reactor,
            keysFile=path,
            header=header,
            keyIdHeader=keyIdHeader,
        )
    except OSError as e:
        raise HookConfigError(
            f"keys-file: cannot read {path}: {e.strerror or e}"
        ) from None
    except ValueError as e:
        raise HookConfigError(f"keys-file: {path}: {e}") from None
