"""
Per-service policy: timeouts, prefix stripping, body limits and exposure.

The same keys are read from the static registry's ``policy:`` mapping and,
on Kubernetes, from ``monedge.io/<key>`` annotations, so both parse through
L{parsePolicy}.  Values may be YAML scalars or strings.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any

import yaml

from monedge.rules.syntax import parseBool, parseDuration, parseSize

MIB = 1 << 20


class PolicyError(ValueError):
    """
    An invalid policy value.

    @ivar field: the policy key that is wrong.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


_SERVER_NAME = re.compile(
    r"(?=.{1,253}\Z)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*\Z"
)


def parsePath(value: object) -> str | None:
    """
    Parse a file path: a non-empty string without NUL; L{None} (YAML
    C{null}) for none.

    @raise ValueError: for anything else.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or "\x00" in value:
        raise ValueError(f"expected a file path, got {value!r}")
    return value.strip()


def parseServerName(value: object) -> str | None:
    """
    Parse a DNS name to verify an upstream's certificate against; L{None}
    (YAML C{null}) for none.

    @raise ValueError: for anything else.
    """
    if value is None:
        return None
    if not isinstance(value, str) or not _SERVER_NAME.match(value.strip().lower()):
        raise ValueError(f"expected a DNS name, got {value!r}")
    return value.strip().lower()


#: The protocols monedge speaks to a service's endpoints.
PROTOCOLS = ("http1", "h2c", "h2")


def parseProtocol(value: object) -> str:
    """
    Parse an upstream protocol: C{http1}, C{h2c} (cleartext HTTP/2 with
    prior knowledge) or C{h2} (HTTP/2 over TLS, ALPN C{h2}).

    @raise ValueError: for anything else.
    """
    if isinstance(value, str) and value.strip().lower() in PROTOCOLS:
        return value.strip().lower()
    raise ValueError(f"expected one of {', '.join(PROTOCOLS)}, got {value!r}")


@dataclass(frozen=True, slots=True)
class HookSpec:
    """
    One configured hook: its plugin name and its options (kept as canonical
    JSON, so that policies compare and hash by value).
    """

    name: str
    options: str = "{}"

    def asJSON(self) -> dict[str, Any]:
        """
        The spec as configuration data, options and any secrets in them
        included (L{parseHooks} reads it back).  Never show it as it is:
        C{/routes} shows it through L{monedge.rules.redact.redactHookOptions}.
        """
        return {"name": self.name, "options": json.loads(self.options)}


def _kind(value: object) -> str:
    """
    What a value is, for an error message that must not quote it.
    """
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        return repr(value)  # A bare hook name, as a misplaced one would be.
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, str):
        return "a string"
    return type(value).__name__


def parseHooks(value: object) -> tuple[HookSpec, ...]:
    """
    Parse a hooks setting: a list whose items are a hook name or a mapping
    with C{name} and optional C{options}.  A string is read as YAML (or
    JSON) first, as an annotation or command-line value is.

    @raise ValueError: with a one-line reason.
    """
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError("hooks: not valid YAML or JSON") from None
    if value is None:
        return ()
    if not isinstance(value, list):
        # Not the value itself: it may hold options with secrets.
        raise ValueError(f"expected a list of hooks, got {_kind(value)}")
    specs = []
    for index, item in enumerate(value):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"[{index}]: expected a hook name or {{name, options}}")
        extra = set(item) - {"name", "options"}
        if extra:
            raise ValueError(f"[{index}]: unknown key {sorted(map(str, extra))[0]!r}")
        options = item.get("options") or {}
        if not isinstance(options, dict):
            raise ValueError(f"[{index}].options: expected a mapping")
        try:
            canonical = json.dumps(options, sort_keys=True)
        except (TypeError, ValueError):
            raise ValueError(f"[{index}].options: not plain data") from None
        specs.append(HookSpec(item["name"], canonical))
    return tuple(specs)


@dataclass(frozen=True, slots=True)
class Policy:
    """
    How monedge treats one service.

    @ivar connectTimeout: seconds to open a connection to an endpoint.
    @ivar timeout: seconds from sending the request to the response headers.
    @ivar idleTimeout: seconds the response body may stall.
    @ivar stripPrefix: forward C{/<rest>} rather than C{/<name>/<rest>}.
    @ivar maxBodySize: the largest request body accepted, in bytes.
    @ivar requestBuffering: hold the whole request body before sending the
        request upstream (in memory, within maxBodySize and the process's
        budget), for upstreams that need it whole; off, bodies stream.
    @ivar expose: whether the service is reachable at all.
    @ivar hooks: the service's own hooks, run after the global ones.
    @ivar tunnelIdleTimeout: seconds an upgraded (WebSocket) connection may
        carry no byte in either direction.
    @ivar upstreamCA: for C{https} endpoints, a PEM bundle of the
        authorities to trust (None: the system's).
    @ivar upstreamServerName: for C{https} endpoints, the name to send as
        SNI and verify (None: the endpoint's host).
    @ivar upstreamClientCertificate: for C{https} endpoints, a PEM file
        (key and certificate) to present (None: none).
    @ivar protocol: what the endpoints speak: C{http1}, C{h2c} or C{h2}.
    @ivar streamIdleTimeout: seconds a gRPC call may carry no byte in
        either direction; it replaces C{timeout}, C{idleTimeout} and the
        request body timeout for gRPC calls, which may be long-lived.
    """

    connectTimeout: float = 5.0
    timeout: float = 60.0
    idleTimeout: float = 60.0
    stripPrefix: bool = True
    maxBodySize: int = 10 * MIB
    requestBuffering: bool = False
    expose: bool = True
    hooks: tuple[HookSpec, ...] = ()
    tunnelIdleTimeout: float = 3600.0
    upstreamCA: str | None = None
    upstreamServerName: str | None = None
    upstreamClientCertificate: str | None = None
    protocol: str = "http1"
    streamIdleTimeout: float = 300.0

    def asJSON(self) -> dict[str, Any]:
        """
        The policy under its documented key names, as configuration data
        (L{parsePolicy} reads it back): its hooks' options are as
        configured, secrets included.  C{/routes} shows it redacted (see
        L{monedge.rules.redact}).
        """
        fields = asdict(self)
        fields["hooks"] = [spec.asJSON() for spec in self.hooks]
        return {key: fields[attr] for key, (attr, _) in POLICY_KEYS.items()}


#: Documented key -> (attribute, parser).
POLICY_KEYS: dict[str, tuple[str, Any]] = {
    "connect-timeout": ("connectTimeout", parseDuration),
    "timeout": ("timeout", parseDuration),
    "idle-timeout": ("idleTimeout", parseDuration),
    "strip-prefix": ("stripPrefix", parseBool),
    "max-body-size": ("maxBodySize", parseSize),
    "request-buffering": ("requestBuffering", parseBool),
    "expose": ("expose", parseBool),
    "hooks": ("hooks", parseHooks),
    "tunnel-idle-timeout": ("tunnelIdleTimeout", parseDuration),
    "upstream-ca": ("upstreamCA", parsePath),
    "upstream-server-name": ("upstreamServerName", parseServerName),
    "upstream-client-certificate": ("upstreamClientCertificate", parsePath),
    "protocol": ("protocol", parseProtocol),
    "stream-idle-timeout": ("streamIdleTimeout", parseDuration),
}

DEFAULT_POLICY = Policy()


def parsePolicy(values: Mapping[str, object], base: Policy = DEFAULT_POLICY) -> Policy:
    """
    Apply C{values} (documented key -> value) on top of C{base}.

    @raise PolicyError: naming the first unknown key or bad value.
    """
    changes: dict[str, Any] = {}
    for key, value in values.items():
        entry = POLICY_KEYS.get(key)
        if entry is None:
            known = ", ".join(sorted(POLICY_KEYS))
            raise PolicyError(str(key), f"unknown policy key (known: {known})")
        attr, parser = entry
        try:
            changes[attr] = parser(value)
        except ValueError as e:
            raise PolicyError(key, str(e)) from None
    return replace(base, **changes)
