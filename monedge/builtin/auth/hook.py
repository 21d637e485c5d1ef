"""
The C{auth} hook's factory: read the C{mode} and the options every mode
shares (C{identity-headers}), refuse options the mode does not have, and
build that mode's authenticator.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from monedge.builtin.auth.apikey import OPTIONS as API_KEY_OPTIONS
from monedge.builtin.auth.apikey import buildAPIKey
from monedge.builtin.auth.authenticator import Authenticator
from monedge.builtin.auth.external import OPTIONS as EXTERNAL_OPTIONS
from monedge.builtin.auth.external import buildExternal
from monedge.builtin.auth.jwt import OPTIONS as JWT_OPTIONS
from monedge.builtin.auth.jwt import buildJWT
from monedge.builtin.auth.options import headerNames
from monedge.hooks import HookConfigError
from monedge.interfaces import IHookFactory

#: The modes, by option value.
MODES = ("jwt", "api-key", "external")

#: The options every mode has.
COMMON = frozenset(["mode", "identity-headers"])

_Builder = Callable[
    [Mapping[str, Any], Any, tuple[bytes, ...], frozenset[bytes]], Authenticator
]

#: Each mode's own options and the function that builds its authenticator.
_MODES: dict[str, tuple[frozenset[str], _Builder]] = {
    "jwt": (JWT_OPTIONS, buildJWT),
    "api-key": (API_KEY_OPTIONS, buildAPIKey),
    "external": (EXTERNAL_OPTIONS, buildExternal),
}


@implementer(IHookFactory, IPlugin)
class AuthHookFactory:
    """
    Makes C{auth} hooks.
    """

    name = "auth"
    description = (
        "Authenticate requests (JWT, API key or an external auth service)"
        " and set identity headers."
    )

    def build(self, options: Mapping[str, Any], context: Any) -> Authenticator:
        """
        Make an C{auth} hook; see L{monedge.builtin.auth} for its options.

        @raise HookConfigError: naming the first bad option.
        """
        mode = options.get("mode")
        if mode not in MODES:
            raise HookConfigError(
                f"mode: expected one of {', '.join(MODES)}, got {mode!r}"
            )
        own, build = _MODES[mode]
        known = COMMON | own
        extra = sorted(set(map(str, options)) - known)
        if extra:
            raise HookConfigError(
                f"unknown option {extra[0]!r} for mode {mode}"
                f" (known: {', '.join(sorted(known))})"
            )
        identity = headerNames(options.get("identity-headers", []), "identity-headers")
        lowered = frozenset(n.lower() for n in identity)
        return build(options, context, identity, lowered)
