"""How the processes that hold secrets for us are started: the token host and the TLS front.

Both hold something a dump must never carry (SoftHSM2's key objects; the TLS token's PIN and
TLS session keys), so both run without core dumps, and both stop when whoever started them dies,
so a killed run leaves neither behind.
"""

from __future__ import annotations

import ctypes
import resource
import signal

PR_SET_PDEATHSIG = 1


def disable_core_dumps() -> None:
    """RLIMIT_CORE 0, inherited by every process the child starts."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def guarded_preexec() -> None:
    """preexec_fn: no core dumps, and SIGTERM if the parent dies without stopping the child."""
    disable_core_dumps()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
