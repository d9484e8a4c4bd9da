"""How the processes that hold secrets for us are started: the token host and the TLS front.

Both hold something a dump must never carry (SoftHSM2's key objects; the TLS token's PIN and
TLS session keys), so both run without core dumps, and both stop when whoever started them dies,
so a killed run leaves neither behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import signal
from types import FrameType
from typing import Protocol

from signer.errors import FailedPrecondition

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4


def disable_core_dumps() -> None:
    """RLIMIT_CORE 0, inherited by every process the child starts."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def never_dump() -> None:
    """No core of this process whatever ``core_pattern`` is: not dumpable, and RLIMIT_CORE 1.
    A limit of 0 stops file cores only: a pipe handler (the dump gate, systemd-coredump)
    ignores it, except for 1, which the kernel reads as "a pipe handler crashed: no dump"
    (and which is below the smallest file core). For processes that hold what dumps must not:
    the dump gate and the scanner's workers."""
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_CORE)
        # RLIM_INFINITY is -1 here: min(1, hard) would ask for no limit at all.
        soft = 1 if hard == resource.RLIM_INFINITY else min(1, hard)
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    # Not dumpable as well (it cannot fail for this process's own flag; if it did, the limit
    # above would still stop file and pipe cores).
    _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)


# Looked up once, here: a supervisor restarts children from a process full of threads, and the
# forked child must not call dlopen/dlsym (another thread may have held the loader's lock at
# the fork); calling an already resolved function is safe there.
_prctl = ctypes.CDLL(None).prctl


def die_with_parent(sig: signal.Signals = signal.SIGTERM) -> None:
    """``sig`` to this process when the thread that started it ends (PR_SET_PDEATHSIG)."""
    _prctl(PR_SET_PDEATHSIG, sig)


def guarded_preexec() -> None:
    """preexec_fn: no core dumps, and SIGTERM if the parent dies without stopping the child.

    (PR_SET_PDEATHSIG fires when the *thread* that started the child ends: children are started
    from the main thread or from a supervisor's thread, which live as long as the parent.)"""
    disable_core_dumps()
    die_with_parent(signal.SIGTERM)


class Child(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def wait(self) -> int: ...
    def poll(self) -> int | None:
        """Its exit status once it has exited on its own; None while it runs (or was stopped)."""
        ...


def run_in_foreground(child: Child, banner: str, what: str) -> int:
    """Starts ``child``, prints ``banner``, and runs until SIGTERM/SIGINT (then stops it, exit 0)
    or until it exits on its own (FAILED_PRECONDITION naming ``what`` and its status)."""
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        child.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    child.start()
    print(banner, flush=True)
    status = child.wait()
    if not stopping:
        child.stop()
        raise FailedPrecondition(f"{what} exited unexpectedly with status {status}")
    return 0
