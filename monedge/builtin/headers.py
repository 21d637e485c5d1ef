"""
The C{headers} hook: set, add and remove request and response headers, with
simple templating.

    hooks:
      - name: headers
        options:
          request:
            set: {X-Client: "{client_address}"}
            remove: [X-Debug]
          response:
            set: {Strict-Transport-Security: "max-age=63072000"}
            add: {X-Served-By: "monedge {request_id}"}

Placeholders: C{{request_id}}, C{{client_address}}, C{{service}},
C{{method}}, C{{path}}.  Write C{{{}} and C{}}} for literal braces.

Header values may be credentials: C{/routes} shows these rules as header
names under their actions (L{monedge.rules.redact}), and configuration errors
name the header, never quote its value.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.plugin import IPlugin
from twisted.web.http_headers import Headers
from zope.interface import implementer

from monedge.hooks import HookConfigError
from monedge.interfaces import (
    IHookFactory,
    IHookRequest,
    IHookResponse,
    IRequestHook,
    IResponseHook,
)
from monedge.rules.syntax import isToken

PLACEHOLDERS = frozenset(["request_id", "client_address", "service", "method", "path"])

_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*\Z")
_PLACEHOLDER_LIKE = re.compile(r"[a-z_]{1,32}\Z")


def _fields(request: IHookRequest) -> dict[str, str]:
    return {
        "request_id": request.requestId,
        "client_address": request.clientAddress,
        "service": request.service,
        "method": request.method.decode("ascii", "replace"),
        "path": request.path.decode("ascii", "replace"),
    }


@dataclass(frozen=True)
class _Template:
    text: str
    dynamic: bool

    @classmethod
    def parse(cls, text: object, where: str) -> _Template:
        # Errors name the header, never quote its value: a rule may set a
        # credential (Authorization), and these messages are logged.
        if not isinstance(text, str):
            raise HookConfigError(
                f"{where}: expected a string, got {type(text).__name__}"
            )
        try:
            names = [
                f for _, f, _, _ in string.Formatter().parse(text) if f is not None
            ]
        except ValueError as e:
            raise HookConfigError(f"{where}: {e}") from None
        unknown = set(names) - PLACEHOLDERS
        if unknown:
            known = ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
            # Named only when it looks like a misspelt placeholder: braces
            # may also be part of the value (JSON), which is not shown.
            name = sorted(unknown)[0]
            which = f" {{{name}}}" if _PLACEHOLDER_LIKE.match(name) else ""
            raise HookConfigError(
                f"{where}: unknown placeholder{which} (known: {known};"
                " write {{ and }} for literal braces)"
            )
        if not _VALUE.match(text):
            raise HookConfigError(
                f"{where}: a header value cannot hold control characters"
            )
        return cls(text, bool(names))

    def render(self, fields: Mapping[str, str]) -> bytes:
        text = self.text.format_map(fields) if self.dynamic else self.text
        # Placeholders carry request data: never let one end the header.
        return text.replace("\r", " ").replace("\n", " ").encode("latin-1", "replace")


@dataclass(frozen=True)
class _Rules:
    set: tuple[tuple[bytes, _Template], ...] = ()
    add: tuple[tuple[bytes, _Template], ...] = ()
    remove: tuple[bytes, ...] = ()

    @classmethod
    def parse(cls, value: object, where: str) -> _Rules:
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise HookConfigError(f"{where}: expected a mapping with set, add, remove")
        extra = set(value) - {"set", "add", "remove"}
        if extra:
            raise HookConfigError(
                f"{where}: unknown key {sorted(map(str, extra))[0]!r}"
            )
        parsed: dict[str, Any] = {}
        for action in ("set", "add"):
            entries = value.get(action) or {}
            if not isinstance(entries, dict):
                raise HookConfigError(
                    f"{where}.{action}: expected a mapping of header to value"
                )
            parsed[action] = tuple(
                (
                    _name(n, f"{where}.{action}"),
                    _Template.parse(v, f"{where}.{action}.{n}"),
                )
                for n, v in entries.items()
            )
        removals = value.get("remove") or []
        if not isinstance(removals, list):
            raise HookConfigError(f"{where}.remove: expected a list of header names")
        parsed["remove"] = tuple(_name(n, f"{where}.remove") for n in removals)
        return cls(**parsed)

    def apply(self, headers: Headers, fields: Mapping[str, str]) -> None:
        for name in self.remove:
            headers.removeHeader(name)
        for name, template in self.set:
            headers.setRawHeaders(name, [template.render(fields)])
        for name, template in self.add:
            headers.addRawHeader(name, template.render(fields))

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


def _name(value: object, where: str) -> bytes:
    if not isToken(value):
        raise HookConfigError(f"{where}: invalid header name {value!r}")
    return value.encode("ascii")


@implementer(IRequestHook, IResponseHook)
class HeadersHook:
    """
    Applies header rules to the upstream request and to the response.
    """

    def __init__(self, request: _Rules, response: _Rules) -> None:
        self._request = request
        self._response = response

    def onRequest(self, request: IHookRequest) -> None:
        if self._request:
            self._request.apply(request.upstreamHeaders, _fields(request))

    def onResponse(self, request: IHookRequest, response: IHookResponse) -> None:
        if self._response:
            self._response.apply(response.headers, _fields(request))


@implementer(IHookFactory, IPlugin)
class HeadersHookFactory:
    """
    Makes C{headers} hooks.
    """

    name = "headers"
    description = "Set, add and remove request and response headers, with templating."

    def build(self, options: Mapping[str, Any], context: Any) -> HeadersHook:
        extra = set(options) - {"request", "response"}
        if extra:
            raise HookConfigError(
                f"unknown option {sorted(extra)[0]!r} (known: request, response)"
            )
        return HeadersHook(
            _Rules.parse(options.get("request"), "request"),
            _Rules.parse(options.get("response"), "response"),
        )
