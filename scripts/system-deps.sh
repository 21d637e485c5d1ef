#!/bin/sh
# Installs the Debian packages monedge needs, if missing:
#
#   scripts/system-deps.sh run    what `make run` needs: python3-venv only
#   scripts/system-deps.sh test   what `make test` needs (the default): the
#                                 tools the tests, the fuzzing run and the
#                                 benchmarks drive, too
#
# Nothing is missing: it does nothing, as any user.  Something is missing:
# as root (CI, a fresh machine) it installs it with apt-get; as another
# user it says what to install and fails.
set -eu
what="${1:-test}"
missing=""
# The venv module and the pip it bootstraps (Debian splits them out), for
# the interpreter make builds the venv with.
"${PYTHON:-python3}" -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$missing python3-venv"
case "$what" in
run) ;;
test)
    command -v curl >/dev/null 2>&1 || missing="$missing curl"
    # The rate-limit hook's tests run a real Redis.
    command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
    # The HTTP/2 tests load monedge with h2load.
    command -v h2load >/dev/null 2>&1 || missing="$missing nghttp2-client"
    # The slow-client tests attack monedge with slowhttptest.
    command -v slowhttptest >/dev/null 2>&1 || missing="$missing slowhttptest"
    # bench/instructions.sh (and its test) counts instructions with callgrind.
    command -v valgrind >/dev/null 2>&1 || missing="$missing valgrind"
    ;;
*)
    echo "usage: $0 [run|test]" >&2
    exit 2
    ;;
esac
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "monedge ($what) needs these Debian packages:$missing (run: sudo apt-get install$missing)" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
