"""
The dependency rule from docs/architecture.md: each monedge module imports
only from layers below its own.
"""

from __future__ import annotations

import ast
import os

from twisted.trial.unittest import SynchronousTestCase

import monedge

LAYERS: dict[str, int] = {
    "convention": 0,
    "paths": 0,
    "policy": 0,
    "errors": 0,
    "headers": 1,
    "replay": 0,
    "sockets": 0,
    "dispatch": 0,
    "redact": 0,
    "trust": 0,
    "syntax": 0,
    "registry": 1,
    "endpoints": 1,
    "redisclient": 1,
    "upgrade": 1,
    "interfaces": 1,
    "registry.static": 2,
    "registry.kubeapi": 1,
    "registry.kubeclient": 2,
    "registry.kubernetes": 3,
    "balancer": 2,
    "metrics": 2,
    "client": 2,
    "accesslog": 2,
    "hooks": 2,
    "tunnel": 2,
    "tls": 2,
    "builtin": 3,
    "builtin.headers": 3,
    "builtin.auth.options": 3,
    "builtin.auth.authenticator": 3,
    "builtin.auth.jwt": 4,
    "builtin.auth.apikey": 4,
    "builtin.auth.external": 4,
    "builtin.auth.hook": 5,
    "builtin.auth": 6,
    "builtin.ratelimit.algorithm": 0,
    "builtin.ratelimit.metrics": 0,
    "builtin.ratelimit.memory": 1,
    "builtin.ratelimit.redisstore": 2,
    "builtin.ratelimit.hook": 3,
    "builtin.ratelimit.factory": 4,
    "builtin.ratelimit": 5,
    "proxy": 3,
    "resource": 4,
    "server": 4,
    "admin": 5,
    "lifecycle": 5,
    "workers": 5,
    "tap": 6,
}

#: Modules outside the layering, free to import anything.
OUTSIDE = {"testing", "demo", "plugins"}


def _runtimeImports(path: str) -> set[str]:
    """
    The monedge modules C{path} imports at run time: imports under
    C{if TYPE_CHECKING:} are for the type checker only.
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("monedge."):
                found.add(node.module.removeprefix("monedge."))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("monedge."):
                    found.add(alias.name.removeprefix("monedge."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _modules() -> dict[str, str]:
    root = os.path.dirname(os.path.abspath(monedge.__file__))
    modules = {}
    for directory, _, files in os.walk(root):
        for name in files:
            if (
                name.endswith(".py")
                and name != "__init__.py"
                or (name == "__init__.py" and directory != root)
            ):
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, root)[: -len(".py")]
                dotted = relative.replace(os.sep, ".").removesuffix(".__init__")
                modules[dotted] = path
    return modules


class LayeringTests(SynchronousTestCase):
    """
    Dependencies point one way.
    """

    def test_everyModuleHasALayer(self) -> None:
        """
        Every module is placed in a layer (or declared outside them), so a
        new module cannot dodge the rule.
        """
        placed = {m for m in _modules() if m.split(".")[0] not in OUTSIDE}
        self.assertEqual(placed, set(LAYERS))

    def test_importsPointDown(self) -> None:
        """
        No module imports a module of its own layer or a higher one.
        """
        violations = []
        for module, path in _modules().items():
            if module.split(".")[0] in OUTSIDE:
                continue
            for imported in _runtimeImports(path):
                if imported == "plugins":
                    # The plugin package is searched, not depended on.
                    continue
                if LAYERS[imported] >= LAYERS[module]:
                    violations.append(f"{module} imports {imported}")
        self.assertEqual(violations, [])
