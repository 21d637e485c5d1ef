"""
WebSocket handshakes: which requests ask for one, how they are checked, and
how the upstream's 101 is.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

from monedge.rules.errors import ProxyError
from monedge.upstream.upgrade import (
    acceptFor,
    checkWebSocketRequest,
    isWebSocketAccept,
    wantsWebSocket,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def _headers(**values: str) -> Headers:
    headers = Headers()
    for name, value in values.items():
        headers.addRawHeader(name.replace("_", "-").encode(), value.encode())
    return headers


class WantsWebSocketTests(SynchronousTestCase):
    """
    Only Connection: upgrade with Upgrade: websocket asks for a WebSocket.
    """

    def test_cases(self) -> None:
        """
        Tokens are matched case-insensitively within lists; h2c, a missing
        Connection token or a missing Upgrade is an ordinary request.
        """
        yes = [
            _headers(connection="Upgrade", upgrade="websocket"),
            _headers(connection="keep-alive, Upgrade", upgrade="WebSocket"),
            _headers(connection="upgrade", upgrade="websocket/13"),
        ]
        no = [
            _headers(connection="Upgrade", upgrade="h2c"),
            _headers(upgrade="websocket"),
            _headers(connection="Upgrade"),
            _headers(connection="close", upgrade="websocket"),
            _headers(connection="Upgrade", upgrade="websockets"),
        ]
        for headers in yes:
            self.assertTrue(wantsWebSocket(headers), headers)
        for headers in no:
            self.assertFalse(wantsWebSocket(headers), headers)


class CheckRequestTests(SynchronousTestCase):
    """
    The opening handshake is checked before it goes anywhere.
    """

    def check(
        self, method: bytes = b"GET", version: bytes = b"HTTP/1.1", **h: str
    ) -> bytes:
        values = {"sec_websocket_key": KEY.decode(), "sec_websocket_version": "13"}
        values.update(h)
        headers = _headers(**{k: v for k, v in values.items() if v})
        return checkWebSocketRequest(method, version, headers)

    def assertRefused(self, code: str, **kwargs: object) -> None:
        error = self.assertRaises(ProxyError, self.check, **kwargs)
        self.assertEqual(error.code, code)

    def test_valid(self) -> None:
        """
        A GET over HTTP/1.1 with a 16-byte key and version 13 passes, and
        its key is returned.
        """
        self.assertEqual(self.check(), KEY)

    def test_refused(self) -> None:
        """
        Another method or HTTP version, a missing, short or non-base64 key
        are bad_upgrade; a version other than 13, or none, is
        websocket_version (426).
        """
        self.assertRefused("bad_upgrade", method=b"POST")
        self.assertRefused("bad_upgrade", version=b"HTTP/1.0")
        self.assertRefused("bad_upgrade", sec_websocket_key="")
        self.assertRefused("bad_upgrade", sec_websocket_key="c2hvcnQ=")
        self.assertRefused("bad_upgrade", sec_websocket_key="not base64!!")
        self.assertRefused("websocket_version", sec_websocket_version="8")
        self.assertRefused("websocket_version", sec_websocket_version="")
        self.assertEqual(ProxyError("websocket_version").status, 426)


class AcceptTests(SynchronousTestCase):
    """
    The upstream's 101 must complete the handshake for the key sent.
    """

    def test_rfcExample(self) -> None:
        """
        The accept value for RFC 6455's sample key is the RFC's.
        """
        self.assertEqual(acceptFor(KEY), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")

    def test_isWebSocketAccept(self) -> None:
        """
        Upgrade: websocket, a Connection listing upgrade and the right
        accept are required; anything else is not a WebSocket 101.
        """
        good = {
            "upgrade": "websocket",
            "connection": "Upgrade",
            "sec_websocket_accept": acceptFor(KEY).decode(),
        }
        self.assertTrue(isWebSocketAccept(_headers(**good), KEY))
        for change in [
            {"upgrade": "h2c"},
            {"upgrade": ""},
            {"connection": "keep-alive"},
            {"sec_websocket_accept": "d3Jvbmc="},
            {"sec_websocket_accept": ""},
        ]:
            values = {**good, **change}
            headers = _headers(**{k: v for k, v in values.items() if v})
            self.assertFalse(isWebSocketAccept(headers, KEY), change)
