"""Scenario "gate": the dump gate end to end, per GiB of core, against ``cat`` to disk.

The handler runs as the kernel runs it through ``core_pattern`` (``python -I -m signer.gate handle
--config FILE PID TID UID GID SIGNAL TIME LIMIT HOST EXE``, working directory ``/``, the kernel's
environment), with the core on its standard input: a pipe that ``cat CORE`` writes into, as the
kernel streams a core (zero pages included). It is not installed as ``core_pattern``. Timed from
the start of the feeder to the handler's exit: the interpreter's start, receiving the core into
the quarantine (synced), the scan in its child, the decision and the release into a
``release_dir`` (a rename: same file system). The floor is the same feeder into ``cat >
FILE``: what the kernel's pipe costs with nothing done but storing the core (not synced).

Detection modes (one gate configuration each, fresh key files): ``known`` (16 private-key PEM
files and 2 PIN files, ``structural = false``), ``structural`` (no keys: the private-key
structure detectors only), ``blind`` (the 16 public keys, with the structural detectors, as
blind mode always runs them), ``blind-likely`` (the same with ``blind_offsets = "likely"``).
The gate forks blind-mode workers as it does in production (the CPUs, up to 4). The cores are
clean, so every run should end ``released``.

Cores: the real service under load (shared with ``scan`` and ``blind``), a process holding
about 1 GiB of records, text and random blobs (:mod:`benchmarks.heap_process`), and, for blind
mode only, a small process of the same kind without the random blobs: blind mode verifies
candidate windows one by one (under 1 MB/s on heap-like memory, far less on random bytes), so
on the big cores it would not finish in this scenario's time. One more run shows what happens
past the budget: blind mode on the 1 GiB core with a budget it cannot meet.

Peak memory: ``wait4``'s ``ru_maxrss`` of the handler (the larger of it and its scan child)
and, sampled from ``/proc`` every 20 ms, each one's ``VmHWM`` and largest ``RssAnon`` (the
scan child maps the core: its RSS counts the core's page-cache pages it has read).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import statistics
import string
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from benchmarks.context import Context
from benchmarks.report import ScenarioResult, Table, fmt_bytes, fmt_rate, fmt_seconds
from benchmarks.scan import warm
from benchmarks.timing import Timing, rate_mb_s
from signer.gate._scan import BLIND_SHARE
from signer.harness.collectors import gcore

NAME = "gate"
GIB = 1 << 30
MIB = 1 << 20
RUNS = 3
RSA_KEYS, EC_KEYS, PINS = 8, 8, 2
# benchmarks.heap_process's records, text and random blobs, MiB
LARGE_HEAP = (340, 340, 300)
BLIND_HEAP = (4, 4, 0)
MEASURE_SECONDS_PER_GIB = 1e6  # no budget in the timed runs: the figure is the scan's time
OVER_BUDGET_SECONDS = 10.0  # the over-budget run's whole scan budget
KERNEL_ENV = {"HOME": "/", "PATH": "/sbin:/bin:/usr/sbin:/usr/bin"}
CORE_LIMIT = 2**64 - 1  # %c of a process with no core-size limit
SAMPLE_SECONDS = 0.02
MARGIN = 4.0  # the suggested budget over the slowest measured scan
SMALL_CORE = 256 * MIB  # smaller: its scan time is mostly fixed costs, not per GiB


# --- pure helpers --------------------------------------------------------------------------------


def per_gib(seconds: float, size: int) -> float | None:
    """Seconds per GiB (2^30 bytes) of a ``size``-byte core handled in ``seconds``."""
    return seconds * GIB / size if size > 0 else None


def status_kib(text: str, name: str) -> int | None:
    """A ``kB`` field of ``/proc/PID/status`` (``VmHWM``, ``RssAnon``), None if absent."""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            parts = value.split()
            return int(parts[0]) if parts and parts[0].isdigit() else None
    return None


def round_up(value: float) -> float:
    """``value`` rounded up: to a whole number below 10, to a multiple of 10 from there."""
    if value < 0 or not math.isfinite(value):
        raise ValueError(f"not a finite non-negative number: {value!r}")
    step = 1 if value < 10 else 10
    return float(math.ceil(value / step - 1e-9) * step)


def suggest_budget(
    large_per_gib: list[float], small_seconds: list[float], margin: float = MARGIN
) -> tuple[float, float]:
    """``(seconds_per_gib, min_scan_seconds)`` for the gate's config: ``margin`` times the
    slowest scan measured per GiB of a large core (its patterns' compile included), and
    ``margin`` times the slowest scan of a small core (mostly the compile: a fixed cost per
    dump), each rounded up. The margin is for a slower or busier host and dumps scanned at
    the same time."""
    if not large_per_gib or not small_seconds:
        raise ValueError("no scan measured")
    return round_up(max(large_per_gib) * margin), round_up(max(small_seconds) * margin)


def blind_covers(
    blind_per_gib: float, seconds_per_gib: float, min_scan_seconds: float, share: float
) -> float | None:
    """The largest core (bytes) whose blind pass fits its ``share`` of the scan budget
    (``max(min_scan_seconds, seconds_per_gib * GiB)``) at ``blind_per_gib`` seconds per GiB,
    taken as linear in the size; None when every size fits."""
    if blind_per_gib <= share * seconds_per_gib:
        return None
    return share * min_scan_seconds / blind_per_gib * GIB


def toml_value(value: Any) -> str:
    """A TOML value for the gate's config (strings, numbers, booleans, lists of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        s = str(value)
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML value for {type(value).__name__}")


def gate_config(gate: dict[str, Any], detect: dict[str, Any]) -> str:
    """The text of a gate configuration file with these ``[gate]`` and ``[detect]`` settings."""
    lines = ["[gate]", *(f"{k} = {toml_value(v)}" for k, v in gate.items()), "", "[detect]"]
    lines += [f"{k} = {toml_value(v)}" for k, v in detect.items()]
    return "\n".join(lines) + "\n"


def handler_argv(python: str, config: Path, pid: int, exe: str, when: int) -> list[str]:
    """The handler as the installed wrapper runs it for the kernel's ``%P %I %u %g %s %t %c %d
    %h %E``: a SIGSEGV of root's process ``pid``, an ordinary dump (%d 1; %E: its executable,
    '/' written '!')."""
    return [
        *(python, "-I", "-m", "signer.gate", "handle", "--config", str(config), "--"),
        *(str(pid), str(pid), "0", "0", "11", str(when), str(CORE_LIMIT), "1", "bench"),
        exe.replace("/", "!"),
    ]


# --- the cores ----------------------------------------------------------------------------------


@dataclass
class Core:
    name: str
    path: Path
    what: str
    pid: int
    exe: str

    @property
    def size(self) -> int:
        return self.path.stat().st_size


def heap_core(work: Path, name: str, heap: tuple[int, int, int], ctx: Context) -> Core:
    """A gcore of :mod:`benchmarks.heap_process` holding ``heap`` (records, text, random MiB)."""
    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, "-m", "benchmarks.heap_process", *map(str, heap)]
    proc = subprocess.Popen(argv, cwd=root, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("ready"):
            raise RuntimeError(f"heap_process {heap} did not get ready: {line!r}")
        out = gcore(proc.pid, work / f"{name}.core")
    finally:
        proc.kill()
        proc.wait()
    records, text, blobs = heap
    what = (
        f"gcore of a Python process holding about {records} MiB of records (dicts), {text} MiB "
        f"of log-like text lines" + (f" and {blobs} MiB of random blobs" if blobs else "")
    )
    ctx.progress(f"core {name}: {out.stat().st_size / MIB:,.0f} MiB ({what})")
    return Core(name, out, what, proc.pid, sys.executable)


@dataclass
class KeyFiles:
    secrets: list[Path]
    public_dir: Path


def key_files(work: Path) -> KeyFiles:
    """Fresh keys, none of them in any core: ``RSA_KEYS`` RSA-2048 and ``EC_KEYS`` P-256
    private keys (PKCS#8 PEM) and ``PINS`` PIN files for known-secret mode, their public
    halves (SubjectPublicKeyInfo PEM, one file each) in a directory for blind mode."""
    secret_dir, public_dir = work / "secrets", work / "public-keys"
    secret_dir.mkdir(mode=0o700, parents=True)
    public_dir.mkdir(parents=True)
    files: list[Path] = []
    keys: list[rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey] = [
        rsa.generate_private_key(65537, 2048) for _ in range(RSA_KEYS)
    ]
    keys += [ec.generate_private_key(ec.SECP256R1()) for _ in range(EC_KEYS)]
    for i, key in enumerate(keys):
        kind = "rsa" if isinstance(key, rsa.RSAPrivateKey) else "ec"
        path = secret_dir / f"{kind}-{i + 1}.pem"
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (public_dir / path.name).write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        files.append(path)
    alphabet = string.ascii_letters + string.digits
    for i in range(PINS):
        path = secret_dir / f"user-{i + 1}.pin"
        path.write_text("".join(secrets.choice(alphabet) for _ in range(12)) + "\n")
        files.append(path)
    for path in files:
        path.chmod(0o600)
    return KeyFiles(files, public_dir)


# --- one run ------------------------------------------------------------------------------------


@dataclass
class Peaks:
    """Sampled from /proc: the handler's and its children's VmHWM and largest RssAnon, KiB."""

    handler_hwm: int = 0
    child_hwm: int = 0
    handler_anon: int = 0
    child_anon: int = 0


class Sampler:
    """Samples the handler and its children (the scan child) every ``SAMPLE_SECONDS``."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peaks = Peaks()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _read(self, pid: int) -> tuple[int, int]:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return 0, 0
        return status_kib(text, "VmHWM") or 0, status_kib(text, "RssAnon") or 0

    def _loop(self) -> None:
        p = self.peaks
        while not self._stop.is_set():
            hwm, anon = self._read(self.pid)
            p.handler_hwm, p.handler_anon = max(p.handler_hwm, hwm), max(p.handler_anon, anon)
            try:
                kids = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()
            except OSError:
                kids = []
            for kid in kids:
                hwm, anon = self._read(int(kid))
                p.child_hwm, p.child_anon = max(p.child_hwm, hwm), max(p.child_anon, anon)
            self._stop.wait(SAMPLE_SECONDS)

    def stop(self) -> Peaks:
        self._stop.set()
        self._thread.join()
        return self.peaks


@dataclass
class Run:
    seconds: float
    decision: str
    timings: dict[str, float] = field(default_factory=dict)
    maxrss_kib: int = 0
    peaks: Peaks = field(default_factory=Peaks)


@dataclass
class Gate:
    """One gate configuration under ``root``: quarantine ``q/``, state ``state/``, releases
    into ``released/``."""

    root: Path
    detect: dict[str, Any]
    seconds_per_gib: float = MEASURE_SECONDS_PER_GIB
    min_scan_seconds: float = 30.0

    def config(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "gate.toml"
        gate = {
            "state_dir": self.root / "state",
            "quarantine_dir": self.root / "q",
            "release_dir": self.root / "released",
            "seconds_per_gib": self.seconds_per_gib,
            "min_scan_seconds": self.min_scan_seconds,
            "min_free_bytes": 0,
        }
        path.write_text(gate_config(gate, self.detect))
        return path

    def clear(self) -> None:
        for sub in ("q", "released"):
            shutil.rmtree(self.root / sub, ignore_errors=True)


def _entry_meta(quarantine: Path, stderr: Path) -> dict[str, Any]:
    """The meta.json of the one entry a handler run made in ``quarantine``."""
    entries = sorted(quarantine.iterdir()) if quarantine.exists() else []
    if len(entries) != 1:
        said = stderr.read_text(errors="replace").strip()[-500:] if stderr.exists() else ""
        raise RuntimeError(f"the handler made {len(entries)} quarantine entries: {said}")
    meta: dict[str, Any] = json.loads((entries[0] / "meta.json").read_text())
    return meta


def run_once(core: Core, gate: Gate | None, dst: Path) -> Run:
    """Feeds ``core`` through a pipe into the handler (``gate``) or into ``cat > dst``."""
    argv = ["cat"]
    if gate is not None:
        argv = handler_argv(sys.executable, gate.config(), core.pid, core.exe, int(time.time()))
    os.sync()  # earlier runs' writes out of the way (not timed)
    began = time.perf_counter()
    feed = subprocess.Popen(["cat", str(core.path)], stdout=subprocess.PIPE)
    assert feed.stdout is not None
    try:
        if gate is None:
            with open(dst, "wb") as out:
                proc = subprocess.Popen(argv, stdin=feed.stdout, stdout=out)
        else:
            with open(gate.root / "stderr", "wb") as err:
                proc = subprocess.Popen(
                    argv,
                    stdin=feed.stdout,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    cwd="/",
                    env=KERNEL_ENV,
                )
    finally:
        feed.stdout.close()
    sampler = Sampler(proc.pid) if gate is not None else None
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    peaks = sampler.stop() if sampler is not None else Peaks()
    proc.returncode = os.waitstatus_to_exitcode(status)
    feed.wait(60)
    if gate is None:
        decision = "copied" if proc.returncode == 0 else f"cat exited {proc.returncode}"
        dst.unlink(missing_ok=True)
        return Run(seconds, decision, maxrss_kib=usage.ru_maxrss)
    meta = _entry_meta(gate.root / "q", gate.root / "stderr")
    gate.clear()
    timings = {k: float(v) for k, v in meta.get("timings", {}).items()}
    return Run(seconds, str(meta.get("decision")), timings, usage.ru_maxrss, peaks)


# --- the scenario -------------------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _mib(kib: float) -> str:
    return f"{kib / 1024:,.0f}"


def run(ctx: Context) -> ScenarioResult:
    work = (ctx.work / "gate").absolute()  # the handler runs in /
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    runs = max(1, min(ctx.runs, RUNS))
    real = ctx.core()
    cores = {
        "service": Core(
            "service",
            real.path,
            f"gcore of the real service after {real.signed} signatures under load "
            f"({real.load_seconds:g} s, 8 threads)",
            os.getpid(),
            sys.executable,
        ),
        "heap-1g": heap_core(work, "heap-1g", LARGE_HEAP, ctx),
        "heap-small": heap_core(work, "heap-small", BLIND_HEAP, ctx),
    }
    keys = key_files(work)
    detect: dict[str, dict[str, Any]] = {
        "known": {"secrets": keys.secrets, "structural": False},
        "structural": {"structural": True},
        "blind": {"public_keys": [keys.public_dir], "structural": True},
        "blind-likely": {
            "public_keys": [keys.public_dir],
            "structural": True,
            "blind_offsets": "likely",
        },
    }
    gates = {m: Gate(work / f"gate-{m}", d) for m, d in detect.items()}
    plan = {
        "service": ("cat", "known", "structural"),
        "heap-1g": ("cat", "known", "structural"),
        "heap-small": ("cat", "known", "structural", "blind", "blind-likely"),
    }
    results: dict[tuple[str, str], list[Run]] = {(c, m): [] for c, ms in plan.items() for m in ms}
    for cname, modes in plan.items():
        core = cores[cname]
        for r in range(runs):
            warm(core.path)  # the kernel streams a core from memory: the feeder reads it from RAM
            for mode in modes:
                done = run_once(core, gates.get(mode), work / "cat.out")
                results[(cname, mode)].append(done)
            ctx.progress(
                f"gate {cname} run {r + 1}/{runs}: "
                + ", ".join(
                    f"{m} {results[(cname, m)][-1].seconds:.2f}s "
                    f"({results[(cname, m)][-1].decision})"
                    for m in modes
                )
            )

    # Past the budget: blind mode on the 1 GiB core with a budget it cannot meet.
    over = Gate(
        work / "gate-over-budget",
        detect["blind"],
        seconds_per_gib=OVER_BUDGET_SECONDS * GIB / cores["heap-1g"].size,
        min_scan_seconds=1.0,
    )
    over_run = run_once(cores["heap-1g"], over, work / "cat.out")
    ctx.progress(f"gate over budget: {over_run.seconds:.2f}s ({over_run.decision})")
    return _result(ctx, runs, cores, results, over_run, keys)


def _result(
    ctx: Context,
    runs: int,
    cores: dict[str, Core],
    results: dict[tuple[str, str], list[Run]],
    over_run: Run,
    keys: KeyFiles,
) -> ScenarioResult:
    sizes = {c: core.size for c, core in cores.items()}
    data: dict[str, Any] = {"runs": runs, "cores": {}, "modes": {}, "over_budget": {}}
    for c, core in cores.items():
        data["cores"][c] = {"what": core.what, "size_bytes": sizes[c]}
    rows, detail = [], []
    large_per_gib: list[float] = []  # known and structural scans of the large cores, s/GiB
    small_seconds: list[float] = []  # ... of the small core, s
    for (c, m), done in results.items():
        t = Timing([r.seconds for r in done])
        cat_t = Timing([r.seconds for r in results[(c, "cat")]])
        spg = per_gib(t.median, sizes[c])
        scan = _median([r.timings["scan"] for r in done if "scan" in r.timings])
        receive = _median([r.timings["receive"] for r in done if "receive" in r.timings])
        release = _median([r.timings["release"] for r in done if "release" in r.timings])
        if scan is not None and m in ("known", "structural"):
            if sizes[c] >= SMALL_CORE:
                large_per_gib.append(per_gib(scan, sizes[c]) or 0.0)
            else:
                small_seconds.append(scan)
        decisions = sorted({r.decision for r in done})
        maxrss = max(r.maxrss_kib for r in done)
        handler_hwm = max(r.peaks.handler_hwm for r in done)
        child_hwm = max(r.peaks.child_hwm for r in done)
        anon = max(max(r.peaks.handler_anon, r.peaks.child_anon) for r in done)
        data["modes"][f"{c}/{m}"] = {
            "seconds": t.to_dict(),
            "seconds_per_gib": _round(spg, 3),
            "mb_per_s": _round(rate_mb_s(sizes[c], t.median)),
            "time_vs_cat": _round(t.median / cat_t.median, 3),
            "decisions": decisions,
            "median_receive_seconds": _round(receive, 3),
            "median_scan_seconds": _round(scan, 3),
            "median_release_seconds": _round(release, 4),
            "peak_rss_kib": maxrss,
            "handler_hwm_kib": handler_hwm,
            "scan_child_hwm_kib": child_hwm,
            "peak_anon_kib": anon,
        }
        rows.append(
            [
                f"{c} ({fmt_bytes(sizes[c])})",
                m,
                fmt_seconds(t.median),
                fmt_seconds(spg),
                fmt_rate(rate_mb_s(sizes[c], t.median)),
                f"{t.median / cat_t.median:.1f}x",
                ", ".join(decisions),
                _mib(maxrss),
            ]
        )
        if m != "cat":
            detail.append(
                [
                    c,
                    m,
                    fmt_seconds(receive),
                    fmt_seconds(scan),
                    fmt_seconds(release),
                    _mib(handler_hwm),
                    _mib(child_hwm),
                    _mib(anon),
                ]
            )
    suggested, suggested_min = suggest_budget(large_per_gib, small_seconds)
    blind = data["modes"]["heap-small/blind"]
    blind_scan = blind["median_scan_seconds"]
    blind_scan_per_gib = per_gib(blind_scan, sizes["heap-small"]) if blind_scan else None
    covers = (
        blind_covers(blind_scan_per_gib, suggested, suggested_min, BLIND_SHARE)
        if blind_scan_per_gib
        else None
    )
    data["blind_covers_bytes"] = None if covers is None else int(covers)
    released = all(
        r.decision == ("copied" if m == "cat" else "released")
        for (_, m), done in results.items()
        for r in done
    )
    over_meta = {
        "seconds": round(over_run.seconds, 3),
        "decision": over_run.decision,
        "timings": over_run.timings,
        "budget_seconds": OVER_BUDGET_SECONDS,
    }
    data["over_budget"] = over_meta
    data["suggested"] = {"seconds_per_gib": suggested, "min_scan_seconds": suggested_min}
    data["keys"] = {
        "secrets": [p.name for p in keys.secrets],
        "public_keys": RSA_KEYS + EC_KEYS,
    }

    def ratio(core: str, mode: str) -> float | None:
        """cat's median time / the gate's: the gate's throughput as a share of cat's."""
        gate_t = data["modes"][f"{core}/{mode}"]["seconds"]["median"]
        cat_t = data["modes"][f"{core}/cat"]["seconds"]["median"]
        return cat_t / gate_t if gate_t else None

    ratios = {
        "gate_known_vs_cat": ratio("heap-1g", "known"),
        "gate_structural_vs_cat": ratio("heap-1g", "structural"),
        "gate_blind_vs_cat_small_core": ratio("heap-small", "blind"),
        "gate_known_vs_cat_service_core": ratio("service", "known"),
    }
    figures = {
        "gate_s_per_gib_known": data["modes"]["heap-1g/known"]["seconds_per_gib"],
        "gate_s_per_gib_structural": data["modes"]["heap-1g/structural"]["seconds_per_gib"],
        "gate_s_per_gib_blind_small_core": blind["seconds_per_gib"],
        "gate_s_per_gib_cat": data["modes"]["heap-1g/cat"]["seconds_per_gib"],
        "gate_suggested_seconds_per_gib": suggested,
        "gate_suggested_min_scan_seconds": suggested_min,
    }
    table = Table(
        f"Dump gate end to end (stream in, scan, decide, release), medians of {runs} runs "
        "(MB = 10^6 bytes)",
        ["core", "mode", "median s", "s/GiB", "MB/s", "time ÷ cat's", "decision", "peak RSS MiB"],
        rows,
    )
    breakdown = Table(
        "Dump gate: where the time goes (medians, s, from meta.json) and memory (MiB)",
        ["core", "mode", "receive", "scan", "release", "handler HWM", "scan child HWM", "anon"],
        detail,
    )
    notes = [
        "Cores: " + "; ".join(f"{c} {fmt_bytes(sizes[c])}: {cores[c].what}" for c in cores) + ".",
        f"Modes: known = {RSA_KEYS} RSA-2048 and {EC_KEYS} P-256 PKCS#8 PEM files and {PINS} PIN "
        "files (structural off); structural = the private-key structure detectors only; blind "
        f"= the {RSA_KEYS + EC_KEYS} public keys (with the structural detectors). Fresh keys: "
        "the cores are clean, so every run should be released.",
        "Time: from the feeder's start (cat CORE into a pipe, as the kernel streams a core) to "
        "the handler's exit (python -I -m signer.gate handle, cwd /, the kernel's environment): "
        "start-up, receive (sparse, synced), scan in its child (patterns compiled per dump), "
        "decision, release into a release_dir (a rename). cat: the same feeder into cat > FILE "
        "(not synced). The page cache is warm and dirty pages are synced before each run.",
        f"Blind mode runs on the small core only (capped): {fmt_bytes(sizes['heap-small'])}, "
        "scan "
        + (f"{blind_scan_per_gib:,.0f} s/GiB" if blind_scan_per_gib else "n/a")
        + ". It verifies candidate windows one by one; high-entropy bytes (random, compressed, "
        "encrypted) are nearly all candidates, so on the big cores it would take far longer "
        "than this scenario may (issue 18). It gets "
        f"{BLIND_SHARE:g} of the scan budget: with the suggested budget below, it covers "
        + (
            "a core of any size"
            if covers is None
            else f"cores up to about {fmt_bytes(int(covers))}"
        )
        + " of memory like this core's (linear in size); a larger one is quarantined "
        "(quarantined:budget).",
        "Decisions: "
        + (
            "every gate run released its clean core, every cat copied it."
            if released
            else "NOT every run released its clean core (see the decision column)."
        ),
        f"Past the budget: blind mode on the heap-1g core with a scan budget of "
        f"{OVER_BUDGET_SECONDS:g} s: {over_run.decision} after {over_run.seconds:.1f} s "
        f"(scan {over_run.timings.get('scan', float('nan')):.1f} s); the core stays in "
        "quarantine.",
        f"Suggested budget: seconds_per_gib = {suggested:g} ({MARGIN:g}x the slowest "
        f"known/structural scan of a large core, {max(large_per_gib):.1f} s/GiB with its "
        f"compile, rounded up), min_scan_seconds = {suggested_min:g} ({MARGIN:g}x the slowest "
        f"scan of the small core, {max(small_seconds):.1f} s: mostly the patterns' compile, "
        "paid by every dump). Blind mode is not in it (see above): with public keys "
        "configured, a core its share of the budget cannot cover is quarantined.",
        "peak RSS: wait4's ru_maxrss of the handler (the larger of it and its scan child); "
        "HWM: VmHWM of each, anon: the largest RssAnon of either, sampled every 20 ms (the scan "
        "child maps the core, so its HWM counts the page-cache pages it read).",
    ]
    ctx.progress(
        f"gate: suggested seconds_per_gib {suggested:g}, min_scan_seconds {suggested_min:g}"
    )
    return ScenarioResult(NAME, data, ratios, [table, breakdown], notes, figures)


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)
