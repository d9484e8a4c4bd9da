"""The core from the kernel's pipe into the quarantine: in bounded chunks, never all in memory.

The kernel streams the core on standard input and does not reap the crashed process until the
gate has read it to the end or closed the pipe. When the gate stops storing (a core over
``max_core_bytes``, a quarantine short of space, a write that fails) it stops reading and closes
the pipe (:func:`let_go`): the kernel ends the dump, and no dump holds a core_pipe_limit slot for
longer than the gate takes to store what it keeps; a silent pipe is given up after
``IDLE_SECONDS``. A chunk of zeros is not written but skipped over, so the copy is as sparse
as the kernel's own cores (the dumper seeks over zero pages) and the scanner does not read those
holes.
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections.abc import Callable
from dataclasses import dataclass

CHUNK = 1 << 20
_ZERO = bytes(CHUNK)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


@dataclass(frozen=True)
class Received:
    """What came in: ``stored`` bytes are in the file; ``received`` counts every byte read
    (stored or not). ``truncated``: stopped at max_core_bytes. ``no_space`` and ``error`` say
    why storing stopped otherwise (None when it did not)."""

    stored: int
    received: int
    truncated: bool
    no_space: str | None
    error: str | None
    seconds: float


IDLE_SECONDS = 300.0
"""How long the kernel may send nothing before the gate stops reading: a dump stalled on a hung
mapping (a dead NFS or FUSE file) must not hold a core_pipe_limit slot for ever."""


RECHECK = 64 << 20
"""How much a dump may write between two looks at the quarantine's room (max_quarantine_bytes):
with core_pipe_limit dumps at once, the quota is overshot by at most that many times this."""


def let_go(src: int) -> None:
    """The kernel's pipe closed (``/dev/null`` in its place): the kernel's next write fails and
    it ends the dump, so a dump the gate will not keep does not hold the crashed process."""
    null = os.open(os.devnull, os.O_RDONLY)
    try:
        os.dup2(null, src)
    finally:
        os.close(null)


class Stalled(OSError):
    """Nothing came for the idle limit; ``filled`` bytes had come before."""

    def __init__(self, idle: float, filled: int) -> None:
        super().__init__(errno.ETIMEDOUT, f"nothing came for {idle:g} s")
        self.filled = filled


def fill(src: int, view: memoryview, idle: float) -> int:
    """Reads until ``view`` is full or the input ends (a pipe gives at most 64 KiB a read);
    raises Stalled when nothing comes for ``idle`` seconds."""
    filled = 0
    poll = select.poll()
    poll.register(src, select.POLLIN)
    while filled < len(view):
        if not poll.poll(int(idle * 1000)):
            raise Stalled(idle, filled)
        try:
            n = os.readv(src, [view[filled:]])
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
        if n == 0:
            break
        filled += n
    return filled


def _free(fd: int) -> int:
    st = os.fstatvfs(fd)
    return st.f_bavail * st.f_frsize


def receive(
    src: int,
    dst: int,
    *,
    max_bytes: int,
    min_free: int,
    idle: float = IDLE_SECONDS,
    room: Callable[[], int] | None = None,
) -> Received:
    """Copies ``src`` (the pipe) to ``dst`` (the quarantine file, open for writing) until the
    input ends; stores at most ``max_bytes``, and nothing that would leave the file system with
    less than ``min_free`` bytes free, nor data past ``room()`` (what the quarantine may still
    hold under max_quarantine_bytes, asked again every RECHECK bytes since other dumps fill it
    at the same time; None: no limit). Reads errors of the input as the end of it (the kernel
    has gone), and so a pipe silent for ``idle`` seconds (``error`` says so).

    Once nothing more will be kept (cut at max_bytes, no space, a write error) it stops reading:
    the caller lets go of the pipe (:func:`let_go`) and the kernel ends the dump. Reading the
    rest only to throw it away let one user hold every core_pipe_limit slot with a sparse
    mapping of terabytes that the kernel streams as zeros (review)."""
    began = time.monotonic()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    stored = received = since = allowance = 0
    truncated = False
    no_space: str | None = None
    error: str | None = None
    storing = True
    stalled: str | None = None
    try:
        while storing and stalled is None:
            try:
                n = fill(src, view, idle)
            except Stalled as exc:  # what came before the silence is kept
                n, stalled = exc.filled, f"reading the core failed: {exc.strerror}"
            except OSError as exc:
                error = error or f"reading the core failed: {exc.strerror or exc}"
                break
            if n == 0:
                break
            received += n
            keep = min(n, max_bytes - stored)
            if keep < n:
                truncated, storing = True, False
            if keep == 0:
                continue
            chunk = view[:keep]
            if (buf if keep == CHUNK else bytes(chunk)) == _ZERO[:keep]:
                os.lseek(dst, keep, os.SEEK_CUR)
                stored += keep
                continue
            if room is not None and since + keep > allowance:
                left = room()
                since, allowance = 0, min(left, RECHECK)
                if keep > left:
                    no_space = (
                        f"the quarantine is full: storing {keep} more bytes would take it past "
                        "max_quarantine_bytes"
                    )
                    storing = False
                    continue
            free = _free(dst)
            if free - keep < min_free:
                no_space = (
                    f"the quarantine file system has {free} bytes free: storing "
                    f"{keep} more would leave less than min_free_bytes ({min_free})"
                )
                storing = False
                continue
            try:
                written = 0
                while written < keep:
                    written += os.write(dst, chunk[written:])
                stored += keep
                since += keep
            except OSError as exc:
                storing = False
                if exc.errno in _NO_SPACE:
                    no_space = f"writing the core failed: {exc.strerror}"
                else:
                    error = f"writing the core failed: {exc.strerror or exc}"
        error = error or stalled
        if storing or truncated:
            try:
                os.ftruncate(dst, stored)  # the holes skipped at the end
                os.fsync(dst)
            except OSError as exc:
                if exc.errno in _NO_SPACE:
                    no_space = no_space or f"syncing the core failed: {exc.strerror}"
                else:
                    error = error or f"syncing the core failed: {exc.strerror or exc}"
    finally:
        view.release()
    return Received(stored, received, truncated, no_space, error, time.monotonic() - began)
