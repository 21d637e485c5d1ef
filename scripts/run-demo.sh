#!/bin/sh
# Starts two demo echo upstreams and monedge in front of them, on the
# embedded static registry examples/services.yaml.  Ctrl-C stops all three.
set -eu
BIN=.venv/bin
$BIN/python -m monedge.demo --listen tcp:9001:interface=127.0.0.1 --name echo-9001 &
ECHO1=$!
$BIN/python -m monedge.demo --listen tcp:9002:interface=127.0.0.1 --name echo-9002 &
ECHO2=$!
trap 'kill $ECHO1 $ECHO2 2>/dev/null || true' EXIT INT TERM
echo "monedge: try  curl localhost:30080/echo/hello   (admin: curl localhost:30081/routes)"
$BIN/twistd -n --pidfile= monedge --port 30080 --admin-port 30081 \
    --registry static:examples/services.yaml --drain-delay 0s
