"""The multi-pattern search: one Hyperscan block-mode database, fed a file in overlapping chunks.

Literals are compiled as regular expressions of ``\\xNN`` escapes, not with Hyperscan's literal
API: python-hyperscan 0.9 passes literal patterns to ``hs_compile_lit_multi`` with ``strlen``
lengths, so a literal stops at its first NUL byte, and binary key material is full of them.
Hyperscan recognises escaped literals as literals and compiles and scans them as fast.

Chunks overlap by (longest pattern - 1) bytes and a match is kept only by the chunk it starts in,
so a match across a chunk boundary is reported exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import hyperscan

_ESCAPED = [bytes([b]) if bytes([b]).isalnum() and b < 0x80 else b"\\x%02x" % b for b in range(256)]

MAX_HITS = 250_000
"""Matches kept per scan; beyond it the result says it is incomplete instead of eating memory.
Each match costs up to about 800 bytes until the findings are made (a dump of scattered
distinct fragments, each its own finding, is the worst case): 250000 keep a scan's own memory
under 200 MiB (tests/unit/scan/test_hostile_cores.py holds ``signer scan`` under 384 MiB). It
was 4000000, which let a dump shaped to be full of one secret's fragments take 3 GiB. A key
present whole 1000 times in a dump still fits (a 256-byte component is 241 window matches)."""


def escape(literal: bytes) -> bytes:
    """A Hyperscan expression that matches exactly ``literal`` (NUL bytes included)."""
    return b"".join(map(_ESCAPED.__getitem__, literal))


class PatternSet:
    """Literals (ids ``0..len(literals)-1``, start = end - length) and regular expressions (the
    next ids, compiled with leftmost start of match, each with a bound on its match length)."""

    def __init__(
        self, literals: Sequence[bytes], regexes: Sequence[tuple[bytes, int]] = ()
    ) -> None:
        if not literals and not regexes:
            raise ValueError("a pattern set needs at least one pattern")
        self.count = len(literals) + len(regexes)
        self._lengths = [len(x) for x in literals]
        self._nlit = len(literals)
        self.max_length = max(self._lengths + [n for _, n in regexes])
        expressions = [escape(x) for x in literals] + [r for r, _ in regexes]
        flags = [0] * len(literals) + [
            hyperscan.HS_FLAG_SOM_LEFTMOST | hyperscan.HS_FLAG_DOTALL
        ] * len(regexes)
        self._db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        self._db.compile(
            expressions=expressions,
            ids=list(range(self.count)),
            elements=self.count,
            flags=flags,
        )
        # Whether some pattern matches inside a run of NUL bytes: a sparse file's holes must
        # then be searched too (otherwise they cannot hold a match and are skipped).
        found: list[tuple[int, int]] = []
        zeros = memoryview(bytes(2 * self.max_length))
        self.scan_block(zeros, 0, len(zeros), found)
        self.matches_zeros = bool(found)

    def scan_block(
        self, block: memoryview, base: int, own: int, out: list[tuple[int, int]]
    ) -> bool:
        """Appends ``(pattern id, file offset)`` for matches starting in ``block[:own]``;
        False when the match limit was reached."""
        lengths, nlit, append = self._lengths, self._nlit, out.append

        def on_match(pid: int, start: int, end: int, flags: int, ctx: object) -> bool | None:
            if pid < nlit:
                start = end - lengths[pid]
            if start < own:
                append((pid, base + start))
                if len(out) >= MAX_HITS:
                    return True  # stop: the caller reports the scan as incomplete
            return None

        try:
            # hyperscan takes any contiguous buffer; its stub says str/bytes.
            self._db.scan(cast(bytes, block), match_event_handler=on_match)
        except hyperscan.ScanTerminated:
            return False
        return len(out) < MAX_HITS


def overlap(sets: Sequence[PatternSet]) -> int:
    """Bytes a chunk must share with the next so no match is cut: the longest match, less one."""
    return max(s.max_length for s in sets) - 1 if sets else 0


def scan_chunks(
    view: memoryview,
    sets: Sequence[PatternSet],
    chunk_size: int,
    ranges: Sequence[tuple[int, int]] | None = None,
) -> tuple[list[list[tuple[int, int]]], bool]:
    """Every match of every set in ``view``, per set; and whether the scan was complete.

    ``ranges``: sorted, disjoint ``(start, end)`` parts of ``view`` to search (the rest is
    holes of a sparse file); each match found lies wholly inside one of them."""
    hits: list[list[tuple[int, int]]] = [[] for _ in sets]
    if not sets:
        return hits, True
    share = overlap(sets)
    for start, end in [(0, len(view))] if ranges is None else ranges:
        pos = start
        while pos < end:
            own = min(chunk_size, end - pos)
            with view[pos : min(end, pos + own + share)] as block:
                for ps, out in zip(sets, hits, strict=True):
                    if not ps.scan_block(block, pos, own, out):
                        return hits, False
            pos += own
    return hits, True
