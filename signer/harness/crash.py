"""Ways to crash a process, each a real kernel-delivered fatal event.

Signals are sent with kill(2). The two native faults use gdb: it attaches, points one thread's
program counter at address 0 and detaches, so that thread really faults (an instruction fetch
from an unmapped page) with its own stack in the dump. "pkcs11-call" picks a thread that is
inside the PKCS#11 module (p11-kit-client.so, or libsofthsm2.so in-process) at that moment, i.e.
in the middle of a PKCS#11 call.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
from dataclasses import dataclass

from signer.errors import HarnessError

SIGNALS: dict[str, int] = {
    "SIGSEGV": signal.SIGSEGV,
    "SIGBUS": signal.SIGBUS,
    "SIGFPE": signal.SIGFPE,
    "SIGILL": signal.SIGILL,
    "SIGABRT": signal.SIGABRT,
    "SIGQUIT": signal.SIGQUIT,
}
FAULTS = ("worker-fault", "pkcs11-call-fault")
FATAL = (*SIGNALS, *FAULTS)
SNAPSHOTS = ("gcore", "gcore-a")
MECHANISMS = (*FATAL, *SNAPSHOTS)

# Runs inside gdb. Chooses a thread, makes it jump to address 0, detaches.
_GDB_SCRIPT = r"""
import gdb

want = gdb.convenience_variable("want")
want = want.string() if want is not None else "worker"

def libraries(thread):
    thread.switch()
    libs = []
    frame = gdb.newest_frame()
    depth = 0
    while frame is not None and depth < 64:
        libs.append(gdb.solib_name(frame.pc()) or "")
        try:
            frame = frame.older()
        except gdb.error:
            break
        depth += 1
    return libs

inferior = gdb.selected_inferior()
pid = inferior.pid
chosen = None
for thread in sorted(inferior.threads(), key=lambda t: t.num):
    lwp = thread.ptid[1]
    if lwp == pid:
        continue  # never the main thread: the point is a worker
    libs = libraries(thread)
    if want == "pkcs11":
        # The PKCS#11 module: p11-kit's client, or SoftHSM2 itself when loaded in-process.
        if any("p11-kit-client" in lib or "softhsm" in lib for lib in libs):
            chosen = thread
            break
    elif any(lib for lib in libs):
        chosen = chosen or thread
if chosen is None:
    print("HARNESS-NO-THREAD")
else:
    chosen.switch()
    print("HARNESS-THREAD %d" % chosen.ptid[1])
    gdb.execute("set var $pc = 0")
gdb.execute("detach")
"""


@dataclass(frozen=True)
class Fault:
    lwp: int


def deliver(pid: int, mechanism: str, attempts: int = 20) -> str:
    """Crashes ``pid`` with ``mechanism``; returns what was done, for the report."""
    if mechanism in SIGNALS:
        os.kill(pid, SIGNALS[mechanism])
        return f"kill({mechanism})"
    if mechanism not in FAULTS:
        raise ValueError(f"unknown crash mechanism {mechanism!r}")
    want = "pkcs11" if mechanism == "pkcs11-call-fault" else "worker"
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as fh:
        fh.write(_GDB_SCRIPT)
        script = fh.name
    try:
        # A thread inside a PKCS#11 call is a moment, not a state: try again until one is caught.
        for _ in range(attempts):
            out = subprocess.run(
                [
                    "gdb",
                    "-nx",
                    "-batch",
                    "-p",
                    str(pid),
                    "-ex",
                    f'set $want = "{want}"',
                    "-x",
                    script,
                ],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            for line in out.stdout.splitlines():
                if line.startswith("HARNESS-THREAD "):
                    return f"gdb: thread {line.split()[1]} jumped to 0 ({want})"
        raise HarnessError(f"no {want} thread found in pid {pid} after {attempts} tries")
    finally:
        os.unlink(script)
