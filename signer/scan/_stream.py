"""The scan of a compressed core, read as a stream: the same result as the decompressed file's,
without the decompressed file.

A core is gigabytes; decompressed, it is written nowhere and never held whole. The stream
(:mod:`signer.scan._compressed`) fills a sliding window of bytes; the scan takes it a chunk at a
time (``min(Scanner.chunk_size, STREAM_CHUNK)``), with context either side of the chunk:

* after it, the longest pattern less one (so a match that begins in the chunk ends inside the
  window, and is reported once, by the chunk it begins in, as in the file scan), and what the
  post-processing reads after a hit: a known secret's representation grown to its full length
  (``Scanner._matches``: up to the longest representation), a private-key structure loaded
  (:data:`~signer.scan._blind.CONTEXT_AFTER`, 128 KiB for a base64 OpenSSH blob), a window of
  the blind math checks (a prime of the largest RSA key);
* before it, what the same readers read backwards: the longest representation, 8 KiB of JSON
  before a JWK member (:data:`~signer.scan._blind.CONTEXT_BEFORE`).

Each chunk's hits are resolved at once, in the window, into file offsets of the decompressed
stream; the matches, structural findings and math-check findings are those of the whole file,
so the findings, markers, bytes_scanned and blind report equal the decompressed file's
(``tests/unit/scan/test_compressed.py`` checks exactly that). The memory is the window (a
chunk and its context, plus one decoded piece), the decoder's own (bounded, see
``_compressed``), and the hits (bounded by MAX_HITS, as in the file scan).

The core's ELF header, program headers and notes are at its start: they are read from the
stream's first bytes (at most :data:`HEADERS_MAX`) before the scan begins, for the blind
checks' regions and address alignment and for the output bound; the layout reported is the
one the whole file gives (``parse_core(head, size)``). A core whose headers lie further (a
shaped one; a real one has them in its first few MiB) is scanned as raw bytes, with a note.

Why block mode over overlapping chunks rather than Hyperscan's streaming mode: measured on
512 MiB of memory-like bytes with a scanner's 11339 patterns, both scan at the same speed
(block 630-730 MB/s, stream 640-730 MB/s, at 16 and 64 MiB writes); the overlap rescanned per
chunk is a few KiB in 16 MiB. Block mode keeps the one compiled database and its exact match
semantics (leftmost start of the structural expressions), and the post-processing needs a
window of bytes around each hit anyway, which a stream's callbacks would not give.

Bounds on hostile input (DESIGN section 7): the decompressed output may not pass
``Scanner.max_output`` (64 GiB by default), nor, for a core, the extent its headers declare
(plus :data:`EXTENT_SLACK`): a bomb of a few MiB that expands without end is stopped there.
``deadline`` bounds the time. A bound passed, or a stream cut short or corrupt, is a
ScanError naming the file and the offset, and no result: a partial scan of a compressed core
is not offered, so a gate fails closed.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from signer.errors import CoreFormatError, ScanError
from signer.scan import _blind, _compressed
from signer.scan._elf import CoreLayout, NeedMore, parse_core
from signer.scan._engine import MAX_HITS, PatternSet, overlap
from signer.scan._result import BlindReport, Finding, ScanResult
from signer.scan._scanner import Scanner, _drop_contained

STREAM_CHUNK = 16 << 20
"""Decompressed bytes scanned at a time (smaller than the file scan's 64 MiB: the chunk is held
in memory, not mapped). Throughput is the same at 16 and 64 MiB."""
HEADERS_MAX = 64 << 20
"""The stream's first bytes in which the ELF headers and notes must lie. A real core's are in
its first few MiB: 65530 mappings' program headers and NT_FILE entries take about 10 MiB."""
EXTENT_SLACK = 1 << 20
"""Bytes a core's stream may go on past the end its headers declare before it is refused."""
_UNBOUNDED = 1 << 64


class _Window:
    """The stream's bytes from ``origin`` to ``end``, filled from the decoder's pieces and
    dropped from the front as the scan moves on. Passing ``limit`` bytes of output, or the
    deadline, is a ScanError."""

    def __init__(
        self, pieces: Iterator[bytes], path: Path, limit: int, deadline: float | None
    ) -> None:
        self.buf = bytearray()
        self.origin = 0
        self.ended = False
        self.limit = limit
        self.why = "max_output"
        self._pieces = pieces
        self._path = path
        self._deadline = deadline

    @property
    def end(self) -> int:
        return self.origin + len(self.buf)

    def fill(self, upto: int) -> None:
        while not self.ended and self.end < upto:
            self.check_time()
            piece = next(self._pieces, None)
            if piece is None:
                self.ended = True
                return
            self.buf += piece
            self.bound(self.limit, self.why)

    def bound(self, limit: int, why: str) -> None:
        """At most ``limit`` bytes of output (``why``: where the bound comes from)."""
        self.limit, self.why = limit, why
        if self.end > limit:
            raise ScanError(
                f"dump {self._path}: the decompressed stream goes on past {limit} bytes "
                f"({why}): a decompression bomb, or not one core; nothing was scanned"
            )

    def drop(self, before: int) -> None:
        """Forgets the bytes before file offset ``before``."""
        n = before - self.origin
        if n > 0:
            del self.buf[:n]
            self.origin = before

    def check_time(self) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise ScanError(
                f"dump {self._path}: the scan's time ran out after {self.end} decompressed "
                "bytes; the rest was not read: nothing was scanned"
            )


def _headers(w: _Window) -> tuple[CoreLayout | None, bytes, str | None]:
    """The core's layout from the stream's first bytes: (provisional layout, the bytes it was
    read from, a note when the headers cannot be used). Provisional: the file's size is not
    known yet, so segments are not clipped to it. When the stream ends inside the headers,
    the layout is the final one (and the bytes are the whole file)."""
    w.fill(64)
    while True:
        size = w.end if w.ended else _UNBOUNDED
        try:
            with memoryview(w.buf) as view:
                layout = parse_core(view, size)
        except NeedMore as more:
            if more.needed > HEADERS_MAX:
                return (
                    None,
                    b"",
                    f"the core's headers and notes lie past the first {HEADERS_MAX} bytes of the "
                    "decompressed stream (where a compressed core's are read from): scanned as "
                    "raw bytes, findings without addresses",
                )
            w.fill(more.needed)
            continue
        except CoreFormatError as exc:
            return None, b"", f"ELF core headers unreadable ({exc}): scanned as raw bytes"
        if layout is None:
            return None, b"", None
        return layout, bytes(w.buf[: layout.head]), None


def scan_stream(
    scanner: Scanner,
    path: Path,
    f: BinaryIO,
    codec: str,
    maps_text: str | None,
    marker_set: PatternSet | None,
    marker_names: list[str],
    deadline: float | None,
) -> ScanResult:
    """Scans the decompressed contents of ``f`` (compressed with ``codec``) as
    ``Scanner._scan`` scans a file: see the module's docstring."""
    began = time.monotonic()
    compressed_size = os.fstat(f.fileno()).st_size
    w = _Window(_compressed.pieces(f, codec, path), path, scanner.max_output, deadline)
    provisional, head, head_note = _headers(w)
    if provisional is not None and provisional.extent + EXTENT_SLACK < w.limit:
        w.bound(
            provisional.extent + EXTENT_SLACK, f"the core's headers declare {provisional.extent}"
        )

    keys = scanner.public_keys
    checks = _blind.StreamChecks(keys, scanner.blind_offsets) if keys is not None else None
    # One budget for all blind work, as in the file scan: the time spent in it, chunk after
    # chunk (the decompression and the Hyperscan pass do not count).
    blind_seconds = 0.0
    regions = (
        [_blind.Region(s.offset, s.filesz, s.vaddr) for s in provisional.pieces]
        if provisional is not None
        else [_blind.Region(0, _UNBOUNDED, 0)]
    )
    sets = [scanner._patterns] + ([marker_set] if marker_set is not None else [])
    share = overlap(sets)
    before = max(scanner._reach, _blind.CONTEXT_BEFORE if checks else 0)
    after = max(
        share,
        scanner._reach,
        _blind.CONTEXT_AFTER if checks else 0,
        checks.window - 1 if checks else 0,
    )
    chunk = min(scanner.chunk_size, STREAM_CHUNK)
    nlit = scanner._nlit

    hits: list[list[tuple[int, int]]] = [[] for _ in sets]
    complete = True
    matches: set[tuple[int, int, int]] = set()
    structural_found: list[Finding] = []
    candidates = examined = 0
    pos = 0
    while True:
        w.fill(pos + chunk + after)
        end = min(pos + chunk, w.end)
        if end <= pos:
            break
        origin = w.origin
        # The window is the chunk and its context, no more (the buffer may hold more of the
        # stream): what is found does not depend on how the decoder cut its pieces.
        with memoryview(w.buf)[: end + after - origin] as view:
            if complete:
                marks = [len(h) for h in hits]
                with view[pos - origin : min(w.end, end + share) - origin] as block:
                    for ps, out in zip(sets, hits, strict=True):
                        if not ps.scan_block(block, pos, end - pos, out):
                            complete = False
                            break
                new = hits[0][marks[0] :]
                matches |= scanner._matches(
                    view, [(pid, at) for pid, at in new if pid < nlit], origin
                )
                if keys is not None:
                    blind_began = time.monotonic()
                    blind_deadline = blind_began + scanner.blind_budget_seconds - blind_seconds
                    structural = [
                        (scanner._kinds[pid - nlit], at - origin) for pid, at in new if pid >= nlit
                    ]
                    candidates += len(structural)
                    found, n = _blind.structural_findings(view, structural, keys, blind_deadline)
                    examined += n
                    structural_found += [replace(x, offset=x.offset + origin) for x in found]
                    blind_seconds += time.monotonic() - blind_began
            if checks is not None:
                blind_began = time.monotonic()
                blind_deadline = blind_began + scanner.blind_budget_seconds - blind_seconds
                checks.feed(view, origin, pos, end, regions, blind_deadline)
                blind_seconds += time.monotonic() - blind_began
        pos = end
        w.check_time()
        w.drop(pos - before)

    size = w.end
    notes = [
        f"{codec}-compressed ({compressed_size} bytes): scanned as the {size} bytes it "
        "decompresses to, read as a stream and never written out; offsets are in the "
        "decompressed core"
    ]
    if size == 0:
        notes.append("empty file")
    layout: CoreLayout | None = None
    if provisional is not None:
        layout = parse_core(head, size)  # the layout of the whole file: clipped to its size
    elif head_note is not None:
        notes.append(head_note)
    if not complete:
        notes.append(
            f"stopped after {MAX_HITS} matches: the result is INCOMPLETE (is the dump full "
            "of one secret, or are the secrets degenerate?)"
        )
    findings = scanner._suppress(matches)
    blind: BlindReport | None = None
    if checks is not None and keys is not None:
        final = (
            [_blind.Region(s.offset, s.filesz, s.vaddr) for s in layout.pieces]
            if layout is not None
            else [_blind.Region(0, size, 0)]
        )
        findings += _drop_contained(structural_found + checks.findings, findings)
        blind = BlindReport(
            scanner.blind_budget_seconds,
            tuple(keys.keys),
            candidates,
            tuple(checks.reports(final)),
            examined,
            scanner.blind_offsets,
        )
    counts = Counter(pid for pid, _ in hits[1]) if marker_set is not None else Counter()
    markers_found = {name: counts[i] for i, name in enumerate(marker_names)}
    result = scanner._result(
        path, size, layout, maps_text, findings, blind, markers_found, complete, notes, marker_set
    )
    return replace(result, seconds=time.monotonic() - began)
