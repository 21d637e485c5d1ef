"""
The gRPC upstream of bench/grpcunary.py: a grpcio server as fast as grpcio
makes one, so that what the bench measures is what sits in front of it.

    .venv/bin/python bench/grpcupstream.py --port PORT [--kind sync|aio]

It serves, over cleartext HTTP/2, two unary methods of the service
C{payments.v1.Payments} through a generic handler with no serializers
(raw bytes, no generated code):

  - C{Echo} answers each request's message with the same bytes, status OK;
  - C{Count} answers with the number of C{Echo} calls served so far, as
    ASCII digits, which lets the bench check that every call it counted
    reached this server.

C{--kind sync} (the default, and the faster on this repository's 2-CPU
machine) runs the handlers on a C{ThreadPoolExecutor} of C{--workers}
threads; C{--kind aio} runs them as coroutines on C{grpc.aio}.  Either
allows C{--max-streams} concurrent streams per connection.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
from collections.abc import Sequence
from concurrent import futures
from typing import Any

import grpc

SERVICE = "payments.v1.Payments"


class Counter:
    """
    The C{Echo} calls served.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._served = 0

    def served(self) -> None:
        """
        Count one call.
        """
        with self._lock:
            self._served += 1

    def total(self) -> int:
        """
        The calls counted so far.
        """
        with self._lock:
            return self._served


def handler(counter: Counter, asynchronous: bool) -> grpc.GenericRpcHandler:
    """
    The generic handler for C{Echo} and C{Count}, with coroutine methods if
    C{asynchronous}.
    """

    def echo(request: bytes, context: Any) -> bytes:
        counter.served()
        return request

    def count(request: bytes, context: Any) -> bytes:
        return str(counter.total()).encode("ascii")

    async def echoAsync(request: bytes, context: Any) -> bytes:
        return echo(request, context)

    async def countAsync(request: bytes, context: Any) -> bytes:
        return count(request, context)

    methods = {
        "Echo": grpc.unary_unary_rpc_method_handler(
            echoAsync if asynchronous else echo
        ),
        "Count": grpc.unary_unary_rpc_method_handler(
            countAsync if asynchronous else count
        ),
    }
    return grpc.method_handlers_generic_handler(SERVICE, methods)


def options(maxStreams: int) -> list[tuple[str, Any]]:
    """
    The server's channel options.
    """
    return [("grpc.max_concurrent_streams", maxStreams)]


def serveSync(port: int, workers: int, maxStreams: int) -> None:
    """
    Serve on a thread pool until killed.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), options=options(maxStreams)
    )
    server.add_generic_rpc_handlers((handler(Counter(), False),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print(f"grpcio {grpc.__version__} sync server on 127.0.0.1:{port}", flush=True)
    server.wait_for_termination()


async def serveAsync(port: int, maxStreams: int) -> None:
    """
    Serve on C{grpc.aio} until killed.
    """
    server = grpc.aio.server(options=options(maxStreams))
    server.add_generic_rpc_handlers((handler(Counter(), True),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"grpcio {grpc.__version__} aio server on 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


def main(argv: Sequence[str] | None = None) -> int:
    """
    Serve until killed.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--port", type=int, required=True, help="port to serve on")
    parser.add_argument(
        "--kind",
        choices=("sync", "aio"),
        default="sync",
        help="grpcio's thread-pool server (sync) or grpc.aio (default: sync)",
    )
    parser.add_argument(
        "--workers", type=int, default=4, help="threads of the sync server (4)"
    )
    parser.add_argument(
        "--max-streams",
        type=int,
        default=1000,
        help="concurrent streams allowed per connection (1000)",
    )
    args = parser.parse_args(argv)
    if args.kind == "sync":
        serveSync(args.port, args.workers, args.max_streams)
    else:
        asyncio.run(serveAsync(args.port, args.max_streams))
    return 0


if __name__ == "__main__":
    sys.exit(main())
