"""signer.gate._log: the gate's log never blocks it, even when whoever reads /dev/log does not
(the crashed process may be the syslog daemon, held by the kernel until the gate exits)."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from logging.handlers import SysLogHandler
from pathlib import Path

import pytest

from signer.gate import _log
from signer.gate._log import LOGGER, gate_logger


@pytest.fixture
def dev_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A /dev/log of our own that nobody reads."""
    path = tmp_path / "dev-log"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    server.bind(str(path))
    monkeypatch.setattr(_log, "SYSLOG", str(path))
    yield server
    server.close()
    gate_logger(None)  # closes the handlers bound to this socket


def _fill(path: str) -> int:
    """Sends to ``path`` until its queue is full (EAGAIN); how many datagrams it took."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.setblocking(False)
        s.connect(path)
        n = 0
        while True:
            try:
                s.send(b"x" * 1024)
            except BlockingIOError:
                return n
            n += 1


def test_a_full_syslog_queue_drops_the_line_and_the_file_still_has_it(
    dev_log: socket.socket, tmp_path: Path
) -> None:
    log = gate_logger(tmp_path)
    (syslog,) = (h for h in log.handlers if isinstance(h, SysLogHandler))
    assert _fill(dev_log.getsockname()) > 0
    done = threading.Event()

    def decide() -> None:
        log.info("decision", extra={"decision": "released", "pid": 42})
        done.set()

    # A daemon thread: without the fix it blocks in send for ever, and must not hold pytest.
    threading.Thread(target=decide, daemon=True).start()
    assert done.wait(10), "a log call blocked on a syslog socket nobody reads"
    assert getattr(syslog, "dropped", None) == 1
    lines = (tmp_path / "gate.log").read_text().splitlines()
    assert json.loads(lines[-1])["decision"] == "released"


def test_syslog_gets_the_line_when_it_has_room(dev_log: socket.socket, tmp_path: Path) -> None:
    log = gate_logger(tmp_path)
    assert log.name == LOGGER
    log.info("decision", extra={"decision": "quarantined:findings"})
    dev_log.settimeout(5)
    data = dev_log.recv(65536)
    assert data.startswith(b"<30>signer-dump-gate: {")  # daemon.info
    assert json.loads(data.split(b": ", 1)[1].rstrip(b"\0"))["decision"] == "quarantined:findings"


def test_a_restarted_daemon_is_reached_again_without_blocking(
    dev_log: socket.socket, tmp_path: Path
) -> None:
    """The daemon's socket replaced (a restart): the handler reconnects, non-blocking."""
    log = gate_logger(tmp_path)
    (syslog,) = (h for h in log.handlers if isinstance(h, SysLogHandler))
    path = dev_log.getsockname()
    dev_log.close()
    Path(path).unlink()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as again:
        again.bind(path)
        log.info("after the restart")
        again.settimeout(5)
        assert b"after the restart" in again.recv(65536)
        assert vars(syslog)["socket"].getblocking() is False
        _fill(path)
        log.info("dropped")
    assert getattr(syslog, "dropped", None) == 1
