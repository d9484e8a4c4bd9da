"""ELF cores built byte by byte, then bent: the seeds of the ELF fuzz targets and the hostile
cores of tests/unit/scan/test_hostile_cores.py.

:func:`build` makes a valid ET_CORE (ELF header, one PT_NOTE with NT_PRSTATUS and NT_FILE, the
PT_LOADs); :class:`Core` knows where every header field is, so a test can make a header lie
(``core.phdr(1, offset=...)``, ``core.nt_file_count(10**9)``) without rebuilding the file.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

NT_PRSTATUS, NT_FILE, NT_AUXV = 1, 0x46494C45, 6
PT_LOAD, PT_NOTE = 1, 4

# Field name -> (offset in the header, struct code), for each ELF class.
_EHDR = {
    True: {
        "type": (16, "H"),
        "phoff": (32, "Q"),
        "shoff": (40, "Q"),
        "phentsize": (54, "H"),
        "phnum": (56, "H"),
    },
    False: {
        "type": (16, "H"),
        "phoff": (28, "I"),
        "shoff": (32, "I"),
        "phentsize": (42, "H"),
        "phnum": (44, "H"),
    },
}
_PHDR = {
    True: {
        "type": (0, "I"),
        "flags": (4, "I"),
        "offset": (8, "Q"),
        "vaddr": (16, "Q"),
        "filesz": (32, "Q"),
        "memsz": (40, "Q"),
        "align": (48, "Q"),
    },
    False: {
        "type": (0, "I"),
        "offset": (4, "I"),
        "vaddr": (8, "I"),
        "filesz": (16, "I"),
        "memsz": (20, "I"),
        "flags": (24, "I"),
        "align": (28, "I"),
    },
}


@dataclass
class Load:
    """A PT_LOAD: memory at ``vaddr``; ``memsz`` larger than the data is memory left out."""

    vaddr: int
    data: bytes
    memsz: int | None = None


@dataclass
class Core:
    data: bytearray
    is64: bool
    endian: str
    phoff: int
    phentsize: int
    offsets: list[int]  # file offset of each PT_LOAD's data
    nt_file_at: int  # file offset of the NT_FILE note's descriptor
    notes_at: int
    notes_size: int
    extra: dict[str, int] = field(default_factory=dict)

    def _put(self, at: int, code: str, value: int) -> None:
        struct.pack_into(self.endian + code, self.data, at, value)

    def ehdr(self, **fields: int) -> Core:
        """Overwrites ELF header fields (type, phoff, shoff, phentsize, phnum)."""
        for name, value in fields.items():
            at, code = _EHDR[self.is64][name]
            self._put(at, code, value)
        return self

    def phdr(self, index: int, **fields: int) -> Core:
        """Overwrites fields of program header ``index`` (0 is the PT_NOTE, then the loads)."""
        for name, value in fields.items():
            at, code = _PHDR[self.is64][name]
            self._put(self.phoff + index * self.phentsize + at, code, value)
        return self

    def nt_file_count(self, count: int) -> Core:
        """Makes the NT_FILE note claim ``count`` mappings."""
        self._put(self.nt_file_at, "Q" if self.is64 else "I", count)
        return self

    def bytes(self) -> bytes:
        return bytes(self.data)


def build(
    loads: list[Load],
    files: Sequence[tuple[int, int, str]] = (),
    *,
    prstatus: bytes = b"\0" * 336,
    is64: bool = True,
    big_endian: bool = False,
    align: int = 4096,
    auxv: bytes | None = None,
) -> Core:
    """A valid ET_CORE: header, program headers, the notes, then each load's data at an
    ``align``-aligned offset. ``auxv``: an NT_AUXV note's contents (none by default)."""
    e = ">" if big_endian else "<"
    w = "Q" if is64 else "I"
    ehsize, phentsize = (64, 56) if is64 else (52, 32)

    def note(ntype: int, desc: bytes) -> bytes:
        head = struct.pack(e + "III", 5, len(desc), ntype) + b"CORE\0\0\0\0"
        return head + desc + b"\0" * (-len(desc) % 4)

    nt_file = struct.pack(e + w + w, len(files), 4096)
    nt_file += b"".join(struct.pack(e + w * 3, s, t, 0) for s, t, _ in files)
    nt_file += b"".join(n.encode() + b"\0" for _, _, n in files)
    first = note(NT_PRSTATUS, prstatus)
    notes = first + note(NT_FILE, nt_file) + (b"" if auxv is None else note(NT_AUXV, auxv))
    phnum = 1 + len(loads)
    notes_at = ehsize + phnum * phentsize
    at = -(-(notes_at + len(notes)) // align) * align
    offsets = []
    for ld in loads:
        offsets.append(at)
        at += -(-len(ld.data) // align) * align
    ident = b"\x7fELF" + bytes([2 if is64 else 1, 2 if big_endian else 1, 1]) + b"\0" * 9
    fmt = e + ("16sHHIQQQIHHHHHH" if is64 else "16sHHIIIIIHHHHHH")
    out = bytearray(
        struct.pack(
            fmt, ident, 4, 62 if is64 else 3, 1, 0, ehsize, 0, 0, ehsize, phentsize, phnum, 0, 0, 0
        )
    )

    def phdr(ptype: int, off: int, vaddr: int, filesz: int, memsz: int, palign: int) -> bytes:
        if is64:
            return struct.pack(e + "IIQQQQQQ", ptype, 6, off, vaddr, 0, filesz, memsz, palign)
        return struct.pack(e + "IIIIIIII", ptype, off, vaddr, 0, filesz, memsz, 6, palign)

    out += phdr(PT_NOTE, notes_at, 0, len(notes), 0, 4)
    for ld, off in zip(loads, offsets, strict=True):
        out += phdr(PT_LOAD, off, ld.vaddr, len(ld.data), ld.memsz or len(ld.data), align)
    out += notes
    for ld, off in zip(loads, offsets, strict=True):
        out += b"\0" * (off - len(out)) + ld.data
    nt_file_at = notes_at + len(first) + 12 + 8
    return Core(out, is64, e, ehsize, phentsize, offsets, nt_file_at, notes_at, len(notes))
