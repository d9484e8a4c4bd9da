"""Scenario "blind": does blind mode find private keys it was not told, in a real core?

A copy of the shared service core gets private keys planted at random 8-byte aligned offsets
inside its PT_LOAD segments (overwriting bytes), in pages the process was using (not all-zero
pages: a key sits among live data). Blind mode then scans the copy with only the public keys:
``Scanner([], public_keys=..., blind_budget_seconds=...)``. A planted item counts as found when a
finding attributed to its key overlaps it.

The structural detectors (DER, PEM) cover the whole file in the Hyperscan pass; the mathematical
checks (RSA factor, EC scalar) share a time budget, one equal share per check (one per kind of
key, size and layout, for all the public keys of that kind and size), in file order. So each
item is also reported as *reached* or not: whether the check that can find it had got as far as
its offset when its share of the budget ran out.

The main scan uses the default workers (forked processes, the CPUs up to 4) at every offset;
the same copy is then scanned in one process (the workers' baseline) and at the likely offsets
with the default workers (``blind_offsets="likely"``), each with its time, recall and
candidates (``variants``).
"""

from __future__ import annotations

import mmap
import random
import shutil
import threading
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from benchmarks.context import Context
from benchmarks.report import ScenarioResult, Table, fmt_bytes, fmt_seconds
from signer.keys import PublicKeyType
from signer.scan import BlindCheck, Finding, Scanner
from signer.scan._elf import Segment, parse_core

NAME = "blind"
PAGE = 4096
_GAP = 64  # bytes kept between planted items

# group: (description, keys planted, the math check that can find it or None if structural)
GROUPS: dict[str, tuple[str, int, str | None]] = {
    "rsa-be": ("RSA-2048 p and q, big-endian", 4, "rsa-factor-be"),
    "rsa-le64": ("RSA-2048 p and q, little-endian 64-bit limbs", 4, "rsa-factor-le64-aligned"),
    "ec-be": ("EC P-256 private scalar, big-endian", 4, "ec-scalar-be"),
    "pkcs8-der": ("PKCS#8 DER (RSA-2048 and P-256)", 2, None),
    "pem": ("PKCS#8 PEM with BEGIN/END lines (RSA-2048 and P-256)", 2, None),
}

_Private = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass
class Item:
    key_id: str
    group: str
    part: str
    data: bytes
    offset: int = -1
    region_pos: int = -1  # position in the scanned memory (PT_LOAD bytes in file order)
    over_zeros: bool = False  # the bytes it replaced were all zero
    found: bool = False
    reached: bool = False
    representation: str = ""


def _rsa_parts(key: rsa.RSAPrivateKey, order: Literal["big", "little"]) -> list[tuple[str, bytes]]:
    nums = key.private_numbers()
    plen = (nums.public_numbers.n.bit_length() // 2 + 7) // 8
    return [("p", nums.p.to_bytes(plen, order)), ("q", nums.q.to_bytes(plen, order))]


def make_items() -> tuple[dict[str, PublicKeyType], list[Item]]:
    """Fresh keys for every group, their public keys by id, and the byte items to plant."""
    keys: dict[str, PublicKeyType] = {}
    items: list[Item] = []
    for group, (_, count, _) in GROUPS.items():
        for i in range(count):
            key_id = f"{group}-{i + 1}"
            key: _Private
            if group in ("rsa-be", "rsa-le64") or (group in ("pkcs8-der", "pem") and i % 2 == 0):
                key = rsa.generate_private_key(65537, 2048)
            else:
                key = ec.generate_private_key(ec.SECP256R1())
            keys[key_id] = key.public_key()
            parts: list[tuple[str, bytes]]
            if group == "rsa-be":
                assert isinstance(key, rsa.RSAPrivateKey)
                parts = _rsa_parts(key, "big")
            elif group == "rsa-le64":
                assert isinstance(key, rsa.RSAPrivateKey)
                parts = _rsa_parts(key, "little")
            elif group == "ec-be":
                assert isinstance(key, ec.EllipticCurvePrivateKey)
                parts = [("scalar", key.private_numbers().private_value.to_bytes(32, "big"))]
            else:
                encoding = (
                    serialization.Encoding.DER
                    if group == "pkcs8-der"
                    else (serialization.Encoding.PEM)
                )
                blob = key.private_bytes(
                    encoding, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
                parts = [(group, blob)]
            items += [Item(key_id, group, part, data) for part, data in parts]
    return keys, items


def _used_pages(mm: mmap.mmap, regions: Sequence[Segment]) -> list[tuple[int, int]]:
    """(region index, page start within it) of every page holding a non-zero byte."""
    a = np.frombuffer(mm, dtype=np.uint8)
    out: list[tuple[int, int]] = []
    for ri, seg in enumerate(regions):
        full = seg.filesz // PAGE * PAGE
        pages = a[seg.offset : seg.offset + full].reshape(-1, PAGE)
        out += [(ri, int(k) * PAGE) for k in np.flatnonzero(pages.any(axis=1))]
    del a
    return out


def plant(path: Path, items: list[Item], rng: random.Random) -> dict[str, int]:
    """Overwrites ``path`` (an ELF core) with every item at a random 8-byte aligned offset inside
    a PT_LOAD segment, in a page the process used, apart from each other."""
    with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0) as mm:
        view = memoryview(mm)
        try:
            layout = parse_core(view)
        finally:
            view.release()
        if layout is None:
            raise RuntimeError(f"{path} is not an ELF core")
        regions = [s for s in layout.segments if s.filesz]
        before = np.cumsum([0] + [s.filesz for s in regions]).tolist()
        pages = _used_pages(mm, regions)
        if not pages:
            raise RuntimeError("no non-zero page in the core's PT_LOAD segments")
        taken: list[tuple[int, int]] = []
        for item in items:
            for _ in range(10_000):
                ri, page = pages[rng.randrange(len(pages))]
                seg = regions[ri]
                pos = page + 8 * rng.randrange(PAGE // 8)
                at = seg.offset + pos
                end = at + len(item.data)
                if (
                    pos + len(item.data) <= seg.filesz
                    and at % 8 == 0
                    and (seg.vaddr + pos) % 8 == 0
                    and all(end + _GAP <= a or b + _GAP <= at for a, b in taken)
                ):
                    break
            else:
                raise RuntimeError("could not place every planted key")
            item.offset, item.region_pos = at, int(before[ri]) + pos
            item.over_zeros = not any(mm[at:end])
            mm[at:end] = item.data
            taken.append((at, end))
        mm.flush()
        return {"segments": len(regions), "used_pages": len(pages)}


def evaluate(
    items: Sequence[Item],
    findings: Sequence[Finding],
    checks: Sequence[BlindCheck],
    offsets: str = "every",
) -> list[Finding]:
    """Marks items found and reached; returns the findings that match no planted item."""
    # A check serves every key of its kind and size: its key_id joins their ids with ",".
    by_check = {(c.name, k): c for c in checks for k in c.key_id.split(",")}
    matched: set[int] = set()
    for item in items:
        end = item.offset + len(item.data)
        for k, f in enumerate(findings):
            if f.secret_id == item.key_id and f.offset < end and item.offset < f.offset + f.length:
                item.found = True
                item.representation = f.representation
                matched.add(k)
        check_name = GROUPS[item.group][2]
        if check_name == "ec-scalar-be" and offsets == "likely":
            check_name += "-aligned-or-framed"
        if check_name is None:
            item.reached = True  # structural: the Hyperscan pass covers the whole file
        else:
            c = by_check.get((check_name, item.key_id))
            item.reached = c is not None and (c.complete or item.region_pos < c.bytes_covered)
    return [f for k, f in enumerate(findings) if k not in matched]


def _pct(found: int, total: int) -> str:
    return f"{found}/{total} ({found / total:.0%})" if total else "n/a"


def run(ctx: Context) -> ScenarioResult:
    core = ctx.core()
    work = ctx.work / "blind"
    work.mkdir(parents=True, exist_ok=True)
    copy = work / "planted.core"
    rng = random.Random(ctx.seed + 1)  # noqa: S311  (placement, not secrets)
    ctx.progress("blind: generating keys, planting them in a copy of the core ...")
    keys, items = make_items()
    shutil.copyfile(core.path, copy)
    placed = plant(copy, items, rng)

    scanner = Scanner([], public_keys=keys, blind_budget_seconds=ctx.blind_budget_seconds)
    ctx.progress(
        f"blind: {len(keys)} public keys, {len(items)} items planted; scanning with a "
        f"{ctx.blind_budget_seconds:g}s budget ..."
    )
    result = scanner.scan(copy)
    assert result.blind is not None
    checks = result.blind.checks
    stray = evaluate(items, result.findings, checks)
    found_now = sum(i.found for i in items)
    ctx.progress(f"blind: {found_now}/{len(items)} found in {result.seconds:.1f}s")

    groups: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        groups[item.group].append(item)
    per_group: dict[str, Any] = {}
    rows = []
    for group, members in groups.items():
        what, count, check = GROUPS[group]
        found = sum(i.found for i in members)
        reached = [i for i in members if i.reached]
        keys_found = len({i.key_id for i in members if i.found})
        per_group[group] = {
            "what": what,
            "keys": count,
            "items": len(members),
            "found": found,
            "recall": round(found / len(members), 3),
            "keys_recovered": keys_found,
            "reached": len(reached),
            "found_of_reached": sum(i.found for i in reached),
            "check": check or "structural (whole file)",
            "found_as": sorted({i.representation for i in members if i.found}),
        }
        rows.append(
            [
                group,
                what,
                _pct(found, len(members)),
                f"{keys_found}/{count}",
                _pct(sum(i.found for i in reached), len(reached)),
                check or "structural",
            ]
        )
    total_found = sum(i.found for i in items)
    reached_all = [i for i in items if i.reached]
    rows.append(
        [
            "**all**",
            "",
            _pct(total_found, len(items)),
            f"{len({i.key_id for i in items if i.found})}/{len(keys)}",
            _pct(sum(i.found for i in reached_all), len(reached_all)),
            "",
        ]
    )
    covered = sum(c.bytes_covered for c in checks)
    total = sum(c.bytes_total for c in checks)
    complete = sum(c.complete for c in checks)
    candidates = sum(c.candidates for c in checks)
    kinds: dict[str, list[BlindCheck]] = defaultdict(list)
    for c in checks:
        kinds[c.name].append(c)
    by_kind = {
        name: {
            "checks": len(cs),
            "complete": sum(c.complete for c in cs),
            "coverage": round(sum(c.bytes_covered for c in cs) / sum(c.bytes_total for c in cs), 4),
            "candidates_verified": sum(c.candidates for c in cs),
            "seconds": round(sum(c.seconds for c in cs), 2),
        }
        for name, cs in kinds.items()
    }
    data: dict[str, Any] = {
        "budget_seconds": ctx.blind_budget_seconds,
        "scan_seconds": round(result.seconds, 2),
        "compile_seconds": round(scanner.compile_seconds, 3),
        "core_bytes": result.size,
        "public_keys": len(keys),
        "planted_items": len(items),
        "found_items": total_found,
        "recall": round(total_found / len(items), 3),
        "reached_items": len(reached_all),
        "recall_of_reached": (
            round(sum(i.found for i in reached_all) / len(reached_all), 3) if reached_all else None
        ),
        "groups": per_group,
        "placement": {**placed, "items_over_zero_bytes": sum(i.over_zeros for i in items)},
        "checks": {
            "count": len(checks),
            "complete": complete,
            "coverage": round(covered / total, 4) if total else None,
            "candidates_verified": candidates,
            "seconds": round(sum(c.seconds for c in checks), 2),
            "by_kind": by_kind,
            "per_check": [c.to_dict() for c in checks],
        },
        "structural_candidates": result.blind.structural_candidates,
        "unmatched_findings": [
            {"secret_id": f.secret_id, "representation": f.representation, "offset": f.offset}
            for f in stray[:20]
        ],
        "unmatched_findings_count": len(stray),
    }
    notes = [
        f"Blind: {len(items)} items of {len(keys)} private keys planted at random 8-byte aligned "
        f"offsets in used pages of the PT_LOAD segments of a copy of the core "
        f"({fmt_bytes(result.size)}); scanned with their public keys only, budget "
        f"{ctx.blind_budget_seconds:g}s; took {result.seconds:.1f}s "
        f"(compile {scanner.compile_seconds:.2f}s).",
        f"Math checks: {len(checks)} (one per kind of key, size and layout), {complete} complete, "
        f"{covered / total if total else 0:.1%} of their memory covered; {candidates:,} "
        "candidate windows verified. The budget is split evenly between checks, in the order "
        "of the table below; each works through the memory in file order.",
        "Reached = the check able to find the item had got past its offset within its share "
        "of the budget (structural detectors always reach). Findings not on a planted item: "
        f"{len(stray)}.",
    ]
    table = Table(
        f"Blind mode recall ({fmt_seconds(result.seconds)} s, budget "
        f"{ctx.blind_budget_seconds:g} s)",
        ["group", "what", "items found", "keys recovered", "found of reached", "found by"],
        rows,
    )
    check_table = Table(
        "Blind mode math checks within the budget",
        ["check", "checks", "complete", "memory covered", "candidates verified", "seconds"],
        [
            [
                name,
                str(k["checks"]),
                str(k["complete"]),
                f"{k['coverage']:.1%}",
                f"{k['candidates_verified']:,}",
                fmt_seconds(k["seconds"]),
            ]
            for name, k in by_kind.items()
        ],
    )
    # The same copy scanned again: in one process (the baseline of the workers), and at the
    # likely offsets only (what the dump gate may be set to; the planted items are all
    # 8-aligned, so recall must not change).
    nonzero = placed["used_pages"] * PAGE
    data["nonzero_bytes"] = nonzero
    data["threads"] = threading.active_count()  # workers are forked only from one thread
    data["workers"] = scanner.blind_workers if data["threads"] == 1 else 1
    data["nonzero_mb_per_s"] = round(nonzero / 1e6 / result.seconds, 2)
    variants: dict[str, Any] = {}
    for label, offsets, workers in (("every-1-worker", "every", 1), ("likely", "likely", None)):
        other = Scanner(
            [],
            public_keys=keys,
            blind_budget_seconds=ctx.blind_budget_seconds,
            blind_offsets=offsets,  # type: ignore[arg-type]
            blind_workers=workers,
        )
        ctx.progress(f"blind: again, {label} ...")
        r2 = other.scan(copy)
        assert r2.blind is not None
        again = [replace(i, found=False, reached=False) for i in items]
        stray2 = evaluate(again, r2.findings, r2.blind.checks, offsets)
        found2 = sum(i.found for i in again)
        ctx.progress(f"blind: {label}: {found2}/{len(items)} found in {r2.seconds:.1f}s")
        variants[label] = {
            "offsets": offsets,
            "workers": other.blind_workers if data["threads"] == 1 else 1,
            "scan_seconds": round(r2.seconds, 2),
            "found_items": found2,
            "recall": round(found2 / len(items), 3),
            "complete": r2.blind.complete,
            "candidates_verified": sum(c.candidates for c in r2.blind.checks),
            "unmatched_findings_count": len(stray2),
            "nonzero_mb_per_s": round(nonzero / 1e6 / r2.seconds, 2),
            "per_check": [c.to_dict() for c in r2.blind.checks],
        }
        notes.append(
            f"Again {label} ({offsets} offsets, {variants[label]['workers']} process(es)): "
            f"{r2.seconds:.1f}s ({nonzero / 1e6 / r2.seconds:.2f} MB/s of the "
            f"{nonzero / 2**20:.1f} MiB in used pages), {found2}/{len(items)} found, "
            f"{variants[label]['candidates_verified']:,} candidates verified, {len(stray2)} "
            "findings not on a planted item."
        )
    data["variants"] = variants
    data["ratio_workers_vs_one"] = round(
        variants["every-1-worker"]["scan_seconds"] / result.seconds, 2
    )
    data["ratio_likely_vs_every_one_worker"] = round(
        variants["every-1-worker"]["scan_seconds"] / variants["likely"]["scan_seconds"], 2
    )
    notes.insert(
        0,
        f"The main scan: every offset, {data['workers']} process(es), {result.seconds:.1f}s "
        f"({data['nonzero_mb_per_s']} MB/s of memory in used pages).",
    )
    copy.unlink(missing_ok=True)
    return ScenarioResult(NAME, data, {}, [table, check_table], notes)
