"""What each process sets about itself, checked on the running processes.

* The token host writes no core dump (RLIMIT_CORE 0, inherited by every p11-kit-remote) and no
  other user can attach to it or read its memory.
* The service keeps core dumps (they are how crashes get debugged, and they hold no key) and sets
  its coredump_filter deliberately instead of inheriting whatever its parent had.
"""

from __future__ import annotations

import ctypes
import errno
import os
from pathlib import Path

import pytest

from tests.conftest import RunningService, ServiceProcessFactory, TokenHostHandle, gone_soon

pytestmark = pytest.mark.integration

NOBODY = 65534


def _probe_as_nobody(pid: int) -> tuple[str, str, str]:
    """In a forked child that became ``nobody``: PTRACE_ATTACH ``pid``, read its memory and
    environment. Returns each outcome ("ok" or the errno name)."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            libc = ctypes.CDLL(None, use_errno=True)
            rc = libc.ptrace(16, pid, None, None)  # PTRACE_ATTACH
            results = ["ok" if rc == 0 else errno.errorcode.get(ctypes.get_errno(), "?")]
            for name in ("mem", "environ"):
                try:
                    with open(f"/proc/{pid}/{name}", "rb") as fh:
                        fh.read(1)
                    results.append("ok")
                except OSError as exc:
                    results.append(errno.errorcode.get(exc.errno or 0, "?"))
            os.write(write_end, " ".join(results).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end, "rb") as fh:
        attach, mem, environ = fh.read().decode().split()
    return attach, mem, environ


def _token_host_pids(token_host: TokenHostHandle) -> list[int]:
    pgid = token_host.host.pid
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def test_no_other_user_can_attach_to_the_token_host(
    token_host: TokenHostHandle, service: RunningService
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to probe the token host as another user: run 'sudo make test'")
    service.client().list_keys()  # a connected service: a p11-kit-remote child exists
    pids = _token_host_pids(token_host)
    assert len(pids) >= 2, "p11-kit server and at least one p11-kit-remote"
    for pid in pids:
        attach, mem, environ = _probe_as_nobody(pid)
        assert attach == "EPERM", (pid, attach)
        assert mem in ("EACCES", "EPERM"), (pid, mem)
        assert environ in ("EACCES", "EPERM"), (pid, environ)
        limits = Path(f"/proc/{pid}/limits").read_text()
        core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
        assert core.split()[4:6] == ["0", "0"], core


def test_the_service_keeps_dumps_and_sets_its_filter(
    service_process_factory: ServiceProcessFactory,
) -> None:
    sp = service_process_factory()
    assert Path(f"/proc/{sp.pid}/coredump_filter").read_text().strip() == "00000033"
    # RLIMIT_CORE is left as inherited (here, whatever pytest had): the service does not turn
    # dumps off for itself, because its dumps are meant to exist and to be clean.
    mine = Path("/proc/self/limits").read_text().splitlines()
    theirs = Path(f"/proc/{sp.pid}/limits").read_text().splitlines()

    def pick(lines: list[str]) -> str:
        return next(x for x in lines if x.startswith("Max core file size"))

    assert pick(theirs) == pick(mine)


def test_a_token_host_dies_with_whoever_started_it(tmp_path: Path) -> None:
    """A killed test run or harness must not leave a token host (and its PIN-holding children)
    running: p11-kit server gets SIGTERM when its parent dies (PR_SET_PDEATHSIG)."""
    import subprocess
    import sys

    script = (
        "import os, sys\n"
        "from signer._internal import hsm\n"
        "hsm.init(sys.argv[1])\n"
        "host = hsm.TokenHost(sys.argv[1])\n"
        "host.start()\n"
        "print(*host.pids, flush=True)\n"
        "os._exit(0)\n"  # dies without stopping it
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "hsm")],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    pids = [int(p) for p in out.stdout.split()]
    assert len(pids) == 2, "one p11-kit server per token: signing and TLS"
    survivors = [pid for pid in pids if not gone_soon(pid)]
    assert not survivors, "the token host outlived the process that started it"
