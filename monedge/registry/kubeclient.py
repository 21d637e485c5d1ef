"""
The Kubernetes API through the official C{kubernetes} client:
L{KubernetesClientAPI}, the real L{IKubernetesAPI}.

The client blocks, so every list and every watch runs in a thread pool of
its own, and what it learns (a list, each watch event, how a watch ended)
is handed to the reactor thread.  Lists are read in pages; a watch asks
for bookmarks and for the server to end it after C{watchTimeout} seconds.

A L{monedge.registry.kubeapi.Compactor} given with a list or watch runs in
the pool thread, right after each page or event is decoded: the raw
objects never reach the reactor thread, and the dropped ones cost it
nothing.  Watch events are handed over in batches: one reactor call for all
the events decoded since the last one was run, in order.  L{run} lends the
pool to other work that must stay off the reactor (the registry's relist
diff).

Requests go through the client's C{ApiClient} (its configuration,
credentials, TLS and connection pool), built from the resource paths
below; importing the client's C{CoreV1Api} and C{DiscoveryV1Api} modules,
which monedge would use four methods of, costs about 0.4 s of CPU at
startup.

    v1 Services                        /api/v1[/namespaces/NS]/services
    discovery.k8s.io/v1 EndpointSlices /apis/discovery.k8s.io/v1[/namespaces/NS]/endpointslices

The first list of each kind in each namespace (the startup sync) asks for
its next page as soon as this page's C{continue} token is read, before its
items are decoded, so that the server's time to produce a page overlaps
monedge's time to decode the last one; later lists, which run beside
traffic, read one page at a time.
"""

from __future__ import annotations

import gc
import json
import re
import socket
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from monedge.interfaces import IKubernetesAPI
from monedge.registry.kubeapi import (
    ENDPOINT_SLICES,
    SERVICES,
    Compactor,
    KubernetesAPIError,
    ObjectList,
    ResourceExpired,
    WatchEvent,
    compactEvent,
)

__all__ = ["KubernetesClientAPI", "apiClientFromConfig", "decodeList"]

T = TypeVar("T")


#: Each kind's collection: in every namespace, and in one.
_PATHS = {
    SERVICES: ("/api/v1/services", "/api/v1/namespaces/{namespace}/services"),
    ENDPOINT_SLICES: (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices",
    ),
}


def _refusal(status: int | None, reason: object) -> KubernetesAPIError:
    """
    A refusal (an HTTP status, or the client's C{0} for no answer) as an
    L{IKubernetesAPI} failure.
    """
    if status == 410:
        return ResourceExpired(str(reason))
    return KubernetesAPIError(int(status or 0), str(reason))


def _continue(metadata: dict[str, Any]) -> str | None:
    """
    A list page's C{continue} token, or L{None} on the last page.
    """
    token = metadata.get("continue")
    return token if isinstance(token, str) and token else None


class _CollectionPause:
    """
    The cyclic garbage collector held off while any list page is decoded.

    Decoding a page allocates tens of thousands of dicts and lists, which
    set off a young collection every L{gc.get_threshold} allocations; each
    one traverses every young object, the page's included, for 15 to 40 ms
    (measured at 10,000 Services), holding the interpreter while the
    reactor thread waits.  JSON values make no reference cycles, and what
    the page does not keep dies by reference count, so those collections
    find nothing.  The process's other cycles wait for the page to be
    decoded (about 20 ms for 500 Services), not for the server.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pages = 0
        self._wasEnabled = False

    @contextmanager
    def paused(self) -> Iterator[None]:
        """
        Decode a page: the first page to start decoding turns the
        collector off, and the last to finish turns it back on, if it was
        on before.
        """
        with self._lock:
            if not self._pages:
                self._wasEnabled = gc.isenabled()
                gc.disable()
            self._pages += 1
        try:
            yield
        finally:
            with self._lock:
                self._pages -= 1
                if not self._pages and self._wasEnabled:
                    gc.enable()


_collection = _CollectionPause()


class _PageAhead:
    """
    The next page of a list, fetched in a thread of its own while the
    list's thread decodes this one.  The thread is a daemon, as the pool's
    are, and its fetch is bounded by the list's request timeout.
    """

    def __init__(self, fetch: Callable[[str], bytes], token: str) -> None:
        self._data = b""
        self._error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run,
            args=(fetch, token),
            name="monedge-kubernetes-page",
            daemon=True,
        )
        self._thread.start()

    def _run(self, fetch: Callable[[str], bytes], token: str) -> None:
        try:
            self._data = fetch(token)
        except BaseException as e:
            self._error = e

    def join(self) -> None:
        """
        Wait for the fetch to end, whatever its result.
        """
        self._thread.join()

    def result(self) -> bytes:
        """
        The page, once fetched.

        @raise BaseException: what the fetch raised.
        """
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._data


def _streamError(status: object) -> KubernetesAPIError:
    """
    The failure an C{ERROR} event's C{Status} object stands for.
    """
    fields = status if isinstance(status, dict) else {}
    reason = f"{fields.get('reason')}: {fields.get('message')}"
    code = fields.get("code")
    if code == 410:
        return ResourceExpired(reason)
    return KubernetesAPIError(code if isinstance(code, int) else 0, reason)


class _Stream:
    """
    One watch's connection, which the reactor thread may stop while a pool
    thread reads it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._response: Any = None
        self.stopped = False

    def attach(self, response: Any) -> bool:
        """
        The watch's response arrived (in the pool thread): keep it, or
        shut it at once if the watch was stopped meanwhile.
        """
        with self._lock:
            if not self.stopped:
                self._response = response
                return True
        _shutdown(response)
        return False

    def stop(self) -> None:
        """
        Stop the watch (on the reactor thread): the reading thread's
        blocked read ends at once.
        """
        with self._lock:
            self.stopped = True
            response, self._response = self._response, None
        if response is not None:
            _shutdown(response)


def _shutdown(response: Any) -> None:
    """
    Shut a response's socket down, so that a read blocked on it returns
    (closing it from another thread would not wake the reader).
    """
    connection = getattr(response, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


#: The most watch events one reactor call delivers (see L{_Batch}).
EVENTS_PER_TURN = 100


class _Batch:
    """
    A watch's events on their way from its pool thread to the reactor
    thread: one reactor call delivers the events queued before it runs, in
    order, so a burst costs the reactor one wake-up, not one per event; at
    most L{EVENTS_PER_TURN} of them, the rest in the next reactor turn, so
    a burst never holds the reactor long.  Once the watch has ended
    (L{close}), nothing more is delivered: the next watch resumes from the
    last event delivered, so what was left is heard again.
    """

    def __init__(
        self,
        reactor: IReactorFromThreads,
        stream: _Stream,
        receive: Callable[[WatchEvent], None],
    ) -> None:
        self._reactor = reactor
        self._stream = stream
        self._receive = receive
        self._lock = threading.Lock()
        self._queue: deque[WatchEvent] = deque()
        self._scheduled = False
        self._closed = False

    def close(self) -> None:
        """
        The watch ended (on the reactor thread): deliver nothing more.
        """
        self._closed = True

    def add(self, event: WatchEvent) -> None:
        """
        Queue C{event} (in the pool thread).  The call that delivers it is
        scheduled before the thread's call returns, so every event arrives
        before the watch's end does.
        """
        with self._lock:
            self._queue.append(event)
            if self._scheduled:
                return
            self._scheduled = True
        self._reactor.callFromThread(self._deliver)

    def _deliver(self) -> None:
        """
        Deliver every queued event (on the reactor thread), unless the watch
        was stopped.
        """
        with self._lock:
            queue = self._queue
            count = min(len(queue), EVENTS_PER_TURN)
            events = [queue.popleft() for _ in range(count)]
            more = bool(queue)
            self._scheduled = more
        if more:
            # The rest in the next turn (a call queued from the reactor
            # thread runs in the next iteration).
            self._reactor.callFromThread(self._deliver)
        for event in events:
            if self._stream.stopped or self._closed:
                return
            self._receive(event)


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def decodeList(data: bytes | str) -> Iterator[tuple[str, Any]]:
    """
    A list's JSON document, one piece at a time: C{("items", item)} for
    each item, in order, and C{(key, value)} for each other top-level
    member.

    Each item is decoded alone (one short C call), and can be compacted
    and dropped before the next is decoded: a page of large objects never
    holds the GIL in one long call, as C{json.loads} of the whole page
    would, stalling the reactor thread; nor is it alive all at once, which
    would push it into the collector's older generations and trigger full
    collections.

    @raise ValueError: if C{data} is not a JSON object.
    """
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    decoder = _DECODER

    def skip(index: int) -> int:
        match = _WHITESPACE.match(text, index)
        assert match is not None
        return match.end()

    def expect(index: int, character: str) -> int:
        index = skip(index)
        if text[index : index + 1] != character:
            raise ValueError(f"expected {character!r} at {index}")
        return index + 1

    index = expect(0, "{")
    if text[skip(index) : skip(index) + 1] == "}":
        return
    while True:
        key, index = decoder.raw_decode(text, skip(index))
        if not isinstance(key, str):
            raise ValueError(f"expected a member name at {index}")
        index = skip(expect(index, ":"))
        if key == "items" and text[index : index + 1] == "[":
            index = skip(index + 1)
            if text[index : index + 1] == "]":
                index += 1
            else:
                while True:
                    item, index = decoder.raw_decode(text, index)
                    yield key, item
                    index = skip(index)
                    if text[index : index + 1] == "]":
                        index += 1
                        break
                    index = skip(expect(index, ","))
        else:
            value, index = decoder.raw_decode(text, index)
            yield key, value
        index = skip(index)
        if text[index : index + 1] == "}":
            return
        index = expect(index, ",")


_DECODER = json.JSONDecoder()


def _daemonThread(*args: Any, **kwargs: Any) -> threading.Thread:
    """
    Pool threads are daemons: one stuck in a read must not keep the
    process alive after the reactor stops.
    """
    return threading.Thread(*args, daemon=True, **kwargs)


@implementer(IKubernetesAPI)
class KubernetesClientAPI:
    """
    L{IKubernetesAPI} on the official C{kubernetes} client, in threads.

    @param apiClient: a C{kubernetes.client.ApiClient}.
    @param reactor: where results are delivered.
    @param watchTimeout: the seconds after which the server is asked to end
        each watch (C{timeoutSeconds}).
    @param requestTimeout: the seconds to connect, and for a list to wait
        for each page; a watch may be silent for C{watchTimeout} + 30 s.
    @param pageSize: the objects asked for in each page of a list.
    @param maxThreads: how many lists and watches may run at once (a
        watch holds its thread while it lasts); calls beyond wait.
    """

    def __init__(
        self,
        apiClient: Any,
        reactor: IReactorFromThreads,
        watchTimeout: float = 60.0,
        requestTimeout: float = 10.0,
        pageSize: int = 500,
        maxThreads: int = 16,
    ) -> None:
        self._reactor = reactor
        self._apiClient = apiClient
        #: The (kind, namespace) pairs listed once already.
        self._listed: set[tuple[str, str | None]] = set()
        self.watchTimeout = watchTimeout
        self.requestTimeout = (min(5.0, requestTimeout), requestTimeout)
        self.watchRequestTimeout = (min(5.0, requestTimeout), watchTimeout + 30.0)
        self.pageSize = pageSize
        self.maxThreads = maxThreads
        self._pool: ThreadPool | None = None
        self._operations: set[Deferred[Any]] = set()
        self._inFlight = 0
        self._idle: list[Deferred[None]] = []

    # IKubernetesAPI

    def listObjects(
        self,
        kind: str,
        namespace: str | None,
        labelSelector: str | None = None,
        compact: Compactor | None = None,
    ) -> Deferred[ObjectList]:
        stopped = threading.Event()
        return self._operation(
            lambda: self._list(kind, namespace, stopped, labelSelector, compact),
            stopped.set,
        )

    def watchObjects(
        self,
        kind: str,
        namespace: str | None,
        resourceVersion: str,
        receive: Callable[[WatchEvent], None],
        labelSelector: str | None = None,
        compact: Compactor | None = None,
    ) -> Deferred[None]:
        stream = _Stream()
        batch = _Batch(self._reactor, stream, receive)
        return self._operation(
            lambda: self._watch(
                kind, namespace, resourceVersion, stream, batch, labelSelector, compact
            ),
            stream.stop,
            batch.close,
        )

    # Off the reactor

    def run(self, call: Callable[[], T]) -> Deferred[T]:
        """
        Run C{call} in this API's pool (C{close} waits for it too); the
        L{Deferred} fires with its result, on the reactor thread.
        """
        return self._inThread(call)

    # Lifecycle

    def close(self) -> Deferred[None]:
        """
        Stop every watch and abandon every list (their L{Deferred}s fail
        with L{CancelledError}); fire once every pool thread's call has
        returned, and the pool is stopped.  A list blocked on a silent
        server returns within C{requestTimeout}.
        """
        for operation in list(self._operations):
            operation.cancel()
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        if self._inFlight:
            waiter: Deferred[None] = Deferred()
            self._idle.append(waiter)
            await waiter
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()

    # On the reactor thread

    def _operation(
        self,
        call: Callable[[], T],
        stop: Callable[[], None],
        ended: Callable[[], None] | None = None,
    ) -> Deferred[T]:
        """
        Run C{call} in the pool; the L{Deferred} returned has its result,
        and cancelling it calls C{stop} (in this thread) and fails it at
        once, whatever the pool thread is doing.  C{ended}, if given, is
        called just before the result is given.
        """
        outer: Deferred[T] = Deferred(lambda _: stop())
        self._operations.add(outer)

        def forget(result: object) -> object:
            self._operations.discard(outer)
            return result

        outer.addBoth(forget)

        def settle(result: T | Failure) -> None:
            if ended is not None:
                ended()
            if not outer.called:
                if isinstance(result, Failure):
                    outer.errback(result)
                else:
                    outer.callback(result)

        self._inThread(call).addBoth(settle)
        return outer

    def _inThread(self, call: Callable[[], T]) -> Deferred[T]:
        if self._pool is None:
            pool = ThreadPool(
                minthreads=0, maxthreads=self.maxThreads, name="monedge-kubernetes"
            )
            pool.threadFactory = _daemonThread  # type: ignore[assignment]
            pool.start()
            self._pool = pool
        self._inFlight += 1
        d = deferToThreadPool(self._reactor, self._pool, call)

        def returned(result: object) -> object:
            self._inFlight -= 1
            if not self._inFlight:
                idle, self._idle = self._idle, []
                for waiter in idle:
                    waiter.callback(None)
            return result

        d.addBoth(returned)
        return d

    # In a pool thread

    def _get(
        self,
        kind: str,
        namespace: str | None,
        query: list[tuple[str, str]],
        timeout: tuple[float, float],
    ) -> Any:
        """
        GET C{kind}'s collection (in C{namespace}, or in all of them) with
        C{query}: the client's C{urllib3} response, its body not yet read.

        @raise KubernetesAPIError: if the server refused, or could not be
            reached.
        """
        from kubernetes.client.exceptions import ApiException

        every, one = _PATHS[kind]
        client = self._apiClient
        request = client.param_serialize(
            method="GET",
            resource_path=every if namespace is None else one,
            path_params={} if namespace is None else {"namespace": namespace},
            query_params=query,
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            response = client.call_api(*request, _request_timeout=timeout)
        except ApiException as e:
            raise _refusal(e.status, e.reason) from None
        raw = response.response
        if not 200 <= response.status <= 299:
            try:
                response.read()
            finally:
                raw.release_conn()
            raise _refusal(response.status, response.reason)
        return raw

    def _list(
        self,
        kind: str,
        namespace: str | None,
        stopped: threading.Event,
        labelSelector: str | None,
        compact: Compactor | None,
    ) -> ObjectList:
        query = [("limit", str(self.pageSize))]
        if labelSelector is not None:
            query.append(("labelSelector", labelSelector))

        def fetch(token: str | None) -> bytes:
            if stopped.is_set():
                raise CancelledError()
            extra = [("continue", token)] if token else []
            response = self._get(kind, namespace, query + extra, self.requestTimeout)
            try:
                return bytes(response.data)
            finally:
                response.release_conn()

        # Only the first list of a kind in a namespace reads ahead: before
        # the first sync no traffic waits on the reactor, and sooner is
        # better; a relist runs beside traffic, and a second thread
        # wanting the interpreter would delay the reactor thread more
        # (measured at 1,000 Services: a relist's paced latency reached 82
        # to 156 ms reading ahead, 41 to 87 ms not).
        readAhead = (kind, namespace) not in self._listed
        items: list[Any] = []
        data = fetch(None)
        ahead: _PageAhead | None = None
        try:
            while True:
                metadata: dict[str, Any] = {}
                with _collection.paused():
                    for key, value in decodeList(data):
                        if key == "metadata" and isinstance(value, dict):
                            metadata = value
                            token = _continue(metadata)
                            if readAhead and ahead is None and token:
                                ahead = _PageAhead(fetch, token)
                        elif key != "items" or not isinstance(value, dict):
                            continue
                        elif compact is None:
                            items.append(value)
                        elif (kept := compact(kind, value)) is not None:
                            items.append(kept)
                if ahead is None:
                    token = _continue(metadata)
                    if not token:
                        break
                    data = fetch(token)
                else:
                    data, ahead = ahead.result(), None
        finally:
            if ahead is not None:
                ahead.join()
        self._listed.add((kind, namespace))
        return ObjectList(items, str(metadata.get("resourceVersion", "")))

    def _watch(
        self,
        kind: str,
        namespace: str | None,
        resourceVersion: str,
        stream: _Stream,
        batch: _Batch,
        labelSelector: str | None,
        compact: Compactor | None,
    ) -> None:
        from kubernetes.watch.watch import iter_resp_lines

        if stream.stopped:
            return
        query = [
            ("watch", "true"),
            ("resourceVersion", resourceVersion),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(int(self.watchTimeout))),
        ]
        if labelSelector is not None:
            query.append(("labelSelector", labelSelector))
        response = self._get(kind, namespace, query, self.watchRequestTimeout)
        try:
            if not stream.attach(response):
                return
            for line in iter_resp_lines(response):
                if stream.stopped:
                    return
                try:
                    event = json.loads(line) if line else None
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                type_, obj = event.get("type"), event.get("object")
                if type_ == "ERROR":
                    raise _streamError(obj)
                if isinstance(type_, str) and isinstance(obj, dict):
                    if compact is None:
                        batch.add(WatchEvent(type_, obj))
                    elif (kept := compactEvent(kind, type_, obj, compact)) is not None:
                        batch.add(kept)
        finally:
            response.close()
            response.release_conn()


def apiClientFromConfig(kubeconfig: str | None) -> Any:
    """
    A C{kubernetes.client.ApiClient}: from C{kubeconfig} if given, else
    in-cluster when running in a pod, else the default kubeconfig.

    @raise ValueError: with a one-line reason if no configuration loads.
    """
    import os

    from kubernetes import client, config

    configuration = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(
                config_file=kubeconfig, client_configuration=configuration
            )
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(client_configuration=configuration)
    except Exception as e:
        raise ValueError(f"cannot load Kubernetes configuration: {e}") from None
    return client.ApiClient(configuration)
