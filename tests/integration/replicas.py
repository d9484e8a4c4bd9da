"""Replicas for the tests (issue 16): N ``signer serve`` processes sharing the session's token
host and one PostgreSQL schema, each with its own sockets, audit chain (r1, r2, ...), pinned
audit key, archive directory and witness, and the mTLS front with every replica's front socket
as one nginx upstream (signer._internal.front, README "Replicas")."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from signer._internal import config as config_mod
from signer._internal.front import Front, front_config
from signer._internal.pki import DevCA
from signer._internal.policy import grant_everything
from signer.client import ClientTLS, SignerClient
from tests import postgres
from tests.conftest import (
    SIGNER_BIN,
    TokenHostHandle,
    _serving,
    free_port,
    make_config,
    socket_address,
    wait_until,
    write_toml,
)

CLIENT = "payments"
CLIENT_IDENTITY = "x509:O=acme,CN=payments"


@dataclass
class Replica:
    """One ``signer serve`` process: its own socket (direct calls), its front socket (the
    front's upstream), its config (its chain)."""

    name: str  # its audit chain
    config_path: Path
    address: str  # unix:... of its own socket
    front_socket: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [str(SIGNER_BIN), "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, timeout: float = 10.0) -> SignerClient:
        """A caller on the replica's own socket (uid:, granted everything): not the front."""
        return SignerClient(self.address, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL, and reaped."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def verify(self) -> subprocess.CompletedProcess[str]:
        """``signer audit-log verify`` of this replica's chain (its config names the chain, its
        pinned key and its witness)."""
        return subprocess.run(
            [str(SIGNER_BIN), "audit-log", "verify", "--config", str(self.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )


@dataclass
class ReplicaSet:
    replicas: list[Replica]
    front: Front
    pki: DevCA
    dsn: str
    cluster: postgres.Cluster

    @property
    def address(self) -> str:
        return self.front.cfg.front.listen

    def client(self, timeout: float = 10.0) -> SignerClient:
        """A caller through the front (mTLS, CN=payments of O=acme)."""
        cert, key = self.pki.client_files(CLIENT)
        return SignerClient(self.address, tls=ClientTLS(self.pki.cert, cert, key), timeout=timeout)

    def records(self) -> list[dict[str, Any]]:
        """Every audit record of every chain in the database, oldest first per chain."""
        import psycopg
        from psycopg.rows import dict_row

        with psycopg.connect(self.dsn, autocommit=True, row_factory=dict_row) as conn:
            return list(
                conn.execute(
                    "SELECT chain, seq, caller, operation, key, payload_sha256, status "
                    "FROM records ORDER BY chain, seq"
                )
            )

    def stop(self) -> None:
        self.front.stop()
        for r in self.replicas:
            r.stop()


class ReplicaFactory(Protocol):
    """The ``replica_set`` fixture's type: ``replica_set(3)``."""

    def __call__(self, n: int = ..., **sections: dict[str, Any]) -> ReplicaSet: ...


@pytest.fixture(scope="module")
def replica_pki(token_host: TokenHostHandle, tmp_path_factory: pytest.TempPathFactory) -> DevCA:
    ca = DevCA.ensure(tmp_path_factory.mktemp("tls"))
    ca.issue_server(token_host.paths.tls_public_key.read_bytes(), ["localhost", "127.0.0.1"])
    ca.issue_client(CLIENT, "acme")
    return ca


def _replica_config(
    token_host: TokenHostHandle,
    directory: Path,
    name: str,
    dsn: str,
    sections: dict[str, dict[str, Any]],
) -> tuple[config_mod.Config, Path]:
    directory.mkdir(mode=0o700)
    policy = directory / "policy.toml"
    policy.write_text(grant_everything([f"uid:{os.getuid()}", CLIENT_IDENTITY]))
    front_socket = Path(socket_address().removeprefix("unix:"))
    server = {"front_socket": str(front_socket), "policy_file": str(policy)}
    server |= sections.get("server", {})
    audit = {
        "path": dsn,
        "chain": name,
        "public_key_file": str(directory / "audit.key.pem"),
        "archive_dir": str(directory / "archive"),
        "witness_file": str(directory / "witness.jsonl"),
    }
    audit |= sections.get("audit", {})
    cfg = make_config(
        directory,
        token_host.token_config(),
        **{**sections, "server": server, "audit": audit},
    )
    return dataclasses.replace(cfg, store=config_mod.StoreConfig(path=dsn)), front_socket


@pytest.fixture
def replica_set(
    token_host: TokenHostHandle,
    replica_pki: DevCA,
    pg_cluster: postgres.Cluster,
    pg_dsn: str,
    tmp_path: Path,
) -> Iterator[ReplicaFactory]:
    """``replica_set(n)``: n replicas on this test's PostgreSQL schema (store and audit log,
    chains r1..rn) and the front with all n upstreams, each replica answering health before
    it returns; all stopped after the test."""
    started: list[ReplicaSet] = []

    def start(n: int = 3, **sections: dict[str, Any]) -> ReplicaSet:
        replicas: list[Replica] = []
        for i in range(1, n + 1):
            name = f"r{i}"
            cfg, front_socket = _replica_config(token_host, tmp_path / name, name, pg_dsn, sections)
            path = write_toml(tmp_path / name / "signer.toml", cfg)
            replicas.append(
                Replica(name, path, cfg.server.listen, front_socket, tmp_path / name / "log")
            )
        front_cfg = front_config(
            token_host.paths,
            replica_pki,
            listen=f"127.0.0.1:{free_port()}",
            upstream=[r.front_socket for r in replicas],
            workdir=tmp_path / "front",
        )
        front = Front(config_mod.Config(front=front_cfg))
        rs = ReplicaSet(replicas, front, replica_pki, pg_dsn, pg_cluster)
        started.append(rs)
        for r in replicas:  # together: the first start migrates, the others wait on its lock
            r.start()
        for r in replicas:
            up = wait_until(lambda r=r: _serving(r.address) or not r.alive(), 60)  # type: ignore[misc]
            if not (up and r.alive()):
                raise AssertionError(f"replica {r.name} did not start:\n{r.log()}")
        front.start()
        return rs

    yield start
    for rs in started:
        with contextlib.suppress(Exception):
            rs.stop()


def pg_ctl(cluster: postgres.Cluster, action: str) -> None:
    """``pg_ctl stop`` (fast) or ``start`` of ``cluster``, as its user, from a process that never
    ran gRPC. Cluster.stop() and start() run pg_ctl through subprocess with ``user=``, which
    forks this process (no vfork with a uid change): with gRPC's threads running, grpcio's fork
    handler aborts the child before it executes pg_ctl ("Check failed: next_worker->state ==
    KICKED"). setpriv changes the user after the vfork, in a process of its own."""
    tool = [str(cluster.bin / "pg_ctl"), "-D", str(cluster.data), "-w"]
    if action == "stop":
        tool += ["-m", "fast", "stop"]
    else:
        tool += ["-l", str(cluster.log), "-t", "30", "start"]
    prefix: list[str] = []
    if cluster.user is not None:
        pw = pwd.getpwnam(cluster.user)
        prefix = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
    done = subprocess.run(
        [*prefix, *tool],
        cwd=cluster.dir,
        env={k: v for k, v in os.environ.items() if not k.startswith("PG")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, f"pg_ctl {action}: {done.stdout}{done.stderr}"


def poll(pred: Callable[[], bool], timeout: float, interval: float = 0.02) -> float | None:
    """Seconds until ``pred()`` held, or None if it did not within ``timeout``."""
    import time

    start = time.monotonic()
    if wait_until(pred, timeout, interval):
        return time.monotonic() - start
    return None
