"""The handler the kernel runs for each core dump: receive, quarantine, scan, decide, release.

It runs as root, with no terminal, standard input the kernel's pipe, ``/`` its working directory,
and the crashed process held by the kernel until it exits. Whatever goes wrong ends in
quarantine or in no dump at all, never in a release; ``meta.json`` and the log say why.

    decision               when                                             the core
    released               scanned clean and whole, within the budget       released, removed
    quarantined:findings   the scan found key material                      kept (+ sanitised copy)
    quarantined:too-big    larger than max_core_bytes (the rest not kept)   first part kept
    quarantined:budget     the scan did not finish within its budget        kept
    quarantined:error      the config, the scan, a write or the release     kept
                           failed
    dropped:no-space       the quarantine would fall below min_free_bytes   not kept
                           or grow past max_quarantine_bytes
    dropped:error          no quarantine directory could be made            not kept

``meta.json`` stays in the entry's directory whatever happens (install's status counts them).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from signer._internal.children import never_dump
from signer._internal.config import parse_toml, read_text
from signer.errors import ConfigError, GateError
from signer.gate._config import GateConfig, load_config, quarantine_bytes
from signer.gate._crash import Crash
from signer.gate._files import private_dir, write_json
from signer.gate._log import gate_logger
from signer.gate._receive import Received, let_go, receive
from signer.gate._release import ReleaseError, release, release_seconds, run_as_kernel
from signer.gate._scan import ScanOutcome, described, scan

WATCHDOG_SLACK = 120.0
"""Beyond the sum of the steps' own bounds, before the watchdog ends the gate."""
NOTIFY_SECONDS = 30.0
"""How long the notification command may run; then it is killed (the decision is made)."""

DECISIONS = (
    "released",
    "quarantined:findings",
    "quarantined:too-big",
    "quarantined:budget",
    "quarantined:error",
    "dropped:no-space",
    "dropped:error",
)


@dataclass(frozen=True)
class Outcome:
    """What the gate decided, why, and where its record is (``entry``: the quarantine
    directory, None when none could be made)."""

    decision: str
    reason: str
    entry: Path | None
    meta: dict[str, Any]

    @property
    def released(self) -> bool:
        return self.decision == "released"


def decide(received: Received, scanned: ScanOutcome | None) -> tuple[str, str]:
    """The decision and its reason from what was received and what the scan said (None: no
    scan was made). Anything but a whole core scanned clean and completely is not released."""
    if received.no_space:
        return "dropped:no-space", received.no_space
    if received.error:
        return "quarantined:error", received.error
    if scanned is None:
        return "quarantined:error", "the core was not scanned"
    cut = (
        f"; the core is larger than max_core_bytes: {received.received} bytes, "
        f"{received.stored} kept"
        if received.truncated
        else ""
    )
    if scanned.status == "done" and scanned.findings:
        n = scanned.findings
        return "quarantined:findings", f"{n} finding{'s' * (n != 1)} (see report.json){cut}"
    if received.truncated:
        return "quarantined:too-big", cut[2:].replace("the core", "The core", 1)
    if scanned.status == "budget":
        return "quarantined:budget", scanned.reason or "over budget"
    if scanned.status != "done":
        return "quarantined:error", scanned.reason or "the scan failed"
    if scanned.incomplete:
        kind = "budget" if scanned.over_budget else "error"
        return f"quarantined:{kind}", scanned.incomplete
    return "released", "scanned clean"


# --- the steps -------------------------------------------------------------------------------


def protect_self() -> None:
    """No core of the gate itself (it holds what it searches for) and no recursion: not
    dumpable, and RLIMIT_CORE 1, which the kernel reads as 'a pipe handler crashed: no dump'.
    Descriptors 1 and 2 on /dev/null if the kernel left them closed (a file opened next would
    otherwise take them, and a stray print write into it)."""
    for fd in (1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    never_dump()


def _config(path: Path) -> tuple[GateConfig, str | None]:
    """The configuration, or (when it cannot be read) the defaults with the state and
    quarantine directories the file names if it parses that far, and the error."""
    try:
        return load_config(path), None
    except ConfigError as exc:
        error = exc.message
    fallback = GateConfig(path=path)
    with contextlib.suppress(ConfigError):
        gate = parse_toml(read_text(path), str(path)).get("gate", {})
        for key in ("state_dir", "quarantine_dir"):
            if isinstance(gate, dict) and isinstance(gate.get(key), str) and gate[key]:
                fallback = replace(fallback, **{key: path.absolute().parent / gate[key]})
    return fallback, error


def _entry(quarantine: Path, crash: Crash) -> Path:
    """A new 0700 directory for this dump in the quarantine."""
    private_dir(quarantine)
    base = crash.dir_name()
    for n in range(1000):
        entry = quarantine / (base if n == 0 else f"{base}.{n}")
        try:
            entry.mkdir(mode=0o700)
            return entry
        except FileExistsError:
            continue
    raise GateError(f"{quarantine} holds 1000 entries named {base}")


def _notify(argv: tuple[str, ...], report: Path) -> dict[str, Any]:
    """Runs the notification command with the report's path last; bounded in time; its
    failure is recorded, nothing more."""
    began = time.monotonic()
    try:
        proc = run_as_kernel([*argv, str(report)], subprocess.DEVNULL)
    except OSError as exc:
        return {"ok": False, "error": f"{argv[0]} cannot run: {exc.strerror}"}
    try:
        rc = proc.wait(NOTIFY_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return {"ok": False, "error": f"{argv[0]} killed after {NOTIFY_SECONDS:g} s"}
    out: dict[str, Any] = {"ok": rc == 0, "status": rc}
    out["seconds"] = round(time.monotonic() - began, 3)
    return out


def _version() -> str:
    try:
        return metadata.version("signer")
    except metadata.PackageNotFoundError:
        return "0"


# --- the handler -----------------------------------------------------------------------------


class _Run:
    """One dump's way through the gate; ``meta`` is what meta.json says at each step."""

    def __init__(self, config_path: Path, crash: Crash, stdin: int) -> None:
        self.began = time.monotonic()
        self.crash, self.stdin = crash, stdin
        self.cfg, self.config_error = _config(config_path)
        self.state_error = self._state_dir_error()
        self.log = gate_logger(self.cfg.state_dir if self.state_error is None else None)
        self.entry: Path | None = None
        self.timings: dict[str, float] = {}
        self.meta: dict[str, Any] = {
            "gate": _version(),
            "config": str(config_path.absolute()),
            **crash.to_dict(),
            "dir": None,
            "size": 0,
            "received": 0,
            "truncated": False,
            "stage": "receiving",
            "decision": None,
            "reason": None,
        }

    def _state_dir_error(self) -> str | None:
        """Why the state directory may not be trusted (its gate.log and state.json), or None."""
        try:
            private_dir(self.cfg.state_dir)
            return None
        except GateError as exc:
            return exc.message
        except OSError as exc:
            return f"{self.cfg.state_dir}: {exc.strerror}"

    def _room(self) -> int:
        """What the quarantine may still take under max_quarantine_bytes (set)."""
        return max(0, self.cfg.max_quarantine_bytes - quarantine_bytes(self.cfg.quarantine_dir))

    def save(self) -> None:
        if self.entry is None:
            return
        self.meta["timings"] = {k: round(v, 3) for k, v in self.timings.items()}
        try:
            write_json(self.entry / "meta.json", self.meta)
        except OSError as exc:
            self.log.error(
                "meta.json cannot be written",
                extra={"dir": str(self.entry), "error": exc.strerror},
            )

    def run(self, problem: str | None = None) -> Outcome:
        try:
            decision, reason = self._steps(problem)
        except Exception as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            decision = "quarantined:error" if self.entry is not None else "dropped:error"
            reason = f"the gate failed: {described(exc)} at {Path(where.filename).name}:"
            reason += str(where.lineno)
            let_go(self.stdin)
        return self._decided(decision, reason)

    def _steps(self, problem: str | None) -> tuple[str, str]:
        try:
            self.entry = _entry(self.cfg.quarantine_dir, self.crash)
        except (GateError, OSError) as exc:
            let_go(self.stdin)
            what = exc.message if isinstance(exc, GateError) else exc.strerror
            return "dropped:error", f"no quarantine directory: {what}"
        self.meta["dir"] = self.entry.name
        self.save()
        core = self.entry / "core"
        fd = os.open(
            core, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            got = receive(
                self.stdin,
                fd,
                max_bytes=self.cfg.max_core_bytes,
                min_free=self.cfg.min_free_bytes,
                room=self._room if self.cfg.max_quarantine_bytes else None,
            )
        finally:
            os.close(fd)
        if got.truncated or got.no_space or got.error:
            let_go(self.stdin)  # not all read: the kernel ends the dump
        # From here every step has its own bound; this one ends the gate (and so its hold on
        # the kernel) if some step's bound fails, a hung file system's write for one. Killed,
        # it has released nothing: the core stays in quarantine, meta.json at its last stage.
        budget = self.cfg.budget_seconds(got.stored)
        signal.alarm(math.ceil(budget + release_seconds(budget) + NOTIFY_SECONDS + WATCHDOG_SLACK))
        self.timings["receive"] = got.seconds
        self.meta.update(size=got.stored, received=got.received, truncated=got.truncated)
        if got.no_space:
            core.unlink()
        if problem is not None and not got.no_space:
            return "quarantined:error", problem
        if self.config_error is not None and not got.no_space:
            return "quarantined:error", f"configuration: {self.config_error}"
        scanned = None
        if not (got.no_space or got.error):
            self.meta["stage"] = "scanning"
            self.save()
            scanned = scan(self.cfg, core)
            self.timings["scan"] = scanned.seconds
            self.meta["scan"] = {
                "status": scanned.status,
                "budget_seconds": round(scanned.budget_seconds, 3),
                "findings": scanned.findings,
                "complete": scanned.complete,
                "notes": scanned.notes,
            }
            if scanned.findings:
                self.meta["sanitised"] = scanned.sanitised
        decision, reason = decide(got, scanned)
        if decision == "released" and self.cfg.release_dir is None and self.state_error:
            # state.json names the handler to chain to, run as root: only from a directory
            # no one else could have written (review).
            return "quarantined:error", f"scanned clean, but state_dir: {self.state_error}"
        if decision == "released":
            self.meta["stage"] = "releasing"
            self.save()
            try:
                done = release(
                    self.crash,
                    core,
                    self.entry.name,
                    self.cfg.release_dir,
                    self.cfg.state_dir,
                    self.cfg.budget_seconds(got.stored),
                )
            except ReleaseError as exc:
                return "quarantined:error", f"scanned clean, but {exc.message}"
            self.timings["release"] = done.seconds
            self.meta["release"] = {"to": done.to, "notes": done.notes}
            with contextlib.suppress(FileNotFoundError):
                core.unlink()  # moved already when released to a directory
        return decision, reason

    def _decided(self, decision: str, reason: str) -> Outcome:
        self.timings["total"] = time.monotonic() - self.began
        self.meta.update(
            stage="done",
            decision=decision,
            reason=reason,
            decided_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self.save()
        self.log.log(
            logging.INFO if decision == "released" else logging.WARNING,
            f"dump {decision}",
            extra={
                "pid": self.crash.pid,
                "uid": self.crash.uid,
                "exe": self.crash.exe,
                "signal": self.crash.signal,
                "size": self.meta.get("received", 0),
                "decision": decision,
                "reason": reason,
                "seconds": round(self.timings["total"], 3),
                "dir": str(self.entry) if self.entry else None,
            },
        )
        if decision != "released" and self.cfg.notify:
            where = self.entry or self.cfg.quarantine_dir
            report = where / "report.json"
            notified = _notify(self.cfg.notify, report if report.exists() else where / "meta.json")
            self.meta["notify"] = notified
            self.save()
            if not notified["ok"]:
                self.log.warning(
                    "notification failed",
                    extra={"pid": self.crash.pid, "dir": str(where), **notified},
                )
        return Outcome(decision, reason, self.entry, self.meta)


def handle(
    config: str | Path, crash: Crash, stdin: int = 0, *, problem: str | None = None
) -> Outcome:
    """Takes the core on ``stdin`` (a descriptor: the kernel's pipe) through the gate. Never
    raises for a problem of the dump, the configuration or the host: the outcome says it.
    ``problem``: why the kernel's arguments could not be read (the dump is then kept in
    quarantine and neither scanned nor released)."""
    protect_self()
    # /proc/PID first, before anything slow: the pid names the crashing process only while
    # the kernel holds it (see signer.gate._crash).
    crash, unattached = crash.attached() if problem is None else (crash, None)
    try:
        run = _Run(Path(config), crash, stdin)
    except Exception as exc:  # not even a log: the dump is not kept
        let_go(stdin)
        return Outcome("dropped:error", f"the gate could not start: {described(exc)}", None, {})
    run.meta["proc"] = unattached or "held"
    try:
        return run.run(problem)
    finally:
        signal.alarm(0)
        if crash.process is not None:
            crash.process.close()
