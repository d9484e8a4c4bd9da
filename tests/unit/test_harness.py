"""signer.harness without crashing anything: matrices, verdicts, collectors, report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from signer.harness import (
    Campaign,
    Case,
    ControlOutcome,
    ControlVerdict,
    Row,
    crash,
    full_matrix,
    quick_matrix,
)
from signer.harness.campaign import MOMENTS, render_markdown
from signer.harness.collectors import KernelCollector
from signer.harness.verdicts import NOT_A_CONTROL_ROW, judge_control


def test_full_matrix_is_every_mechanism_at_every_moment() -> None:
    cases = {(c.mechanism, c.moment) for c in full_matrix() if c.subject == "service"}
    no_call_in_flight = {("pkcs11-call-fault", "idle"), ("pkcs11-call-fault", "startup")}
    assert (
        cases == {(m, moment) for m in crash.MECHANISMS for moment in MOMENTS} - no_call_in_flight
    )
    assert any(c.subject == "inprocess" for c in full_matrix())


def test_quick_matrix_covers_every_mechanism_and_moment() -> None:
    service = [c for c in quick_matrix() if c.subject == "service"]
    assert {c.mechanism for c in service} == set(crash.MECHANISMS)
    assert {c.moment for c in service} == set(MOMENTS)
    assert {c.collector for c in service} == {"kernel", "gcore", "gcore-a", "gate"}
    assert len({c.id for c in quick_matrix()}) == len(quick_matrix())


CAUGHT = ControlVerdict(ControlOutcome.CAUGHT, 9, 9)
LOAD = Case("SIGSEGV", "load", "kernel")
GATE = Case("SIGSEGV", "load", "gate")
KEPT = "quarantined:findings"


@pytest.mark.parametrize(
    ("row", "ok"),
    [
        (Row(LOAD, marker=True, control=CAUGHT), True),
        (Row(LOAD, marker=False, control=CAUGHT), False),
        (Row(LOAD, marker=True, control=judge_control({"pin", "k"}, {"k"}, True)), False),
        (Row(LOAD, marker=True, control=CAUGHT, findings=[{"secret_id": "k"}]), False),
        (Row(LOAD, marker=True, control=CAUGHT, error="x"), False),
        (Row(LOAD, marker=True), False),  # the control did not run
        # Gate rows: the service's dump released, the control's kept with everything named.
        (
            Row(
                GATE,
                marker=True,
                control=CAUGHT,
                gate_decision="released",
                gate_control_decision=KEPT,
                gate_control=CAUGHT,
            ),
            True,
        ),
        (Row(GATE, marker=True, control=CAUGHT), False),
        (
            Row(
                GATE,
                marker=True,
                control=CAUGHT,
                gate_decision="quarantined:budget",
                gate_control_decision=KEPT,
                gate_control=CAUGHT,
            ),
            False,
        ),
        (
            Row(
                GATE,
                marker=True,
                control=CAUGHT,
                gate_decision="released",
                gate_control_decision=KEPT,
                gate_control=judge_control({"k.pem", "user.pin"}, {"k.pem"}, True),
            ),
            False,
        ),
        (
            Row(
                GATE,
                marker=True,
                control=CAUGHT,
                gate_decision="released",
                gate_control_decision="released",
                gate_control=CAUGHT,
            ),
            False,
        ),
        # The in-process control reports findings; it is judged on its marker only.
        (
            Row(
                Case("SIGSEGV", "load", "kernel", subject="inprocess"),
                marker=True,
                control=NOT_A_CONTROL_ROW,
                findings=[{"secret_id": "k"}],
            ),
            True,
        ),
    ],
)
def test_a_row_counts_only_with_its_proofs(row: Row, ok: bool) -> None:
    assert row.ok is ok


@pytest.mark.parametrize(
    ("pattern", "name", "usable"),
    [
        ("core", "kernel-file", True),
        ("/var/crash/core.%e.%p", "kernel-file", True),
        ("|/usr/share/apport/apport -p%p -s%s -c%c", "kernel-pipe:apport", False),
    ],
)
def test_kernel_collector_reads_core_pattern(pattern: str, name: str, usable: bool) -> None:
    k = KernelCollector(pattern)
    assert k.name == name
    assert k.usable is usable


def test_file_pattern_with_a_directory(tmp_path: Path) -> None:
    assert KernelCollector("/var/crash/core.%p").directory(tmp_path) == Path("/var/crash")
    assert KernelCollector("core").directory(tmp_path) == tmp_path


def test_relative_report_dir_is_made_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service runs with its own working directory; relative paths would point nowhere.
    monkeypatch.chdir(tmp_path)
    c = Campaign(Path("report"))
    assert c.report_dir.is_absolute()
    assert c.work.is_absolute()
    assert c.lab.root.is_absolute()


@pytest.mark.parametrize(
    ("wanted", "found", "marker", "outcome", "words"),
    [
        ({"a", "b"}, {"a", "b"}, True, ControlOutcome.CAUGHT, "caught 2/2"),
        ({"a", "b", "c"}, {"b"}, True, ControlOutcome.MISSED, "MISSED a, c"),
        ({"a", "b"}, {"a", "b"}, False, ControlOutcome.MISSED, "MISSED marker"),
        ({"a", "b"}, {"a"}, False, ControlOutcome.MISSED, "MISSED b"),
    ],
)
def test_control_verdict_and_its_words_in_the_report(
    wanted: set[str], found: set[str], marker: bool, outcome: ControlOutcome, words: str
) -> None:
    verdict = judge_control(wanted, found, marker)
    assert verdict.outcome is outcome
    assert verdict.caught is (outcome is ControlOutcome.CAUGHT)
    assert str(verdict) == words
    assert str(NOT_A_CONTROL_ROW) == "n/a (this row is itself a control)"
    assert not NOT_A_CONTROL_ROW.caught


def test_report_json_keeps_the_control_in_words(tmp_path: Path) -> None:
    c = Campaign(tmp_path / "report")
    c.rows = [
        Row(Case("SIGBUS", "idle", "kernel"), marker=True, control=CAUGHT),
        Row(Case("SIGSEGV", "idle", "kernel"), error="HarnessError: no core"),
    ]
    c.write_report()
    rows = json.loads((c.report_dir / "report.json").read_text())["rows"]
    assert [(r["control"], r["ok"]) for r in rows] == [("caught 9/9", True), ("", False)]
    assert "| caught 9/9 | yes | ok |" in (c.report_dir / "report.md").read_text()


def test_markdown_report_has_a_row_per_crash_and_the_verdict() -> None:
    row = Row(Case("SIGBUS", "idle", "kernel"), marker=True, control=CAUGHT)
    data = {
        "summary": {
            "passed": True,
            "crashes": 1,
            "dumps_scanned": 1,
            "bytes_scanned": 2**20,
            "service_findings": 0,
            "controls_caught": 1,
            "controls_run": 1,
            "markers_found": 1,
            "kernel_collector": "kernel-file",
        },
        "rows": [
            {
                "case": vars(row.case),
                "id": row.case.id,
                "ok": True,
                "activity": "idle",
                "collector_name": "kernel-file",
                "exit_status": "killed by SIGBUS",
                "dump_size": 2**20,
                "bytes_scanned": 2**20,
                "patterns": 10,
                "findings": [],
                "control": "caught 9/9",
                "marker": True,
                "error": "",
            }
        ],
    }
    md = render_markdown(data)
    assert "**PASSED**" in md
    assert "| service | SIGBUS | idle | idle | kernel-file | killed by SIGBUS |" in md


def test_the_gate_column_only_where_the_gate_collected(tmp_path: Path) -> None:
    c = Campaign(tmp_path / "report")
    c.rows = [Row(Case("SIGBUS", "idle", "kernel"), marker=True, control=CAUGHT)]
    c.write_report()
    assert "| gate |" not in (c.report_dir / "report.md").read_text()
    c.rows.append(
        Row(
            GATE,
            marker=True,
            control=CAUGHT,
            gate_decision="released",
            gate_control_decision=KEPT,
            gate_control=CAUGHT,
        )
    )
    c.write_report()
    md = (c.report_dir / "report.md").read_text()
    assert "| marker | gate | ok |" in md
    assert "| released; control quarantined:findings caught 9/9 | ok |" in md
    assert "released 1/1, controls quarantined and named 1/1" in md
    rows = json.loads((c.report_dir / "report.json").read_text())["rows"]
    assert rows[1]["gate_control"] == "caught 9/9"
