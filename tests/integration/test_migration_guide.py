"""The README's migration guide ("Migrating a key out of a process's memory", issue 17 item 5),
followed step by step with the real service (``signer serve`` as its own process) and the real
command line.

What it proves:

* **Before**: an "old service" process (tests/integration/migration_guide_service.py, ``old``)
  that loaded a PEM EC key and keeps signing holds the key: a ``gcore`` of it, scanned by
  ``signer scan --secrets payments.pem`` as the guide says, has the private scalar (exit 1, a
  ``private_value`` finding, in process memory). This is the positive control: if the scanner
  missed the key there, the clean result below would mean nothing, and the test fails.
* **The import**: ``signer keys import`` as the guide writes it makes the key; the service then
  publishes the PEM's own public key (the same key pair), and a ``gcore`` of the service process
  that received the import, scanned the same way, holds nothing of the key (the CLI wrapped it).
* **After**: a "new service" process, the same code with the one line changed
  (``load_private_key("signer://payments", client=...)``), signs: its signatures verify with the
  public key of the old PEM, and its ``public_key()`` is that key. A ``gcore`` of it, scanned
  the same way, is clean (exit 0, no finding), complete, an ELF core, and whole: a marker the
  process was handed is found in it (a clean result on a core that lost the process's memory
  would otherwise pass).
* Both processes were alive and signing around their dumps (their signature counts grew).

Blind mode (``--public-keys``) is in the guide but not here: on these cores it takes 30 to 45 s
each (its measured figures are in the README).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import SIGNER_BIN, ServiceProcessFactory, UniqueName, need_tool

pytestmark = pytest.mark.integration

SERVICE = Path(__file__).with_name("migration_guide_service.py")


@dataclass
class Running:
    """A running old or new service: its pid, its public key (DER), and its pipes."""

    proc: subprocess.Popen[str]
    public_der: bytes

    def ask(self, line: str) -> str:
        assert self.proc.stdin is not None
        assert self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        assert answer, f"the service ended: {self.proc.wait(10)}"
        return answer

    def sign(self, data: bytes) -> bytes:
        kind, _, sig = self.ask(f"sign {data.hex()}").partition(" ")
        assert kind == "sig"
        return bytes.fromhex(sig)

    def count(self) -> int:
        kind, _, n = self.ask("count").partition(" ")
        assert kind == "count"
        return int(n)


@contextmanager
def _service(marker: bytes, *args: str) -> Iterator[Running]:
    """Starts the guide's service (``old PEM`` or ``new NAME ADDRESS``), hands it the marker,
    waits for ``ready``; ends it at exit."""
    with subprocess.Popen(
        [sys.executable, str(SERVICE), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stdin is not None
        assert proc.stdout is not None
        try:
            proc.stdin.write(marker.hex() + "\n")
            proc.stdin.flush()
            word, _, public = proc.stdout.readline().strip().partition(" ")
            assert word == "ready", f"the service did not start: {proc.poll()}"
            yield Running(proc, bytes.fromhex(public))
        finally:
            proc.stdin.close()
            proc.wait(30)


def _gcore(pid: int, prefix: Path) -> tuple[Path, Path]:
    """The guide's ``cat /proc/PID/maps > PREFIX.maps; gcore -o PREFIX PID``."""
    maps = prefix.with_suffix(".maps")
    maps.write_text(Path(f"/proc/{pid}/maps").read_text())
    subprocess.run(
        [need_tool("gcore"), "-o", str(prefix), str(pid)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    core = prefix.parent / f"{prefix.name}.{pid}"
    assert core.stat().st_size > 1 << 20, core
    return core, maps


@dataclass
class Scan:
    exit: int
    table: str
    stderr: str
    result: dict[str, Any]


def _scan(core: Path, maps: Path, pem: Path, marker: Path) -> Scan:
    """The guide's ``signer scan CORE --maps MAPS --secrets payments.pem --marker ...``."""
    out = core.with_suffix(".json")
    r = subprocess.run(
        [
            str(SIGNER_BIN),
            "scan",
            str(core),
            "--maps",
            str(maps),
            "--secrets",
            str(pem),
            "--marker",
            f"m={marker}",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    core.unlink()  # a core may hold the key (and they are large): gone once scanned
    assert r.returncode in (0, 1), r.stderr  # 2: an error, not an answer
    result = json.loads(out.read_text())
    print(f"{core.name}: exit {r.returncode}\n{r.stdout}{r.stderr}")  # the figures, with -s
    return Scan(r.returncode, r.stdout, r.stderr, result)


def _whole_and_complete(scan: Scan) -> None:
    assert scan.result["is_core"], scan.stderr
    assert scan.result["complete"], scan.stderr
    assert scan.result["markers_found"]["m"] >= 1, scan.stderr


def _spki(key: Any) -> bytes:
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def test_migration_guide_step_by_step(
    service_process_factory: ServiceProcessFactory, unique_name: UniqueName, tmp_path: Path
) -> None:
    """The guide, in its order: the old process holds the key (its scan finds it); the import;
    the service and the new process hold none of it (their scans are clean, on whole cores),
    and the new process signs with the same key pair."""
    need_tool("gcore")
    # What the team has today: payments.pem, an EC P-256 key the service loads at start.
    original = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "payments.pem"
    pem.write_bytes(
        original.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pem.chmod(0o600)
    public = original.public_key()
    old_marker, new_marker = tmp_path / "old.m", tmp_path / "new.m"
    for m in (old_marker, new_marker):
        m.write_bytes(os.urandom(32))
    artifact = b"release-4.2.0.tar.gz" * 100

    # Step 3a, taken first as the guide says: the old process, dumped while it runs.
    with _service(old_marker.read_bytes(), "old", str(pem)) as old:
        assert old.public_der == _spki(public)
        public.verify(old.sign(artifact), artifact, ec.ECDSA(hashes.SHA256()))
        before = old.count()
        old_core, old_maps = _gcore(old.proc.pid, tmp_path / "old")
        assert old.count() > before  # alive and signing around the dump
    old_scan = _scan(old_core, old_maps, pem, old_marker)
    # The positive control: the scanner finds the key where it is.
    assert old_scan.exit == 1, old_scan.stderr
    _whole_and_complete(old_scan)
    findings = old_scan.result["findings"]
    assert findings
    assert {f["secret_id"] for f in findings} == {"payments.pem"}
    assert {f["component"] for f in findings} == {"private_value"}
    assert all(f["address"] is not None for f in findings)  # in the process's memory
    assert "payments.pem" in old_scan.table
    assert "private_value" in old_scan.table

    # Step 1: the import, exactly as the guide writes it (the CLI reads and wraps the PEM).
    svc = service_process_factory()
    name = unique_name("payments")
    cli = [str(SIGNER_BIN), "keys"]
    r = subprocess.run(
        [
            *cli,
            "import",
            name,
            "--algorithm",
            "ec-p256",
            "--in",
            str(pem),
            "--scope",
            "enterprise",
            "--address",
            svc.address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert (shown["name"], shown["primary_version"], shown["scope"]) == (name, 1, "enterprise")
    assert [v["state"] for v in shown["versions"]] == ["enabled"]
    r = subprocess.run(
        [*cli, "public", name, "--address", svc.address],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    published = serialization.load_pem_public_key(r.stdout.encode())
    assert _spki(published) == _spki(public)  # the same key pair, now in the token
    # ... and the guide's check of it, with openssl, gives the same text.
    ours = subprocess.run(
        ["openssl", "pkey", "-in", str(pem), "-pubout"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert ours.stdout == r.stdout

    # The service that received the import holds nothing of the key (its marker: the key's
    # name, which it does hold).
    svc_marker = tmp_path / "service.m"
    svc_marker.write_bytes(name.encode())
    svc_core, svc_maps = _gcore(svc.pid, tmp_path / "service")
    svc_scan = _scan(svc_core, svc_maps, pem, svc_marker)
    assert svc_scan.exit == 0, svc_scan.table
    assert svc_scan.result["findings"] == []
    _whole_and_complete(svc_scan)

    # Step 2: the new process, the one line changed; step 3b: its dump.
    with _service(new_marker.read_bytes(), "new", name, svc.address) as new:
        assert new.public_der == _spki(public)
        public.verify(new.sign(artifact), artifact, ec.ECDSA(hashes.SHA256()))
        before = new.count()
        new_core, new_maps = _gcore(new.proc.pid, tmp_path / "new")
        assert new.count() > before
    new_scan = _scan(new_core, new_maps, pem, new_marker)
    assert new_scan.exit == 0, new_scan.table
    assert new_scan.result["findings"] == []
    assert new_scan.table == ""
    _whole_and_complete(new_scan)
    assert "scan: clean" in new_scan.stderr
    # A core as large as the old one: the whole process, not a stub.
    assert new_scan.result["bytes_scanned"] >= old_scan.result["bytes_scanned"] // 2
