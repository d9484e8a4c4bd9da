"""Replicas on one database: one chain each (issue 16). Each replica's writer vouches for its
own chain exactly as a single log's does (its own audit key, pin and witness); its checkpoints
also sign the newest checkpoint it saw of every other chain, so that a chain removed whole, or
rewritten with fresh hashes, is named by the others' verification. PostgreSQL only: a file
holds one chain."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest

from signer._internal.audit import AuditLog, FileWitness, archive, verify_log
from signer._internal.audit._chain import chain as chained
from signer._internal.audit._chain import iso
from signer._internal.audit._pgstore import PostgresAuditStore
from signer.errors import FailedPrecondition
from tests.unit.audit.fakes import T0, SoftKey, event, write


class Replica:
    """One replica's audit log: its chain, its own key (the token would hold one per replica),
    pin and witness file."""

    def __init__(self, dsn: str, name: str, tmp: Path, every: int = 4) -> None:
        self.name, self.soft = name, SoftKey()
        self.pin = tmp / f"audit-{name}.pem"
        self.witness = tmp / f"witness-{name}.jsonl"
        self.log = AuditLog(
            PostgresAuditStore(dsn, chain=name),
            checkpoint_every=every,
            checkpoint_interval=60,
            witnesses=[FileWitness(self.witness)],
        )
        self.log.start(self.soft.make, self.pin)


def verify(dsn: str, r: Replica, **kw: object) -> tuple[tuple[int, str] | None, tuple[str, ...]]:
    v = verify_log(dsn, r.pin.read_bytes(), chain=r.name, **kw)  # type: ignore[arg-type]
    return v.first_bad, v.cross_checked


def run_three(dsn: str, tmp: Path, per: int = 12) -> list[Replica]:
    """Three replicas writing at once, then closed: every chain checkpointed, the later
    checkpoints of each naming the others'."""
    replicas = [Replica(dsn, name, tmp) for name in ("r1", "r2", "r3")]

    def calls(r: Replica, base: int) -> None:
        for i in range(per):
            write(r.log, event(base + i))

    threads = [threading.Thread(target=calls, args=(r, 100 * n)) for n, r in enumerate(replicas)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in replicas:  # a last round, so each one's newest checkpoint saw the others' last
        write(r.log, event(999))
    for r in replicas:
        r.log.close()
    return replicas


def test_replicas_write_their_own_chains_and_each_verifies_with_the_others(
    pg_dsn: str, tmp_path: Path
) -> None:
    """Three writers at once, each numbering its own records from 1; every chain whole with its
    own pin and witness, and its checkpoints' references to the others found as signed."""
    replicas = run_three(pg_dsn, tmp_path)
    for r in replicas:
        v = verify_log(pg_dsn, r.pin.read_bytes(), chain=r.name, witnesses=[r.witness])
        assert v.whole, (r.name, v.first_bad)
        assert v.records == 13
        assert v.witnessed == v.checkpoints
        assert set(v.cross_checked) == {"r1", "r2", "r3"} - {r.name}
    # A chain's key does not verify another's: each is bound to its own.
    v = verify_log(pg_dsn, replicas[0].pin.read_bytes(), chain="r2")
    assert not v.whole


@pytest.mark.parametrize("how", ["removed", "rewritten"])
def test_a_chain_removed_or_rewritten_is_named_by_the_others(
    pg_dsn: str, tmp_path: Path, how: str
) -> None:
    """r2's chain deleted whole (records, checkpoints, its recorded key), or rewritten with
    fresh hashes from its first record on (verify of r2 alone cannot tell the second without
    its pin's help): r1's and r3's verification each name chain r2 at their checkpoint that
    saw it."""
    replicas = run_three(pg_dsn, tmp_path)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        if how == "removed":
            for table in ("records", "checkpoints", "audit_key", "archives"):
                conn.execute(f"DELETE FROM {table} WHERE chain = 'r2'")
        else:
            rows = conn.execute(
                "SELECT seq FROM records WHERE chain = 'r2' ORDER BY seq"
            ).fetchall()
            prev = "0" * 64
            for (seq,) in rows:
                fresh = chained(seq, event(5000 + seq), prev)
                e = fresh.event
                conn.execute(
                    "UPDATE records SET time = %s, payload_sha256 = %s, prev_hash = %s, "
                    "hash = %s WHERE chain = 'r2' AND seq = %s",
                    (iso(e.time), e.payload_sha256, fresh.prev_hash, fresh.hash, seq),
                )
                prev = fresh.hash
    for r in (replicas[0], replicas[2]):
        first_bad, _ = verify(pg_dsn, r)
        assert first_bad is not None, r.name
        what = "does not hold it" if how == "removed" else "holds another"
        assert "chain 'r2''s record" in first_bad[1]
        assert what in first_bad[1]


def test_one_writer_per_chain_many_chains_per_database(pg_dsn: str, tmp_path: Path) -> None:
    """The writer lock is the chain's: a second writer of r1 is refused at its start, by name;
    a writer of r2 is not."""
    r1 = Replica(pg_dsn, "r1", tmp_path)
    try:
        with pytest.raises(FailedPrecondition, match="another service is writing"):
            PostgresAuditStore(pg_dsn, chain="r1")
        PostgresAuditStore(pg_dsn, chain="r2").close()
    finally:
        r1.log.close()


def test_a_shared_witness_and_archives_keep_the_chains_apart(pg_dsn: str, tmp_path: Path) -> None:
    """One collector holding every replica's checkpoints (a central syslog): each chain is
    checked against its own lines only. Archives of several chains in one directory: each
    under its own name, each chain verified with them."""
    replicas = run_three(pg_dsn, tmp_path)
    shared = tmp_path / "collector.jsonl"
    shared.write_bytes(b"".join(r.witness.read_bytes() for r in replicas))
    archives = tmp_path / "archive"
    for r in replicas:
        store = PostgresAuditStore(pg_dsn, chain=r.name, writer=False)
        try:
            segment = archive(store, archives, T0.replace(year=2100))
        finally:
            store.close()
        assert segment is not None
        assert segment.file.startswith(f"audit-{r.name}-")
    for r in replicas:
        v = verify_log(pg_dsn, r.pin.read_bytes(), archives, chain=r.name, witnesses=[shared])
        assert v.whole, (r.name, v.first_bad)
        assert v.archived > 0
        assert v.witnessed >= 1  # the anchor; those inside the archives are checked with it
