"""
The hook tutorial stays true: docs/hooks.md quotes the files of
examples/hooks exactly, its configuration examples parse and build, the
example's own unit tests pass, the example plugin is found on the plugin
path, and a real twistd monedge runs the example hooks as the tutorial says.

Code blocks that quote a file are marked C{<!-- file: PATH -->}; other
checked blocks and tables are marked as in tests/test_docs.py.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import yaml
from twisted.internet import threads
from twisted.internet.task import Clock
from twisted.plugin import pluginPackagePaths
from twisted.python.usage import UsageError
from twisted.trial.reporter import TestResult
from twisted.trial.runner import TestLoader
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers

import monedge.plugins
from monedge.builtin.headers import PLACEHOLDERS
from monedge.hooks import (
    HookConfigError,
    HookContext,
    HookResponseHead,
    HookSet,
    availableFactories,
)
from monedge.interfaces import IHookRequest
from monedge.registry.kubernetes import policyFromAnnotations
from monedge.registry.static import StaticRegistry, loadRegistryFile
from monedge.rules.convention import HostTiers
from monedge.rules.policy import HookSpec, parseHooks
from monedge.rules.redact import isSecretName
from monedge.runtime.admin import Routes
from monedge.runtime.compose import checkHooks
from monedge.tap import Options
from monedge.testing import MemoryRegistry, ProxyProcess
from monedge.testing.hooks import buildHook, hookRequest, runHooks
from monedge.upstream.balancer import Balancer
from tests.e2e import ProxyTestCase, deferRaw
from tests.test_docs import ROOT, block, readDoc, section, span, spans, table

#: The directory the tutorial puts on PYTHONPATH.
EXAMPLES = os.path.join(ROOT, "examples", "hooks")

#: The example plugin module, its unit tests and its registry.
PLUGIN = "examples/hooks/monedge/plugins/example_hooks.py"
UNIT_TESTS = "examples/hooks/test_example_hooks.py"
SERVICES = "examples/hooks/services.yaml"

#: The hooks examples/hooks/services.yaml gives service.api.shop.
SHOP_HOOKS = (
    HookSpec("add-header", '{"name": "X-Example", "value": "hello"}'),
    HookSpec("block-paths", '{"prefixes": ["/shop/internal"]}'),
)


def hooksDoc() -> str:
    """
    The text of docs/hooks.md.
    """
    return readDoc("hooks.md")


def quotedFiles(text: str) -> list[tuple[str, str]]:
    """
    Every code block marked C{<!-- file: PATH -->}, as (PATH, contents), in
    document order.
    """
    return re.findall(r"<!-- file: (\S+) -->\s*```[a-z]*\n(.*?)\n```", text, re.S)


def readFile(path: str) -> str:
    """
    The text of C{path}, relative to the repository root.
    """
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


@contextmanager
def examplesOnPath() -> Iterator[None]:
    """
    Run with examples/hooks on C{sys.path} and its C{monedge/plugins} in
    C{monedge.plugins.__path__}, as if it had been on PYTHONPATH when
    monedge started; afterwards restore both and forget every module
    imported from examples/hooks.
    """
    savedPath = list(sys.path)
    pluginPath: list[str] = monedge.plugins.__path__
    savedPluginPath = list(pluginPath)
    sys.path.insert(0, EXAMPLES)
    added = pluginPackagePaths(monedge.plugins.__name__)
    pluginPath.extend(p for p in added if p not in savedPluginPath)
    try:
        yield
    finally:
        sys.path[:] = savedPath
        pluginPath[:] = savedPluginPath
        for name, module in list(sys.modules.items()):
            origin = getattr(module, "__file__", None) or ""
            if origin.startswith(EXAMPLES + os.sep):
                del sys.modules[name]
                parent, _, child = name.rpartition(".")
                if getattr(sys.modules.get(parent), child, None) is module:
                    delattr(sys.modules[parent], child)


def commandWords(text: str) -> list[list[str]]:
    """
    The words of each command in a shell block (continuation lines joined).
    """
    return [shlex.split(line) for line in text.replace("\\\n", " ").splitlines()]


def monedgeOptions(words: list[str]) -> list[str]:
    """
    The C{twistd monedge} options in a command: the words after
    C{monedge}, with a C{static:} registry path taken relative to the
    repository, where the tutorial's commands run.
    """
    args = words[words.index("monedge") + 1 :]
    return [
        "static:" + os.path.join(ROOT, a[len("static:") :])
        if a.startswith("static:")
        else a
        for a in args
    ]


def parseOptions(args: list[str]) -> Options:
    """
    C{twistd monedge} options, parsed and checked as twistd would, with
    examples/hooks on the plugin path as the tutorial's commands put it.
    """
    options = Options()
    with examplesOnPath():
        options.parseOptions(args)
    return options


class TutorialFilesTests(SynchronousTestCase):
    """
    The example files: quoted exactly, laid out as a dropin, tested, and
    found on the plugin path.
    """

    def test_docQuotesTheExampleFiles(self) -> None:
        """
        The blocks docs/hooks.md marks as quoting a file are, in document
        order, consecutive parts of that file that together make up all of
        it (only blank lines between them); the plugin, its tests and the
        registry are all quoted.
        """
        quoted = quotedFiles(hooksDoc())
        self.assertEqual({path for path, _ in quoted}, {PLUGIN, UNIT_TESTS, SERVICES})
        for path in {path for path, _ in quoted}:
            text = readFile(path)
            position = 0
            for part in [contents for p, contents in quoted if p == path]:
                index = text.find(part, position)
                self.assertNotEqual(index, -1, f"{path}: not quoted exactly:\n{part}")
                self.assertEqual(text[position:index].strip(), "", path)
                position = index + len(part)
            self.assertEqual(text[position:].strip(), "", f"{path}: not all quoted")

    def test_dropinLayout(self) -> None:
        """
        The plugin sits in examples/hooks/monedge/plugins/, and neither that
        directory nor examples/hooks/monedge/ has an __init__.py (which
        would hide monedge itself).
        """
        self.assertTrue(os.path.isfile(os.path.join(ROOT, PLUGIN)))
        for directory in ["monedge", os.path.join("monedge", "plugins")]:
            path = os.path.join(EXAMPLES, directory, "__init__.py")
            self.assertFalse(os.path.exists(path), path)

    def test_exampleUnitTestsPass(self) -> None:
        """
        examples/hooks/test_example_hooks.py, loaded by trial's loader with
        examples/hooks on the path (as the tutorial's command runs it), runs
        its tests with no failures and no errors; the tutorial's command
        names that module and puts that directory on PYTHONPATH.
        """
        [words] = commandWords(block(hooksDoc(), "run-tests"))
        self.assertEqual(words[0], "PYTHONPATH=$PWD/examples/hooks")
        self.assertEqual(words[-1], os.path.basename(UNIT_TESTS)[: -len(".py")])
        result = TestResult()
        with examplesOnPath():
            spec = importlib.util.spec_from_file_location(
                "test_example_hooks", os.path.join(ROOT, UNIT_TESTS)
            )
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            suite = TestLoader().loadAnything(module)
            suite.run(result)
        self.assertGreater(result.testsRun, 0)
        self.assertEqual(result.testsRun, suite.countTestCases())
        self.assertEqual((result.errors, result.failures), ([], []))
        self.assertTrue(result.wasSuccessful())

    def test_pluginFoundOnPythonPath(self) -> None:
        """
        The tutorial's list-hooks command, run in a fresh Python with
        examples/hooks on PYTHONPATH, prints a list with add-header,
        block-paths and the built-in headers; without it, only the built-in
        hooks.
        """
        [words] = commandWords(block(hooksDoc(), "list-hooks"))
        self.assertEqual(
            words[:3], ["PYTHONPATH=$PWD/examples/hooks", ".venv/bin/python", "-c"]
        )
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)

        def found(pythonPath: str) -> list[str]:
            result = subprocess.run(
                [sys.executable, "-c", words[3]],
                env={**os.environ, "PYTHONPATH": pythonPath},
                cwd=directory,
                capture_output=True,
                timeout=60,
                check=False,
            )
            self.assertEqual(result.returncode, 0, result.stderr)
            names: list[str] = ast.literal_eval(result.stdout.decode("utf-8"))
            return names

        names = found(EXAMPLES + os.pathsep + ROOT)
        self.assertEqual(names, sorted(names))
        for name in ["add-header", "block-paths", "headers"]:
            self.assertIn(name, names)
        builtin = found(ROOT)
        self.assertIn("headers", builtin)
        self.assertEqual(set(names) - set(builtin), {"add-header", "block-paths"})


class TutorialConfigurationTests(SynchronousTestCase):
    """
    The tutorial's configuration examples and reference tables agree with
    the code.
    """

    def test_hookRequestTable(self) -> None:
        """
        The table of what a hook sees lists exactly IHookRequest's
        attributes.
        """
        rows = table(hooksDoc(), "hook-request")
        self.assertEqual(
            {span(row["Attribute"]) for row in rows}, set(IHookRequest.names())
        )

    def test_registryExample(self) -> None:
        """
        examples/hooks/services.yaml gives service.api.shop both example
        hooks, in order; they build with the example plugin on the path;
        and /routes shows them in the service's policy exactly as the
        routes-hooks example does.
        """
        path = os.path.join(ROOT, SERVICES)
        entry = loadRegistryFile(path)["service.api.shop"]
        self.assertEqual(entry.policy.hooks, SHOP_HOOKS)
        with examplesOnPath():
            chain = HookSet(HookContext(reactor=Clock())).chain(entry.policy.hooks)
        assert chain is not None
        self.assertEqual(chain.names, ["add-header", "block-paths"])
        document = Routes(StaticRegistry(path), HostTiers({}), Balancer(Clock()))
        [service] = document.document()["services"]
        expected = json.loads("{" + block(hooksDoc(), "routes-hooks") + "}")
        self.assertEqual(service["policy"]["hooks"], expected["hooks"])

    def test_runMonedgeCommand(self) -> None:
        """
        The tutorial's commands start the demo echo on 127.0.0.1:9001 (the
        example registry's endpoint) and twistd monedge with examples/hooks
        on PYTHONPATH and examples/hooks/services.yaml as its registry.
        """
        echo, twistd = commandWords(block(hooksDoc(), "run-monedge"))
        self.assertEqual(echo[:3], [".venv/bin/python", "-m", "monedge.demo"])
        self.assertIn("tcp:9001:interface=127.0.0.1", echo)
        self.assertEqual(
            loadRegistryFile(os.path.join(ROOT, SERVICES))["service.api.shop"]
            .endpoints[0]
            .authority,
            "127.0.0.1:9001",
        )
        self.assertEqual(
            twistd[:5],
            [
                "PYTHONPATH=$PWD/examples/hooks",
                ".venv/bin/twistd",
                "-n",
                "--pidfile=",
                "monedge",
            ],
        )
        options = parseOptions(monedgeOptions(twistd))
        self.assertEqual(options["registry"], "static:" + os.path.join(ROOT, SERVICES))
        self.assertEqual(options["hook-specs"], ())

    def test_unknownHookWithoutThePlugin(self) -> None:
        """
        Without the example plugin on the path, the example registry stops
        startup with the documented message, naming the service and listing
        the built-in hooks.
        """
        hooks = HookSet(HookContext(reactor=Clock()))
        registry = StaticRegistry(os.path.join(ROOT, SERVICES))
        error = self.assertRaises(UsageError, checkHooks, hooks, registry)
        known = ", ".join(sorted(availableFactories()))
        self.assertNotIn("add-header", known)
        self.assertEqual(
            str(error),
            block(hooksDoc(), "unknown-hook").replace(
                "(known: ...)", f"(known: {known})"
            ),
        )

    def test_hookValues(self) -> None:
        """
        The two --hook values, YAML flow style and JSON, are the same hook,
        and the example plugin builds it.
        """
        lines = block(hooksDoc(), "hook-values").splitlines()
        self.assertEqual(len(lines), 2)
        specs = []
        for line in lines:
            options = Options()
            options.opt_hook(line)
            specs.append(tuple(options["hook"]))
        expected = (HookSpec("add-header", '{"name": "X-Edge", "value": "monedge"}'),)
        self.assertEqual(specs, [expected, expected])
        with examplesOnPath():
            HookSet(HookContext(reactor=Clock())).build(expected[0])

    def test_globalHooks(self) -> None:
        """
        With the hooks file and the --hook of the tutorial's command, the
        global hooks are the file's, then the --hook one; a file holding
        the bare list means the same; with the example registry, a request
        runs the global hooks and then the service's.
        """
        text = hooksDoc()
        [words] = commandWords(block(text, "global-hooks"))
        self.assertEqual(words[0], "PYTHONPATH=$PWD/examples/hooks")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        document = yaml.safe_load(block(text, "hooks-file"))
        expected = (
            HookSpec(
                "block-paths", '{"prefixes": ["/shop/internal", "/orders/internal"]}'
            ),
            HookSpec("add-header", '{"name": "X-Edge", "value": "monedge"}'),
        )
        for name, contents in [
            ("hooks.yaml", block(text, "hooks-file")),
            ("list.yaml", yaml.safe_dump(document["hooks"])),
        ]:
            path = os.path.join(directory, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(contents)
            args = [path if a == "hooks.yaml" else a for a in monedgeOptions(words)]
            self.assertIn(path, args)
            self.assertEqual(parseOptions(args)["hook-specs"], expected)
        with examplesOnPath():
            hooks = HookSet(HookContext(reactor=Clock()), globalSpecs=expected)
            chain = hooks.chain(SHOP_HOOKS)
        assert chain is not None
        self.assertEqual(
            chain.names, ["block-paths", "add-header", "add-header", "block-paths"]
        )

    def test_annotationExample(self) -> None:
        """
        The tutorial's monedge.io/hooks annotation gives the service the
        same hooks as the example registry, with no annotation problem.
        """
        service = yaml.safe_load(block(hooksDoc(), "hooks-annotation"))
        policy, problems = policyFromAnnotations(service["metadata"]["annotations"])
        self.assertEqual(problems, [])
        self.assertEqual(policy.hooks, SHOP_HOOKS)

    def test_headersReference(self) -> None:
        """
        The headers hook's reference: its options, rule keys and
        placeholders are exactly the ones the code accepts, and the example
        does what the tables say (remove, set and add, with placeholders,
        on the request and on the response).
        """
        text = section(hooksDoc(), "## headers")
        self.assertEqual(
            {span(row["Option"]) for row in table(text, "headers-options")},
            {"request", "response"},
        )
        error = self.assertRaises(HookConfigError, buildHook, "headers", {"x": 1})
        self.assertIn("(known: request, response)", str(error))
        keys = {span(row["Key"]) for row in table(text, "headers-rules")}
        self.assertEqual(keys, {"remove", "set", "add"})
        for key in keys:
            buildHook("headers", {"request": {key: None}})
        self.assertRaises(
            HookConfigError, buildHook, "headers", {"request": {"rename": {}}}
        )
        self.assertEqual(
            {
                span(row["Placeholder"]).strip("{}")
                for row in table(text, "headers-placeholders")
            },
            set(PLACEHOLDERS),
        )
        [spec] = parseHooks(yaml.safe_load(block(text, "headers-options"))["hooks"])
        hook = buildHook(spec.name, json.loads(spec.options))
        request = hookRequest(headers={b"x-debug": [b"1"]}, clientAddress="192.0.2.7")
        head = HookResponseHead(200, Headers({b"x-served-by": [b"upstream"]}))
        outcome = self.successResultOf(runHooks([hook], request, head))
        self.assertIsNone(outcome.upstreamHeaders.getRawHeaders(b"x-debug"))
        self.assertEqual(
            outcome.upstreamHeaders.getRawHeaders(b"x-client"), [b"192.0.2.7"]
        )
        assert outcome.responseHeaders is not None
        self.assertEqual(
            outcome.responseHeaders.getRawHeaders(b"strict-transport-security"),
            [b"max-age=63072000"],
        )
        self.assertEqual(
            outcome.responseHeaders.getRawHeaders(b"x-served-by"),
            [b"upstream", f"monedge {request.requestId}".encode()],
        )

    def test_builtinSections(self) -> None:
        """
        The reference has a section for each hook monedge ships (headers,
        auth, ratelimit, cors), each naming the module (or package) it
        documents.
        """
        text = hooksDoc()
        for name in ["headers", "auth", "ratelimit", "cors"]:
            module = f"monedge/builtin/{name}.py"
            if not os.path.exists(os.path.join(ROOT, module)):
                module = f"monedge/builtin/{name}/"
            self.assertIn(module, section(text, f"## {name}"))

    def test_builtinOptionTables(self) -> None:
        """
        Every option in the auth, ratelimit and cors reference tables is
        one the hook reads, and the YAML examples under them build.
        """
        from monedge.hooks import HookContext, availableFactories

        text = hooksDoc()
        for name in ["auth", "ratelimit", "cors"]:
            # The hook's module, or every module of its package.
            package = os.path.join(ROOT, "monedge", "builtin", name)
            paths = [package + ".py"]
            if not os.path.exists(paths[0]):
                paths = [
                    os.path.join(package, f)
                    for f in sorted(os.listdir(package))
                    if f.endswith(".py")
                ]
            source = ""
            for path in paths:
                with open(path) as f:
                    source += f.read()
            rows = table(text, f"{name}-options")
            self.assertGreater(len(rows), 5)
            for row in rows:
                option = row["Option"].strip("`")
                self.assertIn(f'"{option}"', source, f"{name}: {option}")
        factories = availableFactories()
        ratelimit = yaml.safe_load(
            section(text, "## ratelimit").split("```yaml\n")[1].split("```")[0]
        )
        [spec] = ratelimit["hooks"]
        factories["ratelimit"].build(spec["options"], HookContext(reactor=Clock()))
        cors = yaml.safe_load(
            section(text, "## cors").split("```yaml\n")[1].split("```")[0]
        )
        [spec] = cors["hooks"]
        factories["cors"].build(spec["options"], HookContext(reactor=Clock()))


class SecretsDocTests(SynchronousTestCase):
    """
    What docs/hooks.md says /routes shows of hook options, and the auth
    hook's documented limits.
    """

    def test_redactionTable(self) -> None:
        """
        Each row of the redaction table is what /routes shows for a hook
        configured with those options.
        """
        rows = table(hooksDoc(), "redaction")
        self.assertGreaterEqual(len(rows), 4)
        for row in rows:
            name = span(row["Hook"])
            configured = json.loads(span(row["Options as configured"]))
            shown = json.loads(span(row["As /routes shows them"]))
            registry = MemoryRegistry()
            routes = Routes(
                registry,
                HostTiers({}),
                Balancer(Clock()),
                [HookSpec(name, json.dumps(configured, sort_keys=True))],
            )
            self.assertEqual(
                routes.document()["global_hooks"],
                [{"name": name, "options": shown}],
                row,
            )

    def test_secretNames(self) -> None:
        """
        Every name fragment the docs list marks an option as a secret, as
        do the two endings; a name with none of them does not.
        """
        text = section(hooksDoc(), "### Secrets in options")
        listed = text.split("whatever\n  its value:")[1].split("\n- The")[0]
        fragments = spans(listed)
        self.assertIn("pass", fragments)
        for fragment in fragments:
            ending = fragment.startswith(("-", "_"))
            name = f"signing{fragment}" if ending else f"x-{fragment}-y"
            self.assertTrue(isSecretName(name), fragment)
        self.assertFalse(isSecretName("region"))

    def test_authLimits(self) -> None:
        """
        The auth reference states the hook's floors and ceilings as the
        code enforces them.
        """
        from monedge.builtin import auth

        text = " ".join(section(hooksDoc(), "## auth").split())
        self.assertIn(
            f"`jwks-min-refresh` (at least `{auth.MIN_JWKS_REFRESH:g}` s", text
        )
        self.assertIn(
            f"`jwks-refresh-interval` (at least `{auth.MIN_JWKS_REFRESH_INTERVAL:g}` s)",
            text,
        )
        self.assertIn(f"`max-in-flight` calls (`{auth.DEFAULT_MAX_IN_FLIGHT}`", text)
        self.assertIn(f"from 1 to `{auth.MAX_IN_FLIGHT}`", text)
        error = self.assertRaises(
            HookConfigError,
            buildHook,
            "auth",
            {"mode": "jwt", "jwks-url": "https://idp/jwks", "jwks-min-refresh": 0},
            HookContext(reactor=Clock(), http=object()),
        )
        self.assertIn(f"`{error}`", text)


class TutorialEndToEndTests(ProxyTestCase):
    """
    The tutorial on a real twistd monedge process, with examples/hooks on
    its PYTHONPATH.
    """

    def environment(self) -> dict[str, str]:
        """
        The child's PYTHONPATH: the example directory, then the tree under
        test (as ProxyProcess would set it).
        """
        return {"PYTHONPATH": EXAMPLES + os.pathsep + ROOT}

    async def test_exampleHooksOnTheProxyPath(self) -> None:
        """
        With the example registry (its endpoint replaced by a test
        upstream): a request reaches the upstream with the added header; a
        path under the blocked prefix, also written with an escape, gets
        the documented 403 forbidden and never reaches the upstream; the
        metrics after the tutorial's two requests are the documented ones,
        and /routes shows the service's hooks.
        """
        text = hooksDoc()
        upstream = self.startUpstream()
        with open(os.path.join(ROOT, SERVICES), encoding="utf-8") as f:
            services = yaml.safe_load(f)["services"]
        services["service.api.shop"]["endpoints"] = [upstream.address]
        self.writeServices(services)
        proxy = ProxyProcess(
            self.registryPath,
            self.directory,
            ["--drain-delay", "0s", "--drain-timeout", "10s"],
            env=self.environment(),
        )
        self.addCleanup(proxy.stop)
        await proxy.start()

        response, body = await self.get(proxy.url + "/shop/hello")
        self.assertEqual(response.code, 200)
        [seen] = upstream.received
        self.assertEqual(seen.header(b"x-example"), [b"hello"])

        # The tutorial's curl -i, on a raw connection, so that every header
        # is seen as sent; asking to close adds only "Connection: close".
        raw = await deferRaw(
            proxy.port,
            b"GET /shop/internal/stats HTTP/1.1\r\nHost: localhost\r\n"
            b"Connection: close\r\n\r\n",
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = [
            h for h in head.decode("ascii").split("\r\n") if h != "Connection: close"
        ]
        requestId = json.loads(body)["request_id"]
        documented = block(text, "blocked-response")
        documentedId = json.loads(documented.partition("\n\n")[2])["request_id"]
        self.assertEqual(
            "\n".join(lines) + "\n\n" + body.decode("utf-8"),
            documented.replace(documentedId, requestId) + "\n",
        )
        self.assertEqual(len(upstream.received), 1)

        response, metrics = await self.get(proxy.adminURL + "/metrics")
        exposed = metrics.decode("utf-8").splitlines()
        for line in block(text, "metrics-hooks").splitlines():
            self.assertIn(line, exposed)

        for target in ["/shop/%69nternal/stats", "/shop/internal"]:
            response, body = await self.get(proxy.url + target)
            self.assertEqual(response.code, 403, target)
            self.assertEqual(json.loads(body)["code"], "forbidden")
        response, body = await self.get(proxy.url + "/shop/internals")
        self.assertEqual(response.code, 200)
        self.assertEqual([r.uri for r in upstream.received], [b"/hello", b"/internals"])

        response, body = await self.get(proxy.adminURL + "/routes")
        [service] = json.loads(body)["services"]
        expected = json.loads("{" + block(text, "routes-hooks") + "}")
        self.assertEqual(service["policy"]["hooks"], expected["hooks"])

    async def test_unknownHookStopsStartup(self) -> None:
        """
        twistd monedge --hook nosuchhook, with the example plugin on the
        path, exits at startup with status 1, and the last line of its
        output is the documented message, listing every known hook: the
        example ones and the built-in ones.
        """
        self.writeServices({})
        proxy = ProxyProcess(
            self.registryPath,
            self.directory,
            ["--hook", "nosuchhook"],
            env=self.environment(),
        )
        result = await threads.deferToThread(
            subprocess.run,
            proxy.command(),
            cwd=self.directory,
            env={**os.environ, **self.environment()},
            capture_output=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(result.returncode, 1, result.stderr)
        with examplesOnPath():
            known = sorted(availableFactories())
        for name in ["add-header", "block-paths", "headers"]:
            self.assertIn(name, known)
        output = (result.stdout + b"\n" + result.stderr).decode("utf-8")
        lastLine = output.strip().splitlines()[-1]
        self.assertTrue(
            lastLine.endswith(
                ": "
                + block(readDoc("configuration.md"), "unknown-hook-error").replace(
                    "(known: ...)", f"(known: {', '.join(known)})"
                )
            ),
            lastLine,
        )
        self.assertNotIn(b"Traceback", result.stdout + result.stderr)
