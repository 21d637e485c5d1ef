"""
Test support for monedge and for people who extend it.

- L{MemoryRegistry}: an in-memory L{IServiceRegistry}, the fake the
  registry contract tests run against beside the real ones.
- L{FakeUpstreamClient} and L{FakeResponse}: an L{IUpstreamClient} the
  test answers by hand, for unit tests of the proxy path on a fake clock.
- L{RecordingUpstream}: a real HTTP upstream on 127.0.0.1 that records what
  it receives and answers as told.
- L{ProxyProcess}: a real C{twistd monedge} child process on loopback, with
  its ports, logs and lifecycle; L{ProxyProcess.run} for one expected to
  stop by itself (a startup that must fail), with how it L{Exited}.

And in its submodules:

- L{monedge.testing.hooks}: run hooks as monedge would, without sockets.
- L{monedge.testing.tls}: a throwaway certificate authority for test
  certificates.
- L{monedge.testing.kubernetes}: a fake Kubernetes API server the real
  C{kubernetes} client can list and watch.
- L{monedge.testing.loadbalancer}: a small health-checking HTTP load
  balancer to put in front of monedge processes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IConsumer,
    IListeningPort,
    IProtocol,
    IPushProducer,
)
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import Request as HTTPRequest
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

import monedge
from monedge.interfaces import IServiceRegistry, IUpstreamClient
from monedge.registry import Endpoint, RegistryTable, ServiceEntry, TableRegistry
from monedge.upstream.endpoints import UpstreamTLS


class QuietSite(Site):
    """
    A twisted.web L{Site} that writes no access log: an upstream for tests
    and demos, whose requests monedge's own access log already records.
    """

    def log(self, request: HTTPRequest) -> None:
        """
        Log nothing.
        """


@implementer(IServiceRegistry)
class MemoryRegistry(TableRegistry):
    """
    A registry whose table the test sets directly.

    @param ready: what L{isReady} answers until L{markReady} is called.
    """

    def __init__(self, ready: bool = True) -> None:
        self._table = RegistryTable()
        self._ready = ready
        self.reloadsSucceeded = 0
        self.reloadsFailed = 0
        self.invalidConfig = 0
        self.lastSync: float | None = None

    def isReady(self) -> bool:
        return self._ready

    def describe(self) -> Mapping[str, Any]:
        return {"kind": "memory"}

    def markReady(self) -> None:
        """
        The first sync is done.
        """
        self._ready = True

    def put(self, entry: ServiceEntry) -> None:
        """
        Add or replace a service.
        """
        self._table.put(entry)
        self.reloadsSucceeded += 1

    def remove(self, name: str) -> None:
        """
        Remove a service.
        """
        self._table.remove(name)
        self.reloadsSucceeded += 1

    def replaceAll(self, entries: Sequence[ServiceEntry]) -> None:
        """
        Make C{entries} the whole table.
        """
        self._table.replaceAll({e.name: e for e in entries})
        self.reloadsSucceeded += 1


@dataclass
class UpstreamCall:
    """
    One request made through a L{FakeUpstreamClient}.
    """

    method: bytes
    url: bytes
    headers: Headers
    body: IBodyProducer | None
    connectTimeout: float
    result: Deferred[IResponse]
    cancelled: bool = False
    tls: UpstreamTLS | None = None
    #: The service's upstream protocol (C{http1}, C{h2c}, C{h2}).
    protocol: str = "http1"
    #: Where the body went, once L{takeBody} started taking it.
    sink: BodySink | None = None

    def takeBody(self) -> BodySink:
        """
        Take the body as an upstream connection does: start producing it
        into a L{BodySink}, which collects it (and can pause it).
        """
        if self.sink is None:
            assert self.body is not None
            sink = self.sink = BodySink()
            self.body.startProducing(sink).addCallbacks(sink.finished, sink.failed)
        return sink

    def bodyBytes(self) -> bytes:
        """
        The body's bytes so far: a body held whole is read, a streamed one
        taken (L{takeBody}).
        """
        body = self.body
        content = getattr(body, "_content", None)
        if content is not None:
            data: bytes = content.getvalue()
            return data
        return b"".join(self.takeBody().data)


@implementer(IConsumer)
class BodySink:
    """
    Collects a request body written to it, as an upstream connection's
    transport would take it.

    @ivar complete: the body producer said the body is all written.
    @ivar failure: why the body producer failed, if it did.
    """

    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.complete = False
        self.failure: Failure | None = None

    def finished(self, _: object) -> None:
        self.complete = True

    def failed(self, failure: Failure) -> None:
        self.failure = failure

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.data.append(data)


@implementer(IPushProducer)
class FakeBodyTransport:
    """
    The transport a L{FakeResponse} body is delivered over: records whether
    the consumer paused or stopped it.
    """

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True


@implementer(IResponse)
class FakeResponse:
    """
    An upstream response whose body the test delivers by hand: after
    L{FakeUpstreamClient} fires with it, call L{deliver} and L{end}.
    """

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(
        self,
        code: int = 200,
        headers: Headers | None = None,
        length: int | object = UNKNOWN_LENGTH,
    ) -> None:
        self.code = code
        self.phrase = b"OK"
        self.headers = headers if headers is not None else Headers()
        self.length = length
        self.protocol: IProtocol | None = None
        self.transport = FakeBodyTransport()

    def deliverBody(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)  # type: ignore[arg-type]

    def setPreviousResponse(self, response: IResponse) -> None:
        self.previousResponse = response

    def deliver(self, data: bytes) -> None:
        """
        Deliver part of the body.
        """
        assert self.protocol is not None
        self.protocol.dataReceived(data)

    def end(self, reason: Failure | None = None) -> None:
        """
        End the body: completely by default, else with C{reason}.
        """
        assert self.protocol is not None
        self.protocol.connectionLost(reason or Failure(ResponseDone()))


@implementer(IUpstreamClient)
class FakeUpstreamClient:
    """
    An upstream client that records each request and lets the test answer
    it (C{calls[i].result.callback(FakeResponse(...))}) or fail it.
    """

    def __init__(self) -> None:
        self.calls: list[UpstreamCall] = []
        self.closed = False

    def request(
        self,
        method: bytes,
        url: bytes,
        headers: Headers,
        body: IBodyProducer | None,
        connectTimeout: float,
        tls: UpstreamTLS | None = None,
        protocol: str = "http1",
    ) -> Deferred[IResponse]:
        call: UpstreamCall

        def cancel(d: Deferred[IResponse]) -> None:
            call.cancelled = True

        result: Deferred[IResponse] = Deferred(cancel)
        call = UpstreamCall(
            method,
            url,
            headers,
            body,
            connectTimeout,
            result,
            tls=tls,
            protocol=protocol,
        )
        self.calls.append(call)
        return result

    def close(self) -> Deferred[None]:
        self.closed = True
        return defer.succeed(None)


def freePort() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Received:
    """
    One request as an upstream saw it.
    """

    method: bytes
    uri: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes

    def header(self, name: bytes) -> list[bytes]:
        """
        Every value of header C{name} (case-insensitive), in order.
        """
        lowered = name.lower()
        return [v for n, v in self.headers if n.lower() == lowered]


Responder = Callable[[Request, Received], bytes | int | None]


class _Recorder(Resource):
    isLeaf = True

    def __init__(self, responder: Responder | None) -> None:
        super().__init__()
        self.responder = responder
        self.received: list[Received] = []

    def render(self, request: Request) -> bytes | int:
        content = request.content
        body = content.read() if content is not None else b""
        seen = Received(
            method=request.method,
            uri=request.uri,
            headers=[
                (name, value)
                for name, values in request.requestHeaders.getAllRawHeaders()
                for value in values
            ],
            body=body,
        )
        self.received.append(seen)
        if self.responder is not None:
            result = self.responder(request, seen)
            if result is not None:
                return result
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(
            {"method": seen.method.decode(), "uri": seen.uri.decode("latin-1")}
        ).encode()


class RecordingUpstream:
    """
    A real HTTP/1.1 upstream on 127.0.0.1 (on the running reactor) that
    records every request and, by default, answers 200 with a JSON echo.
    C{responder(request, received)} may answer instead: return bytes,
    C{NOT_DONE_YET}, or L{None} for the default.
    """

    def __init__(self, responder: Responder | None = None) -> None:
        self._recorder = _Recorder(responder)
        self.port: IListeningPort | None = None

    @property
    def received(self) -> list[Received]:
        """
        Every request received so far.
        """
        return self._recorder.received

    def start(self, reactor: Any = None) -> int:
        """
        Listen; return the port number.
        """
        if reactor is None:
            from twisted.internet import reactor as globalReactor

            reactor = globalReactor
        site = QuietSite(self._recorder)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")
        return self.portNumber

    @property
    def portNumber(self) -> int:
        """
        The port listened on.
        """
        assert self.port is not None
        number: int = getattr(self.port.getHost(), "port")  # noqa: B009
        return number

    @property
    def address(self) -> str:
        """
        C{127.0.0.1:port}.
        """
        return f"127.0.0.1:{self.portNumber}"

    def stop(self) -> Deferred[None]:
        """
        Stop listening.
        """
        assert self.port is not None
        result = self.port.stopListening()
        if isinstance(result, Deferred):
            return result
        return defer.succeed(None)


def writeRegistry(path: str, services: Mapping[str, Mapping[str, Any]]) -> None:
    """
    Write a static registry file atomically (write, then rename), as a
    config-management tool or a Kubernetes ConfigMap update would.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(dir=directory, suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump({"services": dict(services)}, f)
    os.replace(temporary, path)


def _twistd() -> str:
    return os.path.join(os.path.dirname(sys.executable), "twistd")


#: The capabilities that let root bind ports below 1024 and ignore file
#: permissions; L{ProxyProcess} drops them for an C{unprivileged} run.
_PRIVILEGES = ("net_bind_service", "dac_override", "dac_read_search")


def unprivilegedPrefix() -> list[str] | None:
    """
    The command prefix that runs a command without the privileges to bind
    ports below 1024 or to read and write past file permissions: none for
    a user other than root; for root, C{setpriv} dropping those
    capabilities. L{None} if that is not possible here (root without
    C{setpriv}).
    """
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    dropped = ",".join(f"-{name}" for name in _PRIVILEGES)
    return [setpriv, f"--bounding-set={dropped}", f"--inh-caps={dropped}", "--"]


@dataclass
class Exited:
    """
    How a proxy process that stopped by itself ended.

    @ivar status: its exit status (negative: the signal that ended it).
    @ivar stdout: everything it wrote to standard output.
    @ivar stderr: everything it wrote to standard error.
    @ivar log: its twistd log file (empty if it never started one).
    """

    status: int
    stdout: str
    stderr: str
    log: str


class ProxyProcess:
    """
    A real C{twistd -n monedge} child process listening on 127.0.0.1.

    @param registryPath: the static registry file.
    @param args: extra C{twistd monedge} options (given last, so that they
        override the defaults, C{--port} say).
    @param directory: where its logs go.
    @param unprivileged: run it without the privileges to bind ports below
        1024 or to pass file permissions (see L{unprivilegedPrefix}).
    """

    def __init__(
        self,
        registryPath: str,
        directory: str,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        unprivileged: bool = False,
    ) -> None:
        self.registryPath = registryPath
        self.directory = directory
        self.args = list(args)
        self.env = env
        self.unprivileged = unprivileged
        self.port = freePort()
        self.adminPort = freePort()
        self.logPath = os.path.join(directory, f"monedge-{self.port}.log")
        self.accessLogPath = os.path.join(directory, f"access-{self.port}.log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """
        The proxy's base URL.
        """
        return f"http://127.0.0.1:{self.port}"

    @property
    def adminURL(self) -> str:
        """
        The admin site's base URL.
        """
        return f"http://127.0.0.1:{self.adminPort}"

    def command(self) -> list[str]:
        """
        The command line that starts the proxy.
        """
        return [
            _twistd(),
            "-n",
            "--pidfile=",
            "--logfile",
            self.logPath,
            "monedge",
            "--port",
            f"tcp:{self.port}:interface=127.0.0.1:backlog=1024",
            "--admin-port",
            f"tcp:{self.adminPort}:interface=127.0.0.1",
            "--registry",
            f"static:{self.registryPath}",
            "--access-log",
            self.accessLogPath,
            *self.args,
        ]

    def start(self) -> Deferred[None]:
        """
        Start the process; fire when C{/healthz} answers.
        """
        self._spawn()
        return self.waitFor(self._listening, 20.0, "monedge to start")

    def run(self, timeout: float = 20.0) -> Deferred[Exited]:
        """
        Start the process and fire with how it L{Exited} once it stops by
        itself: for a startup that must fail. Fail if it still runs after
        C{timeout} seconds (it is then killed).
        """
        return Deferred.fromCoroutine(self._run(timeout))

    async def _run(self, timeout: float) -> Exited:
        self._spawn()
        process = self.process
        assert process is not None
        try:
            await self.waitFor(
                lambda: process.poll() is not None, timeout, "monedge to exit"
            )
        except BaseException:
            process.kill()
            process.wait()
            raise
        assert process.returncode is not None
        return Exited(
            status=process.returncode,
            stdout=self._read(self._stdoutPath),
            stderr=self._read(self._stderrPath),
            log=self._read(self.logPath),
        )

    @property
    def _stdoutPath(self) -> str:
        return os.path.join(self.directory, f"stdout-{self.port}.log")

    @property
    def _stderrPath(self) -> str:
        return os.path.join(self.directory, f"stderr-{self.port}.log")

    @staticmethod
    def _read(path: str) -> str:
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def _spawn(self) -> None:
        command = self.command()
        if self.unprivileged:
            prefix = unprivilegedPrefix()
            if prefix is None:
                raise RuntimeError("cannot drop privileges here (no setpriv)")
            command = [*prefix, *command]
        environment = dict(os.environ)
        # The child imports monedge (and its twisted.plugins dropin) from
        # wherever this process did: the source tree under test, or the
        # installed package.
        root = os.path.dirname(os.path.dirname(os.path.abspath(monedge.__file__)))
        existing = environment.get("PYTHONPATH")
        environment["PYTHONPATH"] = root + (os.pathsep + existing if existing else "")
        if self.env:
            environment.update(self.env)
        with (
            open(self._stdoutPath, "wb") as stdout,
            open(self._stderrPath, "wb") as stderr,
        ):
            self.process = subprocess.Popen(
                command,
                cwd=self.directory,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
            )

    def _listening(self) -> bool:
        for port in (self.port, self.adminPort):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
        return True

    def waitFor(
        self, condition: Callable[[], bool], timeout: float, what: str
    ) -> Deferred[None]:
        """
        Poll C{condition} every 20 ms until it holds; fail after
        C{timeout} seconds, or at once if the process has exited.
        """
        return Deferred.fromCoroutine(self._waitFor(condition, timeout, what))

    async def _waitFor(
        self, condition: Callable[[], bool], timeout: float, what: str
    ) -> None:
        from twisted.internet import reactor

        deadline = time.monotonic() + timeout
        while not condition():
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"monedge exited ({self.process.returncode}) waiting for {what}:\n"
                    + self.log()[-3000:]
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out waiting for {what}:\n" + self.log()[-3000:]
                )
            await task.deferLater(reactor, 0.02, lambda: None)

    def log(self) -> str:
        """
        The process's operational log so far.
        """
        return "".join(
            self._read(path)
            for path in (self.logPath, self._stdoutPath, self._stderrPath)
        )

    def accessLog(self) -> list[dict[str, Any]]:
        """
        Every access-log record so far.
        """
        try:
            with open(self.accessLogPath, encoding="utf-8") as f:
                return [json.loads(line) for line in f if line.strip()]
        except OSError:
            return []

    def rss(self) -> int:
        """
        The process's resident set size, in bytes.
        """
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def signal(self, signum: int) -> None:
        """
        Send C{signum} to the process.
        """
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 40.0) -> Deferred[None]:
        """
        SIGTERM the process and fire when it has exited (SIGKILL after
        C{timeout}).
        """
        process = self.process
        if process is None or process.poll() is not None:
            return defer.succeed(None)
        process.send_signal(signal.SIGTERM)
        d = self.waitFor(lambda: process.poll() is not None, timeout, "monedge to exit")

        def kill(failure: Any) -> Any:
            process.kill()
            process.wait()
            return failure

        return d.addErrback(kill)

    def exited(self) -> bool:
        """
        Has the process exited?
        """
        return self.process is not None and self.process.poll() is not None


def endpoint(address: str) -> Endpoint:
    """
    An L{Endpoint} from C{host:port}.
    """
    host, _, port = address.rpartition(":")
    return Endpoint(host=host, port=int(port))
