"""signer.gate._receive: the core from the kernel's pipe into the quarantine file."""

from __future__ import annotations

import os
from pathlib import Path

from signer.gate._receive import receive


def test_a_pipe_that_goes_silent_is_given_up_and_said() -> None:
    """A dump stalled on a hung mapping: the gate stops waiting (and so frees its
    core_pipe_limit slot) rather than wait for ever; what came is kept. The writer stays open,
    so only the idle limit can end the read."""
    r, w = os.pipe()
    dst = os.open(os.devnull, os.O_WRONLY)
    try:
        os.write(w, b"\x7fELF" + bytes(100))
        got = receive(r, dst, max_bytes=1 << 20, min_free=0, idle=0.2)
    finally:
        for fd in (r, w, dst):
            os.close(fd)
    assert got.received == 104
    assert got.error == "reading the core failed: nothing came for 0.2 s"


def test_a_whole_core_is_stored_sparse(tmp_path: Path) -> None:
    data = b"\x7fELF" + bytes(3 << 20) + b"end"
    r, w = os.pipe()
    out = tmp_path / "core"
    dst = os.open(out, os.O_WRONLY | os.O_CREAT, 0o600)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the writer
        os.close(r)
        view = memoryview(data)
        while view:
            view = view[os.write(w, view) :]
        os._exit(0)
    os.close(w)
    got = receive(r, dst, max_bytes=1 << 30, min_free=0)
    os.waitpid(pid, 0)
    os.close(r)
    os.close(dst)
    assert (got.received, got.stored, got.error) == (len(data), len(data), None)
    assert out.read_bytes() == data
    assert out.stat().st_blocks * 512 < len(data)  # the zero megabytes are holes
