"""
The dependency rule from docs/architecture.md: each monedge module imports
only from layers below its own.  And the Twisted seam: only
L{monedge.twistedseam} uses Twisted's private names or replaces the methods
of Twisted's objects.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
import sys
import types

from twisted.trial.unittest import SynchronousTestCase

import monedge
from tests import seam_sample

#: The layers, lowest first (docs/architecture.md, "Layers"): a module
#: imports only from its own layer and those below, and nothing imports in
#: a cycle.
LAYER_NAMES = ["rules", "parts", "exchange", "edge", "runtime"]

#: Each package's layer, and the layer of each loose module of monedge/.
_PACKAGES: dict[str, str] = {
    "twistedseam": "rules",
    "rules": "rules",
    "record": "parts",
    "interfaces": "parts",
    "hooks": "parts",
    "registry": "parts",
    "upstream": "parts",
    "builtin": "parts",
    "observe": "parts",
    "proxy": "exchange",
    "edge": "edge",
    "runtime": "runtime",
    "tap": "runtime",
}

#: Packages whose __init__ holds only their docstring.
PACKAGES = {"rules", "upstream", "observe", "proxy", "edge", "runtime", "builtin"}


#: Modules outside the layering, free to import anything.
OUTSIDE = {"testing", "demo", "plugins"}


def _imports(path: str) -> set[str]:
    """
    The monedge modules C{path} imports, wherever the import is: at the
    top, in a function, or under C{if TYPE_CHECKING:} (an import for the
    type checker is a dependency too).
    """
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module.startswith("monedge."):
                found.add(node.module.removeprefix("monedge."))
            elif node.module == "monedge":
                # Submodules; the package's own names (its __version__)
                # are not a dependency on a layer.
                found.update(a.name for a in node.names if not a.name.startswith("_"))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("monedge."):
                    found.add(alias.name.removeprefix("monedge."))
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


def layerOf(module: str) -> int:
    """
    The layer of C{module} (dotted, below monedge), by its package.
    """
    return LAYER_NAMES.index(_PACKAGES[module.split(".")[0]])


LAYERS: dict[str, int] = {
    module: layerOf(module)
    for module in sorted(_modules())
    if module.split(".")[0] not in OUTSIDE
}


class LayeringTests(SynchronousTestCase):
    """
    Dependencies point one way.
    """

    def test_everyModuleHasALayer(self) -> None:
        """
        Every module is placed in a layer (or declared outside them), so a
        new module cannot dodge the rule.
        """
        unplaced = {
            m.split(".")[0]
            for m in _modules()
            if m.split(".")[0] not in OUTSIDE and m.split(".")[0] not in _PACKAGES
        }
        self.assertEqual(unplaced, set())

    def test_importsPointDown(self) -> None:
        """
        No module imports a module of a higher layer.
        """
        violations = []
        for module, path in _modules().items():
            if module.split(".")[0] in OUTSIDE:
                continue
            for imported in _imports(path):
                if imported == "plugins":
                    # The plugin package is searched, not depended on.
                    continue
                if LAYERS[imported] > LAYERS[module]:
                    violations.append(f"{module} imports {imported}")
        self.assertEqual(violations, [])

    def test_noCycles(self) -> None:
        """
        No chain of imports leads from a module back to itself, counting
        every monedge module (those outside the layering too) and every
        import, TYPE_CHECKING ones included.
        """
        modules = _modules()
        graph = {
            module: {i for i in _imports(path) if i in modules and i != module}
            for module, path in modules.items()
        }
        cycles = []
        state: dict[str, int] = {}

        def visit(module: str, trail: list[str]) -> None:
            state[module] = 1
            for imported in sorted(graph[module]):
                if state.get(imported) == 1:
                    start = trail.index(imported)
                    cycles.append(" -> ".join([*trail[start:], imported]))
                elif imported not in state:
                    visit(imported, [*trail, imported])
            state[module] = 2

        for module in sorted(graph):
            if module not in state:
                visit(module, [module])
        self.assertEqual(cycles, [])


# The Twisted seam (docs/architecture.md, "The Twisted seam").

#: The one module that may use Twisted's private names and replace the
#: methods of Twisted's objects.
SEAM = "twistedseam"

#: Methods of Twisted's objects replaced outside the seam, to be routed
#: through it by their owners: (module, the attribute replaced).  Exact: a
#: new one fails, and so does one that is gone but still listed.
PENDING_PATCHES: set[tuple[str, str]] = set()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _isTwisted(name: str) -> bool:
    return name == "twisted" or name.startswith("twisted.")


_trees: dict[str, ast.Module] = {}


def _tree(path: str) -> ast.Module:
    if path not in _trees:
        with open(path, encoding="utf-8") as f:
            _trees[path] = ast.parse(f.read())
    return _trees[path]


def _sourceOf(module: types.ModuleType) -> ast.Module | None:
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return None
    return _tree(path)


def _selfStores(node: ast.AST) -> set[str]:
    """
    The attributes a class's methods set on C{self} or C{cls}.
    """
    return {
        n.attr
        for n in ast.walk(node)
        if isinstance(n, ast.Attribute)
        and isinstance(n.ctx, ast.Store)
        and isinstance(n.value, ast.Name)
        and n.value.id in ("self", "cls")
    }


class _TwistedNames:
    """
    What Twisted defines, read from its source: every private name (of a
    module, class, method, attribute or import), every method name, and
    for each Twisted class the names it and its bases define.
    """

    def __init__(self, trees: list[ast.Module]) -> None:
        self.private: set[str] = set()
        self.methods: set[str] = set()
        for tree in trees:
            for n in ast.walk(tree):
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    self.private.add(n.name)
                elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                    self.private.add(n.id)
                elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
                    self.private.add(n.attr)
                elif isinstance(n, ast.alias):
                    self.private.add((n.asname or n.name).split(".")[-1])
                if isinstance(n, ast.ClassDef):
                    self.methods.update(
                        m.name
                        for m in n.body
                        if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef)
                    )
        self.private = {name for name in self.private if _private(name)}

    @staticmethod
    def _classDef(cls: type) -> ast.ClassDef | None:
        tree = _sourceOf(sys.modules[cls.__module__])
        if tree is None:
            return None
        node: ast.AST = tree
        for part in cls.__qualname__.split("."):
            found = [
                n
                for n in ast.walk(node)
                if isinstance(n, ast.ClassDef) and n.name == part
            ]
            if not found:
                return None
            node = found[0]
        assert isinstance(node, ast.ClassDef)
        return node

    def inherited(self, cls: object) -> tuple[set[str], set[str]]:
        """
        The private names and the method names C{cls} inherits from
        Twisted's classes (none for a class with no Twisted base).
        """
        private: set[str] = set()
        methods: set[str] = set()
        if not isinstance(cls, type):
            return private, methods
        for base in cls.__mro__[1:]:
            if not _isTwisted(base.__module__):
                continue
            for name, value in vars(base).items():
                if _private(name):
                    private.add(name)
                if callable(value) and not name.startswith("__"):
                    methods.add(name)
            node = self._classDef(base)
            if node is not None:
                private.update(n for n in _selfStores(node) if _private(n))
        return private, methods


def _twistedSources() -> list[ast.Module]:
    """
    Twisted's source, but its tests: every module monedge may hold an
    object of, imported or not.
    """
    spec = importlib.util.find_spec("twisted")
    assert spec is not None and spec.origin is not None
    root = os.path.dirname(spec.origin)
    trees: list[ast.Module] = []
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if d != "test")
        trees.extend(
            _tree(os.path.join(directory, name))
            for name in sorted(files)
            if name.endswith(".py")
        )
    return trees


def _functionValue(value: ast.expr, functions: set[str]) -> bool:
    """
    Whether an assigned value is a function: a lambda or a function
    defined in the module.
    """
    if isinstance(value, ast.Lambda):
        return True
    return isinstance(value, ast.Name) and value.id in functions


def seamViolations(
    module: types.ModuleType, tree: ast.Module, known: _TwistedNames
) -> tuple[list[str], list[str]]:
    """
    Where C{module} (parsed as C{tree}) reaches into Twisted: its uses of
    Twisted's private names, and the methods of Twisted's objects it
    replaces with functions, each as C{"LINE: what"}.

    A private name is Twisted's when it is imported from Twisted, or when
    Twisted defines it and C{module} does not define it itself: a name the
    module sets on C{self} in a class of its own, defines in a class body
    or at the top level.  On C{self} (or C{super()}) in a class with a
    Twisted base, the names that base defines are Twisted's; the module
    may not define them either (an override of a private method, a new
    value for a private attribute).
    """
    private: list[str] = []
    patches: list[str] = []
    own: set[str] = set()
    inheritedOf: dict[ast.ClassDef, tuple[set[str], set[str]]] = {}
    functions = {
        n.name
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    }

    def classes(body: list[ast.stmt], scope: object) -> None:
        for node in body:
            if not isinstance(node, ast.ClassDef):
                continue
            cls = getattr(scope, node.name, None)
            inheritedOf[node] = names, _ = known.inherited(cls)
            defined = _selfStores(node)
            for item in node.body:
                if isinstance(
                    item, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef
                ):
                    defined.add(item.name)
                elif isinstance(item, ast.Assign):
                    defined.update(
                        t.id for t in item.targets if isinstance(t, ast.Name)
                    )
                elif isinstance(item, ast.AnnAssign) and isinstance(
                    item.target, ast.Name
                ):
                    defined.add(item.target.id)
            for name in sorted(defined):
                if name in names:
                    private.append(f"{node.lineno}: {node.name} redefines {name}")
                elif _private(name):
                    own.add(name)
            classes(node.body, cls)

    classes(tree.body, module)
    own.update(
        n.name
        for n in tree.body
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
    )
    own.update(
        t.id
        for n in tree.body
        if isinstance(n, ast.Assign)
        for t in n.targets
        if isinstance(t, ast.Name)
    )

    def visit(node: ast.AST, cls: ast.ClassDef | None) -> None:
        if isinstance(node, ast.ClassDef):
            cls = node
        if isinstance(node, ast.ImportFrom) and node.module and _isTwisted(node.module):
            if any(_private(part) for part in node.module.split(".")):
                private.append(f"{node.lineno}: imports {node.module}")
            for alias in node.names:
                if _private(alias.name):
                    private.append(f"{node.lineno}: imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _isTwisted(alias.name) and any(
                    _private(part) for part in alias.name.split(".")
                ):
                    private.append(f"{node.lineno}: imports {alias.name}")
        used: tuple[ast.expr, str, int] | None = None
        if isinstance(node, ast.Attribute) and _private(node.attr):
            used = node.value, node.attr, node.lineno
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
        ):
            used = node.args[0], node.args[1].value, node.lineno
        if used is not None:
            target, name, line = used
            onSelf = (
                isinstance(target, ast.Name) and target.id in ("self", "cls")
            ) or (
                isinstance(target, ast.Call)
                and isinstance(target.func, ast.Name)
                and target.func.id == "super"
            )
            if onSelf:
                if cls is not None and name in inheritedOf.get(cls, ((), ()))[0]:
                    private.append(f"{line}: {ast.unparse(target)}.{name}")
            elif name in known.private and name not in own:
                private.append(f"{line}: {ast.unparse(target)}.{name}")
        if isinstance(node, ast.Assign) and _functionValue(node.value, functions):
            for target in node.targets:
                if not isinstance(target, ast.Attribute):
                    continue
                onSelf = isinstance(target.value, ast.Name) and target.value.id in (
                    "self",
                    "cls",
                )
                if onSelf:
                    replaced = (
                        cls is not None
                        and target.attr in inheritedOf.get(cls, ((), ()))[1]
                    )
                else:
                    replaced = target.attr in known.methods
                if replaced:
                    patches.append(f"{node.lineno}: {ast.unparse(target)}")
        for child in ast.iter_child_nodes(node):
            visit(child, cls)

    visit(tree, None)
    return private, patches


@functools.cache
def _twistedNames() -> _TwistedNames:
    return _TwistedNames(_twistedSources())


@functools.cache
def _seamReport() -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """
    Every monedge module's uses of Twisted's private names and the methods
    of Twisted's objects it replaces (L{seamViolations}), by module.
    """
    paths = _modules()
    imported = {
        module: importlib.import_module(f"monedge.{module}") for module in paths
    }
    trees = {module: _tree(path) for module, path in paths.items()}
    private: dict[str, list[str]] = {}
    patches: dict[str, list[str]] = {}
    for module, tree in trees.items():
        private[module], patches[module] = seamViolations(
            imported[module], tree, _twistedNames()
        )
    return private, patches


def _whats(uses: list[str]) -> list[str]:
    """
    What each use is, without its line.
    """
    return sorted(use.partition(": ")[2] for use in uses)


class TwistedSeamTests(SynchronousTestCase):
    """
    Only L{monedge.twistedseam} reaches into Twisted.
    """

    maxDiff = None

    def test_privateNamesOnlyInTheSeam(self) -> None:
        """
        No module but the seam imports a private name from Twisted, reads
        or sets a private attribute of a Twisted object (directly or with
        C{getattr}), or redefines a private name of a Twisted class it
        subclasses.
        """
        private, _ = _seamReport()
        found = {
            module: uses for module, uses in private.items() if uses and module != SEAM
        }
        self.assertEqual(found, {})
        self.assertNotEqual(private[SEAM], [])

    def test_patchesOnlyInTheSeam(self) -> None:
        """
        No module but the seam replaces a method of a Twisted object with a
        function, except the ones L{PENDING_PATCHES} lists.
        """
        _, patches = _seamReport()
        found = {
            (module, use.partition(": ")[2])
            for module, uses in patches.items()
            if module != SEAM
            for use in uses
        }
        self.assertEqual(found, PENDING_PATCHES)
        self.assertNotEqual(patches[SEAM], [])

    def test_catches(self) -> None:
        """
        On L{tests.seam_sample}, the check finds each way of reaching into
        Twisted: a private import, private attributes of Twisted's objects
        read or looked up by name, a private method overridden and called
        on C{super()}, a private attribute of a Twisted base set on C{self},
        and methods replaced.  It spares the module's own private names (on
        a subclass of a Twisted class too), and values that are not
        functions set on Twisted's objects.
        """
        path = seam_sample.__file__
        assert path is not None
        private, patches = seamViolations(seam_sample, _tree(path), _twistedNames())
        self.assertEqual(
            _whats(private),
            [
                "Channel redefines _dataBuffer",
                "Channel redefines _send100Continue",
                "channel._command",
                "headers._rawHeaders",
                "imports twisted.web.http._ChunkedTransferDecoder",
                "request._inFakeHead",
                "self._dataBuffer",
                "super()._send100Continue",
            ],
        )
        self.assertEqual(_whats(patches), ["self.dataReceived", "site.log"])
