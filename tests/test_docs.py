"""
The operator docs stay true: every example table and example block in
docs/convention.md, docs/errors.md, docs/configuration.md and
docs/annotations.md is checked against the code it describes (docs/hooks.md
is checked by tests/test_examples.py).

Tables and blocks are found by the HTML comment just before them:
C{<!-- table: NAME -->} before a Markdown table, C{<!-- example: NAME -->}
before a fenced code block, C{<!-- list: NAME -->} before a paragraph.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from typing import Any, cast

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

import tests
from monedge.edge.base import CLIENT_CLOSED
from monedge.edge.server import ProxySite
from monedge.hooks import HookConfigError, HookContext, HookSet, availableFactories
from monedge.observe.accesslog import AccessLog
from monedge.observe.metrics import Metrics
from monedge.proxy import exchange as proxy
from monedge.proxy.resource import ServiceResource
from monedge.record import RequestRecord
from monedge.registry import Endpoint
from monedge.registry.static import (
    RegistryFileError,
    StaticRegistry,
    loadRegistryFile,
    parseRegistry,
)
from monedge.rules import paths
from monedge.rules.convention import (
    HostTiers,
    kubernetesName,
    serviceFromKubernetesName,
)
from monedge.rules.errors import CATALOGUE, ErrorResource, errorBody, rawErrorResponse
from monedge.rules.grpc import STATUS_NAMES, grpcStatus
from monedge.rules.headers import (
    HOP_BY_HOP,
    ForwardingRules,
    downstreamHeaders,
    requestIdFor,
    upstreamHeaders,
)
from monedge.rules.limits import Limits
from monedge.rules.policy import (
    DEFAULT_POLICY,
    POLICY_KEYS,
    HookSpec,
    Policy,
)
from monedge.rules.syntax import parseBool, parseDuration, parseSize
from monedge.rules.trust import Trust
from monedge.runtime.admin import GroupCollector, Routes, adminSite
from monedge.runtime.compose import buildProxy, checkHooks
from monedge.runtime.config import Configuration
from monedge.runtime.lifecycle import ProxyService
from monedge.runtime.workers import WorkerGroup
from monedge.tap import Options
from monedge.testing import FakeUpstreamClient, MemoryRegistry
from monedge.twistedseam import rawHeaderTable
from monedge.upstream.balancer import Balancer
from monedge.upstream.client import DEFAULT_POOL_IDLE

#: The repository root: the parent of the tests package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tests.__file__)))

#: What a table cell holds when there is nothing there.
NOTHING = "—"


# Reading the docs


def readDoc(name: str) -> str:
    """
    The text of C{docs/<name>}.
    """
    with open(os.path.join(ROOT, "docs", name), encoding="utf-8") as f:
        return f.read()


def _after(text: str, marker: str) -> str:
    """
    The text after the one C{<!-- marker -->} comment in C{text}.
    """
    tag = f"<!-- {marker} -->"
    index = text.find(tag)
    if index < 0:
        raise AssertionError(f"{tag} is missing")
    if text.find(tag, index + len(tag)) >= 0:
        raise AssertionError(f"{tag} appears twice")
    return text[index + len(tag) :]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


def table(text: str, name: str) -> list[dict[str, str]]:
    """
    The rows of the Markdown table marked C{name}, as dicts keyed by the
    header cells (with their backticks removed).
    """
    lines = []
    for line in _after(text, f"table: {name}").lstrip("\n").splitlines():
        if not line.startswith("|"):
            break
        lines.append(line)
    if len(lines) < 3:
        raise AssertionError(f"table {name} has no rows")
    header = [cell.replace("`", "") for cell in _cells(lines[0])]
    return [dict(zip(header, _cells(line), strict=True)) for line in lines[2:]]


def block(text: str, name: str) -> str:
    """
    The contents of the fenced code block marked C{name}.
    """
    match = re.match(
        r"\s*```[a-z]*\n(.*?)\n```", _after(text, f"example: {name}"), re.S
    )
    if match is None:
        raise AssertionError(f"no code block after example {name}")
    return match.group(1)


def paragraph(text: str, name: str) -> str:
    """
    The paragraph marked C{name}.
    """
    return _after(text, f"list: {name}").strip().split("\n\n")[0]


def spans(cell: str) -> list[str]:
    """
    The code spans in a cell, in order.
    """
    return re.findall(r"`([^`]*)`", cell)


def span(cell: str) -> str:
    """
    The one code span in a cell.
    """
    found = spans(cell)
    if len(found) != 1:
        raise AssertionError(f"expected one code span in {cell!r}")
    return found[0]


def section(text: str, heading: str) -> str:
    """
    The text of the section under C{heading} (a whole heading line), up to
    the next heading of the same or a higher level.
    """
    level = heading.split(" ")[0]
    start = text.index("\n" + heading + "\n")
    rest = text[start + len(heading) + 2 :]
    end = re.search(rf"^#{{1,{len(level)}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


# Resolving requests with the real routing code


@dataclass(frozen=True)
class Outcome:
    """
    Where a request went: a service and the path and query it receives, or
    an error status and code.
    """

    service: str | None = None
    upstream: bytes | None = None
    status: int | None = None
    code: str | None = None


def conventionRegistry() -> MemoryRegistry:
    """
    The registry docs/convention.md's examples run against, from its
    example block.
    """
    document = yaml.safe_load(block(readDoc("convention.md"), "convention-registry"))
    registry = MemoryRegistry()
    registry.replaceAll(list(parseRegistry(document, "convention.md").values()))
    return registry


def hostTiers(cell: str) -> HostTiers:
    """
    The L{HostTiers} for a C{--host-tier} cell: C{none}, or code spans of
    C{HOST=TIER} parsed as the command line parses them.
    """
    options = Options()
    if cell != "none":
        for mapping in spans(cell):
            options.opt_host_tier(mapping)
    return HostTiers.fromPairs(options["host-tier"])


def resolve(
    registry: MemoryRegistry,
    host: bytes | None,
    target: bytes,
    tiers: HostTiers,
    version: bytes = b"HTTP/1.1",
    method: bytes = b"GET",
) -> Outcome:
    """
    Decide a request with the real L{RootResource}.
    """
    # The one wiring (monedge.runtime.compose), with no hooks and nothing logged.
    root = buildProxy(
        Configuration(hostTiers=tiers),
        MemoryReactorClock(),
        registry=registry,
        accessLog=AccessLog(None),
        hooks=None,
    ).root
    headers = Headers()
    if host is not None:
        headers.addRawHeader(b"host", host)
    record = RequestRecord(0.0)
    leaf = root.decide(method, target, version, rawHeaderTable(headers), record)
    if isinstance(leaf, ErrorResource):
        return Outcome(status=leaf.error.status, code=leaf.error.code)
    assert isinstance(leaf, ServiceResource), leaf
    routed = record.routedPath
    assert routed is not None
    assert record.service == leaf.entry.name
    assert record.decision is leaf
    path = routed.rest if leaf.policy.stripPrefix else routed.path
    return Outcome(service=leaf.entry.name, upstream=path + routed.query)


def expectedOutcome(routed: str, upstream: str) -> Outcome:
    """
    The outcome a table row documents: C{404 `code`} or C{`service`}, and
    the upstream path and query.
    """
    error = re.fullmatch(r"(\d{3}) `([a-z0-9_]+)`", routed)
    if error is not None:
        if upstream != NOTHING:
            raise AssertionError(f"an error row has an upstream path: {upstream}")
        return Outcome(status=int(error.group(1)), code=error.group(2))
    return Outcome(service=span(routed), upstream=span(upstream).encode("ascii"))


def requestFor(row: dict[str, str]) -> tuple[bytes | None, bytes, bytes]:
    """
    The Host, target and HTTP version of a routing table row.
    """
    host = row["Host"]
    target = span(row["Request target"]).encode("ascii")
    if host == "`(none)`":
        return None, target, b"HTTP/1.1"
    if host == "`(none, HTTP/1.0)`":
        return None, target, b"HTTP/1.0"
    return span(host).encode("ascii"), target, b"HTTP/1.1"


def hopByHopNames() -> frozenset[bytes]:
    """
    The hop-by-hop header names docs/convention.md lists.
    """
    listed = paragraph(readDoc("convention.md"), "hop-by-hop")
    return frozenset(name.encode("ascii") for name in spans(listed))


class ConventionDocTests(SynchronousTestCase):
    """
    docs/convention.md: the routing examples, the Kubernetes names, path
    safety and the forwarding headers.
    """

    def checkRoutingRows(self, rows: list[dict[str, str]]) -> None:
        """
        Each row's request, a valid HTTP/1.1 request-target, is decided by
        the real routing code as the row says.
        """
        registry = conventionRegistry()
        for row in rows:
            host, target, version = requestFor(row)
            self.assertTrue(
                all(0x21 <= byte <= 0x7E for byte in target),
                f"{target!r} would not pass the request-line parser",
            )
            outcome = resolve(
                registry, host, target, hostTiers(row["--host-tier"]), version
            )
            self.assertEqual(
                outcome,
                expectedOutcome(row["Routed to"], row["Upstream receives"]),
                f"row {row}",
            )

    def test_routingExamples(self) -> None:
        """
        Every row of the routing example table is what the routing code
        does: the service chosen (or the error status and code) and the path
        and query the upstream receives.
        """
        self.checkRoutingRows(table(readDoc("convention.md"), "routing-examples"))

    def test_routingExamplesCoverTheConvention(self) -> None:
        """
        The routing table has at least 20 rows and covers the default tier,
        a --host-tier mapping that routes and an unmapped host that gets 404
        unknown_host, a port and a trailing dot in Host, each kind of
        invalid name, '/' alone, strip-prefix false and expose false.
        """
        rows = table(readDoc("convention.md"), "routing-examples")
        registry = conventionRegistry()
        self.assertGreaterEqual(len(rows), 20)
        targets = {span(row["Request target"]) for row in rows}
        for target in ["/", "/Foo/bar", "/1foo/bar", "/foo_bar/", "/foo-/"]:
            self.assertIn(target, targets)
        self.assertTrue(any(len(t.split("/")[1]) > 63 for t in targets))
        hosts = [span(row["Host"]) for row in rows]
        self.assertTrue(any(re.search(r":\d+$", h) for h in hosts))
        self.assertTrue(any(h.endswith(".") for h in hosts))
        mapped = [row for row in rows if row["--host-tier"] != "none"]
        self.assertIn("`service.webhooks.stripe`", [row["Routed to"] for row in mapped])
        self.assertIn("404 `unknown_host`", [row["Routed to"] for row in mapped])
        self.assertIn(
            "`service.api.foo`",
            [row["Routed to"] for row in rows if row["--host-tier"] == "none"],
        )
        policies = []
        for row in rows:
            name = span(row["Request target"]).split("/")[1]
            entry = registry.lookup(f"service.api.{name}")
            if entry is not None:
                policies.append((entry.policy, row["Routed to"]))
        self.assertTrue(
            any(not p.stripPrefix and r.startswith("`") for p, r in policies)
        )
        self.assertIn(
            (False, "404 `route_not_found`"), [(p.expose, r) for p, r in policies]
        )

    def test_grpcExamples(self) -> None:
        """
        Every row of the gRPC example table is what the real routing code
        does with that method (a preflight: with Origin and
        Access-Control-Request-Method), content-type (or none),
        --grpc-package-prefix and --host-tier:
        the service (or the error), its Kubernetes Service name, and the
        path the upstream receives (strip-prefix never applied).
        """
        registry = conventionRegistry()
        rows = table(readDoc("convention.md"), "grpc-examples")
        self.assertGreaterEqual(len(rows), 15)
        for row in rows:
            options = Options()
            if row["--grpc-package-prefix"] != "none":
                for prefix in spans(row["--grpc-package-prefix"]):
                    options.opt_grpc_package_prefix(prefix)
            root = buildProxy(
                Configuration(
                    hostTiers=hostTiers(row["--host-tier"]),
                    grpcPackagePrefixes=tuple(options["grpc-package-prefix"]),
                ),
                MemoryReactorClock(),
                registry=registry,
                accessLog=AccessLog(None),
                hooks=None,
            ).root
            headers = Headers()
            headers.addRawHeader(b"host", span(row["Host"]).encode("ascii"))
            if row["Content-type"] != "none":
                headers.addRawHeader(
                    b"content-type", span(row["Content-type"]).encode("ascii")
                )
            if row["Method"].endswith(" preflight"):
                # A browser's CORS preflight for a call.
                headers.addRawHeader(b"origin", b"https://app.example.com")
                headers.addRawHeader(b"access-control-request-method", b"POST")
            record = RequestRecord(0.0)
            target = span(row["Path"]).encode("ascii")
            method = span(row["Method"].split(" ")[0]).encode("ascii")
            leaf = root.decide(
                method, target, b"HTTP/1.1", rawHeaderTable(headers), record
            )
            if isinstance(leaf, ErrorResource):
                outcome = Outcome(status=leaf.error.status, code=leaf.error.code)
                kname = None
            else:
                assert isinstance(leaf, ServiceResource), leaf
                routed = record.routedPath
                assert routed is not None
                # The rule ServiceResource.render follows for a gRPC call.
                outcome = Outcome(service=leaf.entry.name, upstream=routed.path)
                kname = kubernetesName(leaf.entry.name)
            self.assertEqual(
                outcome,
                expectedOutcome(row["Routed to"], row["Upstream receives"]),
                row,
            )
            kubernetes = row["Kubernetes Service"]
            self.assertEqual(
                kname, None if kubernetes == NOTHING else span(kubernetes), row
            )

    def test_kubernetesNames(self) -> None:
        """
        The Kubernetes name table holds both ways: kubernetesName maps each
        registry name to its Service name (or to none), and
        serviceFromKubernetesName maps each Service name back (or to none).
        """
        rows = table(readDoc("convention.md"), "kubernetes-names")
        self.assertGreaterEqual(len(rows), 10)
        for row in rows:
            registryName, serviceName = row["Registry name"], row["Kubernetes Service"]
            if registryName != NOTHING:
                expected = None if serviceName == NOTHING else span(serviceName)
                self.assertEqual(kubernetesName(span(registryName)), expected, row)
            if serviceName != NOTHING:
                expected = None if registryName == NOTHING else span(registryName)
                self.assertEqual(
                    serviceFromKubernetesName(span(serviceName)), expected, row
                )

    def test_refusedMethods(self) -> None:
        """
        CONNECT and TRACE are refused with 405 method_not_allowed, as the
        resolution order says; other methods, unusual ones included, are
        routed.
        """
        text = readDoc("convention.md")
        self.assertIn("`CONNECT` and `TRACE` are refused: 405", text)
        registry = conventionRegistry()
        tiers = HostTiers({})
        for method in [b"CONNECT", b"TRACE"]:
            self.assertEqual(
                resolve(registry, b"api.example.com", b"/foo/", tiers, method=method),
                Outcome(status=405, code="method_not_allowed"),
            )
        for method in [b"GET", b"POST", b"OPTIONS", b"PATCH", b"PROPFIND"]:
            self.assertEqual(
                resolve(registry, b"api.example.com", b"/foo/", tiers, method=method),
                Outcome(service="service.api.foo", upstream=b"/"),
            )

    def test_hostTierValidation(self) -> None:
        """
        --host-tier takes bare host names and single-label tiers with no
        '-', and one host cannot map to two tiers; a trailing dot and case
        in the host are normalised away.
        """
        for pairs in [
            [("api.example.com:443", "api")],
            [("api.example.com", "web-hooks")],
            [("api.example.com", "api"), ("api.example.com", "webhooks")],
        ]:
            self.assertRaises(ValueError, HostTiers.fromPairs, pairs)
        tiers = HostTiers.fromPairs([("API.Example.com.", "api")])
        self.assertEqual(tiers.mapping, {"api.example.com": "api"})

    def test_pathExamples(self) -> None:
        """
        Every row of the path safety example table is what the routing code
        does with that target.
        """
        self.checkRoutingRows(table(readDoc("convention.md"), "path-examples"))

    def test_everyPathRefusalDocumented(self) -> None:
        """
        Every refusal code monedge/rules/paths.py can raise is in the error
        catalogue, explained in the Path safety rules, and shown by at least
        one example.
        """
        with open(paths.__file__, encoding="utf-8") as f:
            codes = set(re.findall(r'PathError\(\s*"([a-z0-9_]+)"', f.read()))
        self.assertEqual(len(codes), 7)
        text = readDoc("convention.md")
        rules = section(text, "## Path safety")
        shown = {
            code
            for row in table(text, "path-examples")
            for code in re.findall(r"`(path_[a-z0-9_]+)`", row["Routed to"])
        }
        for code in codes:
            self.assertIn(code, CATALOGUE)
            self.assertIn(f"`{code}`", rules.split("<!-- table:")[0])
            self.assertIn(code, shown)

    def test_forwardingHeaders(self) -> None:
        """
        Every row of the forwarding header table is what monedge sends
        upstream for that header, client value and --trusted-hops.
        """
        rows = table(readDoc("convention.md"), "forwarding-headers")
        for row in rows:
            name = span(row["Header"]).encode("ascii")
            hops = int(row["--trusted-hops"])
            sent = [] if row["Client sent"] == "(none)" else spans(row["Client sent"])
            incoming = Headers()
            incoming.addRawHeader(b"host", b"api.example.com")
            for value in sent:
                incoming.addRawHeader(name, value.encode("ascii"))
            out = upstreamHeaders(
                incoming,
                host=b"api.example.com",
                peer=b"10.0.0.9",
                proto=b"http",
                port=b"30080",
                prefix=b"/foo",
                requestId=requestIdFor(incoming, hops > 0),
                rules=ForwardingRules(Trust(hops)),
            )
            got = out.getRawHeaders(name)
            expected = row["Upstream receives"]
            if expected == "(none)":
                self.assertIsNone(got, row)
            elif expected == "(new id)":
                assert got is not None
                [newId] = got
                self.assertRegex(newId.decode("ascii"), r"\A[0-9a-f]{32}\Z")
                self.assertNotIn(newId.decode("ascii"), sent)
            else:
                self.assertEqual(got, [span(expected).encode("ascii")], row)

    def test_noHostHeader(self) -> None:
        """
        With no Host to forward (an HTTP/1.0 request without one), monedge
        sends neither Host nor X-Forwarded-Host; without strip-prefix it
        sends no X-Forwarded-Prefix.
        """
        out = upstreamHeaders(
            Headers({b"x-forwarded-host": [b"evil.example"]}),
            host=None,
            peer=b"10.0.0.9",
            proto=b"http",
            port=b"30080",
            prefix=None,
            requestId=b"1",
            rules=ForwardingRules(Trust(1)),
        )
        self.assertIsNone(out.getRawHeaders(b"host"))
        self.assertIsNone(out.getRawHeaders(b"x-forwarded-host"))
        self.assertIsNone(out.getRawHeaders(b"x-forwarded-prefix"))

    def test_hopByHopHeaders(self) -> None:
        """
        The hop-by-hop list is exactly monedge's, and those headers, and
        any header named in Connection, are removed in both directions,
        while other headers pass with their repeated values.
        """
        self.assertEqual(hopByHopNames(), HOP_BY_HOP)
        incoming = Headers()
        for name in HOP_BY_HOP:
            incoming.addRawHeader(name, b"x")
        incoming.setRawHeaders(b"connection", [b"keep-alive, X-Secret"])
        incoming.setRawHeaders(b"x-secret", [b"1"])
        incoming.setRawHeaders(b"x-kept", [b"a", b"b"])
        out = upstreamHeaders(
            incoming,
            host=b"api.example.com",
            peer=b"10.0.0.9",
            proto=b"http",
            port=b"30080",
            prefix=b"/foo",
            requestId=b"1",
        )
        for name in [*HOP_BY_HOP, b"x-secret"]:
            self.assertIsNone(out.getRawHeaders(name), name)
        self.assertEqual(out.getRawHeaders(b"x-kept"), [b"a", b"b"])

        response = Headers()
        for name in HOP_BY_HOP:
            response.addRawHeader(name, b"x")
        response.setRawHeaders(b"x-internal", [b"1"])
        response.setRawHeaders(b"set-cookie", [b"a=1", b"b=2"])
        relayed = Headers()
        downstreamHeaders(response, [b"x-internal"], relayed)
        for name in [*HOP_BY_HOP, b"x-internal"]:
            self.assertIsNone(relayed.getRawHeaders(name), name)
        self.assertEqual(relayed.getRawHeaders(b"set-cookie"), [b"a=1", b"b=2"])


class ErrorsDocTests(SynchronousTestCase):
    """
    docs/errors.md: the error catalogue and the body format.
    """

    def test_catalogue(self) -> None:
        """
        The code table lists exactly the (code, status) pairs of
        monedge.rules.errors.CATALOGUE, each with its default message.
        """
        rows = table(readDoc("errors.md"), "error-codes")
        documented = {(span(row["Code"]), int(row["Status"])) for row in rows}
        self.assertEqual(len(documented), len(rows))
        self.assertEqual(
            documented, {(code, status) for code, (status, _) in CATALOGUE.items()}
        )
        for row in rows:
            self.assertEqual(
                span(row["Default message"]), CATALOGUE[span(row["Code"])][1]
            )

    def test_grpcStatusTable(self) -> None:
        """
        The gRPC table lists every code of the catalogue once, with its
        status and the grpc-status (number and name) that
        monedge.rules.grpc.grpcStatus gives it.
        """
        rows = table(readDoc("errors.md"), "grpc-status")
        self.assertEqual(sorted(span(row["Code"]) for row in rows), sorted(CATALOGUE))
        for row in rows:
            code = span(row["Code"])
            status = CATALOGUE[code][0]
            self.assertEqual(int(row["Status"]), status, code)
            expected = grpcStatus(code, status)
            self.assertEqual(int(row["grpc-status"]), expected, code)
            self.assertEqual(span(row["Name"]), STATUS_NAMES[expected], code)

    def test_errorBodyExample(self) -> None:
        """
        The JSON body example is byte for byte what monedge sends for that
        error: compact JSON with status, code, message and request_id.
        """
        example = block(readDoc("errors.md"), "error-body")
        document = json.loads(example)
        self.assertEqual(list(document), ["status", "code", "message", "request_id"])
        status, message = CATALOGUE[document["code"]]
        self.assertEqual((document["status"], document["message"]), (status, message))
        body = errorBody(
            status,
            document["code"],
            message,
            document["request_id"].encode("ascii"),
        )
        self.assertEqual(body, example.encode("utf-8") + b"\n")

    def test_rawRefusalExample(self) -> None:
        """
        The example refusal on the connection is byte for byte what monedge
        writes for that code: status line, JSON headers, Connection: close,
        the request id, then the body.
        """
        example = block(readDoc("errors.md"), "raw-refusal")
        body = json.loads(example.split("\n\n", 1)[1])
        expected = rawErrorResponse(body["code"], body["request_id"].encode("ascii"))
        self.assertEqual(
            expected, example.replace("\n", "\r\n").encode("ascii") + b"\n"
        )


def optionDefaults() -> dict[str, str]:
    """
    Each C{twistd monedge} parameter's default, by long name.
    """
    return {str(name): str(default) for name, _, default, _ in Options.optParameters}


def parsePolicyDefault(key: str, value: str) -> Any:
    """
    A policy value written in the docs, parsed by the key's own parser.
    """
    if value == "none":
        return None
    parser = POLICY_KEYS[key][1]
    return parser(value)


def _answeredRecord() -> RequestRecord:
    """
    The record of a request answered by its upstream, as the stages write
    it.
    """
    end = 1767225600.123
    record = RequestRecord(end - 0.0151234)
    record.requestId = b"4f1c2a9be0d34c0a8e51f3b7a6d29c10"
    record.client = b"203.0.113.7"
    record.method, record.path = b"GET", b"/echo/hello?x=1"
    record.decided(Resource(), "service.api.echo")
    sent = end - 0.0151
    record.upstreamSent("127.0.0.1:9001", sent)
    record.upstreamAnswered(sent + 0.012345678)
    record.bytesOut = 312
    record.finished(200, end, 200)
    return record


def _refusedRecord() -> RequestRecord:
    """
    The record of a request the channel refused before its request line
    was parsed.
    """
    record = RequestRecord(None)
    record.requestId = b"1"
    record.failed("uri_too_long")
    record.finished(414, 1767225600.2)
    return record


class _DrainingSite:
    """
    The parts of a L{ProxySite} that L{ProxyService} drives on shutdown.
    """

    def __init__(self) -> None:
        self.draining = False
        self.inFlight = 1
        self.idleClosed = 0
        self.idle: Deferred[None] = Deferred()
        self.accessLog = AccessLog(None)

    def startDraining(self) -> None:
        self.draining = True

    def closeIdleConnections(self) -> int:
        self.idleClosed += 1
        return 0

    def whenDrained(self) -> Deferred[None]:
        return self.idle


class _Listener:
    """
    A listener with one open HTTP/1.1 connection, as metrics see it.
    """

    name = "tcp:30080"

    def protocols(self) -> list[str]:
        return ["http/1.1"]


class ConfigurationDocTests(SynchronousTestCase):
    """
    docs/configuration.md: options, the registry file, policy, limits,
    metrics, the access log, the admin endpoints and draining.
    """

    def test_everyOptionDocumented(self) -> None:
        """
        Every twistd monedge option, the parameters and the two repeatable
        opt_ options, appears in the options table with its short form and
        its default, and the table has no option that does not exist.
        """
        text = readDoc("configuration.md")
        rows = {
            span(row["Option"].split(",")[0]): row for row in table(text, "options")
        }
        defaults = optionDefaults()
        for name, short, default, _ in Options.optParameters:
            self.assertIn(f"--{name}", text)
            row = rows.pop(f"--{name}")
            if default is None:
                self.assertEqual(row["Default"], "none", name)
            else:
                self.assertEqual(span(row["Default"]), default, name)
            if short is not None:
                self.assertIn(f"`-{short}`", row["Option"])
        methods = [
            attribute[len("opt_") :].replace("_", "-")
            for attribute in vars(Options)
            if attribute.startswith("opt_")
        ]
        self.assertEqual(
            sorted(methods),
            [
                "grpc-package-prefix",
                "hook",
                "host-tier",
                "identity-header",
                "listen",
                "namespace",
                "trusted-header",
                "trusted-proxies",
                "worker-fd",
            ],
        )
        for name in methods:
            self.assertIn(f"--{name}", text)
            self.assertEqual(rows.pop(f"--{name}")["Default"], "none")
        for name, _, _ in Options.optFlags:
            self.assertEqual(rows.pop(f"--{name}")["Default"], "off", name)
        self.assertEqual(rows, {})
        self.assertEqual(len(defaults), len(Options.optParameters))

    def test_registryExample(self) -> None:
        """
        The full registry example loads with loadRegistryFile, with the
        endpoints and policy values the comments describe.
        """
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(block(readDoc("configuration.md"), "registry"))
        services = loadRegistryFile(path)
        mib = 1 << 20
        expected = {
            "service.api.echo": (
                (Endpoint("127.0.0.1", 9001), Endpoint("127.0.0.1", 9002)),
                Policy(timeout=30.0, stripPrefix=True, maxBodySize=10 * mib),
            ),
            "service.api.uploads": (
                (Endpoint("10.0.0.21", 8080), Endpoint("10.0.0.22", 8080)),
                Policy(
                    connectTimeout=0.5,
                    timeout=120.0,
                    idleTimeout=3600.0,
                    maxBodySize=1_000_000_000,
                ),
            ),
            "service.api.legacy": (
                (Endpoint("fd00::7", 8080),),
                Policy(stripPrefix=False),
            ),
            "service.webhooks.stripe": (
                (Endpoint("stripe-hooks.internal", 8443, scheme="https"),),
                Policy(maxBodySize=512 * 1024, idleTimeout=45.0),
            ),
            "service.api.admin": (
                (Endpoint("10.0.0.30", 8080),),
                Policy(expose=False),
            ),
            "service.api.soon": ((), DEFAULT_POLICY),
        }
        self.assertEqual(
            {name: (e.endpoints, e.policy) for name, e in services.items()}, expected
        )
        self.assertEqual(
            services["service.api.legacy"].endpoints[0].authority, "[fd00::7]:8080"
        )

    def test_invalidRegistryExample(self) -> None:
        """
        The invalid registry example is refused with exactly the documented
        message, naming the file and the field.
        """
        text = readDoc("configuration.md")
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "services.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(block(text, "invalid-registry"))
        error = self.assertRaises(RegistryFileError, loadRegistryFile, path)
        self.assertEqual(
            str(error).replace(path, "services.yaml"),
            block(text, "invalid-registry-error"),
        )

    def test_reloadKeepsLastGoodTable(self) -> None:
        """
        The static registry is polled every second; a changed, invalid file
        keeps the last good table and counts
        monedge_registry_reloads{result="failed"}; a valid one replaces it.
        """
        text = readDoc("configuration.md")
        self.assertIn("checked for changes every second", text)
        self.assertIn('monedge_registry_reloads_total{result="failed"}', text)
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write('services: {service.api.a: {endpoints: ["10.0.0.1:80"]}}\n')
        clock = Clock()
        registry = StaticRegistry(path, clock=clock)
        metrics = Metrics()
        metrics.watchRegistry(registry)
        registry.startService()
        self.addCleanup(registry.stopService)
        with open(path, "w", encoding="utf-8") as f:
            f.write("services: {service.api.a: {endpoints: 7}}\n")
        clock.advance(0.9)
        self.assertEqual(registry.reloadsFailed, 0)
        clock.advance(0.1)
        self.assertEqual(registry.reloadsFailed, 1)
        self.assertIsNotNone(registry.lookup("service.api.a"))
        self.assertIn(
            b'monedge_registry_reloads_total{result="failed"} 1.0',
            generate_latest(metrics.registry),
        )
        with open(path, "w", encoding="utf-8") as f:
            f.write('services: {service.api.b: {endpoints: ["10.0.0.1:80"]}}\n')
        clock.advance(1.0)
        self.assertIsNone(registry.lookup("service.api.a"))
        self.assertIsNotNone(registry.lookup("service.api.b"))
        self.assertEqual(registry.reloadsSucceeded, 2)

    def test_policyKeys(self) -> None:
        """
        The policy table lists exactly the keys in POLICY_KEYS, each with
        its real default.
        """
        rows = table(readDoc("configuration.md"), "policy")
        self.assertEqual({span(row["Key"]) for row in rows}, set(POLICY_KEYS))
        for row in rows:
            key = span(row["Key"])
            self.assertEqual(
                parsePolicyDefault(key, span(row["Default"])),
                getattr(DEFAULT_POLICY, POLICY_KEYS[key][0]),
                key,
            )

    def test_policyValueSyntax(self) -> None:
        """
        Every duration, size and boolean in the value syntax table, read as
        YAML as the registry file is, parses to the documented value or is
        rejected.
        """
        parsers: dict[str, Any] = {
            "duration": parseDuration,
            "size": parseSize,
            "boolean": parseBool,
        }
        rows = table(readDoc("configuration.md"), "policy-values")
        self.assertEqual({row["Kind"] for row in rows}, set(parsers))
        for row in rows:
            parse = parsers[row["Kind"]]
            value = yaml.safe_load("value: " + span(row["YAML value"]))["value"]
            result = row["Result"]
            if result.startswith("rejected"):
                self.assertRaises(ValueError, parse, value)
                continue
            seconds = re.fullmatch(r"([\d.]+) s", result)
            size = re.fullmatch(r"(\d+) bytes", result)
            if seconds is not None:
                self.assertEqual(parse(value), float(seconds.group(1)), row)
            elif size is not None:
                self.assertEqual(parse(value), int(size.group(1)), row)
            else:
                self.assertIn(result, ("true", "false"))
                self.assertIs(parse(value), result == "true", row)

    def test_timeoutsAndLimits(self) -> None:
        """
        Each timeout and limit in the table has the default of the option
        or policy key that sets it, and the built-in defaults (Limits, the
        upstream pool, the drain) are those same values.
        """
        defaults = optionDefaults()
        for row in table(readDoc("configuration.md"), "limits"):
            setting, default = span(row["Set with"]), span(row["Default"])
            if row["Set with"].startswith("policy "):
                self.assertEqual(
                    parsePolicyDefault(setting, default),
                    getattr(DEFAULT_POLICY, POLICY_KEYS[setting][0]),
                )
            else:
                self.assertEqual(defaults[setting.removeprefix("--")], default)
        limits = Limits()
        self.assertEqual(
            (
                limits.maxRequestLine,
                limits.maxHeaderLine,
                limits.maxHeadersSize,
                limits.maxHeaderCount,
                limits.maxConnections,
                limits.bodyTimeout,
                limits.sendTimeout,
            ),
            (
                int(defaults["max-request-line"]),
                int(defaults["max-header-line"]),
                int(defaults["max-headers-size"]),
                int(defaults["max-header-count"]),
                int(defaults["max-connections"]),
                parseDuration(defaults["body-timeout"]),
                parseDuration(defaults["send-timeout"]),
            ),
        )
        self.assertEqual(
            (limits.headerTimeout, limits.keepAliveTimeout),
            (
                parseDuration(defaults["header-timeout"]),
                parseDuration(defaults["keepalive-timeout"]),
            ),
        )
        self.assertEqual(
            (limits.headerTimeout, limits.keepAliveTimeout, DEFAULT_POOL_IDLE),
            (10.0, 75.0, 4.0),
        )
        self.assertEqual(
            DEFAULT_POOL_IDLE, parseDuration(defaults["upstream-idle-timeout"])
        )
        service = ProxyService(
            cast(ProxySite, _DrainingSite()),
            MemoryRegistry(),
            FakeUpstreamClient(),
            Clock(),
        )
        self.assertEqual(
            (service.drainDelay, service.drainTimeout),
            (
                parseDuration(defaults["drain-delay"]),
                parseDuration(defaults["drain-timeout"]),
            ),
        )

    def test_metrics(self) -> None:
        """
        The metrics table lists exactly the metric families monedge
        exports, with their types and labels, and every exposed name it
        gives appears in the /metrics output.
        """
        registry = MemoryRegistry()
        metrics = Metrics()
        metrics.watchRegistry(registry)
        children = metrics.forService("service.api.foo")
        children.observe(200, 0.1)
        children.upstreamError("reset")
        children.tunnelOpened()
        grpcRefusal = RequestRecord(0.0)
        grpcRefusal.grpcStatus = 14
        grpcRefusal.finished(200, 0.1)
        children.count(grpcRefusal)
        metrics.observeHook("headers", "pass", 0.001)
        metrics.watchListener(_Listener())
        families = {
            family.name: (
                family.type,
                {label for s in family.samples for label in s.labels} - {"le"},
            )
            for family in metrics.registry.collect()
            if not family.name.startswith("process_")
        }
        process = {
            family.type
            for family in metrics.registry.collect()
            if family.name.startswith("process_")
        }
        families["process_*"] = (", ".join(sorted(process, reverse=True)), set())
        exposition = generate_latest(metrics.registry).decode("utf-8")
        exposed = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines()}
        rows = table(readDoc("configuration.md"), "metrics")
        documented = {
            span(row["Metric"]): (row["Type"], set(spans(row["Labels"])))
            for row in rows
        }
        self.assertEqual(documented, families)
        for row in rows:
            for name in spans(row["Exposed as"]):
                self.assertIn(name, exposed)

    def test_groupMetrics(self) -> None:
        """
        The group-metrics table lists exactly the families a --workers
        supervisor adds to the merged metrics, with types and labels, and
        each exposed name appears in its exposition.
        """
        group = WorkerGroup(
            MemoryReactorClock(), 2, [], lambda *_: [], self.mktemp(), 0, 0
        )
        collector = GroupCollector(group, 0)
        families = {
            family.name: (
                family.type,
                {label for s in family.samples for label in s.labels},
            )
            for family in collector.collect()
        }
        registry = CollectorRegistry()
        registry.register(collector)
        exposition = generate_latest(registry).decode("utf-8")
        exposed = {line.split("{")[0].split(" ")[0] for line in exposition.splitlines()}
        rows = table(readDoc("configuration.md"), "group-metrics")
        documented = {
            span(row["Metric"]): (row["Type"], set(spans(row["Labels"])))
            for row in rows
        }
        self.assertEqual(documented, families)
        for row in rows:
            for name in spans(row["Exposed as"]):
                self.assertIn(name, exposed)

    def test_upstreamErrorKinds(self) -> None:
        """
        The upstream error kinds table lists exactly the kinds monedge/proxy/exchange.py
        counts in monedge_upstream_errors.
        """
        with open(proxy.__file__, encoding="utf-8") as f:
            source = f.read()
        kinds = set(re.findall(r'upstreamError\("([a-z0-9_]+)"\)', source))
        kinds |= set(re.findall(r'kind, error = "([a-z0-9_]+)"', source))
        rows = table(readDoc("configuration.md"), "upstream-error-kinds")
        self.assertEqual({span(row["Kind"]) for row in rows}, kinds)

    def test_accessLog(self) -> None:
        """
        The access log table lists exactly the fields of both kinds of
        record (answered and refused), the example line is what monedge
        writes for such a request, and 499 is the status for a client that
        went away.
        """
        text = readDoc("configuration.md")
        fields = {span(row["Field"]) for row in table(text, "access-log")}
        out = io.StringIO()
        log = AccessLog(out)
        log.log(_answeredRecord())
        log.log(_refusedRecord())
        answered, refused = (json.loads(line) for line in out.getvalue().splitlines())
        self.assertEqual(set(answered), fields)
        self.assertEqual(set(refused), fields)
        self.assertEqual((refused["method"], refused["path"]), (None, None))
        self.assertEqual(answered, json.loads(block(text, "access-log")))
        self.assertEqual(CLIENT_CLOSED, 499)
        self.assertIn("499", section(text, "## Access log"))

    def test_adminEndpoints(self) -> None:
        """
        The admin site serves exactly the documented endpoints.
        """
        text = readDoc("configuration.md")
        registry = MemoryRegistry()
        site = adminSite(
            lambda: (True, "serving"),
            Metrics(),
            registry,
            HostTiers({}),
            Balancer(Clock()),
            MemoryReactorClock(),
        )
        children = set(site.resource.children)
        self.assertEqual(children, {b"healthz", b"readyz", b"metrics", b"routes"})
        for child in children:
            self.assertIn(f"`/{child.decode()}`", section(text, "## Admin endpoints"))

    def test_readiness(self) -> None:
        """
        /readyz gives each documented reason in the documented state:
        starting before start, waiting for the registry's first sync,
        serving, then draining after SIGTERM.
        """
        rows = table(readDoc("configuration.md"), "readiness")
        documented = {span(row["Reason"]): int(row["Status"]) for row in rows}
        registry = MemoryRegistry(ready=False)
        service = ProxyService(
            cast(ProxySite, _DrainingSite()), registry, FakeUpstreamClient(), Clock()
        )
        seen = [service.readiness()]
        service.startService()
        seen.append(service.readiness())
        registry.markReady()
        seen.append(service.readiness())
        service.stopService()
        seen.append(service.readiness())
        self.assertEqual(
            seen,
            [
                (False, "starting"),
                (False, "waiting for the first registry sync"),
                (True, "serving"),
                (False, "draining"),
            ],
        )
        self.assertEqual(
            documented, {reason: 200 if ready else 503 for ready, reason in seen}
        )

    def test_routesExample(self) -> None:
        """
        The /routes example is exactly what the admin site reports for the
        example registry file.
        """
        text = readDoc("configuration.md")
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "services.yaml")
        with open(path, "w", encoding="utf-8") as f:
            f.write(block(text, "routes-registry"))
        registry = StaticRegistry(path)
        document = Routes(registry, HostTiers({}), Balancer(Clock())).document()
        rendered = json.dumps(document, sort_keys=True).replace(path, "services.yaml")
        self.assertEqual(json.loads(rendered), json.loads(block(text, "routes")))

    def test_hooksPolicyExample(self) -> None:
        """
        The hooks policy example loads: the service gets the listed hook
        with its options, next to its other policy keys, and the built-in
        headers hook accepts those options.
        """
        path = self.mktemp()
        with open(path, "w", encoding="utf-8") as f:
            f.write(block(readDoc("configuration.md"), "hooks-policy"))
        entry = loadRegistryFile(path)["service.api.orders"]
        options = {
            "request": {"set": {"X-Client": "{client_address}"}},
            "response": {"set": {"Strict-Transport-Security": "max-age=63072000"}},
        }
        self.assertEqual(
            entry.policy,
            Policy(
                timeout=30.0,
                hooks=(HookSpec("headers", json.dumps(options, sort_keys=True)),),
            ),
        )
        hooks = HookSet(HookContext(reactor=Clock()))
        self.assertIsNotNone(hooks.chain(entry.policy.hooks))

    def test_unknownHookError(self) -> None:
        """
        An unknown --hook name stops startup with the documented message,
        whose list is every hook found, sorted; a malformed --hook value is
        refused while the options are parsed.
        """
        options = Options()
        options.opt_hook("nosuchhook")
        hooks = HookSet(HookContext(reactor=Clock()), globalSpecs=options["hook"])
        error = self.assertRaises(UsageError, checkHooks, hooks, MemoryRegistry())
        known = ", ".join(sorted(availableFactories()))
        self.assertEqual(
            str(error),
            block(readDoc("configuration.md"), "unknown-hook-error").replace(
                "(known: ...)", f"(known: {known})"
            ),
        )
        self.assertRaises(UsageError, Options().opt_hook, "{name: headers")

    def test_drainSequence(self) -> None:
        """
        On stop: not ready and draining at once while still listening; the
        listeners close after the drain delay; the rest stops when the
        requests in flight finish, or after the drain timeout.
        """
        for finishInTime in [True, False]:
            site = _DrainingSite()
            client = FakeUpstreamClient()
            clock = Clock()
            service = ProxyService(
                cast(ProxySite, site),
                MemoryRegistry(),
                client,
                clock,
                drainDelay=5.0,
                drainTimeout=25.0,
            )
            listener, admin = Service(), Service()
            service.addListener(listener)
            admin.setServiceParent(service)
            service.startService()
            stopped = service.stopService()
            self.assertEqual(service.readiness(), (False, "draining"))
            self.assertTrue(site.draining)
            clock.advance(4.9)
            self.assertTrue(listener.running)
            clock.advance(0.1)
            self.assertFalse(listener.running)
            self.assertEqual(site.idleClosed, 1)
            self.assertTrue(admin.running)
            if finishInTime:
                clock.advance(1.0)
                site.idle.callback(None)
            else:
                clock.advance(24.9)
                self.assertTrue(admin.running)
                clock.advance(0.1)
            self.assertFalse(admin.running)
            self.assertTrue(client.closed)
            self.successResultOf(stopped)


class AnnotationsDocTests(SynchronousTestCase):
    """
    docs/annotations.md lists exactly the annotations monedge reads.
    """

    def test_everyPolicyKeyIsAnAnnotation(self) -> None:
        """
        The annotation table has one row per policy key, with the policy's
        default, and an annotation with each default value parses to the
        default policy.
        """
        from monedge.registry.kubernetes import policyFromAnnotations

        rows = table(readDoc("annotations.md"), "annotations")
        documented = {span(row["Annotation"]): span(row["Default"]) for row in rows}
        self.assertEqual(set(documented), {f"monedge.io/{key}" for key in POLICY_KEYS})
        # A key with no default ("none") is simply not annotated.
        annotations = {k: v for k, v in documented.items() if v != "none"}
        policy, problems = policyFromAnnotations(annotations)
        self.assertEqual(problems, [])
        self.assertEqual(policy, Policy())

    def test_hooksAnnotationExample(self) -> None:
        """
        The monedge.io/hooks example annotation parses, with no problem, to
        the two hooks it lists, with their options.
        """
        from monedge.registry.kubernetes import policyFromAnnotations

        service = yaml.safe_load(block(readDoc("annotations.md"), "hooks-annotation"))
        policy, problems = policyFromAnnotations(service["metadata"]["annotations"])
        self.assertEqual(problems, [])
        self.assertEqual(
            [spec.asJSON() for spec in policy.hooks],
            [
                {
                    "name": "headers",
                    "options": {
                        "response": {
                            "set": {"Strict-Transport-Security": "max-age=63072000"}
                        }
                    },
                },
                {"name": "block-paths", "options": {"prefixes": ["/orders/internal"]}},
            ],
        )

    def test_invalidHooksAnnotationFailsClosed(self) -> None:
        """
        An unreadable monedge.io/hooks is reported like any invalid
        annotation, but instead of no hooks the service gets a hook that
        does not exist, so that it answers 503 hook_config_invalid with the
        documented message.
        """
        from monedge.registry.kubernetes import policyFromAnnotations

        text = readDoc("annotations.md")
        self.assertIn("503 `hook_config_invalid`", text)
        policy, problems = policyFromAnnotations({"monedge.io/hooks": "{name: x"})
        self.assertEqual(len(problems), 1)
        self.assertTrue(problems[0].startswith("monedge.io/hooks: "))
        hooks = HookSet(HookContext(reactor=Clock()))
        error = self.assertRaises(HookConfigError, hooks.chain, policy.hooks)
        self.assertTrue(
            str(error).startswith(
                "unknown hook 'invalid-monedge.io/hooks-annotation' (known: "
            )
        )
        self.assertIn(
            "`unknown hook 'invalid-monedge.io/hooks-annotation' (known: ...)`",
            " ".join(text.split()),
        )
