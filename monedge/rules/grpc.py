"""
gRPC at the edge: the naming convention for gRPC calls, the gRPC form of
monedge's refusals, and the C{grpc-timeout} header.

    ``/payments.v1.Payments/Create``, content-type ``application/grpc``
        ->  ``service.<tier>.payments``

This module is pure: no I/O, no Twisted.  ``docs/convention.md`` and
``docs/errors.md`` describe it, and tests check that they agree.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import quote

from monedge.rules.convention import isValidName

#: A gRPC path: C{/<package>.<Service>/<Method>}, the qualified service
#: name holding at least one dot.  Protocol Buffers identifiers.
_GRPC_PATH = re.compile(
    rb"/((?:[A-Za-z_][A-Za-z0-9_]*\.)+)[A-Za-z_][A-Za-z0-9_]*/[A-Za-z_][A-Za-z0-9_]*\Z"
)

#: A package prefix: dotted Protocol Buffers identifiers.
_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*\Z")

#: The content-types of gRPC and gRPC-Web requests.
_GRPC = b"application/grpc"


def isGrpcContentType(value: bytes | None) -> bool:
    """
    Is C{value} (a Content-Type) gRPC's: C{application/grpc}, or
    C{application/grpc+<codec>}, or gRPC-Web's (C{application/grpc-web},
    C{application/grpc-web+proto}, C{application/grpc-web-text}...)?
    Parameters after C{;} are allowed; the type is case-insensitive.
    """
    if value is None:
        return False
    media = value.split(b";", 1)[0].strip().lower()
    if not media.startswith(_GRPC):
        return False
    rest = media[len(_GRPC) :]
    if rest.startswith(b"-web"):
        rest = rest[4:]
        if rest.startswith(b"-text"):
            rest = rest[5:]
    return not rest or rest.startswith(b"+")


def isCorsPreflight(
    method: bytes, origin: object | None, requestMethod: object | None
) -> bool:
    """
    Is a request a CORS preflight: C{OPTIONS} with an C{Origin} and an
    C{Access-Control-Request-Method} (their values, or L{None} when absent)?
    A browser sends one, without a content-type, before a cross-origin
    gRPC-Web call, so its path routes by the gRPC rule too: the preflight
    reaches the service (and its hooks) the call it precedes would.
    """
    return method == b"OPTIONS" and bool(origin) and bool(requestMethod)


def checkPackagePrefix(prefix: str) -> str:
    """
    A C{--grpc-package-prefix}, checked: dotted identifiers
    (C{com.example}), without a leading or trailing dot.

    @raise ValueError: with a one-line reason.
    """
    if not _PREFIX.match(prefix):
        raise ValueError(
            f"invalid package prefix {prefix!r}: give dotted identifiers,"
            " such as com.example"
        )
    return prefix


def grpcServiceLabel(path: bytes, prefixes: Iterable[str] = ()) -> str | None:
    """
    The service name a gRPC call's C{path} names: the first label of its
    package, after the longest of C{prefixes} that the package starts with
    (whole labels) is removed.  L{None} if the path does not have the gRPC
    shape, or no valid name is left.

    >>> grpcServiceLabel(b"/payments.v1.Payments/Create")
    'payments'
    >>> grpcServiceLabel(b"/com.example.payments.v1.Payments/Create", ["com.example"])
    'payments'
    """
    match = _GRPC_PATH.match(path)
    if match is None:
        return None
    # The package, with its trailing dot: "com.example.payments.v1."
    package = match.group(1).decode("ascii")
    best = ""
    for prefix in prefixes:
        if package.startswith(prefix + ".") and len(prefix) > len(best):
            best = prefix
    if best:
        package = package[len(best) + 1 :]
    if not package:
        return None
    name = package.split(".", 1)[0]
    return name if isValidName(name) else None


#: gRPC status codes, by name (grpc/doc/statuscodes.md).
OK = 0
CANCELLED = 1
UNKNOWN = 2
INVALID_ARGUMENT = 3
DEADLINE_EXCEEDED = 4
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
INTERNAL = 13
UNAVAILABLE = 14
UNIMPLEMENTED = 12
UNAUTHENTICATED = 16

STATUS_NAMES = {
    OK: "OK",
    CANCELLED: "CANCELLED",
    UNKNOWN: "UNKNOWN",
    INVALID_ARGUMENT: "INVALID_ARGUMENT",
    DEADLINE_EXCEEDED: "DEADLINE_EXCEEDED",
    NOT_FOUND: "NOT_FOUND",
    PERMISSION_DENIED: "PERMISSION_DENIED",
    RESOURCE_EXHAUSTED: "RESOURCE_EXHAUSTED",
    INTERNAL: "INTERNAL",
    UNAVAILABLE: "UNAVAILABLE",
    UNIMPLEMENTED: "UNIMPLEMENTED",
    UNAUTHENTICATED: "UNAUTHENTICATED",
}

#: gRPC's own HTTP-to-gRPC mapping (grpc/doc/http-grpc-status-mapping.md),
#: for a status no code below is more precise about.
_BY_HTTP_STATUS = {
    400: INTERNAL,
    401: UNAUTHENTICATED,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    429: UNAVAILABLE,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: UNAVAILABLE,
}

#: monedge's error codes whose gRPC status is more precise than the HTTP
#: mapping's (docs/errors.md has the whole table).
_BY_CODE = {
    "route_not_found": UNIMPLEMENTED,
    "unknown_host": UNIMPLEMENTED,
    "method_not_allowed": UNIMPLEMENTED,
    "request_timeout": DEADLINE_EXCEEDED,
    "body_too_large": RESOURCE_EXHAUSTED,
    "headers_too_large": RESOURCE_EXHAUSTED,
    "uri_too_long": RESOURCE_EXHAUSTED,
    "rate_limited": RESOURCE_EXHAUSTED,
    "request_buffer_full": RESOURCE_EXHAUSTED,
    "too_many_connections": RESOURCE_EXHAUSTED,
    "hook_config_invalid": INTERNAL,
    "internal_error": INTERNAL,
    "hook_failed": INTERNAL,
    "upstream_timeout": DEADLINE_EXCEEDED,
    "upstream_connect_timeout": UNAVAILABLE,
    "upstream_headers_too_large": INTERNAL,
    "grpc_timeout_invalid": INVALID_ARGUMENT,
    "grpc_deadline_exceeded": DEADLINE_EXCEEDED,
}


def grpcStatus(code: str | None, httpStatus: int) -> int:
    """
    The gRPC status of a refusal with monedge's error C{code} (or a hook's
    code, or L{None}) and HTTP status C{httpStatus}: the code's own entry
    if it has one, else gRPC's HTTP mapping, else UNKNOWN.
    """
    if code is not None:
        status = _BY_CODE.get(code)
        if status is not None:
            return status
    return _BY_HTTP_STATUS.get(httpStatus, UNKNOWN)


def grpcMessage(text: str) -> bytes:
    """
    C{text} as a C{grpc-message} value: UTF-8, percent-encoded as gRPC
    requires (every byte outside printable ASCII, and C{%} itself).
    """
    return quote(text, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~").encode("ascii")


def parseGrpcStatus(value: bytes) -> int:
    """
    The status a C{grpc-status} value stands for: a number from 0 to 16;
    anything else, which no gRPC client would read, is UNKNOWN.

    >>> parseGrpcStatus(b"5"), parseGrpcStatus(b"99")
    (5, 2)
    """
    try:
        status = int(value)
    except ValueError:
        return UNKNOWN
    return status if 0 <= status <= 16 else UNKNOWN


#: grpc-timeout: up to 8 digits and a unit.
_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])\Z")
_UNITS = {
    b"H": 3600.0,
    b"M": 60.0,
    b"S": 1.0,
    b"m": 1e-3,
    b"u": 1e-6,
    b"n": 1e-9,
}


def parseGrpcTimeout(value: bytes) -> float | None:
    """
    A C{grpc-timeout} value in seconds, or L{None} if it is malformed.

    >>> parseGrpcTimeout(b"250m")
    0.25
    """
    match = _TIMEOUT.match(value.strip())
    if match is None:
        return None
    return int(match.group(1)) * _UNITS[match.group(2)]


def formatGrpcTimeout(seconds: float) -> bytes:
    """
    C{seconds} as a C{grpc-timeout} value: whole milliseconds, rounded up
    (so a deadline never looks passed before it has), or whole seconds,
    hours beyond what 8 digits of them hold.

    >>> formatGrpcTimeout(0.25)
    b'250m'
    """
    millis = -(-seconds * 1000 // 1)
    if millis < 100_000_000:
        return b"%dm" % (millis,)
    whole = -(-seconds // 1)
    if whole < 100_000_000:
        return b"%dS" % (whole,)
    return b"%dH" % (min(-(-seconds // 3600), 99_999_999),)
