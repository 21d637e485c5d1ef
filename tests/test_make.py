"""
The README's two commands install what they need and no more: C{make run}
installs monedge alone and at most python3-venv from Debian, as any user;
C{make test} installs the dev extras and every Debian tool the tests drive.
Checked on what C{make -n} would run and on what scripts/system-deps.sh
asks apt-get for, with fake commands on its C{PATH}.
"""

from __future__ import annotations

import configparser
import os
import re
import stat
import subprocess

from twisted.trial.unittest import SynchronousTestCase

import tests

#: The repository root: the parent of the tests package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tests.__file__)))

#: What only the test path may install or run: Debian packages and their
#: commands, and the dev extras' tools.
TEST_ONLY = [
    "valgrind",
    "slowhttptest",
    "h2load",
    "nghttp2",
    "redis",
    "curl",
    "atheris",
    "mypy",
    "ruff",
    "hypothesis",
    "websockets",
    "[dev]",
    "fuzz",
    "system-deps.sh test",
]

#: The Debian packages the test path installs when missing, by the command
#: (or module check) that shows each is there.
TEST_PACKAGES = {
    "python3-venv": "python3",
    "curl": "curl",
    "redis-server": "redis-server",
    "nghttp2-client": "h2load",
    "slowhttptest": "slowhttptest",
    "valgrind": "valgrind",
}


def dryRun(target: str) -> str:
    """
    What C{make TARGET} would run on a machine with no venv yet.
    """
    result = subprocess.run(
        ["make", "-n", "-C", ROOT, target, "VENV=/nonexistent/monedge-venv"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout


class MakeTargetTests(SynchronousTestCase):
    """
    What each make target runs.
    """

    def test_runInstallsOnlyTheDemo(self) -> None:
        """
        make run creates the venv, checks only the demo's Debian needs,
        installs monedge without extras, and starts the demo: no test tool
        or dev extra is named anywhere on the way.
        """
        commands = dryRun("run")
        self.assertIn("scripts/system-deps.sh run", commands)
        self.assertIn("-m venv /nonexistent/monedge-venv", commands)
        self.assertRegex(commands, r"pip install -q \.\n")
        self.assertIn("scripts/run-demo.sh", commands)
        for word in TEST_ONLY:
            self.assertNotIn(word, commands)
        with open(os.path.join(ROOT, "scripts", "run-demo.sh"), encoding="utf-8") as f:
            demo = f.read()
        # It suggests trying the demo with curl, but runs only monedge.
        for word in set(TEST_ONLY) - {"curl"}:
            self.assertNotIn(word, demo)

    def test_testInstallsEverything(self) -> None:
        """
        make test installs the Debian test tools and the dev extras, then
        runs the suite, the fuzzing run, ruff and mypy.
        """
        commands = dryRun("test")
        for expected in [
            "scripts/system-deps.sh test",
            "pip install -q '.[dev]'",
            "-m twisted.trial tests",
            "fuzz/run.sh",
            "ruff check .",
            "ruff format --check .",
            "bin/mypy",
        ]:
            self.assertIn(expected, commands)

    def test_venvInterpreter(self) -> None:
        """
        The venv is built with the interpreter scripts/python.sh names:
        Debian's own /usr/bin/python3.11 where there is one, else python3;
        and system-deps.sh checks that one for its venv module.
        """
        chosen = subprocess.run(
            [os.path.join(ROOT, "scripts", "python.sh")],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
        expected = (
            "/usr/bin/python3.11"
            if os.path.exists("/usr/bin/python3.11")
            else "python3"
        )
        self.assertEqual(chosen, expected)
        commands = dryRun("run")
        self.assertIn(f"{chosen} -m venv /nonexistent/monedge-venv", commands)
        self.assertIn(f"PYTHON={chosen} scripts/system-deps.sh run", commands)

    def test_devToolsOnlyInTheExtras(self) -> None:
        """
        The package itself requires none of the dev tools; the dev extra
        has them.
        """
        config = configparser.ConfigParser()
        config.read(os.path.join(ROOT, "setup.cfg"))
        required = config["options"]["install_requires"].lower()
        dev = config["options.extras_require"]["dev"].lower()
        for tool in ["atheris", "mypy", "ruff", "hypothesis", "websockets"]:
            self.assertNotIn(tool, required)
            self.assertIn(tool, dev)


class SystemDepsTests(SynchronousTestCase):
    """
    scripts/system-deps.sh, run by /bin/sh with only fake commands on its
    PATH: C{id} says who runs it, C{apt-get} records what it is asked
    for, and a command is there only if the test puts it there.
    """

    def deps(
        self,
        what: str,
        uid: int,
        present: list[str] = (),  # type: ignore[assignment]
        python: str | None = None,
    ) -> tuple[int, str, list[str]]:
        """
        Run C{system-deps.sh WHAT} as user C{uid} with the commands
        C{present} (and C{PYTHON} set to C{python}, if given); its exit status, its error output, and every argument
        of every apt-get call.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        record = os.path.join(directory, "apt-get.calls")
        fakes = {
            "id": f"echo {uid}",
            "apt-get": f'echo "$@" >> {record}',
            **{command: "exit 0" for command in present},
        }
        if "python3" not in present:
            fakes["python3"] = "exit 1"
        for name, body in fakes.items():
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(f"#!/bin/sh\n{body}\n")
            os.chmod(path, stat.S_IRWXU)
        result = subprocess.run(
            ["/bin/sh", os.path.join(ROOT, "scripts", "system-deps.sh"), what],
            env={"PATH": directory, **({} if python is None else {"PYTHON": python})},
            capture_output=True,
            text=True,
            timeout=30,
        )
        try:
            with open(record) as f:
                calls = f.read().split()
        except FileNotFoundError:
            calls = []
        return result.returncode, result.stderr, calls

    def installed(self, calls: list[str]) -> set[str]:
        """
        The packages an apt-get install call asked for.
        """
        return {
            word for word in calls if re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", word)
        } - {
            "update",
            "install",
        }

    def test_runAsRootInstallsOnlyVenv(self) -> None:
        """
        As root on a machine with nothing, the run path installs
        python3-venv and nothing else.
        """
        status, _, calls = self.deps("run", 0)
        self.assertEqual(status, 0)
        self.assertEqual(self.installed(calls), {"python3-venv"})

    def test_testAsRootInstallsTheTools(self) -> None:
        """
        As root on a machine with nothing, the test path (also the
        default) installs every test tool; only the missing ones.
        """
        for args in ["test", ""]:
            status, _, calls = self.deps(args, 0)
            self.assertEqual(status, 0)
            self.assertEqual(self.installed(calls), set(TEST_PACKAGES))
        status, _, calls = self.deps("test", 0, ["python3", "curl", "valgrind"])
        self.assertEqual(
            self.installed(calls),
            {"redis-server", "nghttp2-client", "slowhttptest"},
        )

    def test_nonRootDemo(self) -> None:
        """
        As another user, the run path succeeds without apt-get when the
        demo's needs are there, whatever test tools are missing; when
        python3-venv is missing it fails naming only that.
        """
        status, error, calls = self.deps("run", 1000, ["python3"])
        self.assertEqual((status, error, calls), (0, "", []))
        status, error, calls = self.deps("run", 1000)
        self.assertEqual((status, calls), (1, []))
        self.assertIn("needs these Debian packages: python3-venv (run: sudo", error)
        for package in set(TEST_PACKAGES) - {"python3-venv"}:
            self.assertNotIn(package, error)

    def test_nonRootTestSaysWhatToInstall(self) -> None:
        """
        As another user, the test path with tools missing fails, naming
        them, instead of failing half way.
        """
        status, error, calls = self.deps("test", 1000, ["python3", "curl"])
        self.assertEqual((status, calls), (1, []))
        self.assertIn("redis-server nghttp2-client slowhttptest valgrind", error)

    def test_checksTheGivenInterpreter(self) -> None:
        """
        The venv module is looked for in the interpreter PYTHON names (the
        one make builds the venv with), not in whatever python3 is first
        on PATH: python3-venv is installed when that one lacks it, and not
        when only python3 lacks it.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        for name, code in [("good-python", 0), ("bad-python", 1)]:
            path = os.path.join(directory, name)
            with open(path, "w") as f:
                f.write(f"#!/bin/sh\nexit {code}\n")
            os.chmod(path, stat.S_IRWXU)
        for interpreter, expected in [
            ("good-python", set()),
            ("bad-python", {"python3-venv"}),
        ]:
            status, _, calls = self.deps(
                "run", 0, python=os.path.join(directory, interpreter)
            )
            self.assertEqual(status, 0)
            self.assertEqual(self.installed(calls), expected)

    def test_unknownArgument(self) -> None:
        """
        Anything but run or test is a usage error.
        """
        status, error, _ = self.deps("demo", 0)
        self.assertEqual(status, 2)
        self.assertIn("usage:", error)


class ReadmeTests(SynchronousTestCase):
    """
    README.md says what the two commands install.
    """

    def test_testPackagesListed(self) -> None:
        """
        The Test it section names exactly the Debian packages the test path
        installs; the Run it section names python3-venv as the only one.
        """
        with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
            readme = f.read()
        run = readme.split("## Run it", 1)[1].split("## Test it", 1)[0]
        test = readme.split("## Test it", 1)[1].split("## Read on", 1)[0]
        listed = set(re.findall(r"`([a-z0-9.+-]+)`", test)) & (
            set(TEST_PACKAGES) | {"h2load", "redis", "nghttp2"}
        )
        self.assertEqual(listed, set(TEST_PACKAGES))
        self.assertIn("`python3-venv`", run)
        for package in set(TEST_PACKAGES) - {"python3-venv"}:
            self.assertNotIn(f"`{package}`", run)
