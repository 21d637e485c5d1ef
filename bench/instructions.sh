#!/bin/sh
# Instructions per request of one server under load: a deterministic
# measure for comparing two builds, where CPU time on a shared machine
# varies by 10% or more between runs of one build.
#
#   bench/instructions.sh PATH REQUESTS COMMAND...
#
# Starts bench/upstream.py on a free port, then COMMAND under valgrind's
# callgrind with instrumentation off (every {UPSTREAM} in it replaced by
# the upstream's port, every {PORT} by a free port to listen on, and every
# {REGISTRY} by a static registry file routing service.api.bench to the
# upstream).  It warms up with h2load, switches instrumentation on, sends
# exactly REQUESTS requests over 50 keep-alive connections
# (h2load --h1 -c50), switches it off and prints the user-space
# instructions executed per request.  Kernel time (the system calls
# themselves) is not counted.  BENCH_HEADER, if set, is a header every
# request carries (for hooks that need one), as in
# BENCH_HEADER="Authorization: Bearer $token".  BENCH_H2LOAD, if set,
# replaces the load's "--h1 -c50": BENCH_H2LOAD="-c50 -m10" loads over
# HTTP/2 with prior knowledge (h2c), 50 connections of 10 streams.
# Example, from the repository root with the venv installed:
#
#   bench/instructions.sh /bench/ 2000 env PYTHONPATH=. .venv/bin/python .venv/bin/twistd
#       -n --pidfile= monedge --port tcp:{PORT}:interface=127.0.0.1 --admin-port tcp:0:interface=127.0.0.1
#       --registry static:{REGISTRY} --access-log /tmp/a.log --drain-delay 0s
set -eu
[ $# -ge 3 ] || { sed -n '2,25p' "$0"; exit 2; }
path=$1; requests=$2; shift 2
command -v valgrind >/dev/null 2>&1 && command -v h2load >/dev/null 2>&1 || scripts/system-deps.sh
. bench/loopback.sh
port=$(free)
out=$(mktemp -d)
startUpstream
command=$(substitute "$@")
sh -c "exec valgrind --tool=callgrind --trace-children=yes --instr-atstart=no --callgrind-out-file=$out/cg.out $command" >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server $upstream 2>/dev/null || true; rm -rf "$out" "$registry"' EXIT INT TERM
for _ in $(seq 600); do curl -s -m 2 -o /dev/null ${BENCH_HEADER:+-H "$BENCH_HEADER"} "http://127.0.0.1:$port$path" && break; sleep 0.5; done
curl -sf -m 10 -o /dev/null ${BENCH_HEADER:+-H "$BENCH_HEADER"} "http://127.0.0.1:$port$path" || { echo "the server does not answer $path:" >&2; cat "$out/server.log" >&2; exit 1; }
load=${BENCH_H2LOAD:---h1 -c 50}
h2load $load -n 1000 ${BENCH_HEADER:+-H "$BENCH_HEADER"} "http://127.0.0.1:$port$path" >/dev/null
callgrind_control -i on $server >/dev/null 2>&1
summary=$(h2load $load -n "$requests" ${BENCH_HEADER:+-H "$BENCH_HEADER"} "http://127.0.0.1:$port$path" | grep -E '^requests:')
callgrind_control -i off $server >/dev/null 2>&1
callgrind_control -d $server >/dev/null 2>&1
sleep 1
case $summary in *" 0 failed"*) ;; *) echo "requests failed: $summary" >&2; exit 1 ;; esac
total=$(cat "$out"/cg.out.* | awk '/^totals:/ {s+=$2} END {print s}')
echo "$summary"
echo "$(awk -v t="$total" -v n="$requests" 'BEGIN {printf "%.0f", t/n}') instructions per request (user space, $requests requests)"
