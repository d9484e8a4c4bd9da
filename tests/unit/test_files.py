"""signer._internal.files: the service's state is owner-only from the moment it exists (issue
11)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from signer._internal.files import (
    private_database,
    private_file,
    state_dir,
    write_atomic,
    write_private,
)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(autouse=True)
def open_umask() -> Iterator[None]:
    """The most permissive umask: modes must not depend on the caller's."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_a_new_file_is_owner_only_from_the_start(tmp_path: Path) -> None:
    path = private_file(tmp_path / "signer.db")
    assert (path.read_bytes(), mode(path)) == (b"", 0o600)


def test_an_older_open_file_is_closed_up_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text("[[grant]]\n")
    path.chmod(0o644)
    private_file(path)
    assert (path.read_text(), mode(path)) == ("[[grant]]\n", 0o600)
    write_private(path, "new")
    assert (path.read_text(), mode(path)) == ("new", 0o600)


def test_a_databases_journal_files_are_closed_up_too(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    for name in ("audit.db", "audit.db-wal", "audit.db-shm"):
        (tmp_path / name).write_bytes(b"x")
        (tmp_path / name).chmod(0o644)
    private_database(db)
    assert {p.name: mode(p) for p in tmp_path.iterdir()} == {
        "audit.db": 0o600,
        "audit.db-wal": 0o600,
        "audit.db-shm": 0o600,
    }
    assert not (tmp_path / "audit.db-journal").exists()  # not created when absent


def test_a_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("")
    target.chmod(0o644)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(OSError):
        private_file(tmp_path / "link")
    assert mode(target) == 0o644


def test_state_directories_can_be_passed_through_not_listed(tmp_path: Path) -> None:
    assert mode(state_dir(tmp_path / "var" / "deep")) == 0o711
    (tmp_path / "var").chmod(0o755)
    assert mode(state_dir(tmp_path / "var")) == 0o711


def test_write_atomic_replaces_whole_with_its_mode_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text("old")
    os.chmod(path, 0o644)
    write_atomic(path, "new", 0o600)
    assert path.read_text() == "new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    write_atomic(path, b"\x00bytes", 0o755)
    assert path.read_bytes() == b"\x00bytes"
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_write_atomic_never_writes_through_a_planted_link(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("untouched")
    (tmp_path / ".pin.tmp").symlink_to(target)
    with pytest.raises(OSError):
        write_atomic(tmp_path / "pin", "data")
    assert target.read_text() == "untouched"
    assert not (tmp_path / "pin").exists()
