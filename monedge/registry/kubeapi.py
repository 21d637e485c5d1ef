"""
What the Kubernetes registry asks of the API server, as data: the kinds it
watches, a list, a watch event, and the API's refusals.

L{monedge.interfaces.IKubernetesAPI} is the interface these travel
through: L{monedge.registry.kubeclient.KubernetesClientAPI} implements it
with the official C{kubernetes} client, and
L{monedge.testing.kubernetes.MemoryKubernetes} in memory, for tests.

Objects are the API's own JSON objects, as dicts: a Service or an
EndpointSlice with its C{metadata} (C{namespace}, C{name},
C{resourceVersion}, C{labels}, C{annotations}).  A C{resourceVersion} is an
opaque string: only the API server may compare two.

A caller may pass a L{Compactor} with a list or watch: the API then runs it
on each object right where the object is decoded (in the real API's client
thread), and hands over what it returns instead of the object, or nothing
when it returns L{None}; so the caller never holds, or spends its own thread
on, objects it does not keep (as client-go's informer transform does).  The
Kubernetes registry's compact forms are L{ServiceRecord} and
L{SliceRecord}; a watch reports an object modified so that the compactor
drops it as C{DELETED}, with a L{Tombstone}.

L{checkLabelSelector} validates a label selector as the API server parses
one, so that a bad C{--selector} stops monedge at startup.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ADDED",
    "BOOKMARK",
    "COMPACTED",
    "DELETED",
    "ENDPOINT_SLICES",
    "EVENT_TYPES",
    "KINDS",
    "MODIFIED",
    "SERVICES",
    "Compactor",
    "KubeObject",
    "KubernetesAPIError",
    "ObjectList",
    "ResourceExpired",
    "ServiceRecord",
    "SliceRecord",
    "Tombstone",
    "WatchEvent",
    "checkLabelSelector",
]

#: v1 Services, by their resource name.
SERVICES = "services"

#: discovery.k8s.io/v1 EndpointSlices, by their resource name.
ENDPOINT_SLICES = "endpointslices"

#: Every kind the registry lists and watches.
KINDS = (SERVICES, ENDPOINT_SLICES)

#: An object as the API serves it, decoded from JSON.
KubeObject = dict[str, Any]

#: A watch event: an object was created (or started to be seen).
ADDED = "ADDED"

#: A watch event: an object changed.
MODIFIED = "MODIFIED"

#: A watch event: an object was deleted; the event carries its last state.
DELETED = "DELETED"

#: A watch event that changes nothing: the server says how far the watch
#: has got (its object has only C{metadata.resourceVersion}).
BOOKMARK = "BOOKMARK"

#: Every watch event type an L{monedge.interfaces.IKubernetesAPI} reports.
EVENT_TYPES = (ADDED, MODIFIED, DELETED, BOOKMARK)


@dataclass(frozen=True, slots=True)
class ServiceRecord:
    """
    What routing needs of a v1 Service, and nothing else: no cycles, and
    only tuples of strings, integers and booleans below it, which the
    cyclic garbage collector stops tracking.

    @ivar registryName: the registry name the Service makes.
    @ivar annotations: its C{monedge.io/*} annotations, as sorted
        (name, value) pairs; the others are dropped.
    @ivar ports: each port's (name, port, appProtocol), C{""} for a
        missing name or appProtocol, in the Service's order.
    """

    namespace: str
    name: str
    resourceVersion: str
    registryName: str
    annotations: tuple[tuple[str, str], ...] = ()
    ports: tuple[tuple[str, int, str], ...] = ()


@dataclass(frozen=True, slots=True)
class SliceRecord:
    """
    What routing needs of a discovery.k8s.io/v1 EndpointSlice (see
    L{ServiceRecord}).

    @ivar registryName: the registry name of the Service it belongs to.
    @ivar serviceName: its C{kubernetes.io/service-name} label.
    @ivar ports: each named port's (name, port), C{""} for no name.
    @ivar endpoints: each endpoint's (first address, ready, serving,
        terminating), read as the API says (an unknown C{ready} is ready,
        an unknown C{serving} is C{ready}); endpoints without an address
        are dropped.
    """

    namespace: str
    name: str
    resourceVersion: str
    registryName: str
    serviceName: str
    addressType: str
    ports: tuple[tuple[str, int], ...] = ()
    endpoints: tuple[tuple[str, bool, bool, bool], ...] = ()


@dataclass(frozen=True, slots=True)
class Tombstone:
    """
    The object of a C{DELETED} watch event that stands for an object
    modified so that the compactor no longer keeps it.
    """

    namespace: str
    name: str
    resourceVersion: str


#: What a list or watch hands over in place of each object: C{(kind,
#: object)} -> its compact form, or L{None} to drop it.  Runs wherever the
#: API decodes objects (another thread, for the real API): it must only
#: read its arguments and immutable state.
Compactor = Callable[[str, KubeObject], ServiceRecord | SliceRecord | None]

#: What a compacting API reports: L{ServiceRecord}, L{SliceRecord} and
#: L{Tombstone} are its objects.
COMPACTED = (ServiceRecord, SliceRecord, Tombstone)


def tombstoneOf(obj: KubeObject) -> Tombstone:
    """
    The L{Tombstone} of an object a compactor dropped.
    """
    metadata = obj.get("metadata")
    meta = metadata if isinstance(metadata, dict) else {}
    return Tombstone(
        str(meta.get("namespace", "")),
        str(meta.get("name", "")),
        str(meta.get("resourceVersion", "")),
    )


def compactEvent(
    kind: str, type_: str, obj: KubeObject, compact: Compactor
) -> WatchEvent | None:
    """
    A watch event as a compacting API reports it: its object compacted;
    C{MODIFIED} to an object the compactor drops becomes C{DELETED} with a
    L{Tombstone} (it may have been kept before); any other event of a
    dropped object is not reported (L{None}).  C{BOOKMARK}s pass as they
    are.
    """
    if type_ not in (ADDED, MODIFIED, DELETED):
        return WatchEvent(type_, obj)
    kept = compact(kind, obj)
    if kept is not None:
        return WatchEvent(type_, kept)
    if type_ == MODIFIED:
        return WatchEvent(DELETED, tombstoneOf(obj))
    return None


#: A label selector's key: an optional DNS subdomain prefix and C{/}, then
#: a name of at most 63 characters.
_LABEL_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
_KEY = rf"(?:{_DNS_SUBDOMAIN}/)?{_LABEL_NAME}"
_VALUE = rf"(?:{_LABEL_NAME})?"
_SELECTOR_REQUIREMENT = re.compile(
    rf"^\s*(?:"
    rf"!\s*(?P<absent>{_KEY})"
    rf"|(?P<key>{_KEY})\s*(?:"
    rf"(?P<equality>==|!=|=)\s*(?P<value>{_VALUE})"
    rf"|(?P<order>[<>])\s*(?P<number>-?[0-9]+)"
    rf"|\s(?P<set>in|notin)\s*\((?P<values>[^()]*)\)"
    rf")?)\s*$"
)
_VALUE_ONLY = re.compile(rf"^{_VALUE}$")


def checkLabelSelector(text: str) -> str:
    """
    C{text}, stripped, if it is a label selector the API server accepts:
    requirements separated by commas, each C{key}, C{!key}, C{key=value},
    C{key==value}, C{key!=value}, C{key in (v1,v2)}, C{key notin (v1,v2)},
    C{key>N} or C{key<N}.

    @raise ValueError: with a one-line reason if it is not.
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty label selector")
    parts: list[str] = []
    depth = 0
    current = ""
    for character in stripped:
        if character == "(":
            depth += 1
        elif character == ")":
            depth -= 1
        if depth not in (0, 1):
            raise ValueError(f"unbalanced parentheses in {stripped!r}")
        if character == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += character
    if depth:
        raise ValueError(f"unbalanced parentheses in {stripped!r}")
    parts.append(current)
    for part in parts:
        match = _SELECTOR_REQUIREMENT.match(part)
        if match is None:
            raise ValueError(f"invalid label selector requirement {part.strip()!r}")
        key = match.group("absent") or match.group("key") or ""
        if len(key.split("/")[0]) > 253:
            raise ValueError(f"label key too long: {key!r}")
        if match.group("set"):
            values = [v.strip() for v in match.group("values").split(",")]
            for value in values:
                if not _VALUE_ONLY.match(value):
                    raise ValueError(
                        f"invalid label value {value!r} in {part.strip()!r}"
                    )
    return stripped


@dataclass(frozen=True)
class ObjectList:
    """
    Every object of one kind (in one namespace, or in all), as of one
    C{resourceVersion}: a watch from that version misses no change after
    the list.

    @ivar items: the objects, as the API serves them (or as a L{Compactor}
        made them, the dropped ones left out).
    @ivar resourceVersion: the version the list was taken at.
    """

    items: Sequence[Any]
    resourceVersion: str


@dataclass(frozen=True)
class WatchEvent:
    """
    One watch event.

    @ivar type: one of L{EVENT_TYPES}.
    @ivar object: the object as it is now (for L{DELETED}, its last state,
        with the deletion's resourceVersion; for L{BOOKMARK}, only
        C{metadata.resourceVersion}), or its compact form (see
        L{Compactor}).
    """

    type: str
    object: Any

    @property
    def resourceVersion(self) -> str | None:
        """
        The version the watch has reached with this event, if it says.
        """
        if isinstance(self.object, COMPACTED):
            return self.object.resourceVersion or None
        metadata = self.object.get("metadata")
        version = (
            metadata.get("resourceVersion") if isinstance(metadata, dict) else None
        )
        return str(version) if version else None


class KubernetesAPIError(Exception):
    """
    The API server refused a list or a watch (an error status, or an
    C{ERROR} event on a watch stream).

    @ivar status: the HTTP status, as the API server's C{Status} gives it.
    @ivar reason: why, in the API server's words.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"API error {status}: {reason}")
        self.status = status
        self.reason = reason


class ResourceExpired(KubernetesAPIError):
    """
    410 Gone: a watch's C{resourceVersion} (or a list's continue token) is
    older than the history the API server keeps.  Nothing can resume from
    it: list again, and watch from the new list's version.
    """

    def __init__(self, reason: str = "Expired") -> None:
        super().__init__(410, reason)
