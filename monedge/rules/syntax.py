"""
The grammar of the values monedge reads from options and requests, in one
place: every option parser and hook uses these rather than its own copy.

  - header names are RFC 9110 tokens (L{isToken});
  - a bearer credential is the one C{Authorization: Bearer} value of RFC
    6750 (L{bearerToken}).

Durations, sizes and booleans are the policy grammar's
(L{monedge.rules.policy.parseDuration}, C{parseSize}, C{parseBool}).

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TypeGuard

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
