#!/bin/sh
# Prints the Python that `make` builds monedge's venv with, unless
# PYTHON is given (make PYTHON=/path/to/python3.11 ...):
#
#   1. /usr/bin/python3.11, the distribution's own build where there is
#      one: Debian builds it with profile-guided optimisation and LTO and
#      links the interpreter statically.  On the same load it ran monedge
#      in 9% fewer instructions per request than a plain source build of
#      3.11 (docs/performance.md, "The interpreter");
#   2. python3, whatever it is.
#
# 3.11 first: monedge's request path runs in 11% fewer instructions on it
# than on 3.13, and 17% fewer than on 3.12 (issue 18's measure).
set -eu
for candidate in /usr/bin/python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1; then
        echo "$candidate"
        exit 0
    fi
done
echo python3
