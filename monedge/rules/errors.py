"""
Every refusal monedge makes, as a JSON body with a stable code.

    {"status": 404, "code": "route_not_found", "message": "...", "request_id": "..."}

The catalogue below is the contract: docs/errors.md lists it, and a test
checks that the two agree.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Protocol

from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from monedge.rules.grpc import grpcMessage, grpcStatus, isGrpcContentType
from monedge.rules.grpcweb import grpcWebType

if TYPE_CHECKING:
    from twisted.web.server import Request


class Answerable(Protocol):
    """
    What L{renderError} sets on a request: its status and headers.
    """

    responseHeaders: Headers

    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...


#: code -> (status, default message)
CATALOGUE: dict[str, tuple[int, str]] = {
    "bad_request": (400, "the request is malformed"),
    "missing_host": (400, "the Host header is missing or repeated"),
    "host_mismatch": (400, "the absolute-form target's authority differs from Host"),
    "path_not_absolute": (400, "the request target must start with '/'"),
    "path_invalid_escape": (400, "the path has a malformed %-escape"),
    "path_dot_segment": (400, "the path has a '.' or '..' segment"),
    "path_encoded_separator": (400, "the path has an encoded '/' or '\\'"),
    "path_control_character": (400, "the path has a NUL or control character"),
    "path_invalid_utf8": (400, "the path is not valid UTF-8"),
    "path_double_encoding": (400, "the path has a doubly encoded separator or dot"),
    "bad_upgrade": (400, "the WebSocket handshake is malformed"),
    "grpc_timeout_invalid": (400, "the grpc-timeout header is malformed"),
    "grpc_web_bad_base64": (400, "the gRPC-Web text body is not valid base64"),
    "route_not_found": (404, "no service serves this path"),
    "unknown_host": (404, "this host serves no services"),
    "method_not_allowed": (405, "this method is not proxied"),
    "request_timeout": (408, "the request headers did not arrive in time"),
    "body_too_large": (413, "the request body is larger than this service accepts"),
    "uri_too_long": (414, "the request line is too long"),
    "websocket_version": (426, "only WebSocket version 13 is supported"),
    "headers_too_large": (431, "the request headers are too large or too many"),
    "unauthorized": (401, "the request lacks valid credentials"),
    "forbidden": (403, "the request is not allowed"),
    "rate_limited": (429, "too many requests; retry later"),
    "internal_error": (500, "monedge failed to handle the request"),
    "hook_failed": (500, "a hook failed while handling the request"),
    "upstream_connect_failed": (502, "the upstream refused the connection"),
    "upstream_reset": (502, "the upstream closed the connection without a response"),
    "upstream_headers_too_large": (
        502,
        "the upstream's response headers are too large or too many",
    ),
    "no_ready_endpoint": (503, "the service has no ready endpoint"),
    "too_many_connections": (503, "this listener has too many connections open"),
    "request_buffer_full": (
        503,
        "monedge holds too many request bodies for buffering; retry later",
    ),
    "hook_config_invalid": (503, "the service's hook configuration is invalid"),
    "upstream_timeout": (504, "the upstream did not answer in time"),
    "upstream_connect_timeout": (
        504,
        "the upstream did not accept the connection in time",
    ),
    "grpc_deadline_exceeded": (504, "the call's grpc-timeout passed"),
    "stream_idle_timeout": (504, "the call carried no data for too long"),
}


#: Reason phrases Twisted does not know.
_REASONS = {431: b"Request Header Fields Too Large"}


class ProxyError(Exception):
    """
    A refusal, raised anywhere on the request path and rendered by
    L{renderError}.
    """

    def __init__(self, code: str, message: str | None = None) -> None:
        status, default = CATALOGUE[code]
        super().__init__(message or default)
        self.code = code
        self.status = status
        self.message = message or default


def errorBody(status: int, code: str, message: str, requestId: bytes) -> bytes:
    """
    The JSON body for an error.
    """
    return (
        json.dumps(
            {
                "status": status,
                "code": code,
                "message": message,
                "request_id": requestId.decode("ascii"),
            },
            separators=(",", ":"),
        ).encode("utf-8")
        + b"\n"
    )


def rawErrorResponse(
    code: str,
    requestId: bytes,
    message: str | None = None,
    head: bool = False,
    grpc: bool = False,
    grpcType: bytes = b"application/grpc",
) -> bytes:
    """
    A complete HTTP/1.1 error response that closes the connection, for
    refusals made before there is a request object to answer through
    (malformed framing, header limits and deadlines).

    @param head: the refused request is a C{HEAD}: the response has the
        headers a C{GET} would get, and no body (RFC 9110 9.3.2).
    @param grpc: the refused request is a gRPC call: the refusal takes
        gRPC's form (L{setGrpcRefusal}), its fields as headers.
    @param grpcType: its content-type then (L{grpcRefusalType}).
    """
    status, default = CATALOGUE[code]
    if grpc:
        return b"".join(
            [
                b"HTTP/1.1 200 OK\r\n",
                b"Content-Type: ",
                grpcType,
                b"\r\n",
                b"Grpc-Status: %d\r\n" % (grpcStatus(code, status),),
                b"Grpc-Message: ",
                grpcMessage(code),
                b"\r\nContent-Length: 0\r\n",
                b"Connection: close\r\n",
                b"X-Request-Id: ",
                requestId,
                b"\r\n\r\n",
            ]
        )
    body = errorBody(status, code, message or default, requestId)
    reason = _REASONS.get(status) or RESPONSES.get(status, b"Error")
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, reason),
            b"Content-Type: application/json\r\n",
            b"Content-Length: %d\r\n" % (len(body),),
            b"Connection: close\r\n",
            b"X-Request-Id: ",
            requestId,
            b"\r\n\r\n",
            b"" if head else body,
        ]
    )


def isGrpcRequest(request: Answerable) -> bool:
    """
    Is C{request} a gRPC (or gRPC-Web) call, by its content-type?  Its
    refusals then take the gRPC form (L{setGrpcRefusal}).
    """
    headers = getattr(request, "requestHeaders", None)
    if headers is None:
        return False
    types = headers.getRawHeaders(b"content-type")
    return bool(types) and isGrpcContentType(types[0])


def grpcRefusalType(request: Answerable) -> bytes:
    """
    The content-type of a gRPC-form refusal of C{request}: the gRPC-Web
    type answering its own for a gRPC-Web call (C{application/grpc-web+proto}
    or C{application/grpc-web-text+proto}, say), else C{application/grpc}.
    """
    headers = getattr(request, "requestHeaders", None)
    types = headers.getRawHeaders(b"content-type") if headers is not None else None
    web = grpcWebType(types[0]) if types else None
    return b"application/grpc" if web is None else web.response()


def setGrpcRefusal(
    request: Answerable, code: str | None, status: int, message: str, requestId: bytes
) -> None:
    """
    Set C{request}'s status and headers for a refusal in gRPC's form: 200,
    C{application/grpc} (or the call's gRPC-Web type: L{grpcRefusalType}),
    and a C{grpc-status} (from the table in
    docs/errors.md) and C{grpc-message} (monedge's code, else the message)
    in the head, with no body: a trailers-only response.
    """
    grpc = grpcStatus(code, status)
    request.setResponseCode(200)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [grpcRefusalType(request)])
    headers.setRawHeaders(b"grpc-status", [b"%d" % (grpc,)])
    headers.setRawHeaders(b"grpc-message", [grpcMessage(code or message)])
    headers.setRawHeaders(b"x-request-id", [requestId])
    record = getattr(request, "record", None)
    if record is not None:
        record.failed(code)
        record.grpcStatus = grpc


def renderError(request: Answerable, error: ProxyError, requestId: bytes) -> bytes:
    """
    Set C{request}'s status and headers for C{error}; return the body
    (none for a gRPC call, whose refusal is trailers-only).
    """
    if isGrpcRequest(request):
        setGrpcRefusal(request, error.code, error.status, error.message, requestId)
        return b""
    body = errorBody(error.status, error.code, error.message, requestId)
    request.setResponseCode(error.status)
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"content-length", [b"%d" % (len(body),)])
    headers.setRawHeaders(b"cache-control", [b"no-store"])
    headers.setRawHeaders(b"x-request-id", [requestId])
    if error.code == "websocket_version":
        # RFC 6455 section 4.4: say which version would do.
        headers.setRawHeaders(b"sec-websocket-version", [b"13"])
    record = getattr(request, "record", None)
    if record is not None:
        record.failed(error.code)
    return body


class ErrorResource(Resource):
    """
    A leaf that answers every request with one error.
    """

    isLeaf = True

    def __init__(self, error: ProxyError) -> None:
        super().__init__()
        self.error = error

    def render(self, request: Request) -> bytes:
        requestId: bytes = getattr(request, "requestId", b"-")
        return renderError(request, self.error, requestId)
