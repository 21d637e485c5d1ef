"""
The service registry's data model and the change fan-out that every
registry shares.  Implementations live beside this module: L{static} reads a
YAML file; the Kubernetes registry watches the API.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from monedge.rules.policy import DEFAULT_POLICY, Policy

Listener = Callable[[frozenset[str]], None]


@dataclass(frozen=True, slots=True)
class Endpoint:
    """
    One address a service answers on.

    The conditions follow EndpointSlice semantics: traffic goes to C{ready}
    endpoints, and only when none is ready to C{serving} ones that are
    C{terminating}.
    """

    host: str
    port: int
    scheme: str = "http"
    ready: bool = True
    serving: bool = True
    terminating: bool = False

    @property
    def authority(self) -> str:
        """
        C{host:port}, with IPv6 literals bracketed.
        """
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def asJSON(self) -> dict[str, Any]:
        """
        This endpoint for C{/routes}.
        """
        return {
            "address": self.authority,
            "scheme": self.scheme,
            "ready": self.ready,
            "serving": self.serving,
            "terminating": self.terminating,
        }


@dataclass(frozen=True, slots=True)
class ServiceEntry:
    """
    A service as the registry knows it.

    @ivar name: the registry name, C{service.<tier>.<name>}.
    @ivar endpoints: every endpoint, whatever its conditions.
    @ivar policy: the service's effective policy.
    @ivar source: where the entry came from, for C{/routes}.
    """

    name: str
    endpoints: tuple[Endpoint, ...]
    policy: Policy = DEFAULT_POLICY
    source: Mapping[str, Any] = field(default_factory=dict)


class RegistryTable:
    """
    The table behind a registry, with change notification.

    Registries replace the whole table (or one entry) and this works out
    which names changed and tells every listener, on the calling (reactor)
    thread.
    """

    _log = Logger()

    def __init__(self) -> None:
        self._table: dict[str, ServiceEntry] = {}
        self._listeners: list[Listener] = []

    def lookup(self, name: str) -> ServiceEntry | None:
        return self._table.get(name)

    def services(self) -> Mapping[str, ServiceEntry]:
        return dict(self._table)

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)

        def unsubscribe() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return unsubscribe

    def replaceAll(self, table: Mapping[str, ServiceEntry]) -> frozenset[str]:
        """
        Make C{table} the whole table; notify of every name that changed.
        """
        old = self._table
        new = dict(table)
        changed = frozenset(
            name for name in old.keys() | new.keys() if old.get(name) != new.get(name)
        )
        self._table = new
        self._notify(changed)
        return changed

    def update(self, entries: Mapping[str, ServiceEntry | None]) -> frozenset[str]:
        """
        Put or (for L{None}) remove several entries; notify once of every
        name that changed.
        """
        table = self._table
        changed = []
        for name, entry in entries.items():
            if table.get(name) == entry:
                continue
            if entry is None:
                del table[name]
            else:
                table[name] = entry
            changed.append(name)
        result = frozenset(changed)
        self._notify(result)
        return result

    def put(self, entry: ServiceEntry) -> None:
        """
        Add or replace one entry.
        """
        if self._table.get(entry.name) != entry:
            self._table[entry.name] = entry
            self._notify(frozenset([entry.name]))

    def remove(self, name: str) -> None:
        """
        Remove one entry, if present.
        """
        if self._table.pop(name, None) is not None:
            self._notify(frozenset([name]))

    def _notify(self, changed: frozenset[str]) -> None:
        if not changed:
            return
        for listener in list(self._listeners):
            try:
                listener(changed)
            except Exception:
                self._log.failure("registry listener failed")


class TableRegistry:
    """
    The query half of L{IServiceRegistry} (lookup, snapshot, subscribe),
    answered from the L{RegistryTable} in C{self._table}: registries differ
    in how they fill the table, not in how they answer.
    """

    _table: RegistryTable

    def lookup(self, name: str) -> ServiceEntry | None:
        return self._table.lookup(name)

    def services(self) -> Mapping[str, ServiceEntry]:
        return self._table.services()

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return self._table.subscribe(listener)
