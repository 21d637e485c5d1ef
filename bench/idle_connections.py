"""
How much memory idle keep-alive client connections cost monedge.

    .venv/bin/python bench/idle_connections.py [--connections 10000]

Starts an upstream and monedge on 127.0.0.1, opens N client connections,
sends one request on each (so each is an established keep-alive connection
that has been used), keeps them all open, and reports monedge's RSS before
and after, and per connection.  Loopback only; bounded (a few seconds per
thousand connections); every process is stopped on exit.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from monedge.testing import freePort  # noqa: E402


def rss(pid: int) -> int:
    """
    The resident set size of C{pid}, in bytes.
    """
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def waitForPort(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--connections", type=int, default=10000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = args.connections + 100
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, wanted), hard))
    directory = Path(tempfile.mkdtemp(prefix="monedge-idle-"))
    upstreamPort, port, adminPort = freePort(), freePort(), freePort()
    registry = directory / "services.yaml"
    registry.write_text(
        f'services:\n  service.api.bench:\n    endpoints: ["127.0.0.1:{upstreamPort}"]\n'
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    twistd = str(Path(sys.executable).parent / "twistd")
    processes = [
        subprocess.Popen(
            [sys.executable, str(BENCH / "upstream.py"), "--port", str(upstreamPort)],
            env=env,
        ),
        subprocess.Popen(
            [
                twistd,
                "-n",
                "--pidfile=",
                "--logfile",
                str(directory / "monedge.log"),
                "monedge",
                "--port",
                f"tcp:{port}:interface=127.0.0.1:backlog=4096",
                "--admin-port",
                f"tcp:{adminPort}:interface=127.0.0.1",
                "--registry",
                f"static:{registry}",
                "--access-log",
                "none",
                "--drain-delay",
                "0s",
            ],
            env=env,
        ),
    ]
    clients: list[socket.socket] = []
    try:
        waitForPort(upstreamPort)
        waitForPort(port)
        proxy = processes[1].pid
        request = b"GET /bench/ HTTP/1.1\r\nHost: a\r\n\r\n"
        warm = socket.create_connection(("127.0.0.1", port))
        warm.sendall(request)
        warm.recv(65536)
        time.sleep(0.5)
        before = rss(proxy)
        started = time.monotonic()
        for index in range(args.connections):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(request)
            answer = s.recv(65536)
            if not answer.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"connection {index}: {answer[:80]!r}")
            clients.append(s)
        opened = time.monotonic() - started
        time.sleep(1.0)
        after = rss(proxy)
        alive = processes[1].poll() is None
        grown = after - before
        print(f"command:      {' '.join(sys.argv)}")
        print(
            f"connections:  {len(clients)} idle keep-alive (one request each), open in {opened:.1f} s"
        )
        print(
            f"monedge RSS:  {before / 2**20:.1f} MiB before, {after / 2**20:.1f} MiB after"
        )
        print(
            f"growth:       {grown / 2**20:.1f} MiB, {grown / len(clients) / 1024:.2f} KiB per connection"
        )
        print(f"monedge alive: {alive}")
    finally:
        for s in clients:
            s.close()
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    main()
