"""Replicas on one database: one chain each (issue 16). Each replica's writer vouches for its
own chain exactly as a single log's does (its own audit key, pin and witness); its checkpoints
also sign the newest checkpoint it saw of every other chain, so that a chain removed whole, or
rewritten with fresh hashes, is named by the others' verification. PostgreSQL only: a file
holds one chain."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import psycopg
import pytest

from signer._internal.audit import AuditLog, FileWitness, archive, read_archive, verify_log
from signer._internal.audit._chain import Checkpoint, Signing, checkpoint_message, iso
from signer._internal.audit._chain import chain as chained
from signer._internal.audit._pgstore import PostgresAuditStore
from signer.cli.main import main
from signer.errors import FailedPrecondition
from tests.unit.audit.fakes import T0, SoftKey, event, write


class Replica:
    """One replica's audit log: its chain, its own key (the token would hold one per replica),
    pin and witness file; ``soft`` and ``pin`` given: a key and pin shared with another."""

    def __init__(
        self,
        dsn: str,
        name: str,
        tmp: Path,
        every: int = 4,
        soft: SoftKey | None = None,
        pin: Path | None = None,
    ) -> None:
        self.name, self.soft = name, soft or SoftKey()
        self.pin = pin or tmp / f"audit-{name}.pem"
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
        # The others' records its checkpoints named are archived now: read in their files.
        assert set(v.cross_checked) == {"r1", "r2", "r3"} - {r.name}
        assert v.cross_unchecked == 0
        # Without the files they are not checked, and said so.
        v = verify_log(pg_dsn, r.pin.read_bytes(), chain=r.name)
        assert v.whole, (r.name, v.first_bad)
        assert v.cross_unchecked > 0
    # Each archive names its chain, and its checkpoints read back as that chain's.
    for file in sorted(archives.iterdir()):
        header, _, checkpoints = read_archive(file)
        name = file.name.split("-")[1]
        assert header["chain"] == name
        assert checkpoints
        assert {c.chain for c in checkpoints} == {name}


def test_a_chain_the_database_does_not_hold_is_bad_and_the_held_ones_listed(
    pg_dsn: str, tmp_path: Path
) -> None:
    """``verify --chain`` with a mistyped name, or of a chain removed whole, with a real pin:
    bad, naming the chain and listing those the database holds. (Review finding 4: it read
    "whole: 0 records", as an empty chain does.)"""
    replicas = run_three(pg_dsn, tmp_path)
    pin = replicas[0].pin.read_bytes()
    v = verify_log(pg_dsn, pin, chain="r4")
    assert v.first_bad == (
        0,
        "the database holds no chain 'r4' (a mistyped name, or the chain removed whole); "
        "it holds 'r1', 'r2', 'r3'",
    )
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table in ("records", "checkpoints", "audit_key", "archives"):
            conn.execute(f"DELETE FROM {table} WHERE chain = 'r3'")
    v = verify_log(pg_dsn, replicas[2].pin.read_bytes(), chain="r3")
    assert v.first_bad is not None
    assert "no chain 'r3'" in v.first_bad[1]
    assert "it holds 'r1', 'r2'" in v.first_bad[1]


def test_a_chain_replaced_by_a_forged_archive_row_is_named_by_the_others_with_their_archives(
    pg_dsn: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every record of r3 deleted, and one archives row inserted in their place whose last hash
    is r3's newest checkpoint's (the others' refs print it); r3's checkpoint and key kept. r1's
    and r2's verify with ``--archives`` read r3's archive file, which is not there: r3 named.
    Without the archives they pass, saying how many references they did not check. (Review
    finding 5: the archives row alone was accepted, with or without ``--archives``.)"""
    replicas = run_three(pg_dsn, tmp_path)
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        newest = conn.execute(
            "SELECT seq, hash FROM checkpoints WHERE chain = 'r3' ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        assert newest is not None
        seq, hash_ = newest
        conn.execute("DELETE FROM records WHERE chain = 'r3'")
        conn.execute("DELETE FROM checkpoints WHERE chain = 'r3' AND seq < %s", (seq,))
        conn.execute(
            "INSERT INTO archives (last_seq, first_seq, last_hash, file, sha256, chain) "
            "VALUES (%s, 1, %s, 'audit-r3-forged.jsonl', %s, 'r3')",
            (seq, hash_, "0" * 64),
        )
    empty = tmp_path / "archive"
    empty.mkdir()
    for r in replicas[:2]:
        first_bad, _ = verify(pg_dsn, r, archive_dir=empty)
        assert first_bad is not None, r.name
        assert "chain 'r3''s record" in first_bad[1]
        assert "audit-r3-forged.jsonl is missing" in first_bad[1]
        v = verify_log(pg_dsn, r.pin.read_bytes(), chain=r.name)
        assert v.whole
        assert v.cross_unchecked > 0
    # The command says what it left unchecked, and what would check it.
    cli = ["audit-log", "verify", "--db", pg_dsn, "--chain", "r1"]
    cli += ["--public-key", str(replicas[0].pin), "--archive-dir", str(empty)]
    assert main(cli) == 0
    out = capsys.readouterr().out
    assert "references into other chains' archives not checked: --archives" in out
    assert main([*cli, "--archives"]) != 0
    assert "chain 'r3''s record" in capsys.readouterr().out
    # The file there, but not the one the row names (its digest), or not holding the record.
    forged = empty / "audit-r3-forged.jsonl"
    forged.write_text("{}\n")
    first_bad, _ = verify(pg_dsn, replicas[0], archive_dir=empty)
    assert first_bad is not None
    assert "is not the file that was archived" in first_bad[1]
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        digest = hashlib.sha256(forged.read_bytes()).hexdigest()
        conn.execute("UPDATE archives SET sha256 = %s WHERE chain = 'r3'", (digest,))
    first_bad, _ = verify(pg_dsn, replicas[0], archive_dir=empty)
    assert first_bad is not None
    assert "does not hold it" in first_bad[1]


def test_a_chain_relabelled_as_another_with_a_shared_pin_does_not_verify(
    pg_dsn: str, tmp_path: Path
) -> None:
    """Two replicas sharing one audit key and pin (a misconfiguration nothing refuses): r1's
    rows relabelled as r9's verify whole as r1's did, unless the chain's name is signed with
    each checkpoint. Its archive, relabelled too, is refused by the chain its header names.
    (Review NOTE N2: the name was not signed, so ``verify --chain r9`` passed.)"""
    soft, pin = SoftKey(), tmp_path / "shared.pem"
    replicas = [Replica(pg_dsn, name, tmp_path, soft=soft, pin=pin) for name in ("r1", "r2")]
    for n, r in enumerate(replicas):
        for i in range(9):
            write(r.log, event(100 * n + i))
    for r in replicas:
        r.log.close()
    for r in replicas:
        assert verify(pg_dsn, r)[0] is None, r.name
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table in ("records", "checkpoints", "audit_key"):
            conn.execute(f"UPDATE {table} SET chain = 'r9' WHERE chain = 'r1'")
    v = verify_log(pg_dsn, pin.read_bytes(), chain="r9")
    assert v.first_bad is not None
    assert v.first_bad[1].startswith(
        "its checkpoint's signature does not verify as one of chain 'r9'"
    )
    # Archived, then relabelled with its archives row: the file is r1's.
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table in ("records", "checkpoints", "audit_key"):
            conn.execute(f"UPDATE {table} SET chain = 'r1' WHERE chain = 'r9'")
    archives = tmp_path / "archive"
    store = PostgresAuditStore(pg_dsn, chain="r1", writer=False)
    try:
        assert archive(store, archives, T0.replace(year=2100)) is not None
    finally:
        store.close()
    assert verify(pg_dsn, replicas[0], archive_dir=archives)[0] is None
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        for table in ("records", "checkpoints", "audit_key", "archives"):
            conn.execute(f"UPDATE {table} SET chain = 'r9' WHERE chain = 'r1'")
    v = verify_log(pg_dsn, pin.read_bytes(), archives, chain="r9")
    assert v.first_bad is not None
    assert "is chain 'r1''s" in v.first_bad[1]


def test_checkpoints_signed_without_the_chains_name_only_before_its_first_that_is(
    pg_dsn: str, tmp_path: Path
) -> None:
    """A chain's checkpoints from before they named their chain (a log migrated into it, a
    replica of before) verify, but only before its first named one: one signed without the
    name after it is refused, and so is a chain whose checkpoints name another."""
    r = Replica(pg_dsn, "r1", tmp_path)
    for i in range(9):
        write(r.log, event(i))
    r.log.close()
    sign = Signing(r.soft.sign, b"audit")
    store = PostgresAuditStore(pg_dsn, chain="r1", writer=False)
    try:
        newest = store.checkpoints()[-1]
        records = [chained(newest.seq + 1, event(50), newest.hash)]
        store.append(records)
        at = iso(T0)
        unbound = checkpoint_message(records[0].seq, records[0].hash, at, newest.seq)
        store.add_checkpoint(
            Checkpoint(records[0].seq, records[0].hash, at, sign(unbound), newest.seq, (), "r1")
        )
    finally:
        store.close()
    v = verify_log(pg_dsn, r.pin.read_bytes(), chain="r1")
    assert v.first_bad is not None
    assert v.first_bad[0] == records[0].seq
    assert "does not name chain 'r1', and one before it (4) does" in v.first_bad[1]
