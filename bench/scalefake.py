"""
The helper processes of bench/scale.py, each in its own process so that
its CPU is not monedge's:

    python bench/scalefake.py fake --count N --upstream-port P --kubeconfig K
    python bench/scalefake.py upstream --port P [--port Q ...]
    python bench/scalefake.py paced --port P --rate R --duration S --routes N

C{fake} runs a L{FakeKubernetes} holding N routable Services
(C{service-api-s<i>} in namespace C{shop}) and N that are not routable
(C{service-internal-s<i>}, a tier no host serves, and C{worker-s<i>}), each
with one EndpointSlice of three endpoints (127.0.0.1, .2 and .3 on port P),
all built by L{realisticService} and L{realisticEndpointSlice}.  It writes
a kubeconfig for itself, prints one JSON line when populated, then takes
commands, one JSON object a line on stdin, and answers each with a JSON
line on stdout carrying the command's C{id}:

  - C{{"do": "relist"}}: compact the history and end every watch with a
    410 C{Expired}; answers at once (C{at}), then again (C{"event":
    "watching"}) once the client watches both kinds again, with the list
    pages it read meanwhile;
  - C{{"do": "churn", "rate": R, "seconds": S}}: R EndpointSlice updates a
    second for S seconds, cycling over every slice (routable or not) and
    flipping the third endpoint's C{ready} and C{serving}; answers when
    done with how many it made;
  - C{{"do": "move", "index": i, "port": p}}: give the slice of
    C{service-api-s<i>} the port p; answers with the time (monotonic) the
    change was applied;
  - C{{"do": "quit"}}.

C{upstream} answers every request on each of its ports, on 127.0.0.1, .2
and .3, with the port number (C{b"9000\\n"}), so a client sees which port
monedge routed to.

C{paced} is an open-loop client: R requests a second for S seconds, on
keep-alive HTTP/1.1 connections (as many as are busy, up to
C{--connections}), cycling over C{/s<i>/} in a shuffled order with
C{Host: api.example.com}; SIGUSR1 ends it early.  Each request's latency counts from the time it
was due, not from when a connection was free, so a stall shows in full.
It writes, as JSON, each request's due time (C{time.monotonic()}, shared
with the other processes), latency and status (0 for a failure).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import json
import random
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

HOST = b"api.example.com"
NAMESPACE = "shop"
ADDRESSES = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


def routableName(index: int) -> str:
    """
    The Kubernetes name of the routable Service C{index}: C{/s<index>/}.
    """
    return f"service-api-s{index}"


def otherName(index: int) -> str:
    """
    The Kubernetes name of the non-routable Service C{index}.
    """
    return f"service-internal-s{index}" if index % 2 == 0 else f"worker-s{index}"


# -- fake ---------------------------------------------------------------------


def fake(args: argparse.Namespace) -> None:
    from twisted.internet import reactor, stdio, task
    from twisted.internet.defer import Deferred
    from twisted.internet.interfaces import IReactorCore
    from twisted.protocols.basic import LineReceiver
    from twisted.web.server import Request

    from monedge.testing.kubernetes import (
        FakeKubernetes,
        _decodeContinue,
        _Selector,
        realisticEndpointSlice,
        realisticService,
    )

    class FastFake(FakeKubernetes):
        """
        L{FakeKubernetes} answering unfiltered lists from a cache of each
        object's encoding, so that a list of 20,000 Services costs the
        fake milliseconds a page, not the client's time; anything else (a
        selector, a page of a snapshot that has changed since) goes the
        ordinary way.
        """

        def __init__(self) -> None:
            super().__init__(reactor, retainEvents=args.retain)
            self._encoded: dict[tuple[str, str, str], tuple[str, bytes]] = {}
            self._sorted: dict[str, list[tuple[str, str, str]]] = {}
            self.listPages = 0

        def encoded(self, key: tuple[str, str, str]) -> bytes:
            """
            The object at C{key} as a list item, from the cache (refreshed
            when its version has changed).
            """
            obj = self._objects[key]
            version = obj["metadata"]["resourceVersion"]
            cached = self._encoded.get(key)
            if cached is None or cached[0] != version:
                item = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind")}
                cached = (version, json.dumps(item).encode())
                self._encoded[key] = cached
            return cached[1]

        def _list(
            self, request: Request, selector: _Selector, query: dict[str, list[str]]
        ) -> bytes:
            self.listPages += 1
            limit = int(query.get("limit", ["0"])[0] or 0)
            token = query.get("continue", [""])[0]
            start = ("", "")
            if token:
                rv, start = _decodeContinue(token)
                if rv != self._rv:
                    return super()._list(request, selector, query)
            if selector.requirements:
                return super()._list(request, selector, query)
            plural = selector.kind.plural
            keys = self._sorted.get(plural)
            if keys is None or len(keys) != sum(
                1 for k in self._objects if k[0] == plural
            ):
                keys = sorted(k for k in self._objects if k[0] == plural)
                self._sorted[plural] = keys
            if selector.namespace is not None:
                keys = [k for k in keys if k[1] == selector.namespace]
            first = bisect.bisect_right(keys, (plural, *start))
            chosen = keys[first : first + limit] if limit else keys[first:]
            metadata: dict[str, Any] = {"resourceVersion": str(self._rv)}
            if limit and first + limit < len(keys):
                from monedge.testing.kubernetes import _encodeContinue

                metadata["continue"] = _encodeContinue(self._rv, chosen[-1])
                metadata["remainingItemCount"] = len(keys) - first - limit
            items = [self.encoded(key) for key in chosen]
            head = json.dumps(
                {
                    "kind": selector.kind.listKind,
                    "apiVersion": selector.kind.apiVersion,
                    "metadata": metadata,
                }
            ).encode()
            request.setResponseCode(200)
            request.setHeader(b"content-type", b"application/json")
            return head[:-1] + b', "items": [' + b",".join(items) + b"]}"

    api = FastFake()
    slices: list[dict[str, Any]] = []
    routable: list[dict[str, Any]] = []
    began = time.monotonic()
    for i in range(args.count):
        for name, keep in ((routableName(i), True), (otherName(i), False)):
            api.apply(realisticService(name, NAMESPACE, i))
            piece = realisticEndpointSlice(
                name, ADDRESSES, args.upstream_port, NAMESPACE, i
            )
            api.apply(piece)
            slices.append(piece)
            if keep:
                routable.append(piece)
    # Encoded before monedge starts, as the API server's watch cache holds
    # its objects ready: the time the fake's Python takes to encode them is
    # not monedge's.
    for key in list(api._objects):
        api.encoded(key)
    api.start()
    api.writeKubeconfig(args.kubeconfig)

    def say(document: dict[str, Any]) -> None:
        out.sendLine(json.dumps(document).encode())

    async def relist(id: Any) -> None:
        pagesBefore = api.listPages
        api.compact()
        api.expireWatches()
        say({"id": id, "at": time.monotonic()})
        deadline = time.monotonic() + 120
        while api.watchCount < 2 and time.monotonic() < deadline:
            await task.deferLater(reactor, 0.005, lambda: None)
        say(
            {
                "id": id,
                "event": "watching",
                "at": time.monotonic(),
                "watches": api.watchCount,
                "listPages": api.listPages - pagesBefore,
            }
        )

    position = [0]

    async def churn(id: Any, rate: float, seconds: float) -> None:
        started = time.monotonic()
        done = 0
        while True:
            elapsed = time.monotonic() - started
            if elapsed >= seconds:
                break
            due = int(elapsed * rate) - done
            for _ in range(due):
                piece = slices[position[0] % len(slices)]
                position[0] += 1
                conditions = piece["endpoints"][2]["conditions"]
                conditions["ready"] = conditions["serving"] = not conditions["ready"]
                api.apply(piece)
            done += max(due, 0)
            await task.deferLater(reactor, 0.005, lambda: None)
        say(
            {
                "id": id,
                "updates": done,
                "seconds": time.monotonic() - started,
            }
        )

    def move(id: Any, index: int, port: int) -> None:
        piece = routable[index]
        piece["ports"][0]["port"] = port
        api.apply(piece)
        say({"id": id, "at": time.monotonic()})

    class Commands(LineReceiver):
        delimiter = b"\n"

        def lineReceived(self, line: bytes) -> None:
            command = json.loads(line)
            id, do = command.get("id"), command["do"]
            if do == "relist":
                Deferred.fromCoroutine(relist(id))
            elif do == "churn":
                Deferred.fromCoroutine(
                    churn(id, float(command["rate"]), float(command["seconds"]))
                )
            elif do == "move":
                move(id, int(command["index"]), int(command["port"]))
            elif do == "quit":
                core.stop()

        def connectionLost(self, reason: object = None) -> None:
            if core.running:
                core.stop()

    core: IReactorCore = reactor
    out = Commands()
    stdio.StandardIO(out)
    say(
        {
            "event": "ready",
            "port": api.port,
            "services": len(api._objects) // 2,
            "seconds": time.monotonic() - began,
            "serviceBytes": len(json.dumps(api.services()[0])),
            "sliceBytes": len(json.dumps(api.endpointSlices()[0])),
        }
    )
    core.run()


# -- upstream -----------------------------------------------------------------


def upstream(args: argparse.Namespace) -> None:
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    class Port(Resource):
        isLeaf = True

        def __init__(self, body: bytes) -> None:
            super().__init__()
            self.body = body

        def render(self, request: Request) -> bytes:
            return self.body

    running: Any = reactor
    for port in args.port:
        site = Site(Port(f"{port}\n".encode()))
        site.log = lambda request: None  # type: ignore[method-assign]
        for address in ADDRESSES:
            running.listenTCP(port, site, backlog=1024, interface=address)
    running.run()


# -- paced --------------------------------------------------------------------


async def _response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """
    Read one HTTP/1.1 response: its status, body, and whether the
    connection stays open.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    if b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = await reader.read()
        return status, body, False
    keep = headers.get(b"connection", b"").lower() != b"close"
    return status, body, keep


async def _paced(args: argparse.Namespace) -> dict[str, Any]:
    total = int(args.rate * args.duration)
    paths = [f"/s{i}/".encode() for i in range(args.routes)]
    random.Random(args.seed).shuffle(paths)
    due = [0.0] * total
    latency = [0.0] * total
    status = [0] * total
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    opened = [0]

    async def one(index: int) -> None:
        connection = idle.pop() if idle else None
        keep = False
        try:
            if connection is None:
                opened[0] += 1
                connection = await asyncio.open_connection("127.0.0.1", args.port)
            reader, writer = connection
            path = paths[index % len(paths)]
            writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: " + HOST + b"\r\n\r\n")
            code, _, keep = await asyncio.wait_for(_response(reader), args.timeout)
            status[index] = code
        except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError):
            status[index] = 0
        finally:
            latency[index] = time.monotonic() - due[index]
            if connection is not None:
                if keep:
                    idle.append(connection)
                else:
                    connection[1].close()

    running: set[asyncio.Task[None]] = set()
    stopped = asyncio.Event()
    # SIGUSR1 ends the run early: no request is sent after it.
    asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, stopped.set)
    start = time.monotonic() + 0.05
    sent = 0
    for index in range(total):
        if stopped.is_set():
            break
        sent += 1
        due[index] = start + index / args.rate
        wait = due[index] - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        while len(running) >= args.connections:
            # Every connection is busy: the request waits, and its latency,
            # counted from when it was due, shows it.
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        job = asyncio.ensure_future(one(index))
        running.add(job)
        job.add_done_callback(running.discard)
    if running:
        await asyncio.wait(running)
    for _, writer in idle:
        writer.close()
    return {
        "rate": args.rate,
        "duration": args.duration,
        "connectionsOpened": opened[0],
        "due": due[:sent],
        "latencyMs": [round(s * 1000, 3) for s in latency[:sent]],
        "status": status[:sent],
    }


def paced(args: argparse.Namespace) -> None:
    document = asyncio.run(_paced(args))
    Path(args.out).write_text(json.dumps(document))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    f = commands.add_parser("fake")
    f.add_argument("--count", type=int, required=True)
    f.add_argument("--upstream-port", type=int, required=True)
    f.add_argument("--kubeconfig", required=True)
    f.add_argument("--retain", type=int, default=100_000)
    u = commands.add_parser("upstream")
    u.add_argument("--port", type=int, action="append", required=True)
    p = commands.add_parser("paced")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--rate", type=float, default=1000)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--routes", type=int, required=True)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--timeout", type=float, default=10)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    {"fake": fake, "upstream": upstream, "paced": paced}[args.command](args)


if __name__ == "__main__":
    main()
