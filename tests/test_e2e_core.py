"""
End-to-end: a real twistd monedge process between real clients and real
upstreams on 127.0.0.1.
"""

from __future__ import annotations

import json
import subprocess

from twisted.internet import threads
from twisted.web.server import Request

from monedge.testing import Received
from tests.e2e import ProxyTestCase, deferRaw


def _error(body: bytes) -> dict[str, object]:
    document: dict[str, object] = json.loads(body)
    return document


class RoutingTests(ProxyTestCase):
    """
    Requests reach service.<tier>.<name> by convention alone.
    """

    async def test_routesByConvention(self) -> None:
        """
        /echo/hello reaches service.api.echo as /hello, with the forwarding
        headers set and the request id echoed back.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.echo": {"endpoints": [upstream.address]}}
        )
        response, body = await self.get(proxy.url + "/echo/hello?x=1")
        self.assertEqual(response.code, 200)
        [seen] = upstream.received
        self.assertEqual(seen.uri, b"/hello?x=1")
        self.assertEqual(seen.header(b"x-forwarded-prefix"), [b"/echo"])
        self.assertEqual(seen.header(b"x-forwarded-for"), [b"127.0.0.1"])
        self.assertEqual(seen.header(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(seen.header(b"host"), [f"127.0.0.1:{proxy.port}".encode()])
        requestId = response.headers.getRawHeaders(b"x-request-id")
        self.assertEqual(seen.header(b"x-request-id"), requestId)

    async def test_curlSeesUpstreamAnswer(self) -> None:
        """
        The README's curl example: curl gets the upstream's body.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.echo": {"endpoints": [upstream.address]}}
        )
        result = await self.curl(proxy.url + "/echo/hello")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(json.loads(result.stdout)["uri"], "/hello")

    async def test_repeatedSetCookieArrive(self) -> None:
        """
        Several Set-Cookie headers from the upstream all reach the client,
        and repeated request headers all reach the upstream.
        """

        def cookies(request: Request, seen: Received) -> bytes:
            request.responseHeaders.setRawHeaders(
                b"set-cookie", [b"a=1; Path=/", b"b=2; Path=/", b"c=3"]
            )
            return b"ok"

        upstream = self.startUpstream(cookies)
        proxy = await self.startProxy(
            {"service.api.jar": {"endpoints": [upstream.address]}}
        )
        response, body = await self.get(
            proxy.url + "/jar/", headers={b"x-multi": [b"one", b"two"]}
        )
        self.assertEqual(
            response.headers.getRawHeaders(b"set-cookie"),
            [b"a=1; Path=/", b"b=2; Path=/", b"c=3"],
        )
        self.assertEqual(upstream.received[0].header(b"x-multi"), [b"one", b"two"])

    async def test_stripPrefixFalse(self) -> None:
        """
        With strip-prefix false the upstream sees the full path.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {
                "service.api.full": {
                    "endpoints": [upstream.address],
                    "policy": {"strip-prefix": False},
                }
            }
        )
        await self.get(proxy.url + "/full/a/b")
        self.assertEqual(upstream.received[0].uri, b"/full/a/b")
        self.assertEqual(upstream.received[0].header(b"x-forwarded-prefix"), [])


class StatusTests(ProxyTestCase):
    """
    Every refusal is a documented status with a JSON body.
    """

    def assertError(
        self, response: object, body: bytes, status: int, code: str
    ) -> None:
        document = _error(body)
        self.assertEqual(getattr(response, "code", None), status, body)
        self.assertEqual(document["status"], status)
        self.assertEqual(document["code"], code)
        self.assertTrue(document["request_id"])

    async def test_notFound(self) -> None:
        """
        An unknown service, an invalid name and the bare root are 404s.
        """
        proxy = await self.startProxy({})
        for path in ["/nothing/here", "/Upper/x", "/"]:
            response, body = await self.get(proxy.url + path)
            self.assertError(response, body, 404, "route_not_found")

    async def test_badPath(self) -> None:
        """
        A dot segment sent raw is a 400, never forwarded.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.echo": {"endpoints": [upstream.address]}}
        )
        raw = await deferRaw(
            proxy.port,
            b"GET /echo/../x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 400 "), raw)
        self.assertEqual(_error(body)["code"], "path_dot_segment")
        self.assertEqual(upstream.received, [])

    async def test_bodyTooLarge(self) -> None:
        """
        A Content-Length above max-body-size is refused with 413 before
        the body is sent.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {
                "service.api.up": {
                    "endpoints": [upstream.address],
                    "policy": {"max-body-size": "1KiB"},
                }
            }
        )
        # The client sends its whole body regardless: it must still read
        # the 413, not a connection reset.
        raw = await deferRaw(
            proxy.port,
            b"POST /up/ HTTP/1.1\r\nHost: a\r\nContent-Length: 4000000\r\n\r\n"
            + b"x" * 4000000,
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 413 "), raw)
        self.assertEqual(_error(body)["code"], "body_too_large")
        self.assertEqual(upstream.received, [])

    async def test_upstreamRefused(self) -> None:
        """
        An endpoint that refuses connections is a 502.
        """
        from monedge.testing import freePort

        proxy = await self.startProxy(
            {"service.api.dead": {"endpoints": [f"127.0.0.1:{freePort()}"]}}
        )
        response, body = await self.get(proxy.url + "/dead/")
        self.assertError(response, body, 502, "upstream_connect_failed")

    async def test_noEndpoints(self) -> None:
        """
        A service with no endpoints is a 503.
        """
        proxy = await self.startProxy({"service.api.empty": {"endpoints": []}})
        response, body = await self.get(proxy.url + "/empty/")
        self.assertError(response, body, 503, "no_ready_endpoint")

    async def test_upstreamTimeout(self) -> None:
        """
        An upstream slower than the service's timeout is a 504.
        """
        from twisted.web.server import NOT_DONE_YET

        def never(request: Request, seen: Received) -> int:
            return NOT_DONE_YET

        upstream = self.startUpstream(never)
        proxy = await self.startProxy(
            {
                "service.api.slow": {
                    "endpoints": [upstream.address],
                    "policy": {"timeout": "500ms"},
                }
            }
        )
        response, body = await self.get(proxy.url + "/slow/")
        self.assertError(response, body, 504, "upstream_timeout")

    async def test_headerDeadline(self) -> None:
        """
        A client that does not finish its headers within the header timeout
        gets a 408 and a closed connection.
        """
        proxy = await self.startProxy({}, ["--header-timeout", "1s"])
        raw = await deferRaw(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n", timeout=10)
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 408 "), raw)
        self.assertEqual(_error(body)["code"], "request_timeout")

    async def test_headersTooLarge(self) -> None:
        """
        Too many headers is a 431.
        """
        proxy = await self.startProxy({})
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
        raw = await deferRaw(
            proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"
        )
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 431 "), raw)
        self.assertEqual(_error(body)["code"], "headers_too_large")


class PackagingTests(ProxyTestCase):
    """
    The installed package offers the monedge tap.
    """

    async def test_twistdOffersMonedge(self) -> None:
        """
        twistd, run outside the source tree, lists monedge among its
        commands.
        """
        import os
        import sys

        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        environment = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        result = await threads.deferToThread(
            subprocess.run,
            [twistd, "--help"],
            capture_output=True,
            cwd=self.directory,
            env=environment,
            timeout=60,
        )
        self.assertIn(b"monedge", result.stdout)


class AdminTests(ProxyTestCase):
    """
    The admin site reports health, readiness, metrics and routes.
    """

    async def test_adminEndpoints(self) -> None:
        """
        /healthz and /readyz answer 200; /metrics is Prometheus text with
        monedge's metrics; /routes lists each service with its endpoints
        and effective policy; unknown admin paths are 404.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {
                "service.api.echo": {
                    "endpoints": [upstream.address],
                    "policy": {"timeout": "30s", "max-body-size": "1MiB"},
                },
                "service.internal.ledger": {"endpoints": [upstream.address]},
            }
        )
        await self.get(proxy.url + "/echo/x")
        for path in ("/healthz", "/readyz"):
            response, _ = await self.get(proxy.adminURL + path)
            self.assertEqual(response.code, 200, path)
        response, body = await self.get(proxy.adminURL + "/metrics")
        text = body.decode()
        self.assertIn(
            'monedge_requests_total{code_class="2xx",origin="upstream",'
            'service="service.api.echo"} 1.0',
            text,
        )
        self.assertIn("monedge_request_duration_seconds_bucket", text)
        self.assertIn("monedge_registry_services 2.0", text)
        self.assertIn('monedge_registry_reloads_total{result="ok"} 1.0', text)
        self.assertIn("monedge_requests_in_flight", text)
        response, body = await self.get(proxy.adminURL + "/routes")
        routes = json.loads(body)
        byName = {s["name"]: s for s in routes["services"]}
        echo = byName["service.api.echo"]
        self.assertTrue(echo["routable"])
        self.assertEqual(echo["path"], "/echo/")
        self.assertEqual(echo["policy"]["timeout"], 30.0)
        self.assertEqual(echo["policy"]["max-body-size"], 1 << 20)
        self.assertEqual(echo["endpoints"][0]["address"], upstream.address)
        self.assertFalse(byName["service.internal.ledger"]["routable"])
        response, _ = await self.get(proxy.adminURL + "/nothing")
        self.assertEqual(response.code, 404)

    async def test_accessLogRecord(self) -> None:
        """
        Each request writes one JSON access-log line with every documented
        field.
        """
        upstream = self.startUpstream()
        proxy = await self.startProxy(
            {"service.api.echo": {"endpoints": [upstream.address]}}
        )
        response, body = await self.get(proxy.url + "/echo/x", data=b"12345")
        self.assertEqual(response.code, 200)
        records: list[dict[str, object]] = []

        def logged() -> bool:
            records[:] = proxy.accessLog()
            return bool(records)

        await proxy.waitFor(logged, 5, "the access log")
        [record] = records
        self.assertEqual(
            set(record),
            {
                "time",
                "request_id",
                "client",
                "method",
                "path",
                "status",
                "service",
                "endpoint",
                "upstream_latency",
                "total_latency",
                "bytes_in",
                "bytes_out",
                "error",
                "grpc_status",
            },
        )
        self.assertEqual(record["status"], 200)
        self.assertEqual(record["service"], "service.api.echo")
        self.assertEqual(record["endpoint"], upstream.address)
        self.assertEqual(record["bytes_in"], 5)
        self.assertEqual(record["bytes_out"], len(body))
        self.assertEqual(
            record["request_id"],
            response.headers.getRawHeaders(b"x-request-id")[0].decode(),
        )


class BalancingTests(ProxyTestCase):
    """
    Traffic spreads over endpoints and avoids dead ones.
    """

    async def test_deadEndpointRetried(self) -> None:
        """
        With one live and one refusing endpoint, every request succeeds
        (a refused connection is retried on the other endpoint), and both
        live upstreams of a healthy service get traffic.
        """
        from monedge.testing import freePort

        live = self.startUpstream()
        other = self.startUpstream()
        proxy = await self.startProxy(
            {
                "service.api.half": {
                    "endpoints": [f"127.0.0.1:{freePort()}", live.address]
                },
                "service.api.pair": {"endpoints": [live.address, other.address]},
            }
        )
        for _ in range(20):
            response, body = await self.get(proxy.url + "/half/")
            self.assertEqual(response.code, 200, body)
        self.assertEqual(len(live.received), 20)
        for _ in range(20):
            await self.get(proxy.url + "/pair/")
        self.assertGreater(len(other.received), 0)
        self.assertGreater(len(live.received), 20)


class HeadersHookTests(ProxyTestCase):
    """
    The built-in headers hook, through a real twistd monedge process.
    """

    async def test_globalAndServiceHeaders(self) -> None:
        """
        A global --hook and a service's own hooks both apply, on the way up
        and on the way back, with placeholders filled in.
        """

        def answer(request: Request, seen: Received) -> bytes:
            request.setHeader(b"server", b"upstream/1.0")
            return b"ok"

        upstream = self.startUpstream(answer)
        proxy = await self.startProxy(
            {
                "service.api.echo": {
                    "endpoints": [upstream.address],
                    "policy": {
                        "hooks": [
                            {
                                "name": "headers",
                                "options": {
                                    "request": {"set": {"X-Service": "{service}"}},
                                    "response": {"remove": ["Server"]},
                                },
                            }
                        ]
                    },
                }
            },
            [
                "--hook",
                '{"name": "headers", "options": {"request": {"remove": ["X-Debug"]},'
                ' "response": {"set": {"X-Frame-Options": "DENY"}}}}',
            ],
        )
        response, body = await self.get(
            proxy.url + "/echo/x", headers={b"x-debug": [b"1"]}
        )
        self.assertEqual(response.code, 200)
        [seen] = upstream.received
        self.assertEqual(seen.header(b"x-service"), [b"service.api.echo"])
        self.assertEqual(seen.header(b"x-debug"), [])
        self.assertEqual(response.headers.getRawHeaders(b"x-frame-options"), [b"DENY"])
        self.assertIsNone(response.headers.getRawHeaders(b"server"))

    async def test_unknownHookStopsStartup(self) -> None:
        """
        An unknown hook in the static registry stops monedge at startup,
        naming the service and listing the known hooks.
        """
        from monedge.testing import ProxyProcess

        self.writeServices(
            {
                "service.api.echo": {
                    "endpoints": ["127.0.0.1:1"],
                    "policy": {"hooks": ["nosuch"]},
                }
            }
        )
        proxy = ProxyProcess(self.registryPath, self.directory)
        with self.assertRaises(RuntimeError):
            await proxy.start()
        self.assertIn("unknown hook 'nosuch'", proxy.log())
        self.assertIn("headers", proxy.log())
