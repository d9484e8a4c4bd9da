"""The scanner: one compiled pattern database, many files, one pass over each."""

from __future__ import annotations

import bisect
import errno
import mmap
import os
import stat
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from signer.errors import CoreFormatError, ScanError
from signer.keys import PublicKeyType
from signer.scan import _blind, _compressed
from signer.scan._elf import (
    AddressNamer,
    CoreLayout,
    NamedRange,
    parse_core,
    parse_maps,
)
from signer.scan._engine import MAX_HITS, PatternSet, overlap, scan_chunks
from signer.scan._patterns import Representation, representations
from signer.scan._result import BlindReport, Finding, ScanResult
from signer.scan._secrets import MIN_PATTERN, WHOLE_KEY, Secret, reading

DEFAULT_CHUNK = 64 << 20
DEFAULT_MAX_OUTPUT = 64 << 30
"""A compressed file may decompress to at most this many bytes (see ``max_output``)."""
MIN_HOLE = 1 << 20
"""Holes of a sparse file shorter than this are read like data: skipping them saves little, and
one data range per 4 KiB block of a shaped file would be millions of ranges."""
MAX_MAPS_BYTES = 64 << 20
"""A maps snapshot larger than this is refused: 262144 mappings of 200-character lines fit."""


class Scanner:
    """Searches files for known secrets (every representation and fragment) and, given public
    keys, for private keys it does not know (blind mode).

    The pattern database is compiled once here; :meth:`scan` may be called for many files. A
    scanner scans one file at a time (calls from several threads take turns). ``max_output``
    bounds what a compressed file may decompress to (:mod:`signer.scan._stream`).
    """

    def __init__(
        self,
        secrets: Iterable[Secret] = (),
        min_fragment: int = 16,
        *,
        public_keys: Mapping[str, PublicKeyType] | Sequence[PublicKeyType] | None = None,
        blind_budget_seconds: float = 60.0,
        blind_offsets: _blind.Offsets = "every",
        blind_workers: int | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        max_output: int = DEFAULT_MAX_OUTPUT,
    ) -> None:
        self.secrets = list(secrets)
        for s in self.secrets:
            if not isinstance(s, Secret):
                raise TypeError("secrets must be Secret objects (see load_secrets)")
        ids = Counter(s.id for s in self.secrets)
        dup = sorted(i for i, n in ids.items() if n > 1)
        if dup:
            raise ScanError(f"secret ids must be unique: {', '.join(dup)} repeated")
        if not isinstance(min_fragment, int) or min_fragment < MIN_PATTERN:
            raise ScanError(f"min_fragment must be an integer of at least {MIN_PATTERN}")
        if chunk_size < 1:
            raise ScanError("chunk_size must be positive")
        if blind_budget_seconds < 0:
            raise ScanError("blind_budget_seconds must not be negative")
        if blind_offsets not in _blind.OFFSETS:
            raise ScanError(
                f"blind_offsets must be one of {', '.join(_blind.OFFSETS)}, not {blind_offsets!r}"
            )
        if blind_workers is not None and (
            not isinstance(blind_workers, int)
            or isinstance(blind_workers, bool)
            or not 1 <= blind_workers <= _blind.MAX_WORKERS
        ):
            raise ScanError(
                f"blind_workers must be a positive integer up to {_blind.MAX_WORKERS} (or None: "
                "the CPUs, up to 4)"
            )
        if max_output < 0:
            raise ScanError("max_output must not be negative")
        if not self.secrets and public_keys is None:
            raise ScanError("nothing to search for: give secrets, public keys, or both")
        self.min_fragment = min_fragment
        self.chunk_size = chunk_size
        self.max_output = max_output
        self.blind_budget_seconds = float(blind_budget_seconds)
        self.blind_offsets: _blind.Offsets = blind_offsets
        # Processes for the math checks of a file scan (a compressed stream's run in this one).
        self.blind_workers = _blind.default_workers() if blind_workers is None else blind_workers
        self.public_keys = None if public_keys is None else _blind.PublicKeys(public_keys)

        began = time.monotonic()
        self._reps: list[Representation] = []
        for i, s in enumerate(self.secrets):
            self._reps += representations(s, i, min_fragment)
        table: dict[bytes, list[tuple[int, int]]] = {}
        for ri, rep in enumerate(self._reps):
            for at in rep.starts:
                table.setdefault(rep.data[at : at + rep.window], []).append((ri, at))
        self._windows = list(table.values())
        self._nlit = len(self._windows)
        # How far from a window match _extend reads: a representation's length, either way.
        self._reach = max((len(rep.data) for rep in self._reps), default=0)
        structural = _blind.STRUCTURAL if self.public_keys is not None else ()
        self._kinds = [kind for kind, _, _ in structural]
        self._patterns = PatternSet(list(table), [(rx, n) for _, rx, n in structural])
        self.compile_seconds = time.monotonic() - began
        self._marker_sets: dict[tuple[tuple[str, bytes], ...], PatternSet] = {}
        self._lock = threading.Lock()

    @property
    def pattern_count(self) -> int:
        """Distinct patterns compiled: fragment windows of every representation, plus the
        structural detectors of blind mode."""
        return self._patterns.count

    @property
    def representation_count(self) -> int:
        return len(self._reps)

    def scan(
        self,
        path: Path | str,
        maps: Path | str | None = None,
        markers: Mapping[str, bytes] | None = None,
        *,
        deadline: float | None = None,
    ) -> ScanResult:
        """Scans one file. ``maps``: a ``/proc/PID/maps`` snapshot naming a core's anonymous
        mappings. ``markers``: literals known to be in the dumped memory, counted in the same
        pass (a dump in which they are missing is not whole).

        A file compressed with zstd, lz4 or xz (told by its magic bytes: systemd-coredump's
        ``.zst``, ``.lz4``, ``.xz`` cores) is scanned as the file it decompresses to, read as a
        stream: the result (offsets, size, findings) is that of the decompressed file, which
        is never written anywhere. Its output is bounded by ``max_output`` and by the extent
        the core's headers declare; ``deadline`` (a ``time.monotonic()`` value) bounds its
        time. Past a bound, or on a stream that is cut short or corrupt: ScanError, and no
        result (see :mod:`signer.scan._stream`)."""
        path = Path(path)
        marker_set, names = self._markers(markers or {})
        maps_text = _read_maps(Path(maps)) if maps is not None else None
        with self._lock, reading(path, "dump"), _open_regular(path, "dump") as f:
            codec = _compressed.detect(f)
            if codec is not None:
                from signer.scan._stream import scan_stream  # it imports this module

                return scan_stream(self, path, f, codec, maps_text, marker_set, names, deadline)
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                # Nothing to map (mmap refuses 0 bytes), but the same result as any file: a
                # blind report included.
                result = self._scan(path, memoryview(b""), maps_text, marker_set, names)
                return replace(result, notes=["empty file", *result.notes])
            began = time.monotonic()
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                if hasattr(mmap, "MADV_SEQUENTIAL"):
                    mm.madvise(mmap.MADV_SEQUENTIAL)
                view = memoryview(mm)
                try:
                    data = _data_ranges(f.fileno(), size)
                    result = self._scan(path, view, maps_text, marker_set, names, data)
                finally:
                    view.release()
            return replace(result, seconds=time.monotonic() - began)

    # --- internals ----------------------------------------------------------------------------

    def _markers(self, markers: Mapping[str, bytes]) -> tuple[PatternSet | None, list[str]]:
        for name, value in markers.items():
            if not isinstance(value, bytes) or len(value) < MIN_PATTERN:
                raise ScanError(f"marker {name!r} must be bytes of at least {MIN_PATTERN}")
        if not markers:
            return None, []
        key = tuple(sorted(markers.items()))
        if key not in self._marker_sets:
            self._marker_sets[key] = PatternSet([v for _, v in key])
        return self._marker_sets[key], [n for n, _ in key]

    def _scan(
        self,
        path: Path,
        view: memoryview,
        maps_text: str | None,
        marker_set: PatternSet | None,
        marker_names: list[str],
        data: list[tuple[int, int]] | None = None,
    ) -> ScanResult:
        """``data``: where a sparse file has data; None when it has no holes (or the file
        system cannot say)."""
        size = len(view)
        notes: list[str] = []
        try:
            layout = parse_core(view)
        except CoreFormatError as exc:
            layout = None
            notes.append(f"ELF core headers unreadable ({exc}): scanned as raw bytes")
        sets = [self._patterns] + ([marker_set] if marker_set is not None else [])
        if data is not None and any(s.matches_zeros for s in sets):
            data = None  # a pattern of NUL bytes could match inside a hole: read them too
        ranges = None if data is None else _widen(data, overlap(sets), size)
        if data is not None:
            hole = size - sum(end - start for start, end in data)
            notes.append(
                f"sparse file: {hole} bytes in holes (all zero, no pattern can match there) "
                "were not read"
            )
        hits, complete = scan_chunks(view, sets, self.chunk_size, ranges)
        if not complete:
            notes.append(
                f"stopped after {MAX_HITS} matches: the result is INCOMPLETE (is the dump full "
                "of one secret, or are the secrets degenerate?)"
            )
        literal_hits = [(pid, at) for pid, at in hits[0] if pid < self._nlit]
        findings = self._suppress(self._matches(view, literal_hits))

        blind: BlindReport | None = None
        if self.public_keys is not None:
            structural = [
                (self._kinds[pid - self._nlit], at) for pid, at in hits[0] if pid >= self._nlit
            ]
            # One budget for all blind work: structural candidates first (a dump crowded with
            # decoys cannot hold the scan longer), the math checks get what is left.
            deadline = time.monotonic() + self.blind_budget_seconds
            found, examined = _blind.structural_findings(
                view, structural, self.public_keys, deadline
            )
            regions = (
                [_blind.Region(s.offset, s.filesz, s.vaddr) for s in layout.pieces]
                if layout is not None
                else [_blind.Region(0, size, 0)]
            )
            checked = _blind.run_checks(
                view,
                regions,
                self.public_keys,
                max(0.0, deadline - time.monotonic()),
                None if data is None else _blind.Holes(data),
                self.blind_offsets,
                self.blind_workers,
            )
            findings += _drop_contained(found + checked.findings, findings)
            notes += checked.lost
            blind = BlindReport(
                self.blind_budget_seconds,
                tuple(self.public_keys.keys),
                len(structural),
                tuple(checked.reports),
                examined,
                self.blind_offsets,
                checked.workers,
                tuple(checked.lost),
            )
        counts = Counter(pid for pid, _ in hits[1]) if marker_set is not None else Counter()
        markers_found = {name: counts[i] for i, name in enumerate(marker_names)}
        return self._result(
            path,
            size,
            layout,
            maps_text,
            findings,
            blind,
            markers_found,
            complete,
            notes,
            marker_set,
        )

    def _result(
        self,
        path: Path,
        size: int,
        layout: CoreLayout | None,
        maps_text: str | None,
        findings: list[Finding],
        blind: BlindReport | None,
        markers_found: dict[str, int],
        complete: bool,
        notes: list[str],
        marker_set: PatternSet | None,
    ) -> ScanResult:
        """The result of a scan, from what it found: findings located in the core's mappings,
        the notes a reader needs. Shared by the file and the stream (compressed) scans."""
        if blind is not None:
            if not blind.structural_complete:
                notes.append(
                    f"blind mode confirmed {blind.structural_examined} of "
                    f"{blind.structural_candidates} private-key structures within the budget "
                    f"of {self.blind_budget_seconds:g} s: the result is INCOMPLETE"
                )
            if not all(c.complete for c in blind.checks):
                notes.append(
                    "blind math checks did not cover all memory within the budget of "
                    f"{self.blind_budget_seconds:g} s (see blind.checks)"
                )
        if layout is not None:
            findings = _locate(findings, layout, parse_maps(maps_text) if maps_text else [])
            notes += _core_notes(layout, size)
        elif maps_text is not None:
            notes.append("--maps ignored: the file is not an ELF core")
        findings.sort(key=lambda f: (f.offset, f.secret_id, f.component, f.representation))
        return ScanResult(
            path=path,
            size=size,
            bytes_scanned=layout.memory_bytes if layout is not None else size,
            patterns=self.pattern_count + (marker_set.count if marker_set else 0),
            seconds=0.0,
            findings=findings,
            is_core=layout is not None,
            markers_found=markers_found,
            complete=complete,
            notes=notes,
            blind=blind,
        )

    def _matches(
        self, view: memoryview, hits: list[tuple[int, int]], origin: int = 0
    ) -> set[tuple[int, int, int]]:
        """Window hits (file offsets) -> maximal matches of each representation, as (rep,
        start, end) in the file; :meth:`_suppress` makes them findings. ``view`` holds the
        file's bytes from ``origin`` on: a stream's window, which must reach ``_reach`` bytes
        either side of every hit (or the file's start and end): the matches are then those of
        the whole file (a match cut by the window's edge is found whole from either side)."""
        groups: defaultdict[tuple[int, int], list[int]] = defaultdict(list)
        for pid, at in hits:
            for ri, off in self._windows[pid]:
                groups[(ri, at - origin - off)].append(off)
        matches: set[tuple[int, int, int]] = set()
        for (ri, base), offs in groups.items():
            w = self._reps[ri].window
            offs.sort()
            a, e = offs[0], offs[0] + w
            for o in offs[1:]:
                if o > e:
                    matches.add(self._extend(view, ri, base, a, e, origin))
                    a = o
                e = o + w
            matches.add(self._extend(view, ri, base, a, e, origin))
        return matches

    def _extend(
        self, view: memoryview, ri: int, base: int, a: int, e: int, origin: int = 0
    ) -> tuple[int, int, int]:
        """Grows a match of ``rep.data[a:e]`` at ``view[base + a]`` while the bytes go on
        matching; the match in file offsets."""
        data = self._reps[ri].data
        while a > 0 and base + a > 0 and view[base + a - 1] == data[a - 1]:
            a -= 1
        size = len(view)
        while e < len(data) and base + e < size and view[base + e] == data[e]:
            e += 1
        return ri, origin + base + a, origin + base + e

    def _suppress(self, matches: set[tuple[int, int, int]]) -> list[Finding]:
        """One finding per piece of key material, not one per nested encoding of it.

        Of the matches of one secret, drop: anything inside a whole-key encoding (DER, PEM)
        found whole; a whole representation inside another whole representation of the same
        component (minimal inside padded big-endian); a fragment that adds fewer than
        ``min_fragment`` bytes to what is already reported (a fragment of a DER key that is the
        big-endian ``d`` already found, grown by one byte that happened to match).
        """
        reps = self._reps
        by_secret: defaultdict[int, list[tuple[int, int, bool, int]]] = defaultdict(list)
        for ri, start, end in matches:
            full = end - start == len(reps[ri].data)
            by_secret[reps[ri].secret].append((start, end, full, ri))
        out: list[Finding] = []
        for si, found in by_secret.items():
            found.sort(key=lambda m: (m[0], -m[1], not m[2], m[3]))
            kept: list[tuple[int, int, bool, int]] = []
            whole_end = -1
            comp_end: dict[str, int] = {}
            for start, end, full, ri in found:
                if not full:
                    continue
                component = reps[ri].component
                if whole_end < end and comp_end.get(component, -1) < end:
                    kept.append((start, end, full, ri))
                comp_end[component] = max(comp_end.get(component, -1), end)
                if component in WHOLE_KEY:
                    whole_end = max(whole_end, end)
            # Fragments, in order of start: what earlier fragments cover of one is a prefix of
            # it, up to their furthest end; the whole matches' cover is looked up. Linear in
            # the matches (a dump holding a PIN 400000 times once took hours, quadratically).
            cover = _Cover([(a, e) for a, e, _, _ in kept])
            reach = -1
            for start, end, full, ri in found:
                if not full and cover.uncovered(max(start, reach), end) >= self.min_fragment:
                    kept.append((start, end, full, ri))
                    reach = max(reach, end)
            for start, end, full, ri in sorted(kept):
                rep = reps[ri]
                name = rep.name if full else f"fragment:{rep.name}"
                out.append(Finding(self.secrets[si].id, rep.component, name, start, end - start))
        return out


class _Cover:
    """The union of byte ranges, asked how much of a range it leaves uncovered: O(log n)."""

    def __init__(self, spans: Iterable[tuple[int, int]]) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        for a, b in sorted(spans):
            if self._ends and a <= self._ends[-1]:
                self._ends[-1] = max(self._ends[-1], b)
            else:
                self._starts.append(a)
                self._ends.append(b)
        self._before = [0]  # bytes covered before each merged range
        for a, b in zip(self._starts, self._ends, strict=True):
            self._before.append(self._before[-1] + b - a)

    def _covered_below(self, x: int) -> int:
        i = bisect.bisect_right(self._starts, x) - 1
        if i < 0:
            return 0
        return self._before[i] + min(x, self._ends[i]) - self._starts[i]

    def uncovered(self, start: int, end: int) -> int:
        """How many bytes of [start, end) no range covers."""
        if start >= end:
            return 0
        return (end - start) - (self._covered_below(end) - self._covered_below(start))


def _drop_contained(blind: list[Finding], known: list[Finding]) -> list[Finding]:
    """Blind findings, without those inside another blind finding (a factor inside a DER key,
    PKCS#1 inside PKCS#8) or overlapping a known-secret finding (already reported there)."""
    out: list[Finding] = []
    ordered = sorted(blind, key=lambda f: (f.offset, -f.length, f.component != "private-key"))
    end = -1
    for f in ordered:
        if f.offset + f.length > end:
            out.append(f)
        end = max(end, f.offset + f.length)
    cover = _Cover((k.offset, k.offset + k.length) for k in known)
    return [f for f in out if cover.uncovered(f.offset, f.offset + f.length) == f.length]


def _open_regular(path: Path, what: str) -> BinaryIO:
    """``path`` opened for reading if it is a regular file. A FIFO, a device or a directory is
    refused: their size says nothing of what they hold (``/dev/zero`` and a pipe of a
    compressed core both look empty), so a scan of one would be reported clean. Opened without
    blocking: a FIFO with no writer would otherwise hold the scan forever. Called inside
    :func:`reading`, which names the file in an OSError's place."""
    kinds = {
        stat.S_IFIFO: "a FIFO or pipe",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
        stat.S_IFDIR: "a directory",
        stat.S_IFSOCK: "a socket",
    }
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = kinds.get(stat.S_IFMT(mode), "not a regular file")
        raise ScanError(
            f"{what} {path} is {kind}, not a regular file: save it to a file and scan that"
        )
    return open(fd, "rb")


def _read_maps(path: Path) -> str:
    """A ``/proc/PID/maps`` snapshot, at most MAX_MAPS_BYTES; names that are not UTF-8 (a path
    may be any bytes) are kept with replacement characters."""
    with reading(path, "maps snapshot"), _open_regular(path, "maps snapshot") as f:
        raw = f.read(MAX_MAPS_BYTES + 1)
    if len(raw) > MAX_MAPS_BYTES:
        raise ScanError(f"maps snapshot {path} is larger than {MAX_MAPS_BYTES} bytes")
    return raw.decode("utf-8", "replace")


def _data_ranges(fd: int, size: int) -> list[tuple[int, int]] | None:
    """Where a sparse file has data, from SEEK_DATA/SEEK_HOLE (holes shorter than MIN_HOLE
    joined to the data around them); None for a file without holes, or when the file system
    cannot say. Kernel cores are sparse (the dumper seeks over zero pages), and a shaped file
    can be 4 GiB of hole around a few bytes: holes are never read."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data after pos
                    break
                raise
            if start >= size:
                break
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
            if out and start - out[-1][1] < MIN_HOLE:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
            pos = end
    except (OSError, AttributeError):
        return None  # no SEEK_DATA here: read everything
    if out and out[0][0] < MIN_HOLE:
        out[0] = (0, out[0][1])
    if out and size - out[-1][1] < MIN_HOLE:
        out[-1] = (out[-1][0], size)
    if out == [(0, size)]:
        return None
    return out


def _widen(data: Sequence[tuple[int, int]], by: int, size: int) -> list[tuple[int, int]]:
    """Data ranges grown by ``by`` bytes each way (a match may begin or end in the zeros of a
    hole next to data) and merged where they then meet."""
    out: list[tuple[int, int]] = []
    for start, end in data:
        a, b = max(0, start - by), min(size, end + by)
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _locate(
    findings: list[Finding], layout: CoreLayout, maps: Sequence[NamedRange]
) -> list[Finding]:
    namer = AddressNamer(layout.files, maps)
    out = []
    for f in findings:
        address = layout.address(f.offset)
        mapping = layout.outside_memory(f.offset) if address is None else namer.name(address)
        out.append(replace(f, address=address, mapping=mapping))
    return out


def _core_notes(layout: CoreLayout, size: int) -> list[str]:
    memory = layout.memory_bytes
    notes = [
        f"ELF core: {len(layout.segments)} PT_LOAD segments; bytes_scanned counts their "
        f"{memory} bytes of memory only (the other {size - memory} bytes, headers and notes, "
        "were searched too)"
    ]
    absent = sum(max(0, s.memsz - s.declared_filesz) for s in layout.segments)
    if absent:
        notes.append(
            f"{absent} bytes of mapped memory are not in the dump (p_memsz > p_filesz: the dumper "
            "left them out, e.g. read-only file mappings)"
        )
    if not layout.files:
        notes.append("no NT_FILE note: mappings are named from the maps snapshot only")
    return notes + layout.problems


def scan_file(
    path: Path | str,
    secrets: Iterable[Secret],
    *,
    maps: Path | str | None = None,
    markers: Mapping[str, bytes] | None = None,
    min_fragment: int = 16,
) -> ScanResult:
    """Compiles a scanner for ``secrets`` and scans one file with it."""
    return Scanner(secrets, min_fragment).scan(path, maps=maps, markers=markers)
