"""
The grammar of the values monedge reads from options and requests, in one
place: every option parser and hook uses these rather than its own copy.

  - header names are RFC 9110 tokens (L{isToken});
  - a bearer credential is the one C{Authorization: Bearer} value of RFC
    6750 (L{bearerToken});
  - durations (L{parseDuration}), byte sizes (L{parseSize}) and booleans
    (L{parseBool}), as policy keys, hook options and command-line options
    write them.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeGuard

_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*\Z", re.ASCII)
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

_SIZE = re.compile(r"\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|m|M|g|G)?\s*\Z", re.ASCII)
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1 << 10,
    "MiB": 1 << 20,
    "GiB": 1 << 30,
    "k": 1 << 10,
    "K": 1 << 10,
    "m": 1 << 20,
    "M": 1 << 20,
    "g": 1 << 30,
    "G": 1 << 30,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}

#: An RFC 9110 token (a header name, a method): one or more tchars.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")


def isToken(value: object) -> TypeGuard[str]:
    """
    Whether C{value} is a string that is an RFC 9110 token, such as a
    header name.
    """
    return isinstance(value, str) and _TOKEN.match(value) is not None


def bearerToken(authorization: Sequence[bytes] | None) -> bytes | None:
    """
    The bearer token in a request's C{Authorization} header values:
    L{None} if there is none (no header, or another scheme), C{b""} if it
    is malformed (more than one C{Authorization} header, or an empty
    token), else the token.  The scheme is matched without regard to case
    (RFC 9110 11.1).

    @param authorization: every C{Authorization} value, in order.
    """
    if not authorization:
        return None
    bearer = [
        value
        for value in authorization
        if value.strip().split(b" ", 1)[0].lower() == b"bearer"
    ]
    if not bearer:
        return None
    if len(authorization) != 1:
        return b""
    return bearer[0].strip()[len(b"bearer") :].strip()


def parseDuration(value: object) -> float:
    """
    Parse C{30s}, C{500ms}, C{2m}, C{1h} or a bare number of seconds.

    @raise ValueError: for anything else, or a duration that is not positive.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like '30s', got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = _DURATION.match(str(value))
        if match is None:
            raise ValueError(f"expected a duration like '30s', got {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not seconds > 0 or seconds > 7 * 24 * 3600:
        raise ValueError(
            f"a duration must be above 0 and at most 7 days, got {value!r}"
        )
    return seconds


def parseSize(value: object) -> int:
    """
    Parse a byte count: C{10MiB}, C{512KiB}, C{1GB}, C{10m} (nginx style,
    binary) or a bare number of bytes.

    @raise ValueError: for anything else.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '10MiB', got {value!r}")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.match(str(value))
        if match is None:
            raise ValueError(f"expected a size like '10MiB', got {value!r}")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if size < 0:
        raise ValueError(f"a size cannot be negative, got {value!r}")
    return size


def parseBool(value: object) -> bool:
    """
    Parse a YAML boolean or the strings C{true}/C{false} (any case).

    @raise ValueError: for anything else.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"expected true or false, got {value!r}")
