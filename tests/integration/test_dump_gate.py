"""The dump gate with the real kernel: ``core_pattern`` really pipes every crash on the host to the
gate for the length of each test, and is put back in a ``finally`` (tests/conftest.py's
KernelDumpSettings puts it back at the end of the session if a test could not).

Before each install the test points ``core_pattern`` at a file pattern in its own directory
(``.../released/core.%p``): that is the destination the gate replaces, so a release is a file
there, and a dump that must not leave is checked not to be one. Small processes crash for real
(a Python that holds a key, RLIMIT_CORE unlimited, killed by the signal); the test waits for the
gate's own handler process to be gone, never for a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from signer.gate import GateRoot
from signer.gate._install import (
    GateState,
    Kernel,
    gate_pattern,
    install,
    uninstall,
)
from signer.scan import Scanner, load_secrets
from tests.conftest import (
    KERNEL_DUMP_SETTINGS,
    SIGNER_BIN,
    ServiceProcessFactory,
    TokenHostHandle,
    run_as,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.crash]

KERNEL = Kernel()

# The crash subject: holds what it is told to, then dies of the signal it is told to, with
# RLIMIT_CORE unlimited and the signal's default action (a core).
#   known KEY.pem SIG   -> the PEM text and the loaded key (OpenSSL's BIGNUMs) in memory
#   blind PUB.pem SIG   -> a key generated here, never serialised: only its public half leaves
#                          (written to PUB.pem), so only blind detection can find it
#   clean - SIG         -> nothing but a marker-free interpreter
CHILD = r"""
import os, resource, signal, sys
resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
mode, path, sig = sys.argv[1], sys.argv[2], getattr(signal, sys.argv[3])
held = []
if mode == "known":
    pem = open(path, "rb").read()
    held += [pem, serialization.load_pem_private_key(pem, None)]
elif mode == "blind":
    key = rsa.generate_private_key(65537, 2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    open(path, "wb").write(public)
    held.append(key)
signal.signal(sig, signal.SIG_DFL)
os.kill(os.getpid(), sig)
"""


@dataclass
class Gate(GateRoot):
    """A gate's files in a root-only temporary directory, the file pattern it replaces, and the
    ways to crash a process under it and read what the gate did."""

    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    mounts: list[Path] = field(default_factory=list)

    @property
    def previous_pattern(self) -> str:
        return f"{self.released}/core.%p"

    @property
    def pattern(self) -> str:
        return gate_pattern(self.wrapper)

    def configure(self, **detect_and_gate: Any) -> None:
        """Rewrites the config: keys of [detect] and [gate] by name (the gate reads it per dump)."""
        detect = {"secrets", "public_keys", "service_configs", "structural"}
        gate: dict[str, Any] = {
            "state_dir": str(self.state_dir),
            "quarantine_dir": str(self.quarantine),
        }
        det: dict[str, Any] = {"structural": True}
        for k, v in detect_and_gate.items():
            (det if k in detect else gate)[k] = v
        self.config.write_text(_toml({"gate": gate, "detect": det}))
        os.chmod(self.config, 0o600)

    def crash(
        self,
        mode: str,
        path: Path | str = "-",
        sig: str = "SIGSEGV",
        while_scanning: Callable[[int], None] | None = None,
    ) -> int:
        """Runs the crash subject; returns its pid once the gate is done with its dump.
        ``while_scanning(pid)`` runs once the gate's entry for the dump says it is scanning."""
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, mode, str(path), sig],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            if while_scanning is not None:
                assert wait_until(lambda: self.stage(proc.pid) == "scanning", 60, 0.01), (
                    f"the gate never scanned pid {proc.pid}: {self.stage(proc.pid)}"
                )
                while_scanning(proc.pid)
            _, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == -getattr(signal, sig), err.decode()[-2000:]
        self.wait_handled(proc.pid)
        return proc.pid

    def stage(self, pid: int) -> str | None:
        """Where the gate is with ``pid``'s dump, by its entry's meta.json."""
        held = self.held(pid)
        try:
            meta = json.loads((held / "meta.json").read_text()) if held else {}
        except (OSError, ValueError):
            return None
        return meta.get("stage") if isinstance(meta, dict) else None

    def handlers(self, pid: int) -> tuple[list[int], list[int]]:
        """The gate's processes for ``pid``'s dump: the handlers, and their scan children."""
        procs = _handlers(self.wrapper, pid)
        children = [p for p in procs if _ppid(p) in procs]
        return [p for p in procs if p not in children], children

    def wait_handled(self, pid: int, timeout: float = 90) -> None:
        """Until no gate handler for ``pid`` runs (the kernel started it before reaping ``pid``)."""
        assert wait_until(lambda: not _handlers(self.wrapper, pid), timeout, 0.05), (
            f"the gate still handles pid {pid} after {timeout} s"
        )

    def decision(self, pid: int) -> dict[str, Any]:
        """The gate.log line of ``pid``'s dump ({} if the gate wrote none)."""
        try:
            lines = (self.state_dir / "gate.log").read_text().splitlines()
        except FileNotFoundError:
            return {}
        for line in lines:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("pid") == pid and "decision" in rec:
                    return dict(rec)
        return {}

    def held(self, pid: int) -> Path | None:
        """The quarantine directory of ``pid``'s dump."""
        found = [d for d in _listdir(self.quarantine) if f"-{pid}-" in d.name]
        assert len(found) <= 1, found
        return found[0] if found else None

    def release(self, pid: int) -> Path:
        return self.released / f"core.{pid}"

    def mount_tmpfs(self, path: Path, size: str) -> None:
        path.mkdir(mode=0o700, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
            check=True,
            capture_output=True,
        )
        self.mounts.append(path)


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, values in tables.items():
        out.append(f"[{name}]")
        out += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    return "\n".join(out) + "\n"


def _listdir(path: Path) -> list[Path]:
    try:
        return sorted(path.iterdir())
    except OSError:
        return []


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _handlers(wrapper: Path, pid: int) -> list[int]:
    """Processes running the gate for ``pid``: the wrapper's shell, or the Python it execs."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        gate = str(wrapper).encode() in argv or b"signer.gate" in argv
        if gate and str(pid).encode() in argv:
            out.append(int(proc.name))
    return out


@contextlib.contextmanager
def _kernel_restored() -> Iterator[tuple[str, int]]:
    """Whatever the test does, ``core_pattern`` and ``core_pipe_limit`` are as they were after."""
    before = (KERNEL.pattern(), KERNEL.pipe_limit())
    try:
        yield before
    finally:
        if (KERNEL.pattern(), KERNEL.pipe_limit()) != before:
            KERNEL.core_pipe_limit.write_text(f"{before[1]}\n")
            KERNEL.core_pattern.write_text(f"{before[0]}\n")
        assert KERNEL.pattern() == before[0]


@pytest.fixture
def gate_files() -> Iterator[Gate]:
    """The gate's files, not installed; ``core_pattern`` set to the gate's file pattern
    (``.../released/core.%p``), everything restored after."""
    root = Path(tempfile.mkdtemp(prefix=KERNEL_DUMP_SETTINGS.prefix()))
    g = Gate(root)
    with _kernel_restored():
        try:
            (root / "sbin").mkdir(mode=0o755)
            g.released.mkdir(mode=0o700)
            g.configure()
            KERNEL_DUMP_SETTINGS.note(g.previous_pattern)
            KERNEL_DUMP_SETTINGS.note(g.pattern)
            KERNEL.core_pattern.write_text(f"{g.previous_pattern}\n")
            yield g
        finally:
            with contextlib.suppress(Exception):
                uninstall(g.config, state_dir=g.state_dir)
            for m in reversed(g.mounts):
                subprocess.run(["umount", "-l", str(m)], check=False, capture_output=True)
            shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def gate(gate_files: Gate) -> Gate:
    """The gate installed for real: ``core_pattern`` is its pipe."""
    install(gate_files.config, pipe_limit=4, wrapper=gate_files.wrapper)
    assert KERNEL.pattern() == gate_files.pattern
    return gate_files


def _signer(*args: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [str(SIGNER_BIN), "dump-gate", *args], capture_output=True, text=True, timeout=60, **kw
    )
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


# --- install, status, uninstall ------------------------------------------------------------------


def test_install_status_uninstall_with_the_real_kernel(gate_files: Gate) -> None:
    g = gate_files
    cfg = ["--config", str(g.config)]
    out = _signer("install", *cfg, "--wrapper", str(g.wrapper), "--pipe-limit", "3").stdout
    assert KERNEL.pattern() == g.pattern
    assert KERNEL.pipe_limit() == 3
    assert g.previous_pattern in out
    assert os.stat(g.wrapper).st_mode & 0o7777 == 0o755
    state = GateState.read(g.state_dir)
    assert state is not None
    assert state.installed
    assert state.previous_pattern == g.previous_pattern
    assert state.previous_pipe_limit == 0
    st = json.loads(_signer("status", *cfg, "--json").stdout)
    assert st["installed"] is True
    assert st["core_pattern"] == g.pattern
    assert st["state"]["previous_pattern"] == g.previous_pattern
    assert "dump gate: installed" in _signer("status", *cfg).stdout

    # A re-install keeps the pattern the first one replaced.
    _signer("install", *cfg, "--wrapper", str(g.wrapper))
    state = GateState.read(g.state_dir)
    assert state is not None
    assert state.previous_pattern == g.previous_pattern
    assert KERNEL.pipe_limit() == 16

    out = _signer("uninstall", *cfg).stdout
    assert "restored" in out
    assert KERNEL.pattern() == g.previous_pattern
    assert KERNEL.pipe_limit() == 0
    assert not g.wrapper.exists()
    assert json.loads(_signer("status", *cfg, "--json").stdout)["installed"] is False


def test_uninstall_leaves_a_pattern_set_since(gate: Gate) -> None:
    KERNEL.core_pattern.write_text("core.%p\n")
    r = _signer("uninstall", "--config", str(gate.config), check=False)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "'core.%p'" in r.stdout
    assert "left as it is" in r.stdout
    assert KERNEL.pattern() == "core.%p"


def test_install_refused_to_anyone_but_root(gate_files: Gate) -> None:
    r = run_as(
        pwd.getpwnam("nobody"),
        "import sys; from signer.cli.main import main; sys.exit(main(sys.argv[1:]))",
        "dump-gate",
        "install",
        "--config",
        str(gate_files.config),
        "--wrapper",
        str(gate_files.wrapper),
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "as root" in r.stderr
    assert KERNEL.pattern() == gate_files.previous_pattern


# --- the gate at work ----------------------------------------------------------------------------


@pytest.fixture
def known_key(tmp_path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "service-key.pem"
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


def _finding_ids(held: Path) -> set[str]:
    text = (held / "report.json").read_text()
    data = json.loads(text)
    results = data if isinstance(data, list) else data.get("results", [data])
    return {f["secret_id"] for r in results for f in r.get("findings", [])}


@pytest.mark.parametrize("sig", ["SIGSEGV", "SIGABRT"])
def test_a_dump_with_a_known_key_stays_in_quarantine(gate: Gate, known_key: Path, sig: str) -> None:
    gate.configure(secrets=[str(known_key)])
    pid = gate.crash("known", known_key, sig)
    decision = gate.decision(pid)
    assert decision.get("decision") == "quarantined:findings", decision
    assert decision["signal"] == getattr(signal, sig)
    held = gate.held(pid)
    assert held is not None
    assert (held / "core").stat().st_size > 1_000_000
    assert os.stat(held).st_mode & 0o777 == 0o700
    assert json.loads((held / "meta.json").read_text())["decision"] == "quarantined:findings"
    assert "service-key.pem" in _finding_ids(held)
    assert (held / "report.sarif").exists()
    assert not gate.release(pid).exists()
    log = (gate.state_dir / "gate.log").read_text()
    assert known_key.read_text().splitlines()[1] not in log


def test_a_key_only_blind_detection_finds_stays_in_quarantine(gate: Gate) -> None:
    public = gate.root / "public-keys"
    public.mkdir()
    gate.configure(public_keys=[str(public)])
    pid = gate.crash("blind", public / "held.pem")
    decision = gate.decision(pid)
    assert decision.get("decision") == "quarantined:findings", decision
    held = gate.held(pid)
    assert held is not None
    results = json.loads((held / "report.json").read_text())
    results = results if isinstance(results, list) else results.get("results", [results])
    findings = [f for r in results for f in r["findings"]]
    assert any(
        f["secret_id"].endswith("held.pem") and f["detail"].startswith("verified") for f in findings
    ), findings
    assert not gate.release(pid).exists()


def test_the_sanitised_copy_is_clean_and_gdb_still_reads_it(gate: Gate, known_key: Path) -> None:

    gate.configure(secrets=[str(known_key)])
    pid = gate.crash("known", known_key)
    held = gate.held(pid)
    assert held is not None
    safe = held / "core.sanitised"
    assert safe.exists(), sorted(p.name for p in held.iterdir())
    assert Scanner(load_secrets([known_key])).scan(safe).findings == []
    assert Scanner(load_secrets([known_key])).scan(held / "core").findings
    bt = subprocess.run(
        ["gdb", "-nx", "-batch", "-ex", "bt", os.path.realpath(sys.executable), str(safe)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    frames = [line for line in bt.stdout.splitlines() if line.startswith("#")]
    assert len(frames) >= 3, bt.stdout + bt.stderr
    assert not gate.release(pid).exists()


def test_a_clean_dump_is_released_to_the_replaced_pattern(gate: Gate, known_key: Path) -> None:
    """The same gate, a process that holds no key: its core is where the kernel would have
    written it (so the quarantines above are the gate's findings, not a gate that never
    releases)."""
    gate.configure(secrets=[str(known_key)])
    pid = gate.crash("clean")
    decision = gate.decision(pid)
    assert decision.get("decision") == "released", decision
    core = gate.release(pid)
    assert core.read_bytes()[:4] == b"\x7fELF"
    assert core.stat().st_size > 1_000_000


def test_a_clean_dump_is_chained_to_a_replaced_pipe_handler_that_reads_proc(
    gate: Gate, known_key: Path
) -> None:
    """Chained as to systemd-coredump, which reads /proc/PID while it runs: the gate chains
    only while /proc/PID is still the process being dumped, and the chained handler finds it
    so (the kernel's own dumping state, which no unit test can make)."""
    record = gate.root / "chained"
    script = gate.root / "sbin" / "previous-handler"
    script.write_text(
        "#!/bin/sh\n"
        f'printf "%s\\n" "$@" > {record}.argv\n'
        f"grep -E '^(CoreDumping|Tgid):' /proc/$1/status > {record}.status\n"
        f"wc -c > {record}.size\n"
    )
    script.chmod(0o700)
    state = json.loads((gate.state_dir / "state.json").read_text())
    state["previous_pattern"] = f"|{script} %P %e %s"  # the handler reads it per dump
    (gate.state_dir / "state.json").write_text(json.dumps(state))
    gate.configure(secrets=[str(known_key)])
    pid = gate.crash("clean")
    decision = gate.decision(pid)
    assert decision.get("decision") == "released", decision
    argv = record.with_suffix(".argv").read_text().split()
    assert (argv[0], argv[2]) == (str(pid), "11")
    assert argv[1].startswith("python")  # %e, the thread's name, read through the held /proc
    assert record.with_suffix(".status").read_text().split() == [
        *("Tgid:", str(pid), "CoreDumping:", "1")
    ]
    assert int(record.with_suffix(".size").read_text()) > 1_000_000
    held = gate.held(pid)
    assert held is not None
    assert json.loads((held / "meta.json").read_text())["proc"] == "held"
    assert not (held / "core").exists()


@pytest.fixture
def core_unlimited() -> Iterator[None]:
    """Children started meanwhile may dump cores of any size (the service inherits it)."""
    before = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, before)


def test_the_real_service_crashes_and_its_dump_is_released(
    gate: Gate,
    token_host: TokenHostHandle,
    service_process_factory: ServiceProcessFactory,
    core_unlimited: None,
) -> None:
    sp = service_process_factory()
    payload = b"gate marker " + os.urandom(16).hex().encode()
    with sp.client() as c:
        c.create_key("gate-service-key", "ec-p256")
        c.sign("gate-service-key", message=payload)
    # The token's PIN and the structural detectors; blind mode over the service's own keys
    # (service_configs) is test_a_key_only_blind_detection_finds' subject, on a smaller core.
    gate.configure(secrets=[str(token_host.paths.user_pin)])
    os.kill(sp.pid, signal.SIGSEGV)
    assert sp.proc.wait(60) == -signal.SIGSEGV
    gate.wait_handled(sp.pid)
    decision = gate.decision(sp.pid)
    assert decision.get("decision") == "released", decision
    core = gate.release(sp.pid)
    assert core.read_bytes()[:4] == b"\x7fELF"
    assert core.stat().st_size > 10_000_000
    # What was released is the whole dump (the payload the service just signed is in it) and
    # holds no PIN by a second look; that the gate would have kept it otherwise is the known-key
    # tests' subject, with the same scanner.
    again = Scanner(load_secrets([token_host.paths.user_pin])).scan(
        core, markers={"payload": payload}
    )
    assert again.markers_found.get("payload", 0) > 0, again.markers_found
    assert again.findings == []
    held = gate.held(sp.pid)
    assert held is None or not (held / "core").exists()


# --- failing closed ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"max_core_bytes": 1 << 20}, "quarantined:too-big"),
        ({"seconds_per_gib": 1e-6, "min_scan_seconds": 1e-6}, "quarantined:budget"),
    ],
    ids=["too-big", "over-budget"],
)
def test_a_dump_over_the_budget_is_not_released(
    gate: Gate, known_key: Path, settings: dict[str, Any], expected: str
) -> None:
    gate.configure(secrets=[str(known_key)], **settings)
    pid = gate.crash("clean")
    decision = gate.decision(pid)
    assert decision.get("decision") == expected, decision
    held = gate.held(pid)
    assert held is not None
    assert (held / "core").exists()
    assert not gate.release(pid).exists()


@pytest.mark.parametrize("min_free", [0, 1 << 30], ids=["disk-fills", "below-min-free"])
def test_a_full_quarantine_disk_never_releases(gate: Gate, known_key: Path, min_free: int) -> None:
    gate.mount_tmpfs(gate.quarantine, "2m")
    gate.configure(secrets=[str(known_key)], min_free_bytes=min_free)
    pid = gate.crash("clean")
    decision = gate.decision(pid)
    assert decision.get("decision") == "dropped:no-space", decision
    assert not gate.release(pid).exists()
    held = gate.held(pid)
    assert held is not None  # its meta.json says why
    assert not (held / "core").exists()


def test_a_config_that_no_longer_loads_quarantines(gate: Gate, known_key: Path) -> None:
    """Changed after install into something the gate refuses: the dump stays, with the reason."""
    gate.configure(secrets=[str(known_key)])
    with gate.config.open("a") as fh:
        fh.write('[extra]\nwhat = "a table the gate does not know"\n')
    pid = gate.crash("clean")
    decision = gate.decision(pid)
    assert decision.get("decision") == "quarantined:error", decision
    assert "configuration" in decision["reason"]
    held = gate.held(pid)
    assert held is not None
    assert (held / "core").exists()
    assert not gate.release(pid).exists()


def test_a_quarantine_that_cannot_be_made_drops_the_dump(gate: Gate, known_key: Path) -> None:
    gate.configure(secrets=[str(known_key)])
    shutil.rmtree(gate.quarantine)
    gate.quarantine.write_text("a file where the quarantine should be\n")
    pid = gate.crash("clean")
    assert gate.decision(pid).get("decision") == "dropped:error"
    assert not gate.release(pid).exists()


def _alive(pid: int) -> bool:
    """Running, or stopped: not gone and not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.parametrize("victim", ["handler", "scan-child"])
def test_a_gate_killed_while_scanning_never_releases(gate: Gate, victim: str) -> None:
    """SIGKILL to the handler, whose scan child dies with it (no decision is ever made: the
    entry stays as it was, the core in it) or to the scan child alone (the handler decides
    quarantined:error, as for a scanner that crashes). The dump would have been released: its
    process holds nothing, and the scan is blind mode against an unrelated EC key, slow enough
    to be caught at it."""
    public = gate.root / "public-keys"
    public.mkdir()
    unrelated = ec.generate_private_key(ec.SECP256R1()).public_key()
    (public / "unrelated.pem").write_bytes(
        unrelated.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    gate.configure(public_keys=[str(public)])
    killed: list[int] = []

    def kill(pid: int) -> None:
        # meta.json says "scanning" just before the handler forks its scan child.
        assert wait_until(lambda: all(len(x) == 1 for x in gate.handlers(pid)), 30, 0.01), (
            gate.handlers(pid)
        )
        handlers, children = gate.handlers(pid)
        # The handler alone (as the OOM killer would take it): its scan child must go with it
        # by itself (PR_SET_PDEATHSIG; left alone, it would scan on to its deadline for nobody).
        targets = handlers if victim == "handler" else children
        for target in targets:
            os.kill(target, signal.SIGKILL)
        killed.extend(targets)
        if victim == "handler":
            assert wait_until(lambda: not any(_alive(c) for c in children), 10, 0.01), children

    pid = gate.crash("clean", while_scanning=kill)
    assert killed
    assert not gate.release(pid).exists()
    held = gate.held(pid)
    assert held is not None
    assert (held / "core").exists()
    decision = gate.decision(pid)
    if victim == "handler":
        assert decision == {}
        assert gate.stage(pid) == "scanning"
        st = json.loads(_signer("status", "--config", str(gate.config), "--json").stdout)
        assert [q["dir"] for q in st["quarantine"]] == [held.name]
    else:
        assert decision.get("decision") == "quarantined:error", decision
        assert "SIGKILL" in decision["reason"]
