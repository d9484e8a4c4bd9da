"""What a control proved, as a value: judged here, put in words only where a report is written.

A row of the campaign counts as evidence only if its control (a process holding the same keys and
PINs, crashed and collected the same way) was caught: the scanner found every secret and the
marker in the control's dump. The campaign once kept this as the report's words and judged it by
``startswith("caught")``; a reworded report would have passed every row (issue 13).
"""

from __future__ import annotations

import enum
from collections.abc import Set
from dataclasses import dataclass


class ControlOutcome(enum.Enum):
    CAUGHT = "caught"
    """The scanner found every secret and the marker in the control's dump."""
    MISSED = "missed"
    """Something the control held was not found: the row proves nothing."""
    NOT_APPLICABLE = "n/a"
    """The row is itself a control (SoftHSM2 loaded by the service): it has none of its own."""


@dataclass(frozen=True)
class ControlVerdict:
    outcome: ControlOutcome
    found: int = 0
    """How many of the secrets were found (all of them when caught)."""
    wanted: int = 0
    missed: tuple[str, ...] = ()
    """The secrets not found, sorted; ``("marker",)`` when all were but the marker was not."""

    @property
    def caught(self) -> bool:
        return self.outcome is ControlOutcome.CAUGHT

    def __str__(self) -> str:
        """The report's words: ``caught 9/9``, ``MISSED a, b``, ``n/a (...)``."""
        if self.outcome is ControlOutcome.CAUGHT:
            return f"caught {self.found}/{self.wanted}"
        if self.outcome is ControlOutcome.MISSED:
            return f"MISSED {', '.join(self.missed)}"
        return "n/a (this row is itself a control)"


NOT_A_CONTROL_ROW = ControlVerdict(ControlOutcome.NOT_APPLICABLE)


def judge_control(wanted: Set[str], found: Set[str], marker_found: bool) -> ControlVerdict:
    """Caught if every wanted secret and the marker were found in the control's dump."""
    missed = tuple(sorted(wanted - found))
    if missed or not marker_found:
        return ControlVerdict(ControlOutcome.MISSED, len(found), len(wanted), missed or ("marker",))
    return ControlVerdict(ControlOutcome.CAUGHT, len(found), len(wanted))
