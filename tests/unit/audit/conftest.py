"""Fixtures of the audit log's tests: a software audit key, and closed logs of n records."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from signer._internal.audit import AuditLog, SQLiteAuditStore
from tests.unit.audit.fakes import SoftKey, event, write


@pytest.fixture
def soft() -> SoftKey:
    return SoftKey()


@pytest.fixture
def written(tmp_path: Path, soft: SoftKey) -> Callable[[int], Path]:
    """``written(n)``: a closed log of ``n`` records, checkpoints every 4."""

    def make(n: int) -> Path:
        path = tmp_path / "audit.db"
        log = AuditLog(SQLiteAuditStore(path), checkpoint_every=4, checkpoint_interval=60)
        log.start(soft.make, tmp_path / "audit.db.key.pem")
        for i in range(1, n + 1):
            assert write(log, event(i)) == i
        log.close()
        return path

    return make
