"""Scenario "scan": the dump scanner against ``grep -F`` and YARA, same run, same file, same
literals.

The literals are the ones :class:`signer.scan.Scanner` compiles for the lab's known secrets:
every ``min_fragment``-byte window of every representation (:mod:`signer.scan._patterns`).
``grep -F -f`` reads one pattern per line, so literals containing a newline cannot be given to
it: the comparison uses the literals without ``\\n`` for all three engines (our engine is
measured directly on them, :class:`signer.scan._engine.PatternSet`, as the Scanner API takes
secrets, not patterns). The Scanner end to end, with all its patterns, is measured too.

Two files: the core as ``gcore`` wrote it, and its non-zero 4 KiB pages only (a core of a mostly
idle process is mostly zero pages, which says more about how an engine skips zeros than about
how it searches). Every engine scans each file ``runs`` times, engines interleaved, page cache
warm; reported: median and minimum, throughput from the median.

The Scanner end to end also scans the core compressed as systemd-coredump stores it (by the
``zstd``, ``lz4`` and ``xz`` commands): throughput in MB/s of the uncompressed core, beside the
plain file's.
"""

from __future__ import annotations

import importlib
import mmap
import os
import random
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from benchmarks.context import Context
from benchmarks.report import (
    ScenarioResult,
    Table,
    fmt_bytes,
    fmt_rate,
    fmt_ratio,
    fmt_seconds,
)
from benchmarks.timing import Timing, rate_mb_s, timed
from signer.scan import Scanner, Secret
from signer.scan._engine import PatternSet, scan_chunks
from signer.scan._patterns import representations
from signer.scan._scanner import DEFAULT_CHUNK

NAME = "scan"
MIN_FRAGMENT = 16  # the Scanner's default
PAGE = 4096
YARA_STRINGS_PER_RULE = 10_000  # YR_MAX_STRINGS_PER_RULE of libyara 4.x
SANITY_PATTERNS = 256
COMPRESSORS = {"zstd": ["zstd", "-q", "-3"], "lz4": ["lz4", "-q", "-1"], "xz": ["xz", "-q", "-1"]}


def literal_patterns(secrets: Sequence[Secret], min_fragment: int = MIN_FRAGMENT) -> list[bytes]:
    """The distinct literals ``Scanner(secrets, min_fragment)`` compiles, in its order."""
    table: dict[bytes, None] = {}
    for i, secret in enumerate(secrets):
        for rep in representations(secret, i, min_fragment):
            for at in rep.starts:
                table.setdefault(rep.data[at : at + rep.window], None)
    return list(table)


# --- engines ----------------------------------------------------------------------------------


class Engine(Protocol):
    name: str
    what: str
    patterns: int

    def compile(self) -> None: ...

    def scan(self, path: Path) -> int:
        """Matches, as this engine counts them."""
        ...


class Grep:
    name = "grep"

    def __init__(self, patterns: Sequence[bytes], work: Path) -> None:
        self.patterns = len(patterns)
        self.file = work / "patterns.txt"
        self.file.write_bytes(b"".join(p + b"\n" for p in patterns))
        self.empty = work / "empty"
        self.empty.write_bytes(b"")
        self.env = {**os.environ, "LC_ALL": "C"}
        self.what = "grep -F -a -c -f PATTERNS FILE (LC_ALL=C); counts matching lines"

    def compile(self) -> None:
        """Nothing to keep: grep builds its matcher in every run. Running it on an empty file
        measures that part (it is included in every scan time)."""
        self.scan(self.empty)

    def scan(self, path: Path) -> int:
        r = subprocess.run(
            ["grep", "-F", "-a", "-c", "-f", str(self.file), str(path)],
            capture_output=True,
            env=self.env,
            check=False,
        )
        if r.returncode not in (0, 1):  # 1: no line matched
            raise RuntimeError(f"grep failed ({r.returncode}): {r.stderr.decode()[-300:]}")
        return int(r.stdout)


def _yara() -> Any:
    return importlib.import_module("yara")


def yara_source(patterns: Sequence[bytes], per_rule: int = YARA_STRINGS_PER_RULE) -> str:
    """Rules ``r0``, ``r1``, ... of at most ``per_rule`` hex strings each, any of them."""
    rules = []
    for k in range(0, len(patterns), per_rule):
        strings = "\n".join(
            f"    $s{i} = {{ {p.hex(' ')} }}" for i, p in enumerate(patterns[k : k + per_rule])
        )
        rules.append(
            f"rule r{k // per_rule}\n{{\n  strings:\n{strings}\n  condition:\n    any of them\n}}"
        )
    return "\n\n".join(rules) + "\n"


class Yara:
    name = "yara"

    def __init__(self, patterns: Sequence[bytes]) -> None:
        self.patterns = len(patterns)
        self.source = yara_source(patterns)
        self.rules: Any = None
        self.what = (
            f"yara-python {_yara().__version__}: hex strings, {YARA_STRINGS_PER_RULE} per rule, "
            "rules.match(path); counts matched strings"
        )

    def compile(self) -> None:
        self.rules = _yara().compile(source=self.source)

    def matched_ids(self, path: Path) -> set[int]:
        out: set[int] = set()
        for match in self.rules.match(str(path)):
            base = int(match.rule[1:]) * YARA_STRINGS_PER_RULE
            out.update(base + int(s.identifier[2:]) for s in match.strings)
        return out

    def scan(self, path: Path) -> int:
        return len(self.matched_ids(path))


def yara_accepts(patterns: Sequence[bytes]) -> int:
    """The largest prefix of ``patterns`` YARA compiles (all of them, normally)."""
    yara = _yara()
    n = len(patterns)
    while n:
        try:
            yara.compile(source=yara_source(patterns[:n]))
            return n
        except yara.Error:
            n //= 2
    return 0


def _hits(ps: PatternSet, path: Path) -> list[tuple[int, int]]:
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        if hasattr(mmap, "MADV_SEQUENTIAL"):
            mm.madvise(mmap.MADV_SEQUENTIAL)
        view = memoryview(mm)
        try:
            hits, complete = scan_chunks(view, [ps], DEFAULT_CHUNK)
        finally:
            view.release()
    if not complete:
        raise RuntimeError(f"{path}: match limit reached")
    return hits[0]


class OurEngine:
    name = "scanner-engine"

    def __init__(self, patterns: Sequence[bytes]) -> None:
        self.literals = list(patterns)
        self.patterns = len(patterns)
        self.set: PatternSet | None = None
        self.what = (
            "signer.scan engine (Hyperscan block mode, 64 MiB chunks over mmap); counts hits"
        )

    def compile(self) -> None:
        self.set = PatternSet(self.literals)

    def matched_ids(self, path: Path) -> set[int]:
        assert self.set is not None
        return {pid for pid, _ in _hits(self.set, path)}

    def scan(self, path: Path) -> int:
        assert self.set is not None
        return len(_hits(self.set, path))


class EndToEnd:
    name = "scanner-e2e"

    def __init__(self, secrets: Sequence[Secret]) -> None:
        self.secrets = list(secrets)
        self.patterns = 0
        self.scanner: Scanner | None = None
        self.what = "Scanner(secrets).scan(path): every pattern, ELF layout, findings"

    def compile(self) -> None:
        self.scanner = Scanner(self.secrets, MIN_FRAGMENT)
        self.patterns = self.scanner.pattern_count

    def scan(self, path: Path) -> int:
        assert self.scanner is not None
        return len(self.scanner.scan(path).findings)


# --- files ------------------------------------------------------------------------------------


def zero_fraction(path: Path) -> float:
    a = np.memmap(path, dtype=np.uint8, mode="r")
    total = len(a)
    nonzero = sum(int(np.count_nonzero(a[i : i + (64 << 20)])) for i in range(0, total, 64 << 20))
    return 1 - nonzero / total if total else 0.0


def nonzero_pages(src: Path, out: Path) -> int:
    """Writes the 4 KiB pages of ``src`` that are not all zero, in order; returns its size."""
    a = np.memmap(src, dtype=np.uint8, mode="r")
    step = (64 << 20) // PAGE * PAGE
    with open(out, "wb") as f:
        for i in range(0, len(a), step):
            block = np.asarray(a[i : i + step])
            full = len(block) // PAGE * PAGE
            pages = block[:full].reshape(-1, PAGE)
            f.write(pages[pages.any(axis=1)].tobytes())
            if full < len(block) and block[full:].any():
                f.write(block[full:].tobytes())
    return out.stat().st_size


def warm(path: Path) -> None:
    """Reads the file once so every engine finds it in the page cache."""
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def sanity_file(patterns: Sequence[bytes], out: Path, rng: random.Random) -> list[int]:
    """A small file with a sample of the patterns planted, one per line in random filler
    without newlines (ones with NUL and CR among them). Returns the planted indices."""
    special = [i for i, p in enumerate(patterns) if b"\0" in p or b"\r" in p]
    chosen = set(rng.sample(special, min(len(special), SANITY_PATTERNS // 4)))
    rest = [i for i in range(len(patterns)) if i not in chosen]
    chosen.update(rng.sample(rest, min(len(rest), SANITY_PATTERNS - len(chosen))))
    planted = sorted(chosen)

    def filler() -> bytes:
        return rng.randbytes(48).replace(b"\n", b"\x01")

    out.write_bytes(b"".join(filler() + patterns[i] + filler() + b"\n" for i in planted))
    return planted


# --- the scenario -----------------------------------------------------------------------------


def run(ctx: Context) -> ScenarioResult:
    core = ctx.core()
    work = ctx.work / "scan"
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(ctx.seed)  # noqa: S311  (sampling, not secrets)

    every = literal_patterns(core.secrets)
    subset = [p for p in every if b"\n" not in p]
    accepted = yara_accepts(subset)
    if accepted < len(subset):
        ctx.progress(f"yara accepts only {accepted} of {len(subset)} patterns: using those")
        subset = subset[:accepted]
    pattern_info = {
        "scanner_total": len(every),
        "with_newline": sum(b"\n" in p for p in every),
        "with_cr": sum(b"\r" in p for p in subset),
        "with_nul": sum(b"\0" in p for p in subset),
        "compared": len(subset),
        "yara_limited": accepted < len([p for p in every if b"\n" not in p]),
        "min_length": min(map(len, subset)),
        "max_length": max(map(len, subset)),
        "yara_strings_per_rule": YARA_STRINGS_PER_RULE,
        "yara_rules": -(-len(subset) // YARA_STRINGS_PER_RULE),
    }
    ctx.progress(f"patterns: {len(every)} in the Scanner, {len(subset)} without a newline compared")

    dense = work / "core.nonzero-pages"
    files = {"core": core.path, "nonzero-pages": dense}
    nonzero_pages(core.path, dense)
    file_info: dict[str, dict[str, Any]] = {
        name: {"size_bytes": path.stat().st_size, "zero_fraction": round(zero_fraction(path), 4)}
        for name, path in files.items()
    }

    grep, yara, ours = Grep(subset, work), Yara(subset), OurEngine(subset)
    e2e = EndToEnd(core.secrets)
    engines: list[Engine] = [grep, yara, ours, e2e]
    compile_s: dict[str, float] = {}
    for e in engines:
        compile_s[e.name], _ = timed(e.compile)
        ctx.progress(f"{e.name}: compiled {e.patterns} patterns in {compile_s[e.name]:.2f}s")

    times = {(e.name, f): Timing() for e in engines for f in files}
    matches: dict[tuple[str, str], set[int]] = {k: set() for k in times}
    for fname, path in files.items():
        warm(path)
        for r in range(ctx.runs):
            for e in engines:
                seconds, found = _timed_scan(e, path)
                times[(e.name, fname)].runs.append(seconds)
                matches[(e.name, fname)].add(found)
            ctx.progress(
                f"{fname} run {r + 1}/{ctx.runs}: "
                + ", ".join(f"{e.name} {times[(e.name, fname)].runs[-1]:.2f}s" for e in engines)
            )

    compressed = compressed_scans(e2e, core.path, work, ctx.runs)
    ctx.progress(
        "compressed: " + ", ".join(f"{c} {d['mb_per_s']} MB/s" for c, d in compressed.items())
    )

    # Do the engines see the same patterns? A sample planted in a small file.
    sample = work / "sanity.bin"
    planted = sanity_file(subset, sample, rng)
    lines = len(planted)
    want = set(planted)
    sanity = {
        "planted": len(planted),
        "planted_with_nul_or_cr": sum(b"\0" in subset[i] or b"\r" in subset[i] for i in planted),
        "grep_lines": grep.scan(sample),
        "yara_missed": len(want - yara.matched_ids(sample)),
        "scanner_engine_missed": len(want - ours.matched_ids(sample)),
    }
    sanity["ok"] = (
        sanity["grep_lines"] == lines
        and sanity["yara_missed"] == 0
        and sanity["scanner_engine_missed"] == 0
    )

    def rate(engine: str, fname: str) -> float | None:
        return rate_mb_s(file_info[fname]["size_bytes"], times[(engine, fname)].median)

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a is not None and b else None

    engine_data: dict[str, Any] = {}
    for e in engines:
        engine_data[e.name] = {
            "what": e.what,
            "patterns": e.patterns,
            "compile_seconds": round(compile_s[e.name], 4),
            "files": {
                f: {
                    "seconds": times[(e.name, f)].to_dict(),
                    "mb_per_s": _round(rate(e.name, f)),
                    "matches": sorted(matches[(e.name, f)]),
                }
                for f in files
            },
        }
    engine_data["grep"]["compile_note"] = (
        "grep on an empty file with the same patterns: its matcher set-up, paid in every scan"
    )

    ours_name = "scanner-engine"
    ratios = {
        "scanner_vs_grep": ratio(rate(ours_name, "core"), rate("grep", "core")),
        "scanner_vs_yara": ratio(rate(ours_name, "core"), rate("yara", "core")),
        "scanner_vs_grep_nonzero_pages": ratio(
            rate(ours_name, "nonzero-pages"), rate("grep", "nonzero-pages")
        ),
        "scanner_vs_yara_nonzero_pages": ratio(
            rate(ours_name, "nonzero-pages"), rate("yara", "nonzero-pages")
        ),
        "scanner_e2e_vs_grep": ratio(rate("scanner-e2e", "core"), rate("grep", "core")),
        "scanner_e2e_vs_yara": ratio(rate("scanner-e2e", "core"), rate("yara", "core")),
        **{
            f"scanner_e2e_{codec}_vs_plain": ratio(d["mb_per_s"], rate("scanner-e2e", "core"))
            for codec, d in compressed.items()
        },
    }

    rows = []
    for f in files:
        for e in engines:
            t = times[(e.name, f)]
            rows.append(
                [
                    f"{f} ({fmt_bytes(file_info[f]['size_bytes'])})",
                    e.name,
                    f"{e.patterns:,}",
                    fmt_seconds(compile_s[e.name]),
                    fmt_seconds(t.median),
                    fmt_seconds(t.min),
                    fmt_rate(rate(e.name, f)),
                    fmt_ratio(ratio(rate(ours_name, f), rate(e.name, f))),
                ]
            )
    for codec, d in compressed.items():
        rows.append(
            [
                f"core.{codec} ({fmt_bytes(d['compressed_bytes'])})",
                e2e.name,
                f"{e2e.patterns:,}",
                fmt_seconds(compile_s[e2e.name]),
                fmt_seconds(d["seconds"]["median"]),
                fmt_seconds(d["seconds"]["min"]),
                fmt_rate(d["mb_per_s"]),
                fmt_ratio(ratio(rate(ours_name, "core"), d["mb_per_s"])),
            ]
        )
    table = Table(
        f"Scan: same literals, same file, {ctx.runs} runs each (median; MB = 10^6 bytes)",
        [
            "file",
            "engine",
            "patterns",
            "compile s",
            "median s",
            "min s",
            "MB/s",
            "scanner-engine ÷ it",
        ],
        rows,
    )
    zf = file_info["core"]["zero_fraction"]
    notes = [
        f"Core: gcore of the real service after {core.signed} signatures in "
        f"{core.load_seconds:g}s under load; {fmt_bytes(core.size)}, {zf:.1%} zero bytes; "
        f"its non-zero 4 KiB pages: {fmt_bytes(file_info['nonzero-pages']['size_bytes'])}.",
        f"Patterns: the Scanner compiles {len(every):,} literals for the lab's "
        f"{len(core.secrets)} secrets; {pattern_info['with_newline']:,} contain a newline "
        f"(grep -F cannot take them), so all three engines are compared on the other "
        f"{len(subset):,} ({pattern_info['with_nul']:,} with NUL, {pattern_info['with_cr']:,} "
        "with CR). scanner-e2e is the whole Scanner with all its patterns.",
        "core.zst/.lz4/.xz: the core compressed by the zstd -3, lz4 -1 and xz -1 commands, "
        "scanned by the Scanner as a stream (never decompressed to disk); MB/s of the "
        "uncompressed core.",
        "compile s: grep has no separate compile; its figure is a run on an empty file, and "
        "that set-up is inside each of its scan times. Ours and yara compile once.",
        f"Sanity: {len(planted)} of the compared patterns planted in a small file: grep counted "
        f"{sanity['grep_lines']}/{lines} lines, yara missed {sanity['yara_missed']}, "
        f"scanner-engine missed {sanity['scanner_engine_missed']}"
        + (" (all engines see the same patterns)." if sanity["ok"] else " (ENGINES DISAGREE)."),
        "All engines run single-threaded. Matches on the core (grep lines / yara strings / "
        "engine hits / Scanner findings): "
        + " / ".join(",".join(map(str, sorted(matches[(e.name, "core")]))) for e in engines)
        + (
            ": the service holds none of the known secrets, so the timed case is the normal "
            "one, a clean dump."
            if all(matches[(e.name, "core")] == {0} for e in engines)
            else "."
        ),
    ]
    data = {
        "runs": ctx.runs,
        "core": {**core.to_dict(), **file_info["core"]},
        "files": file_info,
        "patterns": pattern_info,
        "engines": engine_data,
        "compressed": compressed,
        "sanity": sanity,
    }
    for p in (dense, sample, work / "patterns.txt", work / "empty"):
        p.unlink(missing_ok=True)
    return ScenarioResult(NAME, data, ratios, [table], notes)


def compressed_scans(
    engine: EndToEnd, core: Path, work: Path, runs: int
) -> dict[str, dict[str, Any]]:
    """The Scanner end to end on the core compressed by each codec's command (as
    systemd-coredump stores cores): seconds, and MB/s of the uncompressed core."""
    out: dict[str, dict[str, Any]] = {}
    for codec, argv in COMPRESSORS.items():
        path = work / f"core.{codec}"
        with open(core, "rb") as src, open(path, "wb") as dst:
            subprocess.run([*argv, "-c"], stdin=src, stdout=dst, check=True)
        warm(path)
        t = Timing([_timed_scan(engine, path)[0] for _ in range(runs)])
        out[codec] = {
            "compressed_bytes": path.stat().st_size,
            "seconds": t.to_dict(),
            "mb_per_s": _round(rate_mb_s(core.stat().st_size, t.median)),
        }
        path.unlink()
    return out


def _timed_scan(engine: Engine, path: Path) -> tuple[float, int]:
    began = time.perf_counter()
    found = engine.scan(path)
    return time.perf_counter() - began, found


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)
