#!/bin/sh
# Starts two demo echo upstreams and monedge in front of them, on the
# embedded static registry examples/services.yaml.  Ctrl-C stops all three.
# Needs only monedge installed in $VENV (.venv): `make run` does both.
set -eu
cd "$(dirname "$0")/.."
BIN="${VENV:-.venv}/bin"
"$BIN/python" -m monedge.demo --listen tcp:9001:interface=127.0.0.1 --name echo-9001 &
ECHO1=$!
"$BIN/python" -m monedge.demo --listen tcp:9002:interface=127.0.0.1 --name echo-9002 &
ECHO2=$!
# Stopped once, when this script exits (Ctrl-C first stops monedge).
trap 'kill $ECHO1 $ECHO2 2>/dev/null || true' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
echo "monedge: try  curl localhost:30080/echo/hello   (admin: curl localhost:30081/routes)"
"$BIN/twistd" -n --pidfile= monedge --port 30080 --admin-port 30081 \
    --registry static:examples/services.yaml --drain-delay 0s
