"""
monedge fails loudly at startup (issue 13, item 1): a listener that cannot
be opened, or a file option that cannot be read, stops a real
C{twistd monedge} with a non-zero status and exactly one line on standard
error naming the option and the address or file, and no traceback
anywhere; with C{--workers 2} too, before any worker starts.

The processes exit within a second or so; each test runs its cases
concurrently.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from twisted.internet.defer import gatherResults
from twisted.trial.unittest import SkipTest, TestCase

from monedge.testing import (
    Exited,
    ProxyProcess,
    freePort,
    unprivilegedPrefix,
    writeRegistry,
)
from monedge.testing.tls import CertificateAuthority

#: Why a listener could not listen, as monedge says it, by kind of failure.
IN_USE = "address already in use"
FORBIDDEN = "permission denied"
NOT_LOCAL = "cannot assign requested address (not an address of this machine)"
MISSING = "no such file or directory"


@dataclass
class Case:
    """
    One way to start monedge that must fail.

    @ivar args: the monedge options that make it fail.
    @ivar line: the one line expected on standard error, or L{None} to
        check C{fragments} instead.
    @ivar fragments: what that line must contain when C{line} is L{None}.
    @ivar unprivileged: run without root's privileges.
    """

    name: str
    args: list[str]
    line: str | None = None
    fragments: tuple[str, ...] = ()
    unprivileged: bool = False


class StartupFailureTests(TestCase):
    """
    Every listener option and every file option, each way it can fail, as
    one process.
    """

    timeout = 60

    #: Extra options for every process (the --workers variant sets some).
    extraArgs: Sequence[str] = ()

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.registryPath = os.path.join(self.directory, "services.yaml")
        writeRegistry(self.registryPath, {})
        # Unix socket paths must be short: not under the trial's directory.
        self.short = tempfile.mkdtemp(prefix="monedge-e2e-")
        self.addCleanup(shutil.rmtree, self.short, ignore_errors=True)
        self.locked = os.path.join(self.directory, "locked")
        os.makedirs(self.locked)
        self.lockedShort = os.path.join(self.short, "locked")
        os.makedirs(self.lockedShort)
        for directory in (self.locked, self.lockedShort):
            os.chmod(directory, 0o500)
            self.addCleanup(os.chmod, directory, 0o700)

    def taken(self) -> int:
        """
        A TCP port on 127.0.0.1 that another socket listens on for the
        rest of the test.
        """
        s = socket.socket()
        self.addCleanup(s.close)
        s.bind(("127.0.0.1", 0))
        s.listen()
        port: int = s.getsockname()[1]
        return port

    def file(self, name: str, content: bytes = b"", mode: int = 0o644) -> str:
        """
        A file in the test's directory.
        """
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(content)
        os.chmod(path, mode)
        return path

    def tlsDirectory(self) -> str:
        """
        A --tls-dir that loads: one default certificate.
        """
        path = os.path.join(self.directory, "tls")
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "default.pem"), "wb") as f:
            f.write(CertificateAuthority().issue(["default.example"]))
        return path

    def listenerCases(
        self,
        option: str,
        unix: bool = True,
        before: Callable[[str], list[str]] = lambda d: [],
    ) -> list[Case]:
        """
        The ways a listener option can fail: its address in use, a
        privileged port without privileges, an address not on this
        machine, and (for options that take one) a Unix socket in a
        directory that does not exist or may not be written.
        """
        cases = []
        inUse = f"tcp:{self.taken()}:interface=127.0.0.1"
        privileged = "tcp:1:interface=127.0.0.1"
        notLocal = f"tcp:{freePort()}:interface=192.0.2.1"
        kinds = [
            ("in use", inUse, IN_USE, False),
            ("privileged port", privileged, FORBIDDEN, True),
            ("not this machine's address", notLocal, NOT_LOCAL, False),
        ]
        if unix:
            missing = f"unix:{self.short}/missing/monedge.sock"
            forbidden = f"unix:{self.lockedShort}/monedge.sock"
            kinds += [
                ("unix, no directory", missing, MISSING, False),
                ("unix, no permission", forbidden, FORBIDDEN, True),
            ]
        for name, description, reason, unprivileged in kinds:
            cases.append(
                Case(
                    f"--{option} {name}",
                    [*before(description), f"--{option}", description],
                    f"monedge: --{option} {description}: cannot listen: {reason}\n",
                    unprivileged=unprivileged,
                )
            )
        return cases

    async def runCases(self, cases: list[Case]) -> None:
        """
        Run every case at once; each must exit non-zero with its one line
        on standard error, nothing on standard output, no traceback in
        either or in the log, and (with workers) no worker started.
        """
        if any(case.unprivileged for case in cases):
            if unprivilegedPrefix() is None:
                raise SkipTest("cannot drop root's privileges here (no setpriv)")
            with open("/proc/sys/net/ipv4/ip_unprivileged_port_start") as f:
                if int(f.read()) <= 1:
                    raise SkipTest("port 1 is not privileged on this machine")
        # The listeners a case does not name bind any free port (the
        # process's own pick of one could be taken by a parallel test
        # before it binds, failing the case on the wrong listener).
        anyPort = [
            "--port",
            "tcp:0:interface=127.0.0.1",
            "--admin-port",
            "tcp:0:interface=127.0.0.1",
        ]
        processes = [
            ProxyProcess(
                self.registryPath,
                self.directory,
                [*anyPort, *self.extraArgs, *case.args],
                unprivileged=case.unprivileged,
            )
            for case in cases
        ]
        exits: list[Exited] = await gatherResults(
            [process.run() for process in processes], consumeErrors=True
        )
        problems = []
        for case, exited in zip(cases, exits, strict=True):
            problem = self.check(case, exited)
            if problem:
                problems.append(
                    f"{case.name}: {problem}\n  status {exited.status}\n"
                    f"  stdout {exited.stdout!r}\n  stderr {exited.stderr!r}\n"
                    f"  log {exited.log[-1500:]!r}"
                )
        self.assertEqual(problems, [], "\n".join(problems))

    def check(self, case: Case, exited: Exited) -> str | None:
        """
        What is wrong with how C{case} ended, if anything.
        """
        if exited.status <= 0:
            return "expected a non-zero exit status"
        for where, text in [
            ("stdout", exited.stdout),
            ("stderr", exited.stderr),
            ("log", exited.log),
        ]:
            if "Traceback" in text:
                return f"a traceback in {where}"
        if exited.stdout:
            return "expected nothing on standard output"
        if exited.stderr.count("\n") != 1 or not exited.stderr.endswith("\n"):
            return "expected exactly one line on standard error"
        if case.line is not None and exited.stderr != case.line:
            return f"expected {case.line!r}"
        for fragment in case.fragments:
            if fragment not in exited.stderr:
                return f"expected {fragment!r} in the line"
        if "worker 0 started" in exited.log:
            return "a worker started"
        return None

    async def test_port(self) -> None:
        """
        --port: in use, a privileged port, an address not on this machine,
        a Unix socket with no directory, or one it may not create.
        """
        await self.runCases(self.listenerCases("port"))

    async def test_listen(self) -> None:
        """
        Each --listen, likewise (beside a --port that works).
        """
        await self.runCases(self.listenerCases("listen"))

    async def test_adminPort(self) -> None:
        """
        --admin-port, likewise.
        """
        await self.runCases(self.listenerCases("admin-port"))

    async def test_tlsPort(self) -> None:
        """
        --tls-port (TCP only), likewise, with a --tls-dir that loads.
        """
        tls = self.tlsDirectory()
        await self.runCases(
            self.listenerCases(
                "tls-port", unix=False, before=lambda d: ["--tls-dir", tls]
            )
        )

    async def test_accessLog(self) -> None:
        """
        --access-log in a directory that does not exist, naming a
        directory, or in a directory it may not write to.
        """
        missing = os.path.join(self.directory, "no", "such", "access.log")
        forbidden = os.path.join(self.locked, "access.log")
        await self.runCases(
            [
                Case(
                    "missing directory",
                    ["--access-log", missing],
                    f"monedge: --access-log {missing}: cannot open: {MISSING}\n",
                ),
                Case(
                    "a directory",
                    ["--access-log", self.directory],
                    f"monedge: --access-log {self.directory}: cannot open:"
                    " is a directory\n",
                ),
                Case(
                    "no permission",
                    ["--access-log", forbidden],
                    f"monedge: --access-log {forbidden}: cannot open: {FORBIDDEN}\n",
                    unprivileged=True,
                ),
            ]
        )

    def fileCases(
        self,
        option: str,
        arguments: Callable[[str], list[str]],
        name: str | None = None,
    ) -> list[Case]:
        """
        The ways a file an option names can fail to open: missing, a
        directory, unreadable. The line must name the option (C{name}, if
        the message names it differently) and the file.
        """
        missing = os.path.join(self.directory, "missing", "file.yaml")
        unreadable = self.file(f"unreadable-{option}", b"x: 1\n", 0o000)
        named = name or f"--{option}"
        return [
            Case(
                f"--{option} {kind}",
                arguments(path),
                fragments=(f"monedge: {named}", path),
                unprivileged=unprivileged,
            )
            for kind, path, unprivileged in [
                ("missing", missing, False),
                ("a directory", self.directory, False),
                ("unreadable", unreadable, True),
            ]
        ]

    async def test_hooks(self) -> None:
        """
        --hooks: a file that does not exist, a directory, or unreadable.
        """
        await self.runCases(self.fileCases("hooks", lambda path: ["--hooks", path]))

    async def test_registry(self) -> None:
        """
        --registry static:PATH, likewise.
        """
        await self.runCases(
            self.fileCases("registry", lambda path: ["--registry", f"static:{path}"])
        )

    async def test_kubeconfig(self) -> None:
        """
        --kubeconfig (with --registry kubernetes), likewise.
        """
        await self.runCases(
            self.fileCases(
                "kubeconfig",
                lambda path: ["--registry", "kubernetes", "--kubeconfig", path],
            )
        )

    async def test_hookKeysFile(self) -> None:
        """
        A file named in a hook's options: the auth hook's keys-file.
        """
        await self.runCases(
            self.fileCases(
                "keys-file",
                lambda path: [
                    "--hook",
                    f'{{"name": "auth", "options": {{"mode": "api-key",'
                    f' "keys-file": "{path}"}}}}',
                ],
                name="--hook: hook auth: keys-file",
            )
        )

    async def test_hookFloors(self) -> None:
        """
        Hook options below their safe floors stop monedge with one line
        naming the hook and the option: the auth hook's jwks-min-refresh
        of 0 (a client could then make monedge fetch the JWKS on every
        unknown key id) and a ratelimit redis-timeout not below the hook
        timeout.
        """
        jwt = (
            '{"name": "auth", "options": {"mode": "jwt",'
            ' "jwks-url": "https://idp.example/jwks", "jwks-min-refresh": "0s"}}'
        )
        redis = (
            '{"name": "ratelimit", "options": {"rate": "5/s",'
            ' "redis": "redis://127.0.0.1:1/0", "redis-timeout": "10s"}}'
        )
        await self.runCases(
            [
                Case(
                    "jwks-min-refresh 0",
                    ["--hook", jwt],
                    fragments=("monedge: --hook: hook auth: jwks-min-refresh",),
                ),
                Case(
                    "redis-timeout above the hook timeout",
                    ["--hook", redis, "--hook-timeout", "5s"],
                    fragments=("monedge: --hook: hook ratelimit: redis-timeout",),
                ),
            ]
        )

    async def test_tlsDir(self) -> None:
        """
        --tls-dir: missing, a file rather than a directory, or one it may
        not read.
        """
        missing = os.path.join(self.directory, "missing-tls")
        notDirectory = self.file("not-a-directory")
        unreadable = os.path.join(self.directory, "unreadable-tls")
        os.makedirs(unreadable)
        os.chmod(unreadable, 0o000)
        self.addCleanup(os.chmod, unreadable, 0o700)
        port = f"tcp:{freePort()}:interface=127.0.0.1"
        await self.runCases(
            [
                Case(
                    f"--tls-dir {kind}",
                    ["--tls-port", port, "--tls-dir", path],
                    fragments=("monedge: --tls-dir", path),
                    unprivileged=unprivileged,
                )
                for kind, path, unprivileged in [
                    ("missing", missing, False),
                    ("not a directory", notDirectory, False),
                    ("unreadable", unreadable, True),
                ]
            ]
        )


class WorkersStartupFailureTests(StartupFailureTests):
    """
    The same with C{--workers 2}: the supervisor binds the listeners and
    reads the files, and stops before starting any worker.
    """

    extraArgs = ("--workers", "2")

    async def test_workerAdminSockets(self) -> None:
        """
        The workers' private admin sockets: with $TMPDIR too long a path
        for a Unix socket, the supervisor stops at startup naming the
        socket, rather than every worker failing again and again.
        """
        deep = os.path.join(self.short, "t" * 100)
        os.makedirs(deep)
        process = ProxyProcess(
            self.registryPath,
            self.directory,
            list(self.extraArgs),
            env={"TMPDIR": deep},
        )
        exited = await process.run()
        problem = self.check(
            Case(
                "admin sockets",
                [],
                fragments=(
                    f"monedge: --workers unix:{deep}/monedge-workers-",
                    "worker-0.sock: cannot listen: AF_UNIX path too long",
                ),
            ),
            exited,
        )
        self.assertIsNone(problem, f"{problem}: {exited}")
        self.assertEqual(os.listdir(deep), [])
