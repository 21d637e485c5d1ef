#!/bin/sh
# Instructions per request of one server under load: a deterministic
# measure for comparing two builds, where CPU time on a shared machine
# varies by 10% or more between runs of one build.
#
#   bench/instructions.sh PATH REQUESTS COMMAND...
#
# Starts bench/upstream.py on a free port, then COMMAND under valgrind's
# callgrind with instrumentation off (every {UPSTREAM} in it replaced by
# the upstream's port and every {PORT} by a free port to listen on).  It
# warms up with h2load, switches instrumentation on, sends exactly
# REQUESTS requests over 50 keep-alive connections (h2load --h1 -c50),
# switches it off and prints the user-space instructions executed per
# request.  Kernel time (the system calls themselves) is not counted.
# Example, from the repository root with the venv installed:
#
#   bench/instructions.sh /bench/ 2000 env PYTHONPATH=. .venv/bin/python
#       .venv/bin/twistd -n --pidfile= monedge --port tcp:{PORT}:interface=127.0.0.1
#       --admin-port tcp:0:interface=127.0.0.1 --registry static:bench/bench.yaml
#       --access-log /tmp/a.log --drain-delay 0s
set -eu
[ $# -ge 3 ] || { sed -n '2,21p' "$0"; exit 2; }
path=$1; requests=$2; shift 2
PY=${PY:-.venv/bin/python}
command -v valgrind >/dev/null 2>&1 && command -v h2load >/dev/null 2>&1 || scripts/system-deps.sh
free() { $PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
up=$(free); port=$(free)
out=$(mktemp -d)
$PY bench/upstream.py --port "$up" >/dev/null 2>&1 &
upstream=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$up/" && break; sleep 0.1; done
command=$(printf '%s\n' "$*" | sed "s/{UPSTREAM}/$up/g; s/{PORT}/$port/g")
sh -c "exec valgrind --tool=callgrind --trace-children=yes --instr-atstart=no --callgrind-out-file=$out/cg.out $command" >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server $upstream 2>/dev/null || true; rm -rf "$out"' EXIT INT TERM
for _ in $(seq 600); do curl -s -m 2 -o /dev/null "http://127.0.0.1:$port$path" && break; sleep 0.5; done
h2load --h1 -n 1000 -c 50 "http://127.0.0.1:$port$path" >/dev/null
callgrind_control -i on $server >/dev/null 2>&1
summary=$(h2load --h1 -n "$requests" -c 50 "http://127.0.0.1:$port$path" | grep -E '^requests:')
callgrind_control -i off $server >/dev/null 2>&1
callgrind_control -d $server >/dev/null 2>&1
sleep 1
total=$(cat "$out"/cg.out.* | awk '/^totals:/ {s+=$2} END {print s}')
echo "$summary"
echo "$(awk -v t="$total" -v n="$requests" 'BEGIN {printf "%.0f", t/n}') instructions per request (user space, $requests requests)"
