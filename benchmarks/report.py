"""The benchmark report: one JSON document for machines, one Markdown page for people.

Pure: scenarios hand in their raw numbers, ratios and tables; nothing here measures anything.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = 1


@dataclass(frozen=True)
class Table:
    title: str
    header: Sequence[str]
    rows: Sequence[Sequence[str]]

    def markdown(self) -> str:
        lines = [
            f"### {self.title}",
            "",
            "| " + " | ".join(self.header) + " |",
            "|" + "|".join("---" for _ in self.header) + "|",
        ]
        for row in self.rows:
            if len(row) != len(self.header):
                raise ValueError(f"table {self.title!r}: row {list(row)} does not fit the header")
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)


@dataclass
class ScenarioResult:
    """What one scenario measured. ``data`` is JSON-ready raw numbers; ``ratios`` are the
    headline figures (ours / baseline, higher is better for us), merged into the report's top
    level; ``tables`` and ``notes`` go to the Markdown page."""

    name: str
    data: dict[str, Any]
    ratios: dict[str, float | None] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # Headline figures that are not ratios (e.g. p99_ms_at_half_peak): top level of the JSON.
    figures: dict[str, float | None] = field(default_factory=dict)


def build(
    results: Sequence[ScenarioResult],
    machine: Mapping[str, Any],
    generated: str,
    seconds: float,
) -> dict[str, Any]:
    """The JSON document: ``ratios`` of every scenario on top, raw numbers per scenario."""
    ratios: dict[str, float | None] = {}
    figures: dict[str, float | None] = {}
    scenarios: dict[str, Any] = {}
    for r in results:
        if r.name in scenarios:
            raise ValueError(f"scenario {r.name!r} reported twice")
        for key, value in r.ratios.items():
            if key in ratios:
                raise ValueError(f"ratio {key!r} reported by two scenarios")
            ratios[key] = _finite(value)
        for key, value in r.figures.items():
            if key in figures:
                raise ValueError(f"figure {key!r} reported by two scenarios")
            figures[key] = _finite(value)
        scenarios[r.name] = {**r.data, "notes": list(r.notes)}
    return {
        "schema": SCHEMA,
        "generated": generated,
        "seconds": round(seconds, 1),
        "machine": dict(machine),
        "ratios": ratios,
        **figures,
        "scenarios": scenarios,
    }


def _finite(value: float | None) -> float | None:
    if value is None or not math.isfinite(value):
        return None
    return round(value, 3)


def markdown(results: Sequence[ScenarioResult], doc: Mapping[str, Any]) -> str:
    m = doc["machine"]
    out = [
        f"## Benchmark run {doc['generated']}",
        "",
        f"{m.get('cpu_model', '?')}, {m.get('nproc', '?')} cores available, "
        f"{m.get('memory_gib', '?')} GiB; Python {m.get('python', '?')}; "
        f"run took {doc['seconds']} s.",
    ]
    if doc["ratios"]:
        out += [
            "",
            "### Ratios (ours / baseline, same run; > 1 means ours is faster)",
            "",
            "| ratio | value |",
            "|---|---|",
        ]
        out += [f"| `{k}` | {fmt_ratio(v)} |" for k, v in doc["ratios"].items()]
    for r in results:
        for t in r.tables:
            out += ["", t.markdown()]
        if r.notes:
            out += [""] + [f"* {n}" for n in r.notes]
    return "\n".join(out) + "\n"


def write(
    out_dir: Path,
    results: Sequence[ScenarioResult],
    machine: Mapping[str, Any],
    generated: str,
    seconds: float,
) -> tuple[Path, Path, str]:
    """Writes ``latest.json`` and ``latest.md`` in ``out_dir``; returns both paths and the
    Markdown text."""
    doc = build(results, machine, generated, seconds)
    text = markdown(results, doc)
    out_dir.mkdir(parents=True, exist_ok=True)
    js, md = out_dir / "latest.json", out_dir / "latest.md"
    js.write_text(json.dumps(doc, indent=2) + "\n")
    md.write_text(text)
    return js, md, text


# --- formatting helpers for the scenarios' tables ---------------------------------------------


def fmt_ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def fmt_seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def fmt_rate(value: float | None) -> str:
    """MB/s (10^6 bytes per second)."""
    return "n/a" if value is None else f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_bytes(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"
