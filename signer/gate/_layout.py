"""A gate kept whole under one directory: its config, state, quarantine, the destination it
replaces and its wrapper. How the crash harness's collector and the kernel tests install a gate
of their own without touching /etc or /var (an operator's gate uses the paths its config names).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class GateRoot:
    root: Path
    """A root-only directory with a short path (the wrapper's path is in core_pattern)."""

    @property
    def config(self) -> Path:
        return self.root / "dump-gate.toml"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def released(self) -> Path:
        """Where the file pattern the gate replaces writes: a release is a file here."""
        return self.root / "released"

    @property
    def wrapper(self) -> Path:
        return self.root / "sbin" / "signer-dump-gate"
