"""Fixtures of the keyring tests: a store whose writes can fail, and a fake clock."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import FakeClock
from tests.unit.fakes import FailingStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[FailingStore]:
    s = FailingStore(tmp_path / "signer.db")
    yield s
    s.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
