"""
Code that reaches into Twisted, each way L{tests.test_architecture}'s seam
check must find (and code like it that it must not), for that check's own
tests.  Never run: only imported and parsed.
"""

from __future__ import annotations

from typing import Any

from twisted.web.http import HTTPChannel, _ChunkedTransferDecoder

#: Refers to the private import, so that it is used.
DECODER = _ChunkedTransferDecoder


class Channel(HTTPChannel):
    """
    A channel that overrides a private method, sets a private attribute of
    its Twisted base and replaces one of its methods.
    """

    _refused = False

    def _send100Continue(self) -> None:
        super()._send100Continue()

    def refuse(self) -> None:
        self._refused = True
        self._heldHead = None
        self._dataBuffer = []
        self.dataReceived = lambda data: None  # type: ignore[method-assign]


class Pool:
    """
    A class of the module's own, whose private attribute is its own, even
    under a name Twisted uses too.
    """

    def __init__(self) -> None:
        self._factory = None


def use(headers: Any, channel: Any, site: Any, request: Any, pool: Pool) -> None:
    """
    Private attributes of Twisted's objects read and looked up by name,
    values set on them, and a method replaced.
    """
    seen = [
        headers._rawHeaders.get(b"Host"),
        getattr(channel, "_command", None),
        request._inFakeHead,
        channel._refused,
        pool._factory,
    ]
    request.code = len(seen)

    def quiet(request: Any) -> None:
        pass

    site.log = quiet
