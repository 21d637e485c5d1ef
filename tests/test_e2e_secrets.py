"""
End to end: a real C{twistd monedge} (one process, and a C{--workers}
group) whose hooks and registry carry credentials never shows them on
C{/routes} or C{/metrics}, nor writes the hooks' ones to its log, while
the requests themselves use them.
"""

from __future__ import annotations

import json
import signal
from typing import Any

from twisted.internet import reactor, task

from monedge.testing import ProxyProcess, freePort
from tests.e2e import ProxyTestCase

#: Every credential the configuration below holds.
HOOK_SECRETS = [
    "hdr-s3cret-1",
    "hdr-s3cret-2",
    "ext-s3cret-4",
    "jwks-s3cret-5",
    "redis-p@ss",
    "glob-s3cret-7",
]
REGISTRY_SECRET = "reg-s3cret-8"


def serviceHooks(closed: int) -> list[dict[str, Any]]:
    """
    A service's hooks, each holding credentials: a Redis password with an
    C{@} in it, header values, an auth service URL and a JWK set URL with
    a secret in their queries.  C{closed} is a port nothing
    listens on, so the hooks that call out fail at once.
    """
    return [
        {
            "name": "ratelimit",
            "options": {
                "rate": "100/s",
                "redis": f"redis://:redis-p@ss@127.0.0.1:{closed}/0",
            },
        },
        {
            "name": "headers",
            "options": {
                "request": {"set": {"Authorization": "Bearer hdr-s3cret-1"}},
                "response": {"add": {"X-Api-Key": "hdr-s3cret-2"}},
            },
        },
        {
            "name": "auth",
            "options": {
                "mode": "external",
                "url": f"http://127.0.0.1:{closed}/check?key=ext-s3cret-4",
            },
        },
        {
            "name": "auth",
            "options": {
                "mode": "jwt",
                "jwks-url": "https://idp.example.com/jwks?client_secret=jwks-s3cret-5",
            },
        },
    ]


GLOBAL_HOOK = '{name: headers, options: {request: {set: {X-Edge: "glob-s3cret-7"}}}}'


class SecretsTests(ProxyTestCase):
    """
    What monedge shows of a configuration full of credentials.
    """

    def services(self, endpoints: list[str]) -> dict[str, Any]:
        """
        The registry: one service with the secret-bearing hooks.
        """
        return {
            "service.api.orders": {
                "endpoints": endpoints,
                "policy": {"hooks": serviceHooks(self.closed)},
            }
        }

    async def start(self, *args: str) -> ProxyProcess:
        """
        An upstream and a proxy in front of it, with the global hook.
        """
        self.closed = freePort()
        upstream = self.startUpstream()
        self.endpoint = f"127.0.0.1:{upstream.portNumber}"
        return await self.startProxy(
            self.services([self.endpoint]), ["--hook", GLOBAL_HOOK, *args]
        )

    def assertNoSecret(self, text: str, secrets: list[str]) -> None:
        """
        None of C{secrets} is in C{text}.
        """
        for secret in secrets:
            self.assertNotIn(secret, text)

    async def routes(self, proxy: ProxyProcess) -> tuple[dict[str, Any], str]:
        """
        /routes, once it answers 200: the document and its text.
        """
        for _ in range(250):
            response, body = await self.get(proxy.adminURL + "/routes")
            if response.code == 200:
                return json.loads(body), body.decode("utf-8")
            await task.deferLater(reactor, 0.04, lambda: None)
        raise AssertionError(f"/routes never answered 200: {body!r}")

    def assertHooksShown(self, document: dict[str, Any]) -> None:
        """
        The hooks are listed, by name, with what identifies them.
        """
        [service] = document["services"]
        hooks = service["policy"]["hooks"]
        self.assertEqual(
            [hook["name"] for hook in hooks], ["ratelimit", "headers", "auth", "auth"]
        )
        self.assertEqual(
            hooks[0]["options"]["redis"], f"redis://***@127.0.0.1:{self.closed}/0"
        )
        self.assertEqual(
            hooks[1]["options"],
            {"request": {"set": ["Authorization"]}, "response": {"add": ["X-Api-Key"]}},
        )
        self.assertEqual(
            hooks[2]["options"]["url"], f"http://127.0.0.1:{self.closed}/check?***"
        )
        self.assertEqual(
            hooks[3]["options"]["jwks-url"], "https://idp.example.com/jwks?***"
        )
        self.assertEqual(
            document["global_hooks"],
            [{"name": "headers", "options": {"request": {"set": ["X-Edge"]}}}],
        )

    async def test_oneProcess(self) -> None:
        """
        /routes and /metrics show no credential, before and after a request
        runs the hooks (which fails closed: the auth service is down), and
        the log names no hook credential; a registry reload refused for an
        endpoint with user-info is reported on /routes without it.
        """
        proxy = await self.start()
        document, text = await self.routes(proxy)
        self.assertNoSecret(text, HOOK_SECRETS)
        self.assertHooksShown(document)

        response, _ = await self.get(proxy.url + "/orders/x", headers={"Host": "api"})
        self.assertEqual(response.code, 500)
        _, metrics = await self.get(proxy.adminURL + "/metrics")
        self.assertIn(
            b'monedge_hook_decisions_total{decision="error",hook="auth"}', metrics
        )
        self.assertNoSecret(metrics.decode("utf-8"), HOOK_SECRETS)
        _, text = await self.routes(proxy)
        self.assertNoSecret(text, HOOK_SECRETS)
        await proxy.waitFor(
            lambda: (
                f"auth service http://127.0.0.1:{self.closed}/check?*** failed"
                in proxy.log()
            ),
            10,
            "the auth failure in the log",
        )
        self.assertNoSecret(proxy.log(), HOOK_SECRETS)

        self.writeServices(
            self.services(
                [self.endpoint, f"https://user:{REGISTRY_SECRET}@10.0.0.1:443"]
            )
        )
        proxy.signal(signal.SIGHUP)
        for _ in range(250):
            document, text = await self.routes(proxy)
            if document["registry"]["reloads"]["failed"]:
                break
            await task.deferLater(reactor, 0.04, lambda: None)
        self.assertIn("https://***@10.0.0.1:443", document["registry"]["last_error"])
        self.assertNoSecret(text, [*HOOK_SECRETS, REGISTRY_SECRET])

    async def test_invalidHooksAfterReload(self) -> None:
        """
        A reload that gives the service hooks which cannot be built makes
        it answer 503 hook_config_invalid with the catalogue's message; the
        configuration error is logged, naming the option, without the
        credentials of the URL it quotes.
        """
        proxy = await self.start()
        broken = [
            {
                "name": "ratelimit",
                "options": {"rate": "1/s", "redis": "redis://:pw-s3cret@/0"},
            }
        ]
        self.writeServices(
            {
                "service.api.orders": {
                    "endpoints": [self.endpoint],
                    "policy": {"hooks": broken},
                }
            }
        )
        proxy.signal(signal.SIGHUP)
        for _ in range(250):
            document, _ = await self.routes(proxy)
            if document["registry"]["reloads"]["ok"] >= 2:
                break
            await task.deferLater(reactor, 0.04, lambda: None)
        response, body = await self.get(
            proxy.url + "/orders/x", headers={"Host": "api"}
        )
        self.assertEqual(response.code, 503)
        answer = json.loads(body)
        self.assertEqual(
            (answer["code"], answer["message"]),
            ("hook_config_invalid", "the service's hook configuration is invalid"),
        )
        await proxy.waitFor(
            lambda: "hook ratelimit: redis:" in proxy.log(),
            10,
            "the configuration error in the log",
        )
        self.assertIn("redis://***@/0", proxy.log())
        self.assertNoSecret(proxy.log(), ["pw-s3cret", *HOOK_SECRETS])

    async def test_workers(self) -> None:
        """
        A --workers group's /routes, built from a worker's, shows the same
        redacted document.
        """
        proxy = await self.start("--workers", "2")
        document, text = await self.routes(proxy)
        self.assertNoSecret(text, HOOK_SECRETS)
        self.assertHooksShown(document)
        self.assertIn(document["answered_by"], (0, 1))
