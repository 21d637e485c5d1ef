# Sourced by bench/cpu.sh and bench/instructions.sh: the upstream they load
# a server against, on loopback, and the placeholders in its command line.
PY=${PY:-.venv/bin/python}

free() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# startUpstream [PREFIX...]: start bench/upstream.py on a free port ($up),
# under PREFIX (taskset, say), and wait until it answers ($upstream is its
# pid); write a static registry routing service.api.bench to it
# ($registry, for the caller to remove).
startUpstream() {
    up=$(free)
    "$@" $PY bench/upstream.py --port "$up" >/dev/null 2>&1 &
    upstream=$!
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$up/" && break; sleep 0.1; done
    registry=$(mktemp /tmp/monedge-bench-XXXXXX)
    printf 'services: {service.api.bench: {endpoints: ["127.0.0.1:%s"]}}\n' "$up" >"$registry"
}

# substitute WORD...: the words as one command line, with every {UPSTREAM}
# replaced by the upstream's port, {PORT} by $port and {REGISTRY} by the
# registry file.
substitute() {
    printf '%s\n' "$*" | sed "s/{UPSTREAM}/$up/g; s/{PORT}/$port/g; s|{REGISTRY}|$registry|g"
}
