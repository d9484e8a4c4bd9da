"""ELF cores built here byte by byte: offsets map to addresses and to named mappings."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import pytest

from signer.scan import Scanner
from signer.scan._elf import NamedRange, parse_core, parse_maps

from .conftest import PIN, Keys, random_bytes

LIB = "/usr/lib/x86_64-linux-gnu/libfake.so.1"
NT_PRSTATUS, NT_FILE = 1, 0x46494C45


@dataclass
class Seg:
    vaddr: int
    data: bytes
    memsz: int | None = None  # larger than len(data): memory the dumper left out


def build_core(
    segs: list[Seg],
    files: list[tuple[int, int, str]],
    prstatus: bytes = b"\0" * 336,
    is64: bool = True,
    xnum: bool = False,
    misalign: int = 0,
) -> tuple[bytes, list[int]]:
    """An ET_CORE file: ELF header, PT_NOTE (NT_PRSTATUS, NT_FILE), PT_LOADs. Returns the bytes
    and each segment's file offset (``misalign`` shifts them off page boundaries, as gdb does)."""
    e = "<"
    w = "Q" if is64 else "I"
    ehsize, phentsize = (64, 56) if is64 else (52, 32)

    def note(ntype: int, desc: bytes) -> bytes:
        name = b"CORE\0\0\0\0"
        return struct.pack(e + "III", 5, len(desc), ntype) + name + desc + b"\0" * (-len(desc) % 4)

    nt_file = struct.pack(e + w + w, len(files), 4096)
    nt_file += b"".join(struct.pack(e + w * 3, s, t, 0) for s, t, _ in files)
    nt_file += b"".join(n.encode() + b"\0" for _, _, n in files)
    notes = note(NT_PRSTATUS, prstatus) + note(NT_FILE, nt_file)
    phnum = 1 + len(segs)
    phoff = ehsize
    notes_at = phoff + phnum * phentsize
    shoff = notes_at + len(notes) if xnum else 0
    at = (notes_at + len(notes) + 64 + 4095) // 4096 * 4096 + misalign
    offsets = []
    for s in segs:
        offsets.append(at)
        at += len(s.data)
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 1, 1]) + b"\0" * 9
    hdr_fmt = e + ("16sHHIQQQIHHHHHH" if is64 else "16sHHIIIIIHHHHHH")
    header = struct.pack(
        hdr_fmt,
        ident,
        4,
        62 if is64 else 3,
        1,
        0,
        phoff,
        shoff,
        0,
        ehsize,
        phentsize,
        0xFFFF if xnum else phnum,
        64 if xnum else 0,
        1 if xnum else 0,
        0,
    )

    def phdr(ptype: int, off: int, vaddr: int, filesz: int, memsz: int) -> bytes:
        if is64:
            return struct.pack(e + "IIQQQQQQ", ptype, 6, off, vaddr, 0, filesz, memsz, 4096)
        return struct.pack(e + "IIIIIIII", ptype, off, vaddr, 0, filesz, memsz, 6, 4096)

    out = bytearray(header)
    out += phdr(4, notes_at, 0, len(notes), 0)
    for s, off in zip(segs, offsets, strict=True):
        out += phdr(1, off, s.vaddr, len(s.data), s.memsz or len(s.data))
    out += notes
    if xnum:  # section header 0: sh_info holds the real program header count
        out += struct.pack(e + "IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, phnum, 0, 0)
    out += b"\0" * (offsets[0] - len(out))
    for s in segs:
        out += s.data
    return bytes(out), offsets


HEAP, LIBDATA = 0x5555_5555_0000, 0x7F00_0000_0000
MAPS = f"""\
{HEAP:x}-{HEAP + 0x21000:x} rw-p 00000000 00:00 0          [heap]
{LIBDATA:x}-{LIBDATA + 0x2000:x} rw-p 00002000 08:01 1234       {LIB}
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0          [stack]
7ffd00000000-7ffd00001000 rw-p 00000000 00:00 0
"""


@pytest.fixture
def core(tmp_path: Path, keys: Keys) -> tuple[Path, list[int], bytes]:
    d = keys.p256.private_numbers().private_value.to_bytes(32, "big")
    heap = random_bytes(0x3000, seed=3)
    heap[0x101 : 0x101 + 32] = d
    lib = random_bytes(0x2000, seed=4)
    lib[0x777 : 0x777 + len(PIN)] = PIN
    data, offsets = build_core(
        [Seg(HEAP, bytes(heap)), Seg(LIBDATA, bytes(lib), memsz=0x3000)],
        [(LIBDATA, LIBDATA + 0x2000, LIB)],
    )
    path = tmp_path / "core.1234"
    path.write_bytes(data)
    return path, offsets, d


def test_addresses_and_mappings(
    scanner: Scanner, core: tuple[Path, list[int], bytes], tmp_path: Path
) -> None:
    path, offsets, _ = core
    maps = tmp_path / "maps"
    maps.write_text(MAPS)
    result = scanner.scan(path, maps=maps)
    got = [(f.secret_id, f.offset, f.address, f.mapping) for f in result.findings]
    assert got == [
        ("ec-p256", offsets[0] + 0x101, HEAP + 0x101, "[heap]"),
        ("user-pin", offsets[1] + 0x777, LIBDATA + 0x777, LIB),
    ]
    assert result.is_core
    assert result.bytes_scanned == 0x3000 + 0x2000 < result.size
    assert any("PT_LOAD" in n for n in result.notes)
    assert any("4096 bytes of mapped memory are not in the dump" in n for n in result.notes)


def test_without_maps_anonymous_memory_is_anon(
    scanner: Scanner, core: tuple[Path, list[int], bytes]
) -> None:
    path, _, _ = core
    assert [f.mapping for f in scanner.scan(path).findings] == ["anon", LIB]


def test_nameless_maps_line_is_bracket_anon(scanner: Scanner, tmp_path: Path, keys: Keys) -> None:
    d = keys.p256.private_numbers().private_value.to_bytes(32, "big")
    seg = bytearray(random_bytes(0x1000, seed=5))
    seg[0x11 : 0x11 + 32] = d
    data, _ = build_core([Seg(0x7FFD00000000, bytes(seg))], [])
    (tmp_path / "core").write_bytes(data)
    (tmp_path / "maps").write_text(MAPS)
    result = scanner.scan(tmp_path / "core", maps=tmp_path / "maps")
    assert [(f.address, f.mapping) for f in result.findings] == [(0x7FFD00000011, "[anon]")]
    assert any("no NT_FILE note" in n for n in result.notes)


def test_secret_in_registers_note(scanner: Scanner, tmp_path: Path, keys: Keys) -> None:
    d = keys.p256.private_numbers().private_value.to_bytes(32, "big")
    data, _ = build_core([Seg(HEAP, bytes(0x1000))], [], prstatus=b"\0" * 101 + d + b"\0" * 203)
    (tmp_path / "core").write_bytes(data)
    [f] = scanner.scan(tmp_path / "core").findings
    assert (f.address, f.mapping) == (None, "[note NT_PRSTATUS]")


def test_truncated_core(scanner: Scanner, core: tuple[Path, list[int], bytes]) -> None:
    path, offsets, _ = core
    path.write_bytes(path.read_bytes()[: offsets[1] + 0x100])  # cut inside the 2nd segment
    result = scanner.scan(path)
    assert [f.secret_id for f in result.findings] == ["ec-p256"]
    assert result.bytes_scanned == 0x3000 + 0x100
    assert any("file truncated" in n for n in result.notes)


@pytest.mark.parametrize(("is64", "xnum"), [(True, True), (False, False)])
def test_elf32_and_extended_header_count(
    is64: bool, xnum: bool, keys: Keys, scanner: Scanner, tmp_path: Path
) -> None:
    d = keys.p256.private_numbers().private_value.to_bytes(32, "big")
    seg = bytearray(random_bytes(0x1000, seed=6))
    seg[0x21 : 0x21 + 32] = d
    data, offsets = build_core(
        [Seg(0x10000, bytes(0x1000)), Seg(0x20000, bytes(seg))],
        [(0x20000, 0x21000, "/lib/x.so")],
        is64=is64,
        xnum=xnum,
    )
    layout = parse_core(data)
    assert layout is not None
    assert [(s.vaddr, s.filesz) for s in layout.segments] == [(0x10000, 0x1000), (0x20000, 0x1000)]
    assert layout.files == [NamedRange(0x20000, 0x21000, "/lib/x.so")]
    (tmp_path / "core").write_bytes(data)
    [f] = scanner.scan(tmp_path / "core").findings
    assert (f.offset, f.address, f.mapping) == (offsets[1] + 0x21, 0x20021, "/lib/x.so")


def test_non_core_elf_and_garbage_are_raw(scanner: Scanner, tmp_path: Path) -> None:
    exe = bytearray(random_bytes(4096))
    exe[:20] = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + b"\x02\x00\x3e\x00"  # ET_EXEC
    exe[1001 : 1001 + len(PIN)] = PIN
    (tmp_path / "exe").write_bytes(bytes(exe))
    result = scanner.scan(tmp_path / "exe")
    assert not result.is_core
    assert [f.address for f in result.findings] == [None]
    assert parse_core(bytes(exe)) is None


def test_unreadable_core_headers_scanned_raw(scanner: Scanner, tmp_path: Path) -> None:
    bad = bytearray(random_bytes(4096))
    bad[:64] = struct.pack(
        "<16sHHIQQQIHHHHHH",
        b"\x7fELF\x02\x01\x01" + b"\0" * 9,
        4,
        62,
        1,
        0,
        1 << 40,
        0,
        0,
        64,
        56,
        3,
        0,
        0,
        0,
    )
    bad[2001 : 2001 + len(PIN)] = PIN
    (tmp_path / "core").write_bytes(bytes(bad))
    result = scanner.scan(tmp_path / "core")
    assert not result.is_core
    assert [f.offset for f in result.findings] == [2001]
    assert any("unreadable" in n for n in result.notes)


def test_blind_limbs_aligned_by_address_not_file_offset(keys: Keys, tmp_path: Path) -> None:
    """gdb's cores put segments at unaligned file offsets: limbs are 8-aligned in memory."""
    q = keys.rsa2048.private_numbers().q.to_bytes(128, "little")
    seg = bytearray(0x2000)
    seg[0x808 : 0x808 + 128] = q
    data, offsets = build_core([Seg(HEAP, bytes(seg))], [], misalign=3)
    (tmp_path / "core").write_bytes(data)
    sc = Scanner([], public_keys={"rsa": keys.rsa2048.public_key()})
    [f] = sc.scan(tmp_path / "core").findings
    assert (f.representation, f.offset, f.address) == (
        "verified-rsa-factor",
        offsets[0] + 0x808,
        HEAP + 0x808,
    )
    assert offsets[0] % 8 == 3


def test_parse_maps() -> None:
    assert parse_maps(MAPS + "garbage line\n")[::3] == [
        NamedRange(HEAP, HEAP + 0x21000, "[heap]"),
        NamedRange(0x7FFD00000000, 0x7FFD00001000, "[anon]"),
    ]
