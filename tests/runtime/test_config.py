"""
The configuration (monedge.runtime.config) and the composition root
(monedge.runtime.compose): parsing options gives plain values and builds nothing;
the root builds the proxy from them, with any part passed in instead.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys
import textwrap

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

import tests
from monedge.observe.accesslog import AccessLog
from monedge.observe.metrics import Metrics
from monedge.registry.kubeclient import KubernetesClientAPI
from monedge.registry.kubernetes import KubernetesRegistry
from monedge.registry.static import StaticRegistry
from monedge.rules.convention import HostTiers
from monedge.rules.headers import ForwardingRules
from monedge.rules.limits import Limits
from monedge.rules.policy import HookSpec
from monedge.runtime.compose import buildProxy, buildRegistry
from monedge.runtime.config import Configuration
from monedge.tap import Options
from monedge.testing import FakeUpstreamClient, MemoryRegistry, writeRegistry
from monedge.upstream.balancer import Balancer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tests.__file__)))

#: The types a configuration's values may have: plain values and the frozen
#: value objects the options parse into.
PLAIN = (
    str,
    int,
    float,
    bool,
    type(None),
    HostTiers,
    ForwardingRules,
    HookSpec,
    Limits,
)


def _plain(value: object) -> bool:
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return isinstance(value, PLAIN)


class ParsingBuildsNothingTests(SynchronousTestCase):
    """
    Parsing C{twistd monedge}'s options imports no reactor and builds no
    service object: it gives a frozen L{Configuration} of plain values.
    """

    def setUp(self) -> None:
        self.registry = os.path.abspath(self.mktemp())
        writeRegistry(self.registry, {})

    def test_noReactor(self) -> None:
        """
        In a fresh interpreter, parsing options with every kind of listener
        the tests use (a port number, tcp, tcp6, unix, a TLS port) leaves
        C{twisted.internet.reactor} unimported, and so does building the
        configuration.
        """
        tls = os.path.abspath(self.mktemp())
        os.makedirs(tls)
        script = textwrap.dedent(
            f"""
            import sys
            from monedge.tap import Options
            options = Options()
            options.parseOptions([
                "--registry", "static:{self.registry}",
                "--port", "30080",
                "--listen", "tcp:0:interface=127.0.0.1",
                "--listen", "tcp6:0:interface=\\\\:\\\\:1",
                "--listen", "unix:/tmp/monedge-config-test.sock",
                "--tls-port", "tcp:0", "--tls-dir", "{tls}",
                "--hook", "headers",
                "--access-log", "none",
            ])
            assert options.config.listen[1].startswith("tcp6:")
            print("twisted.internet.reactor" in sys.modules)
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        self.assertEqual((result.returncode, result.stderr), (0, ""))
        self.assertEqual(result.stdout, "False\n")

    def test_plainValues(self) -> None:
        """
        The configuration is frozen, and every value in it is a plain value
        or a frozen value object: no open file, no registry, no service.
        """
        options = Options()
        options.parseOptions(
            ["--registry", f"static:{self.registry}", "--hook", "headers"]
        )
        config = options.config
        self.assertIsInstance(config, Configuration)
        for configField in dataclasses.fields(config):
            value = getattr(config, configField.name)
            self.assertTrue(_plain(value), f"{configField.name}: {value!r}")
        with self.assertRaises(dataclasses.FrozenInstanceError):
            config.port = "tcp:1"  # type: ignore[misc]
        with self.assertRaises(TypeError):
            config.hostTiers.mapping["x"] = "y"  # type: ignore[index]
        self.assertEqual(config.hookSpecs, (HookSpec("headers"),))
        self.assertEqual(
            config.rawArgs,
            ("--registry", f"static:{self.registry}", "--hook", "headers"),
        )

    def test_defaultsAgree(self) -> None:
        """
        L{Configuration}'s defaults are the options' defaults: the values
        the tests and the fuzz target build with are the ones monedge runs
        with.
        """
        options = Options()
        args = ["--registry", f"static:{self.registry}"]
        options.parseOptions(args)
        parsed = options.config
        default = Configuration(registry=parsed.registry, rawArgs=tuple(args))
        for configField in dataclasses.fields(Configuration):
            name = configField.name
            mine, theirs = getattr(parsed, name), getattr(default, name)
            if name == "forwarding":
                for attribute in ("trust", "identityHeaders", "trustedHeaders"):
                    self.assertEqual(
                        getattr(mine, attribute), getattr(theirs, attribute)
                    )
                self.assertEqual(mine.realIp, theirs.realIp)
            elif name == "workers":
                continue  # "1" by default; "auto" is counted.
            else:
                self.assertEqual(mine, theirs, name)

    def test_limits(self) -> None:
        """
        The client-side limit options parse into the configuration's
        L{Limits}, which the site is built with.
        """
        options = Options()
        options.parseOptions(
            [
                "--registry",
                f"static:{self.registry}",
                "--max-header-count",
                "7",
                "--underscore-headers",
                "allow",
                "--header-timeout",
                "3s",
            ]
        )
        limits = options.config.limits
        self.assertEqual(
            limits,
            Limits(maxHeaderCount=7, underscoreHeaders="allow", headerTimeout=3.0),
        )
        proxy = buildProxy(
            options.config,
            MemoryReactorClock(),
            registry=MemoryRegistry(),
            accessLog=AccessLog(None),
            hooks=None,
        )
        self.assertIs(proxy.site.limits, limits)


class BuildProxyTests(SynchronousTestCase):
    """
    L{buildProxy} wires the request path from a configuration; a part
    passed in replaces the one it would build.
    """

    def test_injectedParts(self) -> None:
        """
        The registry, client, metrics, balancer and access log passed in
        are the ones the resource tree, context and site use; with no
        upgrader given, the client sends WebSocket handshakes if it can.
        """
        clock = MemoryReactorClock()
        registry = MemoryRegistry()
        client = FakeUpstreamClient()
        metrics = Metrics()
        balancer = Balancer(clock)
        accessLog = AccessLog(None)
        config = Configuration(hostTiers=HostTiers.fromPairs([("a.example", "web")]))
        proxy = buildProxy(
            config,
            clock,
            registry=registry,
            client=client,
            metrics=metrics,
            balancer=balancer,
            accessLog=accessLog,
            hooks=None,
        )
        self.assertIs(proxy.site.resource, proxy.root)
        self.assertIs(proxy.root._context, proxy.context)
        self.assertIs(proxy.context.client, client)
        self.assertIs(proxy.context.balancer, balancer)
        self.assertIs(proxy.context.tunnels, proxy.tunnels)
        self.assertIsNone(proxy.context.hooks)
        self.assertIs(proxy.site.metrics, metrics)
        self.assertIs(proxy.site.accessLog, accessLog)
        self.assertIs(proxy.site.forwarding, config.forwarding)
        self.assertEqual(proxy.site.limits, Limits())
        self.assertIs(proxy.root.hostTiers, config.hostTiers)
        self.assertIs(proxy.registry, registry)
        self.assertIsNone(proxy.store)
        from monedge.interfaces import IUpstreamUpgrader

        expected = client if IUpstreamUpgrader.providedBy(client) else None
        self.assertIs(proxy.context.upgrader, expected)

    def test_builtHooks(self) -> None:
        """
        Without hooks passed in, the global hooks the configuration names
        are built (with the configured timeout) and checked.
        """
        config = Configuration(hookSpecs=(HookSpec("headers"),), hookTimeout=2.0)
        proxy = buildProxy(
            config,
            MemoryReactorClock(),
            registry=MemoryRegistry(),
            accessLog=AccessLog(None),
        )
        assert proxy.hooks is not None
        self.assertEqual(proxy.hooks.context.timeout, 2.0)
        self.assertIs(proxy.context.hooks, proxy.hooks)


class BuildRegistryTests(SynchronousTestCase):
    """
    L{buildRegistry} builds the registry C{--registry} names, on the
    reactor it is given.
    """

    def test_kubernetesAPIBuiltByTheRoot(self) -> None:
        """
        For C{--registry kubernetes}, the root builds the real
        L{KubernetesClientAPI} from the kubeconfig (the registry itself
        never touches the official client), with a thread for each list or
        watch that may run at once, and the registry is timed on the given
        reactor and closes that API when it stops (the API is not started
        here: it would list in its threads).
        """
        kubeconfig = self.mktemp()
        with open(kubeconfig, "w", encoding="utf-8") as f:
            f.write(
                "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
                "clusters: [{name: k, cluster: {server: 'http://127.0.0.1:1'}}]\n"
                "users: [{name: u, user: {token: t}}]\n"
                "contexts: [{name: c, context: {cluster: k, user: u}}]\n"
            )
        reactor = MemoryReactorClock()
        config = Configuration(
            registry="kubernetes",
            kubeconfig=kubeconfig,
            namespaces=("a", "b", "c"),
        )
        registry = buildRegistry(config, reactor)
        assert isinstance(registry, KubernetesRegistry)
        api = registry.api
        assert isinstance(api, KubernetesClientAPI)
        self.assertEqual(api.maxThreads, 6)
        self.assertIs(registry.clock, reactor)
        closed: list[bool] = []

        def close() -> Deferred[None]:
            closed.append(True)
            return succeed(None)

        api.close = close  # type: ignore[method-assign]
        registry.stopService()
        self.assertEqual(closed, [True])
        # Relists are diffed in the API's threads; no freeze unless the
        # process's own makeService asks for it.
        self.assertEqual(registry._offReactor, api.run)
        self.assertIsNone(registry._freeze)
        self.assertIsNone(registry.selector)
        frozen = buildRegistry(
            dataclasses.replace(config, selector="edge=true", freezeAfterSync=True),
            reactor,
        )
        assert isinstance(frozen, KubernetesRegistry)
        self.assertIs(frozen._freeze, gc.freeze)
        self.assertEqual(frozen.selector, "edge=true")

    def test_selectorOption(self) -> None:
        """
        C{--selector} reaches the configuration checked; one that does not
        parse is refused with a one-line message naming the option.
        """
        options = Options()
        options.parseOptions(
            ["--registry", "kubernetes", "--selector", " team in (a, b),!internal "]
        )
        self.assertEqual(options.config.selector, "team in (a, b),!internal")
        for bad in ["a in x", "a b", ""]:
            with self.assertRaises(usage.UsageError) as caught:
                Options().parseOptions(["--selector", bad])
            message = str(caught.exception)
            self.assertTrue(message.startswith("--selector: "), message)
            self.assertNotIn("\n", message)

    def test_staticOnTheReactor(self) -> None:
        """
        For C{--registry static:PATH}, the file is loaded and polled on the
        given reactor.
        """
        path = self.mktemp()
        writeRegistry(path, {"service.api.a": {"endpoints": ["127.0.0.1:1"]}})
        reactor = MemoryReactorClock()
        registry = buildRegistry(Configuration(registry=f"static:{path}"), reactor)
        assert isinstance(registry, StaticRegistry)
        self.assertEqual(set(registry.services()), {"service.api.a"})
        registry.startService()
        self.addCleanup(registry.stopService)
        self.assertNotEqual(reactor.getDelayedCalls(), [])
