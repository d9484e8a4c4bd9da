"""Compressed cores (issue 14): zstd, lz4 and xz, as systemd-coredump stores them, scanned as the
stream they decompress to (signer/scan/_compressed.py, _stream.py).

The invariant: the result of the decompressed file, exactly (findings with their addresses and
mappings, markers, bytes_scanned, the blind report), without a decompressed copy; or, for a
stream cut short, corrupt, or expanding past its bounds, a ScanError naming the file and where.
"""

from __future__ import annotations

import json
import lzma
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lz4.frame
import pytest
import zstandard
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm

from fuzz import targets
from fuzz.elfcore import Load, build
from signer.errors import ScanError
from signer.scan import Scanner, ScanResult, secret_from_key, secret_from_pin
from signer.scan._stream import EXTENT_SLACK, STREAM_CHUNK
from tests.unit.scan.cli import run_cli

from .conftest import PIN, Keys, memory_like

HEAP, LIB = 0x5555_5555_0000, 0x7F00_0000_0000
CHUNK = 64 << 10  # forced small: many chunk boundaries in a 2 MiB core
RSS_BOUND_MIB = 256  # as tests/unit/scan/test_hostile_cores.py holds `signer scan`


def compress(codec: str, data: bytes) -> bytes:
    """With the bindings, checksums on (as the command-line tools and systemd write them)."""
    if codec == "zstd":
        return zstandard.ZstdCompressor(write_checksum=True).compress(data)
    if codec == "lz4":
        return bytes(lz4.frame.compress(data, content_checksum=True))
    return lzma.compress(data, preset=1)


CODECS = ["zstd", "lz4", "xz"]


# --- a core with everything planted -------------------------------------------------------------


class Planted:
    """A core whose heap holds known secrets (the test keys' EC scalar, RSA prime, the PIN, a
    PEM) and what only blind mode finds (an RSA prime and a PKCS#8 DER of a key known by its
    public half, an EC scalar as 64-bit limbs and a JWK of another), each at a file offset a
    test chooses (``at``: on chunk boundaries, for one)."""

    def __init__(self, keys: Keys, blind_rsa: rsa.RSAPrivateKey, blind_ec: Any) -> None:
        self.keys, self.blind_rsa, self.blind_ec = keys, blind_rsa, blind_ec
        self.core = build(
            [Load(HEAP, bytes(memory_like(2 << 20, seed=7))), Load(LIB, bytes(64 << 10))],
            [(LIB, LIB + (64 << 10), "/usr/lib/libplanted.so.1")],
        )

    def items(self) -> list[tuple[str, bytes]]:
        k = self.keys
        jwk = json.loads(ECAlgorithm.to_jwk(self.blind_ec))
        scalar = self.blind_ec.private_numbers().private_value
        return [
            ("ec", k.p256.private_numbers().private_value.to_bytes(32, "big")),
            ("rsa", k.rsa2048.private_numbers().p.to_bytes(128, "big")),
            ("pin", PIN),
            ("pem", k.p256.private_bytes(serialization.Encoding.PEM, PKCS8, NOENC)),
            ("blind-rsa-p", self.blind_rsa.private_numbers().q.to_bytes(128, "big")),
            ("blind-der", self.blind_rsa.private_bytes(serialization.Encoding.DER, PKCS8, NOENC)),
            ("blind-limbs", scalar.to_bytes(32, "little")),  # 4 limbs, little-endian
            ("blind-jwk", ('{"pad": "' + "x" * 600 + '", ' + json.dumps(jwk)[1:]).encode()),
            # Longer than any known representation: its loader reads past the hit's context.
            (
                "blind-openssh",
                self.blind_rsa.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, NOENC
                ),
            ),
        ]

    @property
    def base(self) -> int:
        """The heap's file offset."""
        return self.core.offsets[0]

    def plant(self, at: Callable[[int, str, int], int]) -> bytes:
        """Each item at heap offset ``at(index, name, length)``."""
        data = bytearray(self.core.bytes())
        for i, (name, item) in enumerate(self.items()):
            offset = at(i, name, len(item))
            assert 0 <= offset <= (2 << 20) - len(item)
            data[self.base + offset : self.base + offset + len(item)] = item
        return bytes(data)


PKCS8 = serialization.PrivateFormat.PKCS8
NOENC = serialization.NoEncryption()


@pytest.fixture(scope="module")
def planted(keys: Keys) -> Planted:
    return Planted(
        keys, rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1())
    )


_scanners: dict[tuple[int, bool, bool], Scanner] = {}


def scanner_for(planted: Planted, chunk: int, known: bool = True, blind: bool = True) -> Scanner:
    """Known secrets and blind mode; or one of them alone (each widens the chunks' context by
    what it reads around a hit: alone, a test sees that its own reach is enough)."""
    if (chunk, known, blind) not in _scanners:
        k = planted.keys
        _scanners[(chunk, known, blind)] = Scanner(
            [
                secret_from_key(k.p256, "ec"),
                secret_from_key(k.rsa2048, "rsa"),
                secret_from_pin(PIN, "pin"),
            ]
            if known
            else [],
            public_keys={
                "blind-rsa": planted.blind_rsa.public_key(),
                "blind-ec": planted.blind_ec.public_key(),
            }
            if blind
            else None,
            blind_budget_seconds=300,
            chunk_size=chunk,
        )
    return _scanners[(chunk, known, blind)]


def spread(i: int, name: str, length: int) -> int:
    """Items 200 KiB apart, the limbs at an 8-aligned offset (the heap's offset is aligned)."""
    return 4096 * 3 + i * (200 << 10) + (0 if name == "blind-limbs" else 5)


def comparable(result: ScanResult) -> dict[str, Any]:
    """Everything a result says but the time it took and the notes (which name the codec)."""
    out = result.to_dict()
    del out["seconds"], out["notes"], out["path"]
    if out["blind"] is not None:
        for check in out["blind"]["checks"]:
            del check["seconds"]
    return out


def _pair(tmp_path: Path, data: bytes, codec: str, name: str = "core") -> tuple[Path, Path]:
    plain = tmp_path / name
    plain.write_bytes(data)
    packed = tmp_path / f"{name}.{codec}"
    packed.write_bytes(compress(codec, data))
    return plain, packed


MARKERS = {"lib": b"/usr/lib/libplanted.so.1"}


# --- the same result as the decompressed file --------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_same_result_as_the_decompressed_file(codec: str, planted: Planted, tmp_path: Path) -> None:
    plain, packed = _pair(tmp_path, planted.plant(spread), codec)
    sc = scanner_for(planted, STREAM_CHUNK)
    want = sc.scan(plain, markers=MARKERS)
    got = sc.scan(packed, markers=MARKERS)
    assert comparable(got) == comparable(want)
    assert got.path == packed
    assert got.notes[0].startswith(f"{codec}-compressed ({packed.stat().st_size} bytes)")
    assert got.notes[1:] == want.notes
    # And what was found is what was planted, with the addresses it was planted at.
    found = {(f.secret_id, f.representation, f.address) for f in got.findings}
    assert ("ec", "be", HEAP + spread(0, "ec", 32)) in found
    assert ("pin", "utf8", HEAP + spread(2, "pin", 32)) in found
    assert ("blind-rsa", "verified-rsa-factor", HEAP + spread(4, "", 0)) in found
    assert ("blind-rsa", "der-pkcs8", HEAP + spread(5, "", 0)) in found
    assert ("blind-ec", "verified-ec-scalar", HEAP + spread(6, "blind-limbs", 0)) in found
    assert any(s == "blind-ec" and r == "jwk-private" for s, r, _ in found)
    assert ("blind-rsa", "openssh-private", HEAP + spread(8, "", 0)) in found
    assert {f.mapping for f in got.findings} == {"anon"}
    assert got.markers_found == {"lib": 1}  # the NT_FILE note names it once
    assert got.blind is not None
    assert got.blind.complete


@pytest.mark.parametrize("codec", CODECS)
def test_keys_across_chunk_boundaries(codec: str, planted: Planted, tmp_path: Path) -> None:
    """64 KiB chunks, each item straddling a boundary: a known key's bytes cut in two, a PEM
    whose match begins a chunk before its hits, a DER structure and a JWK whose object starts
    in the chunk before its "d", a limb-encoded scalar and a prime cut by the boundary."""
    base = planted.base

    def across(i: int, name: str, length: int) -> int:
        boundary = (base // CHUNK + 2 + 3 * i) * CHUNK
        cut = 8 if name == "blind-limbs" else length // 2 + 3  # the limbs stay 8-aligned
        return boundary - cut - base

    plain, packed = _pair(tmp_path, planted.plant(across), codec)
    sc = scanner_for(planted, CHUNK)
    want = sc.scan(plain)
    got = sc.scan(packed)
    assert comparable(got) == comparable(want)
    # Every planted item found, across its boundary.
    names = {(f.secret_id, f.representation) for f in got.findings}
    assert {("ec", "be"), ("rsa", "be"), ("pin", "utf8"), ("ec", "pem")} <= names
    assert {
        ("blind-rsa", "verified-rsa-factor"),
        ("blind-rsa", "der-pkcs8"),
        ("blind-ec", "verified-ec-scalar"),
        ("blind-ec", "jwk-private"),
        ("blind-rsa", "openssh-private"),
    } <= names
    for f in got.findings:
        assert f.offset // CHUNK != (f.offset + f.length - 1) // CHUNK, f
    # The same scanner with a chunk larger than the file: the same findings again.
    assert (
        comparable(scanner_for(planted, STREAM_CHUNK).scan(packed))["findings"]
        == comparable(want)["findings"]
    )
    # Known secrets alone: a match grows to a representation's length either way.
    alone = scanner_for(planted, CHUNK, blind=False)
    assert comparable(alone.scan(packed)) == comparable(alone.scan(plain))
    # Blind mode alone: the structures' loaders read 8 KiB back and up to 128 KiB on.
    alone = scanner_for(planted, CHUNK, known=False)
    want = alone.scan(plain)
    got = alone.scan(packed)
    assert comparable(got) == comparable(want)
    names = {(f.secret_id, f.representation) for f in got.findings}
    assert {
        ("blind-rsa", "verified-rsa-factor"),
        ("blind-rsa", "der-pkcs8"),
        ("blind-ec", "verified-ec-scalar"),
        ("blind-ec", "jwk-private"),
        ("blind-rsa", "openssh-private"),
    } <= names


def test_format_is_told_by_magic_not_by_name(planted: Planted, tmp_path: Path) -> None:
    data = planted.plant(spread)
    sc = scanner_for(planted, STREAM_CHUNK)
    disguised = tmp_path / "core.bin"
    disguised.write_bytes(compress("zstd", data))
    plain_named_zst = tmp_path / "core.zst"
    plain_named_zst.write_bytes(data)
    want = comparable(sc.scan(plain_named_zst))
    assert comparable(sc.scan(disguised)) == want
    assert not any("compressed" in n for n in sc.scan(plain_named_zst).notes)


@pytest.mark.parametrize("codec", CODECS)
def test_raw_bytes_and_an_empty_stream(codec: str, tmp_path: Path) -> None:
    """Not a core: scanned as raw bytes, as the decompressed file is; nothing at all: as an empty
    file is (the blind report included)."""
    sc = Scanner(
        [secret_from_pin(PIN, "pin")],
        public_keys=[ec.generate_private_key(ec.SECP256R1()).public_key()],
    )
    data = bytearray(memory_like(300_000, seed=9))
    data[123_457 : 123_457 + len(PIN)] = PIN
    for content in (bytes(data), b""):
        plain, packed = _pair(tmp_path, content, codec)
        want, got = sc.scan(plain), sc.scan(packed)
        assert comparable(got) == comparable(want)
        assert got.notes[1:] == want.notes
    assert "empty file" in got.notes


def test_concatenated_frames_and_skippable_frames(planted: Planted, tmp_path: Path) -> None:
    """``cat a.zst b.zst`` and a skippable frame are read as the zstd command reads them."""
    data = planted.plant(spread)
    sc = scanner_for(planted, STREAM_CHUNK)
    half = len(data) // 2 + 1234
    skippable = struct.pack("<II", 0x184D2A50, 5) + b"meta!"
    plain = tmp_path / "core"
    plain.write_bytes(data)
    packed = tmp_path / "core.zst"
    packed.write_bytes(
        skippable + compress("zstd", data[:half]) + skippable + compress("zstd", data[half:])
    )
    assert comparable(sc.scan(packed)) == comparable(sc.scan(plain))
    padded = tmp_path / "core.xz"
    padded.write_bytes(compress("xz", data[:half]) + bytes(8) + compress("xz", data[half:]))
    assert comparable(sc.scan(padded)) == comparable(sc.scan(plain))


# --- cut short, corrupt ------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_cut_short_or_corrupt_is_an_error_naming_file_and_offset(
    codec: str, planted: Planted, tmp_path: Path
) -> None:
    """Fail closed: no partial result for a stream whose end cannot be read."""
    sc = scanner_for(planted, STREAM_CHUNK)
    packed = compress(codec, planted.plant(spread))
    path = tmp_path / f"core.{codec}"
    for cut in (len(packed) - 1, len(packed) // 2, 40):
        path.write_bytes(packed[:cut])
        with pytest.raises(
            ScanError, match=rf"dump {re.escape(str(path))}: {codec} stream is cut short"
        ) as exc:
            sc.scan(path)
        assert re.search(
            r"compressed byte.* \(decompressed byte \d+\): nothing was scanned", str(exc.value)
        )
    corrupt = bytearray(packed)
    corrupt[len(packed) // 2] ^= 0x55  # inside the compressed data: the checksum tells
    path.write_bytes(bytes(corrupt))
    with pytest.raises(
        ScanError, match=rf"{codec} stream is (corrupt|cut short).* in compressed bytes? \d+"
    ):
        sc.scan(path)
    path.write_bytes(packed + b"trailing garbage")
    with pytest.raises(
        ScanError, match=f"{codec} stream is followed by bytes that are not an? {codec}"
    ):
        sc.scan(path)


# --- bombs ---------------------------------------------------------------------------------------


def _zeros(codec: str, size: int) -> bytes:
    """``size`` zero bytes compressed, without holding them: a frame of 16 MiB repeated."""
    block = compress(codec, bytes(16 << 20))
    return block * (size // (16 << 20))


@pytest.mark.parametrize("codec", CODECS)
def test_bomb_is_bounded_by_max_output(codec: str, tmp_path: Path) -> None:
    """A few MB that expand to 4 GiB of zeros (not a core): refused once max_output is passed,
    in seconds, in bounded memory."""
    path = tmp_path / f"bomb.{codec}"
    path.write_bytes(_zeros(codec, 4 << 30))
    assert path.stat().st_size < 20 << 20
    sc = Scanner([secret_from_pin(PIN, "pin")], max_output=256 << 20)
    began = time.monotonic()
    with pytest.raises(
        ScanError, match=r"goes on past 268435456 bytes \(max_output\): a decompression bomb"
    ):
        sc.scan(path)
    assert time.monotonic() - began < 20


@pytest.mark.parametrize("codec", CODECS)
def test_core_bomb_is_bounded_by_its_declared_extent(codec: str, tmp_path: Path) -> None:
    """A real core header declaring 64 KiB of memory, then gigabytes of zeros: refused just past
    the declared end, whatever max_output allows."""
    core = build([Load(HEAP, bytes(memory_like(64 << 10)))], [])
    extent = len(core.bytes())
    body = core.bytes() + bytes((16 << 20) - extent)
    path = tmp_path / f"core.{codec}"
    path.write_bytes(compress(codec, body) + _zeros(codec, 1 << 30))
    sc = Scanner([secret_from_pin(PIN, "pin")])
    with pytest.raises(
        ScanError,
        match=rf"past {extent + EXTENT_SLACK} bytes \(the core's headers declare {extent}\)",
    ):
        sc.scan(path)


def test_deadline_bounds_the_time(tmp_path: Path) -> None:
    path = tmp_path / "bomb.zst"
    path.write_bytes(_zeros("zstd", 4 << 30))
    sc = Scanner([secret_from_pin(PIN, "pin")])
    began = time.monotonic()
    with pytest.raises(ScanError, match=r"the scan's time ran out after \d+ decompressed bytes"):
        sc.scan(path, deadline=time.monotonic() + 0.5)
    assert time.monotonic() - began < 5


# --- a real core, the real tools ---------------------------------------------------------------

CHILD = """
import os, resource, signal, sys
from cryptography.hazmat.primitives import serialization
key = serialization.load_pem_private_key(open(sys.argv[1], "rb").read(), None)
pin = open(sys.argv[2], "rb").read()
hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
os.kill(os.getpid(), signal.SIGSEGV)
"""

TOOLS = {"zstd": ["zstd", "-q", "-3"], "lz4": ["lz4", "-q", "-1"], "xz": ["xz", "-q", "-1"]}


def test_real_kernel_core_compressed_by_the_command_line_tools(keys: Keys, tmp_path: Path) -> None:
    """A process holding a key and a PIN dies of SIGSEGV; the kernel writes its core (pattern
    ``core``, as this host keeps it); zstd, lz4 and xz compress it as systemd-coredump would store
    it. Each compressed file gives the core's result: the key and the PIN, at the same addresses
    in the same mappings."""
    assert Path("/proc/sys/kernel/core_pattern").read_text().strip() == "core"
    key_file, pin_file = tmp_path / "key.pem", tmp_path / "user.pin"
    key_file.write_bytes(keys.p256.private_bytes(serialization.Encoding.PEM, PKCS8, NOENC))
    pin_file.write_bytes(PIN)
    work = tmp_path / "crash"
    work.mkdir()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(key_file), str(pin_file)],
        cwd=work,
        check=False,
        timeout=60,
    )
    assert proc.returncode == -signal.SIGSEGV
    [core] = list(work.glob("core*"))
    sc = Scanner([secret_from_key(keys.p256, "ec"), secret_from_pin(PIN, "pin")])
    want = sc.scan(core)
    assert want.is_core
    assert {f.secret_id for f in want.findings} == {"ec", "pin"}
    for codec, argv in TOOLS.items():
        packed = tmp_path / f"core.{codec}"
        with open(core, "rb") as src, open(packed, "wb") as out:
            subprocess.run([*argv, "-c"], stdin=src, stdout=out, check=True, timeout=120)
        got = sc.scan(packed)
        assert comparable(got) == comparable(want), codec
        assert all(f.address is not None and f.mapping for f in got.findings)


# --- memory --------------------------------------------------------------------------------------


def test_a_gib_core_is_scanned_in_bounded_memory(tmp_path: Path) -> None:
    """A 1 GiB core, mostly zero pages as cores are, compressed by the zstd command: `signer scan`
    finds the PIN at both ends and in the middle, and its peak RSS stays under the bound the
    hostile-file tests hold (the decompressed core would be four times that)."""
    size = 1 << 30
    core = build([Load(HEAP, bytes(4096))], [])
    start = core.offsets[0]
    core.phdr(1, filesz=size, memsz=size)
    path = tmp_path / "core"
    places = [start, start + size // 2 + 17, start + size - len(PIN)]
    with open(path, "wb") as f:
        f.write(core.bytes()[:start])
        f.truncate(start + size)
        for at in places:
            f.seek(at)
            f.write(PIN)
    packed = tmp_path / "core.zst"
    subprocess.run(["zstd", "-q", "-1", "-o", str(packed), str(path)], check=True, timeout=120)
    path.unlink()
    pin_file = tmp_path / "user.pin"
    pin_file.write_bytes(PIN)
    began = time.monotonic()
    code, err, rss = run_cli(packed, "--secrets", pin_file, "--json", tmp_path / "out.json")
    seconds = time.monotonic() - began
    assert code == 1, err
    assert "3 findings" in err
    assert "zstd-compressed" in err
    offsets = [f["offset"] for f in json.loads((tmp_path / "out.json").read_text())["findings"]]
    assert offsets == places
    assert rss < RSS_BOUND_MIB, rss
    assert seconds < 60


# --- properties ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_core() -> bytes:
    heap = bytearray(memory_like(8192, seed=4))
    heap[1000 : 1000 + len(targets.PIN)] = targets.PIN
    return build([Load(HEAP, bytes(heap))], [(HEAP, HEAP + 8192, "/x")]).bytes()


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    codec=st.sampled_from(CODECS),
    flips=st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(1, 255)), max_size=4),
    cut=st.one_of(st.none(), st.integers(0, 1 << 16)),
)
def test_any_bent_stream(
    small_core: bytes, codec: str, flips: list[tuple[int, int]], cut: int | None
) -> None:
    """A compressed core with bytes flipped and cut anywhere: the decompressed file's result, or
    ScanError (the fuzz target's invariant, fuzz.targets.scan_compressed); unbent, the PIN."""
    data = bytearray(compress(codec, small_core))
    for at, x in flips:
        data[at % len(data)] ^= x
    bent = bytes(data[:cut])
    targets.scan_compressed(bent)
    if not flips and cut is None:
        path = targets._file(bent, "dump.compressed")
        assert [f.secret_id for f in targets.compressed_scanner().scan(path).findings] == ["pin"]
