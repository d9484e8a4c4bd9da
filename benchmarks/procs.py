"""The processes a scenario starts and watches: a service's configuration, start one and wait
until it answers, stop it at the end; CPU time, RSS and peak RSS from /proc; the members of a
process group (the token host and the p11-kit-remote serving each client)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from signer._internal import config, hsm
from signer.client import SignerClient
from signer.errors import SignerError

_TICK = os.sysconf("SC_CLK_TCK")


def write_service_config(
    path: Path,
    *,
    listen: Path,
    paths: hsm.HsmPaths,
    policy: Path,
    store: Path,
    audit: Path,
    front_socket: Path | None = None,
) -> Path:
    """A service's configuration: the production defaults, with its own sockets, policy, store
    and audit log, on the token host at ``paths``."""
    cfg = config.Config(
        server=config.ServerConfig(
            listen=f"unix:{listen}",
            front_socket=str(front_socket) if front_socket else "",
            policy_file=str(policy),
        ),
        token=config.TokenConfig(server_address=paths.server_address, pin_file=str(paths.user_pin)),
        store=config.StoreConfig(path=str(store)),
        audit=config.AuditConfig(path=str(audit)),
    )
    path.write_text(config.dump(cfg))
    return path


@contextlib.contextmanager
def started(argv: list[str], ready: Callable[[], bool]) -> Iterator[subprocess.Popen[bytes]]:
    """``argv`` running until ``ready()`` (60 s at most); SIGTERM (then SIGKILL) at the end."""
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 60
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{' '.join(argv[1:4])} did not start")
            time.sleep(0.1)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def answers(address: str) -> Callable[[], bool]:
    """Ready when the service at ``address`` answers ListKeys."""

    def ready() -> bool:
        try:
            with SignerClient(address, timeout=2) as c:
                c.list_keys()
            return True
        except SignerError:
            return False

    return ready


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (those that have gone count nothing)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def group(pgid: int) -> list[int]:
    """Every process of a process group."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.getpgid(int(entry.name)) == pgid:
                    pids.append(int(entry.name))
    return pids


def _status_mib(pid: int, field: str) -> float | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return None


def rss_mib(pid: int) -> float:
    """Resident set size now (0 for a process that has gone)."""
    return _status_mib(pid, "VmRSS:") or 0.0


def peak_rss_mib(pid: int) -> float:
    """The highest resident set size so far (NaN for a process that has gone)."""
    peak = _status_mib(pid, "VmHWM:")
    return float("nan") if peak is None else peak
