"""
Which peers are trusted, and who the client is.

Two options say it, as nginx's C{set_real_ip_from} and C{real_ip_recursive}
and Traefik's C{trustedIPs} do:

- C{--trusted-hops N}: the most proxies in front of monedge whose
  forwarding headers are believed (0: none);
- C{--trusted-proxies CIDR} (repeatable): the addresses those proxies may
  have.  Without it, any address may be one (the count alone decides).

The client is found by walking back from the TCP peer: while fewer than N
hops have been taken and the address at hand is a trusted proxy's, the
previous address is the last C{X-Forwarded-For} entry that proxy appended.
The first address that is not a trusted proxy's, or the one reached after
N hops, is the client's.  Everything the client wrote before it is dropped.

Pure: no I/O and no reactor.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: The most addresses whose trust is remembered at once.
_CACHE_SIZE = 4096


def parseNetwork(text: str) -> Network:
    """
    A CIDR range (C{10.0.0.0/8}, C{fd00::/8}) or a single address.

    @raise ValueError: with a message naming C{text}.
    """
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"expected a CIDR range such as 10.0.0.0/8 or an address, got {text!r}"
        ) from None


def parseAddress(
    entry: bytes,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """
    The IP address in a peer address or an C{X-Forwarded-For} entry
    (C{192.0.2.1}, C{192.0.2.1:5678}, C{2001:db8::1}, C{[2001:db8::1]:443});
    an IPv4-mapped IPv6 address as its IPv4 address; L{None} for anything
    else (C{unknown}, a name, garbage).
    """
    text = entry.strip()
    if text.startswith(b"["):
        end = text.find(b"]")
        if end < 0:
            return None
        text = text[1:end]
    elif text.count(b":") == 1:
        text = text.partition(b":")[0]
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def forwardedEntries(values: Iterable[bytes] | None) -> list[bytes]:
    """
    The entries of every C{X-Forwarded-For} line, in order, empty ones
    dropped.
    """
    entries: list[bytes] = []
    if values:
        for value in values:
            entries.extend(e.strip() for e in value.split(b",") if e.strip())
    return entries


@dataclass(frozen=True)
class Trust:
    """
    The trusted hops and the ranges they may come from.

    @ivar hops: C{--trusted-hops}.
    @ivar proxies: C{--trusted-proxies}; empty for any address.
    """

    hops: int = 0
    proxies: tuple[Network, ...] = ()
    _cache: dict[bytes, bool] = field(
        default_factory=dict, compare=False, repr=False, hash=False
    )

    @classmethod
    def fromOptions(cls, hops: int, proxies: Sequence[str]) -> Trust:
        """
        From the options' values.

        @raise ValueError: for a range that does not parse.
        """
        return cls(hops, tuple(parseNetwork(p) for p in proxies))

    def isProxy(self, address: bytes) -> bool:
        """
        Whether C{address} may be a trusted proxy's (remembered, boundedly:
        a proxy sees few distinct peers).
        """
        if not self.proxies:
            return True
        cache = self._cache
        known = cache.get(address)
        if known is None:
            parsed = parseAddress(address)
            known = parsed is not None and any(
                parsed.version == net.version and parsed in net for net in self.proxies
            )
            if len(cache) >= _CACHE_SIZE:
                cache.clear()
            cache[address] = known
        return known

    def trusts(self, peer: bytes) -> bool:
        """
        Whether headers from C{peer} (the TCP peer) are believed: there are
        trusted hops, and the peer is in the trusted ranges.
        """
        return self.hops > 0 and self.isProxy(peer)

    def chain(self, forwardedFor: Iterable[bytes] | None, peer: bytes) -> list[bytes]:
        """
        The addresses to send upstream as C{X-Forwarded-For}: the client
        (first), the trusted proxies after it, and C{peer} (last).

        @param forwardedFor: the client side's C{X-Forwarded-For} lines.
        """
        if not self.trusts(peer):
            return [peer]
        entries = forwardedEntries(forwardedFor)
        kept = [peer]
        current = peer
        for _ in range(self.hops):
            if not entries or not self.isProxy(current):
                break
            current = entries.pop()
            kept.append(current)
        kept.reverse()
        return kept
