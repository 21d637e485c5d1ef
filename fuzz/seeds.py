"""
Write the fuzz target's seed corpus, generated from the raw-socket
regression corpus in C{tests/corpus_cases.py} at run time (so it can never
drift from it), plus a few well-formed requests and every crash reproducer
checked into C{fuzz/regressions/}.

    .venv/bin/python fuzz/seeds.py OUTPUT_DIR [DICTIONARY_FILE]

prints how many seeds it wrote.  With C{http2} first, it writes the HTTP/2
target's seeds instead (L{fuzz.h2checker.H2_SEEDS}, conversations built with
the h2 package's client, and the reproducers in C{fuzz/regressions/http2/})
and its dictionary:

    .venv/bin/python fuzz/seeds.py http2 OUTPUT_DIR [DICTIONARY_FILE]
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from fuzz.checker import LISTENER_PORT, writeDictionary, writeSeeds  # noqa: E402
from fuzz.h2checker import writeH2Dictionary, writeH2Seeds  # noqa: E402
from tests import corpus_cases  # noqa: E402

#: Crash reproducers found by the fuzzer, each also a named test.
REGRESSIONS = os.path.join(ROOT, "fuzz", "regressions")
H2_REGRESSIONS = os.path.join(REGRESSIONS, "http2")


def corpusCases() -> list[tuple[str, bytes]]:
    """
    Every case of the raw-socket corpus, as (name, raw bytes).
    """
    return corpus_cases.everyCase(LISTENER_PORT)


def main(argv: list[str]) -> int:
    """
    Write the seeds (and the dictionary, if a path is given).
    """
    http2 = argv[1:2] == ["http2"]
    if http2:
        argv = [argv[0], *argv[2:]]
    if len(argv) not in (2, 3):
        sys.stderr.write(f"usage: {argv[0]} [http2] OUTPUT_DIR [DICTIONARY_FILE]\n")
        return 2
    if http2:
        written = writeH2Seeds(argv[1], H2_REGRESSIONS)
    else:
        written = writeSeeds(argv[1], corpusCases(), REGRESSIONS)
    if len(argv) == 3:
        (writeH2Dictionary if http2 else writeDictionary)(argv[2])
    sys.stdout.write(f"{len(written)}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
