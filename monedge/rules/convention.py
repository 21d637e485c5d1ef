"""
The naming convention: how a request's Host and first path segment name a
service, and how that service is named on Kubernetes.

    Host ``api.example.com``, path ``/foo/bar``  ->  ``service.api.foo``
    ``service.api.foo``                          ->  Kubernetes Service ``service-api-foo``

This module is pure: no I/O, no Twisted.  Everything that decides *which*
service a request may reach lives here, so that one table in
``docs/convention.md`` describes all of it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

#: RFC 1035 label: a lowercase letter, then letters, digits and ``-``, not
#: ending in ``-``, at most 63 characters.  Not case-folded: ``/Foo`` is no
#: route.
_LABEL = re.compile(r"[a-z](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")

#: A tier is a single label with no ``-``, so that ``service-<tier>-<name>``
#: splits back into exactly one (tier, name) pair.
_TIER = re.compile(r"[a-z][a-z0-9]{0,62}\Z")

#: A Host's name part: RFC 3986 reg-name characters (no userinfo, no
#: delimiters, no controls), or an IPv4 address, which fits the same set.
_REG_NAME = re.compile(r"[a-z0-9._~!$&'()*+,;=-]+\Z")
_PORT = re.compile(r":[0-9]{1,5}\Z")

DEFAULT_TIER = "api"
SERVICE_PREFIX = "service"

#: The longest a Kubernetes Service name may be (an RFC 1035 label).
KUBERNETES_NAME_MAX = 63


def isValidName(name: str) -> bool:
    """
    Is C{name} (a first path segment) a valid service name label?
    """
    return _LABEL.match(name) is not None


def isValidTier(tier: str) -> bool:
    """
    Is C{tier} a valid tier: one lowercase label with no C{-}?
    """
    return _TIER.match(tier) is not None


def serviceName(tier: str, name: str) -> str:
    """
    The registry name of the service for C{name} in C{tier}.

    >>> serviceName("api", "foo")
    'service.api.foo'
    """
    return f"{SERVICE_PREFIX}.{tier}.{name}"


def parseServiceName(service: str) -> tuple[str, str] | None:
    """
    Split a registry name into C{(tier, name)}, or L{None} if it does not
    follow the convention (and so can never be routed to).
    """
    parts = service.split(".")
    if len(parts) != 3 or parts[0] != SERVICE_PREFIX:
        return None
    tier, name = parts[1], parts[2]
    if not (isValidTier(tier) and isValidName(name)):
        return None
    return tier, name


def kubernetesName(service: str) -> str | None:
    """
    The Kubernetes Service name for a registry name: C{service.api.foo} is
    C{service-api-foo}.  L{None} if the service does not follow the
    convention or its name would not fit a Kubernetes name.
    """
    parsed = parseServiceName(service)
    if parsed is None:
        return None
    result = f"{SERVICE_PREFIX}-{parsed[0]}-{parsed[1]}"
    if len(result) > KUBERNETES_NAME_MAX:
        return None
    return result


def serviceFromKubernetesName(kname: str) -> str | None:
    """
    The registry name for a Kubernetes Service name, the inverse of
    L{kubernetesName}: C{service-api-foo} is C{service.api.foo}.  Because a
    tier has no C{-}, the split is unambiguous.  L{None} if C{kname} does
    not follow the convention.
    """
    prefix = SERVICE_PREFIX + "-"
    if not kname.startswith(prefix) or len(kname) > KUBERNETES_NAME_MAX:
        return None
    tier, sep, name = kname[len(prefix) :].partition("-")
    if not sep or not isValidTier(tier) or not isValidName(name):
        return None
    return serviceName(tier, name)


def normaliseHost(host: bytes | None) -> str | None:
    """
    The comparable form of a Host header value: lowercased, without the port
    or a trailing dot.  L{None} if the value cannot be a host name: anything
    but RFC 3986 reg-name characters (so no userinfo, C{/}, C{?}, C{#},
    space or control character) or a percent-escape (which one hop would
    decode and another not), an empty label, or brackets around no IPv6
    address.

    IPv6 literals keep their brackets: C{[::1]:80} is C{[::1]}.
    """
    if not host:
        return None
    try:
        text = host.decode("ascii").lower()
    except UnicodeDecodeError:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        rest = text[end + 1 :]
        if rest and not _PORT.match(rest):
            return None
        try:
            ipaddress.IPv6Address(text[1:end])
        except ValueError:
            return None
        return text[: end + 1]
    hostname, sep, port = text.partition(":")
    if sep and not _PORT.match(sep + port):
        return None
    hostname = hostname.removesuffix(".")
    if (
        not _REG_NAME.match(hostname)
        or hostname.startswith(".")
        or hostname.endswith(".")
        or ".." in hostname
    ):
        return None
    return hostname


@dataclass(frozen=True)
class HostTiers:
    """
    Which tier each Host serves.

    With no mapping, every host serves L{DEFAULT_TIER}.  Once any mapping is
    given, a host that matches none serves nothing: there is no fallback.

    @ivar mapping: lowercased host name (no port, no trailing dot) to tier.
    """

    mapping: Mapping[str, str]

    @classmethod
    def fromPairs(cls, pairs: Iterable[tuple[str, str]]) -> HostTiers:
        """
        Build from C{(host, tier)} pairs, validating both.

        @raise ValueError: with a one-line reason, for a bad host or tier.
        """
        mapping: dict[str, str] = {}
        for host, tier in pairs:
            normal = normaliseHost(host.encode("ascii", "replace"))
            if normal is None or normal != host.lower().rstrip("."):
                raise ValueError(
                    f"invalid host {host!r}: give a bare host name, no port"
                )
            if not isValidTier(tier):
                raise ValueError(
                    f"invalid tier {tier!r} for {host}: a tier is one lowercase label"
                    " of letters and digits, with no '-'"
                )
            if normal in mapping and mapping[normal] != tier:
                raise ValueError(f"host {host} is mapped twice")
            mapping[normal] = tier
        return cls(MappingProxyType(mapping))

    def tierFor(self, host: str | None) -> str | None:
        """
        The tier that C{host} (already normalised) serves, or L{None} if it
        serves none.
        """
        if not self.mapping:
            return DEFAULT_TIER
        if host is None:
            return None
        return self.mapping.get(host)

    def tiers(self) -> frozenset[str]:
        """
        Every tier that some host serves.
        """
        if not self.mapping:
            return frozenset([DEFAULT_TIER])
        return frozenset(self.mapping.values())
