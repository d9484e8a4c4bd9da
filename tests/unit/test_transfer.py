"""``signer store migrate`` (signer._internal.transfer, issue 16 item 1): a single machine's
SQLite files, real ones written by the real stores and AuditLog (the audit key a software one,
tests/unit/audit/fakes.py), copied into a schema of the session's throwaway PostgreSQL cluster;
verify passes on both sides; refusals leave the target as it was."""

from __future__ import annotations

import sqlite3
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from signer._internal import transfer
from signer._internal.audit import AuditLog, SQLiteAuditStore, archive, verify_log
from signer._internal.audit._chain import checkpoint_message
from signer._internal.audit._pgstore import PostgresAuditStore
from signer._internal.pgstore import PostgresStore
from signer._internal.store import SQLiteStore
from signer.cli.main import main
from signer.keys import ImportToken, Key, State
from tests.unit.audit.fakes import T0, SoftKey, event, write
from tests.unit.test_store import key, version

DAY = timedelta(days=1)


@pytest.fixture
def soft() -> SoftKey:
    """The audit key, in software (the token's stand-in)."""
    return SoftKey()


def keys_in_every_state() -> list[Key]:
    return [
        key(
            "payments",
            version("payments", 1, State.DESTROYED),
            version("payments", 2, State.DESTRUCTION_SCHEDULED, destroy_at=T0 + 7 * DAY),
            version("payments", 3, State.DISABLED),
            version("payments", 4, State.ENABLED),
            primary=4,
            scope="billing",
            labels={"team": "pay"},
        ),
        key("tokens", version("tokens", 1)),
        key("K0", version("K0", 1, State.DISABLED, algorithm="rsa-3072"), algorithm="rsa-3072"),
    ]


def import_tokens() -> list[ImportToken]:
    return [
        ImportToken("live", b"w1", b"spki-w1", T0, T0 + 400 * DAY, caller="x509:CN=a"),
        ImportToken("used", b"w2", b"spki-w2", T0, T0 + DAY, used=True),
        ImportToken("gone", b"w3", b"spki-w3", T0, T0 + DAY, destroyed=True, used=True),
    ]


def log(path: Path, soft: SoftKey) -> AuditLog:
    audit = AuditLog(SQLiteAuditStore(path), checkpoint_every=4, checkpoint_interval=60)
    audit.start(soft.make, Path(f"{path}.key.pem"))
    return audit


def deployment(tmp_path: Path, soft: SoftKey, records: int = 30) -> Path:
    """A state directory as ``signer run`` leaves one: the key store (keys in every state,
    import tokens live, used and destroyed), and an audit log of ``records`` records,
    checkpointed every 4, whose first 10 were archived (the archive, then more records)."""
    var = tmp_path / "var"
    store = SQLiteStore(var / "signer.db")
    for k in keys_in_every_state():
        store.create_key(k)
    for t in import_tokens():
        store.add_import_token(t)
    store.close()
    path = var / "audit.db"
    audit = log(path, soft)
    for i in range(1, 11):
        write(audit, event(i))
    audit.close()
    sqlite = SQLiteAuditStore(path)
    assert archive(sqlite, Path(f"{path}.archive"), T0 + DAY) is not None
    sqlite.close()
    audit = log(path, soft)
    for i in range(11, records + 1):
        write(audit, event(i, "OK" if i % 3 else "NOT_FOUND"))
    audit.close()
    return var


def sources(var: Path) -> transfer.Sources:
    return transfer.sources([var])


def verified(location: str | Path, var: Path, chain: str = "") -> tuple[int, int, int, int]:
    v = verify_log(
        location,
        (var / "audit.db.key.pem").read_bytes(),
        var / "audit.db.archive",
        chain=chain,
    )
    assert v.whole, v.first_bad
    return v.records, v.checkpoints, v.records_end, v.archived


def target_state(dsn: str) -> tuple[list[Key], list[str]]:
    store = PostgresStore(dsn)
    audit = PostgresAuditStore(dsn, writer=False)
    try:
        return store.list_keys("", 100), audit.chains()
    finally:
        store.close()
        audit.close()


def test_a_deployment_moves_whole_and_verifies_on_both_sides(
    tmp_path: Path, soft: SoftKey, pg_dsn: str
) -> None:
    """Keys in every state, import tokens live, used and destroyed, a log with an archive, its
    anchor, several checkpoints and an unsigned tail: after the migration the database holds
    the same keys and tokens, and verify (with the same pin and archive files) passes on both
    sides with the same counts. A key, version, token, record or checkpoint left out, or changed,
    fails one of these comparisons."""
    var = deployment(tmp_path, soft)
    # An unsigned tail: records after the newest checkpoint (a crash before the close's).
    with sqlite3.connect(var / "audit.db") as db:
        db.execute("DELETE FROM checkpoints WHERE seq = (SELECT MAX(seq) FROM checkpoints)")
    before = verified(var / "audit.db", var)

    done = transfer.migrate(sources(var), pg_dsn)

    assert verified(pg_dsn, var) == before
    n = done.counts
    assert (n.keys, n.versions, n.import_tokens) == (3, 6, 3)
    assert (n.records, n.archives, n.archived_records) == (20, 1, 10)
    assert n.checkpoints == before[1] == 5  # the anchor at 10, then 14 ... 26 (27-30 unsigned)
    source, store = SQLiteStore(var / "signer.db"), PostgresStore(pg_dsn)
    try:
        keys = store.list_keys("", 100)
        assert keys == source.list_keys("", 100)
        assert [k.name for k in keys] == ["K0", "payments", "tokens"]  # byte order, as SQLite
        assert {v.state for v in keys[1].versions} == set(State)
        assert keys[1].versions[1].destroy_at == T0 + 7 * DAY
        assert [store.get_import_token(t.token) for t in import_tokens()] == import_tokens()
    finally:
        source.close()
        store.close()
    # The SQLite files were only read: they still verify, unchanged.
    assert verified(var / "audit.db", var) == before


def test_a_log_migrated_into_a_replicas_chain_beside_another(
    tmp_path: Path, soft: SoftKey, pg_dsn: str
) -> None:
    """``chain``: the log becomes a replica's chain in a database that already holds another
    chain; that one is refused as a target, the new name taken, and each verifies."""
    other = PostgresAuditStore(pg_dsn, chain="b")
    audit = AuditLog(other, checkpoint_every=4, checkpoint_interval=60)
    audit.start(soft.make, tmp_path / "b.key.pem")
    write(audit, event(1))
    audit.close()
    var = deployment(tmp_path, SoftKey())

    with pytest.raises(transfer.MigrationError, match="already holds chain 'b': refused"):
        transfer.migrate(sources(var), pg_dsn, "b")
    assert target_state(pg_dsn) == ([], ["b"])
    transfer.migrate(sources(var), pg_dsn, "a")
    assert verified(pg_dsn, var, chain="a") == verified(var / "audit.db", var)
    assert verify_log(pg_dsn, (tmp_path / "b.key.pem").read_bytes(), chain="b").whole


def test_a_target_holding_keys_or_the_chain_is_refused_and_left_as_it_was(
    tmp_path: Path, soft: SoftKey, pg_dsn: str
) -> None:
    """A second run (or a database another deployment uses) is refused before anything is
    written: by its keys, and, with its keys gone, by the log's chain."""
    var = deployment(tmp_path, soft)
    transfer.migrate(sources(var), pg_dsn)
    state = target_state(pg_dsn)

    with pytest.raises(transfer.MigrationError, match="already holds a key store"):
        transfer.migrate(sources(var), pg_dsn)
    assert target_state(pg_dsn) == state
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM versions; DELETE FROM keys; DELETE FROM import_tokens")
    with pytest.raises(transfer.MigrationError, match="already holds the log's chain"):
        transfer.migrate(sources(var), pg_dsn)
    assert target_state(pg_dsn) == ([], [""])


def test_a_source_log_that_does_not_verify_is_not_copied(
    tmp_path: Path, soft: SoftKey, pg_dsn: str
) -> None:
    """A record changed in the source (its status rewritten) is named, and nothing is copied:
    a migration must not launder a tampered log into a fresh database."""
    var = deployment(tmp_path, soft)
    with sqlite3.connect(var / "audit.db") as db:
        db.execute("UPDATE records SET status = 'OK' WHERE seq = 12")
    with pytest.raises(transfer.MigrationError, match=r"does not verify \(record 12.*nothing"):
        transfer.migrate(sources(var), pg_dsn)
    assert target_state(pg_dsn) == ([], [])


def test_a_source_being_written_is_refused(tmp_path: Path, soft: SoftKey, pg_dsn: str) -> None:
    """Someone holds the source log's write lock (a running service in the middle of a write):
    refused, saying a service may be running, and nothing copied. Then, while the migration
    holds it, the service's next write is held off (it fails closed) until it is done."""
    var = deployment(tmp_path, soft)
    holder = sqlite3.connect(var / "audit.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(transfer.MigrationError, match="is the service running on it"):
            transfer.migrate(sources(var), pg_dsn)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert target_state(pg_dsn) == ([], [])

    writer = SQLiteAuditStore(var / "audit.db", timeout=0.05)
    held: list[str] = []
    real = PostgresAuditStore.append

    def append_beside(self: PostgresAuditStore, records: list[object]) -> None:
        if not held:  # the first batch: the service tries to write meanwhile
            try:
                writer.append([])  # nothing: returns without a lock
                writer.restore()  # a write transaction: needs the lock the migration holds
            except sqlite3.OperationalError as exc:
                held.append(str(exc))
        real(self, records)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PostgresAuditStore, "append", append_beside)
        transfer.migrate(sources(var), pg_dsn)
    writer.close()
    assert held == ["database is locked"]


def test_a_failure_half_way_says_what_is_on_the_target_and_how_to_clear_it(
    tmp_path: Path, soft: SoftKey, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stores commit each key and batch on its own: a copy cut off after the keys says
    that part of it is there and names the schema to drop; dropped and made again, a second
    run succeeds."""
    var = deployment(tmp_path, soft)

    def fail(self: PostgresAuditStore, records: list[object]) -> None:
        raise RuntimeError("cut off")

    monkeypatch.setattr(PostgresAuditStore, "append", fail)
    with pytest.raises(transfer.MigrationError) as failed:
        transfer.migrate(sources(var), pg_dsn)
    schema = pg_dsn.rsplit("search_path%3D", 1)[1]
    assert "the target holds part of the copy" in str(failed.value)
    assert f"DROP SCHEMA {schema} CASCADE; CREATE SCHEMA {schema}" in str(failed.value)
    assert len(target_state(pg_dsn)[0]) == 3
    monkeypatch.undo()
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE; CREATE SCHEMA {schema}")
    transfer.migrate(sources(var), pg_dsn)
    assert verified(pg_dsn, var) == verified(var / "audit.db", var)


def test_a_log_with_checkpoints_from_before_they_chained(
    tmp_path: Path, soft: SoftKey, pg_dsn: str
) -> None:
    """An old log's first checkpoints have no ``prev`` (signed without it), which
    add_checkpoint refuses: they are restored as they are, the chained ones after them added,
    and the copy verifies as the source does, its checkpoints' prev as they were. (The legacy
    checkpoints are made by re-signing two of a fresh log's in the old message form.)"""
    var = tmp_path / "legacy"
    store = SQLiteStore(var / "signer.db")
    store.close()
    path = var / "audit.db"
    audit = log(path, soft)
    for i in range(1, 15):
        write(audit, event(i))
    audit.close()
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT seq, hash, time FROM checkpoints ORDER BY seq").fetchall()
        assert [r[0] for r in rows] == [4, 8, 12, 14]
        for seq, hash_, at in rows[:2]:
            sig = soft.make(None, None)
            assert sig is not None
            signature = sig[0](checkpoint_message(seq, hash_, at))
            db.execute(
                "UPDATE checkpoints SET prev = NULL, signature = ? WHERE seq = ?",
                (signature, seq),
            )
    before = verified(path, var)
    transfer.migrate(transfer.sources([var]), pg_dsn)
    assert verified(pg_dsn, var) == before
    pg = PostgresAuditStore(pg_dsn, read_only=True)
    try:
        assert [c.prev for c in pg.checkpoints()] == [None, None, 8, 12]
    finally:
        pg.close()


def test_the_command_migrates_prints_a_summary_and_never_a_secret(
    tmp_path: Path, soft: SoftKey, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``signer store migrate --from DIR --to URL``: exit 0, the summary and what to configure
    next; ``signer audit-log verify`` on the URL passes with the old pin and archives; a second
    run exits 2 refused; a URL carrying a password is refused naming --to, never echoed."""
    var = deployment(tmp_path, soft)
    assert main(["store", "migrate", "--from", str(var), "--to", pg_dsn]) == 0
    out = capsys.readouterr().out
    assert "3 keys, 6 versions, 3 import tokens" in out
    assert "20 records, 6 checkpoints, 1 archives (10 records)" in out
    assert f'public_key_file = "{var}/audit.db.key.pem"' in out
    pin, archives = str(var / "audit.db.key.pem"), str(var / "audit.db.archive")
    verify = ["audit-log", "verify", "--db", pg_dsn, "--public-key", pin, "--archive-dir"]
    assert main([*verify, archives, "--archives"]) == 0
    assert "is whole: 20 records, 6 signed checkpoints" in capsys.readouterr().out

    assert main(["store", "migrate", "--from", str(var), "--to", pg_dsn]) == 2
    assert "refused" in capsys.readouterr().err
    secret = pg_dsn.replace("postgresql:///", "postgresql://u:hunter2@/")
    assert main(["store", "migrate", "--from", str(var), "--to", secret]) == 2
    err = capsys.readouterr().err
    assert "--to" in err
    assert "hunter2" not in err
