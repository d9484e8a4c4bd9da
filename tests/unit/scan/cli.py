"""``signer scan`` run as a process of its own, for the tests that bound its exit, its message
and its memory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SIGNER = Path(sys.executable).parent / "signer"

# A fresh parent runs the command and reports getrusage(RUSAGE_CHILDREN): the peak is the
# command's own, not the test process's (exec carries the forking process's high-water mark).
_PARENT = (
    "import resource, subprocess, sys\n"
    "p = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
    "sys.stderr.write(p.stderr)\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(p.returncode)\n"
)


def run_cli(*args: str | Path) -> tuple[int, str, int]:
    """``signer scan ARGS``: its exit code, stderr, and peak RSS (MiB) measured by the kernel."""
    proc = subprocess.run(
        [sys.executable, "-c", _PARENT, str(SIGNER), "scan", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return proc.returncode, proc.stderr, int(proc.stdout.split()[-1]) // 1024
