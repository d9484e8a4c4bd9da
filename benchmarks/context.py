"""What scenarios share: the work directory, options, and one real core of the service."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from signer.harness.collectors import gcore
from signer.harness.lab import Lab, Load, reaped
from signer.scan import Secret


def _stderr(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


@dataclass
class RealCore:
    """A gcore snapshot of the real service taken under signing load, and the lab's secrets."""

    path: Path
    size: int
    secrets: list[Secret]
    signed: int
    sign_errors: int
    load_seconds: float
    gcore_seconds: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "how": "gcore (non-fatal snapshot) of the real service after Load signing",
            "size_bytes": self.size,
            "signed_under_load": self.signed,
            "sign_errors": self.sign_errors,
            "load_seconds": round(self.load_seconds, 2),
            "gcore_seconds": round(self.gcore_seconds, 2),
            "secrets": len(self.secrets),
        }


def make_real_core(
    work: Path, load_seconds: float, threads: int, progress: Callable[[str], None]
) -> RealCore:
    """Lab (token host, known keys), real service, ``threads`` signers for ``load_seconds``, a
    ``gcore`` of the service; then service and token host are stopped."""
    work.mkdir(parents=True, exist_ok=True)
    lab = Lab(Path(tempfile.mkdtemp(prefix="lab-", dir=work.absolute())))
    progress("lab: token host and known keys ...")
    lab.setup()
    try:
        sp = lab.start_service(lab.root / "service")
        with reaped(sp.proc):
            progress(f"service pid {sp.pid} serving; signing for {load_seconds:g}s ...")
            with Load(lab.routes(), lab.keys, threads=threads) as load:
                time.sleep(load_seconds)
            out = work.absolute() / "service.core"
            began = time.monotonic()
            gcore(sp.pid, out)
            gcore_seconds = time.monotonic() - began
            sp.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                sp.proc.wait(timeout=15)
        secrets = lab.secrets()
    finally:
        lab.close()
    size = out.stat().st_size
    progress(f"core: {size / 2**20:.0f} MiB in {gcore_seconds:.1f}s; {load.signed} signatures")
    return RealCore(out, size, secrets, load.signed, load.errors, load_seconds, gcore_seconds)


@dataclass
class Context:
    work: Path
    runs: int = 5
    load_seconds: float = 2.0
    load_threads: int = 8
    blind_budget_seconds: float = 240.0
    steady_seconds: float = 600.0
    tail_seconds: float = 30.0
    replicas_rounds: int = 5
    seed: int = 20240601
    progress: Callable[[str], None] = _stderr
    _core: RealCore | None = field(default=None, repr=False)

    def core(self) -> RealCore:
        """The shared real core, made on first use."""
        if self._core is None:
            self._core = make_real_core(
                self.work / "core", self.load_seconds, self.load_threads, self.progress
            )
        return self._core
