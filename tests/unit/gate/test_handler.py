"""The handler as the kernel runs it: ``python -m signer.gate handle ...`` with an ELF core on a
pipe, a configuration in a temporary directory, and no kernel (tests/integration/test_dump_gate.py
has the kernel). Each decision, where the core ends up, what meta.json, the reports, the log and
the notification say, and that nothing but a clean, whole, scanned core is ever released."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signer._internal.store import SQLiteStore
from signer.keys import Key, State, Version
from tests.unit.gate.kit import Gate, T, core, ec_scalar, pem, public_pem

SIGNER = Path(sys.executable).parent / "signer"


@pytest.fixture(scope="module")
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
def gate(tmp_path: Path, key: ec.EllipticCurvePrivateKey) -> Gate:
    g = Gate(tmp_path)
    (tmp_path / "key.pem").write_bytes(pem(key))
    (tmp_path / "released").mkdir()
    g.configure({"secrets": ["key.pem"]}, release_dir="released")
    return g


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def released(gate: Gate) -> list[Path]:
    return sorted((gate.root / "released").iterdir())


def log_lines(gate: Gate) -> list[dict[str, object]]:
    return [json.loads(line) for line in (gate.state / "gate.log").read_text().splitlines()]


# --- findings ----------------------------------------------------------------------------------


def test_a_core_holding_a_known_key_stays_quarantined_with_a_report_naming_it(
    gate: Gate, key: ec.EllipticCurvePrivateKey
) -> None:
    notified = gate.root / "notified"
    script = f'printf "%s\\n" "$@" > {notified}'
    gate.configure(
        {"secrets": ["key.pem"]}, release_dir="released", notify=["/bin/sh", "-c", script, "sh"]
    )
    data = core(ec_scalar(key))
    run = gate.run(data)
    assert run.rc == 1
    assert run.decision == "quarantined:findings"
    assert run.entry is not None
    assert run.meta["reason"].startswith("1 finding ")
    assert (run.entry / "core").read_bytes() == data
    assert mode(run.entry) == 0o700
    assert mode(run.entry / "core") == 0o600
    assert mode(gate.quarantine) == 0o700
    findings = run.report()["findings"]
    assert [(f["secret_id"], f["component"], f["representation"]) for f in findings] == [
        ("key.pem", "private_value", "be")
    ]
    assert findings[0]["address"] is not None
    sarif = json.loads((run.entry / "report.sarif").read_text())
    assert sarif["runs"][0]["results"][0]["properties"]["secretId"] == "key.pem"
    assert released(gate) == []
    # the notification got the report's path, last
    assert notified.read_text().splitlines() == [str(run.entry / "report.json")]
    assert run.meta["notify"]["ok"] is True
    # meta.json: who crashed, what became of the dump
    assert {k: run.meta[k] for k in ("pid", "uid", "signal", "time", "exe", "hostname")} == {
        "pid": 4242,
        "uid": 0,
        "signal": 11,
        "time": 1_700_000_000,
        "exe": "/usr/bin/victim",
        "hostname": "host",
    }
    assert run.meta["size"] == run.meta["received"] == len(data)
    assert run.meta["scan"]["findings"] == 1
    # the log line: the decision with pid, uid, exe and signal, and no key material
    (line,) = log_lines(gate)
    assert line["decision"] == "quarantined:findings"
    assert (line["pid"], line["uid"], line["exe"], line["signal"]) == (
        4242,
        0,
        "/usr/bin/victim",
        11,
    )
    logged = (gate.state / "gate.log").read_bytes() + json.dumps(run.meta).encode()
    assert ec_scalar(key).hex().encode() not in logged
    assert ec_scalar(key) not in logged


def test_findings_leave_a_sanitised_copy_or_say_why_not(
    gate: Gate, key: ec.EllipticCurvePrivateKey
) -> None:
    run = gate.run(core(ec_scalar(key)))
    assert run.decision == "quarantined:findings"
    assert run.entry is not None
    state = run.meta["sanitised"]["state"]
    try:
        from signer.scan import sanitize  # noqa: F401
    except ImportError:
        assert state.startswith("unavailable")
        return
    assert state == "verified", run.meta["sanitised"]
    copy = run.entry / "core.sanitised"
    assert mode(copy) == 0o600
    assert ec_scalar(key) not in copy.read_bytes()
    assert run.meta["sanitised"]["findings_overwritten"] >= 1


def test_blind_detection_against_a_directory_of_public_keys(
    gate: Gate, key: ec.EllipticCurvePrivateKey
) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    keys = gate.root / "service-keys"
    keys.mkdir()
    (keys / "signing.pem").write_bytes(public_pem(other))
    gate.configure({"public_keys": ["service-keys"]}, release_dir="released")
    run = gate.run(core(ec_scalar(other)))
    assert run.decision == "quarantined:findings", run.meta
    (finding,) = run.report()["findings"]
    assert finding["secret_id"] == str(keys / "signing.pem")
    assert finding["representation"].startswith("verified-ec-scalar")


def test_blind_workers_run_in_the_gates_scan_child(gate: Gate) -> None:
    """The scan child (one thread) forks its workers: a 9 MiB core is checked in two processes
    on a machine of two CPUs, and the key found all the same."""
    other = ec.generate_private_key(ec.SECP256R1())
    keys = gate.root / "service-keys"
    keys.mkdir()
    (keys / "signing.pem").write_bytes(public_pem(other))
    gate.configure({"public_keys": ["service-keys"], "blind_workers": 2}, release_dir="released")
    run = gate.run(core(ec_scalar(other), size=9 << 20))
    assert run.decision == "quarantined:findings", run.meta
    blind = run.report()["blind"]
    assert blind["workers"] == min(2, len(os.sched_getaffinity(0)))
    assert (blind["complete"], blind["lost"]) == (True, [])
    assert [f["secret_id"] for f in run.report()["findings"]] == [str(keys / "signing.pem")]


def test_a_services_keys_are_read_from_its_store_without_any_pin(gate: Gate) -> None:
    svc_key = ec.generate_private_key(ec.SECP256R1())
    spki = svc_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    db = gate.root / "svc" / "signer.db"
    now = datetime.now(UTC)
    version = Version("payments", 1, "ec-p256", State.ENABLED, b"\x01" * 16, spki, now, None)
    store = SQLiteStore(db)
    store.create_key(Key("payments", "ec-p256", 1, "", {}, now, (version,)))
    store.close()
    service = gate.root / "svc" / "signer.toml"
    service.write_text(f'[store]\npath = "{db}"\n')
    gate.configure({"service_configs": ["svc/signer.toml"]}, release_dir="released")
    run = gate.run(core(ec_scalar(svc_key)))
    assert run.decision == "quarantined:findings", run.meta
    (finding,) = run.report()["findings"]
    assert finding["secret_id"] == f"{service}:payments/v1"


def test_a_real_core_of_a_process_holding_the_key(
    gate: Gate, key: ec.EllipticCurvePrivateKey, tmp_path: Path
) -> None:
    """A real process's memory (gcore: the same ELF core the kernel writes, and no core_pattern
    involved), the key's scalar in a bytes object on its heap."""
    code = "import sys; k = bytes.fromhex(sys.argv[1]); print('ready', flush=True); input()"
    argv = [sys.executable, "-c", code, ec_scalar(key).hex()]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as holder:
        assert holder.stdout is not None
        assert holder.stdout.readline() == b"ready\n"  # the key is in its memory now
        gcore = ["gcore", "-o", str(tmp_path / "real"), str(holder.pid)]
        subprocess.run(gcore, check=True, capture_output=True, timeout=60)
        holder.kill()
    run = gate.run((tmp_path / f"real.{holder.pid}").read_bytes(), pid=holder.pid)
    assert run.decision == "quarantined:findings", run.meta
    found = {(f["secret_id"], f["representation"]) for f in run.report()["findings"]}
    assert ("key.pem", "be") in found
    assert all(f["address"] is not None for f in run.report()["findings"])


# --- release ---------------------------------------------------------------------------------


def test_a_clean_core_is_released_to_release_dir_and_leaves_its_record(gate: Gate) -> None:
    data = core()
    run = gate.run(data)
    assert (run.rc, run.decision, run.meta["reason"]) == (0, "released", "scanned clean")
    assert run.entry is not None
    (out,) = released(gate)
    assert out.name == f"{run.entry.name}.core"
    assert out.read_bytes() == data
    assert mode(out) == 0o600
    assert not (run.entry / "core").exists()
    assert {p.name for p in run.entry.iterdir()} == {"meta.json", "report.json", "report.sarif"}
    assert run.meta["release"]["to"] == str(out)
    assert [line["decision"] for line in log_lines(gate)] == ["released"]
    assert run.stdout.startswith("released: scanned clean")


def test_a_release_dir_someone_else_could_redirect_is_not_released_to(gate: Gate) -> None:
    """Checked again for each dump (install checked it once): a directory above it that
    another user owns could be swapped for a link to anywhere root can write."""
    theirs = gate.root / "theirs"
    (theirs / "released").mkdir(parents=True)
    os.chown(theirs, 65534, 65534)
    gate.configure({"secrets": ["key.pem"]}, release_dir=str(theirs / "released"))
    run = gate.run(core())
    assert run.decision == "quarantined:error"
    assert f"release_dir {theirs / 'released'}" in run.meta["reason"]
    assert "65534" in run.meta["reason"]
    assert list((theirs / "released").iterdir()) == []
    assert run.entry is not None
    assert (run.entry / "core").exists()


def test_signer_dump_gate_handle_is_the_same_command(gate: Gate) -> None:
    run = gate.run(core(), command=[str(SIGNER), "dump-gate", "handle"])
    assert run.decision == "released"
    assert len(released(gate)) == 1


@pytest.fixture
def victim() -> Iterator[subprocess.Popen[bytes]]:
    """A live process that is not dumping core: what the gate finds at a pid the kernel named
    when the crashed process was killed during its dump and the pid went to another process."""
    proc = subprocess.Popen(["sleep", "60"], user=65534, group=65534)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("pattern", ["|/bin/cat %P", "core.%e"])
def test_a_pid_that_is_not_the_crashing_process_gets_no_release_that_reads_proc(
    gate: Gate, victim: subprocess.Popen[bytes], pattern: str
) -> None:
    """The review's pid-recycling case: a chained handler would read another process's /proc,
    a file would go into another process's directory as its user. A release_dir needs no /proc
    and still releases (the first test of this file)."""
    gate.previous(pattern)
    gate.configure({"secrets": ["key.pem"]})
    run = gate.run(core(), pid=victim.pid, uid=65534, gid=65534, exe="/usr/bin/sleep")
    assert run.decision == "quarantined:error", run.meta
    assert f"/proc/{victim.pid} is not (or no longer) the crashing process" in run.meta["reason"]
    assert "is not dumping core" in run.meta["proc"]
    assert run.entry is not None
    assert (run.entry / "core").exists()


@pytest.mark.parametrize("hostname", ["--", "-h"])
def test_a_hostname_argparse_would_take_for_its_own_is_just_a_hostname(
    gate: Gate, hostname: str
) -> None:
    """A container's root chooses its hostname; the wrapper's ``--`` keeps it from being read
    as an option, and the handler reads the nine values itself (review)."""
    kernel = ["--", "4242", "4242", "0", "0", "11", str(T), "0", "1", hostname, "!usr!bin!x"]
    run = gate.run(core(), kernel=kernel)
    assert run.decision == "released", run.meta
    assert run.meta["hostname"] == hostname


def test_arguments_that_are_not_the_kernels_keep_the_dump_in_quarantine(gate: Gate) -> None:
    """Not a usage error that leaves the kernel's pipe unread: the dump is received, kept,
    and neither scanned nor released."""
    data = core()
    run = gate.run(data, kernel=["--", "4242", "4242", "0", "0", "11"])
    assert run.decision == "quarantined:error"
    assert "the kernel's arguments are not PID TID" in run.meta["reason"]
    assert run.entry is not None
    assert (run.entry / "core").read_bytes() == data
    assert "scan" not in run.meta
    assert released(gate) == []


@pytest.mark.parametrize("how", ["group-writable state_dir", "state.json of another user"])
def test_a_state_file_someone_else_could_write_is_never_run(gate: Gate, how: str) -> None:
    """state.json names the handler chained to, run as root: one anyone but root could have
    written is not obeyed (the review's group-writable state_dir ran its script as root)."""
    ran = gate.root / "ran"
    script = gate.root / "evil"
    script.write_text(f"#!/bin/sh\ntouch {ran}\ncat > /dev/null\n")
    script.chmod(0o755)
    gate.previous(f"|{script}")
    if how == "group-writable state_dir":
        gate.state.chmod(0o770)
    else:
        os.chown(gate.state / "state.json", 65534, 65534)
    gate.configure({"secrets": ["key.pem"]})
    run = gate.run(core())
    assert run.decision == "quarantined:error", run.meta
    assert "state" in run.meta["reason"]
    assert not ran.exists()
    assert run.entry is not None
    assert (run.entry / "core").exists()


def test_nowhere_to_release_is_an_error_not_a_release(gate: Gate) -> None:
    gate.configure({"secrets": ["key.pem"]})  # no release_dir, no state.json
    run = gate.run(core())
    assert run.decision == "quarantined:error"
    assert "nowhere to release" in run.meta["reason"]
    assert run.entry is not None
    assert (run.entry / "core").exists()


# --- fail closed -----------------------------------------------------------------------------


def test_a_scan_over_its_budget_stays_in_quarantine(gate: Gate) -> None:
    gate.configure(
        {"secrets": ["key.pem"]},
        release_dir="released",
        seconds_per_gib=0.001,
        min_scan_seconds=0.001,
    )
    run = gate.run(core())
    assert run.decision == "quarantined:budget"
    assert "budget" in run.meta["reason"]
    assert run.entry is not None
    assert (run.entry / "core").exists()
    assert released(gate) == []


def test_a_core_over_max_core_bytes_is_cut_kept_and_the_rest_not_read(gate: Gate) -> None:
    """The rest is not read to be thrown away: the pipe is closed and the kernel ends the dump
    (a sparse mapping of terabytes must not hold the gate, and a core_pipe_limit slot, for
    hours; review)."""
    gate.configure({"secrets": ["key.pem"]}, release_dir="released", max_core_bytes=300_000)
    data = core()
    run = gate.run(data)
    assert run.decision == "quarantined:too-big"
    assert run.meta["truncated"] is True
    assert run.meta["size"] == 300_000
    assert run.meta["received"] < len(data)  # the feeder (the kernel) was cut off
    assert run.entry is not None
    assert (run.entry / "core").read_bytes() == data[:300_000]
    assert released(gate) == []


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def test_a_quarantine_short_of_space_drops_the_dump_and_never_releases(
    gate: Gate, small_fs: Path
) -> None:
    gate.quarantine = small_fs / "q"
    gate.configure(
        {"secrets": ["key.pem"]},
        release_dir="released",
        quarantine_dir=str(gate.quarantine),
        min_free_bytes=1 << 20,
    )
    data = core(size=8 << 20)
    run = gate.run(data)
    assert run.decision == "dropped:no-space"
    assert "min_free_bytes" in run.meta["reason"]
    assert run.meta["received"] < len(data)  # the pipe closed: the kernel is not held
    assert run.entry is not None
    assert not (run.entry / "core").exists()
    assert released(gate) == []


def test_a_secrets_file_that_cannot_be_read_fails_closed(gate: Gate) -> None:
    notified = gate.root / "notified"
    gate.configure(
        {"secrets": ["key.pem", "missing.pin"]},
        release_dir="released",
        notify=["/bin/sh", "-c", f'echo "$0" > {notified}'],
    )
    run = gate.run(core())
    assert run.decision == "quarantined:error"
    assert "missing.pin" in run.meta["reason"]
    assert run.entry is not None
    assert (run.entry / "core").exists()
    assert not (run.entry / "report.json").exists()
    assert notified.read_text().strip() == str(run.entry / "meta.json")
    assert released(gate) == []


def test_a_configuration_that_does_not_load_fails_closed(gate: Gate) -> None:
    text = gate.config.read_text().replace("[detect]", "surprise = 1\n[detect]")
    gate.config.write_text(text)
    run = gate.run(core())
    assert run.decision == "quarantined:error"
    assert "unknown setting gate.surprise" in run.meta["reason"]
    assert "line " in run.meta["reason"]
    assert run.entry is not None
    assert (run.entry / "core").exists()
    assert released(gate) == []


def test_a_notification_that_fails_does_not_change_the_decision(
    gate: Gate, key: ec.EllipticCurvePrivateKey
) -> None:
    gate.configure({"secrets": ["key.pem"]}, notify=["/nonexistent/notifier"])
    run = gate.run(core(ec_scalar(key)))
    assert run.decision == "quarantined:findings"
    assert run.meta["notify"]["ok"] is False
    assert [line["msg"] for line in log_lines(gate)] == [
        "dump quarantined:findings",
        "notification failed",
    ]


# --- memory ----------------------------------------------------------------------------------


def test_a_gib_core_streams_through_in_bounded_memory(gate: Gate) -> None:
    size = 1 << 30
    run = gate.run(feeder=["head", "-c", str(size), "/dev/zero"])
    assert run.decision == "released", run.meta
    assert run.meta["received"] == size
    print(f"peak RSS {run.maxrss_kib} KiB, {run.seconds:.2f} s")
    assert run.maxrss_kib < 200 * 1024, run.maxrss_kib  # the handler and its scan child
    (out,) = released(gate)
    assert out.stat().st_size == size
    assert out.stat().st_blocks == 0  # zero chunks stay holes


def test_a_quarantine_at_its_quota_drops_the_dump_and_never_releases(gate: Gate) -> None:
    gate.configure({"structural": True}, release_dir="released", max_quarantine_bytes=1 << 20)
    run = gate.run(core(size=4 << 20))
    assert run.decision == "dropped:no-space", run.meta
    assert "max_quarantine_bytes" in run.meta["reason"]
    assert run.entry is not None
    assert not (run.entry / "core").exists()
    assert released(gate) == []
    shutil.rmtree(run.entry)
    gate.configure({"structural": True}, release_dir="released", max_quarantine_bytes=64 << 20)
    assert gate.run(core(size=4 << 20)).decision == "released"
