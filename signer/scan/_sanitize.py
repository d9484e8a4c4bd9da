"""The sanitiser: a copy of a dump in which every finding is overwritten, proven by a re-scan.

``sanitize(src, dst, scanner)`` scans ``src`` (or takes the scan already made), copies it to
``dst`` without reading it into memory (``copy_file_range`` of the data extents, holes left
holes), overwrites in place each finding as the whole encoded object it belongs to, re-scans
the copy with the same scanner and offers it only if that scan is complete and finds nothing.
Otherwise the copy is deleted and :class:`signer.errors.ScanError` says why.

The filler is ``REDACTED``, repeated, each ``R`` at an 8-aligned virtual address (so gdb's
``x/gx`` shows ``0x4445544341444552``, and ``strings`` shows ``REDACTEDREDACTED``). It is ASCII
on purpose: blind mode's cheap filters need high bytes in a window, so the re-scan never spends
its budget verifying filler as key candidates (crashpad's ``0x0defaced0defaced`` would be
checked, window by window).

**What is overwritten, per representation** (the finding's bytes, widened to the object):

* DER (``pkcs1-der``, ``sec1-der``, ``pkcs8-der``, blind ``der-*``), ``be`` and blind
  ``verified-*`` windows: the outermost DER SEQUENCE around it, starting at most 16 KiB before
  it, whose bytes load as a private key (PKCS#8 around PKCS#1, SEC1 around a scalar); where
  none loads, as a byte form.
* Byte forms (``le64``, ``le32``, ``le``, ``java-mag``, ``cpython30``, ``utf8``, ``latin1``,
  ``raw``, ``ppk-private``): the window the scanner matched, widened to the representation's
  full length (a fragment placed where it sits in the whole representation).
  ``openssh-key``: the ``openssh-key-v1`` blob around it.
* ``pem``, ``pem-crlf``, ``b64`` and blind ``pem-private-key``/``openssh-private``: the maximal
  base64 run (``=`` included); whole lines of one width (at least 16) around it join, a shorter
  last line too, so a wrapped block is one object; then the ``-----BEGIN ...-----`` line (and
  any ``Proc-Type:`` headers) before it and the ``-----END ...-----`` line after it, when there.
  ``pem-json``: the same with the two characters ``\n`` as line ends (a PEM in a JSON string).
* ``b64url``, ``jwk``: the maximal base64url run. A base64 or base64url run that is the value of
  a private JWK member (``"d"``, ``"p"``, ``"q"``, ``"dp"``, ``"dq"``, ``"qi"``, ``"k"``) in an
  object naming ``"kty"``: the whole JSON object (``{`` to its ``}``; to the value's end when it
  does not parse). Blind ``jwk-private``: its object, as blind mode delimited it.
* ``hex``, ``HEX``: the maximal run of hex digits; ``dec``: of decimal digits. ``hex-colon``,
  ``openssl-text``: the hex pairs around it one by one, each after a ``:`` (and, in
  ``openssl -text``'s lines, a line break and indentation), so the label before the block stays.
* ``utf16le``/``utf16be``/``utf32le`` and the ``utf16*-`` forms of text renderings: the string
  of 2- or 4-byte code units holding printable ASCII (line breaks included) around the match,
  read little- and big-endian, the longer string taken (little-endian on a tie).
* A representation not named here (added since): by its bytes (hex, base64, UTF-16/32 text),
  else as a byte form.

Widening stays inside the PT_LOAD segment(s) the finding lies in, at most 16 MiB each way. The
ELF header, program headers and PT_NOTE segments are never written: a finding there refuses the
copy (ScanError), except in a floating-point/vector register note (NT_PRFPREG,
NT_X86_XSTATE), where the finding's own bytes are overwritten and the note's headers and sizes
stay (a backtrace needs none of those registers; memcpy moves keys through them).

**Strict mode** keeps only what a backtrace needs; every other byte of PT_LOAD contents is
zero (a hole in the copy): the ELF header, program headers and notes (all registers, NT_FILE,
auxv); each thread's stack (the PT_LOAD holding the stack pointer of each NT_PRSTATUS), from
128 bytes below the stack pointer (the x86-64 red zone) up; the file-backed segments that are
not writable (NT_FILE: code, read-only data and the ELF header pages, for unwinding); the vDSO
(AT_SYSINFO_EHDR); and, byte for byte, the dynamic linker's list that gdb reads to find the
libraries (the executable's dynamic section from AT_PHDR, ``r_debug`` from DT_DEBUG, each
``link_map``'s first five words and its name: without them gdb shows ``?? ()`` frames, measured
on a Python core). libthread_db's tables are not kept: gdb lists threads by LWP.

From crashpad (``snapshot/sanitized/``: ``ProcessSnapshotSanitized``, ``PointerSanitizer``):
memory is allow-listed, not deny-listed (what is not on the list is dropped, however innocent
it looks), stacks and modules are the list, and the kept stacks are themselves sanitised word
by word: an aligned word that is neither a small integer (at most 4096) nor a pointer into a
module (an NT_FILE mapping, the vDSO) or a stack is replaced with the filler, so return
addresses and frame pointers survive and data does not. Crashpad captures the stack from the
stack pointer up; here the dead part below the red zone is zeroed. Not taken: crashpad's
target-module rule (a dump whose crash does not involve a given module is dropped whole) and its
annotation allow-list, which have no counterpart in an ELF core.

x86-64, i386 and AArch64 cores are understood in strict mode (where the stack pointer is in
NT_PRSTATUS); another machine's core is refused in strict mode. A thread that crashed inside a
signal handler running on an alternate stack (``sigaltstack``, as Python's faulthandler sets up)
has its stack pointer there: that stack is kept, the interrupted one is not, and gdb's backtrace
of that thread stops at the signal frame (use the normal mode for such a core).

A compressed core (zstd, lz4, xz, as systemd-coredump stores them) is decompressed into the copy,
which is then planned and overwritten in place: the sanitised copy is the ELF core, not
compressed again.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import json
import mmap
import os
import re
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from signer.errors import CoreFormatError, ScanError
from signer.scan import _blind, _compressed
from signer.scan._elf import PN_XNUM, PT_NOTE, CoreLayout, Segment, parse_core
from signer.scan._patterns import family
from signer.scan._result import Finding, ScanResult
from signer.scan._scanner import Scanner
from signer.scan._secrets import reading

FILLER = b"REDACTED"
"""What overwritten bytes become: 8 bytes, repeated, aligned to the virtual address."""
MAX_WIDEN = 16 << 20
"""An object is widened at most this far each way from its finding (a 100 MiB base64 run is
overwritten 16 MiB either side of the key in it)."""
DER_REACH = 16 << 10
"""How far before a finding an enclosing DER key may start: a 16384-bit RSA key's PKCS#8 is
9.4 KiB."""
SMALL_WORD = 4096
"""Stack words at most this large are kept in strict mode (counters, flags, sizes)."""
RED_ZONE = 128

_CHUNK = 1 << 20
_ZERO_BLOCK = 64 << 10
_JWK_PRIVATE = (b"d", b"p", b"q", b"dp", b"dq", b"qi", b"k")
_B64 = rb"A-Za-z0-9+/="
_B64URL = rb"A-Za-z0-9_\-="
_HEX = rb"0-9a-fA-F"
_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_DER_FORMS = frozenset({"pkcs1-der", "sec1-der", "pkcs8-der", "der-pkcs1", "der-sec1", "der-pkcs8"})
_BLIND_OBJECTS = frozenset({"pem-private-key", "openssh-private", "jwk-private"})
_REGISTER_NOTES = frozenset({"NT_PRFPREG", "NT_X86_XSTATE"})

# e_machine -> (offset of pr_reg in NT_PRSTATUS, index of the stack pointer in it)
_STACK_POINTER = {62: (112, 19), 3: (72, 15), 183: (112, 31)}
_PF_W = 2
_AT_PHDR, _AT_PHNUM, _AT_SYSINFO_EHDR = 3, 5, 33
_PT_DYNAMIC, _PT_PHDR, _DT_DEBUG = 2, 6, 21
_MAX_LINK_MAPS = 4096


@dataclass(frozen=True, slots=True)
class Overwrite:
    """One object overwritten with the filler: its file range, address, the rule that
    delimited it and the findings' representations in it."""

    offset: int
    length: int
    address: int | None
    rule: str
    representations: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "length": self.length,
            "address": None if self.address is None else f"{self.address:#x}",
            "rule": self.rule,
            "representations": list(self.representations),
        }


@dataclass(frozen=True, slots=True)
class Kept:
    """Strict mode: a file range kept, and why."""

    offset: int
    length: int
    address: int | None
    why: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "offset": self.offset,
            "length": self.length,
            "address": None if self.address is None else f"{self.address:#x}",
            "why": self.why,
        }


@dataclass(frozen=True)
class SanitizeResult:
    """A sanitised copy that a complete re-scan found clean (``verified``; :func:`sanitize`
    raises rather than return an unverified copy). Sizes: the copy's size is the original's
    (every offset stays); ``*_disk_bytes`` is what each takes on disk (holes are free)."""

    source: Path
    output: Path
    strict: bool
    size: int
    source_disk_bytes: int
    output_disk_bytes: int
    findings_overwritten: int
    bytes_overwritten: int
    objects: list[Overwrite]
    verified: bool
    seconds: float
    bytes_zeroed: int = 0  # strict: PT_LOAD bytes not kept
    bytes_kept: int = 0  # strict: PT_LOAD bytes kept
    words_defaced: int = 0  # strict: stack words replaced with the filler
    kept: list[Kept] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": str(self.source),
            "output": str(self.output),
            "strict": self.strict,
            "size": self.size,
            "source_disk_bytes": self.source_disk_bytes,
            "output_disk_bytes": self.output_disk_bytes,
            "findings_overwritten": self.findings_overwritten,
            "bytes_overwritten": self.bytes_overwritten,
            "objects": [o.to_dict() for o in self.objects],
            "verified": self.verified,
            "seconds": round(self.seconds, 3),
            "bytes_zeroed": self.bytes_zeroed,
            "bytes_kept": self.bytes_kept,
            "words_defaced": self.words_defaced,
            "kept": [k.to_dict() for k in self.kept],
            "notes": list(self.notes),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"


def sanitize(
    src: Path | str,
    dst: Path | str,
    scanner: Scanner,
    *,
    strict: bool = False,
    result: ScanResult | None = None,
) -> SanitizeResult:
    """Writes ``dst``: ``src`` with every finding of ``scanner`` overwritten as its whole
    object (and, ``strict``, only what a backtrace needs kept), verified by a re-scan.

    ``result``: the scan of ``src`` by this scanner, when the caller has already made it (the
    gate has), to save a pass. A scan or re-scan that did not complete (the match limit, blind
    mode's budget) cannot prove the copy clean: ScanError, no copy. ``dst`` is replaced; on
    any failure no file is left at ``dst``.
    """
    began = time.monotonic()
    src, dst = Path(src), Path(dst)
    part = dst.with_name(f".{dst.name}.part")
    notes: list[str] = []
    try:
        with contextlib.suppress(FileNotFoundError):
            if os.path.samefile(src, dst):
                raise ScanError(f"sanitize: the copy {dst} would overwrite the dump itself")
        first = result if result is not None else scanner.scan(src)
        _must_be_complete(first, "the scan of the dump")
        reps = _index(scanner)
        with reading(src, "dump"), open(src, "rb") as f:
            codec = _compressed.detect(f)
            fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                if codec is None:
                    size = os.fstat(f.fileno()).st_size
                    plan = _plan(f.fileno(), size, first.findings, reps, strict, src)
                    _copy(f.fileno(), fd, size, plan.holes)
                    memory = f.fileno()
                else:
                    # The copy is the decompressed core (written sparse), planned on itself.
                    size = _decompress(f, codec, src, fd, scanner.max_output)
                    if size != first.size:
                        raise ScanError(
                            f"sanitize: {src} decompressed to {size} bytes, not the "
                            f"{first.size} that were scanned"
                        )
                    plan = _plan(fd, size, first.findings, reps, strict, src)
                    _zero(fd, size, plan.holes)
                    memory = fd
                    notes.append(
                        f"{codec}-compressed core: the copy is the decompressed core, sanitised "
                        "(compress it again to ship it)"
                    )
                defaced = _deface_stacks(memory, fd, plan) if strict else 0
                written = _fill(fd, plan.objects, plan.phase)
                os.fsync(fd)
            finally:
                os.close(fd)
        rescan = scanner.scan(part)
        _must_be_complete(rescan, "the re-scan of the copy")
        if rescan.findings:
            kinds = sorted({f"{f.representation} at {f.offset:#x}" for f in rescan.findings})
            raise ScanError(
                f"sanitize: the re-scan of the copy still finds {len(rescan.findings)} "
                f"(e.g. {', '.join(kinds[:3])}): the copy was deleted"
            )
        os.replace(part, dst)
    except BaseException:
        for path in (part, dst):
            with contextlib.suppress(OSError):
                if not (src.exists() and os.path.samefile(path, src)):
                    path.unlink()
        raise
    notes += plan.notes
    if not first.is_core:
        notes.append("not an ELF core: sanitised as raw bytes")
    return SanitizeResult(
        source=src,
        output=dst,
        strict=strict,
        size=size,
        source_disk_bytes=os.stat(src).st_blocks * 512,
        output_disk_bytes=os.stat(dst).st_blocks * 512,
        findings_overwritten=len(first.findings),
        bytes_overwritten=written,
        objects=plan.objects,
        verified=True,
        seconds=time.monotonic() - began,
        bytes_zeroed=plan.zeroed,
        bytes_kept=plan.kept_bytes,
        words_defaced=defaced,
        kept=plan.kept,
        notes=notes,
    )


def _must_be_complete(result: ScanResult, what: str) -> None:
    if not result.complete:
        raise ScanError(f"sanitize: {what} stopped at the match limit: it cannot prove a copy")
    if result.blind is not None and result.blind.lost:
        raise ScanError(f"sanitize: {what}: {result.blind.lost[0]}: it cannot prove a copy")
    if result.blind is not None and not result.blind.complete:
        raise ScanError(
            f"sanitize: {what} did not finish blind mode within its budget of "
            f"{result.blind.budget_seconds:g} s: it cannot prove a copy (raise the budget)"
        )


# --- the plan: what is overwritten, kept, zeroed ------------------------------------------------


@dataclass
class _Plan:
    objects: list[Overwrite]
    phase: list[tuple[int, int, int]]  # (file start, file end, vaddr - offset) of each piece
    holes: list[tuple[int, int]] = field(default_factory=list)  # strict: not copied (zeros)
    kept: list[Kept] = field(default_factory=list)
    stacks: list[tuple[int, int, int]] = field(default_factory=list)  # file start, end, vaddr
    pointers: list[tuple[int, int]] = field(default_factory=list)  # allowed pointer targets
    word: int = 8
    endian: str = "<"
    zeroed: int = 0
    kept_bytes: int = 0
    notes: list[str] = field(default_factory=list)


_Index = dict[tuple[str, str, str], list[bytes]]


def _index(scanner: Scanner) -> _Index:
    """The bytes of every representation the scanner searches, by (secret id, component,
    name): a finding carries none, and a fragment is placed in its whole by them."""
    out: _Index = {}
    for rep in scanner._reps:  # the scanner's own representations: one source of truth
        key = (scanner.secrets[rep.secret].id, rep.component, rep.name)
        out.setdefault(key, []).append(rep.data)
    return out


def _plan(
    fd: int, size: int, findings: Sequence[Finding], reps: _Index, strict: bool, src: Path
) -> _Plan:
    if size == 0:
        if strict:
            raise ScanError(f"sanitize --strict: {src} is empty, not an ELF core")
        return _Plan([], [])
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as mm:
        view = memoryview(mm)
        try:
            try:
                layout = parse_core(view)
            except CoreFormatError as exc:
                if strict:
                    raise ScanError(f"sanitize --strict: {src}: {exc}") from exc
                layout = None
            if layout is None and strict:
                raise ScanError(f"sanitize --strict: {src} is not an ELF core")
            core = _Core(view, layout, reps)
            plan = _Plan(_objects(core, findings), core.phases())
            if strict and layout is not None:
                _strict(core, layout, plan)
            return plan
        finally:
            view.release()


class _Core:
    """The dump's bytes, and where an object may be widened to: inside the PT_LOAD piece(s)
    its finding lies in, never into the ELF header, program headers or a PT_NOTE segment."""

    def __init__(self, view: memoryview, layout: CoreLayout | None, reps: _Index) -> None:
        self.view = view
        self.reps = reps
        self.size = len(view)
        self.layout = layout
        self.protected: list[tuple[int, int, str]] = []
        self.pieces: list[Segment] = []
        if layout is not None:
            self.pieces = layout.pieces
            self.protected = _protected(view)
        self._starts = [p.offset for p in self.pieces]
        self._fences = sorted(
            [(p.offset, p.offset + p.filesz) for p in self.pieces]
            + [(a, b) for a, b, _ in self.protected]
        )

    def phases(self) -> list[tuple[int, int, int]]:
        return [(p.offset, p.offset + p.filesz, p.vaddr - p.offset) for p in self.pieces]

    def piece(self, offset: int) -> Segment | None:
        i = bisect.bisect_right(self._starts, offset) - 1
        if i >= 0 and offset < self.pieces[i].offset + self.pieces[i].filesz:
            return self.pieces[i]
        return None

    def address(self, offset: int) -> int | None:
        p = self.piece(offset)
        return None if p is None else p.vaddr + offset - p.offset

    def register_note(self, start: int, end: int) -> bool:
        """Whether [start, end) lies inside one floating-point/vector register note's data."""
        notes = self.layout.notes if self.layout is not None else []
        return any(n.start <= start and end <= n.end and n.name in _REGISTER_NOTES for n in notes)

    def guarded(self, start: int, end: int) -> str | None:
        """The protected structure [start, end) touches, if any."""
        for a, b, name in self.protected:
            if start < b and a < end:
                return name
        return None

    def bounds(self, start: int, end: int) -> tuple[int, int]:
        """How far an object around [start, end) may reach: the pieces holding its first and
        last byte (or, outside every piece, the gap between its neighbours), 16 MiB at most."""
        lo, hi = 0, self.size
        first, last = self.piece(start), self.piece(end - 1)
        if first is not None:
            lo = first.offset
        if last is not None:
            hi = last.offset + last.filesz
        if first is None or last is None:  # between segments: up to its neighbours
            for a, b in self._fences:
                if first is None and b <= start:
                    lo = max(lo, b)
                if last is None and a >= end:
                    hi = min(hi, a)
        return max(lo, start - MAX_WIDEN), min(hi, end + MAX_WIDEN)


def _protected(view: memoryview) -> list[tuple[int, int, str]]:
    """File ranges never written: ELF header, program headers, section header 0 (PN_XNUM),
    PT_NOTE segments. parse_core has already checked these headers."""
    is64 = view[4] == 2
    e = "<" if view[5] == 1 else ">"
    if is64:
        phoff, shoff = struct.unpack_from(e + "QQ", view, 32)
        ehsize, phentsize, phnum, shentsize = struct.unpack_from(e + "HHHH", view, 52)
    else:
        phoff, shoff = struct.unpack_from(e + "II", view, 28)
        ehsize, phentsize, phnum, shentsize = struct.unpack_from(e + "HHHH", view, 40)
    size = len(view)
    if phnum == PN_XNUM and shoff + (48 if is64 else 32) <= size:
        phnum = struct.unpack_from(e + "I", view, shoff + (44 if is64 else 28))[0]
    out = [(0, ehsize, "the ELF header")]
    if shoff:
        out.append((shoff, shoff + shentsize, "the section header"))
    fit = max(0, min(phnum, (size - phoff) // phentsize)) if phentsize else 0
    out.append((phoff, phoff + fit * phentsize, "the program headers"))
    for i in range(fit):
        at = phoff + i * phentsize
        if is64:
            p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(e + "IIQQQQ", view, at)
        else:
            p_type, p_offset, _, _, p_filesz = struct.unpack_from(e + "IIIII", view, at)
        if p_type == PT_NOTE and p_filesz:
            out.append((p_offset, min(size, p_offset + p_filesz), "a PT_NOTE segment"))
    return out


def _objects(core: _Core, findings: Sequence[Finding]) -> list[Overwrite]:
    """Each finding widened to its object; overlapping objects merged."""
    spans: list[tuple[int, int, str, str]] = []
    for f in findings:
        start, end = f.offset, f.offset + f.length
        inside = core.guarded(start, end)
        if inside is not None:
            note = core.layout.outside_memory(start) if core.layout is not None else ""
            if core.register_note(start, end):
                spans.append((start, end, "register-note", f.representation))
                continue
            raise ScanError(
                f"sanitize: a finding ({f.representation} of {f.secret_id}) lies in "
                f"{inside} at {start:#x} {note}: the sanitiser does not rewrite the core's "
                "headers or notes; the dump stays as it is"
            )
        lo, hi = core.bounds(start, end)
        a, b, rule = _widen(core, f, lo, hi)
        for pa, pb, _ in core.protected:  # never into headers or notes
            if pb <= start:
                a = max(a, pb)
            elif pa >= end:
                b = min(b, pa)
        spans.append((min(a, start), max(b, end), rule, f.representation))
    spans.sort()
    out: list[Overwrite] = []
    cur: list[Any] = []
    for a, b, rule, rep in spans:
        if cur and a <= cur[1]:
            cur[1] = max(cur[1], b)
            cur[2].add(rule)
            cur[3].add(rep)
        else:
            if cur:
                out.append(_overwrite(core, cur))
            cur = [a, b, {rule}, {rep}]
    if cur:
        out.append(_overwrite(core, cur))
    return out


def _overwrite(core: _Core, cur: list[Any]) -> Overwrite:
    a, b, rules, reps = cur
    return Overwrite(a, b - a, core.address(a), "+".join(sorted(rules)), tuple(sorted(reps)))


# --- the rules ------------------------------------------------------------------------------


def _widen(core: _Core, f: Finding, lo: int, hi: int) -> tuple[int, int, str]:
    start, end = f.offset, f.offset + f.length
    view = core.view
    name = family(f.representation)
    if name in _BLIND_OBJECTS:  # delimited by blind mode's loader: BEGIN..END, blob, object
        if name == "jwk-private":
            return start, end, "jwk-object"
        armoured = _armour(view, start, end, lo, hi, b"\n")
        return (*(armoured or (start, end)), "pem" if armoured else "structure")
    kind = _kind(name, bytes(view[start:end]))
    if kind in ("base64", "base64url", "pem-json"):
        if kind == "pem-json":  # a PEM in a JSON string: lines end in the two characters \n
            a, b = _run(view, start, end, lo, hi, _B64_JSON, _B64_JSON_REVERSED)
            while a < start and bytes(view[a : a + 2]) in (b"\\n", b"\\r"):
                a += 2
            while b > end and bytes(view[b - 2 : b]) in (b"\\n", b"\\r"):
                b -= 2
        else:
            alphabet = _B64 if kind == "base64" else _B64URL
            a, b = _b64_block(view, start, end, lo, hi, alphabet)
        jwk = _jwk_object(view, a, b, lo, hi)
        if jwk is not None:
            return jwk[0], jwk[1], "jwk-object"
        armoured = _armour(view, a, b, lo, hi, b"\\n" if kind == "pem-json" else b"\n")
        if armoured is not None:
            return armoured[0], armoured[1], "pem"
        return a, b, kind
    if kind == "hex" and b":" in bytes(view[start:end]):
        a, b = _colon_hex(view, start, end, lo, hi)
        return a, b, "colon-hex"
    if kind in ("hex", "decimal"):
        seps = set(view[start:end]) & set(b"- ") if kind == "hex" else set()
        digits = (_HEX if kind == "hex" else rb"0-9") + re.escape(bytes(sorted(seps)))
        a, b = _class_run(view, start, end, lo, hi, digits)
        return a, b, kind
    if kind in ("utf16", "utf32"):
        a, b = _units(view, start, end, lo, hi, 2 if kind == "utf16" else 4)
        return a, b, kind
    a, b = _representation(core, f, lo, hi)
    if name == "openssh-key":
        blob = _openssh(view, a, b, lo, hi)
        if blob is not None:
            return blob[0], blob[1], "openssh-key-v1"
    if name in _DER_FORMS or name == "be" or name.startswith("verified-"):
        der = _der_key(view, a, b, lo, hi)
        if der is not None:
            return der[0], der[1], "der"
    return a, b, "window"


_BYTE_FORMS = frozenset(
    {"be", "le", "le64", "le32", "java-mag", "cpython30", "raw", "utf8", "latin1"}
    | {"openssh-key", "ppk-private"}
)


def _kind(name: str, data: bytes) -> str:
    """The rule of a representation: by name where known, else by what its bytes look like."""
    if name in ("pem", "pem-crlf", "b64"):
        return "base64"
    if name in ("b64url", "jwk"):
        return "base64url"
    if name == "pem-json":
        return "pem-json"
    if name in ("hex", "HEX", "hex-colon", "openssl-text"):
        return "hex"
    if name == "dec":
        return "decimal"
    if name.startswith("utf16"):
        return "utf16"
    if name.startswith("utf32"):
        return "utf32"
    if name in _DER_FORMS or name in _BYTE_FORMS or name.startswith("verified-"):
        return "bytes"
    # A representation this module does not know by name: judged by its bytes.
    if re.fullmatch(rb"[0-9a-fA-F]+(?:[:\- ][0-9a-fA-F]+)*", data):
        return "hex"
    if re.fullmatch(rb"[A-Za-z0-9+/]+=*", data):
        return "base64"
    if re.fullmatch(rb"[A-Za-z0-9_\-]+=*", data):
        return "base64url"
    for unit in (2, 4):
        text = data[0::unit] if data[0] else data[unit - 1 :: unit]
        if (
            len(data) >= 4 * unit
            and all(0x20 <= c < 0x7F for c in text)
            and sum(1 for c in data if c) == len(text)
        ):
            return "utf16" if unit == 2 else "utf32"
    return "bytes"


_B64_JSON = re.compile(rb"(?:[A-Za-z0-9+/=]|\\[rn])*")
_B64_JSON_REVERSED = re.compile(rb"(?:[rn]\\|[A-Za-z0-9+/=])*")


def _run(
    view: memoryview,
    start: int,
    end: int,
    lo: int,
    hi: int,
    forward: re.Pattern[bytes],
    backward: re.Pattern[bytes],
) -> tuple[int, int]:
    """[start, end) grown both ways, within [lo, hi), while ``forward`` matches the bytes after
    it and ``backward`` the bytes before it read backwards; in blocks (a run may be megabytes)."""
    a = start
    while a > lo:
        block = bytes(view[max(lo, a - _CHUNK) : a])[::-1]
        m = backward.match(block)
        grown = m.end() if m else 0
        a -= grown
        if grown < len(block):
            break
    b = end
    while b < hi:
        block = bytes(view[b : min(hi, b + _CHUNK)])
        m = forward.match(block)
        grown = m.end() if m else 0
        b += grown
        if grown < len(block):
            break
    return a, b


def _class_run(
    view: memoryview, start: int, end: int, lo: int, hi: int, alphabet: bytes
) -> tuple[int, int]:
    """[start, end) grown both ways while the bytes are in ``alphabet`` (a regex class body)."""
    pattern = re.compile(b"[" + alphabet + b"]*")
    return _run(view, start, end, lo, hi, pattern, pattern)


def _colon_hex(view: memoryview, start: int, end: int, lo: int, hi: int) -> tuple[int, int]:
    """Hex pairs joined by ``:``, in lines as ``openssl -text`` prints them (``:``, a line
    break and indentation between two pairs): the pairs around the match, one by one. A pair
    counts only where a ``:`` or indentation comes before it, so the label before the block
    (``prime2:``, whose ``e2:`` looks like a pair) is left alone."""

    def pair(at: int) -> bool:
        return lo <= at and at + 2 <= hi and view[at] in _HEX_DIGITS and view[at + 1] in _HEX_DIGITS

    def colon_before(at: int) -> int | None:
        """Where the separator that ends at ``at`` starts (its ``:``)."""
        i = at
        while i > lo and view[i - 1] in b" \t":
            i -= 1
        i -= _line_break_before(view, i, lo)
        return i - 1 if i > lo and view[i - 1] == 0x3A else None

    def colon_after(at: int) -> int:
        """Where the pair after the ``:`` at ``at`` starts."""
        i = at + 1
        n = _line_break_at(view, i, hi)
        if n:
            i += n
            while i < hi and view[i] in b" \t":
                i += 1
        return i

    a = start
    if a > lo and view[a - 1] in _HEX_DIGITS and not pair(a):
        a -= 1  # the match began on a pair's second digit
    while (c := colon_before(a)) is not None and pair(c - 2):
        if c - 2 > lo and view[c - 3] not in b": \t\r\n":
            break
        a = c - 2
    b = end
    if b < hi and view[b] in _HEX_DIGITS and view[b - 1] in _HEX_DIGITS and not pair(b):
        b += 1  # the match ended on a pair's first digit
    while b < hi and view[b] == 0x3A:
        nxt = colon_after(b)
        if not pair(nxt):
            b += 1  # a trailing ':'
            break
        b = nxt + 2
    return a, b


def _b64_block(
    view: memoryview, start: int, end: int, lo: int, hi: int, alphabet: bytes
) -> tuple[int, int]:
    """The maximal run of ``alphabet`` around [start, end). Standard base64 wrapped in lines
    (PEM's 64 columns, ``base64``'s 76, ssh-keygen's 70) is one object: whole lines of one
    width of at least 16 characters join, the last one may be shorter. Lines of words do not
    (their widths vary). A match may itself span lines (a PEM body is searched with its line
    ends): its first line gives the width."""
    a, b = _class_run(view, start, end, lo, hi, alphabet)
    if alphabet != _B64:
        return a, b
    inner = re.split(rb"\r?\n", bytes(view[a:b]))
    width = len(inner[0]) if len(inner) > 1 else 0  # a line the match continues past is whole
    while n := _line_break_before(view, a, lo):
        prev_end = a - n
        pa, _ = _class_run(view, prev_end, prev_end, lo, prev_end, alphabet)
        length = prev_end - pa
        whole = pa == lo or _line_break_before(view, pa, lo) or view[pa - 1] < 0x20
        if length < max(16, len(inner[0])) or (width and length != width) or not whole:
            break
        width, a = length, pa
    width = width or len(inner[0])
    if len(inner[-1]) != width or width < 16:
        return a, b  # the match's last line is the block's last (shorter) line
    while n := _line_break_at(view, b, hi):
        na = b + n
        _, nb = _class_run(view, na, na, na, hi, alphabet)
        length = nb - na
        ends = nb == hi or _line_break_at(view, nb, hi) or view[nb] < 0x20
        if not length or length > width or not ends:
            break
        b = nb
        if length < width:
            break
    return a, b


def _line_break_at(view: memoryview, at: int, hi: int) -> int:
    if at < hi and view[at] == 0x0A:
        return 1
    return 2 if at + 1 < hi and view[at] == 0x0D and view[at + 1] == 0x0A else 0


def _line_break_before(view: memoryview, at: int, lo: int) -> int:
    if at - 1 >= lo and view[at - 1] == 0x0A:
        return 2 if at - 2 >= lo and view[at - 2] == 0x0D else 1
    return 0


def _armour(
    view: memoryview, a: int, b: int, lo: int, hi: int, eol: bytes
) -> tuple[int, int] | None:
    """The PEM block around a base64 body [a, b): its BEGIN line (and headers) and END line,
    when either is there. ``eol``: the line end (``\\n`` in a JSON string)."""
    e = re.escape(eol)
    begin = re.compile(
        rb"-----BEGIN [A-Z0-9 ]{1,40}-----\r?" + e + rb"(?:[A-Za-z-]+:[^\n]{0,200}\n|\r?\n)*\Z"
    )
    before = bytes(view[max(lo, a - 1024) : a])
    at = before.rfind(b"-----BEGIN ")
    na = a - (len(before) - at) if at >= 0 and begin.match(before, at) else a
    m = re.compile(rb"(?:\r?" + e + rb")?-----END [A-Z0-9 ]{1,40}-----").match(
        bytes(view[b : min(hi, b + 64)])
    )
    nb = b + m.end() if m else b
    return (na, nb) if (na, nb) != (a, b) else None


_MEMBER = re.compile(rb'"(' + b"|".join(_JWK_PRIVATE) + rb')"\s{0,8}:\s{0,8}"\Z')


def _jwk_object(view: memoryview, a: int, b: int, lo: int, hi: int) -> tuple[int, int] | None:
    """The JSON object of a JWK whose private member's value is [a, b)."""
    if b >= hi or view[b] != 0x22 or not _MEMBER.search(bytes(view[max(lo, a - 16) : a])):
        return None
    base = max(lo, a - 8192)
    text = bytes(view[base : min(hi, b + 8192)]).decode("latin-1")
    rel_a, rel_b = a - base, b - base
    decoder = json.JSONDecoder()
    brace = rel_a
    for _ in range(64):
        brace = text.rfind("{", 0, brace)
        if brace < 0:
            break
        try:
            obj, stop = decoder.raw_decode(text, brace)
        except (ValueError, RecursionError):
            continue
        if stop > rel_b and isinstance(obj, dict) and "kty" in obj:
            return base + brace, base + stop
    # Not parseable (cut short, overwritten): its own object, from the last '{' before it.
    brace = text.rfind("{", 0, rel_a)
    if brace >= 0 and "}" not in text[brace:rel_a] and '"kty"' in text[brace : rel_b + 512]:
        return base + brace, b + 1
    return None


def _units(view: memoryview, start: int, end: int, lo: int, hi: int, unit: int) -> tuple[int, int]:
    """The string of ``unit``-byte code units holding printable ASCII that holds the match.

    Little- or big-endian: a little-endian string is also a big-endian one shifted by a byte
    (the scanner finds ``utf16be`` inside ``utf16le`` text), so both readings are tried and the
    longer string is taken; little-endian, the order in memory on x86-64 and arm64, on a tie."""
    matched = bytes(view[start:end])
    first = next((i for i, c in enumerate(matched) if c), 0)
    best: tuple[int, int] | None = None
    for text_at in (0, unit - 1):  # where the character's byte is in a unit: LE, BE
        grid = start + first - text_at
        run = _unit_run(view, grid, end, lo, hi, unit, text_at)
        if (
            run is not None
            and run[0] <= start
            and (best is None or run[1] - run[0] > best[1] - best[0])
        ):
            best = run
    a, b = best if best is not None else (start, end)
    return min(a, start), max(b, end)


def _unit_run(
    view: memoryview, grid: int, end: int, lo: int, hi: int, unit: int, text_at: int
) -> tuple[int, int] | None:
    """The run of text units on the grid through ``grid``, if it reaches ``end``."""

    def is_text(at: int) -> bool:
        if at < lo or at + unit > hi:
            return False
        u = bytes(view[at : at + unit])
        c = u[text_at]
        return (0x20 <= c < 0x7F or c in (9, 10, 13)) and not any(
            u[i] for i in range(unit) if i != text_at
        )

    b = grid
    while b - end < MAX_WIDEN and is_text(b):
        b += unit
    if b < end - unit + 1:
        return None  # the match is not text read this way
    a = grid
    while grid - a < MAX_WIDEN and is_text(a - unit):
        a -= unit
    return a, b


def _representation(core: _Core, f: Finding, lo: int, hi: int) -> tuple[int, int]:
    """A fragment placed in the whole representation it belongs to: [start, end) widened to
    the representation's full length. ``f`` carries no representation bytes, so they are
    found again among the scanner's: the first that holds the matched bytes, longest first."""
    start, end = f.offset, f.offset + f.length
    datas = core.reps.get((f.secret_id, f.component, family(f.representation)), [])
    matched = bytes(core.view[start:end])
    best = (start, end)
    if matched in datas:
        return best  # a whole representation
    for data in sorted(datas, key=len, reverse=True):
        at = data.find(matched)
        if at >= 0:
            a, b = start - at, start - at + len(data)
            if b - a > best[1] - best[0]:
                best = (max(lo, a), min(hi, b))
            break
    return best


def _openssh(view: memoryview, a: int, b: int, lo: int, hi: int) -> tuple[int, int] | None:
    """The ``openssh-key-v1`` structure holding [a, b), starting at most DER_REACH before it."""
    base = max(lo, a - DER_REACH)
    at = bytes(view[base:a]).rfind(b"openssh-key-v1\x00")
    if at < 0:
        return None
    s = base + at
    parsed = _blind._openssh_blob(bytes(view[s : min(hi, s + _blind._MAX_BLOB)]))
    if parsed is None or s + parsed[0] < b:
        return None
    return s, s + parsed[0]


def _der_length(view: memoryview, at: int, limit: int) -> tuple[int, int] | None:
    """(header length, content length) of a DER TLV at ``at``, if it fits before ``limit``."""
    if at + 2 > limit:
        return None
    n = view[at + 1]
    if n < 0x80:
        head, length = 2, n
    elif 0x81 <= n <= 0x83 and at + 2 + (n & 0x7F) <= limit:
        head = 2 + (n & 0x7F)
        length = int.from_bytes(view[at + 2 : at + head], "big")
    else:
        return None
    return (head, length) if at + head + length <= limit else None


def _tlv_sequence(view: memoryview, at: int, limit: int) -> int | None:
    """The end of a SEQUENCE at ``at`` whose content is well-formed TLVs, the first an INTEGER
    (a private key's version): the shape of PKCS#8, PKCS#1 and SEC1."""
    if view[at] != 0x30:
        return None
    hl = _der_length(view, at, limit)
    if hl is None:
        return None
    stop = at + hl[0] + hl[1]
    pos = at + hl[0]
    if pos >= stop or view[pos] != 0x02:
        return None
    while pos < stop:
        child = _der_length(view, pos, stop)
        if child is None:
            return None
        pos += child[0] + child[1]
    return stop if pos == stop else None


def _der_key(view: memoryview, a: int, b: int, lo: int, hi: int) -> tuple[int, int] | None:
    """The outermost DER private key (PKCS#8, PKCS#1, SEC1) that holds [a, b) and starts at most
    DER_REACH bytes before it."""
    base = max(lo, a - DER_REACH)
    block = bytes(view[base : a + 1])
    best: tuple[int, int] | None = None
    at = len(block)
    while True:
        at = block.rfind(b"\x30", 0, at)
        if at < 0:
            return best
        s = base + at
        stop = _tlv_sequence(view, s, hi)
        if stop is None or stop < b:
            continue
        try:
            serialization.load_der_private_key(bytes(view[s:stop]), None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
        best = (s, stop)


# --- writing --------------------------------------------------------------------------------


def _copy(src: int, dst: int, size: int, holes: Sequence[tuple[int, int]]) -> None:
    """``src`` into ``dst`` at the same offsets: only its data extents (a sparse core stays
    sparse) minus ``holes``; copy_file_range where the kernel does it, else 1 MiB chunks."""
    os.ftruncate(dst, size)
    for start, end in _subtract(_extents(src, size), holes):
        pos = start
        while pos < end:
            try:
                n = os.copy_file_range(src, dst, end - pos, pos, pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                n = 0
            if n == 0:
                _copy_chunks(src, dst, pos, end)
                break
            pos += n


def _copy_chunks(src: int, dst: int, start: int, end: int) -> None:
    pos = start
    while pos < end:
        block = os.pread(src, min(_CHUNK, end - pos), pos)
        if not block:
            raise ScanError(f"sanitize: the dump ended at {pos} while it was copied")
        _pwrite_all(dst, block, pos)
        pos += len(block)


def _decompress(f: Any, codec: str, src: Path, fd: int, limit: int) -> int:
    """A compressed core decompressed into ``fd`` as a stream; blocks of zeros are skipped, so
    the copy is sparse as the kernel's cores are. Returns its size."""
    pos = 0
    for piece in _compressed.pieces(f, codec, src):
        if pos + len(piece) > limit:
            raise ScanError(f"sanitize: {src} decompresses to more than {limit} bytes")
        view = memoryview(piece)
        for at in range(0, len(view), _ZERO_BLOCK):
            block = view[at : at + _ZERO_BLOCK]
            if block.nbytes != _ZERO_BLOCK or bytes(block).count(0) != _ZERO_BLOCK:
                _pwrite_all(fd, block, pos + at)
        pos += len(piece)
    os.ftruncate(fd, pos)
    return pos


def _zero(fd: int, size: int, ranges: Sequence[tuple[int, int]]) -> None:
    """Zeros over ``ranges`` of a copy that was not made by :func:`_copy` (which leaves them
    out): only where the copy has data."""
    zeros = bytes(_CHUNK)
    for start, end in _intersect(_extents(fd, size), ranges):
        for at in range(start, end, _CHUNK):
            _pwrite_all(fd, zeros[: min(_CHUNK, end - at)], at)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The data extents of a file, one at a time (SEEK_DATA/SEEK_HOLE: a kernel core's zero
    pages are holes); the whole file where the file system cannot tell."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after pos
                return
            if pos == 0 and exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield 0, size
                return
            raise
        if start >= size:
            return
        end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        yield start, end
        pos = end


def _subtract(
    ranges: Iterable[tuple[int, int]], cut: Sequence[tuple[int, int]]
) -> Iterator[tuple[int, int]]:
    """The parts of sorted, disjoint ``ranges`` outside every range of ``cut``."""
    cuts = _merge(cut)
    ends = [b for _, b in cuts]
    for start, end in ranges:
        pos = start
        i = bisect.bisect_right(ends, pos)
        while pos < end:
            if i >= len(cuts) or cuts[i][0] >= end:
                yield pos, end
                break
            a, b = cuts[i]
            if a > pos:
                yield pos, a
            pos = max(pos, b)
            i += 1


def _intersect(
    ranges: Iterable[tuple[int, int]], other: Sequence[tuple[int, int]]
) -> Iterator[tuple[int, int]]:
    """The parts of sorted, disjoint ``ranges`` inside some range of ``other``."""
    cuts = _merge(other)
    ends = [b for _, b in cuts]
    for start, end in ranges:
        i = bisect.bisect_right(ends, start)
        while i < len(cuts) and cuts[i][0] < end:
            lo, hi = max(start, cuts[i][0]), min(end, cuts[i][1])
            if lo < hi:
                yield lo, hi
            i += 1


def _merge(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[0] < r[1]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _fill(fd: int, objects: Sequence[Overwrite], phases: Sequence[tuple[int, int, int]]) -> int:
    """Writes the filler over every object, in chunks; aligned to the virtual address inside
    a PT_LOAD, to the file offset elsewhere. Returns the bytes written."""
    starts = [p[0] for p in phases]
    total = 0
    pattern = FILLER * (_CHUNK // len(FILLER) + 2)
    for o in objects:
        i = bisect.bisect_right(starts, o.offset) - 1
        delta = phases[i][2] if i >= 0 and o.offset < phases[i][1] else 0
        pos, end = o.offset, o.offset + o.length
        while pos < end:
            n = min(_CHUNK, end - pos)
            skew = (pos + delta) % len(FILLER)
            _pwrite_all(fd, pattern[skew : skew + n], pos)
            pos += n
        total += o.length
    return total


# --- strict mode ----------------------------------------------------------------------------


class _Memory:
    """Reads process memory out of the dump by virtual address."""

    def __init__(self, view: memoryview, pieces: Sequence[Segment], word: int, e: str) -> None:
        self.view = view
        self.pieces = sorted(pieces, key=lambda p: p.vaddr)
        self._starts = [p.vaddr for p in self.pieces]
        self.word = word
        self.fmt = e + ("Q" if word == 8 else "I")

    def offset(self, address: int, n: int = 1) -> int | None:
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0:
            p = self.pieces[i]
            if address + n <= p.vaddr + p.filesz:
                return p.offset + address - p.vaddr
        return None

    def read(self, address: int, n: int) -> bytes | None:
        at = self.offset(address, n)
        return None if at is None else bytes(self.view[at : at + n])

    def word_at(self, address: int) -> int | None:
        raw = self.read(address, self.word)
        return None if raw is None else int(struct.unpack(self.fmt, raw)[0])

    def string(self, address: int, limit: int = 4096) -> tuple[int, int] | None:
        """(file offset, length with the NUL) of a C string at ``address``."""
        at = self.offset(address)
        if at is None:
            return None
        i = bytes(self.view[at : at + limit]).find(b"\0")
        return None if i < 0 else (at, i + 1)


def _strict(core: _Core, layout: CoreLayout, plan: _Plan) -> None:
    view = core.view
    is64 = view[4] == 2
    e = "<" if view[5] == 1 else ">"
    word = 8 if is64 else 4
    machine = struct.unpack_from(e + "H", view, 18)[0]
    if machine not in _STACK_POINTER or (machine == 3) == is64:
        raise ScanError(
            f"sanitize --strict: a core of machine {machine} (e_machine): strict mode knows "
            "where x86-64, i386 and AArch64 cores keep the stack pointer"
        )
    plan.word, plan.endian = word, e
    mem = _Memory(view, layout.pieces, word, e)
    reg_at, sp_index = _STACK_POINTER[machine]
    threads: list[tuple[int, int]] = []  # (LWP, stack pointer)
    auxv: dict[int, int] = {}
    fmt = e + ("Q" if is64 else "I")
    for n in layout.notes:
        if n.name == "NT_PRSTATUS" and n.end - n.start >= reg_at + (sp_index + 1) * word:
            pid = struct.unpack_from(e + "i", view, n.start + (32 if is64 else 24))[0]
            sp = struct.unpack_from(fmt, view, n.start + reg_at + sp_index * word)[0]
            threads.append((pid, sp))
        elif n.name == "NT_AUXV":
            for at in range(n.start, n.end - 2 * word + 1, 2 * word):
                k, v = struct.unpack_from(e + ("QQ" if is64 else "II"), view, at)
                auxv.setdefault(k, v)
    if not threads:
        raise ScanError("sanitize --strict: the core has no NT_PRSTATUS note (no thread)")
    kept: list[Kept] = []
    segments = [s for s in layout.segments if s.filesz]

    def containing(address: int) -> Segment | None:
        for s in segments:
            if s.vaddr <= address < s.vaddr + s.filesz:
                return s
        return None

    stacks: dict[int, tuple[Segment, int, list[int]]] = {}
    for pid, sp in threads:
        s = containing(sp) or containing(sp - 1)
        if s is None:
            plan.notes.append(f"strict: the stack pointer {sp:#x} of LWP {pid} is in no segment")
            continue
        low = stacks.get(s.offset, (s, sp, []))
        stacks[s.offset] = (s, min(low[1], sp), [*low[2], pid])
    for s, sp, pids in stacks.values():
        start = max(s.vaddr, sp - RED_ZONE) if sp <= s.vaddr + s.filesz else s.vaddr
        at = s.offset + start - s.vaddr
        lwps = ", ".join(str(p) for p in sorted(pids))
        kept.append(Kept(at, s.offset + s.filesz - at, start, f"stack of LWP {lwps}"))
        if core.guarded(at, s.offset + s.filesz) is None:
            plan.stacks.append((at, s.offset + s.filesz, start))
    files = sorted((r.start, r.end, r.name) for r in layout.files)
    file_starts = [f[0] for f in files]

    def file_of(s: Segment) -> str | None:
        i = bisect.bisect_right(file_starts, s.vaddr) - 1
        return files[i][2] if i >= 0 and s.vaddr < files[i][1] else None

    vdso = auxv.get(_AT_SYSINFO_EHDR)
    pointers = [(a, b) for a, b, _ in files]
    for s in segments:
        name = file_of(s)
        if name is not None and not s.flags & _PF_W:
            kept.append(Kept(s.offset, s.filesz, s.vaddr, f"file-backed, not writable: {name}"))
        elif vdso is not None and s.vaddr <= vdso < s.vaddr + max(s.memsz, s.filesz):
            kept.append(Kept(s.offset, s.filesz, s.vaddr, "[vdso]"))
            pointers.append((s.vaddr, s.vaddr + s.memsz))
    pointers += [(s.vaddr, s.vaddr + s.memsz) for s, _, _ in stacks.values()]
    plan.pointers = _merge(pointers)
    kept += _loader_list(mem, auxv, plan.notes)
    plan.kept = sorted(kept, key=lambda k: k.offset)
    memory = _merge([(s.offset, s.offset + s.filesz) for s in segments])
    # Headers and notes are never written, even where a shaped core's segment claims them.
    keep = _merge(
        [(k.offset, k.offset + k.length) for k in kept] + [(a, b) for a, b, _ in core.protected]
    )
    plan.holes = list(_subtract(memory, keep))
    plan.zeroed = sum(b - a for a, b in plan.holes)
    plan.kept_bytes = sum(b - a for a, b in memory) - plan.zeroed


def _loader_list(mem: _Memory, auxv: dict[int, int], notes: list[str]) -> list[Kept]:
    """The bytes gdb reads to list the shared libraries: the executable's dynamic section,
    ``r_debug`` (DT_DEBUG) and each ``link_map`` (l_addr, l_name, l_ld, l_next, l_prev) with
    its name. Without them gdb cannot place any library and shows ``?? ()`` frames."""
    w = mem.word
    out: list[Kept] = []

    def keep(address: int, n: int, why: str) -> bool:
        at = mem.offset(address, n)
        if at is None:
            return False
        out.append(Kept(at, n, address, why))
        return True

    phdr, phnum = auxv.get(_AT_PHDR), auxv.get(_AT_PHNUM)
    if not phdr or not phnum:
        notes.append("strict: no AT_PHDR in NT_AUXV: the libraries' list was not kept")
        return out
    size = 56 if w == 8 else 32
    headers = []
    for i in range(min(phnum, 256)):
        raw = mem.read(phdr + i * size, size)
        if raw is None:
            notes.append("strict: the executable's program headers are not in the core")
            return out
        if w == 8:
            p_type, _, _, p_vaddr, _, _, p_memsz = struct.unpack_from(mem.fmt[0] + "IIQQQQQ", raw)
        else:
            p_type, _, p_vaddr, _, _, p_memsz = struct.unpack_from(mem.fmt[0] + "IIIIII", raw)
        headers.append((p_type, p_vaddr, p_memsz))
    bias = next((phdr - v for t, v, _ in headers if t == _PT_PHDR), 0)
    dynamic = next(((bias + v, m) for t, v, m in headers if t == _PT_DYNAMIC), None)
    if dynamic is None or not keep(dynamic[0], dynamic[1], "the executable's dynamic section"):
        notes.append("strict: no dynamic section in the core (a static executable?)")
        return out
    r_debug = None
    for at in range(dynamic[0], dynamic[0] + dynamic[1], 2 * w):
        tag = mem.word_at(at)
        if tag == _DT_DEBUG:
            r_debug = mem.word_at(at + w)
            break
        if tag in (0, None):
            break
    if not r_debug or not keep(r_debug, 5 * w, "r_debug"):
        notes.append("strict: no r_debug (DT_DEBUG) in the core: the libraries' list not kept")
        return out
    lm = mem.word_at(r_debug + w)
    seen: set[int] = set()
    while lm and lm not in seen and len(seen) < _MAX_LINK_MAPS:
        seen.add(lm)
        if not keep(lm, 5 * w, "link_map"):
            break
        name = mem.word_at(lm + w)
        where = mem.string(name) if name else None
        if where is not None:
            out.append(Kept(where[0], where[1], name, "link_map name"))
        lm = mem.word_at(lm + 3 * w)
    return out


def _deface_stacks(src: int, dst: int, plan: _Plan) -> int:
    """Crashpad's stack sanitiser over each kept stack: aligned words that are neither small
    nor pointers into a module or a stack become the filler. Returns the words replaced."""
    dtype = np.dtype(plan.endian + ("u8" if plan.word == 8 else "u4"))
    filler = np.frombuffer(FILLER[: plan.word], dtype=dtype)[0]
    lows = np.array([a for a, _ in plan.pointers], dtype=np.uint64)
    highs = np.array([b for _, b in plan.pointers], dtype=np.uint64)
    replaced = 0
    for start, end, address in plan.stacks:
        skew = -address % plan.word  # bytes before the first aligned word: filler
        if skew:
            _pwrite_all(dst, (FILLER * 2)[(address % plan.word) : plan.word], start)
        pos = start + skew
        while pos + plan.word <= end:
            n = min(_CHUNK, (end - pos) // plan.word * plan.word)
            words = np.frombuffer(os.pread(src, n, pos), dtype=dtype).copy()
            as64 = words.astype(np.uint64)
            i = np.searchsorted(lows, as64, side="right") - 1
            inside = (i >= 0) & (as64 < highs[np.maximum(i, 0)])
            bad = ~((as64 <= SMALL_WORD) | inside)
            words[bad] = filler
            replaced += int(bad.sum())
            _pwrite_all(dst, words.tobytes(), pos)
            pos += n
        if pos < end:
            _pwrite_all(dst, FILLER[: end - pos], pos)
    return replaced
