"""
Tests for L{monedge.registry} (the data model and change fan-out) and
L{monedge.registry.static} (the YAML registry), and one contract every
L{IServiceRegistry} meets, run against the in-memory fake and the static
registry alike.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import yaml
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from monedge.interfaces import IServiceRegistry
from monedge.registry import Endpoint, RegistryTable, ServiceEntry
from monedge.registry.static import (
    RegistryFileError,
    StaticRegistry,
    loadRegistryFile,
    parseEndpoint,
    parseRegistry,
)
from monedge.rules.policy import DEFAULT_POLICY, MIB, Policy
from monedge.testing import MemoryRegistry

ECHO = "service.api.echo"


def entry(name: str, *addresses: str, policy: Policy = DEFAULT_POLICY) -> ServiceEntry:
    """
    A service entry with endpoints parsed from C{host:port} strings.
    """
    return ServiceEntry(
        name=name,
        endpoints=tuple(parseEndpoint(a) for a in addresses),
        policy=policy,
    )


def fileIdentity(path: str) -> tuple[int, int, int] | None:
    """
    What a reader can tell files apart by: inode, size and mtime.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def writeAtomically(path: str, text: str) -> None:
    """
    Replace C{path} with a new file holding C{text} (write a temporary file
    in the same directory, then rename it over C{path}), so that the new
    file has a new inode, and check that it can be told apart from the old.
    """
    before = fileIdentity(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(temporary, path)
    after = fileIdentity(path)
    assert after is not None and after != before, (before, after)


def writeServices(path: str, services: Mapping[str, Any]) -> None:
    """
    Atomically write a registry file listing C{services}.
    """
    writeAtomically(path, yaml.safe_dump({"services": dict(services)}))


class Recorder:
    """
    A registry listener that records every notification.
    """

    def __init__(self) -> None:
        self.calls: list[frozenset[str]] = []

    def __call__(self, changed: frozenset[str]) -> None:
        self.calls.append(changed)


@implementer(ILogObserver)
class EventRecorder:
    """
    A log observer that records every event.
    """

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)


class EndpointTests(SynchronousTestCase):
    """
    L{Endpoint} describes one address.
    """

    def test_authority(self) -> None:
        """
        The authority is C{host:port}, with IPv6 literals bracketed.
        """
        self.assertEqual(Endpoint("10.0.0.1", 80).authority, "10.0.0.1:80")
        self.assertEqual(Endpoint("echo.local", 8080).authority, "echo.local:8080")
        self.assertEqual(Endpoint("::1", 80).authority, "[::1]:80")
        self.assertEqual(Endpoint("fe80::1", 443).authority, "[fe80::1]:443")

    def test_defaults(self) -> None:
        """
        An endpoint is by default plain HTTP, ready, serving and not
        terminating.
        """
        e = Endpoint("h", 1)
        self.assertEqual(
            (e.scheme, e.ready, e.serving, e.terminating), ("http", True, True, False)
        )

    def test_asJSON(self) -> None:
        """
        The JSON form names the address, scheme and every condition.
        """
        self.assertEqual(
            Endpoint(
                "::1", 8443, scheme="https", ready=False, terminating=True
            ).asJSON(),
            {
                "address": "[::1]:8443",
                "scheme": "https",
                "ready": False,
                "serving": True,
                "terminating": True,
            },
        )


class RegistryTableTests(SynchronousTestCase):
    """
    L{RegistryTable} holds entries and tells listeners which names changed.
    """

    def setUp(self) -> None:
        self.table = RegistryTable()
        self.recorder = Recorder()
        self.table.subscribe(self.recorder)

    def test_empty(self) -> None:
        """
        A new table has no services.
        """
        self.assertEqual(RegistryTable().services(), {})
        self.assertIsNone(RegistryTable().lookup(ECHO))

    def test_replaceAllAdds(self) -> None:
        """
        Replacing an empty table notifies every new name, once, and returns
        them.
        """
        a, b = entry("service.api.a", "h:1"), entry("service.api.b", "h:2")
        changed = self.table.replaceAll({a.name: a, b.name: b})
        self.assertEqual(changed, frozenset([a.name, b.name]))
        self.assertEqual(self.recorder.calls, [frozenset([a.name, b.name])])
        self.assertEqual(self.table.lookup(a.name), a)
        self.assertEqual(self.table.services(), {a.name: a, b.name: b})

    def test_replaceAllChangedAddedRemoved(self) -> None:
        """
        Replacing a table notifies exactly the names that were changed,
        added or removed, not the unchanged ones.
        """
        same = entry("service.api.same", "h:1")
        changes = entry("service.api.changes", "h:2")
        goes = entry("service.api.goes", "h:3")
        self.table.replaceAll({e.name: e for e in [same, changes, goes]})
        changed = entry("service.api.changes", "h:2", "h:4")
        comes = entry("service.api.comes", "h:5")
        self.recorder.calls.clear()
        result = self.table.replaceAll(
            {
                same.name: entry("service.api.same", "h:1"),
                changed.name: changed,
                comes.name: comes,
            }
        )
        expected = frozenset([changes.name, goes.name, comes.name])
        self.assertEqual(result, expected)
        self.assertEqual(self.recorder.calls, [expected])
        self.assertIsNone(self.table.lookup(goes.name))
        self.assertEqual(self.table.lookup(changes.name), changed)

    def test_policyChangeIsAChange(self) -> None:
        """
        An entry whose only difference is its policy counts as changed.
        """
        self.table.replaceAll({ECHO: entry(ECHO, "h:1")})
        self.recorder.calls.clear()
        self.table.replaceAll({ECHO: entry(ECHO, "h:1", policy=Policy(timeout=1.0))})
        self.assertEqual(self.recorder.calls, [frozenset([ECHO])])

    def test_replaceAllUnchanged(self) -> None:
        """
        Replacing a table with an equal one notifies nobody and returns no
        names; so does replacing an empty table with an empty one.
        """
        self.assertEqual(self.table.replaceAll({}), frozenset())
        self.assertEqual(self.recorder.calls, [])
        self.table.replaceAll({ECHO: entry(ECHO, "h:1")})
        self.recorder.calls.clear()
        self.assertEqual(self.table.replaceAll({ECHO: entry(ECHO, "h:1")}), frozenset())
        self.assertEqual(self.recorder.calls, [])

    def test_replaceAllCopies(self) -> None:
        """
        The table does not share the mapping it was given: changing that
        mapping later changes nothing.
        """
        given = {ECHO: entry(ECHO, "h:1")}
        self.table.replaceAll(given)
        given["service.api.other"] = entry("service.api.other", "h:2")
        del given[ECHO]
        self.assertEqual(set(self.table.services()), {ECHO})

    def test_servicesSnapshot(self) -> None:
        """
        L{RegistryTable.services} is a snapshot: changing it does not
        change the table, and later changes do not change it.
        """
        self.table.put(entry(ECHO, "h:1"))
        snapshot = self.table.services()
        self.table.put(entry("service.api.b", "h:2"))
        self.assertEqual(set(snapshot), {ECHO})
        assert isinstance(snapshot, dict)
        snapshot.clear()
        self.assertEqual(set(self.table.services()), {ECHO, "service.api.b"})

    def test_put(self) -> None:
        """
        Putting a new or different entry notifies its name; putting an
        equal entry again notifies nobody.
        """
        self.table.put(entry(ECHO, "h:1"))
        self.table.put(entry(ECHO, "h:1"))
        self.table.put(entry(ECHO, "h:2"))
        self.assertEqual(self.recorder.calls, [frozenset([ECHO])] * 2)
        self.assertEqual(self.table.lookup(ECHO), entry(ECHO, "h:2"))

    def test_remove(self) -> None:
        """
        Removing a present entry notifies its name; removing an absent one
        notifies nobody.
        """
        self.table.put(entry(ECHO, "h:1"))
        self.recorder.calls.clear()
        self.table.remove("service.api.absent")
        self.assertEqual(self.recorder.calls, [])
        self.table.remove(ECHO)
        self.assertEqual(self.recorder.calls, [frozenset([ECHO])])
        self.assertIsNone(self.table.lookup(ECHO))
        self.table.remove(ECHO)
        self.assertEqual(len(self.recorder.calls), 1)

    def test_everyListener(self) -> None:
        """
        Every subscribed listener is told of each change.
        """
        other = Recorder()
        self.table.subscribe(other)
        self.table.put(entry(ECHO, "h:1"))
        self.assertEqual(self.recorder.calls, [frozenset([ECHO])])
        self.assertEqual(other.calls, [frozenset([ECHO])])

    def test_unsubscribe(self) -> None:
        """
        After unsubscribing, a listener is told of nothing; other listeners
        still are; unsubscribing twice is harmless.
        """
        other = Recorder()
        unsubscribe = self.table.subscribe(other)
        unsubscribe()
        unsubscribe()
        self.table.put(entry(ECHO, "h:1"))
        self.table.replaceAll({})
        self.table.put(entry(ECHO, "h:2"))
        self.table.remove(ECHO)
        self.assertEqual(other.calls, [])
        self.assertEqual(len(self.recorder.calls), 4)

    def test_unsubscribeDuringNotification(self) -> None:
        """
        A listener may unsubscribe itself while being notified; it is not
        told of later changes.
        """
        calls: list[frozenset[str]] = []

        def once(changed: frozenset[str]) -> None:
            calls.append(changed)
            unsubscribe()

        unsubscribe = self.table.subscribe(once)
        self.table.put(entry(ECHO, "h:1"))
        self.table.put(entry(ECHO, "h:2"))
        self.assertEqual(calls, [frozenset([ECHO])])
        self.assertEqual(len(self.recorder.calls), 2)

    def test_failingListener(self) -> None:
        """
        A listener that raises does not stop the change or the listeners
        after it; its exception is logged.
        """
        table = RegistryTable()
        before, after = Recorder(), Recorder()

        def broken(changed: frozenset[str]) -> None:
            raise ZeroDivisionError("listener bug")

        table.subscribe(before)
        table.subscribe(broken)
        table.subscribe(after)
        table.put(entry(ECHO, "h:1"))
        self.assertEqual(before.calls, [frozenset([ECHO])])
        self.assertEqual(after.calls, [frozenset([ECHO])])
        self.assertEqual(table.lookup(ECHO), entry(ECHO, "h:1"))
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        table.remove(ECHO)
        self.assertEqual(after.calls, [frozenset([ECHO])] * 2)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)


class ParseEndpointTests(SynchronousTestCase):
    """
    L{parseEndpoint} reads one endpoint address.
    """

    def test_valid(self) -> None:
        """
        C{host:port}, C{[v6]:port} and C{http(s)://host:port} (with an
        optional trailing slash and surrounding whitespace) parse.
        """
        for value, expected in [
            ("127.0.0.1:9001", Endpoint("127.0.0.1", 9001)),
            ("echo.default.svc:80", Endpoint("echo.default.svc", 80)),
            ("[::1]:8080", Endpoint("::1", 8080)),
            ("[2001:db8::1]:1", Endpoint("2001:db8::1", 1)),
            ("http://h:80", Endpoint("h", 80)),
            ("https://h:443/", Endpoint("h", 443, scheme="https")),
            ("https://[::1]:8443", Endpoint("::1", 8443, scheme="https")),
            (" h:65535 ", Endpoint("h", 65535)),
        ]:
            self.assertEqual(parseEndpoint(value), expected, value)

    def test_invalid(self) -> None:
        """
        Anything else, including a missing port, port 0 or above 65535, a
        path, another scheme, userinfo or a non-string, is a ValueError.
        """
        for value in [
            "h",
            "h:",
            ":80",
            "h:0",
            "h:65536",
            "h:99999",
            "h:123456",
            "h:-1",
            "h:http",
            "::1:80",
            "[::1]",
            "[h]:80",
            "ftp://h:21",
            "http://h",
            "http://h:80/path",
            "u@h:80",
            "h_1:80",
            "h :80",
            "",
            80,
            None,
            ["h:1"],
        ]:
            with self.assertRaises(ValueError, msg=repr(value)):
                parseEndpoint(value)

    def test_portOutOfRangeMessage(self) -> None:
        """
        A port out of range says so.
        """
        with self.assertRaises(ValueError) as e:
            parseEndpoint("h:70000")
        self.assertIn("port out of range", str(e.exception))


VALID = {
    "services": {
        ECHO: {
            "endpoints": ["127.0.0.1:9001", "https://[::1]:9002"],
            "policy": {"timeout": "30s", "max-body-size": "1MiB"},
        },
        "service.api.bare": {"endpoints": []},
    }
}


class ParseRegistryTests(SynchronousTestCase):
    """
    L{parseRegistry} validates a YAML document into a table, and names the
    file and the exact field when it cannot.
    """

    def assertBadField(self, document: object, field: str, *words: str) -> None:
        """
        Parsing C{document} fails with a message that starts with the file
        name and C{field}, and holds each of C{words}.
        """
        with self.assertRaises(RegistryFileError) as e:
            parseRegistry(document, "reg.yaml")
        message = str(e.exception)
        self.assertTrue(message.startswith(f"reg.yaml: {field}: "), message)
        for word in words:
            self.assertIn(word, message)

    def test_valid(self) -> None:
        """
        A valid document gives one entry per service, with its endpoints in
        order, its policy over the defaults, and the file as its source.
        """
        table = parseRegistry(VALID, "reg.yaml")
        self.assertEqual(set(table), {ECHO, "service.api.bare"})
        echo = table[ECHO]
        self.assertEqual(echo.name, ECHO)
        self.assertEqual(
            echo.endpoints,
            (Endpoint("127.0.0.1", 9001), Endpoint("::1", 9002, scheme="https")),
        )
        self.assertEqual(echo.policy, Policy(timeout=30.0, maxBodySize=MIB))
        self.assertEqual(dict(echo.source), {"kind": "static", "file": "reg.yaml"})
        self.assertEqual(table["service.api.bare"].endpoints, ())
        self.assertEqual(table["service.api.bare"].policy, DEFAULT_POLICY)

    def test_empty(self) -> None:
        """
        An empty document, or one with no services, is an empty table.
        """
        self.assertEqual(parseRegistry(None, "reg.yaml"), {})
        self.assertEqual(parseRegistry({"services": None}, "reg.yaml"), {})
        self.assertEqual(parseRegistry({"services": {}}, "reg.yaml"), {})
        self.assertEqual(parseRegistry({}, "reg.yaml"), {})

    def test_topLevelNotMapping(self) -> None:
        """
        A document that is not a mapping is refused at the top level.
        """
        for document in [[], "services", 1]:
            self.assertBadField(document, "(top level)", "'services'")

    def test_unknownTopLevelKey(self) -> None:
        """
        An unknown top-level key is named.
        """
        self.assertBadField(
            {"services": {}, "service": {}}, "service", "unknown top-level key"
        )

    def test_servicesNotMapping(self) -> None:
        """
        C{services} that is not a mapping is refused.
        """
        for services in [["a"], "x", 3]:
            self.assertBadField({"services": services}, "services", "mapping")

    def test_servicesEmptyNonMapping(self) -> None:
        """
        C{services} that is an empty value of the wrong type (an empty
        list or string, 0, false) is refused like any other non-mapping,
        rather than read as no services (which, on reload, would drop every
        route instead of keeping the last good table).  Only a missing or
        null value means none.
        """
        accepted = []
        for services in [[], "", 0, False]:
            try:
                parseRegistry({"services": services}, "reg.yaml")
            except RegistryFileError as e:
                self.assertTrue(str(e).startswith("reg.yaml: services: "), str(e))
            else:
                accepted.append(services)
        self.assertEqual(accepted, [])

    def test_serviceName(self) -> None:
        """
        A service name that is not a non-empty string is refused.
        """
        self.assertBadField(
            {"services": {1: {"endpoints": []}}}, "services.1", "non-empty string"
        )
        self.assertBadField({"services": {"": {"endpoints": []}}}, "services.")

    def test_serviceNotMapping(self) -> None:
        """
        A service that is not a mapping is refused under its name.
        """
        for spec in [None, ["h:1"], "h:1"]:
            self.assertBadField(
                {"services": {ECHO: spec}}, f"services.{ECHO}", "'endpoints'"
            )

    def test_unknownServiceKey(self) -> None:
        """
        An unknown key in a service is named under the service.
        """
        self.assertBadField(
            {"services": {ECHO: {"endpoints": [], "endpiont": 1}}},
            f"services.{ECHO}.endpiont",
            "unknown key",
        )

    def test_endpointsNotList(self) -> None:
        """
        Missing endpoints, or endpoints that are not a list, are refused.
        """
        for spec in [{}, {"endpoints": "h:1"}, {"endpoints": None}, {"policy": {}}]:
            self.assertBadField(
                {"services": {ECHO: spec}}, f"services.{ECHO}.endpoints", "host:port"
            )

    def test_badEndpoint(self) -> None:
        """
        A bad endpoint is named by its index in the list.
        """
        self.assertBadField(
            {"services": {ECHO: {"endpoints": ["h:1", "nope", "h:2"]}}},
            f"services.{ECHO}.endpoints[1]",
            "'nope'",
        )
        self.assertBadField(
            {"services": {ECHO: {"endpoints": ["h:70000"]}}},
            f"services.{ECHO}.endpoints[0]",
            "port out of range",
        )

    def test_policyNotMapping(self) -> None:
        """
        A policy that is not a mapping is refused.
        """
        self.assertBadField(
            {"services": {ECHO: {"endpoints": [], "policy": "30s"}}},
            f"services.{ECHO}.policy",
            "mapping",
        )

    def test_policyEmptyNonMapping(self) -> None:
        """
        A policy that is an empty value of the wrong type (an empty list or
        string, 0, false) is refused like any other non-mapping; only a
        missing or null policy means the defaults.
        """
        self.assertEqual(
            parseRegistry(
                {"services": {ECHO: {"endpoints": [], "policy": None}}}, "reg.yaml"
            )[ECHO].policy,
            DEFAULT_POLICY,
        )
        accepted = []
        for policy in [[], "", 0, False]:
            document = {"services": {ECHO: {"endpoints": [], "policy": policy}}}
            try:
                parseRegistry(document, "reg.yaml")
            except RegistryFileError as e:
                prefix = f"reg.yaml: services.{ECHO}.policy: "
                self.assertTrue(str(e).startswith(prefix), str(e))
            else:
                accepted.append(policy)
        self.assertEqual(accepted, [])

    def test_badPolicyValue(self) -> None:
        """
        A bad policy value is named by its key under the service's policy,
        with the policy parser's reason (once, not repeating the key).
        """
        with self.assertRaises(RegistryFileError) as e:
            parseRegistry(
                {"services": {ECHO: {"endpoints": [], "policy": {"timeout": "soon"}}}},
                "reg.yaml",
            )
        self.assertEqual(
            str(e.exception),
            f"reg.yaml: services.{ECHO}.policy.timeout: "
            "expected a duration like '30s', got 'soon'",
        )

    def test_unknownPolicyKey(self) -> None:
        """
        An unknown policy key is named under the service's policy.
        """
        self.assertBadField(
            {"services": {ECHO: {"endpoints": [], "policy": {"timeuot": "1s"}}}},
            f"services.{ECHO}.policy.timeuot",
            "unknown policy key",
        )


class LoadRegistryFileTests(SynchronousTestCase):
    """
    L{loadRegistryFile} reads and validates a file.
    """

    def test_valid(self) -> None:
        """
        A valid file gives its table, with the file as each entry's source.
        """
        path = self.mktemp()
        writeAtomically(path, yaml.safe_dump(VALID))
        table = loadRegistryFile(path)
        self.assertEqual(table, parseRegistry(VALID, path))
        self.assertEqual(table[ECHO].source["file"], path)

    def test_emptyFile(self) -> None:
        """
        An empty file is an empty registry.
        """
        path = self.mktemp()
        writeAtomically(path, "")
        self.assertEqual(loadRegistryFile(path), {})

    def test_missing(self) -> None:
        """
        A missing file is a L{RegistryFileError} naming the file and why.
        """
        path = self.mktemp()
        with self.assertRaises(RegistryFileError) as e:
            loadRegistryFile(path)
        self.assertEqual(
            str(e.exception), f"{path}: cannot read: No such file or directory"
        )

    def test_directory(self) -> None:
        """
        A directory cannot be read as a registry.
        """
        path = self.mktemp()
        os.makedirs(path)
        with self.assertRaises(RegistryFileError) as e:
            loadRegistryFile(path)
        self.assertTrue(str(e.exception).startswith(f"{path}: cannot read: "))

    def test_invalidYAML(self) -> None:
        """
        Invalid YAML is a L{RegistryFileError} naming the file and the line
        of the problem.
        """
        path = self.mktemp()
        writeAtomically(
            path,
            "services:\n"
            "  service.api.echo:\n"
            '    endpoints: ["127.0.0.1:9001"\n'
            "    policy: {}\n",
        )
        with self.assertRaises(RegistryFileError) as e:
            loadRegistryFile(path)
        self.assertEqual(str(e.exception), f"{path}: invalid YAML at line 4")

    def test_invalidYAMLLine(self) -> None:
        """
        The line reported is the one the parser stopped at.
        """
        path = self.mktemp()
        writeAtomically(path, "services:\n  a: [\n  b: }\n")
        with self.assertRaises(RegistryFileError) as e:
            loadRegistryFile(path)
        self.assertEqual(str(e.exception), f"{path}: invalid YAML at line 3")

    def test_unsafeYAML(self) -> None:
        """
        Python object tags are refused (the file is loaded safely), as
        invalid YAML.
        """
        path = self.mktemp()
        writeAtomically(path, "services: !!python/object/apply:os.getcwd []\n")
        with self.assertRaises(RegistryFileError) as e:
            loadRegistryFile(path)
        self.assertTrue(str(e.exception).startswith(f"{path}: invalid YAML"))

    def test_badField(self) -> None:
        """
        A valid YAML file with a bad field names the file and the field.
        """
        path = self.mktemp()
        writeServices(path, {ECHO: {"endpoints": ["h:1", "h:x"]}})
        with self.assertRaises(RegistryFileError) as e:
            loadRegistryFile(path)
        self.assertTrue(
            str(e.exception).startswith(f"{path}: services.{ECHO}.endpoints[1]: "),
            str(e.exception),
        )


class StaticRegistryTests(SynchronousTestCase):
    """
    L{StaticRegistry} serves a file's services and follows its changes.
    """

    interval = 5.0

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = self.mktemp()
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        writeServices(self.path, {ECHO: {"endpoints": ["127.0.0.1:9001"]}})
        self.registry = StaticRegistry(
            self.path, clock=self.clock, interval=self.interval
        )
        self.recorder = Recorder()
        self.registry.subscribe(self.recorder)
        self.observer = EventRecorder()
        globalLogPublisher.addObserver(self.observer)
        self.addCleanup(globalLogPublisher.removeObserver, self.observer)

    def startPolling(self) -> None:
        """
        Start the registry's service, and stop it when the test ends.
        """
        self.registry.startService()
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        if self.registry.running:
            self.registry.stopService()

    def test_unchangedFileKeepsSyncFresh(self) -> None:
        """
        Each poll that finds the file as last read counts as hearing from
        the source: the last sync stays within one poll interval of now on
        a healthy, unchanged file; a file that disappears or no longer
        loads stops it.
        """
        self.startPolling()
        for _ in range(4):
            self.clock.advance(self.interval)
            assert self.registry.lastSync is not None
            self.assertLessEqual(
                self.clock.seconds() - self.registry.lastSync, self.interval
            )
        with open(self.path, "w") as f:
            f.write("services: [not, a, mapping]\n")
        self.clock.advance(self.interval)
        failedAt = self.clock.seconds()
        for _ in range(3):
            self.clock.advance(self.interval)
        assert self.registry.lastSync is not None
        self.assertLess(self.registry.lastSync, failedAt)
        os.remove(self.path)
        self.clock.advance(self.interval * 2)
        self.assertLess(self.registry.lastSync, failedAt)

    def errors(self) -> list[LogEvent]:
        """
        Error events the registry logged.
        """
        return [
            e
            for e in self.observer.events
            if e.get("log_level") == LogLevel.error
            and e.get("log_namespace", "").startswith("monedge.registry.static")
        ]

    def test_initialLoad(self) -> None:
        """
        The file is read when the registry is made: its services are there
        at once, counted as one successful read.
        """
        found = self.registry.lookup(ECHO)
        assert found is not None
        self.assertEqual(found.endpoints, (Endpoint("127.0.0.1", 9001),))
        self.assertEqual(set(self.registry.services()), {ECHO})
        self.assertEqual(self.registry.reloadsSucceeded, 1)
        self.assertEqual(self.registry.reloadsFailed, 0)
        self.assertTrue(self.registry.isReady())

    def test_invalidAtStartup(self) -> None:
        """
        An invalid or missing file at startup is an error naming the file
        and the field.
        """
        writeServices(
            self.path, {ECHO: {"endpoints": ["h:1"], "policy": {"timeout": "x"}}}
        )
        with self.assertRaises(RegistryFileError) as e:
            StaticRegistry(self.path, clock=self.clock)
        self.assertIn(
            f"{self.path}: services.{ECHO}.policy.timeout: ", str(e.exception)
        )
        with self.assertRaises(RegistryFileError):
            StaticRegistry(self.mktemp(), clock=self.clock)

    def test_describe(self) -> None:
        """
        L{StaticRegistry.describe} gives the kind, the file, the reload
        counts and the last error.
        """
        self.assertEqual(
            dict(self.registry.describe()),
            {
                "kind": "static",
                "file": self.path,
                "reloads": {"ok": 1, "failed": 0},
                "last_error": None,
            },
        )

    def test_pollsEveryInterval(self) -> None:
        """
        Once started, the registry checks the file every C{interval}
        seconds: a change is picked up at the next check, not before, and
        listeners are told which services changed.
        """
        self.startPolling()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        writeServices(
            self.path,
            {
                ECHO: {"endpoints": ["127.0.0.1:9002"]},
                "service.api.new": {"endpoints": ["127.0.0.1:9003"]},
            },
        )
        self.clock.advance(self.interval - 0.1)
        self.assertEqual(self.registry.reloadsSucceeded, 1)
        self.assertEqual(self.recorder.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.registry.reloadsSucceeded, 2)
        self.assertEqual(self.recorder.calls, [frozenset([ECHO, "service.api.new"])])
        found = self.registry.lookup(ECHO)
        assert found is not None
        self.assertEqual(found.endpoints, (Endpoint("127.0.0.1", 9002),))

        writeServices(self.path, {"service.api.new": {"endpoints": ["127.0.0.1:9003"]}})
        self.clock.advance(self.interval)
        self.assertEqual(self.registry.reloadsSucceeded, 3)
        self.assertEqual(self.recorder.calls[-1], frozenset([ECHO]))
        self.assertIsNone(self.registry.lookup(ECHO))
        self.assertEqual(self.errors(), [])

    def test_unchangedNotReread(self) -> None:
        """
        A file that has not changed is not read again, however many checks
        pass.
        """
        self.startPolling()
        for _ in range(10):
            self.clock.advance(self.interval)
        self.assertEqual(self.registry.reloadsSucceeded, 1)
        self.assertEqual(self.recorder.calls, [])

    def test_sameContentNewFile(self) -> None:
        """
        A file replaced by one with the same content is read again, but no
        service changed, so no listener is told.
        """
        self.startPolling()
        writeServices(self.path, {ECHO: {"endpoints": ["127.0.0.1:9001"]}})
        self.clock.advance(self.interval)
        self.assertEqual(self.registry.reloadsSucceeded, 2)
        self.assertEqual(self.recorder.calls, [])

    def test_invalidReloadKeepsTable(self) -> None:
        """
        An invalid file on reload keeps the last good table, tells no
        listener, counts the failure, records and logs the error naming the
        file and the field.
        """
        self.startPolling()
        writeServices(self.path, {ECHO: {"endpoints": ["127.0.0.1:9001", "bad"]}})
        self.clock.advance(self.interval)
        self.assertEqual(self.registry.reloadsFailed, 1)
        self.assertEqual(self.registry.reloadsSucceeded, 1)
        found = self.registry.lookup(ECHO)
        assert found is not None
        self.assertEqual(found.endpoints, (Endpoint("127.0.0.1", 9001),))
        self.assertEqual(self.recorder.calls, [])
        expected = f"{self.path}: services.{ECHO}.endpoints[1]: "
        lastError = self.registry.lastError
        assert lastError is not None
        self.assertTrue(lastError.startswith(expected), lastError)
        describe = self.registry.describe()
        self.assertEqual(describe["reloads"], {"ok": 1, "failed": 1})
        self.assertEqual(describe["last_error"], lastError)
        [error] = self.errors()
        self.assertEqual(error["error"], lastError)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_invalidReloadHidesCredentials(self) -> None:
        """
        A refused endpoint that carries credentials or a query is recorded
        and logged without them.
        """
        self.startPolling()
        writeServices(
            self.path,
            {ECHO: {"endpoints": ["https://edge:s3cret@10.0.0.1:443/x?token=abc"]}},
        )
        self.clock.advance(self.interval)
        self.assertEqual(self.registry.reloadsFailed, 1)
        lastError = self.registry.lastError
        assert lastError is not None
        [error] = self.errors()
        for text in (lastError, str(error["error"])):
            self.assertNotIn("s3cret", text)
            self.assertNotIn("abc", text)
            self.assertIn(f"services.{ECHO}.endpoints[0]", text)

    def test_invalidReloadCountedOnce(self) -> None:
        """
        An invalid file is counted and logged once, not again at every
        check while it stays the same.
        """
        self.startPolling()
        writeAtomically(self.path, "services: [\n")
        for _ in range(5):
            self.clock.advance(self.interval)
        self.assertEqual(self.registry.reloadsFailed, 1)
        self.assertEqual(len(self.errors()), 1)

    def test_recoversAfterInvalid(self) -> None:
        """
        Once an invalid file is fixed, the next check reads it, tells the
        listeners, and clears the last error.
        """
        self.startPolling()
        writeAtomically(self.path, "services: {\n")
        self.clock.advance(self.interval)
        lastError = self.registry.lastError
        assert lastError is not None
        self.assertIn("invalid YAML at line", lastError)
        writeServices(self.path, {ECHO: {"endpoints": ["127.0.0.1:9005"]}})
        self.clock.advance(self.interval)
        self.assertEqual(self.registry.reloadsSucceeded, 2)
        self.assertEqual(self.registry.reloadsFailed, 1)
        self.assertIsNone(self.registry.lastError)
        self.assertEqual(self.recorder.calls, [frozenset([ECHO])])

    def test_deletedFile(self) -> None:
        """
        A file that disappears keeps the last good table (a failed read);
        when it comes back it is read again.
        """
        self.startPolling()
        os.remove(self.path)
        self.clock.advance(self.interval)
        self.assertEqual(self.registry.reloadsFailed, 1)
        self.assertIsNotNone(self.registry.lookup(ECHO))
        lastError = self.registry.lastError
        assert lastError is not None
        self.assertIn("cannot read", lastError)
        writeServices(self.path, {})
        self.clock.advance(self.interval)
        self.assertEqual(self.registry.reloadsSucceeded, 2)
        self.assertEqual(self.registry.services(), {})
        self.assertEqual(self.recorder.calls, [frozenset([ECHO])])

    def test_reloadReturnsBool(self) -> None:
        """
        L{StaticRegistry.reload} reads the file now, without waiting for a
        check, and says whether it could.
        """
        writeServices(self.path, {"service.api.b": {"endpoints": ["h:1"]}})
        self.assertIs(self.registry.reload(), True)
        self.assertEqual(self.recorder.calls, [frozenset([ECHO, "service.api.b"])])
        writeAtomically(self.path, "services: 1\n")
        self.assertIs(self.registry.reload(), False)
        self.assertEqual(set(self.registry.services()), {"service.api.b"})
        self.assertIs(self.registry.reload(), False)
        self.assertEqual(self.registry.reloadsFailed, 2)
        self.assertEqual(self.registry.reloadsSucceeded, 2)

    def test_reloadThenPollDoesNotReread(self) -> None:
        """
        After an explicit reload, the next check does not read the same
        file again.
        """
        self.startPolling()
        writeServices(self.path, {})
        self.assertTrue(self.registry.reload())
        self.clock.advance(self.interval)
        self.assertEqual(self.registry.reloadsSucceeded, 2)

    def test_stopServiceStopsPolling(self) -> None:
        """
        After L{StaticRegistry.stopService}, no check is scheduled and a
        changed file is not read.
        """
        self.startPolling()
        self.assertTrue(self.registry.running)
        self.registry.stopService()
        self.assertFalse(self.registry.running)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        writeServices(self.path, {})
        self.clock.advance(self.interval * 3)
        self.assertEqual(self.registry.reloadsSucceeded, 1)
        self.assertIsNotNone(self.registry.lookup(ECHO))

    def test_restart(self) -> None:
        """
        A stopped registry can be started again, and polls again.
        """
        self.startPolling()
        self.registry.stopService()
        self.registry.startService()
        writeServices(self.path, {})
        self.clock.advance(self.interval)
        self.assertEqual(self.registry.reloadsSucceeded, 2)


if TYPE_CHECKING:
    _ContractBase = SynchronousTestCase
else:
    _ContractBase = object


class RegistryContractMixin(_ContractBase):
    """
    What every L{IServiceRegistry} does.  Mixed into a L{SynchronousTestCase}
    that says how to make the registry under test.
    """

    def makeRegistry(
        self, services: Mapping[str, Any]
    ) -> tuple[IServiceRegistry, Callable[[Mapping[str, Any]], None]]:
        """
        A registry serving C{services} (registry file form: name to
        C{{"endpoints": [...], "policy": {...}}}), and a callable that makes
        it serve other services, completely replacing the first.
        """
        raise NotImplementedError()

    def test_verifyObject(self) -> None:
        """
        The registry provides L{IServiceRegistry}, with every method and
        attribute.
        """
        registry, _ = self.makeRegistry({})
        self.assertTrue(verifyObject(IServiceRegistry, registry))
        self.assertIsInstance(registry.reloadsSucceeded, int)
        self.assertIsInstance(registry.reloadsFailed, int)

    def test_lookupPresent(self) -> None:
        """
        A present service is found, with its endpoints and policy.
        """
        registry, _ = self.makeRegistry(
            {
                ECHO: {
                    "endpoints": ["127.0.0.1:9001", "[::1]:9002"],
                    "policy": {"timeout": "2s"},
                }
            }
        )
        found = registry.lookup(ECHO)
        assert found is not None
        self.assertEqual(found.name, ECHO)
        self.assertEqual(
            found.endpoints, (Endpoint("127.0.0.1", 9001), Endpoint("::1", 9002))
        )
        self.assertEqual(found.policy, Policy(timeout=2.0))

    def test_lookupAbsent(self) -> None:
        """
        An absent service is L{None}, including a near miss.
        """
        registry, _ = self.makeRegistry({ECHO: {"endpoints": ["h:1"]}})
        for name in ["service.api.other", "service.api.ech", "SERVICE.API.ECHO", ""]:
            self.assertIsNone(registry.lookup(name), name)

    def test_services(self) -> None:
        """
        L{IServiceRegistry.services} maps every name to its entry.
        """
        registry, _ = self.makeRegistry(
            {ECHO: {"endpoints": ["h:1"]}, "service.api.b": {"endpoints": []}}
        )
        services = registry.services()
        self.assertEqual(set(services), {ECHO, "service.api.b"})
        self.assertEqual(services[ECHO], registry.lookup(ECHO))

    def test_servicesSnapshot(self) -> None:
        """
        A snapshot of the services does not follow later updates.
        """
        registry, update = self.makeRegistry({ECHO: {"endpoints": ["h:1"]}})
        snapshot = registry.services()
        update({"service.api.b": {"endpoints": ["h:2"]}})
        self.assertEqual(set(snapshot), {ECHO})
        self.assertEqual(set(registry.services()), {"service.api.b"})

    def test_update(self) -> None:
        """
        After an update, lookups answer from the new services.
        """
        registry, update = self.makeRegistry({ECHO: {"endpoints": ["h:1"]}})
        update({ECHO: {"endpoints": ["h:2"]}, "service.api.b": {"endpoints": []}})
        found = registry.lookup(ECHO)
        assert found is not None
        self.assertEqual(found.endpoints, (Endpoint("h", 2),))
        self.assertIsNotNone(registry.lookup("service.api.b"))

    def test_subscribeChangedNames(self) -> None:
        """
        A listener is told exactly the names that were changed, added or
        removed (in one call or several: a watched registry hears of
        Services and their endpoints separately), and nothing for an update
        that changes nothing.
        """
        registry, update = self.makeRegistry(
            {
                "service.api.same": {"endpoints": ["h:1"]},
                "service.api.changes": {"endpoints": ["h:2"]},
                "service.api.policy": {"endpoints": ["h:3"]},
                "service.api.goes": {"endpoints": ["h:4"]},
            }
        )
        recorder = Recorder()
        registry.subscribe(recorder)
        update(
            {
                "service.api.same": {"endpoints": ["h:1"]},
                "service.api.changes": {"endpoints": ["h:2", "h:5"]},
                "service.api.policy": {
                    "endpoints": ["h:3"],
                    "policy": {"expose": False},
                },
                "service.api.comes": {"endpoints": []},
            }
        )
        self.assertEqual(
            frozenset().union(*recorder.calls),
            frozenset(
                [
                    "service.api.changes",
                    "service.api.policy",
                    "service.api.goes",
                    "service.api.comes",
                ]
            ),
        )
        self.assertNotIn(frozenset(), recorder.calls)
        calls = len(recorder.calls)
        update(
            {
                "service.api.same": {"endpoints": ["h:1"]},
                "service.api.changes": {"endpoints": ["h:2", "h:5"]},
                "service.api.policy": {
                    "endpoints": ["h:3"],
                    "policy": {"expose": False},
                },
                "service.api.comes": {"endpoints": []},
            }
        )
        self.assertEqual(len(recorder.calls), calls)

    def test_unsubscribe(self) -> None:
        """
        Once unsubscribed, a listener is told of nothing; others still are.
        """
        registry, update = self.makeRegistry({ECHO: {"endpoints": ["h:1"]}})
        gone, stays = Recorder(), Recorder()
        unsubscribe = registry.subscribe(gone)
        registry.subscribe(stays)
        unsubscribe()
        update({})
        self.assertEqual(gone.calls, [])
        self.assertEqual(stays.calls, [frozenset([ECHO])])

    def test_isReady(self) -> None:
        """
        A registry that has its services is ready.
        """
        registry, _ = self.makeRegistry({ECHO: {"endpoints": ["h:1"]}})
        self.assertIs(registry.isReady(), True)

    def test_describe(self) -> None:
        """
        L{IServiceRegistry.describe} is a mapping that names the registry's
        kind.
        """
        registry, _ = self.makeRegistry({})
        description = registry.describe()
        self.assertIsInstance(description, Mapping)
        self.assertIsInstance(description["kind"], str)


class MemoryRegistryContractTests(RegistryContractMixin, SynchronousTestCase):
    """
    The contract, against L{MemoryRegistry}.
    """

    def makeRegistry(
        self, services: Mapping[str, Any]
    ) -> tuple[IServiceRegistry, Callable[[Mapping[str, Any]], None]]:
        registry = MemoryRegistry()

        def update(services: Mapping[str, Any]) -> None:
            table = parseRegistry({"services": dict(services)}, "memory")
            registry.replaceAll(list(table.values()))

        update(services)
        return registry, update


class StaticRegistryContractTests(RegistryContractMixin, SynchronousTestCase):
    """
    The contract, against L{StaticRegistry}, updated by rewriting its file
    and letting it poll.
    """

    def makeRegistry(
        self, services: Mapping[str, Any]
    ) -> tuple[IServiceRegistry, Callable[[Mapping[str, Any]], None]]:
        path = self.mktemp()
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        writeServices(path, services)
        clock = Clock()
        registry = StaticRegistry(path, clock=clock, interval=1.0)
        registry.startService()
        self.addCleanup(registry.stopService)

        def update(services: Mapping[str, Any]) -> None:
            writeServices(path, services)
            clock.advance(1.0)

        return registry, update
