"""
The citations in docs/security.md stay true: every test, corpus case, error
code, option and default it names is real.  The same checks run on
docs/reliability.md when that file exists.

What the checks read:

- C{`tests.module.Class.test_method`} (or a class, or a test module): a
  trial test, resolved by importing the module and looking the rest up;
- C{`someCases: case name`}: the case of that name in the table
  C{someCases()} of L{tests.corpus_cases}; in a Markdown table row, the
  row must also state the case's status (and C{status `code`}, for an
  error);
- C{NNN `code`}: an error code in L{monedge.rules.errors.CATALOGUE} with status
  NNN; any other C{`snake_case`} span must be a catalogue code or a code
  monedge writes to the access log (C{failed("...")} on a request's
  record, in its source);
- C{`--option`}: an option of L{monedge.tap.Options};
- a table with a C{Default} column and an C{Option} (or C{Set with})
  column: a C{`--option`} row's default is the option's, and a
  C{policy `key`} row's is the policy key's.
"""

from __future__ import annotations

import importlib
import inspect
import os
import re
import unittest
from collections.abc import Iterator
from types import ModuleType
from typing import TYPE_CHECKING, Any

from twisted.trial.unittest import SkipTest, SynchronousTestCase

import tests
from monedge.rules.errors import CATALOGUE
from monedge.rules.policy import DEFAULT_POLICY, POLICY_KEYS
from monedge.tap import Options
from tests import corpus_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(tests.__file__)))

#: A trial name: C{tests.} and dotted identifiers.
_TEST_NAME = re.compile(r"`(tests(?:\.[A-Za-z_][A-Za-z0-9_]*)+)`")

#: A corpus case: C{`tableCases: case name`}.
_CORPUS_CASE = re.compile(r"`([a-z][A-Za-z0-9]*Cases): ([^`]+)`")

#: A status and the error code after it: C{400 `bad_request`}.
_STATUS_CODE = re.compile(r"\b([1-5][0-9][0-9]) `([a-z][a-z0-9_]*)`")

#: A code span that looks like an error code.
_SNAKE = re.compile(r"`([a-z][a-z0-9]*(?:_[a-z0-9]+)+)`")

#: A code span that starts with an option.
_OPTION = re.compile(r"`(--[A-Za-z0-9][A-Za-z0-9-]*)")

#: A code span.
_SPAN = re.compile(r"`([^`]*)`")

#: The port the forwarding tables are built for (only their names matter).
_ANY_PORT = 30080


def readDoc(name: str) -> str | None:
    """
    The text of C{docs/NAME}, or L{None} if there is no such file.
    """
    path = os.path.join(ROOT, "docs", name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return f.read()


def testNames(text: str) -> list[str]:
    """
    Every dotted C{tests.} name in a code span, in order, repeats included.
    """
    return _TEST_NAME.findall(text)


def corpusCitations(text: str) -> list[tuple[str, str]]:
    """
    Every C{(table, case name)} cited, in order.
    """
    return [(table, name.strip()) for table, name in _CORPUS_CASE.findall(text)]


def corpusTable(name: str) -> dict[str, corpus_cases.Case]:
    """
    The cases of the table C{corpus_cases.NAME()}, by case name.

    @raise LookupError: if there is no such table.
    """
    function = getattr(corpus_cases, name, None)
    if not callable(function) or not name.endswith("Cases"):
        raise LookupError(f"tests/corpus_cases.py has no table {name}()")
    arguments = [_ANY_PORT] * len(inspect.signature(function).parameters)
    cases: list[corpus_cases.Case] = function(*arguments)
    return {case.name: case for case in cases}


def resolveTestName(name: str) -> object:
    """
    The test module, test class or test method C{name} names.

    @raise LookupError: with a reason, if it names nothing, or something
        that is not a test.
    """
    parts = name.split(".")
    module: ModuleType | None = None
    rest: list[str] = []
    for end in range(len(parts), 1, -1):
        candidate = ".".join(parts[:end])
        try:
            module = importlib.import_module(candidate)
        except ModuleNotFoundError as e:
            if e.name is not None and candidate.startswith(e.name):
                continue
            raise
        rest = parts[end:]
        break
    if module is None:
        raise LookupError(f"{name}: no such module")
    if not rest:
        if not parts[-1].startswith("test_"):
            raise LookupError(f"{name}: not a test module")
        return module
    if len(rest) > 2:
        raise LookupError(f"{name}: {'.'.join(rest)} is not Class or Class.method")
    cls = getattr(module, rest[0], None)
    if not (isinstance(cls, type) and issubclass(cls, unittest.TestCase)):
        raise LookupError(f"{name}: {rest[0]} is not a test class")
    if len(rest) == 1:
        return cls
    method = getattr(cls, rest[1], None)
    if not rest[1].startswith("test") or not callable(method):
        raise LookupError(f"{name}: {rest[1]} is not a test method")
    return method


def optionNames() -> set[str]:
    """
    Every C{twistd monedge} option, as C{--name}: the parameters and the
    C{opt_} methods (as tests/test_docs.py finds them).
    """
    names = {f"--{name}" for name, _, _, _ in Options.optParameters}
    names.update(f"--{name}" for name, _, _ in Options.optFlags)
    names.update(
        "--" + attribute[len("opt_") :].replace("_", "-")
        for attribute in vars(Options)
        if attribute.startswith("opt_")
    )
    return names


def optionDefaults() -> dict[str, str]:
    """
    Each C{twistd monedge} parameter's default, by C{--name}.
    """
    return {f"--{name}": str(default) for name, _, default, _ in Options.optParameters}


def loggedCodes() -> set[str]:
    """
    The codes monedge writes to the access log's C{error} field that are
    not error responses: every C{.failed("...")} on a record in its source.
    """
    found: set[str] = set()
    directory = os.path.join(ROOT, "monedge")
    for base, _, files in os.walk(directory):
        for file in files:
            if file.endswith(".py"):
                with open(os.path.join(base, file), encoding="utf-8") as f:
                    found.update(re.findall(r'\.failed\("([a-z_]+)"\)', f.read()))
    return found


def _cells(line: str) -> list[str]:
    # A cell may hold an escaped pipe (\|).
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]


def tables(text: str) -> Iterator[list[dict[str, str]]]:
    """
    Every Markdown table in C{text}, as rows keyed by their header cells
    (backticks removed).
    """
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        if not (lines[index].startswith("|") and index + 1 < len(lines)):
            index += 1
            continue
        if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[index + 1].strip()):
            index += 1
            continue
        header = [cell.replace("`", "") for cell in _cells(lines[index])]
        rows = []
        index += 2
        while index < len(lines) and lines[index].startswith("|"):
            rows.append(dict(zip(header, _cells(lines[index]), strict=True)))
            index += 1
        yield rows


def tableRows(text: str) -> list[str]:
    """
    Every line of a Markdown table, header and separator lines included.
    """
    return [line for line in text.splitlines() if line.startswith("|")]


if TYPE_CHECKING:
    _Base = SynchronousTestCase
else:
    _Base = object


class _CitationChecks(_Base):
    """
    The checks, for the document named by C{doc}.  A document that is not
    C{required} and does not exist is skipped.
    """

    doc = ""
    required = False

    def setUp(self) -> None:
        text = readDoc(self.doc)
        if text is None:
            if self.required:
                self.fail(f"docs/{self.doc} is missing")
            raise SkipTest(f"docs/{self.doc} does not exist yet")
        self.text = text

    def test_testNamesResolve(self) -> None:
        """
        Every dotted C{tests.} name cited is a test module, a test class or
        a test method that exists.
        """
        problems = []
        for name in sorted(set(testNames(self.text))):
            try:
                resolveTestName(name)
            except (LookupError, ImportError) as e:
                problems.append(str(e))
        self.assertEqual(problems, [], f"docs/{self.doc}")

    def test_corpusCasesExist(self) -> None:
        """
        Every corpus case cited is in its table in tests/corpus_cases.py,
        and every table cited is run by tests/test_e2e_corpus.py.
        """
        with open(os.path.join(ROOT, "tests", "test_e2e_corpus.py")) as f:
            runner = f.read()
        problems = []
        known: dict[str, dict[str, corpus_cases.Case]] = {}
        for table, name in corpusCitations(self.text):
            if table not in known:
                try:
                    known[table] = corpusTable(table)
                except LookupError as e:
                    problems.append(str(e))
                    known[table] = {}
                    continue
                if f"corpus_cases.{table}(" not in runner:
                    problems.append(f"{table}() is not run by test_e2e_corpus.py")
            if known[table] and name not in known[table]:
                problems.append(f"{table} has no case {name!r}")
        self.assertEqual(problems, [], f"docs/{self.doc}")

    def test_corpusRowsAgree(self) -> None:
        """
        A table row that cites a corpus case states that case's status, and
        for an error, its status and code together (C{400 `bad_request`}).
        """
        problems = []
        for row in tableRows(self.text):
            for table, name in corpusCitations(row):
                try:
                    case = corpusTable(table).get(name)
                except LookupError:
                    continue
                if case is None:
                    continue
                if case.code is not None:
                    if f"{case.status} `{case.code}`" not in row:
                        problems.append(
                            f"{table}: {name} is {case.status} {case.code},"
                            f" which its row does not say"
                        )
                elif not re.search(rf"\b{case.status}\b", row):
                    problems.append(
                        f"{table}: {name} is a {case.status}, which its row"
                        " does not say"
                    )
        self.assertEqual(problems, [], f"docs/{self.doc}")

    def test_errorCodesExist(self) -> None:
        """
        Every C{NNN `code`} names an error code with that status in
        monedge/rules/errors.py, and every other snake_case code span is an error
        code or a code monedge logs.
        """
        problems = []
        for status, code in _STATUS_CODE.findall(self.text):
            if code not in CATALOGUE:
                problems.append(f"{status} {code}: no such error code")
            elif CATALOGUE[code][0] != int(status):
                problems.append(f"{code} is a {CATALOGUE[code][0]}, not a {status}")
        logged = loggedCodes()
        for code in sorted(set(_SNAKE.findall(self.text))):
            if code not in CATALOGUE and code not in logged:
                problems.append(f"{code}: neither an error code nor a logged one")
        self.assertEqual(problems, [], f"docs/{self.doc}")

    def test_optionsExist(self) -> None:
        """
        Every C{`--option`} cited is an option of C{twistd monedge}.
        """
        known = optionNames()
        unknown = sorted(set(_OPTION.findall(self.text)) - known)
        self.assertEqual(unknown, [], f"docs/{self.doc}")

    def test_defaultsMatch(self) -> None:
        """
        In every table with a Default column and an Option (or Set with)
        column, the default of each C{`--option`} row is the option's, and
        that of each C{policy `key`} row the policy key's.
        """
        defaults = optionDefaults()
        problems = []
        self.checkedDefaults = 0
        for rows in tables(self.text):
            for row in rows:
                setting = row.get("Option", row.get("Set with"))
                if setting is None or "Default" not in row:
                    continue
                stated = _SPAN.findall(row["Default"])
                named = _SPAN.findall(setting)
                if not stated or not named:
                    continue
                default, name = stated[0], named[0]
                if setting.startswith("`--"):
                    self.checkedDefaults += 1
                    if defaults.get(name) != default:
                        problems.append(
                            f"{name}: the table says {default},"
                            f" the option's default is {defaults.get(name)}"
                        )
                elif setting.startswith("policy "):
                    self.checkedDefaults += 1
                    attribute, parse = POLICY_KEYS[name]
                    actual: Any = getattr(DEFAULT_POLICY, attribute)
                    if parse(default) != actual:
                        problems.append(
                            f"policy {name}: the table says {default},"
                            f" the default is {actual!r}"
                        )
        self.assertEqual(problems, [], f"docs/{self.doc}")


class SecurityDocTests(_CitationChecks, SynchronousTestCase):
    """
    docs/security.md: its citations, codes, options and limits.
    """

    doc = "security.md"
    required = True

    def test_citesEnough(self) -> None:
        """
        The patterns find what the file cites (a guard against a change of
        citation style that the checks above would silently skip): many
        tests and corpus cases, and a limits table whose defaults are
        checked.
        """
        self.assertGreater(len(set(testNames(self.text))), 100)
        self.assertGreater(len(set(corpusCitations(self.text))), 80)
        self.test_defaultsMatch()
        self.assertGreaterEqual(self.checkedDefaults, 14)


class ReliabilityDocTests(_CitationChecks, SynchronousTestCase):
    """
    docs/reliability.md, once it exists: the same checks.
    """

    doc = "reliability.md"


class ClientControlledDocTests(SynchronousTestCase):
    """
    docs/security.md lists the client-controlled family exactly as
    L{monedge.rules.headers.CLIENT_CONTROLLED} holds it.
    """

    def test_familyListed(self) -> None:
        """
        Each family's row names exactly that family's headers (in any
        case), and no family is missing or extra.
        """
        from monedge.rules.headers import CLIENT_CONTROLLED

        text = readDoc("security.md")
        assert text is not None
        rows = text.split("<!-- table: client-controlled -->", 1)[1]
        listed: dict[str, set[bytes]] = {}
        for line in rows.strip().splitlines()[2:]:
            if not line.startswith("|"):
                break
            family, headers, _ = (cell.strip() for cell in line.strip("|").split("|"))
            listed[family] = {
                span.lower().encode("ascii") for span in _SPAN.findall(headers)
            }
        from monedge.rules.headers import CLIENT_CONTROLLED_PREFIXES

        envoy = listed.pop("Envoy control")
        self.assertEqual(envoy, set(CLIENT_CONTROLLED_PREFIXES))
        self.assertEqual(
            listed, {family: set(names) for family, names in CLIENT_CONTROLLED.items()}
        )
