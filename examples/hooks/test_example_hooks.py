"""
Unit tests for the example hooks, with monedge.testing.hooks: no sockets,
no reactor.  Run them with examples/hooks on PYTHONPATH:

    PYTHONPATH=$PWD/examples/hooks .venv/bin/python -m twisted.trial test_example_hooks
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from monedge.hooks import HookConfigError, HookResponse
from monedge.testing.hooks import buildHook, hookRequest, runHooks


class AddHeaderTests(SynchronousTestCase):
    def test_setsTheHeader(self) -> None:
        """The header goes upstream, replacing any the client sent."""
        hook = buildHook("add-header", {"name": "X-Team", "value": "orders"})
        request = hookRequest(headers={b"x-team": [b"forged"]})
        outcome = self.successResultOf(runHooks([hook], request))
        self.assertIsNone(outcome.response)
        self.assertEqual(outcome.upstreamHeaders.getRawHeaders(b"x-team"), [b"orders"])

    def test_badOptions(self) -> None:
        """Options are checked when the hook is built."""
        bad = [{}, {"name": "X Team", "value": "a"}, {"name": "X", "value": 1}]
        for options in bad:
            self.assertRaises(HookConfigError, buildHook, "add-header", options)


class BlockPathsTests(SynchronousTestCase):
    def test_blocks(self) -> None:
        """Paths at or under a prefix get 403 forbidden; others pass."""
        hook = buildHook("block-paths", {"prefixes": ["/orders/internal/"]})
        for path in [b"/orders/internal", b"/orders/internal/metrics"]:
            outcome = self.successResultOf(runHooks([hook], hookRequest(path=path)))
            self.assertEqual(
                outcome.response,
                HookResponse.error(403, "forbidden", "this path is private"),
            )
        for path in [b"/orders/42", b"/orders/internals"]:
            outcome = self.successResultOf(runHooks([hook], hookRequest(path=path)))
            self.assertIsNone(outcome.response)

    def test_badOptions(self) -> None:
        """Options are checked when the hook is built."""
        for options in [{}, {"prefixes": "/a"}, {"prefixes": ["a/"]}]:
            self.assertRaises(HookConfigError, buildHook, "block-paths", options)
