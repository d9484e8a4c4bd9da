"""The scanner on real cores: a child Python process that holds a software key and a PIN is
dumped with ``gcore``; every component of the key is found, with addresses that really hold it
and mapping names from the child's maps. A child that never saw the key gives a clean dump
(with the marker found, so the clean result is about a whole dump)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from signer.scan import Scanner, ScanResult, load_secrets
from tests.conftest import need_tool

pytestmark = pytest.mark.integration

# The child: allows any tracer (Yama ptrace_scope 1), loads what it is told to, keeps it alive,
# says "ready" and waits for its stdin to close.
CHILD = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PTRACER, PR_SET_PTRACER_ANY = 0x59616D61, ctypes.c_ulong(-1)
if os.path.exists("/proc/sys/kernel/yama/ptrace_scope"):
    libc.prctl(PR_SET_PTRACER, PR_SET_PTRACER_ANY, 0, 0, 0)
marker = bytes.fromhex(sys.argv[1])
held = []
if len(sys.argv) > 2:
    from cryptography.hazmat.primitives import serialization
    for path in sys.argv[2:-1]:
        key = serialization.load_pem_private_key(open(path, "rb").read(), None)
        nums = key.private_numbers()
        if hasattr(nums, "d"):
            ints = [nums.d, nums.p, nums.q, nums.dmp1, nums.dmq1, nums.iqmp]
        else:
            ints = [nums.private_value]
        held += [key, nums, ints, [i.to_bytes((i.bit_length() + 7) // 8, "big") for i in ints]]
    pin = open(sys.argv[-1]).read().strip()  # a str, as an application holds it
    held += [pin, pin.encode("utf-16-le")]
print("ready", flush=True)
sys.stdin.read()
"""


@dataclass
class Dumped:
    core: Path
    maps: Path
    pid: int
    memory: dict[int, bytes]  # address -> bytes read from the live child


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("material")
    enc = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    for name, key in (
        ("control-rsa.pem", rsa.generate_private_key(65537, 2048)),
        ("control-ec.pem", ec.generate_private_key(ec.SECP256R1())),
    ):
        (d / name).write_bytes(key.private_bytes(*enc, serialization.NoEncryption()))
    (d / "user.pin").write_text(os.urandom(16).hex() + "\n")
    return d


@pytest.fixture(scope="module")
def scanner(material: Path) -> Scanner:
    return Scanner(
        load_secrets(
            [material / "control-rsa.pem", material / "control-ec.pem", material / "user.pin"]
        )
    )


MARKER = os.urandom(32)


@contextlib.contextmanager
def _dump(workdir: Path, args: list[str]) -> Iterator[Dumped]:
    """Starts the child, snapshots its maps, dumps it with gcore; the child lives until exit."""
    gcore = need_tool("gcore")
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, MARKER.hex(), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None
        assert child.stdout is not None
        try:
            assert child.stdout.readline().strip() == "ready"
            maps = workdir / "maps"
            maps.write_text(Path(f"/proc/{child.pid}/maps").read_text())
            subprocess.run(
                [gcore, "-o", str(workdir / "core"), str(child.pid)],
                check=True,
                capture_output=True,
                timeout=120,
            )
            yield Dumped(workdir / f"core.{child.pid}", maps, child.pid, {})
        finally:
            child.stdin.close()
            child.wait(30)


@pytest.fixture(scope="module")
def leaky(
    tmp_path_factory: pytest.TempPathFactory, material: Path, scanner: Scanner
) -> Iterator[tuple[Dumped, ScanResult]]:
    """The control: a child holding both keys and the PIN; scanned while it is still alive, so
    the test can read the memory at each finding's address."""
    work = tmp_path_factory.mktemp("leaky")
    args = [
        str(material / "control-rsa.pem"),
        str(material / "control-ec.pem"),
        str(material / "user.pin"),
    ]
    with _dump(work, args) as dumped:
        result = scanner.scan(dumped.core, maps=dumped.maps, markers={"marker": MARKER})
        with open(f"/proc/{dumped.pid}/mem", "rb") as mem:
            for f in result.findings:
                if f.address is not None:
                    mem.seek(f.address)
                    dumped.memory[f.address] = mem.read(f.length)
        yield dumped, result


def test_every_component_of_the_control_key_found(leaky: tuple[Dumped, ScanResult]) -> None:
    _, result = leaky
    assert result.is_core
    assert result.complete
    assert result.markers_found["marker"] >= 1
    found: dict[tuple[str, str], set[str]] = {}
    for f in result.findings:
        found.setdefault((f.secret_id, f.component), set()).add(f.representation)
    for comp in ("d", "p", "q", "dP", "dQ", "qInv"):
        reps = found.get(("control-rsa.pem", comp), set())
        # le64: OpenSSL's BIGNUMs; cpython30: the ints of private_numbers(); be: to_bytes().
        assert {"be", "le64", "cpython30"} <= reps, (comp, reps)
    assert {"be", "le64", "cpython30"} <= found[("control-ec.pem", "private_value")]
    assert {"utf8", "utf16le"} <= found[("user.pin", "pin")]


def test_addresses_hold_what_the_core_holds(leaky: tuple[Dumped, ScanResult]) -> None:
    """Each finding's address, read in the live child, holds the bytes at its core offset."""
    dumped, result = leaky
    data = dumped.core.read_bytes()
    in_memory = [f for f in result.findings if f.address is not None]
    assert len(in_memory) >= 20
    for f in in_memory:
        assert f.address is not None
        assert dumped.memory[f.address] == data[f.offset : f.offset + f.length], f


def test_mappings_named_from_the_maps_snapshot(leaky: tuple[Dumped, ScanResult]) -> None:
    _, result = leaky
    names = {f.mapping for f in result.findings if f.address is not None}
    assert names & {"[heap]", "[anon]", "[stack]"}, names  # only the snapshot gives these
    assert "anon" not in names  # every anonymous region was named by the snapshot
    assert result.bytes_scanned > 1 << 20
    assert result.bytes_scanned < result.size


def test_clean_core_gives_no_finding(tmp_path: Path, scanner: Scanner) -> None:
    """A child that never saw the keys or the PIN: whole (marker found) and clean."""
    with _dump(tmp_path, []) as dumped:
        result = scanner.scan(dumped.core, maps=dumped.maps, markers={"marker": MARKER})
        assert result.is_core
        assert result.complete
        assert result.markers_found["marker"] >= 1
        assert result.findings == []
