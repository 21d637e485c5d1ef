"""
A real C{redis-server} for tests: started on a free 127.0.0.1 port with no
persistence, stopped after the test, and a tiny blocking client to look at
what is stored.

    redis = RedisServer(self.mktemp())
    await redis.start()
    self.addCleanup(redis.stop)
    redis.command("PTTL", "monedge:rl:...")
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import time

from twisted.internet import task
from twisted.internet.defer import Deferred

from monedge.testing import freePort

__all__ = ["REDIS_SERVER", "SKIP_REASON", "RedisServer", "RedisError"]


def _findServer() -> str | None:
    found = shutil.which("redis-server")
    if found is None and os.access("/usr/bin/redis-server", os.X_OK):
        found = "/usr/bin/redis-server"
    return found


#: The redis-server executable, or None if it is not installed.
REDIS_SERVER = _findServer()

#: Why Redis tests are skipped, or None if they can run.
SKIP_REASON = (
    None
    if REDIS_SERVER is not None
    else "redis-server is not installed (scripts/system-deps.sh installs it)"
)

Reply = int | bytes | str | None | list["Reply"]


class RedisError(Exception):
    """
    Redis answered an error.
    """


def _encode(*args: str | int | bytes) -> bytes:
    parts = [b"*%d\r\n" % (len(args),)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode("utf-8")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read(stream: io.BufferedReader) -> Reply:
    line = stream.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("the connection closed mid-reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest.decode("utf-8")
    if kind == b"-":
        raise RedisError(rest.decode("utf-8"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        length = int(rest)
        if length < 0:
            return None
        data = b""
        while len(data) < length + 2:
            chunk = stream.read(length + 2 - len(data))
            if not chunk:
                raise ConnectionError("the connection closed mid-reply")
            data += chunk
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        return None if count < 0 else [_read(stream) for _ in range(count)]
    raise ConnectionError(f"unexpected reply {line!r}")


class RedisServer:
    """
    One C{redis-server} process on C{127.0.0.1:port}.

    @param directory: where its working directory and log go.
    @param port: the port, by default a free one.
    """

    def __init__(self, directory: str, port: int | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError(SKIP_REASON)
        self.directory = os.path.abspath(directory)
        os.makedirs(self.directory, exist_ok=True)
        self.port = port or freePort()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """
        C{redis://127.0.0.1:port/0}.
        """
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self, *args: str | int | bytes, timeout: float = 2.0) -> Reply:
        """
        Send one command on a new connection; return its reply.  Blocking.

        @raise RedisError: if Redis answers an error.
        """
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(_encode(*args))
            with s.makefile("rb") as stream:
                return _read(stream)

    def _answers(self) -> bool:
        try:
            return self.command("PING", timeout=0.5) == "PONG"
        except (OSError, RedisError):
            return False

    async def start(self, timeout: float = 10.0) -> None:
        """
        Start the server; return when it answers PING.
        """
        from twisted.internet import reactor

        assert REDIS_SERVER is not None
        log = open(os.path.join(self.directory, f"redis-{self.port}.log"), "ab")
        try:
            self.process = subprocess.Popen(
                [
                    REDIS_SERVER,
                    "--port",
                    str(self.port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    self.directory,
                ],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited ({self.process.returncode}); see"
                    f" {self.directory}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"redis-server did not answer within {timeout} s")
            await task.deferLater(reactor, 0.02, lambda: None)

    def stop(self) -> Deferred[None]:
        """
        Stop the server (SIGTERM, then SIGKILL after 5 s); fire when it has
        exited.
        """
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        from twisted.internet import reactor

        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        deadline = time.monotonic() + 5.0
        while process.poll() is None:
            if time.monotonic() > deadline:
                process.kill()
                process.wait()
                return
            await task.deferLater(reactor, 0.02, lambda: None)
