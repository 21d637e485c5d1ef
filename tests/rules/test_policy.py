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
    parsePolicy,
)


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
            requestBuffering=True,
            expose=False,
            tunnelIdleTimeout=5.0,
            protocol="h2c",
            streamIdleTimeout=6.0,
        )
        self.assertEqual(
            policy.asJSON(),
            {
                "connect-timeout": 1.0,
                "timeout": 2.0,
                "idle-timeout": 3.0,
                "strip-prefix": False,
                "max-body-size": 4,
                "request-buffering": True,
                "expose": False,
                "tunnel-idle-timeout": 5.0,
                "upstream-ca": None,
                "upstream-server-name": None,
                "upstream-client-certificate": None,
                "protocol": "h2c",
                "stream-idle-timeout": 6.0,
                "hooks": [],
            },
        )
        self.assertEqual(parsePolicy(policy.asJSON()), policy)


class ProtocolKeyTests(SynchronousTestCase):
    """
    The C{protocol} key: what a service's endpoints speak.
    """

    def test_values(self) -> None:
        """
        C{http1} (the default), C{h2c} and C{h2} are read in any case; any
        other value is refused naming the key.
        """
        self.assertEqual(Policy().protocol, "http1")
        self.assertEqual(parsePolicy({"protocol": " H2C "}).protocol, "h2c")
        self.assertEqual(parsePolicy({"protocol": "h2"}).protocol, "h2")
        for bad in ("http2", "", 2, None):
            with self.assertRaises(PolicyError) as caught:
                parsePolicy({"protocol": bad})
            self.assertEqual(caught.exception.field, "protocol")


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
