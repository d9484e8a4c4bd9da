"""A throwaway PostgreSQL cluster for the tests (issue 16): initdb into a temporary directory,
started with its socket in that directory and no TCP at all, removed with everything in it.

PostgreSQL refuses to run as root, and ``make test`` runs as root here: the cluster is then
owned by and run as ``postgres``, the user Debian's postgresql-common creates, through
subprocess's setuid in the child (no sudo or runuser). The directory is made with
:func:`tempfile.mkdtemp` under ``/tmp``, not under pytest's ``tmp_path``:
``/tmp/pytest-of-root`` is 0700 and root's, so ``postgres`` could not enter it. It is 0700
and ``postgres``'s, so ``-A trust`` on the socket alone is safe.

The cluster's collation is ICU ``en-US``, not C: SQL that relies on byte order by accident (as
SQLite's BINARY collation gives everywhere) shows as a test failure here, not in production
(``ORDER BY name`` gives ``a, B, k-2, K0`` under en-US, ``B, K0, a, k-2`` in C).

Unit tests use ``durable=False`` (fsync, synchronous_commit and full_page_writes off: about
0.8 s from initdb to stop, PLAN.md 1); durability tests want ``durable=True``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

BINDIR_ENV = "SIGNER_PG_BINDIR"
# Debian's postgresql-15; not on PATH (its binaries live under /usr/lib/postgresql/N/bin).
DEBIAN_PACKAGE = "postgresql-15"


def bindir() -> Path | None:
    """Where initdb and pg_ctl are: $SIGNER_PG_BINDIR, else Debian's newest version."""
    if given := os.environ.get(BINDIR_ENV):
        return Path(given)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    return Path(found[-1]).parent if found else None


class Cluster:
    """One cluster in its own 0700 directory: ``init()``, ``start()``, ``stop()``, ``remove()``."""

    def __init__(self, bin_dir: Path, durable: bool = False) -> None:
        self.bin = bin_dir
        self.durable = durable
        self.user = "postgres" if os.geteuid() == 0 else None
        # Short on purpose: the socket's path must fit sun_path (107 bytes).
        self.dir = Path(tempfile.mkdtemp(prefix="signer-pg-", dir="/tmp"))
        self.data = self.dir / "data"
        self.log = self.dir / "log"
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        os.chmod(self.dir, 0o700)

    def _run(self, tool: str, *args: str) -> None:
        uid = gid = None
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            uid, gid = pw.pw_uid, pw.pw_gid
        done = subprocess.run(
            [str(self.bin / tool), *args],
            cwd=self.dir,
            env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
            # subprocess's own setuid, not a preexec_fn: safe with the pool's threads running.
            user=uid,
            group=gid,
            extra_groups=None if uid is None else [],
        )
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise RuntimeError(f"{tool} {' '.join(args)} failed: {done.stdout}{log}")

    def init(self, **extra: str) -> None:
        """``extra``: postgresql.conf settings of the caller's, after the cluster's own (the
        benchmark's shared_preload_libraries, say)."""
        self._run(
            "initdb",
            *("-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8"),
            *("--locale=C.UTF-8", "--locale-provider=icu", "--icu-locale=en-US"),
            "--no-sync",
            "--no-instructions",
        )
        settings = {
            "listen_addresses": "''",  # no TCP: the socket in our 0700 directory only
            "unix_socket_directories": f"'{self.dir}'",
            "unix_socket_permissions": "0700",
            "max_connections": "100",
            "shared_buffers": "16MB",
            "logging_collector": "off",
        }
        if not self.durable:
            settings |= {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}
        settings |= extra
        with (self.data / "postgresql.conf").open("a") as f:
            f.writelines(f"{k} = {v}\n" for k, v in settings.items())

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")

    def dsn(self, database: str = "postgres", **options: str) -> str:
        """A ``postgresql://`` URL on the socket (``host`` always given: never the
        environment's PGHOST, nor the package's own ``main`` cluster)."""
        query = f"host={self.dir}&user=postgres"
        if options:
            settings = " ".join(f"-c {k}={v}" for k, v in options.items())
            query += "&options=" + settings.replace(" ", "%20").replace("=", "%3D")
        return f"postgresql:///{database}?{query}"

    def pids(self) -> list[int]:
        """The postmaster and its children (backends, WAL writer, checkpointer...): its CPU."""
        try:
            postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return []
        pids = [postmaster]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                with contextlib.suppress(OSError, IndexError, ValueError):
                    stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    if int(stat[1]) == postmaster:
                        pids.append(int(entry.name))
        return pids

    def remove(self) -> None:
        """Stops the server if it runs (immediately: its data is thrown away) and removes the
        directory; safe to call twice."""
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)
