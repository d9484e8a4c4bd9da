"""benchmarks.report: the report writer, given made-up numbers (nothing is measured here)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from benchmarks import report
from benchmarks.report import ScenarioResult, Table

MACHINE = {"cpu_model": "Test CPU", "nproc": 2, "memory_gib": 4.0, "python": "3.11"}


def _scan() -> ScenarioResult:
    return ScenarioResult(
        "scan",
        {"core": {"size_bytes": 300 << 20}, "patterns": {"compared": 1000, "scanner_total": 1100}},
        {"scanner_vs_grep": 41.23456, "scanner_vs_yara": 9.87654},
        [Table("Scan", ["engine", "MB/s"], [["grep", "85"], ["scanner-engine", "7,600"]])],
        ["a note"],
    )


def _blind() -> ScenarioResult:
    return ScenarioResult("blind", {"recall": 0.75, "planted_items": 4})


def test_json_has_ratios_on_top_and_raw_numbers_per_scenario(tmp_path: Path) -> None:
    js, md, text = report.write(
        tmp_path, [_scan(), _blind()], MACHINE, "2024-01-01T00:00:00Z", 12.34
    )
    doc = json.loads(js.read_text())
    assert doc["ratios"]["scanner_vs_grep"] == pytest.approx(41.235)
    assert doc["ratios"]["scanner_vs_yara"] == pytest.approx(9.877)
    assert doc["scenarios"]["scan"]["core"]["size_bytes"] == 300 << 20
    assert doc["scenarios"]["scan"]["notes"] == ["a note"]
    assert doc["scenarios"]["blind"]["recall"] == 0.75
    assert doc["machine"]["nproc"] == 2
    assert doc["seconds"] == 12.3
    assert md.read_text() == text


def test_markdown_has_the_ratios_and_every_table(tmp_path: Path) -> None:
    _, _, text = report.write(tmp_path, [_scan()], MACHINE, "2024-01-01T00:00:00Z", 1.0)
    assert "| `scanner_vs_grep` | 41.23x |" in text
    assert "| scanner-engine | 7,600 |" in text
    assert "Test CPU, 2 cores" in text
    assert "* a note" in text


def test_missing_or_infinite_ratio_is_null() -> None:
    r = ScenarioResult("scan", {}, {"scanner_vs_grep": math.inf, "scanner_vs_yara": None})
    doc = report.build([r], MACHINE, "t", 0.0)
    assert doc["ratios"] == {"scanner_vs_grep": None, "scanner_vs_yara": None}
    assert "| `scanner_vs_yara` | n/a |" in report.markdown([r], doc)


def test_a_ratio_reported_twice_is_refused() -> None:
    a = ScenarioResult("scan", {}, {"scanner_vs_grep": 1.0})
    b = ScenarioResult("other", {}, {"scanner_vs_grep": 2.0})
    with pytest.raises(ValueError, match="two scenarios"):
        report.build([a, b], MACHINE, "t", 0.0)


def test_a_row_that_does_not_fit_the_header_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Table("t", ["a", "b"], [["1"]]).markdown()


def test_no_ratios_section_without_ratios() -> None:
    r = _blind()
    doc = report.build([r], MACHINE, "t", 0.0)
    assert doc["ratios"] == {}
    assert "### Ratios" not in report.markdown([r], doc)


def test_figures_go_to_the_top_level_and_are_not_reported_twice() -> None:
    one = ScenarioResult("a", {}, figures={"p99_ms_at_half_peak": 4.25})
    doc = report.build([one], {}, "now", 1.0)
    assert doc["p99_ms_at_half_peak"] == 4.25
    with pytest.raises(ValueError, match="figure 'p99_ms_at_half_peak' reported by two"):
        report.build(
            [one, ScenarioResult("b", {}, figures={"p99_ms_at_half_peak": 1.0})], {}, "now", 1.0
        )


def test_load_result_percentiles_and_rate() -> None:
    from benchmarks.loadgen import LoadResult

    r = LoadResult(4, 2.0, 100, 0, [float(i) for i in range(1, 101)])
    assert r.per_second == 50.0
    assert (r.percentile(0.5), r.percentile(0.99), r.percentile(0.999)) == (51.0, 100.0, 100.0)
    assert math.isnan(LoadResult(1, 1.0, 0, 0, []).percentile(0.5))


def test_steady_growth_compares_the_minute_after_warm_up_with_the_last() -> None:
    from benchmarks.steady import _growth_pct

    warming = [50.0 + i for i in range(60)]  # the first minute fills caches: not counted
    assert _growth_pct([*warming, *[110.0] * 600], 60) == 0.0
    leaking = [*warming, *[100.0 + i / 20 for i in range(600)]]  # +30 MiB over 10 minutes
    assert 25.0 < _growth_pct(leaking, 60) < 30.0


def test_a_failing_scenario_is_reported_and_the_others_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from benchmarks import __main__ as bench_main

    def broken(ctx: object) -> ScenarioResult:
        raise RuntimeError("nginx exited")

    def fine(ctx: object) -> ScenarioResult:
        return ScenarioResult("fine", {"x": 1}, {"fine_vs_base": 2.0})

    monkeypatch.setattr(bench_main, "SCENARIOS", {"broken": broken, "fine": fine})
    assert bench_main.main(["--scenarios", "broken,fine", "--out", str(tmp_path)]) == 1
    doc = json.loads((tmp_path / "latest.json").read_text())
    assert doc["ratios"] == {"fine_vs_base": 2.0}
    assert "nginx exited" in doc["scenarios"]["broken"]["error"]
    assert "FAILED" in (tmp_path / "latest.md").read_text()
