"""
L{monedge.record.RequestRecord}: what the stages write through its
methods, and what the access log and the metrics read from it.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from monedge.record import MONEDGE, UPSTREAM, RequestRecord
from monedge.rules.errors import ErrorResource, ProxyError
from monedge.rules.paths import normalise


class RoutingTests(SynchronousTestCase):
    """
    Routing records the host, the routed path and its decision.
    """

    def test_routedAndDecided(self) -> None:
        """
        C{routed} keeps the host and path; C{decided} the leaf and its
        service.
        """
        record = RequestRecord(1.0)
        path = normalise(b"/echo/a?b=1")
        leaf = Resource()
        record.routed(b"api.example.com", path)
        record.decided(leaf, "service.api.echo")
        self.assertEqual(
            (record.host, record.routedPath, record.decision, record.service),
            (b"api.example.com", path, leaf, "service.api.echo"),
        )

    def test_refusalHasNoService(self) -> None:
        """
        A refusal is a decision with no service: the service stays unset.
        """
        record = RequestRecord(1.0)
        refusal = ErrorResource(ProxyError("route_not_found"))
        record.decided(refusal, None)
        self.assertIs(record.decision, refusal)
        self.assertIsNone(record.service)


class UpstreamTests(SynchronousTestCase):
    """
    The exchange records each attempt and the upstream's answer.
    """

    def test_attempts(self) -> None:
        """
        Each sending counts an attempt and names its endpoint; the upstream
        latency runs from the last sending to the response head.
        """
        record = RequestRecord(10.0)
        record.upstreamSent("10.0.0.1:80", 10.5)
        record.upstreamSent("10.0.0.2:80", 11.0)
        record.upstreamAnswered(11.25)
        self.assertEqual(record.attempts, 2)
        self.assertEqual(record.endpoint, "10.0.0.2:80")
        self.assertEqual(record.upstreamLatency, 0.25)

    def test_tunnel(self) -> None:
        """
        A tunnel's bytes replace the request's, and an idle timeout is its
        error code.
        """
        record = RequestRecord(0.0)
        record.tunnelStarted()
        record.tunnelEnded(100, 2000, timedOut=True)
        self.assertTrue(record.tunnelled)
        self.assertEqual((record.bytesIn, record.bytesOut), (100, 2000))
        self.assertEqual(record.errorCode, "tunnel_idle_timeout")
        quiet = RequestRecord(0.0)
        quiet.tunnelEnded(1, 2, timedOut=False)
        self.assertIsNone(quiet.errorCode)


class FinishedTests(SynchronousTestCase):
    """
    The owner closes the record: its status, end, total latency and who
    chose the status.
    """

    def answered(self, status: int, sent: int, code: str | None) -> RequestRecord:
        record = RequestRecord(1.0)
        record.upstreamSent("10.0.0.1:80", 1.1)
        record.upstreamAnswered(1.2)
        record.failed(code)
        record.finished(status, 1.5, sent)
        return record

    def test_latency(self) -> None:
        """
        The total latency is from start to end; a request refused before
        it began has none.
        """
        record = RequestRecord(1.0)
        self.assertIsNone(record.totalLatency)
        record.finished(200, 1.5, 200)
        self.assertEqual((record.status, record.end), (200, 1.5))
        self.assertEqual(record.totalLatency, 0.5)
        refused = RequestRecord(None)
        refused.finished(414, 2.0)
        self.assertIsNone(refused.totalLatency)

    def test_upstreamChoseTheStatus(self) -> None:
        """
        The status is the upstream's when it answered, that status was
        sent, and nothing monedge refused came after: a body cut short
        (C{reset_mid_body}) leaves it the upstream's.
        """
        self.assertEqual(self.answered(503, 503, None).origin, UPSTREAM)
        self.assertEqual(self.answered(200, 200, "reset_mid_body").origin, UPSTREAM)

    def test_monedgeChoseTheStatus(self) -> None:
        """
        The status is monedge's when no upstream answered, when monedge
        refused with a catalogue code after the answer, or when the status
        accounted is not the one sent (499: the client left).
        """
        unanswered = RequestRecord(1.0)
        unanswered.failed("no_ready_endpoint")
        unanswered.finished(503, 1.1, 503)
        self.assertEqual(unanswered.origin, MONEDGE)
        self.assertEqual(self.answered(502, 502, "upstream_reset").origin, MONEDGE)
        self.assertEqual(self.answered(499, 200, None).origin, MONEDGE)
