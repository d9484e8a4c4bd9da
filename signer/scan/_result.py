"""What a scan answers: findings, what was covered, and the evidence that the dump was whole."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class Finding:
    """Key material at ``offset`` (file offset) of ``length`` bytes.

    Known-secret findings name the secret, the component ('d', 'p', 'private_value', 'seed',
    'pin', 'pkcs8-der', ...) and the representation ('be', 'le64', 'cpython30', 'pem', ...;
    'fragment:X' for part of representation X). Blind findings name the public key they were
    verified against (or 'unknown:...'), and ``detail`` says what was verified.
    """

    secret_id: str
    component: str
    representation: str
    offset: int
    length: int
    address: int | None = None
    mapping: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "secret_id": self.secret_id,
            "component": self.component,
            "representation": self.representation,
            "offset": self.offset,
            "length": self.length,
            "address": None if self.address is None else f"{self.address:#x}",
            "mapping": self.mapping,
            "detail": self.detail,
        }


@dataclass(frozen=True, slots=True)
class BlindCheck:
    """One mathematical check over the dump's memory, and how far the time budget let it go."""

    name: str  # e.g. 'rsa-factor-be', 'ec-scalar-le64-aligned'
    key_id: str
    bytes_total: int
    bytes_covered: int
    candidates: int  # windows that passed the cheap filters and were verified
    seconds: float

    @property
    def complete(self) -> bool:
        return self.bytes_covered >= self.bytes_total

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "key_id": self.key_id,
            "bytes_total": self.bytes_total,
            "bytes_covered": self.bytes_covered,
            "complete": self.complete,
            "candidates": self.candidates,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True, slots=True)
class BlindReport:
    """Blind mode: structural detectors ran over the whole dump; their candidates were confirmed,
    then the math checks run, all within one budget."""

    budget_seconds: float
    public_keys: tuple[str, ...]
    structural_candidates: int  # header/DER/JWK matches found
    checks: tuple[BlindCheck, ...]
    structural_examined: int | None = None  # of those, confirmed within the budget (None: all)
    offsets: str = "every"  # where the big-endian checks looked (signer.scan._blind.Offsets)
    workers: int = 1  # processes the math checks ran in
    lost: tuple[str, ...] = ()  # workers whose share is not covered, and why (also in notes)

    @property
    def structural_complete(self) -> bool:
        return self.structural_examined is None or (
            self.structural_examined >= self.structural_candidates
        )

    @property
    def complete(self) -> bool:
        return self.structural_complete and all(c.complete for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget_seconds": self.budget_seconds,
            "public_keys": list(self.public_keys),
            "structural_candidates": self.structural_candidates,
            "structural_examined": (
                self.structural_candidates
                if self.structural_examined is None
                else self.structural_examined
            ),
            "complete": self.complete,
            "offsets": self.offsets,
            "workers": self.workers,
            "lost": list(self.lost),
            "checks": [c.to_dict() for c in self.checks],
        }


@dataclass(frozen=True, slots=True)
class ScanResult:
    """The scan of one file. ``bytes_scanned`` counts process memory only: for an ELF core the
    contents of its PT_LOAD segments (headers and notes are searched too, but are not memory);
    for any other file, every byte. ``complete`` is False when the scan stopped early (the match
    limit); ``notes`` say what a reader must know to trust a clean result."""

    path: Path
    size: int
    bytes_scanned: int
    patterns: int
    seconds: float
    findings: list[Finding]
    is_core: bool
    markers_found: dict[str, int] = field(default_factory=dict)
    complete: bool = True
    notes: list[str] = field(default_factory=list)
    blind: BlindReport | None = None

    @property
    def clean(self) -> bool:
        return not self.findings

    @property
    def finished(self) -> bool:
        """Every search ran to its end: no match limit reached, and blind mode (if asked) covered
        all it was to within its budget. A clean result that is not finished proves nothing for
        what was not reached."""
        return self.complete and (self.blind is None or self.blind.complete)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "size": self.size,
            "bytes_scanned": self.bytes_scanned,
            "patterns": self.patterns,
            "seconds": round(self.seconds, 3),
            "is_core": self.is_core,
            "complete": self.complete,
            "clean": self.clean,
            "markers_found": dict(self.markers_found),
            "findings": [f.to_dict() for f in self.findings],
            "notes": list(self.notes),
            "blind": None if self.blind is None else self.blind.to_dict(),
        }
