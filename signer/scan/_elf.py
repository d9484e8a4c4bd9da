"""ELF core files, read with struct alone: which file bytes are which process memory.

A core's PT_LOAD program headers map file offset ranges to virtual addresses; its NT_FILE note
(type 0x46494c45 in a "CORE" note) names the file behind each file-backed mapping. Anonymous
regions ([heap], [stack], thread stacks, arenas) have no name in the core: a snapshot of the
process's ``/proc/PID/maps`` taken before the dump names them.
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

ET_CORE = 4
PT_LOAD = 1
PT_NOTE = 4
NT_FILE = 0x46494C45
PN_XNUM = 0xFFFF
NOTE_NAMES = {
    1: "NT_PRSTATUS",
    2: "NT_PRFPREG",
    3: "NT_PRPSINFO",
    6: "NT_AUXV",
    0x202: "NT_X86_XSTATE",
    0x53494749: "NT_SIGINFO",
    NT_FILE: "NT_FILE",
}


@dataclass(frozen=True, slots=True)
class Segment:
    """A PT_LOAD program header, its file range clipped to the file (a core may be cut short)."""

    offset: int
    filesz: int  # bytes present in the file
    vaddr: int
    memsz: int
    flags: int
    declared_filesz: int  # as the header says; larger than filesz when the file is truncated


@dataclass(frozen=True, slots=True)
class NamedRange:
    start: int
    end: int
    name: str


@dataclass
class CoreLayout:
    """What an ELF core says about its memory."""

    segments: list[Segment]  # sorted by file offset
    files: list[NamedRange]  # from NT_FILE, sorted by start address
    notes: list[NamedRange] = field(default_factory=list)  # note contents, by file offset
    problems: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._offsets = [s.offset for s in self.segments]
        self._note_starts = [n.start for n in self.notes]

    def outside_memory(self, offset: int) -> str:
        """What a file offset outside PT_LOAD contents is: a note (registers: NT_PRSTATUS,
        NT_PRFPREG, NT_X86_XSTATE hold what was in CPU registers) or the ELF headers."""
        name = _find(self.notes, self._note_starts, offset)
        return f"[note {name}]" if name else "[ELF headers]"

    def address(self, offset: int) -> int | None:
        """The virtual address of a file offset, or None outside PT_LOAD contents."""
        i = bisect.bisect_right(self._offsets, offset) - 1
        if i >= 0:
            s = self.segments[i]
            if offset < s.offset + s.filesz:
                return s.vaddr + offset - s.offset
        return None

    @property
    def memory_bytes(self) -> int:
        return sum(s.filesz for s in self.segments)


def _find(mappings: Sequence[NamedRange], starts: Sequence[int], address: int) -> str | None:
    i = bisect.bisect_right(starts, address) - 1
    if i >= 0 and address < mappings[i].end:
        return mappings[i].name
    return None


class AddressNamer:
    """Names the mapping an address is in: NT_FILE first, then a maps snapshot, else 'anon'."""

    def __init__(self, files: Sequence[NamedRange], maps: Sequence[NamedRange]) -> None:
        self._files = sorted(files, key=lambda m: m.start)
        self._file_starts = [m.start for m in self._files]
        self._maps = sorted(maps, key=lambda m: m.start)
        self._map_starts = [m.start for m in self._maps]

    def name(self, address: int) -> str:
        return (
            _find(self._files, self._file_starts, address)
            or _find(self._maps, self._map_starts, address)
            or "anon"
        )


def parse_maps(text: str) -> list[NamedRange]:
    """``/proc/PID/maps`` lines; a mapping without a path is called '[anon]'."""
    out = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5 or "-" not in fields[0]:
            continue
        lo, _, hi = fields[0].partition("-")
        try:
            start, end = int(lo, 16), int(hi, 16)
        except ValueError:
            continue
        name = fields[5].strip() if len(fields) == 6 and fields[5].strip() else "[anon]"
        out.append(NamedRange(start, end, name))
    return out


class _Reader:
    def __init__(self, buf: bytes | memoryview, endian: str, is64: bool) -> None:
        self.buf = buf
        self.e = endian
        self.word = "Q" if is64 else "I"
        self.wsize = 8 if is64 else 4

    def unpack(self, fmt: str, offset: int) -> tuple[int, ...]:
        fmt = self.e + fmt.replace("W", self.word)
        size = struct.calcsize(fmt)
        if offset < 0 or offset + size > len(self.buf):
            raise ValueError(f"ELF structure at {offset:#x} runs past the end of the file")
        return struct.unpack_from(fmt, self.buf, offset)


def is_elf_core(buf: bytes | memoryview) -> bool:
    if len(buf) < 20 or bytes(buf[:4]) != b"\x7fELF" or buf[4] not in (1, 2):
        return False
    endian = "<" if buf[5] == 1 else ">"
    return bool(struct.unpack_from(endian + "H", buf, 16)[0] == ET_CORE)


def parse_core(buf: bytes | memoryview) -> CoreLayout | None:
    """The layout of an ELF core, or None when ``buf`` is not one. Raises ValueError when the
    headers themselves are unreadable (the caller then scans the file as raw bytes)."""
    if not is_elf_core(buf):
        return None
    is64 = buf[4] == 2
    r = _Reader(buf, "<" if buf[5] == 1 else ">", is64)
    if is64:
        phoff, shoff = r.unpack("QQ", 32)
        phentsize, phnum = r.unpack("HH", 54)
    else:
        phoff, shoff = r.unpack("II", 28)
        phentsize, phnum = r.unpack("HH", 42)
    if phnum == PN_XNUM:  # more than 65534 headers: the real count is section 0's sh_info
        phnum = r.unpack("I", shoff + (44 if is64 else 28))[0]
    size = len(buf)
    problems: list[str] = []
    segments: list[Segment] = []
    files: list[NamedRange] = []
    notes: list[NamedRange] = []
    for i in range(phnum):
        at = phoff + i * phentsize
        if is64:
            p_type, p_flags, p_offset, p_vaddr, _, p_filesz, p_memsz, p_align = r.unpack(
                "IIQQQQQQ", at
            )
        else:
            p_type, p_offset, p_vaddr, _, p_filesz, p_memsz, p_flags, p_align = r.unpack(
                "IIIIIIII", at
            )
        present = max(0, min(p_filesz, size - p_offset))
        if p_type == PT_LOAD:
            if present < p_filesz:
                problems.append(
                    f"segment at {p_vaddr:#x}: {p_filesz - present} bytes missing (file truncated)"
                )
            segments.append(Segment(p_offset, present, p_vaddr, p_memsz, p_flags, p_filesz))
        elif p_type == PT_NOTE:
            align = p_align if p_align == 8 else 4
            for ntype, owner, desc_at, descsz in _notes(r, p_offset, present, align):
                notes.append(
                    NamedRange(desc_at, desc_at + descsz, NOTE_NAMES.get(ntype, f"{ntype:#x}"))
                )
                if ntype == NT_FILE and owner == b"CORE":
                    files += _parse_nt_file(r, desc_at, descsz)
    segments.sort(key=lambda s: s.offset)
    files.sort(key=lambda m: m.start)
    notes.sort(key=lambda m: m.start)
    return CoreLayout(segments, files, notes, problems)


def _notes(r: _Reader, offset: int, size: int, align: int) -> Iterator[tuple[int, bytes, int, int]]:
    """(type, owner name, desc offset, desc size) of each note in a PT_NOTE segment."""
    at, end = offset, offset + size
    while at + 12 <= end:
        namesz, descsz, ntype = r.unpack("III", at)
        name_at = at + 12
        desc_at = name_at + (namesz + align - 1) // align * align
        next_at = desc_at + (descsz + align - 1) // align * align
        if desc_at + descsz > end:
            break
        yield ntype, bytes(r.buf[name_at : name_at + namesz]).rstrip(b"\0"), desc_at, descsz
        at = next_at


def _parse_nt_file(r: _Reader, at: int, size: int) -> list[NamedRange]:
    w = r.wsize
    count, _page = r.unpack("WW", at)
    if count > size // (3 * w):
        raise ValueError("NT_FILE note: entry count larger than the note")
    ranges = [r.unpack("WWW", at + 2 * w + i * 3 * w) for i in range(count)]
    names = bytes(r.buf[at + 2 * w + count * 3 * w : at + size]).split(b"\0")
    return [
        NamedRange(start, end, names[i].decode("utf-8", "replace") if i < len(names) else "?")
        for i, (start, end, _ofs) in enumerate(ranges)
    ]
