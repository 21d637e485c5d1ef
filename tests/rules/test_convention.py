"""
Tests for L{monedge.rules.convention}: service names, Kubernetes names, Host
normalisation and the host-to-tier mapping.
"""

from __future__ import annotations

import random
import string

from twisted.trial.unittest import SynchronousTestCase

from monedge.rules.convention import (
    DEFAULT_TIER,
    KUBERNETES_NAME_MAX,
    HostTiers,
    isValidName,
    isValidTier,
    kubernetesName,
    normaliseHost,
    parseServiceName,
    serviceFromKubernetesName,
    serviceName,
)


class IsValidNameTests(SynchronousTestCase):
    """
    L{isValidName} accepts exactly RFC 1035 labels in lowercase.
    """

    def test_valid(self) -> None:
        """
        Lowercase labels starting with a letter, with digits and inner
        hyphens, up to 63 characters, are valid names.
        """
        for name in [
            "a",
            "foo",
            "foo-bar",
            "a1",
            "a-1",
            "x" * 63,
            "a" + "-" * 61 + "b",
        ]:
            self.assertTrue(isValidName(name), name)

    def test_invalid(self) -> None:
        """
        Empty, uppercase, leading digit or hyphen, trailing hyphen, dots,
        underscores, non-ASCII, whitespace, trailing newline and
        over-long names are not valid names.
        """
        for name in [
            "",
            "Foo",
            "fOo",
            "1foo",
            "-foo",
            "foo-",
            "foo.bar",
            "foo_bar",
            "foo bar",
            "foo\n",
            "\nfoo",
            "caf\u00e9",
            "x" * 64,
            "%66oo",
            "foo/bar",
        ]:
            self.assertFalse(isValidName(name), repr(name))


class IsValidTierTests(SynchronousTestCase):
    """
    L{isValidTier} accepts one lowercase label with no hyphen.
    """

    def test_valid(self) -> None:
        """
        Lowercase letters then letters or digits, up to 63 characters, are
        valid tiers.
        """
        for tier in ["api", "a", "internal2", "t" * 63]:
            self.assertTrue(isValidTier(tier), tier)

    def test_invalid(self) -> None:
        """
        A tier with a hyphen, uppercase, a leading digit, a dot, a trailing
        newline, nothing at all, or more than 63 characters is invalid.
        """
        for tier in ["", "a-b", "api-", "API", "1api", "a.b", "api\n", "t" * 64]:
            self.assertFalse(isValidTier(tier), repr(tier))


class ServiceNameTests(SynchronousTestCase):
    """
    L{serviceName} and L{parseServiceName} build and split registry names.
    """

    def test_serviceName(self) -> None:
        """
        The registry name is C{service.<tier>.<name>}.
        """
        self.assertEqual(serviceName("api", "foo"), "service.api.foo")
        self.assertEqual(serviceName("internal", "a-b"), "service.internal.a-b")

    def test_parseValid(self) -> None:
        """
        A conventional registry name splits into its (tier, name).
        """
        self.assertEqual(parseServiceName("service.api.foo"), ("api", "foo"))
        self.assertEqual(parseServiceName("service.web2.foo-bar"), ("web2", "foo-bar"))

    def test_parseInvalid(self) -> None:
        """
        Names with the wrong prefix, the wrong number of parts, an invalid
        tier or an invalid name do not parse.
        """
        for service in [
            "",
            "service",
            "service.api",
            "service.api.foo.bar",
            "services.api.foo",
            "Service.api.foo",
            "svc.api.foo",
            "service.a-b.foo",
            "service.API.foo",
            "service.api.Foo",
            "service.api.",
            "service..foo",
            "service.api.foo-",
        ]:
            self.assertIsNone(parseServiceName(service), service)

    def test_roundTrip(self) -> None:
        """
        Parsing a built name gives back the tier and name it was built from.
        """
        for tier, name in [("api", "foo"), ("x", "a-b-c"), ("t1", "n" * 63)]:
            self.assertEqual(parseServiceName(serviceName(tier, name)), (tier, name))


class KubernetesNameTests(SynchronousTestCase):
    """
    L{kubernetesName} and L{serviceFromKubernetesName} map between registry
    names and Kubernetes Service names.
    """

    def test_kubernetesName(self) -> None:
        """
        C{service.api.foo} is the Kubernetes Service C{service-api-foo}.
        """
        self.assertEqual(kubernetesName("service.api.foo"), "service-api-foo")
        self.assertEqual(kubernetesName("service.web.a-b"), "service-web-a-b")

    def test_kubernetesNameUnconventional(self) -> None:
        """
        A registry name that does not follow the convention has no
        Kubernetes name.
        """
        for service in ["foo", "service.api", "service.a-b.foo", "service.api.Foo"]:
            self.assertIsNone(kubernetesName(service), service)

    def test_kubernetesNameTooLong(self) -> None:
        """
        A name whose Kubernetes form would exceed 63 characters has none;
        one of exactly 63 characters is kept.
        """
        prefix = "service-api-"
        fits = "n" * (KUBERNETES_NAME_MAX - len(prefix))
        self.assertEqual(kubernetesName("service.api." + fits), prefix + fits)
        self.assertEqual(len(prefix + fits), KUBERNETES_NAME_MAX)
        self.assertIsNone(kubernetesName("service.api." + fits + "n"))

    def test_serviceFromKubernetesName(self) -> None:
        """
        The first C{-} after the prefix ends the tier (a tier has none); the
        rest, hyphens included, is the name.
        """
        self.assertEqual(
            serviceFromKubernetesName("service-api-foo"), "service.api.foo"
        )
        self.assertEqual(
            serviceFromKubernetesName("service-api-foo-bar"), "service.api.foo-bar"
        )

    def test_serviceFromKubernetesNameInvalid(self) -> None:
        """
        Kubernetes names that do not follow the convention, or are longer
        than 63 characters, map to no service.
        """
        for kname in [
            "",
            "service",
            "service-",
            "service-api",
            "service-api-",
            "service--foo",
            "service-api--foo",
            "service-api-foo-",
            "Service-api-foo",
            "svc-api-foo",
            "service.api.foo",
            "service-API-foo",
            "service-api-" + "n" * (KUBERNETES_NAME_MAX - len("service-api-") + 1),
        ]:
            self.assertIsNone(serviceFromKubernetesName(kname), kname)

    def test_roundTrip(self) -> None:
        """
        For many generated conventional names, mapping to Kubernetes and
        back gives the same registry name, and the Kubernetes name is a
        valid RFC 1035 label; names too long for Kubernetes map to None.
        """
        rng = random.Random(20261125)
        tierChars = string.ascii_lowercase + string.digits
        nameChars = tierChars + "-"
        checked = 0
        for _ in range(500):
            tier = rng.choice(string.ascii_lowercase) + "".join(
                rng.choice(tierChars) for _ in range(rng.randint(0, 12))
            )
            middle = "".join(rng.choice(nameChars) for _ in range(rng.randint(0, 60)))
            name = rng.choice(string.ascii_lowercase) + middle
            if len(name) > 1:
                name = name[:-1] + rng.choice(tierChars)
            service = serviceName(tier, name)
            self.assertEqual(parseServiceName(service), (tier, name))
            kname = kubernetesName(service)
            expected = f"service-{tier}-{name}"
            if len(expected) > KUBERNETES_NAME_MAX:
                self.assertIsNone(kname, service)
                self.assertIsNone(serviceFromKubernetesName(expected), expected)
                continue
            self.assertEqual(kname, expected)
            assert kname is not None
            self.assertTrue(isValidName(kname), kname)
            self.assertEqual(serviceFromKubernetesName(kname), service)
            checked += 1
        self.assertGreater(checked, 100)


class NormaliseHostTests(SynchronousTestCase):
    """
    L{normaliseHost} gives the comparable form of a Host header value.
    """

    def test_plain(self) -> None:
        """
        A bare host name is returned lowercased.
        """
        self.assertEqual(normaliseHost(b"api.example.com"), "api.example.com")
        self.assertEqual(normaliseHost(b"API.Example.COM"), "api.example.com")
        self.assertEqual(normaliseHost(b"localhost"), "localhost")
        self.assertEqual(normaliseHost(b"127.0.0.1"), "127.0.0.1")

    def test_port(self) -> None:
        """
        A numeric port is dropped.
        """
        self.assertEqual(normaliseHost(b"api.example.com:8080"), "api.example.com")
        self.assertEqual(normaliseHost(b"Localhost:30080"), "localhost")
        self.assertEqual(normaliseHost(b"127.0.0.1:80"), "127.0.0.1")

    def test_trailingDot(self) -> None:
        """
        A trailing dot (the root label) is dropped, with or without a port.
        """
        self.assertEqual(normaliseHost(b"api.example.com."), "api.example.com")
        self.assertEqual(normaliseHost(b"api.example.com.:443"), "api.example.com")

    def test_ipv6(self) -> None:
        """
        IPv6 literals keep their brackets and lose their port.
        """
        self.assertEqual(normaliseHost(b"[::1]"), "[::1]")
        self.assertEqual(normaliseHost(b"[::1]:80"), "[::1]")
        self.assertEqual(normaliseHost(b"[2001:DB8::1]:8443"), "[2001:db8::1]")

    def test_ipv6Malformed(self) -> None:
        """
        An unterminated bracket, or anything but a numeric port after the
        bracket, is not a host.
        """
        for host in [b"[::1", b"[::1]x", b"[::1]:", b"[::1]:80:90", b"[::1]:http"]:
            self.assertIsNone(normaliseHost(host), host)

    def test_empty(self) -> None:
        """
        No value, an empty value, only a port or only dots is not a host.
        """
        for host in [None, b"", b":80", b".", b"..", b".:80"]:
            self.assertIsNone(normaliseHost(host), host)

    def test_userinfo(self) -> None:
        """
        A value with userinfo (C{@}) is refused, so C{evil@good} can never
        be compared as either.
        """
        for host in [b"user@api.example.com", b"user:pw@host", b"a@b:80"]:
            self.assertIsNone(normaliseHost(host), host)

    def test_badPort(self) -> None:
        """
        A non-numeric or empty port, or a second colon, is refused.
        """
        for host in [b"host:", b"host:http", b"host:80:90", b"host:-1", b"host:+80"]:
            self.assertIsNone(normaliseHost(host), host)

    def test_garbage(self) -> None:
        """
        Slashes, backslashes, spaces and non-ASCII bytes are refused.
        """
        for host in [
            b"host/path",
            b"host\\x",
            b"a b",
            b" host",
            b"host ",
            b"caf\xc3\xa9.example",
            b"\xff",
        ]:
            self.assertIsNone(normaliseHost(host), host)

    def test_controlCharacters(self) -> None:
        """
        A value with a control character (tab, NUL, DEL, CR, LF) cannot be
        a host name, and is refused like a space is.
        """
        hosts = [b"a\tb", b"\x00", b"host\x00", b"a\x01b", b"a\x7fb", b"a\rb", b"a\nb"]
        accepted = {h: normaliseHost(h) for h in hosts if normaliseHost(h) is not None}
        self.assertEqual(accepted, {})

    def test_uriDelimiters(self) -> None:
        """
        C{?} and C{#} end a URI's authority, like C{/} does, so a value
        holding them cannot be a host name, and is refused like C{/} is.
        """
        hosts = [b"a?b", b"good.example?.evil", b"a#b", b"host#:80"]
        accepted = {h: normaliseHost(h) for h in hosts if normaliseHost(h) is not None}
        self.assertEqual(accepted, {})

    def test_percentEscapesAndEmptyLabels(self) -> None:
        """
        A percent-escape (which one hop would decode and another not) and
        an empty last label (two trailing dots) are not host names; one
        trailing dot is.
        """
        hosts = [b"h%2eexample", b"%41pi.example", b"h.example..", b"h.example..:80"]
        accepted = {h: normaliseHost(h) for h in hosts if normaliseHost(h) is not None}
        self.assertEqual(accepted, {})
        self.assertEqual(normaliseHost(b"h.example.:80"), "h.example")

    def test_bracketedNonAddress(self) -> None:
        """
        Brackets hold only an IP literal (hex digits, colons and dots), so
        C{[evil.com]} is not a host.
        """
        hosts = [b"[evil.com]", b"[]", b"[a?b]"]
        accepted = {h: normaliseHost(h) for h in hosts if normaliseHost(h) is not None}
        self.assertEqual(accepted, {})


class HostTiersTests(SynchronousTestCase):
    """
    L{HostTiers} maps hosts to tiers.
    """

    def test_noMappingServesApi(self) -> None:
        """
        With no mapping, every host, and no host at all, serves the default
        tier C{api}.
        """
        tiers = HostTiers.fromPairs([])
        self.assertEqual(DEFAULT_TIER, "api")
        for host in [None, "api.example.com", "anything", "[::1]", ""]:
            self.assertEqual(tiers.tierFor(host), "api", host)
        self.assertEqual(tiers.tiers(), frozenset(["api"]))

    def test_mappingHasNoFallback(self) -> None:
        """
        Once any mapping is given, a mapped host serves its tier and every
        other host (and no host) serves nothing.
        """
        tiers = HostTiers.fromPairs(
            [("api.example.com", "api"), ("internal.example.com", "internal")]
        )
        self.assertEqual(tiers.tierFor("api.example.com"), "api")
        self.assertEqual(tiers.tierFor("internal.example.com"), "internal")
        self.assertIsNone(tiers.tierFor("other.example.com"))
        self.assertIsNone(tiers.tierFor("example.com"))
        self.assertIsNone(tiers.tierFor(None))
        self.assertEqual(tiers.tiers(), frozenset(["api", "internal"]))

    def test_mappingOnlyNonDefault(self) -> None:
        """
        A mapping that never names C{api} does not serve C{api} anywhere.
        """
        tiers = HostTiers.fromPairs([("web.example.com", "web")])
        self.assertIsNone(tiers.tierFor("api.example.com"))
        self.assertEqual(tiers.tiers(), frozenset(["web"]))

    def test_hostsNormalised(self) -> None:
        """
        Hosts in the pairs are lowercased and lose a trailing dot, so they
        match the normalised form of a Host header.
        """
        tiers = HostTiers.fromPairs([("API.Example.COM.", "api")])
        self.assertEqual(tiers.mapping, {"api.example.com": "api"})
        self.assertEqual(tiers.tierFor(normaliseHost(b"api.EXAMPLE.com.:8080")), "api")

    def test_ipv6Host(self) -> None:
        """
        A bracketed IPv6 literal can be mapped.
        """
        tiers = HostTiers.fromPairs([("[::1]", "local")])
        self.assertEqual(tiers.tierFor(normaliseHost(b"[::1]:30080")), "local")

    def test_samePairTwice(self) -> None:
        """
        Repeating a pair, even in another case, is not an error.
        """
        tiers = HostTiers.fromPairs([("a.example", "api"), ("A.example", "api")])
        self.assertEqual(tiers.mapping, {"a.example": "api"})

    def test_hostMappedTwice(self) -> None:
        """
        One host (after normalisation) mapped to two tiers is an error.
        """
        with self.assertRaises(ValueError) as e:
            HostTiers.fromPairs([("a.example", "api"), ("A.example.", "web")])
        self.assertIn("mapped twice", str(e.exception))

    def test_hostWithPort(self) -> None:
        """
        A host with a port is refused: give a bare host name.
        """
        with self.assertRaises(ValueError) as e:
            HostTiers.fromPairs([("api.example.com:8080", "api")])
        self.assertIn("api.example.com:8080", str(e.exception))
        self.assertIn("no port", str(e.exception))

    def test_invalidHosts(self) -> None:
        """
        Empty, userinfo, path, space, non-ASCII and IPv6-with-port hosts are
        refused with a ValueError naming the host.
        """
        for host in ["", "u@h", "h/p", "a b", "caf\u00e9.example", "[::1]:80", "."]:
            with self.assertRaises(ValueError) as e:
                HostTiers.fromPairs([(host, "api")])
            self.assertIn("invalid host", str(e.exception), host)
            self.assertIn(repr(host), str(e.exception))

    def test_invalidTier(self) -> None:
        """
        A tier that is not one lowercase label without C{-} is refused with
        a ValueError naming the tier.
        """
        for tier in ["", "a-b", "API", "1x", "a.b"]:
            with self.assertRaises(ValueError) as e:
                HostTiers.fromPairs([("h.example", tier)])
            self.assertIn(f"invalid tier {tier!r}", str(e.exception))
