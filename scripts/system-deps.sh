#!/bin/sh
# Installs the Debian packages monedge's tests and demo need, if missing.
# Runs as root on CI and the project's machines; elsewhere, it says what to
# install instead of failing half way.
set -eu
missing=""
command -v curl >/dev/null 2>&1 || missing="$missing curl"
# The rate-limit hook's tests run a real Redis.
command -v redis-server >/dev/null 2>&1 || missing="$missing redis-server"
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing="$missing python3-venv"
# The HTTP/2 tests load monedge with h2load.
command -v h2load >/dev/null 2>&1 || missing="$missing nghttp2-client"
# The slow-client tests attack monedge with slowhttptest.
command -v slowhttptest >/dev/null 2>&1 || missing="$missing slowhttptest"
# bench/instructions.sh (and its test) counts instructions with callgrind.
command -v valgrind >/dev/null 2>&1 || missing="$missing valgrind"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "monedge needs these Debian packages:$missing (run: sudo apt-get install$missing)" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
