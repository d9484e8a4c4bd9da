"""The dump gate: every core dump on the host scanned as the kernel writes it; one with key
material never leaves quarantine (issue 14, DESIGN.md section 8).

``signer dump-gate install`` makes the kernel's ``core_pattern`` run ``signer dump-gate handle``
(:func:`handle`) for every crash, with the core on standard input. The handler streams it into a
root-only quarantine directory, scans it in a child process within a time budget (known
secrets, blind detection against public keys, structural private-key detectors), and releases
a clean one where dumps went before (the handler it replaced, e.g. systemd-coredump, or a
directory). Anything else stays in quarantine, or is not kept, and says why:

    cfg = load_config("/etc/signer/dump-gate.toml")        # ConfigError naming the line
    outcome = handle(path, Crash(pid, tid, uid, gid, signal, time, limit, host, exe), stdin=0)
    outcome.decision, outcome.reason, outcome.entry        # 'released', 'quarantined:...', ...

See :mod:`signer.gate._handler` for the decision table.
"""

from signer.gate._config import DEFAULT_CONFIG, GateConfig, load_config
from signer.gate._crash import Crash
from signer.gate._handler import DECISIONS, Outcome, decide, handle
from signer.gate._layout import GateRoot
from signer.gate._scan import build_scanner

__all__ = [
    "DECISIONS",
    "DEFAULT_CONFIG",
    "Crash",
    "GateConfig",
    "GateRoot",
    "Outcome",
    "build_scanner",
    "decide",
    "handle",
    "load_config",
]
