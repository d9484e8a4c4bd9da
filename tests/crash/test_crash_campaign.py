"""The CI slice of the crash campaign: real crashes of the real service, real dumps, scanned.

Every mechanism at least once under load, every moment, kernel cores and gcore/gcore -a, every
algorithm the token path offers (all known keys are searched in every dump), the TLS endpoint's
key and both token PINs. Half the load arrives through the mTLS front. Each row carries its own
proofs: the marker payload is in the dump, and a control process holding the same keys and PINs
(the TLS key in an ordinary TLS server), crashed the same way, is caught. Two more rows snapshot
the front itself. The full matrix runs with `make audit`.
"""

from __future__ import annotations

import json
import shutil

import pytest

from signer.harness import Campaign, ControlOutcome, ControlVerdict, quick_matrix

pytestmark = [pytest.mark.crash, pytest.mark.slow]


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Campaign:
    for tool in ("gdb", "gcore", "p11-kit", "softhsm2-util"):
        if shutil.which(tool) is None:
            pytest.fail(f"the crash campaign needs {tool}: run 'make test', which installs it")
    report = tmp_path_factory.mktemp("crash-report")
    c = Campaign(report, progress=print)
    c.run(quick_matrix())
    return c


def test_every_service_dump_is_clean_and_proven(campaign: Campaign) -> None:
    bad = [
        (
            r.case.id,
            r.error or f"findings={len(r.findings)} marker={r.marker} control={r.control_text}",
        )
        for r in campaign.rows
        if not r.ok
    ]
    assert not bad, bad


def test_the_slice_covers_the_matrix(campaign: Campaign) -> None:
    from signer.harness import crash

    service_rows = [r for r in campaign.rows if r.case.subject == "service"]
    assert {r.case.mechanism for r in service_rows} >= set(crash.MECHANISMS)
    assert {r.case.moment for r in service_rows} >= {
        "idle",
        "load",
        "keygen",
        "rotation",
        "startup",
        "shutdown",
    }
    collectors = {r.collector_name for r in service_rows}
    assert any(c.startswith("kernel") or "gcore (kernel" in c for c in collectors)
    assert {"gcore", "gcore-a"} <= collectors
    # Fatal mechanisms really killed the process with the signal they claim.
    for r in service_rows:
        if r.case.mechanism.startswith("SIG"):
            assert r.exit_status == f"killed by {r.case.mechanism}", r.case.id
        elif r.case.mechanism.endswith("fault"):
            assert r.exit_status == "killed by SIGSEGV", r.case.id


def test_controls_catch_every_key_and_the_pin(campaign: Campaign) -> None:
    summary = campaign.summary()
    assert summary["controls_run"] >= len(quick_matrix()) // 3
    assert summary["controls_caught"] == summary["controls_run"]


def test_every_scan_searched_for_the_tls_key_and_both_pins(campaign: Campaign) -> None:
    assert {"tls-endpoint-key", "tls-token-pin", "token-user-pin"} <= campaign.secret_ids
    n = len(campaign.secret_ids)
    everything = ControlVerdict(ControlOutcome.CAUGHT, n, n)
    for r in campaign.rows:
        if r.case.subject != "inprocess":
            assert r.control == everything, (r.case.id, r.control_text)


def test_the_front_holds_no_tls_key_while_it_serves(campaign: Campaign) -> None:
    """nginx signs every handshake through the token: the TLS key is in no snapshot of it. Its
    TLS token PIN is (libp11 keeps it), and is listed apart as expected."""
    rows = [r for r in campaign.rows if r.case.subject == "front"]
    assert {r.case.collector for r in rows} == {"gcore", "gcore-a"}
    for r in rows:
        assert r.ok, (r.case.id, r.error, r.findings)
        assert not r.findings
        assert set(r.expected_findings) <= {"tls-token-pin"}
        print(f"front {r.case.id}: expected findings {r.expected_findings}")


def test_every_dump_was_whole(campaign: Campaign) -> None:
    assert all(r.marker for r in campaign.rows), [r.case.id for r in campaign.rows if not r.marker]
    assert all(r.bytes_scanned > 1_000_000 for r in campaign.rows)


def test_report_written(campaign: Campaign) -> None:
    data = json.loads((campaign.report_dir / "report.json").read_text())
    assert data["summary"]["passed"] is True
    assert len(data["rows"]) == len(campaign.rows)
    md = (campaign.report_dir / "report.md").read_text()
    assert "| subject | mechanism | moment | activity | collector |" in md


def test_the_dump_gate_released_the_service_and_kept_its_control(campaign: Campaign) -> None:
    """The gate row: the dump gate was core_pattern; it released the service's dump (which the
    harness then found clean, with its marker) and kept the control's in quarantine, its own
    report naming every key and PIN file."""
    rows = [r for r in campaign.rows if r.case.collector == "gate"]
    assert rows
    for r in rows:
        assert r.gate_decision == "released", (r.case.id, r.gate_text, r.error)
        assert r.gate_control_decision == "quarantined:findings", r.gate_text
        assert r.gate_control is not None
        assert r.gate_control.caught, r.gate_text
        assert r.marker
        assert not r.findings
    assert campaign.summary()["gate_controls_caught"] == len(rows)
    assert "| gate |" in (campaign.report_dir / "report.md").read_text()


def test_inprocess_softhsm_control_is_reported(campaign: Campaign) -> None:
    """The second control: SoftHSM2 loaded by the service itself. Its findings are reported,
    not judged; the figure shows what the process boundary buys."""
    rows = [r for r in campaign.rows if r.case.subject == "inprocess"]
    assert rows
    for r in rows:
        assert r.marker, r.case.id
        print(f"in-process SoftHSM2 {r.case.id}: {len(r.findings)} findings")
