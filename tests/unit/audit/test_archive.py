"""signer._internal.audit's retention: whole segments archived, the log still whole; an archive
changed, missing or hidden is named."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from signer._internal.audit import (
    Archived,
    AuditLog,
    archive,
    read_archive,
    verify_log,
)
from tests.unit.audit.fakes import (
    T0,
    Backend,
    SoftKey,
    event,
    pinned,
    rows,
    write,
)


def archive_now(backend: Backend, path: Path) -> Archived | None:
    store = backend.store(path)
    try:
        return archive(store, Path(f"{path}.archive"), T0 + timedelta(days=1))
    finally:
        store.close()


def test_archiving_moves_whole_segments_and_the_log_stays_whole(
    written: Callable[[int], Path],
    soft: SoftKey,
    tmp_path: Path,
    backend: Backend,
) -> None:
    path = written(10)  # checkpoints at 4, 8, 10
    segment = archive_now(backend, path)
    assert segment is not None
    assert (segment.first_seq, segment.last_seq) == (1, 10)
    assert rows(backend, path) == []
    archives = Path(f"{path}.archive")
    v = verify_log(backend.location(path), pinned(path), archives)
    assert v.whole, v.first_bad
    assert v.archived == 10
    # The log goes on from the archive's anchor.
    log = AuditLog(backend.store(path), checkpoint_every=4, checkpoint_interval=60)
    log.start(soft.make, Path(f"{path}.key.pem"))
    assert write(log, event(11)) == 11
    log.close()
    assert verify_log(backend.location(path), pinned(path), archives).whole
    assert verify_log(
        backend.location(path), pinned(path)
    ).whole  # archives not read: anchor and live records
    assert archive_now(backend, path) is not None  # records 11.. up to the close's checkpoint
    assert verify_log(backend.location(path), pinned(path), archives).whole
    assert len(list(archives.iterdir())) == 2


def test_a_changed_or_missing_archive_is_named(
    written: Callable[[int], Path], backend: Backend
) -> None:
    path = written(8)
    segment = archive_now(backend, path)
    assert segment is not None
    archives = Path(f"{path}.archive")
    file = archives / segment.file
    file.write_bytes(file.read_bytes().replace(b'"OK"', b'"NO"', 1))
    assert verify_log(backend.location(path), pinned(path), archives).first_bad == (
        1,
        f"archive {file.name} is not the file that was archived",
    )
    file.unlink()
    assert verify_log(backend.location(path), pinned(path), archives).first_bad == (
        1,
        f"archive {file.name} is missing",
    )


def test_an_archive_names_its_chain_and_one_naming_another_is_refused(
    written: Callable[[int], Path], backend: Backend
) -> None:
    """An archive of a log's one chain names none, as those of before (its checkpoints read as
    chain ""); a database's chains name theirs (tests/unit/audit/test_chains.py). One whose
    header names another chain, its digest updated in the row as whoever rewrote it would, is
    refused: its checkpoints are signed as that chain's. Fails without the fix of review
    NOTE N2 (archives did not carry their chain)."""
    path = written(8)
    segment = archive_now(backend, path)
    assert segment is not None
    archives = Path(f"{path}.archive")
    file = archives / segment.file
    header, _, checkpoints = read_archive(file)
    assert "chain" not in header
    assert checkpoints
    assert {c.chain for c in checkpoints} == {""}
    lines = file.read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    first["segment"]["chain"] = "r1"
    lines[0] = json.dumps(first, separators=(",", ":"), sort_keys=True) + "\n"
    file.write_text("".join(lines))
    assert {c.chain for c in read_archive(file)[2]} == {"r1"}
    with backend.sql(path) as db:
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        db.execute("UPDATE archives SET sha256 = ?", (digest,))
    assert verify_log(backend.location(path), pinned(path), archives).first_bad == (
        1,
        f"archive {file.name} is chain 'r1''s",
    )


def test_hiding_an_archive_is_caught(written: Callable[[int], Path], backend: Backend) -> None:
    path = written(8)
    archive_now(backend, path)
    with backend.sql(path) as db:
        db.execute("DELETE FROM archives")
    # The anchor checkpoint stays: it signed a record the live log no longer explains.
    assert verify_log(backend.location(path), pinned(path)).first_bad == (
        1,
        "missing: the log ends at 0, a checkpoint signed 8",
    )


def test_nothing_newer_than_the_cutoff_is_archived(
    written: Callable[[int], Path], backend: Backend
) -> None:
    path = written(8)
    store = backend.store(path)
    try:
        assert archive(store, Path(f"{path}.archive"), T0) is None
    finally:
        store.close()
    assert len(rows(backend, path)) == 8
