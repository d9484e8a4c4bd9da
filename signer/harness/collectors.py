"""Where crash dumps come from: the kernel (file or pipe ``core_pattern``), ``gcore``, and the
dump gate (the kernel's pipe to :mod:`signer.gate`, installed around a row)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from signer.errors import HarnessError, SignerError
from signer.gate import GateRoot

CORE_PATTERN = Path("/proc/sys/kernel/core_pattern")


@dataclass(frozen=True)
class KernelCollector:
    """How this host's kernel writes cores: to a file pattern, or through a pipe to a program."""

    pattern: str

    @classmethod
    def detect(cls) -> KernelCollector:
        return cls(CORE_PATTERN.read_text().strip())

    @property
    def is_pipe(self) -> bool:
        return self.pattern.startswith("|")

    @property
    def pipe_program(self) -> str:
        return Path(self.pattern[1:].split()[0]).name if self.is_pipe else ""

    @property
    def name(self) -> str:
        """'kernel-file', 'kernel-pipe:systemd-coredump', 'kernel-pipe:apport', ..."""
        return f"kernel-pipe:{self.pipe_program}" if self.is_pipe else "kernel-file"

    @property
    def usable(self) -> bool:
        """Whether a core written by this kernel can be fetched here."""
        if not self.is_pipe:
            return True
        return self.pipe_program == "systemd-coredump" and shutil.which("coredumpctl") is not None

    def directory(self, cwd: Path) -> Path:
        """Where a file pattern puts cores of a process running in ``cwd``."""
        if "/" in self.pattern:
            return Path(self.pattern).parent
        return cwd

    def fetch(self, pid: int, cwd: Path, since: float, out: Path, timeout: float = 60.0) -> Path:
        """The core of ``pid`` once the kernel (or the pipe collector) has finished writing it."""
        if self.is_pipe:
            return self._fetch_pipe(pid, out, timeout)
        where = self.directory(cwd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cores = sorted(
                (p for p in where.glob("core*") if p.is_file() and p.stat().st_mtime >= since - 1),
                key=lambda p: p.stat().st_mtime,
            )
            if cores:
                os.replace(cores[-1], out)
                return out
            time.sleep(0.1)
        raise HarnessError(f"no core file appeared in {where} (core_pattern {self.pattern!r})")

    def _fetch_pipe(self, pid: int, out: Path, timeout: float) -> Path:
        if self.pipe_program != "systemd-coredump":
            raise HarnessError(f"cannot fetch cores from pipe collector {self.pipe_program!r}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = subprocess.run(
                ["coredumpctl", "dump", str(pid), "--output", str(out)],
                capture_output=True,
                check=False,
            )
            if r.returncode == 0 and out.exists() and out.stat().st_size > 0:
                return out
            time.sleep(0.5)
        raise HarnessError(f"coredumpctl has no core for pid {pid}")


def gcore(pid: int, out: Path, all_mappings: bool = False, timeout: float = 120.0) -> Path:
    """A non-fatal snapshot with gdb's gcore; ``all_mappings`` is ``gcore -a`` (ignores
    coredump_filter and MADV_DONTDUMP: everything the process maps)."""
    prefix = out.with_suffix("")
    args = ["gcore", *(["-a"] if all_mappings else []), "-o", str(prefix), str(pid)]
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    produced = Path(f"{prefix}.{pid}")
    if r.returncode != 0 or not produced.exists():
        raise HarnessError(f"gcore failed ({r.returncode}): {r.stderr.strip()[-400:]}")
    os.replace(produced, out)
    return out


@dataclass(frozen=True)
class GateDump:
    """What the gate did with one dump: its decision and reason, the secrets its own report
    names (file names, as the gate's config gives them), and where the core now is."""

    decision: str
    reason: str
    found: frozenset[str]
    core: Path


@dataclass
class GateCollector(GateRoot):
    """The dump gate as the kernel's collector. :meth:`installed` makes it ``core_pattern`` for
    the length of a row, over a file pattern in ``root/released`` (the destination it replaces,
    so a release is a file there), and puts back what was there before, whatever happens.
    :meth:`fetch` waits for the gate's decision on a pid and moves its core out: from where it
    was released, or from the quarantine (kept: findings, budget, error)."""

    secrets: tuple[Path, ...]
    """The known-secret files the gate's config names (keys, ``*.pin`` files)."""
    name: str = "dump-gate"
    timeout: float = 300.0
    _ready: bool = field(default=False, repr=False)

    @property
    def secret_ids(self) -> frozenset[str]:
        return frozenset(p.name for p in self.secrets)

    def _prepare(self) -> None:
        if self._ready:
            return
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        (self.root / "sbin").mkdir(mode=0o755, exist_ok=True)
        self.released.mkdir(mode=0o700, exist_ok=True)
        secrets = ", ".join(json.dumps(str(p)) for p in self.secrets)
        self.config.write_text(
            f"[gate]\nstate_dir = {json.dumps(str(self.state_dir))}\n"
            f"quarantine_dir = {json.dumps(str(self.quarantine))}\n"
            f"[detect]\nsecrets = [{secrets}]\nstructural = true\n"
        )
        os.chmod(self.config, 0o600)
        self._ready = True

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The gate as core_pattern meanwhile; the kernel's settings as they were after."""
        from signer.gate._install import KERNEL, install, uninstall

        self._prepare()
        before = (KERNEL.pattern(), KERNEL.pipe_limit())
        try:
            KERNEL.core_pattern.write_text(f"{self.released}/core.%p\n")
            try:
                install(self.config, pipe_limit=4, wrapper=self.wrapper)
            except SignerError as exc:
                raise HarnessError(f"the dump gate could not be installed: {exc.message}") from exc
            yield
        finally:
            with contextlib.suppress(SignerError, OSError):
                uninstall(self.config, state_dir=self.state_dir)
            if (KERNEL.pattern(), KERNEL.pipe_limit()) != before:
                KERNEL.core_pipe_limit.write_text(f"{before[1]}\n")
                KERNEL.core_pattern.write_text(f"{before[0]}\n")

    def decision(self, pid: int) -> dict[str, object] | None:
        """The gate's log record of ``pid``'s dump, once it has decided."""
        try:
            lines = (self.state_dir / "gate.log").read_text().splitlines()
        except FileNotFoundError:
            return None
        for line in lines:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and rec.get("pid") == pid and "decision" in rec:
                    return rec
        return None

    def fetch(self, pid: int, out: Path) -> GateDump:
        """``pid``'s core moved to ``out`` once the gate has decided on it."""
        deadline = time.monotonic() + self.timeout
        rec = self.decision(pid)
        while rec is None and time.monotonic() < deadline:
            time.sleep(0.1)
            rec = self.decision(pid)
        if rec is None:
            raise HarnessError(f"the dump gate decided nothing on pid {pid} in {self.timeout:g} s")
        decision, reason = str(rec["decision"]), str(rec.get("reason", ""))
        entries = sorted(self.quarantine.glob(f"*-{pid}-*"))
        entry = entries[-1] if entries else None
        found = _report_ids(entry / "report.json") if entry is not None else frozenset()
        src = self.released / f"core.{pid}" if decision == "released" else None
        if src is None and entry is not None:
            src = entry / "core"
        if src is None or not src.exists():
            raise HarnessError(f"the dump gate kept no core of pid {pid}: {decision}: {reason}")
        shutil.move(src, out)
        return GateDump(decision, reason, found, out)


def _report_ids(path: Path) -> frozenset[str]:
    """The secrets a gate report names."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return frozenset()
    results = data if isinstance(data, list) else data.get("results", [data])
    return frozenset(
        str(f["secret_id"]) for r in results if isinstance(r, dict) for f in r.get("findings", [])
    )
