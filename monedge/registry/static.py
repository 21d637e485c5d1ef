"""
The static registry: services read from a YAML file, reloaded when it
changes.

    services:
      service.api.echo:
        endpoints: ["127.0.0.1:9001", "127.0.0.1:9002"]
        policy: {timeout: 30s, strip-prefix: true, max-body-size: 10MiB}

An invalid file at startup is an error naming the file and the bad field.
An invalid file on reload keeps the last good table, is logged and counted.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import yaml
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from monedge.interfaces import IServiceRegistry
from monedge.registry import Endpoint, RegistryTable, ServiceEntry, TableRegistry
from monedge.rules.policy import PolicyError, parsePolicy
from monedge.rules.redact import redactText

_ADDRESS = re.compile(
    r"(?:(?P<scheme>https?)://)?(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d{1,5})/?\Z"
)


class RegistryFileError(ValueError):
    """
    A registry file that cannot be used; the message names the file and
    the field.
    """


def parseEndpoint(value: object) -> Endpoint:
    """
    Parse C{host:port}, C{[v6]:port} or C{http(s)://host:port}.

    @raise ValueError: for anything else.
    """
    if not isinstance(value, str):
        raise ValueError(f'expected "host:port", got {value!r}')
    match = _ADDRESS.match(value.strip())
    if match is None:
        raise ValueError(f'expected "host:port", got {value!r}')
    port = int(match.group("port"))
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {value!r}")
    host = match.group("v6") or match.group("host")
    return Endpoint(host=host, port=port, scheme=match.group("scheme") or "http")


def parseRegistry(document: object, where: str) -> dict[str, ServiceEntry]:
    """
    Validate a parsed YAML document into a table.

    @param where: the file name, for error messages.
    @raise RegistryFileError: naming C{where} and the bad field.
    """

    def fail(field: str, message: str) -> RegistryFileError:
        return RegistryFileError(f"{where}: {field}: {message}")

    if document is None:
        document = {"services": {}}
    if not isinstance(document, dict):
        raise fail("(top level)", "expected a mapping with a 'services' key")
    unknown = set(document) - {"services"}
    if unknown:
        raise fail(str(sorted(map(str, unknown))[0]), "unknown top-level key")
    services = document.get("services")
    if services is None:
        services = {}
    if not isinstance(services, dict):
        raise fail("services", "expected a mapping of service name to service")
    table: dict[str, ServiceEntry] = {}
    for name, spec in services.items():
        field = f"services.{name}"
        if not isinstance(name, str) or not name:
            raise fail(field, "a service name must be a non-empty string")
        if not isinstance(spec, dict):
            raise fail(field, "expected a mapping with 'endpoints'")
        extra = set(spec) - {"endpoints", "policy"}
        if extra:
            raise fail(f"{field}.{sorted(map(str, extra))[0]}", "unknown key")
        endpoints = spec.get("endpoints")
        if not isinstance(endpoints, list):
            raise fail(f"{field}.endpoints", 'expected a list of "host:port"')
        parsed = []
        for index, value in enumerate(endpoints):
            try:
                parsed.append(parseEndpoint(value))
            except ValueError as e:
                raise fail(f"{field}.endpoints[{index}]", str(e)) from None
        policySpec = spec.get("policy")
        if policySpec is None:
            policySpec = {}
        if not isinstance(policySpec, dict):
            raise fail(f"{field}.policy", "expected a mapping")
        try:
            policy = parsePolicy(policySpec)
        except PolicyError as e:
            raise fail(f"{field}.policy.{e.field}", str(e).split(": ", 1)[1]) from None
        table[name] = ServiceEntry(
            name=name,
            endpoints=tuple(parsed),
            policy=policy,
            source={"kind": "static", "file": where},
        )
    return table


def loadRegistryFile(path: str) -> dict[str, ServiceEntry]:
    """
    Read and validate a registry file.

    @raise RegistryFileError: naming the file and the bad field.
    """
    try:
        with open(path, "rb") as f:
            document = yaml.safe_load(f)
    except OSError as e:
        raise RegistryFileError(f"{path}: cannot read: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise RegistryFileError(f"{path}: invalid YAML{at}") from None
    return parseRegistry(document, path)


def _fileIdentity(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@implementer(IServiceRegistry)
class StaticRegistry(TableRegistry, Service):
    """
    Services from a YAML file, polled for changes every C{interval} seconds
    and re-read on L{reload} (wired to SIGHUP by the tap).
    """

    _log = Logger()

    def __init__(
        self,
        path: str,
        clock: IReactorTime | None = None,
        interval: float = 1.0,
    ) -> None:
        self.path = path
        self.reloadsSucceeded = 0
        self.reloadsFailed = 0
        #: A bad static file is refused whole, never partly defaulted.
        self.invalidConfig = 0
        self.lastSync: float | None = None
        self.lastError: str | None = None
        self._clock = clock
        self._interval = interval
        self._table = RegistryTable()
        self._identity = _fileIdentity(path)
        self._table.replaceAll(loadRegistryFile(path))
        self.reloadsSucceeded += 1
        self.lastSync = self._now()
        self._poll: LoopingCall | None = None

    # IServiceRegistry (lookup, services, subscribe: from TableRegistry)

    def isReady(self) -> bool:
        return True

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock.seconds()
        import time

        return time.time()

    # Reloading

    def reload(self) -> bool:
        """
        Re-read the file now.  On error, keep the current table.

        @return: whether the file was read successfully.
        """
        self._identity = _fileIdentity(self.path)
        try:
            table = loadRegistryFile(self.path)
        except RegistryFileError as e:
            self.reloadsFailed += 1
            # Endpoints may carry credentials: the log never shows them.
            self.lastError = redactText(str(e))
            self._log.error(
                "registry reload failed, keeping the last good table: {error}",
                error=self.lastError,
            )
            return False
        self.reloadsSucceeded += 1
        self.lastSync = self._now()
        self.lastError = None
        changed = self._table.replaceAll(table)
        self._log.info(
            "registry reloaded from {path}: {count} services, {changed} changed",
            path=self.path,
            count=len(table),
            changed=len(changed),
        )
        return True

    def checkForChange(self) -> None:
        """
        Reload if the file looks different from when it was last read.
        """
        identity = _fileIdentity(self.path)
        if identity != self._identity:
            self.reload()
        elif identity is not None and self.lastError is None:
            # The file is still the one last read, whole and valid: the
            # table is in sync with its source as of now.
            self.lastSync = self._now()

    def startService(self) -> None:
        super().startService()
        self._poll = LoopingCall(self.checkForChange)
        if self._clock is not None:
            self._poll.clock = self._clock
        self._poll.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None

    def describe(self) -> Mapping[str, Any]:
        return {
            "kind": "static",
            "file": self.path,
            "reloads": {"ok": self.reloadsSucceeded, "failed": self.reloadsFailed},
            "last_error": self.lastError,
        }
