"""
The grammar of the C{auth} hook's option values, shared by its three modes:
header names (never one monedge owns), names that must be identity headers,
durations with floors, C{http}/C{https} URLs and one-or-more strings.  Each
parser raises L{HookConfigError} naming the option.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from monedge.hooks import HookConfigError
from monedge.rules.headers import HOP_BY_HOP
from monedge.rules.redact import redactURL
from monedge.rules.syntax import isToken, parseDuration

#: Control characters: refused in URLs, and made spaces in header values.
CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: Header names an identity, forwarded or copied header may not have:
#: framing and routing that monedge owns.
RESERVED = frozenset([*HOP_BY_HOP, b"host", b"content-length", b"expect"])


def headerName(value: object, option: str) -> bytes:
    """
    A header name that monedge does not own.
    """
    if not isToken(value):
        raise HookConfigError(f"{option}: invalid header name {value!r}")
    if value.lower().encode("ascii") in RESERVED:
        raise HookConfigError(f"{option}: {value} is a header monedge owns")
    return value.encode("ascii")


def headerNames(value: object, option: str) -> tuple[bytes, ...]:
    """
    A list of L{headerName}s.
    """
    if not isinstance(value, list):
        raise HookConfigError(f"{option}: expected a list of header names")
    return tuple(headerName(v, option) for v in value)


def identityHeader(name: bytes, identity: frozenset[bytes], option: str) -> bytes:
    """
    C{name}, which must be one of the (lower-cased) C{identity} headers:
    only those does the hook strip from what the client sent.
    """
    if name.lower() not in identity:
        raise HookConfigError(
            f"{option}: {name.decode()} must be listed in identity-headers"
        )
    return name


def seconds(
    value: object, option: str, zero: bool = False, least: float = 0.0
) -> float:
    """
    A duration in seconds (L{parseDuration}), or 0 if C{zero} allows it, and
    at least C{least}.
    """
    if zero and not isinstance(value, bool) and value in (0, "0", "0s"):
        result = 0.0
    else:
        try:
            result = parseDuration(value)
        except ValueError as e:
            raise HookConfigError(f"{option}: {e}") from None
    if result < least:
        raise HookConfigError(
            f"{option}: must be at least {least:g} s, got {result:g} s"
        )
    return result


def httpURL(value: object, option: str) -> str:
    """
    An C{http} or C{https} URL with a host and no user-info; errors show it
    redacted.
    """
    if not isinstance(value, str):
        raise HookConfigError(f"{option}: expected an http or https URL")
    try:
        parts = urlsplit(value)
        valid = (
            parts.scheme in ("http", "https")
            and bool(parts.hostname)
            and (parts.port is None or parts.port > 0)
        )
    except ValueError:  # A malformed IPv6 literal or port.
        valid = False
    if not valid or CONTROL.search(value) or " " in value:
        raise HookConfigError(
            f"{option}: expected an http or https URL, got {redactURL(value)!r}"
        )
    if "@" in parts.netloc:
        # The HTTP client would not send them: refused rather than failing
        # every request.
        raise HookConfigError(
            f"{option}: credentials in the URL (user:password@) are not"
            f" supported, got {redactURL(value)!r}"
        )
    return value


def strings(value: object, option: str) -> str | tuple[str, ...]:
    """
    A non-empty string, or a non-empty list of them (as a tuple).
    """
    if isinstance(value, str) and value:
        return value
    if (
        isinstance(value, list)
        and value
        and all(isinstance(v, str) and v for v in value)
    ):
        return tuple(value)
    raise HookConfigError(f"{option}: expected a string or a list of strings")
