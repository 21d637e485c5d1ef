"""
Tests for L{monedge.rules.trust}: which peers are trusted, and who the client
is.
"""

from __future__ import annotations

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from monedge.rules.trust import Trust, forwardedEntries, parseAddress, parseNetwork


class ParseTests(SynchronousTestCase):
    """
    Ranges and addresses as options and headers give them.
    """

    def test_network(self) -> None:
        """
        A CIDR range, an IPv6 range and a bare address each parse; host
        bits set in a range are accepted as the range.
        """
        self.assertEqual(parseNetwork("10.0.0.0/8"), ipaddress.ip_network("10.0.0.0/8"))
        self.assertEqual(parseNetwork(" fd00::/8 "), ipaddress.ip_network("fd00::/8"))
        self.assertEqual(
            parseNetwork("192.0.2.7"), ipaddress.ip_network("192.0.2.7/32")
        )
        self.assertEqual(parseNetwork("10.1.2.3/8"), ipaddress.ip_network("10.0.0.0/8"))

    def test_badNetwork(self) -> None:
        """
        Anything else is a ValueError whose message names the value.
        """
        for text in ("", "10.0.0.0/33", "example.com", "10.0.0.0/8/8", "::/129"):
            with self.assertRaises(ValueError) as e:
                parseNetwork(text)
            self.assertIn(repr(text), str(e.exception))

    def test_address(self) -> None:
        """
        Addresses with and without ports and brackets parse; an IPv4-mapped
        IPv6 address is its IPv4 address; names and garbage do not parse.
        """
        cases = {
            b"192.0.2.1": "192.0.2.1",
            b" 192.0.2.1:5678 ": "192.0.2.1",
            b"2001:db8::1": "2001:db8::1",
            b"[2001:db8::1]:443": "2001:db8::1",
            b"[2001:db8::1]": "2001:db8::1",
            b"::ffff:10.0.0.1": "10.0.0.1",
        }
        for entry, expected in cases.items():
            self.assertEqual(parseAddress(entry), ipaddress.ip_address(expected))
        for entry in (b"unknown", b"example.com", b"[2001:db8::1", b"\xff", b""):
            self.assertIsNone(parseAddress(entry), entry)

    def test_forwardedEntries(self) -> None:
        """
        Every line is split on commas, entries are stripped and empty ones
        dropped, in order.
        """
        self.assertEqual(forwardedEntries(None), [])
        self.assertEqual(
            forwardedEntries([b"1.1.1.1, ,2.2.2.2", b" 3.3.3.3 ", b","]),
            [b"1.1.1.1", b"2.2.2.2", b"3.3.3.3"],
        )


class TrustTests(SynchronousTestCase):
    """
    L{Trust.trusts} and L{Trust.chain}: the walk back from the peer.
    """

    def test_noHops(self) -> None:
        """
        With no trusted hops nothing is trusted, whatever the ranges: the
        chain is the peer alone.
        """
        trust = Trust.fromOptions(0, ["0.0.0.0/0"])
        self.assertFalse(trust.trusts(b"10.0.0.1"))
        self.assertEqual(trust.chain([b"1.2.3.4"], b"10.0.0.1"), [b"10.0.0.1"])

    def test_countAlone(self) -> None:
        """
        Without ranges any peer is a proxy, and the last N entries are
        kept before the peer (the count alone decides, as before
        --trusted-proxies).
        """
        trust = Trust(2)
        self.assertTrue(trust.trusts(b"203.0.113.9"))
        self.assertEqual(
            trust.chain([b"6.6.6.6, 1.2.3.4", b"10.0.0.5"], b"203.0.113.9"),
            [b"1.2.3.4", b"10.0.0.5", b"203.0.113.9"],
        )
        self.assertEqual(trust.chain(None, b"203.0.113.9"), [b"203.0.113.9"])

    def test_untrustedPeer(self) -> None:
        """
        A peer outside the ranges is not trusted, and what it sent is not
        believed: the chain is the peer alone.
        """
        trust = Trust.fromOptions(1, ["10.0.0.0/8"])
        self.assertFalse(trust.trusts(b"192.0.2.7"))
        self.assertEqual(trust.chain([b"1.2.3.4"], b"192.0.2.7"), [b"192.0.2.7"])

    def test_walkStopsAtUntrusted(self) -> None:
        """
        The walk takes the last entry while the address at hand is a
        trusted proxy's, and stops at the first that is not (which is the
        client), however many hops remain.
        """
        trust = Trust.fromOptions(5, ["10.0.0.0/8"])
        self.assertEqual(
            trust.chain([b"6.6.6.6, 1.2.3.4, 10.0.0.5"], b"10.0.0.1"),
            [b"1.2.3.4", b"10.0.0.5", b"10.0.0.1"],
        )

    def test_walkStopsAtHops(self) -> None:
        """
        The walk takes at most N entries, even through trusted addresses.
        """
        trust = Trust.fromOptions(2, ["10.0.0.0/8"])
        self.assertEqual(
            trust.chain([b"10.0.0.9, 10.0.0.8, 10.0.0.7"], b"10.0.0.1"),
            [b"10.0.0.8", b"10.0.0.7", b"10.0.0.1"],
        )

    def test_ipv6AndMapped(self) -> None:
        """
        IPv6 ranges match IPv6 peers; an IPv4-mapped peer (a dual-stack
        listener's) matches IPv4 ranges; an address never matches a range
        of the other version.
        """
        trust = Trust.fromOptions(1, ["fd00::/8", "10.0.0.0/8"])
        self.assertTrue(trust.trusts(b"fd00::1"))
        self.assertTrue(trust.trusts(b"::ffff:10.1.2.3"))
        self.assertFalse(trust.trusts(b"2001:db8::1"))
        self.assertFalse(trust.trusts(b"unknown"))

    def test_cacheBounded(self) -> None:
        """
        Trust decisions are remembered for at most a bounded number of
        addresses, and stay right after the memory is cleared.
        """
        trust = Trust.fromOptions(1, ["10.0.0.0/8"])
        for i in range(5000):
            address = b"10.0.%d.%d" % (i // 256, i % 256)
            self.assertTrue(trust.trusts(address))
        self.assertLessEqual(len(trust._cache), 4096)
        self.assertFalse(trust.trusts(b"192.0.2.1"))
        self.assertTrue(trust.trusts(b"10.0.0.1"))
