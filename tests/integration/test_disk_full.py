"""The disk under the audit log and the key store fills up, and empties again.

A real size-limited filesystem (a 4 MiB tmpfs mounted for the test) holds the service's
databases. When it is full: calls fail UNAVAILABLE saying why, health is NOT_SERVING, no
signature leaves without its record; what had run keeps its record (written once space returns,
saying the caller was answered UNAVAILABLE); nothing answered OK is missing afterwards; and
the service recovers by itself, without a restart, when space returns.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signer._internal.audit import verify_log
from signer._internal.audit._log import NOT_ANSWERED
from signer.errors import Unavailable
from tests.conftest import (
    FakeClock,
    TokenHostHandle,
    health_status,
    make_config,
    start_service,
    wait_until,
)
from tests.integration.token_probe import count_objects

pytestmark = pytest.mark.integration

if os.geteuid() != 0:  # pragma: no cover - CI and make test run as root
    pytest.fail("test_disk_full mounts a tmpfs and needs root", pytrace=False)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB filesystem of the test's own, unmounted afterwards whatever happens."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(disk)], check=True
    )
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _write_forever(fh: BinaryIO, chunk: bytes) -> None:
    while True:
        fh.write(chunk)


def fill(disk: Path) -> Path:
    """Fills ``disk`` to the last byte; returns the filler."""
    filler = disk / "filler"
    for size in (65536, 1):  # big writes, then byte by byte what they left
        with open(filler, "ab", buffering=0) as fh, pytest.raises(OSError) as full:
            _write_forever(fh, b"\0" * size)
        assert full.value.errno == errno.ENOSPC
    return filler


def test_a_full_disk_fails_closed_loses_nothing_and_recovers_by_itself(
    small_disk: Path, token_host: TokenHostHandle
) -> None:
    cfg = make_config(small_disk, token_host.token_config())
    svc = start_service(cfg, FakeClock(datetime.now(UTC)))
    try:
        c = svc.client(timeout=10)
        c.create_key("full-disk", "ec-p256")
        public = serialization.load_pem_public_key(c.public_key("full-disk").pem.encode())
        assert isinstance(public, ec.EllipticCurvePublicKey)
        received = 0
        for i in range(20):
            sig = c.sign("full-disk", message=f"before {i}".encode())
            public.verify(sig.signature, f"before {i}".encode(), ec.ECDSA(hashes.SHA256()))
            received += 1

        filler = fill(small_disk)
        refused = None
        for i in range(5000):  # until the WAL's free pages are used up too
            try:
                c.sign("full-disk", message=f"filling {i}".encode())
                received += 1
            except Unavailable as exc:
                refused = exc
                break
        assert refused is not None, "the service kept answering OK on a full disk"
        assert "database or disk is full" in refused.message
        assert wait_until(lambda: health_status(svc.address) == "NOT_SERVING", 10)
        with pytest.raises(Unavailable, match="cannot be written"):
            c.sign("full-disk", message=b"while full")  # refused before it runs
        with pytest.raises(Unavailable, match="cannot be written"):
            c.create_key("never-made", "ec-p256")

        filler.unlink()  # space returns; nobody restarts anything
        assert wait_until(lambda: health_status(svc.address) == "SERVING", 20)
        sig = c.sign("full-disk", message=b"after")
        public.verify(sig.signature, b"after", ec.ECDSA(hashes.SHA256()))
        received += 1
    finally:
        svc.stop()

    audit = Path(cfg.audit.path)
    assert verify_log(audit, Path(f"{audit}.key.pem").read_bytes()).whole
    with sqlite3.connect(audit) as db:
        query = "SELECT status FROM records WHERE operation = 'Sign' AND key = 'full-disk'"
        statuses = [s for (s,) in db.execute(query)]
    # Every signature a caller received has its record; the one that ran while the disk was
    # full has its record too, saying its caller was answered UNAVAILABLE.
    assert statuses.count("OK") == received
    assert statuses.count("OK" + NOT_ANSWERED) == 1
    print(f"{received} signatures received, all recorded; 1 kept and written after recovery")


def test_a_full_key_store_refuses_changes_clearly_and_keeps_signing(
    small_disk: Path, tmp_path: Path, token_host: TokenHostHandle
) -> None:
    """Only the key store's disk is full (the audit log is elsewhere): changes fail
    UNAVAILABLE naming the store, not INTERNAL with a traceback; signing, which only reads it,
    goes on; and the key whose row could not be written leaves no object in the token."""
    cfg = make_config(
        small_disk, token_host.token_config(), audit={"path": str(tmp_path / "audit.db")}
    )
    svc = start_service(cfg, FakeClock(datetime.now(UTC)))
    try:
        c = svc.client(timeout=10)
        c.create_key("store-full", "ec-p256")
        objects = svc.blocking(lambda: count_objects(svc.server.token))
        filler = fill(small_disk)
        with pytest.raises(Unavailable, match=r"the key store cannot be used \(database or disk"):
            c.create_key("not-stored", "ec-p256")
        assert svc.blocking(lambda: count_objects(svc.server.token)) == objects  # discarded
        assert c.sign("store-full", message=b"still signing").version == 1
        assert health_status(svc.address) == "SERVING"
        filler.unlink()
        c.create_key("stored-after", "ec-p256")
        assert c.sign("stored-after", message=b"x").version == 1
    finally:
        svc.stop()
