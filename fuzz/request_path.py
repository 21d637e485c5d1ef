"""
The atheris fuzz target for monedge's request path: parsing, normalisation,
the routing decision and the header policy.

Each input is the raw bytes a client sends on one connection; the
invariants are checked by L{fuzz.checker.checkRequestBytes} and a
broken one is an L{AssertionError}, which atheris reports as a crash.

From the repository root::

    .venv/bin/python fuzz/request_path.py -max_total_time=60 CORPUS_DIR

or, bounded and with the seed corpus, C{fuzz/run.sh}.
"""

from __future__ import annotations

import os
import sys

import atheris  # type: ignore[import-untyped]

#: The repository root: monedge (and the fuzz package) is imported from this
#: tree, not from an installed copy.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

with atheris.instrument_imports(include=["monedge", "twisted", "fuzz"]):
    from fuzz.checker import checkRequestBytes


def TestOneInput(data: bytes) -> None:
    """
    One fuzz input: the bytes of one client connection.
    """
    checkRequestBytes(data)


def main() -> None:
    """
    Run the fuzzer with libFuzzer's command line.
    """
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
