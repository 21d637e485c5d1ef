#!/bin/sh
# CPU time per request of one server under wrk load, on loopback.
#
#   bench/cpu.sh PATH COMMAND...
#
# Starts bench/upstream.py on a free port pinned to CPU 1, then COMMAND
# pinned to CPU 0, with every {UPSTREAM} in it replaced by the upstream's
# port, every {PORT} by a free port for COMMAND to listen on, and every
# {REGISTRY} by a static registry file routing service.api.bench to the
# upstream.  After a 2 s warm-up it runs
# `wrk -t1 -c50 -d6s http://127.0.0.1:{PORT}PATH` (pinned to CPU 1) and
# prints the req/s and the server's CPU time (utime + stime from /proc,
# with its direct children) per request, in microseconds.  Run it from the
# repository root with the venv installed.  Examples:
#
#   bench/cpu.sh /bench/ env PYTHONPATH=. .venv/bin/twistd -n --pidfile= monedge
#       --port tcp:{PORT}:interface=127.0.0.1 --admin-port tcp:0:interface=127.0.0.1
#       --registry static:{REGISTRY} --access-log /tmp/a.log --drain-delay 0s
#   bench/cpu.sh / .venv/bin/python bench/relay.py --port {PORT} --upstream-port {UPSTREAM}
set -eu
[ $# -ge 2 ] || { sed -n '2,19p' "$0"; exit 2; }
path=$1; shift
. bench/loopback.sh
port=$(free)
startUpstream taskset -c 1
command=$(substitute "$@")
taskset -c 0 sh -c "exec $command" >/dev/null 2>&1 &
server=$!
trap 'kill $server $upstream 2>/dev/null || true; rm -f "$registry"' EXIT INT TERM
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port$path" && break; sleep 0.1; done
cpu() { for p in $server $(pgrep -P $server || true); do awk '{print $14+$15}' /proc/$p/stat 2>/dev/null; done | awk '{s+=$1} END {print s}'; }
taskset -c 1 wrk -t1 -c50 -d2s "http://127.0.0.1:$port$path" >/dev/null
before=$(cpu)
out=$(taskset -c 1 wrk -t1 -c50 -d6s "http://127.0.0.1:$port$path")
after=$(cpu)
requests=$(printf '%s\n' "$out" | awk '/requests in/ {print $1}')
rate=$(printf '%s\n' "$out" | awk '/Requests\/sec/ {print $2}')
ticks=$(getconf CLK_TCK)
echo "$rate req/s, $(awk -v a="$after" -v b="$before" -v n="$requests" -v t="$ticks" 'BEGIN {printf "%.1f", (a-b)/t/n*1e6}') us of server CPU per request"
