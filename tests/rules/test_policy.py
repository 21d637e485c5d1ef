"""
Tests for L{monedge.rules.policy}: the value parsers and per-service policy.
"""

from __future__ import annotations

from dataclasses import fields

from twisted.trial.unittest import SynchronousTestCase

from monedge.rules.policy import (
    DEFAULT_POLICY,
    MIB,
    POLICY_KEYS,
    Policy,
    PolicyError,
    parseBool,
    parseDuration,
    parsePolicy,
    parseSize,
)

WEEK = 7 * 24 * 3600


class ParseDurationTests(SynchronousTestCase):
    """
    L{parseDuration} reads durations in seconds.
    """

    def test_units(self) -> None:
        """
        C{ms}, C{s}, C{m} and C{h} suffixes, and bare numbers of seconds,
        give seconds; whitespace around the parts is allowed.
        """
        for value, seconds in [
            ("30s", 30.0),
            ("500ms", 0.5),
            ("2m", 120.0),
            ("1h", 3600.0),
            ("1.5s", 1.5),
            ("0.25h", 900.0),
            ("45", 45.0),
            ("2.5", 2.5),
            (" 30 s ", 30.0),
            ("1ms", 0.001),
            ("168h", float(WEEK)),
            ("10080m", float(WEEK)),
        ]:
            self.assertAlmostEqual(parseDuration(value), seconds, msg=value)

    def test_numbers(self) -> None:
        """
        YAML ints and floats are seconds.
        """
        self.assertEqual(parseDuration(30), 30.0)
        self.assertIsInstance(parseDuration(30), float)
        self.assertEqual(parseDuration(0.5), 0.5)
        self.assertEqual(parseDuration(WEEK), float(WEEK))

    def test_notPositive(self) -> None:
        """
        Zero and negative durations are refused.
        """
        for value in [0, 0.0, -1, -0.5, "0", "0s", "0ms", "0.0h"]:
            with self.assertRaises(ValueError, msg=repr(value)):
                parseDuration(value)

    def test_tooLong(self) -> None:
        """
        More than seven days is refused; exactly seven days is allowed.
        """
        self.assertEqual(parseDuration("604800s"), float(WEEK))
        for value in [WEEK + 1, WEEK + 0.5, "604801", "169h", "700000000ms"]:
            with self.assertRaises(ValueError, msg=repr(value)):
                parseDuration(value)

    def test_notFinite(self) -> None:
        """
        NaN and infinity are not durations.
        """
        for value in [float("nan"), float("inf"), float("-inf"), "nan", "inf"]:
            with self.assertRaises(ValueError, msg=repr(value)):
                parseDuration(value)

    def test_garbage(self) -> None:
        """
        Booleans, None, unknown units, signs, exponents and other text are
        refused with a message quoting the value.
        """
        values: list[object] = [
            True,
            False,
            None,
            "",
            "s",
            "30 seconds",
            "1d",
            "30S",
            "1e3",
            "+5s",
            "-5s",
            "5s5",
            "1h30m",
            ".5s",
            "5.s",
            [],
            {},
        ]
        for value in values:
            with self.assertRaises(ValueError) as e:
                parseDuration(value)
            self.assertIn(repr(value), str(e.exception))


class ParseSizeTests(SynchronousTestCase):
    """
    L{parseSize} reads byte counts.
    """

    def test_units(self) -> None:
        """
        Binary (KiB, MiB, GiB and nginx-style k, m, g), decimal (KB, MB,
        GB) and byte suffixes, and bare numbers, give bytes.
        """
        for value, size in [
            ("0", 0),
            ("1024", 1024),
            ("1B", 1),
            ("512KiB", 512 * 1024),
            ("10MiB", 10 * MIB),
            ("1GiB", 1 << 30),
            ("10k", 10 * 1024),
            ("10K", 10 * 1024),
            ("10m", 10 * MIB),
            ("10M", 10 * MIB),
            ("2g", 2 << 30),
            ("2G", 2 << 30),
            ("1KB", 1000),
            ("1MB", 1000**2),
            ("1GB", 1000**3),
            (" 10 MiB ", 10 * MIB),
        ]:
            self.assertEqual(parseSize(value), size, value)

    def test_ints(self) -> None:
        """
        YAML ints are bytes.
        """
        self.assertEqual(parseSize(0), 0)
        self.assertEqual(parseSize(4096), 4096)

    def test_negative(self) -> None:
        """
        A negative size is refused.
        """
        for value in [-1, "-1", "-1MiB"]:
            with self.assertRaises(ValueError, msg=repr(value)):
                parseSize(value)

    def test_garbage(self) -> None:
        """
        Booleans, floats, fractions, wrong-case units and other text are
        refused with a message quoting the value.
        """
        for value in [
            True,
            False,
            None,
            1.5,
            10.0,
            "",
            "MiB",
            "1.5MiB",
            "10mib",
            "10kb",
            "10Kb",
            "10 bytes",
            "10TiB",
            "1e6",
            "+10",
        ]:
            with self.assertRaises(ValueError) as e:
                parseSize(value)
            self.assertIn(repr(value), str(e.exception))


class ParseBoolTests(SynchronousTestCase):
    """
    L{parseBool} reads booleans.
    """

    def test_valid(self) -> None:
        """
        YAML booleans and C{true}/C{false} in any case, with surrounding
        whitespace, are booleans.
        """
        for value, expected in [
            (True, True),
            (False, False),
            ("true", True),
            ("false", False),
            ("TRUE", True),
            ("False", False),
            (" true ", True),
        ]:
            self.assertIs(parseBool(value), expected, repr(value))

    def test_invalid(self) -> None:
        """
        Other strings and non-booleans, including 0/1 and yes/no, are
        refused with a message quoting the value.
        """
        values: list[object] = [
            0,
            1,
            None,
            "",
            "yes",
            "no",
            "on",
            "1",
            "t",
            "truee",
            [],
        ]
        for value in values:
            with self.assertRaises(ValueError) as e:
                parseBool(value)
            self.assertIn(repr(value), str(e.exception))


class ParsePolicyTests(SynchronousTestCase):
    """
    L{parsePolicy} applies documented keys over a base policy.
    """

    def test_empty(self) -> None:
        """
        No values give the base policy, by default the documented defaults.
        """
        self.assertEqual(parsePolicy({}), DEFAULT_POLICY)
        self.assertEqual(
            DEFAULT_POLICY,
            Policy(
                connectTimeout=5.0,
                timeout=60.0,
                idleTimeout=60.0,
                stripPrefix=True,
                maxBodySize=10 * MIB,
                expose=True,
            ),
        )

    def test_everyKey(self) -> None:
        """
        Every documented key sets its attribute through its parser.
        """
        policy = parsePolicy(
            {
                "connect-timeout": "250ms",
                "timeout": "30s",
                "idle-timeout": 2,
                "strip-prefix": "false",
                "max-body-size": "1MiB",
                "expose": False,
            }
        )
        self.assertEqual(
            policy,
            Policy(
                connectTimeout=0.25,
                timeout=30.0,
                idleTimeout=2.0,
                stripPrefix=False,
                maxBodySize=MIB,
                expose=False,
            ),
        )

    def test_base(self) -> None:
        """
        Values are applied on top of C{base}; keys not given keep the base's
        values, and the base is not changed.
        """
        base = Policy(timeout=10.0, expose=False)
        policy = parsePolicy({"strip-prefix": False}, base)
        self.assertEqual(policy, Policy(timeout=10.0, expose=False, stripPrefix=False))
        self.assertEqual(base, Policy(timeout=10.0, expose=False))

    def test_unknownKey(self) -> None:
        """
        An unknown key is a L{PolicyError} whose C{field} is that key and
        whose message lists the known keys.
        """
        for key in ["timeuot", "Timeout", "connect_timeout", "connectTimeout"]:
            with self.assertRaises(PolicyError) as e:
                parsePolicy({"timeout": "1s", key: "1s"})
            self.assertEqual(e.exception.field, key)
            message = str(e.exception)
            self.assertTrue(message.startswith(f"{key}: unknown policy key"), message)
            for known in POLICY_KEYS:
                self.assertIn(known, message)

    def test_nonStringKey(self) -> None:
        """
        A non-string key is unknown, its field given as text.
        """
        with self.assertRaises(PolicyError) as e:
            parsePolicy({1: "x"})  # type: ignore[dict-item]
        self.assertEqual(e.exception.field, "1")

    def test_badValue(self) -> None:
        """
        A bad value is a L{PolicyError}, also a L{ValueError}, whose
        C{field} is the key and whose message is C{<key>: <reason>}.
        """
        for key, value in [
            ("connect-timeout", "fast"),
            ("timeout", "0s"),
            ("idle-timeout", "8d"),
            ("strip-prefix", "yes"),
            ("max-body-size", "lots"),
            ("max-body-size", -1),
            ("expose", 1),
        ]:
            with self.assertRaises(PolicyError) as e:
                parsePolicy({key: value})
            self.assertIsInstance(e.exception, ValueError)
            self.assertEqual(e.exception.field, key)
            self.assertTrue(str(e.exception).startswith(f"{key}: "), str(e.exception))
            self.assertIn(repr(value), str(e.exception))

    def test_policyErrorMessage(self) -> None:
        """
        L{PolicyError} prefixes its message with the field.
        """
        error = PolicyError("timeout", "too long")
        self.assertEqual(error.field, "timeout")
        self.assertEqual(str(error), "timeout: too long")


class PolicyJSONTests(SynchronousTestCase):
    """
    L{Policy.asJSON} shows a policy under its documented key names.
    """

    def test_keys(self) -> None:
        """
        The JSON keys are exactly the documented policy keys, and every
        policy attribute has one.
        """
        self.assertEqual(set(DEFAULT_POLICY.asJSON()), set(POLICY_KEYS))
        self.assertEqual(
            {attr for attr, _ in POLICY_KEYS.values()},
            {f.name for f in fields(Policy)},
        )

    def test_values(self) -> None:
        """
        Each key maps to the attribute it names, so that parsing the JSON
        back gives the same policy.
        """
        policy = Policy(
            connectTimeout=1.0,
            timeout=2.0,
            idleTimeout=3.0,
            stripPrefix=False,
            maxBodySize=4,
            expose=False,
            tunnelIdleTimeout=5.0,
        )
        self.assertEqual(
            policy.asJSON(),
            {
                "connect-timeout": 1.0,
                "timeout": 2.0,
                "idle-timeout": 3.0,
                "strip-prefix": False,
                "max-body-size": 4,
                "expose": False,
                "tunnel-idle-timeout": 5.0,
                "upstream-ca": None,
                "upstream-server-name": None,
                "upstream-client-certificate": None,
                "hooks": [],
            },
        )
        self.assertEqual(parsePolicy(policy.asJSON()), policy)


class UpstreamTLSKeyTests(SynchronousTestCase):
    """
    The upstream TLS keys: paths and a DNS name, null for none.
    """

    def test_values(self) -> None:
        """
        Paths are stripped strings; names are lowercased DNS names; null
        means unset; anything else is refused naming the key.
        """
        policy = parsePolicy(
            {
                "upstream-ca": " /etc/ca.pem ",
                "upstream-server-name": "Orders.Payments.SVC",
                "upstream-client-certificate": "client.pem",
            }
        )
        self.assertEqual(
            (
                policy.upstreamCA,
                policy.upstreamServerName,
                policy.upstreamClientCertificate,
            ),
            ("/etc/ca.pem", "orders.payments.svc", "client.pem"),
        )
        self.assertIsNone(parsePolicy({"upstream-ca": None}).upstreamCA)
        for key, bad in [
            ("upstream-ca", ""),
            ("upstream-ca", 3),
            ("upstream-client-certificate", "a\x00b"),
            ("upstream-server-name", "bad_name"),
            ("upstream-server-name", "10.0.0.1:443"),
            ("upstream-server-name", "-x.example"),
        ]:
            error = self.assertRaises(PolicyError, parsePolicy, {key: bad})
            self.assertEqual(error.field, key)
