"""The gate's log: one JSON line per decision (and per problem worth an operator's eye) in
``state_dir/gate.log`` and, when there is one, to syslog (``/dev/log``), logger ``signer.gate``.

A line names the process (pid, uid, executable, signal), the dump's size, the decision, its
reason and the time taken. Never a secret and never a finding's bytes: a reason names files,
representations and addresses at most.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
from pathlib import Path

from signer._internal.logs import JsonFormatter

LOGGER = "signer.gate"
SYSLOG = "/dev/log"


def gate_logger(state_dir: Path | None) -> logging.Logger:
    """``signer.gate``, writing to ``state_dir/gate.log`` (created 0600) and syslog; whichever
    cannot be opened is left out (a gate that cannot log still decides, and fails closed)."""
    log = logging.getLogger(LOGGER)
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    formatter = JsonFormatter()
    if state_dir is not None:
        path = state_dir / "gate.log"
        with contextlib.suppress(OSError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600))
            file_handler = logging.FileHandler(path, encoding="utf-8")
            file_handler.setFormatter(formatter)
            log.addHandler(file_handler)
    if os.path.exists(SYSLOG):
        with contextlib.suppress(OSError):
            syslog = logging.handlers.SysLogHandler(
                SYSLOG, facility=logging.handlers.SysLogHandler.LOG_DAEMON
            )
            syslog.ident = "signer-dump-gate: "
            syslog.setFormatter(formatter)
            log.addHandler(syslog)
    if not log.handlers:
        log.addHandler(logging.NullHandler())
    return log
