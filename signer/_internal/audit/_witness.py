"""Witnesses: every checkpoint written outside the database as well, where whoever can rewrite the
database cannot reach.

A hash chain with signed checkpoints shows a record changed, inserted or removed, but not records
cut from the end *together with* the checkpoints that covered them: the database alone cannot
tell a cut tail from a young log (issue 11). A witness can. Each checkpoint (sequence, hash, time,
previous checkpoint, signature) goes, before it is stored, to every configured witness and to the
service's own log, as one JSON object whose ``msg`` is ``"audit checkpoint"``:

* a file, opened append-only (put it on another mount, make it ``chattr +a``, ship it away);
* syslog, a datagram to a socket such as ``/dev/log`` (journald or rsyslog take it from there).

``signer audit-log verify --witness FILE`` reads any of these back (a witness file, the service's
log, ``journalctl -o cat`` output: any line holding such an object) and checks the log against
every signed checkpoint in it. A witness write that fails fails the checkpoint, which is retried;
the log's bound on unsigned records then refuses calls until one succeeds.
"""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from signer._internal.audit._chain import Checkpoint, refs_of, refs_text

MESSAGE = "audit checkpoint"
# syslog priority: facility LOG_AUTHPRIV (10), severity LOG_NOTICE (5).
_SYSLOG_PRIORITY = 10 * 8 + 5


def fields(c: Checkpoint) -> dict[str, Any]:
    """What a witness keeps of a checkpoint (and what the service logs with it)."""
    kept: dict[str, Any] = {
        "seq": c.seq,
        "hash": c.hash,
        "at": c.time,
        "prev": c.prev,
        "signature": base64.b64encode(c.signature).decode(),
    }
    if c.chain:  # a database's chains (replicas) may share one collector
        kept["chain"] = c.chain
    if c.refs:
        kept["refs"] = refs_text(c.refs)
    return kept


def _line(c: Checkpoint) -> str:
    return json.dumps({"msg": MESSAGE, **fields(c)}, separators=(",", ":"))


class Witness(Protocol):
    def write(self, checkpoint: Checkpoint) -> None:
        """Durably, or raise."""
        ...

    def close(self) -> None: ...


class FileWitness:
    """One JSON line per checkpoint, appended and synced (``O_APPEND``: never rewritten)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, checkpoint: Checkpoint) -> None:
        data = (_line(checkpoint) + "\n").encode()
        if os.write(self._fd, data) != len(data):
            raise OSError(f"short write to the audit witness {self.path}")
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)


class SyslogWitness:
    """A datagram per checkpoint to a syslog socket (``/dev/log``), tagged ``signer-audit``.
    Delivery is syslog's (it keeps what it received); a socket that does not take the datagram
    within a second fails the checkpoint rather than holding up the writer (any local user can
    fill ``/dev/log``'s queue)."""

    def __init__(self, address: str) -> None:
        self.address = address
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.settimeout(1.0)

    def write(self, checkpoint: Checkpoint) -> None:
        message = f"<{_SYSLOG_PRIORITY}>signer-audit[{os.getpid()}]: {_line(checkpoint)}"
        self._sock.sendto(message.encode(), self.address)

    def close(self) -> None:
        self._sock.close()


class WitnessError(ValueError):
    """A line that says it is a checkpoint but is not a well-formed one."""


def read_witness(path: str | Path, chain: str = "") -> Iterator[tuple[int, Checkpoint]]:
    """The checkpoints of ``chain`` in a witness, a service log or a syslog export, with their
    line numbers. Lines that are not checkpoints, or are another chain's, are skipped; a
    malformed checkpoint is a WitnessError."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            start = line.find("{")
            if start < 0 or MESSAGE not in line:
                continue
            try:
                item = json.loads(line[start:])
            except json.JSONDecodeError:
                continue
            if not isinstance(item, dict) or item.get("msg") != MESSAGE:
                continue
            try:
                prev = item["prev"]
                if str(item.get("chain", "")) != chain:
                    continue  # another chain's (replica's), in a shared collector
                yield (
                    number,
                    Checkpoint(
                        int(item["seq"]),
                        str(item["hash"]),
                        str(item["at"]),
                        base64.b64decode(item["signature"], validate=True),
                        None if prev is None else int(prev),
                        refs_of(item.get("refs")),
                        chain,
                    ),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise WitnessError(
                    f"{path}, line {number}: not a well-formed checkpoint ({exc})"
                ) from None
