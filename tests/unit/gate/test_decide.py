"""The gate's decision table (signer.gate.decide) and the expansion of the replaced pattern's %
specifiers, without a process: only a whole core, scanned clean and completely, is released."""

from __future__ import annotations

import pytest

from signer.gate import DECISIONS, decide
from signer.gate._receive import Received
from signer.gate._release import expand
from signer.gate._scan import ScanOutcome

WHOLE = Received(1000, 1000, False, None, None, 0.1)
CLEAN = ScanOutcome("done", 30.0, findings=0, complete=True)


def outcome(**kw: object) -> ScanOutcome:
    values: dict[str, object] = {"status": "done", "budget_seconds": 30.0, "complete": True}
    values.update(kw)
    return ScanOutcome(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("received", "scanned", "decision", "said"),
    [
        (WHOLE, CLEAN, "released", "scanned clean"),
        (WHOLE, outcome(findings=2), "quarantined:findings", "2 findings"),
        (WHOLE, outcome(status="budget", reason="over 30 s"), "quarantined:budget", "over 30 s"),
        (WHOLE, outcome(status="error", reason="died of SIGSEGV"), "quarantined:error", "SIGSEGV"),
        (
            WHOLE,
            outcome(complete=False, incomplete="blind mode did not finish", over_budget=True),
            "quarantined:budget",
            "blind mode",
        ),
        (
            WHOLE,
            outcome(complete=False, incomplete="the scan stopped at its match limit"),
            "quarantined:error",
            "match limit",
        ),
        (WHOLE, None, "quarantined:error", "not scanned"),
        (Received(10, 99, True, None, None, 0.1), CLEAN, "quarantined:too-big", "99 bytes, 10"),
        (
            Received(10, 99, True, None, None, 0.1),
            outcome(findings=1),
            "quarantined:findings",
            "max_core_bytes",
        ),
        (Received(5, 99, False, "1 byte free", None, 0.1), None, "dropped:no-space", "free"),
        (Received(5, 99, False, None, "EIO", 0.1), None, "quarantined:error", "EIO"),
    ],
)
def test_decisions(
    received: Received, scanned: ScanOutcome | None, decision: str, said: str
) -> None:
    got, reason = decide(received, scanned)
    assert (got, said in reason) == (decision, True), reason
    assert got in DECISIONS


VALUES = {
    "%": "%",
    "p": "7",
    "P": "1007",
    "e": "sleep",
    "E": "!usr!bin!sleep",
    "h": "host",
    "d": "1",
}


@pytest.mark.parametrize(
    ("token", "expanded", "lacking"),
    [
        ("%P", "1007", set()),
        ("core.%e.%p", "core.sleep.7", set()),
        ("/var/crash/%E-%%-%h", "/var/crash/!usr!bin!sleep-%-host", set()),
        ("%F", None, {"F"}),  # an argument of nothing the gate knows: left out
        ("%F%C", None, {"C", "F"}),
        ("pidfd=%F", "pidfd=", {"F"}),
        ("%d", "1", set()),  # the dump mode, as the kernel gave it to the gate
        ("%z", "", set()),  # unknown to the kernel too: nothing
        ("trailing%", "trailing%", set()),
    ],
)
def test_specifiers(token: str, expanded: str | None, lacking: set[str]) -> None:
    seen: set[str] = set()
    assert expand(token, VALUES, seen) == expanded
    assert seen == lacking
