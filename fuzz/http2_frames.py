"""
The atheris fuzz target for monedge's HTTP/2 server: the bytes a client
sends on one HTTP/2 connection after the client preface, fed to a real
listener connection (the protocol switch and its H2Channel, the request,
resource tree and exchange) over in-memory transports.

Each input's invariants are checked by L{fuzz.h2checker.checkFrameBytes}
and a broken one is an L{AssertionError}, which atheris reports as a
crash.

From the repository root::

    .venv/bin/python fuzz/http2_frames.py -max_total_time=30 CORPUS_DIR

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

with atheris.instrument_imports(include=["monedge", "twisted", "fuzz", "h2", "hpack"]):
    from fuzz.h2checker import checkFrameBytes


def TestOneInput(data: bytes) -> None:
    """
    One fuzz input: the bytes of one HTTP/2 connection after the preface.
    """
    checkFrameBytes(data)


def main() -> None:
    """
    Run the fuzzer with libFuzzer's command line.
    """
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
