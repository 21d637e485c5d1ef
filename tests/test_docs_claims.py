"""
What the docs claim, everywhere in docs/ and README.md, the code bears
out: no text marked as stale or unwritten, every status line shown is one
monedge sends for that status, every C{--option} is one of monedge's (or
twistd's, or of a tool the line names), every module, object, file and
link named exists, and every C{monedge.io/} annotation is one monedge
reads.  tests/test_docs.py checks the docs' tables and examples; these
checks read all of their prose.

Each checker is also run on a sentence the docs once held, so that it is
seen to catch what it is for.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import cast

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel, Request
from twisted.web.test.requesthelper import DummyChannel

import tests
from monedge.rules.errors import CATALOGUE, rawErrorResponse
from monedge.rules.policy import POLICY_KEYS

#: The repository root: the parent of the tests package.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tests.__file__)))

#: Phrases that mark text as stale, unwritten or promised: each is a
#: statement the code may have overtaken.
STALE = [
    r"\bnot yet (implemented|supported|available|written|done)\b",
    r"\b(does|do) not (yet )?exist yet\b",
    r"\bnot (yet )?implemented\b",
    r"\b(is|are) (a |still )?placeholders?\b",
    r"\bplaceholder (section|text|for now)\b",
    r"\bto be (written|documented|done)\b",
    r"\b(TODO|TBD|FIXME|XXX)\b",
    r"\b(in )?(a|the) future (version|release)\b",
    r"\bcoming soon\b",
    r"\bthis version (only|reads|supports|has no|does not)\b",
    r"\bupgrades? (are|is) not (proxied|supported|carried)\b",
]

#: Options of programs other than monedge and twistd, as the docs show
#: them: each must be on a line that names its program.
FOREIGN = {
    "--http1.1": "curl",
    "--http2": "curl",
    "--latency": "wrk",
    "--h1": "h2load",
    "--rps": "h2load",
    "--log-file": "h2load",
    "--rm": "docker",
    "--target-group-arn": "aws",
    "--strict": "mypy",
    "--tree": "callgrind_annotate",
    "--enable-shared": "configure",
    "--tool": "valgrind",
    "--instr-atstart": "valgrind",
}

#: Repository paths the docs name that are not in the repository, and why.
NOT_IN_REPOSITORY = {
    "bench/results": "git-ignored: where bench/run.py writes its reports",
    "deploy/overlays/production": "the operator's own overlay, created by hand",
}


def docs() -> Iterator[tuple[str, str]]:
    """
    Each doc's path (relative to the repository) and text.
    """
    for path in [*sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))), "README.md"]:
        full = os.path.join(ROOT, path)
        with open(full, encoding="utf-8") as f:
            yield os.path.relpath(full, ROOT), f.read()


def lineOf(text: str, index: int) -> tuple[int, str]:
    """
    The line number and text of the line holding C{text[index]}.
    """
    start = text.rfind("\n", 0, index) + 1
    end = text.find("\n", index)
    return text.count("\n", 0, index) + 1, text[start : end if end >= 0 else None]


# Stale phrases


def stalePhrases(text: str) -> list[str]:
    """
    Each stale phrase in C{text}, with its line.
    """
    found = []
    for pattern in STALE:
        for match in re.finditer(pattern, text, re.IGNORECASE):
            number, line = lineOf(text, match.start())
            found.append(f"{number}: {match.group(0)!r} in {line.strip()!r}")
    return found


# Status lines


def requestReason(status: int) -> bytes:
    """
    The reason phrase Twisted's HTTP server writes for C{status}: every
    response monedge makes through a request (errors, hooks' answers,
    upstream responses) carries it.
    """
    request = Request(cast(HTTPChannel, DummyChannel()))
    request.setResponseCode(status)
    reason: bytes = request.code_message
    return reason


def refusedOnTheConnection() -> set[str]:
    """
    The error codes the front ends (monedge/edge/) write straight to the
    connection (with L{rawErrorResponse}) rather than through a request.
    """
    edge = os.path.join(ROOT, "monedge", "edge")
    source = ""
    for name in sorted(os.listdir(edge)):
        if name.endswith(".py"):
            with open(os.path.join(edge, name), encoding="utf-8") as f:
                source += f.read()
    called = r"(?:refuse|_refuse|_refuseForRequest|rawErrorResponse)\(\s*"
    codes = set(re.findall(called + r'"([a-z_]+)"', source))
    # The header deadline's code is passed on to refuse() by name.
    codes |= set(re.findall(r'"(request_timeout)"', source))
    return codes & set(CATALOGUE)


def sentReasons(status: int) -> set[str]:
    """
    Every reason phrase monedge can send with C{status}.
    """
    reasons = {requestReason(status)}
    for code in refusedOnTheConnection():
        if CATALOGUE[code][0] == status:
            head = rawErrorResponse(code, b"0").split(b"\r\n", 1)[0]
            reasons.add(head.split(b" ", 2)[2])
    return {reason.decode("ascii") for reason in reasons}


def wrongStatusLines(text: str) -> list[str]:
    """
    Each status line shown in C{text} whose reason phrase monedge never
    sends with its status.
    """
    found = []
    for match in re.finditer(
        r"HTTP/1\.[01] (\d{3}) ([A-Za-z][A-Za-z -]*[A-Za-z])", text
    ):
        status, reason = int(match.group(1)), match.group(2)
        allowed = sentReasons(status)
        if reason not in allowed:
            number, _ = lineOf(text, match.start())
            found.append(
                f"{number}: {match.group(0)!r}; monedge sends {sorted(allowed)}"
            )
    return found


# Options


def helpOptions(*args: str) -> set[str]:
    """
    The options C{twistd ARGS --help} lists, from the source tree.
    """
    environment = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from twisted.scripts.twistd import run; run()",
            *args,
            "--help",
        ],
        capture_output=True,
        text=True,
        env=environment,
        cwd=ROOT,
        timeout=60,
    )
    return set(re.findall(r"--[a-z][a-z0-9-]*[a-z0-9]", result.stdout))


def scriptOptions() -> set[str]:
    """
    The options the repository's own command-line programs declare.
    """
    found: set[str] = set()
    for path in [
        *glob.glob(os.path.join(ROOT, "bench", "*.py")),
        *glob.glob(os.path.join(ROOT, "fuzz", "*.py")),
        os.path.join(ROOT, "monedge", "demo.py"),
    ]:
        with open(path, encoding="utf-8") as f:
            found |= set(re.findall(r'add_argument\(\s*"(--[a-z0-9-]+)"', f.read()))
    return found


def unknownOptions(text: str, known: set[str]) -> list[str]:
    """
    Each C{--option} in C{text} that is not in C{known}, nor a foreign
    option on a line naming its program; C{--prefix-*} stands for the
    known options it prefixes.
    """
    found = []
    for match in re.finditer(r"(?<![\w-])--[a-z][a-z0-9.-]*[a-z0-9*]", text):
        option = match.group(0)
        number, line = lineOf(text, match.start())
        if option.endswith("*"):
            if any(k.startswith(option[:-1]) for k in known):
                continue
        elif option in known:
            continue
        elif option in FOREIGN and FOREIGN[option] in line:
            continue
        found.append(f"{number}: {option} in {line.strip()!r}")
    return found


# Modules, objects, files and links


def resolves(dotted: str) -> bool:
    """
    Whether C{dotted} names a module, or an object in one.
    """
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            thing: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                thing = getattr(thing, name)
        except AttributeError:
            return False
        return True
    return False


def missingNames(text: str) -> list[str]:
    """
    Each C{monedge.*}, C{tests.*} or C{fuzz.*} name in a code span of
    C{text} that does not resolve.
    """
    found = []
    for match in re.finditer(r"`((?:monedge|tests|fuzz)(?:\.[A-Za-z_]\w*)+)`", text):
        if not resolves(match.group(1)):
            number, _ = lineOf(text, match.start())
            found.append(f"{number}: {match.group(1)}")
    return found


_PATH = re.compile(
    r"(?<![\w./-])((?:monedge|examples|deploy|bench|scripts|fuzz|tests|docs|\.ci)"
    r"/[\w./-]*[\w])"
)


def missingPaths(text: str, where: str) -> list[str]:
    """
    Each repository path named in C{text} (a doc at C{where}) that does
    not exist, and each relative link whose file or heading does not.
    """
    found = []
    for match in _PATH.finditer(text):
        path = match.group(1)
        if any(path.startswith(p) for p in NOT_IN_REPOSITORY):
            continue
        if not os.path.exists(os.path.join(ROOT, path)):
            found.append(f"{lineOf(text, match.start())[0]}: {path}")
    for match in re.finditer(r"\]\(([^)\s]+)\)", text):
        target = match.group(1)
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        full = os.path.normpath(
            os.path.join(ROOT, os.path.dirname(where), path)
            if path
            else os.path.join(ROOT, where)
        )
        number = lineOf(text, match.start())[0]
        if not os.path.exists(full):
            found.append(f"{number}: link to {target}")
        elif anchor and full.endswith(".md") and anchor not in anchors(full):
            found.append(f"{number}: link to {target}: no such heading")
    return found


def anchors(path: str) -> set[str]:
    """
    The anchors of a Markdown file's headings, as GitHub makes them.
    """
    with open(path, encoding="utf-8") as f:
        text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    made = set()
    for heading in re.findall(r"^#+ (.*)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        made.add(slug)
    return made


def unknownAnnotations(text: str) -> list[str]:
    """
    Each C{monedge.io/KEY} annotation named in C{text} that is not one
    monedge reads.
    """
    found = []
    for match in re.finditer(r"(?<![\w-])monedge\.io/([a-z][a-z0-9-]*)", text):
        if match.group(1) not in POLICY_KEYS:
            found.append(f"{lineOf(text, match.start())[0]}: {match.group(0)}")
    return found


class DocsClaimTests(SynchronousTestCase):
    """
    Every doc's claims hold.
    """

    def assertNothing(self, check: str, found: dict[str, list[str]]) -> None:
        """
        C{found} (problems by doc) is empty; else fail listing them.
        """
        problems = [f"{path}:{p}" for path, items in found.items() for p in items]
        self.assertEqual(problems, [], f"{check}:\n" + "\n".join(problems))

    def test_noStalePhrases(self) -> None:
        """
        No doc holds a phrase marking text as stale, unwritten or promised
        ("placeholder" as a section, "not yet", "TODO", "this version
        only", "upgrades are not proxied"...).
        """
        self.assertNothing(
            "stale phrases", {path: stalePhrases(text) for path, text in docs()}
        )

    def test_statusLines(self) -> None:
        """
        Every status line shown (in a block or in prose) has a reason
        phrase monedge sends with that status: Twisted's for responses
        made through a request, errors.py's for refusals written to the
        connection.
        """
        self.assertNothing(
            "status lines", {path: wrongStatusLines(text) for path, text in docs()}
        )

    def test_options(self) -> None:
        """
        Every --option named is one of twistd monedge's (as --help lists
        them), twistd's own, one of the repository's scripts', or another
        program's on a line that names that program.
        """
        known = helpOptions("monedge") | helpOptions() | scriptOptions()
        self.assertIn("--trusted-hops", known)
        self.assertIn("--pidfile", known)
        self.assertNothing(
            "options", {path: unknownOptions(text, known) for path, text in docs()}
        )

    def test_namesResolve(self) -> None:
        """
        Every monedge.*, tests.* and fuzz.* name in a code span is a module
        or an object in one.
        """
        self.assertNothing("names", {path: missingNames(text) for path, text in docs()})

    def test_pathsAndLinksExist(self) -> None:
        """
        Every repository path named exists (or is listed as made by the
        operator or a tool), and every relative link reaches a file and,
        with an anchor, a heading in it.
        """
        self.assertNothing(
            "paths and links",
            {path: missingPaths(text, path) for path, text in docs()},
        )

    def test_annotations(self) -> None:
        """
        Every monedge.io/ annotation named is a policy key monedge reads.
        """
        self.assertNothing(
            "annotations",
            {path: unknownAnnotations(text) for path, text in docs()},
        )


class ArchitectureDocTests(SynchronousTestCase):
    """
    docs/architecture.md's layer table is the one tests/test_architecture.py
    enforces.
    """

    def test_layerTable(self) -> None:
        """
        The module table places exactly the layered modules (the packages
        whose __init__ holds only a docstring aside), each in its layer, and
        the modules said to be outside the layers are.
        """
        from tests.test_architecture import LAYERS, OUTSIDE, PACKAGES

        with open(os.path.join(ROOT, "docs", "architecture.md"), encoding="utf-8") as f:
            text = f.read()
        documented = {}
        for layer, modules in re.findall(r"^\| (\d+) \| (.*?) \|", text, re.M):
            for module in re.findall(r"`([a-z][a-z0-9.]*)`", modules):
                documented[module] = int(layer)
        self.assertEqual(
            documented, {m: n for m, n in LAYERS.items() if m not in PACKAGES}
        )
        outside = text.split("Outside the layers:", 1)[1].split("\n\n", 1)[0]
        self.assertEqual(set(re.findall(r"`([a-z]+)`", outside)), OUTSIDE)


class CheckerTests(SynchronousTestCase):
    """
    Each checker catches what the docs once said wrongly.
    """

    def test_stalePhrasesCaught(self) -> None:
        """
        The sentences docs/hooks.md and docs/convention.md held before
        they were corrected are caught; placeholders in the headers hook's
        sense, and a service that does not exist, are not.
        """
        for sentence in [
            "The `auth` and\n`ratelimit` sections are placeholders, to be written",
            "This version reads services only from the static registry file",
            "WebSocket and other protocol upgrades are not\nproxied.",
            "TODO: document this",
        ]:
            self.assertNotEqual(stalePhrases(" ".join(sentence.split())), [], sentence)
        for sentence in [
            "in which these placeholders are replaced by the request's values",
            "exactly like a service that does not exist",
            "Requests received in full and not yet answered.",
        ]:
            self.assertEqual(stalePhrases(sentence), [], sentence)

    def test_statusLinesCaught(self) -> None:
        """
        The 431 status line docs/errors.md showed is caught; the ones
        monedge sends pass, including the raw 431 and Twisted's phrase for
        a status it has none for.
        """
        self.assertNotEqual(wrongStatusLines("reads `HTTP/1.1 431 Error`"), [])
        self.assertNotEqual(wrongStatusLines("HTTP/1.1 429 Too Many Requests"), [])
        for line in [
            "HTTP/1.1 431 Request Header Fields Too Large",
            "HTTP/1.1 414 Request-URI Too Long",
            "HTTP/1.1 403 Forbidden",
            "HTTP/1.1 429 Unknown Status",
        ]:
            self.assertEqual(wrongStatusLines(line), [], line)
        self.assertIn("headers_too_large", refusedOnTheConnection())

    def test_unknownOptionCaught(self) -> None:
        """
        An option no program has is caught, and so is a foreign option on
        a line that does not name its program.
        """
        known = {"--port", "--max-header-line"}
        self.assertEqual(unknownOptions("`--port` and `--max-header-*`", known), [])
        self.assertEqual(len(unknownOptions("`--no-such-option`", known)), 1)
        self.assertEqual(len(unknownOptions("over `--http2`", known)), 1)
        self.assertEqual(unknownOptions("curl over `--http2`", known), [])

    def test_missingNamesAndPathsCaught(self) -> None:
        """
        A name, a path, a link and an anchor that do not exist are caught.
        """
        self.assertEqual(missingNames("`monedge.rules.convention.kubernetesName`"), [])
        self.assertEqual(len(missingNames("`monedge.rules.convention.noSuchThing`")), 1)
        self.assertEqual(len(missingNames("`monedge.nosuchmodule`")), 1)
        where = "docs/hooks.md"
        self.assertEqual(missingPaths("see monedge/upstream/upgrade.py", where), [])
        self.assertEqual(len(missingPaths("see monedge/websocket.py", where)), 1)
        self.assertEqual(missingPaths("[e](errors.md#codes)", where), [])
        self.assertEqual(len(missingPaths("[e](errors.md#no-such)", where)), 1)
        self.assertEqual(len(missingPaths("[e](nothing.md)", where)), 1)

    def test_unknownAnnotationCaught(self) -> None:
        """
        An annotation monedge does not read is caught.
        """
        self.assertEqual(unknownAnnotations("`monedge.io/timeout`"), [])
        self.assertEqual(len(unknownAnnotations("`monedge.io/retries`")), 1)
