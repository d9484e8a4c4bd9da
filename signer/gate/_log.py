"""The gate's log: one JSON line per decision (and per problem worth an operator's eye) in
``state_dir/gate.log`` and, when there is one, to syslog (``/dev/log``), logger ``signer.gate``.

A line names the process (pid, uid, executable, signal), the dump's size, the decision, its
reason and the time taken. Never a secret and never a finding's bytes: a reason names files,
representations and addresses at most.

Logging never blocks the gate. The crashed process may be the syslog daemon itself (journald,
rsyslog): the kernel holds it until the gate exits, no one drains ``/dev/log`` meanwhile, and a
blocking send into its full queue would wait for ever, holding the crashed process and one of
the kernel's ``core_pipe_limit`` slots. So the syslog socket is non-blocking and a line it cannot
take at once is dropped (:class:`NonBlockingSyslog`); ``gate.log`` still has it.
"""

from __future__ import annotations

import contextlib
import logging
import logging.handlers
import os
import socket
from pathlib import Path
from typing import Any

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
            syslog = NonBlockingSyslog(SYSLOG, facility=NonBlockingSyslog.LOG_DAEMON)
            syslog.ident = "signer-dump-gate: "
            syslog.setFormatter(formatter)
            log.addHandler(syslog)
    if not log.handlers:
        log.addHandler(logging.NullHandler())
    return log


class NonBlockingSyslog(logging.handlers.SysLogHandler):
    """A SysLogHandler for a local socket (``/dev/log``) whose every step is non-blocking: the
    socket is made ``SOCK_NONBLOCK`` (its connect too: a stream socket's listener with a full
    backlog would otherwise hold ``connect``), and a line the socket cannot take at once is
    dropped and counted (``dropped``), never waited for. The stock handler blocks in ``send``
    on a full queue, and on any error reconnects with a blocking socket and sends again."""

    dropped = 0

    def _connect_unixsocket(self, address: Any) -> None:
        types = [self.socktype] if self.socktype is not None else [socket.SOCK_DGRAM]
        if self.socktype is None:
            types.append(socket.SOCK_STREAM)  # as the stock handler, for a stream /dev/log
        error: OSError | None = None
        for kind in types:
            sock = socket.socket(socket.AF_UNIX, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
            try:
                sock.connect(address)
            except OSError as exc:  # BlockingIOError too: a stream listener's backlog is full
                sock.close()
                error = exc
                continue
            self.socket, self.socktype = sock, kind
            return
        assert error is not None
        raise error

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = self.format(record)
            if self.ident:
                msg = self.ident + msg
            if self.append_nul:
                msg += "\000"
            prio = self.encodePriority(self.facility, self.mapPriority(record.levelname))
            data = f"<{prio}>".encode() + msg.encode("utf-8")
        except Exception:
            self.handleError(record)
            return
        for attempt in (1, 2):
            try:
                if not self.socket:
                    self._connect_unixsocket(self.address)
                sent = self.socket.send(data, socket.MSG_DONTWAIT)
                if sent < len(data):  # a stream's partial line: its framing is lost
                    self._drop_socket()
                    break
                return
            except BlockingIOError:
                # Full: whoever reads /dev/log is not reading (it may be the crashed process).
                if self.socktype != socket.SOCK_DGRAM:
                    self._drop_socket()  # a stream may hold part of the line
                break
            except OSError:
                # The daemon restarted (a new socket at the path): once more on a new
                # connection, as the stock handler does, but non-blocking.
                self._drop_socket()
                if attempt == 2:
                    break
        self.dropped += 1

    def _drop_socket(self) -> None:
        if self.socket:
            with contextlib.suppress(OSError):
                self.socket.close()
        self.socket = None  # type: ignore[assignment]
