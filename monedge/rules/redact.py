"""
What monedge shows of its configuration never carries a secret.

Everything that leaves the process describing configuration or state (the
admin C{/routes} document, log lines, startup errors, hook configuration
errors) goes through these pure functions on its way out:

  - a URL's user-info (C{user:password@}, a bare token) and its query and
    fragment become C{***}: C{redis://:p@ss@host:6379/0} is shown as
    C{redis://***@host:6379/0}, C{https://idp/jwks?key=1} as
    C{https://idp/jwks?***};
  - an option whose name says it holds a secret (password, secret, token,
    credential, private key, API key, authorization, cookie, signature,
    session) is shown as C{***} whatever its value;
  - the C{headers} hook's rules are shown as header names under their
    actions, never with their values (a rule may set C{Authorization}).

Redaction errs on the side of hiding: a URL whose path or query holds an
C{@} loses everything up to it, and a string that starts with a URL is
redacted as one URL to its end (so a password with a space in it is still
hidden).  Every function here is idempotent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

#: What a secret is shown as.
REDACTED = "***"

#: Option names whose values are secrets.
_SECRET_NAME = re.compile(
    r"pass|secret|token|credential|private|api[-_]?key|[-_]key\Z|authori[sz]ation"
    r"|cookie|signature|session|bearer",
    re.IGNORECASE,
)

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_WHOLE_URL = re.compile(rf"(\s*{_SCHEME})(.*)\Z", re.DOTALL)
_URL_IN_TEXT = re.compile(
    # Quoted (a repr): to the closing quote, spaces included; else to the
    # first whitespace.
    rf"(?P<quote>['\"])(?P<qscheme>{_SCHEME})(?P<quoted>[^\n]*?)(?P=quote)"
    rf"(?=[\s,;:.)\]}}]|\Z)"
    rf"|(?P<scheme>{_SCHEME})(?P<rest>\S*)"
)


def isSecretName(name: object) -> bool:
    """
    Whether an option called C{name} holds a secret by its name alone.
    """
    return _SECRET_NAME.search(str(name)) is not None


def _afterScheme(rest: str) -> str:
    """
    Redact what follows C{scheme://}: the user-info (up to the last C{@},
    wherever it is, since a password may hold C{/}, C{?}, C{#} or C{@}),
    then the query or fragment.
    """
    at = rest.rfind("@")
    if at >= 0:
        rest = REDACTED + rest[at:]
    for index, character in enumerate(rest):
        if character in "?#":
            return rest[: index + 1] + REDACTED
    return rest


def redactURL(url: str) -> str:
    """
    C{url} with its user-info, query and fragment replaced by C{***}; the
    whole string after C{scheme://} is taken as the URL.  A string that
    does not start with C{scheme://} is returned as it is.
    """
    match = _WHOLE_URL.match(url)
    if match is None:
        return url
    return match.group(1) + _afterScheme(match.group(2))


def redactText(text: str) -> str:
    """
    Free text (a log line, an error message) with every URL in it redacted
    as L{redactURL} does.  A URL in quotes (as a repr shows it) ends at
    its closing quote, spaces included; any other at the first
    whitespace.
    """
    if "://" not in text:
        return text

    def redact(match: re.Match[str]) -> str:
        quote = match.group("quote")
        if quote is not None:
            scheme, rest = match.group("qscheme", "quoted")
            return quote + scheme + _afterScheme(rest) + quote
        return match.group("scheme") + _afterScheme(match.group("rest"))

    return _URL_IN_TEXT.sub(redact, text)


def redactString(value: str) -> str:
    """
    A configured string: redacted as one URL if it starts with one, else
    as free text.
    """
    if _WHOLE_URL.match(value) is not None:
        return redactURL(value)
    return redactText(value)


def redactValue(value: Any) -> Any:
    """
    JSON-like data (mappings, lists, scalars) as it may be shown: values
    under secret names are C{***}, URLs in strings are redacted, and
    everything else is kept.  Keys are kept as they are.
    """
    if isinstance(value, Mapping):
        return {
            key: REDACTED if isSecretName(key) else redactValue(item)
            for key, item in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redactValue(item) for item in value]
    if isinstance(value, str):
        return redactString(value)
    return value


def _headerNames(value: object) -> object:
    if isinstance(value, Mapping):
        return [str(name) for name in value]
    if isinstance(value, list):
        return [name if isinstance(name, str) else REDACTED for name in value]
    return REDACTED


def _headerRules(options: object) -> object:
    """
    The C{headers} hook's options as names only: for C{request} and
    C{response}, each action (C{set}, C{add}, C{remove}) with the header
    names it applies to.  Anything else (options the hook would refuse) is
    C{***}.
    """
    if not isinstance(options, Mapping):
        return REDACTED
    shown: dict[str, object] = {}
    for direction, rules in options.items():
        if direction not in ("request", "response") or not isinstance(rules, Mapping):
            shown[str(direction)] = REDACTED
            continue
        shown[direction] = {
            str(action): (
                _headerNames(names) if action in ("set", "add", "remove") else REDACTED
            )
            for action, names in rules.items()
        }
    return shown


#: Hooks whose options are shown by a rule of their own.
_HOOK_RULES = {"headers": _headerRules}


def redactHookOptions(name: str, options: object) -> object:
    """
    A hook's options as they may be shown: by the hook's own rule (the
    C{headers} hook: header names only), else by L{redactValue}.
    """
    rule = _HOOK_RULES.get(name)
    if rule is not None:
        return rule(options)
    return redactValue(options)


def redactHook(hook: Mapping[str, Any]) -> dict[str, Any]:
    """
    A configured hook, C{{"name": ..., "options": {...}}} (as
    L{monedge.rules.policy.HookSpec.asJSON} gives it), as it may be shown.
    """
    name = str(hook.get("name"))
    return {"name": name, "options": redactHookOptions(name, hook.get("options"))}
