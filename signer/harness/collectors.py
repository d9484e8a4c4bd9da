"""Where crash dumps come from: the kernel (file or pipe ``core_pattern``) and ``gcore``."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from signer.errors import HarnessError

CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")


@dataclass(frozen=True)
class KernelCollector:
    """How this host's kernel writes cores: to a file pattern, or through a pipe to a program."""

    pattern: str

    @classmethod
    def detect(cls) -> KernelCollector:
        return cls(CORE_PATTERN.read_text().strip())

    @property
    def is_pipe(self) -> bool:
        return self.pattern.startswith("|")

    @property
    def pipe_program(self) -> str:
        return Path(self.pattern[1:].split()[0]).name if self.is_pipe else ""

    @property
    def name(self) -> str:
        """'kernel-file', 'kernel-pipe:systemd-coredump', 'kernel-pipe:apport', ..."""
        return f"kernel-pipe:{self.pipe_program}" if self.is_pipe else "kernel-file"

    @property
    def usable(self) -> bool:
        """Whether a core written by this kernel can be fetched here."""
        if not self.is_pipe:
            return True
        return self.pipe_program == "systemd-coredump" and shutil.which("coredumpctl") is not None

    def directory(self, cwd: Path) -> Path:
        """Where a file pattern puts cores of a process running in ``cwd``."""
        if "/" in self.pattern:
            return Path(self.pattern).parent
        return cwd

    def fetch(self, pid: int, cwd: Path, since: float, out: Path, timeout: float = 60.0) -> Path:
        """The core of ``pid`` once the kernel (or the pipe collector) has finished writing it."""
        if self.is_pipe:
            return self._fetch_pipe(pid, out, timeout)
        where = self.directory(cwd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cores = sorted(
                (p for p in where.glob("core*") if p.is_file() and p.stat().st_mtime >= since - 1),
                key=lambda p: p.stat().st_mtime,
            )
            if cores:
                os.replace(cores[-1], out)
                return out
            time.sleep(0.1)
        raise HarnessError(f"no core file appeared in {where} (core_pattern {self.pattern!r})")

    def _fetch_pipe(self, pid: int, out: Path, timeout: float) -> Path:
        if self.pipe_program != "systemd-coredump":
            raise HarnessError(f"cannot fetch cores from pipe collector {self.pipe_program!r}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(
                ["coredumpctl", "dump", str(pid), "--output", str(out)],
                capture_output=True,
                check=False,
            )
            if r.returncode == 0 and out.exists() and out.stat().st_size > 0:
                return out
            time.sleep(0.5)
        raise HarnessError(f"coredumpctl has no core for pid {pid}")


def gcore(pid: int, out: Path, all_mappings: bool = False, timeout: float = 120.0) -> Path:
    """A non-fatal snapshot with gdb's gcore; ``all_mappings`` is ``gcore -a`` (ignores
    coredump_filter and MADV_DONTDUMP: everything the process maps)."""
    prefix = out.with_suffix("")
    args = ["gcore", *(["-a"] if all_mappings else []), "-o", str(prefix), str(pid)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    produced = Path(f"{prefix}.{pid}")
    if r.returncode != 0 or not produced.exists():
        raise HarnessError(f"gcore failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    os.replace(produced, out)
    return out
