"""How the processes that hold secrets for us are started: the token host and the TLS front.

Both hold something a dump must never carry (SoftHSM2's key objects; the TLS token's PIN and
TLS session keys), so both run without core dumps, and both stop when whoever started them dies,
so a killed run leaves neither behind.
"""

from __future__ import annotations

import ctypes
import resource
import signal
from types import FrameType
from typing import Protocol

from signer.errors import FailedPrecondition

PR_SET_PDEATHSIG = 1


def disable_core_dumps() -> None:
    """RLIMIT_CORE 0, inherited by every process the child starts."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


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
