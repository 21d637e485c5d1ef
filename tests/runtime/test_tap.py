"""
The twistd plugin: options, their validation, and the service they build.
"""

from __future__ import annotations

import os
import subprocess
import sys

from twisted.application.service import IServiceCollection
from twisted.internet.testing import MemoryReactorClock
from twisted.python.usage import UsageError
from twisted.trial.unittest import SynchronousTestCase

from monedge.runtime.compose import buildProxy, buildRegistry
from monedge.runtime.lifecycle import ProxyService
from monedge.tap import Options, makeService
from monedge.testing import writeRegistry
from monedge.upstream.client import FastUpstreamClient
from monedge.upstream.dispatch import ProtocolDispatch
from monedge.upstream.h2client import H2UpstreamClient


class OptionsTestCase(SynchronousTestCase):
    """
    Parses C{twistd monedge} options on a registry file of one service.
    """

    def setUp(self) -> None:
        self.registry = os.path.abspath(self.mktemp())
        writeRegistry(
            self.registry, {"service.api.echo": {"endpoints": ["127.0.0.1:1"]}}
        )

    def parse(self, *args: str) -> Options:
        options = Options()
        options.parseOptions(["--registry", f"static:{self.registry}", *args])
        return options

    def assertUsageError(self, args: list[str], *fragments: str) -> None:
        """
        Parsing C{args} is a UsageError whose one-line message contains
        every fragment.
        """
        with self.assertRaises(UsageError) as caught:
            self.parse(*args)
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)


class OptionsTests(OptionsTestCase):
    """
    Options parse, default and validate as documented in --help.
    """

    def test_defaults(self) -> None:
        """
        With no options: port 30080 and admin 30081 on every interface with
        a large backlog, no trusted hops, the documented timeouts.
        """
        options = self.parse()
        self.assertEqual(options["port"], "tcp:30080:backlog=1024")
        self.assertEqual(options["admin-port"], "tcp:30081:backlog=1024")
        self.assertEqual(options["trusted-hops"], 0)
        self.assertEqual(options["drain-delay"], 5.0)
        self.assertEqual(options["drain-timeout"], 25.0)
        self.assertEqual(options["header-timeout"], 10.0)
        self.assertEqual(options["keepalive-timeout"], 75.0)
        self.assertEqual(options["listen"], [])

    def test_endpointStrings(self) -> None:
        """
        --port takes a number or an endpoint string; --listen repeats.
        """
        options = self.parse(
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--listen",
            "tcp:8081",
            "--listen",
            "unix:/tmp/monedge.sock",
        )
        self.assertEqual(options["port"], "tcp:0:interface=127.0.0.1")
        self.assertEqual(options["listen"], ["tcp:8081", "unix:/tmp/monedge.sock"])

    def test_hostTiers(self) -> None:
        """
        --host-tier maps hosts to tiers, compared lowercased.
        """
        options = self.parse("--host-tier", "Webhooks.Example.com=webhooks")
        self.assertEqual(
            options["host-tiers"].tierFor("webhooks.example.com"), "webhooks"
        )
        self.assertIsNone(options["host-tiers"].tierFor("api.example.com"))

    def test_badValues(self) -> None:
        """
        Every bad value is a one-line UsageError naming the option.
        """
        self.assertUsageError(["--port", "99999"], "port out of range")
        self.assertUsageError(["--listen", "nonsense:1"], "--listen")
        self.assertUsageError(["--trusted-hops", "-1"], "--trusted-hops")
        self.assertUsageError(["--trusted-hops", "two"], "--trusted-hops")
        self.assertUsageError(["--drain-delay", "soon"], "--drain-delay")
        self.assertEqual(self.parse("--drain-delay", "0s")["drain-delay"], 0.0)
        self.assertUsageError(["--header-timeout", "0"], "--header-timeout")
        self.assertUsageError(["--max-header-count", "0"], "--max-header-count")
        self.assertUsageError(["--underscore-headers", "strip"], "--underscore-headers")
        self.assertUsageError(["--host-tier", "example.com"], "HOST=TIER")
        self.assertUsageError(["--host-tier", "example.com=we-b"], "invalid tier")
        self.assertUsageError(["--host-tier", "example.com:80=api"], "invalid host")

    def test_upstreamClientRemoved(self) -> None:
        """
        The option that chose Twisted's Agent as the upstream client is
        gone (docs/configuration.md, "One upstream client"): passing it,
        with either of its old values, is a one-line UsageError naming it.
        """
        for value in ("fast", "agent"):
            self.assertUsageError(
                ["--upstream-client", value], "--upstream-client", "not recognized"
            )

    def test_badRegistry(self) -> None:
        """
        An unknown registry kind, a missing file and an invalid file are
        UsageErrors that name the file and the bad field.
        """
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--registry", "zookeeper"])
        self.assertIn("unknown registry", str(caught.exception))
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(["--registry", "static:/nonexistent/services.yaml"])
        self.assertIn("/nonexistent/services.yaml", str(caught.exception))
        with open(self.registry, "w") as f:
            f.write("services:\n  service.api.x:\n    endpoints: ['127.0.0.1:1']\n")
            f.write("    policy: {timeout: forever}\n")
        # An invalid file is found when the registry is built, from the
        # configuration parsing gave.
        with self.assertRaises(UsageError) as caught:
            buildRegistry(self.parse().config, MemoryReactorClock())
        message = str(caught.exception)
        self.assertNotIn("\n", message)
        for fragment in [
            self.registry,
            "services.service.api.x.policy.timeout",
            "forever",
        ]:
            self.assertIn(fragment, message)


class FileOptionTests(SynchronousTestCase):
    """
    A file an option names that cannot be opened is found while the
    options are parsed: a one-line UsageError naming the option and file.
    """

    def setUp(self) -> None:
        self.missing = os.path.join(os.path.abspath(self.mktemp()), "missing")
        self.registry = os.path.abspath(self.mktemp())
        writeRegistry(self.registry, {})

    def assertMessage(self, args: list[str], message: str) -> None:
        """
        Parsing C{args} is a UsageError with exactly C{message}.
        """
        with self.assertRaises(UsageError) as caught:
            Options().parseOptions(args)
        self.assertEqual(str(caught.exception), message)

    def test_accessLog(self) -> None:
        """
        --access-log in a directory that does not exist.
        """
        self.assertMessage(
            ["--registry", f"static:{self.registry}", "--access-log", self.missing],
            f"--access-log {self.missing}: cannot open: no such file or directory",
        )

    def test_accessLogOpenedOnce(self) -> None:
        """
        Parsing opens no access log: the proxy built from the configuration
        opens the file once, and writes its lines there.
        """
        path = os.path.abspath(self.mktemp())
        options = Options()
        options.parseOptions(
            ["--registry", f"static:{self.registry}", "--access-log", path]
        )
        self.assertFalse(os.path.exists(path))
        self.assertEqual(options.config.accessLog, path)
        proxy = buildProxy(options.config, MemoryReactorClock(), hooks=None)
        stream = proxy.accessLog._out
        assert stream is not None
        self.addCleanup(stream.close)
        self.assertEqual(stream.name, path)
        self.assertTrue(os.path.exists(path))
        self.assertIs(proxy.site.accessLog, proxy.accessLog)

    def test_accessLogCannotOpen(self) -> None:
        """
        --access-log naming a file that cannot be opened (a directory, here)
        is found when the proxy is built: the same one-line UsageError
        naming the option and file.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        options = Options()
        options.parseOptions(
            ["--registry", f"static:{self.registry}", "--access-log", directory]
        )
        with self.assertRaises(UsageError) as caught:
            buildProxy(options.config, MemoryReactorClock())
        self.assertEqual(
            str(caught.exception),
            f"--access-log {directory}: cannot open: is a directory",
        )

    def test_hooks(self) -> None:
        """
        --hooks naming a file that does not exist.
        """
        self.assertMessage(
            ["--registry", f"static:{self.registry}", "--hooks", self.missing],
            f"--hooks {self.missing}: cannot read: no such file or directory",
        )

    def test_kubeconfig(self) -> None:
        """
        --kubeconfig naming a file that does not exist.
        """
        self.assertMessage(
            ["--registry", "kubernetes", "--kubeconfig", self.missing],
            f"--kubeconfig {self.missing}: cannot read: no such file or directory",
        )


class MakeServiceTests(OptionsTestCase):
    """
    makeService builds a MultiService listening through endpoint strings.
    """

    def test_listens(self) -> None:
        """
        Starting the service listens on the proxy port, each --listen and
        the admin port, with the large backlog for bare port numbers.
        """
        options = self.parse(
            "--port",
            "30080",
            "--listen",
            "tcp:30090:interface=127.0.0.1",
            "--admin-port",
            "tcp:30081:interface=127.0.0.1",
        )
        reactor = MemoryReactorClock()
        service = makeService(options, reactor)
        self.assertTrue(IServiceCollection.providedBy(service))
        service.startService()

        def stop() -> None:
            # The drain runs on the memory reactor's clock: advance it past
            # the drain delay and timeout, so that every child stops (the
            # static registry's poll runs on the global reactor).
            stopped = service.stopService()
            reactor.advance(60)
            if stopped is not None:
                self.successResultOf(stopped)

        self.addCleanup(stop)
        listening = {
            (port, backlog, interface)
            for port, _, backlog, interface in reactor.tcpServers
        }
        self.assertEqual(
            listening,
            {(30080, 1024, ""), (30090, 50, "127.0.0.1"), (30081, 50, "127.0.0.1")},
        )

    def test_oneUpstreamClient(self) -> None:
        """
        One L{ProtocolDispatch} sends every request upstream and every
        WebSocket handshake: HTTP/1.1 with one L{FastUpstreamClient}, with
        the upstream head limits given, and HTTP/2 with one
        L{H2UpstreamClient}.
        """
        options = self.parse(
            "--max-upstream-headers-size", "1024", "--max-upstream-header-count", "7"
        )
        service = makeService(options, MemoryReactorClock())
        assert isinstance(service, ProxyService)
        client = service.client
        assert isinstance(client, ProtocolDispatch)
        http1 = client.http1
        assert isinstance(http1, FastUpstreamClient)
        self.assertEqual((http1.maxHeadersSize, http1.maxHeaderCount), (1024, 7))
        self.assertIsInstance(client.http2, H2UpstreamClient)
        context = service.site.resource._context
        self.assertIs(context.client, client)
        self.assertIs(context.upgrader, client)

    def test_upstreamPing(self) -> None:
        """
        --upstream-ping-interval and --upstream-ping-timeout reach the
        HTTP/2 upstream client (30 s and 10 s by default); the interval may
        be 0 (no keepalive), the timeout may not.
        """

        def http2(*args: str) -> H2UpstreamClient:
            service = makeService(self.parse(*args), MemoryReactorClock())
            assert isinstance(service, ProxyService)
            client = service.client
            assert isinstance(client, ProtocolDispatch)
            assert isinstance(client.http2, H2UpstreamClient)
            return client.http2

        default = http2()
        self.assertEqual((default.pingInterval, default.pingTimeout), (30.0, 10.0))
        given = http2(
            "--upstream-ping-interval", "2m", "--upstream-ping-timeout", "500ms"
        )
        self.assertEqual((given.pingInterval, given.pingTimeout), (120.0, 0.5))
        self.assertEqual(http2("--upstream-ping-interval", "0").pingInterval, 0.0)
        self.assertUsageError(
            ["--upstream-ping-timeout", "0"], "--upstream-ping-timeout"
        )
        self.assertUsageError(
            ["--upstream-ping-interval", "often"], "--upstream-ping-interval"
        )


class CommandLineTests(SynchronousTestCase):
    """
    The real command line reports bad options without a traceback.
    """

    def twistd(self, *args: str) -> subprocess.CompletedProcess[str]:
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        root = os.path.dirname(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        )
        return subprocess.run(
            [twistd, "-n", "--pidfile=", "monedge", *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=root,
            # The monedge of this source tree, not an installed copy.
            env={**os.environ, "PYTHONPATH": root},
        )

    def test_badOptionIsOneLine(self) -> None:
        """
        twistd monedge with a bad value exits non-zero with exactly one
        line, on standard error, naming the option: not twistd's usage text
        (all of --help) before it, and no traceback.
        """
        result = self.twistd(
            "--registry", "static:examples/services.yaml", "--drain-delay", "x"
        )
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertEqual(
            result.stderr,
            "monedge: --drain-delay: expected a duration like '30s', got 'x'\n",
        )

    def test_unknownOptionIsOneLine(self) -> None:
        """
        An option monedge does not have is one line too.
        """
        result = self.twistd("--registry", "static:examples/services.yaml", "--frob")
        self.assertEqual(result.returncode, 1)
        self.assertEqual(result.stdout, "")
        self.assertEqual(result.stderr, "monedge: option --frob not recognized\n")

    def test_helpDocumentsOptions(self) -> None:
        """
        --help lists every option with its default.
        """
        result = self.twistd("--help")
        for option, _, default, _ in Options.optParameters:
            assert option is not None
            self.assertIn(f"--{option}=", result.stdout)
            if default is not None:
                words = " ".join(result.stdout.split())
                self.assertIn(f"[default: {default}]", words)
        self.assertIn("--listen=", result.stdout)
        self.assertIn("--host-tier=", result.stdout)
        self.assertIn("--namespace=", result.stdout)


class FileLimitTests(SynchronousTestCase):
    """
    monedge raises its open-files limit to the hard limit.
    """

    def test_raisesSoftToHard(self) -> None:
        """
        With a soft limit below the hard one, the soft limit is raised to
        the hard limit.
        """
        import resource

        from monedge.runtime.compose import raiseFileLimit

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, (soft, hard))
        lower = min(soft, 512)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lower, hard))
        before, after = raiseFileLimit()
        self.assertEqual(before, lower)
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], after)
        if hard != resource.RLIM_INFINITY:
            self.assertEqual(after, hard)


class ForwardingOptionsTests(OptionsTestCase):
    """
    --trusted-hops, --trusted-proxies, --trusted-header, --identity-header
    and --no-real-ip combine into one set of forwarding rules.
    """

    def test_defaults(self) -> None:
        """
        By default nothing is trusted, no identity header is listed, and
        X-Real-IP is set.
        """
        rules = self.parse()["forwarding"]
        self.assertEqual(rules.trust.hops, 0)
        self.assertEqual(rules.trust.proxies, ())
        self.assertEqual(rules.identityHeaders, ())
        self.assertTrue(rules.realIp)

    def test_proxiesImplyOneHop(self) -> None:
        """
        --trusted-proxies alone trusts one hop from those ranges; with
        --trusted-hops the count is as given.
        """
        options = self.parse("--trusted-proxies", "10.0.0.0/8")
        self.assertEqual(options["trusted-hops"], 1)
        self.assertTrue(options["forwarding"].isTrusted(b"10.1.2.3"))
        self.assertFalse(options["forwarding"].isTrusted(b"192.0.2.1"))
        options = self.parse(
            "--trusted-proxies", "10.0.0.0/8", "--trusted-proxies", "fd00::/8",
            "--trusted-hops", "2",
        )  # fmt: skip
        self.assertEqual(options["forwarding"].trust.hops, 2)
        self.assertEqual(len(options["forwarding"].trust.proxies), 2)

    def test_headers(self) -> None:
        """
        Header names are kept lowercased; --no-real-ip turns X-Real-IP off.
        """
        options = self.parse(
            "--identity-header", "X-User-Role",
            "--trusted-header", "CF-Connecting-IP",
            "--no-real-ip",
        )  # fmt: skip
        rules = options["forwarding"]
        self.assertEqual(rules.identityHeaders, ("x-user-role",))
        self.assertEqual(rules.trustedHeaders, ("cf-connecting-ip",))
        self.assertFalse(rules.realIp)

    def test_badValues(self) -> None:
        """
        Every bad value is a one-line UsageError naming the option.
        """
        cases = [
            (["--trusted-proxies", "10.0.0.0/33"], "--trusted-proxies"),
            (["--trusted-proxies", "10.0.0.0/8", "--trusted-hops", "0"], "hops"),
            (["--identity-header", "X User"], "--identity-header"),
            (["--trusted-header", "X-Custom"], "not a client-controlled header"),
            (["--trusted-header", "X-Real-IP"], "--no-real-ip"),
        ]
        for args, fragment in cases:
            self.assertUsageError(args, fragment)

    def test_countAloneWarns(self) -> None:
        """
        Building the service with --trusted-hops and no --trusted-proxies
        logs one warning that any peer may choose its address; with
        --trusted-proxies, or no trusted hops, nothing is logged about it.
        """
        from typing import cast

        from twisted.logger import ILogObserver, LogLevel, globalLogPublisher

        seen: list[dict[str, object]] = []
        observer = cast(ILogObserver, seen.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

        def warnings(*args: str) -> list[dict[str, object]]:
            del seen[:]
            makeService(self.parse(*args), MemoryReactorClock())
            return [
                event
                for event in seen
                if event.get("log_level") == LogLevel.warn
                and "--trusted-proxies" in str(event.get("log_format"))
            ]

        self.assertEqual(len(warnings("--trusted-hops", "1")), 1)
        self.assertEqual(warnings("--trusted-proxies", "10.0.0.0/8"), [])
        self.assertEqual(warnings(), [])
