"""The key store's contract, on both stores: SQLiteStore on a temporary file and PostgresStore
in a schema of the session's throwaway cluster (tests/postgres.py; ICU en-US collation, so that
paging that relies on byte order by accident fails here). The few tests of what only a file
store has say so. PostgreSQL's own (migrations, its errors) are in test_pgstore.py."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from signer._internal.store import SQLiteStore, Store, open_store
from signer.errors import AlreadyExists, NotFound
from signer.keys import ImportToken, Key, State, Version
from tests.conftest import FakeClock

T0 = datetime(2026, 1, 1, 12, 0, 0, 123456, tzinfo=UTC)


def version(name: str, number: int = 1, state: State = State.ENABLED, **kw: Any) -> Version:
    values: dict[str, Any] = {
        "algorithm": "ec-p256",
        "key_id": os.urandom(16),
        "public_key_der": b"spki-" + name.encode() + b"-%d" % number,
        "created": T0 + timedelta(seconds=number),
        "destroy_at": None,
    }
    values.update(kw)
    return Version(name=name, version=number, state=state, **values)


def key(name: str, *versions: Version, primary: int = 1, **kw: Any) -> Key:
    vs = versions or (version(name),)
    return Key(
        name=name,
        algorithm=str(kw.get("algorithm", "ec-p256")),
        primary=primary,
        scope=str(kw.get("scope", "")),
        labels=dict(kw.get("labels", {})),
        created=T0,
        versions=tuple(vs),
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "signer.db"


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, db_path: Path) -> str:
    """Where a store is: ``[store] path``, a file or a ``postgresql://`` URL."""
    if request.param == "sqlite":
        return str(db_path)
    dsn: str = request.getfixturevalue("pg_dsn")
    return dsn


@pytest.fixture
def store(location: str) -> Iterator[Store]:
    s = open_store(location)
    yield s
    s.close()


def test_open_store_picks_by_location(location: str, store: Store) -> None:
    assert type(store).__name__ == (
        "PostgresStore" if location.startswith("postgresql://") else "SQLiteStore"
    )


def test_creates_parent_directory(db_path: Path) -> None:
    # SQLite only: a file store makes its directory; a database has none.
    SQLiteStore(db_path).close()
    assert db_path.parent.is_dir()
    assert db_path.exists()


def test_create_and_get_round_trip(store: Store) -> None:
    k = key("payments", labels={"env": "prod", "team": "x"}, scope="team:pay")
    store.create_key(k)
    got = store.get_key("payments")
    assert got == k
    assert got.created == T0
    assert got.created.tzinfo is not None
    assert got.versions[0].key_id == k.versions[0].key_id
    assert got.versions[0].state is State.ENABLED


def test_get_missing_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="'nope' not found"):
        store.get_key("nope")


def test_duplicate_name_is_already_exists(store: Store) -> None:
    store.create_key(key("dup"))
    with pytest.raises(AlreadyExists, match="'dup' already exists"):
        store.create_key(key("dup"))
    # The first key is untouched and no second row appeared.
    assert len(store.get_key("dup").versions) == 1
    assert [k.name for k in store.list_keys("", 10)] == ["dup"]


def test_failed_create_leaves_nothing_behind(store: Store) -> None:
    shared_id = os.urandom(16)
    store.create_key(key("a", version("a", key_id=shared_id)))
    # A version whose key_id collides violates UNIQUE: the whole create is rolled back.
    with pytest.raises(AlreadyExists):
        store.create_key(key("b", version("b", key_id=shared_id)))
    with pytest.raises(NotFound):
        store.get_key("b")


def test_list_ordering_and_paging(store: Store) -> None:
    names = ["m", "a", "z", "b0", "b", "k.1", "k-1", "k_1"]
    for n in names:
        store.create_key(key(n))
    assert [k.name for k in store.list_keys("", 100)] == sorted(names)
    assert [k.name for k in store.list_keys("", 3)] == sorted(names)[:3]
    assert [k.name for k in store.list_keys("b", 3)] == ["b0", "k-1", "k.1"]
    assert [k.name for k in store.list_keys("k_1", 3)] == ["m", "z"]
    assert store.list_keys("z", 3) == []
    # Walk every page.
    seen: list[str] = []
    after = ""
    while page := store.list_keys(after, 3):
        seen += [k.name for k in page]
        after = page[-1].name
    assert seen == sorted(names)


def test_list_order_is_byte_order(store: Store) -> None:
    """As SQLite's BINARY collation, whatever the database's: under ICU en-US (the test
    cluster's) ORDER BY would give a, B, k-2, K0, k1 and paging would skip or repeat keys."""
    names = ["a", "B", "k-2", "K0", "k1", "k_1", "Z", "é"]
    for n in names:
        store.create_key(key(n))
    in_bytes = sorted(names, key=str.encode)
    assert [k.name for k in store.list_keys("", 100)] == in_bytes
    assert [k.name for k in store.list_keys("B", 2)] == in_bytes[1:3]
    assert [k.name for k in store.list_keys("K0", 100, scope="")] == in_bytes[2:]


def test_list_includes_versions(store: Store) -> None:
    store.create_key(key("x", version("x", 1), version("x", 2), primary=2))
    (k,) = store.list_keys("", 10)
    assert [v.version for v in k.versions] == [1, 2]
    assert k.primary == 2


def test_get_version(store: Store) -> None:
    k = key("gv", version("gv", 1), version("gv", 2), version("gv", 3), primary=2)
    store.create_key(k)
    assert store.get_version("gv", 0) == k.versions[1]  # 0 means the primary
    assert store.get_version("gv", 1) == k.versions[0]
    assert store.get_version("gv", 3) == k.versions[2]
    store.set_primary("gv", 3)
    assert store.get_version("gv", 0).version == 3
    with pytest.raises(NotFound, match="'gv' has no version 4"):
        store.get_version("gv", 4)
    with pytest.raises(NotFound, match="'nope' not found"):
        store.get_version("nope", 0)
    with pytest.raises(NotFound, match="'nope' not found"):
        store.get_version("nope", 1)


def test_get_version_does_not_cross_keys(store: Store) -> None:
    store.create_key(key("one", version("one", 1)))
    store.create_key(key("two", version("two", 1), version("two", 2), primary=2))
    assert store.get_version("two", 2).name == "two"
    with pytest.raises(NotFound, match="'one' has no version 2"):
        store.get_version("one", 2)


def test_add_version(store: Store) -> None:
    store.create_key(key("r"))
    store.add_version(version("r", 2), make_primary=False)
    k = store.get_key("r")
    assert [v.version for v in k.versions] == [1, 2]
    assert k.primary == 1
    store.add_version(version("r", 3), make_primary=True)
    k = store.get_key("r")
    assert [v.version for v in k.versions] == [1, 2, 3]
    assert k.primary == 3


def test_set_primary(store: Store) -> None:
    store.create_key(key("p", version("p", 1), version("p", 2)))
    store.set_primary("p", 2)
    assert store.get_key("p").primary == 2
    with pytest.raises(NotFound, match="'q' not found"):
        store.set_primary("q", 1)


def test_a_scheduled_next_primary_round_trips(store: Store) -> None:
    at = T0 + timedelta(hours=1)
    k = replace(
        key("n", version("n", 1, retired_at=at), version("n", 2)),
        next_primary=2,
        next_primary_at=at,
    )
    store.create_key(k)
    assert store.get_key("n") == k
    assert store.list_keys("", 10) == [k]
    assert store.get_version("n", 1).retired_at == at


def test_get_version_0_is_the_next_primary_from_its_time_on(store: Store) -> None:
    """Issue 17: no write makes a scheduled version primary; the one query that resolves
    version 0 for every signature says which it is at the time it is given."""
    at = T0 + timedelta(hours=1)
    store.create_key(
        replace(key("gn", version("gn", 1), version("gn", 2)), next_primary=2, next_primary_at=at)
    )
    assert store.get_version("gn", 0, T0).version == 1
    assert store.get_version("gn", 0, at - timedelta(microseconds=1)).version == 1
    assert store.get_version("gn", 0, at).version == 2
    assert store.get_version("gn", 0, at + timedelta(days=1)).version == 2
    # A version asked for by number is that version, whatever the time.
    assert store.get_version("gn", 1, at).version == 1
    # Without a time: the wall clock's (long past T0 + 1 h).
    assert store.get_version("gn", 0).version == 2


def test_add_version_scheduled_and_retirements(store: Store) -> None:
    at = T0 + timedelta(hours=1)
    store.create_key(key("sch"))
    store.add_version(version("sch", 2), make_primary=True, primary_at=at, retire=((1, at),))
    k = store.get_key("sch")
    assert (k.primary, k.next_primary, k.next_primary_at) == (1, 2, at)
    assert [v.retired_at for v in k.versions] == [at, None]
    # The next rotation, after the first's time: the first's version is folded into
    # primary_version as the new one is scheduled.
    later = at + timedelta(hours=1)
    store.add_version(version("sch", 3), make_primary=True, primary_at=later, retire=((2, later),))
    k = store.get_key("sch")
    assert (k.primary, k.next_primary, k.next_primary_at) == (2, 3, later)
    assert [v.retired_at for v in k.versions] == [at, later, None]
    # At once: the schedule is dropped.
    store.add_version(version("sch", 4), make_primary=True, retire=((2, T0), (3, T0)))
    k = store.get_key("sch")
    assert (k.primary, k.next_primary, k.next_primary_at) == (4, None, None)
    assert [v.retired_at for v in k.versions] == [at, T0, T0, None]


def test_set_primary_drops_a_scheduled_next(store: Store) -> None:
    at = T0 + timedelta(hours=1)
    store.create_key(key("sp"))
    store.add_version(version("sp", 2), make_primary=True, primary_at=at, retire=((1, at),))
    store.set_primary("sp", 1, retire=((2, T0), (1, None)))
    k = store.get_key("sp")
    assert (k.primary, k.next_primary, k.next_primary_at) == (1, None, None)
    assert [v.retired_at for v in k.versions] == [None, T0]
    assert store.get_version("sp", 0, at + timedelta(days=1)).version == 1


def test_set_state(store: Store) -> None:
    store.create_key(key("s", version("s", 1), version("s", 2)))
    at = T0 + timedelta(days=7)
    store.set_state("s", 2, State.DESTRUCTION_SCHEDULED, at)
    v = store.get_key("s").version(2)
    assert v.state is State.DESTRUCTION_SCHEDULED
    assert v.destroy_at == at
    assert store.get_key("s").version(1).state is State.ENABLED
    store.set_state("s", 2, State.DISABLED, None)
    v = store.get_key("s").version(2)
    assert (v.state, v.destroy_at) == (State.DISABLED, None)


def test_set_state_not_found(store: Store) -> None:
    store.create_key(key("s"))
    with pytest.raises(NotFound, match="no version 9"):
        store.set_state("s", 9, State.DISABLED, None)
    with pytest.raises(NotFound):
        store.set_state("other", 1, State.DISABLED, None)


def test_due_for_destruction_respects_time(store: Store) -> None:
    d1, d2 = T0 + timedelta(days=1), T0 + timedelta(days=2)
    store.create_key(
        key(
            "d",
            version("d", 1),
            version("d", 2, State.DESTRUCTION_SCHEDULED, destroy_at=d2),
            version("d", 3, State.DESTRUCTION_SCHEDULED, destroy_at=d1),
            version("d", 4, State.DISABLED),
            version("d", 5, State.DESTROYED, destroy_at=d1),
        )
    )
    assert store.due_for_destruction(d1 - timedelta(microseconds=1)) == []
    assert [v.version for v in store.due_for_destruction(d1)] == [3]
    assert [v.version for v in store.due_for_destruction(d2 + timedelta(hours=1))] == [3, 2]
    store.set_state("d", 3, State.DESTROYED, d1)
    assert [v.version for v in store.due_for_destruction(d2)] == [2]
    store.set_state("d", 2, State.DISABLED, None)  # cancelled
    assert store.due_for_destruction(d2 + timedelta(days=100)) == []


def test_data_survives_reopen(location: str) -> None:
    s = open_store(location)
    k = key("persist", version("persist", 1), version("persist", 2), primary=2, labels={"a": "b"})
    s.create_key(k)
    s.set_state("persist", 1, State.DISABLED, None)
    s.close()
    s2 = open_store(location)
    try:
        got = s2.get_key("persist")
        assert got.primary == 2
        assert got.labels == {"a": "b"}
        assert got.version(1).state is State.DISABLED
        assert got.version(2) == k.versions[1]
        with pytest.raises(AlreadyExists):
            s2.create_key(key("persist"))
    finally:
        s2.close()


# The first release's schema (before issue 11's import token columns and issue 17's rotation
# columns), as a store made then has it on disk.
_FIRST_SQLITE_SCHEMA = """
CREATE TABLE keys (
    name            TEXT PRIMARY KEY,
    algorithm       TEXT NOT NULL,
    primary_version INTEGER NOT NULL,
    scope           TEXT NOT NULL DEFAULT '',
    labels          TEXT NOT NULL DEFAULT '{}',
    created         REAL NOT NULL
);
CREATE TABLE versions (
    name        TEXT NOT NULL REFERENCES keys(name),
    version     INTEGER NOT NULL,
    algorithm   TEXT NOT NULL,
    state       TEXT NOT NULL,
    key_id      BLOB NOT NULL UNIQUE,
    public_key  BLOB NOT NULL,
    created     REAL NOT NULL,
    destroy_at  REAL,
    PRIMARY KEY (name, version)
);
CREATE TABLE import_tokens (
    token       TEXT PRIMARY KEY,
    key_id      BLOB NOT NULL UNIQUE,
    public_key  BLOB NOT NULL,
    created     REAL NOT NULL,
    expires     REAL NOT NULL,
    destroyed   INTEGER NOT NULL DEFAULT 0
);
INSERT INTO keys VALUES ('old', 'ec-p256', 2, 'iss', '{}', 1767268800.0);
INSERT INTO versions VALUES ('old', 1, 'ec-p256', 'enabled', x'01', x'0a', 1767268800.0, NULL);
INSERT INTO versions VALUES ('old', 2, 'ec-p256', 'enabled', x'02', x'0b', 1767268801.0, NULL);
"""


def test_an_older_sqlite_store_gets_the_new_columns(db_path: Path) -> None:
    # SQLite only (PostgreSQL's migrations: test_pgstore.py).
    db_path.parent.mkdir(parents=True)
    old = sqlite3.connect(db_path)
    old.executescript(_FIRST_SQLITE_SCHEMA)
    old.close()
    s = SQLiteStore(db_path)
    try:
        db = sqlite3.connect(db_path)
        columns = {
            table: {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
            for table in ("keys", "versions", "import_tokens")
        }
        db.close()
        assert {"next_primary", "next_primary_at"} <= columns["keys"]
        assert "retired_at" in columns["versions"]
        assert {"caller", "used"} <= columns["import_tokens"]
        k = s.get_key("old")
        assert (k.primary, k.next_primary, k.next_primary_at) == (2, None, None)
        assert [v.retired_at for v in k.versions] == [None, None]
        assert s.get_version("old", 0).version == 2
        at = T0 + timedelta(hours=1)
        s.add_version(version("old", 3), make_primary=True, primary_at=at, retire=((2, at),))
        assert s.get_version("old", 0, at).version == 3
        assert s.get_key("old").version(2).retired_at == at
    finally:
        s.close()
    # Opening it again adds nothing twice.
    SQLiteStore(db_path).close()


def test_concurrent_writes_from_threads(store: Store) -> None:
    threads_n, per_thread = 8, 10
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads_n)

    def work(t: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                name = f"t{t}-k{i}"
                store.create_key(key(name))
                store.add_version(version(name, 2), make_primary=True)
                store.set_state(name, 1, State.DISABLED, None)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert errors == []
    keys = store.list_keys("", 1000)
    assert len(keys) == threads_n * per_thread
    for k in keys:
        assert k.primary == 2
        assert [(v.version, v.state) for v in k.versions] == [
            (1, State.DISABLED),
            (2, State.ENABLED),
        ]


def test_memory_store() -> None:
    # SQLite only: an in-memory store (":memory:"), which PostgreSQL has no counterpart of.
    s = SQLiteStore(":memory:")
    try:
        s.create_key(key("mem"))
        assert s.get_key("mem").name == "mem"
    finally:
        s.close()


def test_store_keeps_import_tokens(store: Store) -> None:
    clock = FakeClock()
    s = store
    a = ImportToken("a" * 43, b"\x01" * 16, b"spki-a", clock.now, clock.now + timedelta(days=1))
    b = ImportToken("b" * 43, b"\x02" * 16, b"spki-b", clock.now, clock.now + timedelta(days=2))
    s.add_import_token(a)
    s.add_import_token(b)
    assert s.get_import_token(a.token) == a
    with pytest.raises(NotFound, match="import token not found"):
        s.get_import_token("c" * 43)
    assert s.spent_import_tokens(clock.now) == []
    assert s.spent_import_tokens(a.expires) == [a]
    assert s.spent_import_tokens(b.expires) == [a, b]
    assert s.live_import_tokens(clock.now) == [a, b]
    assert s.live_import_tokens(a.expires) == [b]
    s.set_import_token_destroyed(a.token)
    assert s.get_import_token(a.token) == replace(a, destroyed=True)
    assert s.spent_import_tokens(b.expires) == [b]
    with pytest.raises(NotFound):
        s.set_import_token_destroyed("c" * 43)
    assert a.expired(a.expires)
    assert not b.expired(a.expires)
    assert replace(b, destroyed=True).expired(clock.now)
