"""
Tests for L{monedge.rules.grpc}: gRPC content-types, the gRPC naming
convention, package prefixes, the refusal status table, C{grpc-message}
encoding and C{grpc-timeout} parsing.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from monedge.rules import grpc
from monedge.rules.errors import CATALOGUE
from monedge.rules.grpc import (
    checkPackagePrefix,
    grpcMessage,
    grpcServiceLabel,
    grpcStatus,
    isGrpcContentType,
    parseGrpcTimeout,
)


class ContentTypeTests(SynchronousTestCase):
    """
    L{isGrpcContentType} accepts gRPC's and gRPC-Web's content-types only.
    """

    def test_grpc(self) -> None:
        """
        application/grpc, with a codec, gRPC-Web's forms, any case and
        parameters are gRPC.
        """
        for value in [
            b"application/grpc",
            b"application/grpc+proto",
            b"application/grpc+json",
            b"application/grpc-web",
            b"application/grpc-web+proto",
            b"application/grpc-web-text",
            b"application/grpc-web-text+proto",
            b"Application/GRPC",
            b"application/grpc; charset=utf-8",
        ]:
            self.assertTrue(isGrpcContentType(value), value)

    def test_notGrpc(self) -> None:
        """
        Other types, look-alikes and no content-type at all are not gRPC.
        """
        for value in [
            None,
            b"",
            b"application/json",
            b"application/grpcx",
            b"application/grpc-webx",
            b"text/grpc",
            b"application/grp",
        ]:
            self.assertFalse(isGrpcContentType(value), value)


class ServiceLabelTests(SynchronousTestCase):
    """
    L{grpcServiceLabel}: the first label of a gRPC call's package names the
    service, after a package prefix is removed.
    """

    def test_firstLabel(self) -> None:
        """
        /<package>.<Service>/<Method> names the package's first label.
        """
        self.assertEqual(grpcServiceLabel(b"/payments.v1.Payments/Create"), "payments")
        self.assertEqual(grpcServiceLabel(b"/payments.Payments/Create"), "payments")
        self.assertEqual(grpcServiceLabel(b"/grpc.health.v1.Health/Check"), "grpc")

    def test_notTheShape(self) -> None:
        """
        A path without a package, with more or fewer segments, a query, or
        characters no identifier has, is not a gRPC route.
        """
        for path in [
            b"/Payments/Create",
            b"/payments.v1.Payments",
            b"/payments.v1.Payments/",
            b"/payments.v1.Payments/Create/x",
            b"/payments.v1.Payments/Create?x=1",
            b"/payments..Payments/Create",
            b"/.Payments/Create",
            b"/pay-ments.v1.Payments/Create",
            b"/",
        ]:
            self.assertIsNone(grpcServiceLabel(path), path)

    def test_invalidName(self) -> None:
        """
        A first label that is not a valid service name (capitals, an
        underscore) routes nowhere.
        """
        self.assertIsNone(grpcServiceLabel(b"/Payments.v1.Payments/Create"))
        self.assertIsNone(grpcServiceLabel(b"/pay_ments.v1.Payments/Create"))

    def test_prefix(self) -> None:
        """
        A prefix is removed when the package starts with it in whole labels;
        the longest matching prefix wins.
        """
        name = b"/com.example.payments.v1.Payments/Create"
        self.assertEqual(grpcServiceLabel(name, ["com.example"]), "payments")
        self.assertEqual(grpcServiceLabel(name), "com")
        self.assertEqual(
            grpcServiceLabel(name, ["com", "com.example"]),
            "payments",
        )
        self.assertEqual(
            grpcServiceLabel(
                b"/com.examples.payments.Payments/Create", ["com.example"]
            ),
            "com",
        )

    def test_prefixLeavesNoPackage(self) -> None:
        """
        A prefix that is the whole package leaves no label: no route.
        """
        self.assertIsNone(
            grpcServiceLabel(b"/com.example.Payments/Create", ["com.example"])
        )

    def test_checkPackagePrefix(self) -> None:
        """
        Dotted identifiers are valid prefixes; empty labels, leading or
        trailing dots and other characters are not.
        """
        self.assertEqual(checkPackagePrefix("com.example"), "com.example")
        self.assertEqual(checkPackagePrefix("io"), "io")
        for bad in ["", ".com", "com.", "com..example", "com/example", "com-x"]:
            self.assertRaises(ValueError, checkPackagePrefix, bad)


class StatusTests(SynchronousTestCase):
    """
    L{grpcStatus}: the gRPC status of each refusal.
    """

    def test_named(self) -> None:
        """
        The codes the convention names have their gRPC statuses.
        """
        self.assertEqual(grpcStatus("no_ready_endpoint", 503), grpc.UNAVAILABLE)
        self.assertEqual(grpcStatus("route_not_found", 404), grpc.UNIMPLEMENTED)
        self.assertEqual(grpcStatus("unauthorized", 401), grpc.UNAUTHENTICATED)
        self.assertEqual(grpcStatus("forbidden", 403), grpc.PERMISSION_DENIED)
        self.assertEqual(grpcStatus("rate_limited", 429), grpc.RESOURCE_EXHAUSTED)
        self.assertEqual(grpcStatus("upstream_timeout", 504), grpc.DEADLINE_EXCEEDED)
        self.assertEqual(grpcStatus("body_too_large", 413), grpc.RESOURCE_EXHAUSTED)
        self.assertEqual(grpcStatus("bad_request", 400), grpc.INTERNAL)
        self.assertEqual(grpcStatus("grpc_timeout_invalid", 400), grpc.INVALID_ARGUMENT)

    def test_httpMapping(self) -> None:
        """
        A code of no entry (a hook's own, or none) follows gRPC's HTTP
        mapping, and UNKNOWN past it.
        """
        self.assertEqual(grpcStatus("my_hook_code", 401), grpc.UNAUTHENTICATED)
        self.assertEqual(grpcStatus(None, 503), grpc.UNAVAILABLE)
        self.assertEqual(grpcStatus(None, 429), grpc.UNAVAILABLE)
        self.assertEqual(grpcStatus(None, 418), grpc.UNKNOWN)

    def test_everyCode(self) -> None:
        """
        Every code of the catalogue has a status other than OK.
        """
        for code, (status, _) in CATALOGUE.items():
            self.assertIn(grpcStatus(code, status), grpc.STATUS_NAMES, code)
            self.assertNotEqual(grpcStatus(code, status), grpc.OK, code)


class MessageTests(SynchronousTestCase):
    """
    L{grpcMessage} percent-encodes as gRPC requires.
    """

    def test_encoding(self) -> None:
        """
        Printable ASCII but % stays; %, controls and non-ASCII are
        percent-encoded (UTF-8).
        """
        self.assertEqual(grpcMessage("route_not_found"), b"route_not_found")
        self.assertEqual(grpcMessage("a b/c"), b"a b/c")
        self.assertEqual(grpcMessage("100%"), b"100%25")
        self.assertEqual(grpcMessage("caf\xe9\n"), b"caf%C3%A9%0A")


class TimeoutTests(SynchronousTestCase):
    """
    L{parseGrpcTimeout} reads grpc-timeout's 1 to 8 digits and a unit.
    """

    def test_units(self) -> None:
        """
        Each unit scales the digits to seconds.
        """
        self.assertEqual(parseGrpcTimeout(b"2H"), 7200.0)
        self.assertEqual(parseGrpcTimeout(b"3M"), 180.0)
        self.assertEqual(parseGrpcTimeout(b"5S"), 5.0)
        self.assertEqual(parseGrpcTimeout(b"250m"), 0.25)
        self.assertAlmostEqual(parseGrpcTimeout(b"1500u") or 0, 0.0015)
        self.assertAlmostEqual(parseGrpcTimeout(b"99999999n") or 0, 0.099999999)

    def test_malformed(self) -> None:
        """
        No unit, an unknown unit, nine digits, a sign, a fraction or
        nothing: malformed.
        """
        for value in [b"", b"5", b"5s", b"5x", b"123456789S", b"-5S", b"1.5S", b"S"]:
            self.assertIsNone(parseGrpcTimeout(value), value)
