"""
Two example hooks, add-header and block-paths, as a third-party plugin.

This module is a dropin: it sits in a monedge/plugins/ directory that has
no __init__.py, and that directory's parent (examples/hooks) is put on
PYTHONPATH.  docs/hooks.md walks through it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from monedge.hooks import HookConfigError, HookResponse
from monedge.interfaces import IHookFactory, IHookRequest, IRequestHook


@implementer(IRequestHook)
class AddHeader:
    """Sets one header on every request sent upstream."""

    def __init__(self, name: bytes, value: bytes) -> None:
        self.name, self.value = name, value

    def onRequest(self, request: IHookRequest) -> None:
        request.upstreamHeaders.setRawHeaders(self.name, [self.value])


@implementer(IHookFactory, IPlugin)
class AddHeaderFactory:
    name = "add-header"
    description = "Set one request header; options: name, value."

    def build(self, options: Mapping[str, Any], context: Any) -> AddHeader:
        if set(options) != {"name", "value"}:
            raise HookConfigError("expected the options name and value")
        name, value = options["name"], options["value"]
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9-]+", name):
            raise HookConfigError(f"name: not a header name: {name!r}")
        if not isinstance(value, str) or not re.fullmatch(r"[ -~]*", value):
            raise HookConfigError(f"value: expected printable ASCII: {value!r}")
        return AddHeader(name.encode("ascii"), value.encode("ascii"))


addHeader = AddHeaderFactory()


@implementer(IRequestHook)
class BlockPaths:
    """Answers 403 forbidden for any path at or under one of the prefixes."""

    def __init__(self, prefixes: list[bytes]) -> None:
        self.prefixes = prefixes

    def onRequest(self, request: IHookRequest) -> HookResponse | None:
        for prefix in self.prefixes:
            if request.path == prefix or request.path.startswith(prefix + b"/"):
                return HookResponse.error(403, "forbidden", "this path is private")
        return None


@implementer(IHookFactory, IPlugin)
class BlockPathsFactory:
    name = "block-paths"
    description = "Refuse paths under some prefixes with 403; option: prefixes."

    def build(self, options: Mapping[str, Any], context: Any) -> BlockPaths:
        prefixes = options.get("prefixes")
        if set(options) != {"prefixes"} or not isinstance(prefixes, list):
            raise HookConfigError("expected the option prefixes, a list of paths")
        for prefix in prefixes:
            if not isinstance(prefix, str) or not re.fullmatch(r"/[!-~]*", prefix):
                raise HookConfigError(f"prefixes: not a /path: {prefix!r}")
        return BlockPaths([p.rstrip("/").encode("ascii") for p in prefixes])


blockPaths = BlockPathsFactory()
