"""
Property-based tests (hypothesis) of path normalisation and routing: for
mutated request targets built from every known encoding trick, the service
chosen and the path forwarded always agree, and only a valid
C{service.<tier>.<name>} is ever chosen.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from monedge.rules.convention import isValidName, serviceName
from monedge.rules.paths import PathError, normalise

#: Segment pieces: names, dots, separators and their encodings, overlong
#: and invalid UTF-8, fullwidth look-alikes, NUL, case and parameters.
PIECES = [
    "svc",
    "Svc",
    "SVC",
    "a-b",
    "x1",
    "%73vc",
    "%53vc",
    "",
    ".",
    "..",
    "%2e",
    "%2E",
    "%2e%2e",
    "%252e",
    "%25",
    "..;",
    ".;x",
    ";",
    "%3b",
    "%2f",
    "%2F",
    "%252f",
    "%5c",
    "\\",
    "%00",
    "%c0%ae",
    "%c0%af",
    "%e0%80%ae",
    "%ff",
    "%ef%bc%8e",
    "%ef%bc%8f",
    "%ef%bc%bc",
    "\uff0e".encode().decode("latin-1"),
    "~",
    "%7e",
    "%41",
    "a%20b",
    "@",
    ":",
    "%",
    "%g0",
]

SERVICE = re.compile(r"service\.api\.[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z")

segments = st.lists(
    st.lists(st.sampled_from(PIECES), min_size=1, max_size=3).map("".join),
    min_size=0,
    max_size=6,
)
targets = st.builds(
    lambda parts, trailing, query: (
        "/" + "/".join(parts) + ("/" if trailing else "") + query
    ).encode("latin-1"),
    segments,
    st.booleans(),
    st.sampled_from(["", "?", "?a=1", "?a=%2e%2e/../x", "?q=%00"]),
)


class PathPropertyTests(SynchronousTestCase):
    """
    Whatever the target, normalisation either refuses it or yields one
    canonical path whose first segment is the service routed to.
    """

    @settings(
        max_examples=3000,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        derandomize=True,
    )
    @given(targets)
    def test_routedAndForwardedAgree(self, target: bytes) -> None:
        """
        A normalised target's name is its canonical path's first segment
        decoded; the forwarded rest is the canonical path after it; no
        segment decodes to '.', '..', a separator or a control character;
        normalising the canonical form again changes nothing; and the
        service chosen is service.api.<name> only for a valid name.
        """
        try:
            routed = normalise(target)
        except PathError:
            return
        path = routed.path
        self.assertTrue(path.startswith(b"/"), target)
        first, _, tail = path[1:].partition(b"/")
        self.assertEqual(unquote_to_bytes(first).decode("utf-8"), routed.name, target)
        self.assertEqual(routed.rest, b"/" + tail, target)
        for segment in path.split(b"/")[1:]:
            decoded = unquote_to_bytes(segment)
            self.assertNotIn(decoded.partition(b";")[0], (b".", b".."), target)
            self.assertNotIn(b"/", decoded, target)
            self.assertNotIn(b"\\", decoded, target)
            self.assertFalse(any(b < 0x20 or b == 0x7F for b in decoded), target)
        again = normalise(path + routed.query)
        self.assertEqual(again, routed, target)
        if isValidName(routed.name):
            self.assertRegex(serviceName("api", routed.name), SERVICE)
        else:
            self.assertIsNone(SERVICE.match(f"service.api.{routed.name}"), target)
