"""Fixtures of the audit log's tests: the backend (every test runs on SQLite and on
PostgreSQL), a software audit key, and closed logs of n records."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from signer._internal.audit import AuditLog
from tests.unit.audit.fakes import Backend, SoftKey, event, write


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """Where the test's logs live. On PostgreSQL: schemas of the session's throwaway cluster
    (tests/postgres.py), one per log the test names, dropped after it."""
    if request.param == "sqlite":
        yield Backend("sqlite")
        return
    import psycopg
    from psycopg import sql

    cluster = request.getfixturevalue("pg_cluster")
    made: list[str] = []

    def dsn(schema: str) -> str:
        if schema not in made:
            with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
                conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
            made.append(schema)
        return str(cluster.dsn(search_path=schema))

    yield Backend("postgresql", dsn)
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        for schema in made:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture
def soft() -> SoftKey:
    return SoftKey()


@pytest.fixture
def written(tmp_path: Path, soft: SoftKey, backend: Backend) -> Callable[[int], Path]:
    """``written(n)``: a closed log of ``n`` records, checkpoints every 4."""

    def make(n: int) -> Path:
        path = tmp_path / "audit.db"
        log = AuditLog(backend.store(path), checkpoint_every=4, checkpoint_interval=60)
        log.start(soft.make, tmp_path / "audit.db.key.pem")
        for i in range(1, n + 1):
            assert write(log, event(i)) == i
        log.close()
        return path

    return make
