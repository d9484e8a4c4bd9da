"""``signer run`` restarts its token host and its TLS front when they die.

Issue 12: killing the token host under ``make run`` left the service NOT_SERVING for good.
Now each child is restarted with back-off (signer/_internal/supervisor.py), the service reconnects
at
once, and callers on both the Unix socket and mTLS are served again without anyone acting.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from signer._internal import config as config_mod
from signer.client import ClientTLS, SignerClient
from signer.errors import SignerError
from tests.conftest import wait_until
from tests.integration.conftest import SignerRun

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RECOVERY_SECONDS = 30.0


def p11kit_servers(root: Path) -> list[int]:
    """Pids of the p11-kit servers serving ``root``'s signing token."""
    socket = str(root.absolute() / "hsm" / "run" / "p11-kit.sock")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        pid = int(entry.name)
        # p11-kit server, exec'd in place of 'p11-kit server': the leader of its own group
        # (its p11-kit-remote children are in that group too).
        if socket.encode() in argv and b"--provider" in argv and _leads_group(pid):
            found.append(pid)
    return found


def _leads_group(pid: int) -> bool:
    try:
        return os.getpgid(pid) == pid
    except ProcessLookupError:
        return False


def signs(c: SignerClient) -> bool:
    try:
        return c.sign("demo", message=b"still here").version == 1
    except SignerError:
        return False


def mtls_client_works(signer_run: SignerRun) -> bool:
    root = signer_run.root
    tls = ClientTLS(
        root / "tls" / "ca.pem", *(root / "tls" / "clients" / n for n in ("dev.pem", "dev.key"))
    )
    try:
        with SignerClient(f"127.0.0.1:{signer_run.port}", tls=tls, timeout=5) as c:
            return c.get_key("demo").name == "demo"
    except SignerError:
        return False


def test_a_killed_token_host_is_restarted_and_signing_resumes(signer_run: SignerRun) -> None:
    """On the Unix socket and through the front: the front's TLS key is in the token host too,
    and its nginx held a session of the token host that died (the issue 15 prototype found
    mTLS refused for good after a token host restart)."""
    root = signer_run.root
    with sqlite3.connect(f"file:{root / 'audit.db'}?mode=ro", uri=True) as db:
        made = db.execute("SELECT caller, key FROM records WHERE operation = 'CreateKey'")
        # The demo keys are on record too.
        assert made.fetchall() == [("signer run", "demo"), ("signer run", "demo-tokens")]
    with SignerClient(f"unix:{root / 'run' / 'signer.sock'}", timeout=5) as c:
        assert signs(c)
        for kill in range(2):  # more than once: the first recovery is not all it can do
            [old] = p11kit_servers(root)
            os.killpg(old, signal.SIGKILL)  # the server and its p11-kit-remote children
            t0 = time.monotonic()

            def replaced(old: int = old) -> bool:
                return p11kit_servers(root) != [old]

            assert wait_until(replaced, 10)
            assert wait_until(lambda: signs(c), RECOVERY_SECONDS), signer_run.output
            assert wait_until(lambda: mtls_client_works(signer_run), RECOVERY_SECONDS), (
                signer_run.output
            )
            took = time.monotonic() - t0
            [new] = p11kit_servers(root)
            assert new != old
            print(f"kill {kill}: signing again {took:.2f} s after SIGKILL of the token host")
    assert "child restarted" in signer_run.output


def test_a_killed_front_is_restarted_and_mtls_works_again(signer_run: SignerRun) -> None:
    cfg = config_mod.load(signer_run.root / "signer.toml")
    pid_file = Path(cfg.front.workdir) / "nginx" / "nginx.pid"

    def mtls_works() -> bool:
        return mtls_client_works(signer_run)

    assert mtls_works()
    master = int(pid_file.read_text())
    os.kill(master, signal.SIGKILL)  # its workers live on, holding the port, until reaped
    t0 = time.monotonic()
    assert wait_until(
        lambda: pid_file.exists() and pid_file.read_text().strip() not in ("", str(master)),
        RECOVERY_SECONDS,
    ), signer_run.output
    assert wait_until(mtls_works, RECOVERY_SECONDS), signer_run.output
    print(f"mTLS served again {time.monotonic() - t0:.2f} s after SIGKILL of nginx's master")
    # The old master's workers are gone (they would have kept the port).
    with pytest.raises(ProcessLookupError):
        os.killpg(master, 0)
