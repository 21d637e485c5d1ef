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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "ADDED",
    "BOOKMARK",
    "DELETED",
    "ENDPOINT_SLICES",
    "EVENT_TYPES",
    "KINDS",
    "MODIFIED",
    "SERVICES",
    "KubeObject",
    "KubernetesAPIError",
    "ObjectList",
    "ResourceExpired",
    "WatchEvent",
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


@dataclass(frozen=True)
class ObjectList:
    """
    Every object of one kind (in one namespace, or in all), as of one
    C{resourceVersion}: a watch from that version misses no change after
    the list.

    @ivar items: the objects, as the API serves them.
    @ivar resourceVersion: the version the list was taken at.
    """

    items: Sequence[KubeObject]
    resourceVersion: str


@dataclass(frozen=True)
class WatchEvent:
    """
    One watch event.

    @ivar type: one of L{EVENT_TYPES}.
    @ivar object: the object as it is now (for L{DELETED}, its last state,
        with the deletion's resourceVersion; for L{BOOKMARK}, only
        C{metadata.resourceVersion}).
    """

    type: str
    object: KubeObject

    @property
    def resourceVersion(self) -> str | None:
        """
        The version the watch has reached with this event, if it says.
        """
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
