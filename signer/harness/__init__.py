"""The crash harness: crash the real service, collect real dumps, scan them, prove each scan.

``signer crash-test --report DIR [--quick]`` runs a campaign (:mod:`signer.harness.campaign`);
``make audit`` runs the full matrix.
"""

from signer.harness.campaign import Campaign, Case, Row, full_matrix, quick_matrix
from signer.harness.verdicts import ControlOutcome, ControlVerdict

__all__ = [
    "Campaign",
    "Case",
    "ControlOutcome",
    "ControlVerdict",
    "Row",
    "full_matrix",
    "quick_matrix",
]
