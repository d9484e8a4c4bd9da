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
from dataclasses import dataclass, field, replace

from signer.errors import CoreFormatError

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
    headers_end: int = 0  # end of the ELF and program headers in the file
    extent: int = 0  # where the file ends if it is whole: the end of what any header describes
    head: int = 0  # the file's first bytes that hold every header and note parse_core read

    def __post_init__(self) -> None:
        self.pieces = _pieces(self.segments)
        self._offsets = [p.offset for p in self.pieces]
        self._note_starts = [n.start for n in self.notes]

    def outside_memory(self, offset: int) -> str:
        """What a file offset outside PT_LOAD contents is: a note (registers: NT_PRSTATUS,
        NT_PRFPREG, NT_X86_XSTATE hold what was in CPU registers), the ELF headers, or bytes
        no header accounts for (a shaped core's, or padding)."""
        name = _find(self.notes, self._note_starts, offset)
        if name:
            return f"[note {name}]"
        return "[ELF headers]" if offset < self.headers_end else "[outside every segment]"

    def address(self, offset: int) -> int | None:
        """The virtual address of a file offset, or None outside PT_LOAD contents."""
        i = bisect.bisect_right(self._offsets, offset) - 1
        if i >= 0:
            s = self.pieces[i]
            if offset < s.offset + s.filesz:
                return s.vaddr + offset - s.offset
        return None

    @property
    def memory_bytes(self) -> int:
        """File bytes that are process memory, each counted once (segments may overlap)."""
        return sum(p.filesz for p in self.pieces)


def _pieces(segments: Sequence[Segment]) -> list[Segment]:
    """The segments' file ranges without overlaps: where two segments claim the same file bytes
    (a corrupt or shaped core; a real one never does), the one that starts first keeps them.
    Each file byte then has one address, and blind mode reads it once."""
    out: list[Segment] = []
    reach = 0
    for s in sorted(segments, key=lambda s: (s.offset, -s.filesz)):
        start, end = max(s.offset, reach), s.offset + s.filesz
        if start < end:
            cut = start - s.offset
            out.append(replace(s, offset=start, filesz=end - start, vaddr=s.vaddr + cut))
            reach = end
    return out


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


# Bounds on what a core's headers can make the reader hold. A Linux process has at most
# vm.max_map_count mappings (65530 by default), each one PT_LOAD and one NT_FILE entry, and a
# handful of notes per thread: four times that is room for any real core, and keeps what a
# shaped one can make us allocate to tens of MiB, whatever the headers claim.
MAX_PROGRAM_HEADERS = 1 << 18
MAX_NOTES = 1 << 18
MAX_FILE_ENTRIES = 1 << 18
MAX_PROBLEMS = 20
"""Problems listed one by one; more are counted in one last line (a core whose 60000 segments
are all cut short must not print 60000 notes)."""


class NeedMore(Exception):
    """:func:`parse_core`, given the first bytes of a longer file, needs its first ``needed``."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"the headers need the first {needed} bytes of the file")
        self.needed = needed


class _Reader:
    def __init__(self, buf: bytes | memoryview, endian: str, is64: bool, size: int) -> None:
        self.buf = buf
        self.size = size
        self.high = 0  # the end of the furthest structure read
        self.e = endian
        self.word = "Q" if is64 else "I"
        self.wsize = 8 if is64 else 4

    def unpack(self, fmt: str, offset: int) -> tuple[int, ...]:
        fmt = self.e + fmt.replace("W", self.word)
        size = struct.calcsize(fmt)
        if offset < 0 or offset + size > self.size:
            raise CoreFormatError(f"ELF structure at {offset:#x} runs past the end of the file")
        if offset + size > len(self.buf):
            raise NeedMore(offset + size)
        self.high = max(self.high, offset + size)
        return struct.unpack_from(fmt, self.buf, offset)


def is_elf_core(buf: bytes | memoryview) -> bool:
    """An ELF file of either class and byte order whose type is ET_CORE. Anything else (an
    unknown EI_CLASS or EI_DATA byte included) is not a core: it is scanned as raw bytes."""
    if (
        len(buf) < 20
        or bytes(buf[:4]) != b"\x7fELF"
        or buf[4] not in (1, 2)
        or buf[5] not in (1, 2)
    ):
        return False
    endian = "<" if buf[5] == 1 else ">"
    return bool(struct.unpack_from(endian + "H", buf, 16)[0] == ET_CORE)


class _Problems:
    def __init__(self) -> None:
        self.listed: list[str] = []
        self.more = 0

    def add(self, text: str) -> None:
        if len(self.listed) < MAX_PROBLEMS:
            self.listed.append(text)
        else:
            self.more += 1

    def all(self) -> list[str]:
        return self.listed + ([f"... and {self.more} more such problems"] if self.more else [])


def parse_core(buf: bytes | memoryview, size: int | None = None) -> CoreLayout | None:
    """The layout of an ELF core, or None when ``buf`` is not one. Raises CoreFormatError when
    the headers themselves are unreadable (the caller then scans the file as raw bytes).

    ``size``: the file's size when ``buf`` is only its first bytes (a compressed core read as a
    stream; ``buf`` at least 64 bytes long, or the whole file). The result is then the one the
    whole file would give, or NeedMore says how many first bytes the headers and notes need.

    The headers may have been shaped by an attacker: every count and offset is checked against
    the file before it is used, work is linear in the file's size, and what is kept is bounded
    (``MAX_*``). A header that lies about the data after it (a segment past the end, a note
    whose count is too large) is a problem listed in the layout, not a reason to give up."""
    if not is_elf_core(buf):
        return None
    is64 = buf[4] == 2
    size = len(buf) if size is None else size
    r = _Reader(buf, "<" if buf[5] == 1 else ">", is64, size)
    if is64:
        phoff, shoff = r.unpack("QQ", 32)
        phentsize, phnum = r.unpack("HH", 54)
    else:
        phoff, shoff = r.unpack("II", 28)
        phentsize, phnum = r.unpack("HH", 42)
    # Section headers (gdb's gcore writes them last; the kernel, only past 65534 segments):
    # only where the file ends.
    shentsize, shnum = (
        r.unpack("HH", 58 if is64 else 46) if size >= (62 if is64 else 50) else (0, 0)
    )
    if phnum == PN_XNUM:  # more than 65534 headers: the real count is section 0's sh_info
        phnum = r.unpack("I", shoff + (44 if is64 else 28))[0]
    minimum = 56 if is64 else 32
    # A smaller stride would read every header from (nearly) the same bytes: with a count of
    # 2^32 from sh_info, billions of iterations over one header.
    if phnum and phentsize < minimum:
        raise CoreFormatError(
            f"e_phentsize {phentsize} is smaller than a program header ({minimum} bytes)"
        )
    if phnum > MAX_PROGRAM_HEADERS:
        raise CoreFormatError(
            f"{phnum} program headers claimed, more than the {MAX_PROGRAM_HEADERS} a core can have"
        )
    problems = _Problems()
    # Headers whose bytes are all in the file (a core cut short inside them keeps the rest).
    fit = 0
    if phnum and size - phoff >= minimum:
        fit = min(phnum, (size - phoff - minimum) // phentsize + 1)
    if fit < phnum:
        if fit == 0:
            raise CoreFormatError(
                f"the program headers at {phoff:#x} lie past the end of the file ({size} bytes)"
            )
        problems.add(
            f"{phnum - fit} of {phnum} program headers lie past the end of the file (truncated)"
        )
    if fit and phoff + (fit - 1) * phentsize + minimum > len(buf):
        raise NeedMore(phoff + (fit - 1) * phentsize + minimum)
    segments: list[Segment] = []
    extent = max(phoff + phnum * phentsize, shoff + max(shnum, 1) * shentsize if shoff else 0)
    note_ranges: list[tuple[int, int, int]] = []
    for i in range(fit):
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
        extent = max(extent, p_offset + p_filesz)
        if p_type == PT_LOAD:
            if present < p_filesz:
                problems.add(
                    f"segment at {p_vaddr:#x}: {p_filesz - present} of its {p_filesz} bytes are "
                    "not in the file (file truncated, or the header lies)"
                )
            segments.append(Segment(p_offset, present, p_vaddr, p_memsz, p_flags, p_filesz))
        elif p_type == PT_NOTE and present:
            note_ranges.append((p_offset, present, p_align))
    needed = max((offset + present for offset, present, _ in note_ranges), default=0)
    if needed > len(buf):
        raise NeedMore(needed)
    notes, files = _all_notes(r, note_ranges, problems)
    segments.sort(key=lambda s: s.offset)
    files.sort(key=lambda m: m.start)
    notes.sort(key=lambda m: m.start)
    layout = CoreLayout(
        segments,
        files,
        notes,
        headers_end=phoff + fit * phentsize,
        extent=extent,
        head=max(r.high, needed),
    )
    if layout.memory_bytes < sum(s.filesz for s in segments):
        problems.add(
            "PT_LOAD segments claim the same file bytes (a corrupt or shaped core): each byte "
            "is given the address of the first segment that claims it"
        )
    layout.problems = problems.all()
    return layout


def _all_notes(
    r: _Reader, ranges: list[tuple[int, int, int]], problems: _Problems
) -> tuple[list[NamedRange], list[NamedRange]]:
    """The notes of every PT_NOTE segment, each file byte read once: segments that overlap one
    read before are skipped (65534 PT_NOTE headers over one region of 12-byte notes would
    otherwise cost 65534 times the walk)."""
    notes: list[NamedRange] = []
    files: list[NamedRange] = []
    reach = -1
    for offset, present, p_align in sorted(ranges):
        if offset < reach:
            problems.add(f"PT_NOTE segment at {offset:#x} overlaps another: skipped")
            continue
        reach = offset + present
        align = p_align if p_align == 8 else 4
        for ntype, owner, desc_at, descsz in _notes(r, offset, present, align):
            if len(notes) >= MAX_NOTES:
                problems.add(f"more than {MAX_NOTES} notes: the rest are not named")
                return notes, files
            notes.append(
                NamedRange(desc_at, desc_at + descsz, NOTE_NAMES.get(ntype, f"{ntype:#x}"))
            )
            if ntype == NT_FILE and owner == b"CORE":
                room = MAX_FILE_ENTRIES - len(files)
                try:
                    files += _parse_nt_file(r, desc_at, descsz, room)
                except CoreFormatError as exc:
                    problems.add(f"{exc}: its mappings are not named")
    return notes, files


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


def _parse_nt_file(r: _Reader, at: int, size: int, room: int) -> list[NamedRange]:
    """The mappings an NT_FILE note names: (start, end, file offset) triples, then as many
    NUL-terminated names. A count the note cannot hold is refused; at most ``room`` kept."""
    w = r.wsize
    if size < 2 * w:
        raise CoreFormatError(f"NT_FILE note at {at:#x} is {size} bytes, too short for its count")
    count, _page = r.unpack("WW", at)
    if count > (size - 2 * w) // (3 * w):
        raise CoreFormatError(
            f"NT_FILE note at {at:#x} claims {count} entries; its {size} bytes hold at most "
            f"{(size - 2 * w) // (3 * w)}"
        )
    if count > room:
        raise CoreFormatError(f"NT_FILE notes name more than {MAX_FILE_ENTRIES} mappings")
    ranges = [r.unpack("WWW", at + 2 * w + i * 3 * w) for i in range(count)]
    # maxsplit: a note of a million NUL bytes must not become a million names.
    names = bytes(r.buf[at + 2 * w + count * 3 * w : at + size]).split(b"\0", count)
    return [
        NamedRange(start, end, names[i].decode("utf-8", "replace") if i < len(names) else "?")
        for i, (start, end, _ofs) in enumerate(ranges)
    ]
