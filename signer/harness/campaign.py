"""The crash campaign: crash the real service over a matrix, scan every dump, prove each scan.

Every row is one dump: a mechanism (signal, native fault, or gcore snapshot), a moment (what the
service was doing), a collector (kernel core or gcore). Every dump is scanned for every known key,
the TLS endpoint's key and both token PINs. A row only counts as evidence with its two proofs:

* marker: a random payload the service signed just before the crash is found in the dump (the
  dump is whole, and the scanner reads it);
* control: a process holding the same keys in memory, crashed and collected the same way, in
  which the scanner finds every key (the scanner would have seen a leak).

Rows whose subject is ``front`` snapshot the mTLS front (nginx) instead, under the same load: its
TLS key is in the token, so the key must be absent there too. The front does hold the TLS token's
PIN (libp11 keeps it to log in again); those findings are reported as expected, not judged.

Rows whose collector is ``gate`` crash the service with the dump gate (:mod:`signer.gate`)
installed as the kernel's ``core_pattern`` for the row, configured with the same keys and PINs as
files: the service's dump must be released (found clean by the gate) and is read from where it
was released; the control's must stay in quarantine with every key and PIN named in the gate's
own report (the gate's positive control), and is read from the quarantine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from signer._internal import hsm
from signer.errors import AlreadyExists, SignerError
from signer.harness import crash
from signer.harness.collectors import GateCollector, GateDump, KernelCollector, gcore
from signer.harness.lab import Lab, Load, ServiceProcess, reaped
from signer.harness.verdicts import NOT_A_CONTROL_ROW, ControlVerdict, judge_control
from signer.scan import Scanner

MOMENTS = ("idle", "load", "keygen", "rotation", "import", "startup", "shutdown")
# What the front is known to hold: libp11 keeps the TLS token's PIN to log in again.
FRONT_HOLDS = frozenset({"tls-token-pin"})
Progress = Callable[[str], None]


@dataclass(frozen=True)
class Case:
    mechanism: str
    moment: str
    collector: str  # "kernel", "gate" (the dump gate as core_pattern), "gcore"/"gcore-a"
    # "service"; "inprocess" (SoftHSM2 loaded by the service: the second control); "front"
    subject: str = "service"

    @property
    def id(self) -> str:
        return f"{self.subject}-{self.mechanism}-{self.moment}-{self.collector}".lower()


@dataclass
class Row:
    case: Case
    collector_name: str = ""
    how: str = ""
    exit_status: str = ""
    dump_size: int = 0
    bytes_scanned: int = 0
    patterns: int = 0
    findings: list[dict[str, Any]] = field(default_factory=list)
    marker: bool = False
    control: ControlVerdict | None = None  # None: the row failed before its control ran
    control_findings: int = 0
    seconds: float = 0.0
    activity: str = ""  # what the service was visibly doing when it was crashed
    # Findings of secrets this subject is known to hold (the front: the TLS token's PIN).
    expected_findings: dict[str, int] = field(default_factory=dict)
    # Gate rows: what the gate decided on the service's dump ("released" expected) and on the
    # control's ("quarantined:findings", every key and PIN named in its report).
    gate_decision: str = ""
    gate_control_decision: str = ""
    gate_control: ControlVerdict | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        if self.error or not self.marker:
            return False
        if self.case.subject == "inprocess":
            return True  # the second control: its findings are reported, not judged
        if self.case.collector == "gate" and not self.gate_ok:
            return False
        return self.control is not None and self.control.caught and not self.findings

    @property
    def gate_ok(self) -> bool:
        """The gate released the clean dump and quarantined the control naming everything."""
        return (
            self.gate_decision == "released"
            and self.gate_control_decision == "quarantined:findings"
            and self.gate_control is not None
            and self.gate_control.caught
        )

    @property
    def gate_text(self) -> str:
        """The gate column of the report ("" for rows without the gate)."""
        if self.case.collector != "gate":
            return ""
        return (
            f"{self.gate_decision or '-'}; control {self.gate_control_decision or '-'} "
            f"{'' if self.gate_control is None else self.gate_control}"
        ).strip()

    @property
    def control_text(self) -> str:
        """The control column of the report ("" when it did not run)."""
        return "" if self.control is None else str(self.control)


def quick_matrix() -> list[Case]:
    """The CI slice: every mechanism under load, every moment, kernel cores and both gcores."""
    cases = [Case(m, "load", "kernel") for m in crash.FATAL]
    cases += [
        Case("SIGSEGV", "idle", "kernel"),
        Case("SIGABRT", "keygen", "kernel"),
        Case("pkcs11-call-fault", "rotation", "kernel"),
        Case("SIGSEGV", "import", "kernel"),
        Case("gcore-a", "import", "gcore-a"),
        Case("SIGSEGV", "startup", "kernel"),
        Case("SIGQUIT", "shutdown", "kernel"),
        Case("gcore", "load", "gcore"),
        Case("gcore-a", "load", "gcore-a"),
        Case("gcore", "keygen", "gcore"),
        Case("SIGSEGV", "load", "kernel", subject="inprocess"),
        Case("gcore", "load", "gcore", subject="front"),
        Case("gcore-a", "load", "gcore-a", subject="front"),
        # The dump gate as the kernel's collector: one row (about 15 s with its control);
        # every mechanism in the full matrix.
        Case("SIGSEGV", "load", "gate"),
    ]
    return cases


def gate_matrix() -> list[Case]:
    """Every fatal mechanism under load with the dump gate as the kernel's collector."""
    return [Case(m, "load", "gate") for m in crash.FATAL]


def full_matrix() -> list[Case]:
    # A crash "inside a PKCS#11 call" needs a call in flight: not a thing at idle or start-up.
    cases = [
        Case(m, moment, "kernel")
        for m in crash.FATAL
        for moment in MOMENTS
        if not (m == "pkcs11-call-fault" and moment in ("idle", "startup"))
    ]
    cases += [Case(s, moment, s) for s in crash.SNAPSHOTS for moment in MOMENTS]
    cases += [Case(m, "load", "kernel", subject="inprocess") for m in crash.FATAL]
    cases += [Case("gcore-a", "load", "gcore-a", subject="inprocess")]
    cases += [Case(s, "load", s, subject="front") for s in crash.SNAPSHOTS]
    cases += gate_matrix()
    return cases


class Campaign:
    def __init__(self, report_dir: Path, keep_dumps: bool = False, progress: Progress = print):
        self.report_dir = report_dir.absolute()  # services run with their own cwd
        self.work = self.report_dir / "work"
        self.keep_dumps = keep_dumps
        self.progress = progress
        self.kernel = KernelCollector.detect()
        self.lab = Lab(self.work / "lab")
        self.rows: list[Row] = []
        self.gate: GateCollector | None = None
        self._controls: dict[tuple[str, str], tuple[ControlVerdict, int]] = {}
        self._gate_controls: dict[str, GateDump] = {}
        self._scanner: Scanner | None = None
        self._secret_ids: set[str] = set()
        self._imported = 0

    @property
    def secret_ids(self) -> frozenset[str]:
        """What every dump was searched for."""
        return frozenset(self._secret_ids)

    # --- running --------------------------------------------------------------------------------

    def run(self, cases: list[Case]) -> bool:
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        t0 = time.monotonic()
        self.progress(f"lab: token host and {len(self.lab.algorithms)} known keys ...")
        self.lab.setup()
        try:
            secrets = self.lab.secrets()
            self._secret_ids = {s.id for s in secrets}
            self._scanner = Scanner(secrets)
            self.progress(
                f"lab ready in {time.monotonic() - t0:.1f}s; {len(secrets)} secrets; "
                f"kernel collector: {self.kernel.name}"
                + ("" if self.kernel.usable else " (not usable here: gcore stands in)")
            )
            if any(c.collector == "gate" for c in cases):
                # A short path: the wrapper's is in core_pattern (127 bytes at most). The pid
                # in the name: tests/conftest.py knows a gate left by a killed run by it.
                self.gate = GateCollector(
                    Path(tempfile.mkdtemp(prefix=f"signer-gate-{os.getpid()}-harness-")),
                    self._gate_secret_files(),
                )
            for i, case in enumerate(cases, 1):
                row = self._run_case(case)
                self.rows.append(row)
                verdict = "ok" if row.ok else "FAIL"
                self.progress(
                    f"[{i}/{len(cases)}] {case.id}: {verdict} findings={len(row.findings)} "
                    f"marker={'yes' if row.marker else 'NO'} control={row.control_text} "
                    f"dump={row.dump_size / 2**20:.0f}MiB {row.seconds:.1f}s"
                    + (f" error={row.error}" if row.error else "")
                )
        finally:
            self.lab.close()
            if self.gate is not None:
                shutil.rmtree(self.gate.root, ignore_errors=True)  # the controls' cores
        self.write_report()
        return all(r.ok for r in self.rows)

    def _run_case(self, case: Case) -> Row:
        row = Row(case)
        start = time.monotonic()
        cwd = self.work / case.id
        try:
            if case.subject == "front":
                dump, marker = self._dump_front(case, cwd, row)
            else:
                dump, marker = self._dump_service(case, cwd, row)
            self._scan(dump, marker, row, self._maps_of(cwd))
            row.control, row.control_findings = self._control(case)
            if case.collector == "gate":
                self._judge_gate_control(case, row)
        except Exception as exc:  # a row that breaks is a failed row, not a crashed campaign
            row.error = f"{type(exc).__name__}: {exc}"
        finally:
            if not self.keep_dumps:
                for core in cwd.glob("*.core"):
                    core.unlink()
        row.seconds = time.monotonic() - start
        return row

    def _collector(self, case: Case) -> str:
        if case.collector == "gate":
            return "dump-gate (kernel pipe)"
        if case.collector != "kernel":
            return case.collector
        return self.kernel.name if self.kernel.usable else "gcore (kernel pipe not usable)"

    def _dump_service(self, case: Case, cwd: Path, row: Row) -> tuple[Path, bytes]:
        inprocess = case.subject == "inprocess"
        row.collector_name = self._collector(case)
        sp = self.lab.start_service(cwd, inprocess=inprocess)
        with reaped(sp.proc):
            self._snapshot_maps(sp, cwd)
            with sp.client() as c:
                if case.moment == "startup":
                    # The very first moments: serving, one marker, crash.
                    marker = self._plant_marker(c)
                    row.activity = _activity(case.moment, None, 0)
                    return self._crash(case, sp, cwd, row), marker
                load = Load(self.lab.routes(), self.lab.keys, threads=8)
                self._imported = 0
                background = self._moment_work(case.moment, c)
                with load if case.moment in ("load", "shutdown") else _Null():
                    time.sleep(0.4 if case.moment in ("load", "shutdown") else 0.0)
                    marker = self._plant_marker(c)
                    if background is not None:
                        background.start()
                        # keygen/rotation: the token is busy generating an RSA-4096 pair;
                        # import: several keys have been unwrapped, more are on their way.
                        time.sleep(0.15)
                    if case.moment == "shutdown":
                        os.kill(sp.pid, signal.SIGTERM)
                        time.sleep(0.05)  # draining in-flight calls, the key generation among them
                    dump = self._crash(case, sp, cwd, row)
                    row.activity = _activity(case.moment, load, self._imported)
                    return dump, marker

    def _dump_front(self, case: Case, cwd: Path, row: Row) -> tuple[Path, bytes]:
        """A snapshot of the running front while calls pass through it. The marker is the
        signature on its certificate, which nginx holds from start-up."""
        front = self.lab.front
        assert front is not None
        assert front.pid is not None
        row.collector_name = case.collector
        sp = self.lab.start_service(cwd)
        with reaped(sp.proc):
            load = Load(self.lab.routes(), self.lab.keys, threads=8)
            with load:
                time.sleep(0.5)
                with contextlib.suppress(OSError):
                    (cwd / "maps").write_text(Path(f"/proc/{front.pid}/maps").read_text())
                dump = cwd / "front.core"
                row.how = f"gcore{' -a' if case.mechanism == 'gcore-a' else ''} of nginx"
                gcore(front.pid, dump, all_mappings=case.mechanism == "gcore-a")
            row.exit_status = "running (snapshot)"
            row.activity = f"{load.signed} signatures by 8 clients, 4 of them through the front"
        cert = x509.load_pem_x509_certificate(self.lab.ca.server_cert.read_bytes())
        return dump, cert.signature

    def _plant_marker(self, client: Any) -> bytes:
        """Something random the service must now hold: a key whose label is a fresh random value,
        created and then signed with. Signed payloads alone do not survive: freed request
        buffers are overwritten (M_PERTURB) or reused within milliseconds under load, while the
        key's metadata stays in the store's page cache."""
        marker = os.urandom(24).hex()
        name = f"marker-{marker[:12]}"
        client.create_key(name, "ec-p256", labels={"marker": marker})
        client.sign(name, message=marker.encode())
        return marker.encode()

    def _moment_work(self, moment: str, client: Any) -> threading.Thread | None:
        def quietly(fn: Callable[[], object]) -> Callable[[], None]:
            def run() -> None:
                with contextlib.suppress(SignerError):  # the service is crashed under it
                    fn()

            return run

        # Several RSA-4096 generations back to back: one can finish in a fraction of a second,
        # and the crash (a gdb attach for the faults) must land while the token is still busy.
        if moment in ("keygen", "shutdown"):
            # shutdown: a generation in flight keeps the server draining, not yet gone.
            prefix = f"gen-{os.urandom(4).hex()}"

            def generate() -> None:
                for i in range(5):
                    client.create_key(f"{prefix}-{i}", "rsa-4096")

            return threading.Thread(target=quietly(generate), daemon=True)
        if moment == "rotation":
            rsa = next(k for k in self.lab.keys if k.algorithm == "rsa-4096")

            def rotate() -> None:
                for _ in range(5):
                    client.rotate(rsa.name)

            return threading.Thread(target=quietly(rotate), daemon=True)
        if moment == "import":
            # The wrapping key (RSA-4096, generated in the token) first; then imports in a loop,
            # so the crash lands among wrapped blobs, unwraps and challenge signatures. A key
            # pair is imported once (it uses up its import token); every later attempt with the
            # same pair is unwrapped and proved in the token, then refused ALREADY_EXISTS,
            # which leaves the import token unused for the next.
            params = [client.get_import_parameters()]

            def imports() -> None:
                for _ in range(200):
                    for key in self.lab.byok:
                        try:
                            client.import_key(key.name, key.algorithm, key.pem, params=params[0])
                        except AlreadyExists:
                            pass
                        else:
                            params[0] = client.get_import_parameters()
                        self._imported += 1

            return threading.Thread(target=quietly(imports), daemon=True)
        return None

    def _crash(self, case: Case, sp: ServiceProcess, cwd: Path, row: Row) -> Path:
        dump = cwd / "service.core"
        if case.mechanism in crash.SNAPSHOTS:
            row.how = f"gcore{' -a' if case.mechanism == 'gcore-a' else ''} snapshot"
            gcore(sp.pid, dump, all_mappings=case.mechanism == "gcore-a")
            sp.proc.kill()
            sp.proc.wait(30)
            row.exit_status = "killed after snapshot"
            return dump
        if case.collector == "gate":
            assert self.gate is not None
            with self.gate.installed():
                row.how = crash.deliver(sp.pid, case.mechanism)
                row.exit_status = _describe_status(sp.proc.wait(60))
                got = self.gate.fetch(sp.pid, dump)
            row.gate_decision = got.decision
            return dump
        if not self.kernel.usable:
            # A pipe collector we cannot read back: take the snapshot gcore would have, then crash.
            gcore(sp.pid, dump)
        since = time.time()
        row.how = crash.deliver(sp.pid, case.mechanism)
        status = sp.proc.wait(60)
        row.exit_status = _describe_status(status)
        if self.kernel.usable:
            self.kernel.fetch(sp.pid, cwd, since, dump)
        return dump

    def _snapshot_maps(self, sp: ServiceProcess, cwd: Path) -> None:
        with contextlib.suppress(OSError):
            (cwd / "maps").write_text(Path(f"/proc/{sp.pid}/maps").read_text())

    @staticmethod
    def _maps_of(cwd: Path) -> Path | None:
        maps = cwd / "maps"
        return maps if maps.exists() else None

    def _scan(self, dump: Path, marker: bytes, row: Row, maps: Path | None) -> None:
        assert self._scanner is not None
        result = self._scanner.scan(dump, maps=maps, markers={"marker": marker})
        row.dump_size = result.size
        row.bytes_scanned = result.bytes_scanned
        row.patterns = result.patterns
        expected = FRONT_HOLDS if row.case.subject == "front" else frozenset()
        row.findings = [_finding_dict(f) for f in result.findings if f.secret_id not in expected]
        for f in result.findings:
            if f.secret_id in expected:
                row.expected_findings[f.secret_id] = row.expected_findings.get(f.secret_id, 0) + 1
        row.marker = result.markers_found.get("marker", 0) > 0

    def _control(self, case: Case) -> tuple[ControlVerdict, int]:
        """Crashes a control process the same way (once per mechanism and collector)."""
        if case.subject == "inprocess":
            return NOT_A_CONTROL_ROW, 0
        mechanism = "worker-fault" if case.mechanism == "pkcs11-call-fault" else case.mechanism
        key = (mechanism, case.collector)
        if key not in self._controls:
            self._controls[key] = self._run_control(mechanism, case.collector)
        return self._controls[key]

    def _run_control(self, mechanism: str, collector: str) -> tuple[ControlVerdict, int]:
        assert self._scanner is not None
        cwd = self.work / f"control-{mechanism}-{collector}".lower()
        marker = os.urandom(48)
        proc = self.lab.start_control(cwd, marker)
        dump = cwd / "control.core"
        with reaped(proc):
            if mechanism in crash.SNAPSHOTS:
                gcore(proc.pid, dump, all_mappings=mechanism == "gcore-a")
            elif collector == "gate":
                assert self.gate is not None
                with self.gate.installed():
                    crash.deliver(proc.pid, mechanism)
                    proc.wait(60)
                    self._gate_controls[mechanism] = self.gate.fetch(proc.pid, dump)
            else:
                if not self.kernel.usable:
                    gcore(proc.pid, dump)
                since = time.time()
                crash.deliver(proc.pid, mechanism)
                proc.wait(60)
                if self.kernel.usable:
                    self.kernel.fetch(proc.pid, cwd, since, dump)
        result = self._scanner.scan(dump, markers={"marker": marker})
        if not self.keep_dumps:
            dump.unlink()
        found = {f.secret_id for f in result.findings}
        marker_found = bool(result.markers_found.get("marker"))
        return judge_control(self._secret_ids, found, marker_found), len(result.findings)

    def _gate_secret_files(self) -> tuple[Path, ...]:
        """The lab's keys and PINs as the files a gate's config names."""
        paths = hsm.HsmPaths(self.lab.hsm_dir.absolute())
        keys = sorted(self.lab.keys_dir.absolute().glob("*.pem"))
        tls = [self.lab.tls_key_file.absolute()] if self.lab.tls_key is not None else []
        pins = [p for p in (paths.user_pin, paths.tls_pin) if p.exists()]
        return (*keys, *tls, *pins)

    def _judge_gate_control(self, case: Case, row: Row) -> None:
        """The gate's positive control: its own scan of the control's dump named every file."""
        assert self.gate is not None
        mechanism = "worker-fault" if case.mechanism == "pkcs11-call-fault" else case.mechanism
        got = self._gate_controls.get(mechanism)
        if got is None:
            return
        row.gate_control_decision = got.decision
        row.gate_control = judge_control(self.gate.secret_ids, got.found, True)

    # --- report ---------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        service_rows = [r for r in self.rows if r.case.subject == "service"]
        gate_rows = [r for r in self.rows if r.case.collector == "gate"]
        return {
            "crashes": len(self.rows),
            "dumps_scanned": sum(1 for r in self.rows if r.bytes_scanned),
            "bytes_scanned": sum(r.bytes_scanned for r in self.rows),
            "service_findings": sum(len(r.findings) for r in service_rows),
            "inprocess_findings": sum(
                len(r.findings) for r in self.rows if r.case.subject == "inprocess"
            ),
            "front_findings": sum(len(r.findings) for r in self.rows if r.case.subject == "front"),
            "controls_run": len(self._controls),
            "controls_caught": sum(1 for v, _ in self._controls.values() if v.caught),
            "markers_found": sum(1 for r in self.rows if r.marker),
            "rows_ok": sum(1 for r in self.rows if r.ok),
            "kernel_collector": self.kernel.name,
            "gate_rows": sum(1 for r in gate_rows),
            "gate_released": sum(1 for r in gate_rows if r.gate_decision == "released"),
            "gate_controls_caught": sum(
                1
                for r in gate_rows
                if r.gate_control_decision == "quarantined:findings"
                and r.gate_control is not None
                and r.gate_control.caught
            ),
            "passed": all(r.ok for r in self.rows),
        }

    def write_report(self) -> None:
        self.report_dir.mkdir(parents=True, exist_ok=True)
        data = {
            "summary": self.summary(),
            "rows": [
                {
                    **asdict(r),
                    "control": r.control_text,
                    "gate_control": "" if r.gate_control is None else str(r.gate_control),
                    "gate": r.gate_text,
                    "id": r.case.id,
                    "ok": r.ok,
                }
                for r in self.rows
            ],
        }
        (self.report_dir / "report.json").write_text(json.dumps(data, indent=2))
        (self.report_dir / "report.md").write_text(render_markdown(data))


def render_markdown(data: dict[str, Any]) -> str:
    s = data["summary"]
    # The gate's column only where the dump gate collected (make audit's gate rows).
    gated = any(r.get("gate") for r in data["rows"])
    lines = [
        "# Crash-dump audit",
        "",
        f"**{'PASSED' if s['passed'] else 'FAILED'}**: {s['crashes']} crashes, "
        f"{s['dumps_scanned']} dumps, {s['bytes_scanned'] / 2**20:.0f} MiB scanned; "
        f"findings in the service: **{s['service_findings']}**; controls caught "
        f"{s['controls_caught']}/{s['controls_run']}; markers found "
        f"{s['markers_found']}/{s['crashes']}. Kernel collector: {s['kernel_collector']}.",
        "",
        "Every dump is scanned for every known key (all representations and 16-byte fragments), "
        "the TLS endpoint's key and both token PINs. A row counts only if the marker (a fresh "
        "random value the service had just been given, as a key label, and signed with; for the "
        "front, the signature on its certificate) is in the dump and the control (the same keys "
        "and PINs held in memory by an ordinary process with an ordinary TLS server, crashed the "
        "same way) was caught. The front's findings of its own TLS token PIN are expected "
        "(libp11 keeps it to log in again) and listed apart.",
        *(
            [
                "",
                f"Gate rows ({s.get('gate_rows', 0)}): the dump gate was the kernel's "
                "core_pattern for the row, with the same keys and PINs as files in its config. "
                "A gate row counts only if the gate released the service's dump (scanned clean) "
                "and kept the control's in quarantine with every key and PIN named in its own "
                f"report: released {s.get('gate_released', 0)}/{s.get('gate_rows', 0)}, "
                f"controls quarantined and named {s.get('gate_controls_caught', 0)}/"
                f"{s.get('gate_rows', 0)}.",
            ]
            if gated
            else []
        ),
        "",
        "| subject | mechanism | moment | activity | collector | exit | dump MiB | scanned MiB "
        f"| patterns | findings | control | marker |{' gate |' if gated else ''} ok |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---|---|---|" + ("---|" if gated else ""),
    ]
    for r in data["rows"]:
        c = r["case"]
        gate = f" {r.get('gate', '')} |" if gated else ""
        lines.append(
            f"| {c['subject']} | {c['mechanism']} | {c['moment']} | {r['activity']} "
            f"| {r['collector_name']} "
            f"| {r['exit_status']} | {r['dump_size'] / 2**20:.1f} "
            f"| {r['bytes_scanned'] / 2**20:.1f} "
            f"| {r['patterns']} | {len(r['findings'])}{_expected(r)} | {r['control']} "
            f"| {'yes' if r['marker'] else 'NO'} |{gate} "
            f"{'ok' if r['ok'] else 'FAIL ' + r['error']} |"
        )
    findings = [(r["id"], f) for r in data["rows"] for f in r["findings"]]
    if findings:
        lines += [
            "",
            "## Findings",
            "",
            "| row | secret | component | representation | offset | address | mapping |",
            "|---|---|---|---|---:|---|---|",
        ]
        for rid, f in findings[:500]:
            lines.append(
                f"| {rid} | {f['secret_id']} | {f['component']} | {f['representation']} "
                f"| {f['offset']} | {f['address']} | {f['mapping']} |"
            )
    return "\n".join(lines) + "\n"


def _expected(row: dict[str, Any]) -> str:
    held = row.get("expected_findings") or {}
    return "".join(f" (+{n} expected: {secret})" for secret, n in sorted(held.items()))


def _finding_dict(f: Any) -> dict[str, Any]:
    return {
        "secret_id": f.secret_id,
        "component": f.component,
        "representation": f.representation,
        "offset": f.offset,
        "length": f.length,
        "address": None if f.address is None else hex(f.address),
        "mapping": f.mapping,
    }


def _activity(moment: str, load: Load | None, imported: int) -> str:
    parts = []
    if load is not None and moment in ("load", "shutdown"):
        parts.append(f"{load.signed} signatures by 8 clients")
    if moment == "import":
        parts.append(f"{imported} wrapped keys unwrapped")
    if moment in ("keygen", "rotation"):
        parts.append("RSA-4096 generation in the token")
    if moment == "shutdown":
        parts.append("SIGTERM sent, draining an RSA-4096 generation")
    if moment == "startup":
        parts.append("first calls after start")
    return "; ".join(parts) or moment


def _describe_status(status: int) -> str:
    if status < 0:
        return f"killed by {signal.Signals(-status).name}"
    return f"exit {status}"


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
