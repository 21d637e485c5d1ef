#!/bin/sh
# Runs the h2spec HTTP/2 conformance suite in strict mode (h2spec -S), by
# hand; it is not part of `make test` or CI.  See docs/h2spec.md.
#
#   scripts/h2spec.sh [monedge] [ARGS...]   (the default) start an echo
#       upstream and this tree's monedge on loopback, with a throwaway
#       certificate on its TLS listener (ALPN h2), run
#       `h2spec -S -t -k -P /echo/ ARGS` against it, print the summary line
#       and stop both.  Logs stay in $H2SPEC_HOME/last-run/.
#   scripts/h2spec.sh target HOST PORT [ARGS...]   run `h2spec -S -h HOST
#       -p PORT ARGS` against a server already running (add -t -k for TLS).
#   scripts/h2spec.sh build   only build h2spec, and print its path.
#
# ARGS go to h2spec as they are: spec IDs to run a part (http2/6.5,
# hpack/2.3.3/1), -v, -o SECONDS, -j REPORT.xml...
#
# h2spec is built once (again when its checkout moves to another commit)
# from the checkout at $H2SPEC_SRC, default $H2SPEC_HOME/src, get it with
#   git clone https://github.com/summerwind/h2spec "$H2SPEC_HOME/src"
# with Debian's Go in GOPATH mode: its Go dependencies are Debian's
# golang-*-dev packages under /usr/share/gocode, nothing is downloaded.
# Missing Debian packages are installed with apt-get as root; another user
# is told what to install.
#
# Environment: H2SPEC_HOME (default ~/.cache/monedge-h2spec: the build, the
# binary, the last run's logs), H2SPEC_SRC, VENV (default .venv: the venv
# whose Python and twistd run monedge; monedge itself comes from this tree).
#
# Exit status: h2spec's (0 when every test passed).
set -eu
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
H2SPEC_HOME="${H2SPEC_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/monedge-h2spec}"
H2SPEC_SRC="${H2SPEC_SRC:-$H2SPEC_HOME/src}"
# The commit docs/h2spec.md records a run of; another one builds, too.
TESTED_COMMIT=af83a65f0b6273ef38bf778d400d98892e7653d8
BIN="${VENV:-.venv}/bin"
H2SPEC="$H2SPEC_HOME/bin/h2spec"

# Debian packages: Go, and the -dev packages of h2spec's imports
# (github.com/fatih/color, github.com/spf13/cobra, golang.org/x/net/http2
# and http2/hpack); they pull in pflag, x/sys, x/text, go-colorable and
# go-isatty.
BUILD_PACKAGES="golang-go golang-github-fatih-color-dev golang-github-spf13-cobra-dev golang-golang-x-net-dev"

# Installs the Debian packages given, if missing (as system-deps.sh does).
systemDeps() {
    missing=""
    for package in "$@"; do
        dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q ' installed$' ||
            missing="$missing $package"
    done
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        echo "h2spec needs these Debian packages:$missing (run: sudo apt-get install --no-install-recommends$missing)" >&2
        exit 1
    fi
    apt-get update -qq
    # shellcheck disable=SC2086 # one word a package
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
}

build() {
    if [ ! -d "$H2SPEC_SRC/cmd/h2spec" ]; then
        echo "no h2spec source in $H2SPEC_SRC: git clone https://github.com/summerwind/h2spec \"$H2SPEC_SRC\" (or set H2SPEC_SRC)" >&2
        exit 1
    fi
    commit="$(git -C "$H2SPEC_SRC" rev-parse HEAD)"
    if [ -x "$H2SPEC" ] && [ "$(cat "$H2SPEC.commit" 2>/dev/null)" = "$commit" ]; then
        return 0
    fi
    # shellcheck disable=SC2086 # one word a package
    systemDeps $BUILD_PACKAGES
    [ "$commit" = "$TESTED_COMMIT" ] ||
        echo "h2spec: building $commit; the notes record $TESTED_COMMIT" >&2
    # GOPATH mode: the checkout is linked in at its import path, the
    # dependencies are Debian's.
    gopath="$H2SPEC_HOME/gopath"
    mkdir -p "$gopath/src/github.com/summerwind" "$H2SPEC_HOME/bin"
    rm -f "$gopath/src/github.com/summerwind/h2spec"
    ln -s "$(cd "$H2SPEC_SRC" && pwd)" "$gopath/src/github.com/summerwind/h2spec"
    version="$(sed -n 's/^VERSION=//p' "$H2SPEC_SRC/Makefile")"
    (
        cd "$gopath/src/github.com/summerwind/h2spec"
        GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" GOPROXY=off \
            GOCACHE="$H2SPEC_HOME/gocache" CGO_ENABLED=0 GOFLAGS='' \
            go build -ldflags "-X main.VERSION=$version -X main.COMMIT=$commit" \
            -o "$H2SPEC.new" ./cmd/h2spec
    )
    mv "$H2SPEC.new" "$H2SPEC"
    echo "$commit" >"$H2SPEC.commit"
    echo "h2spec: built $("$H2SPEC" --version)" >&2
}

# A free loopback port (another process may take it before we bind it).
freePort() {
    "$BIN/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Wait up to 20 s for something to accept connections on 127.0.0.1:$1.
waitFor() {
    "$BIN/python" - "$1" <<'EOF'
import socket, sys, time
deadline = time.monotonic() + 20
while True:
    try:
        socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"nothing listens on 127.0.0.1:{sys.argv[1]}")
        time.sleep(0.1)
EOF
}

stopAll() {
    for pid in $PIDS; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in $PIDS; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=""
}

againstMonedge() {
    # openssl makes the throwaway certificate.
    systemDeps openssl
    run="$H2SPEC_HOME/last-run"
    rm -rf "$run"
    mkdir -p "$run/tls"
    # A throwaway self-signed certificate; default.pem serves clients
    # without SNI (h2spec sends none for an IP address).
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$run/key.pem" -out "$run/cert.pem" -days 1 -subj /CN=localhost \
        -addext subjectAltName=DNS:localhost,IP:127.0.0.1 2>/dev/null
    cat "$run/key.pem" "$run/cert.pem" >"$run/tls/default.pem"
    upstreamPort="$(freePort)"
    port="$(freePort)"
    adminPort="$(freePort)"
    tlsPort="$(freePort)"
    cat >"$run/services.yaml" <<EOF
services:
  service.api.echo:
    endpoints: ["127.0.0.1:$upstreamPort"]
EOF
    PIDS=""
    trap stopAll EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    PYTHONPATH="$ROOT" "$BIN/python" -m monedge.demo \
        --listen "tcp:$upstreamPort:interface=127.0.0.1" --name echo >"$run/upstream.log" 2>&1 &
    PIDS="$PIDS $!"
    PYTHONPATH="$ROOT" "$BIN/twistd" -n --pidfile= --logfile "$run/monedge.log" monedge \
        --port "tcp:$port:interface=127.0.0.1" \
        --admin-port "tcp:$adminPort:interface=127.0.0.1" \
        --tls-port "tcp:$tlsPort:interface=127.0.0.1" --tls-dir "$run/tls" \
        --registry "static:$run/services.yaml" --access-log "$run/access.log" \
        --drain-delay 0s --drain-timeout 5s &
    PIDS="$PIDS $!"
    waitFor "$upstreamPort"
    waitFor "$tlsPort"
    # h2spec's requests (GET and POST to /echo/) reach the echo upstream.
    status=0
    "$H2SPEC" -S -t -k -h 127.0.0.1 -p "$tlsPort" -P /echo/ "$@" >"$run/h2spec.txt" 2>&1 || status=$?
    stopAll
    cat "$run/h2spec.txt"
    echo
    echo "h2spec $(cat "$H2SPEC.commit") against monedge $(git rev-parse --short HEAD 2>/dev/null || echo '?'):" \
        "$(grep -aE '^[0-9]+ tests, ' "$run/h2spec.txt" || echo 'no summary line')"
    echo "logs: $run"
    return "$status"
}

case "${1:-monedge}" in
build)
    build
    echo "$H2SPEC"
    ;;
target)
    [ $# -ge 3 ] || {
        echo "usage: $0 target HOST PORT [H2SPEC-ARGS...]" >&2
        exit 2
    }
    host="$2"
    port="$3"
    shift 3
    build
    exec "$H2SPEC" -S -h "$host" -p "$port" "$@"
    ;;
monedge)
    [ $# -eq 0 ] || shift
    build
    againstMonedge "$@"
    ;;
*)
    build
    againstMonedge "$@"
    ;;
esac
