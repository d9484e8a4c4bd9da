"""The gate in the kernel: ``signer dump-gate install | uninstall | status``.

Installing writes a small wrapper (root's, 0755, in a directory only root can write, by default
``/usr/local/sbin/signer-dump-gate``) that runs ``python -I -m signer.gate handle --config FILE``
with this virtualenv's interpreter, records what it replaces in ``state_dir/state.json`` and only
then points ``/proc/sys/kernel/core_pattern`` at it (and sets ``core_pipe_limit``, so the kernel
keeps ``/proc/PID`` until the handler exits). Everything the kernel will run as root for every
crash on the host (the wrapper, the interpreter, this package, the config whose ``notify`` names
a command) must be writable by root alone: install refuses otherwise, naming the path.

The kernel gives a pipe helper no environment (no ``PATH``: every path in the wrapper is absolute)
and at most 127 bytes of pattern (``CORENAME_MAX_SIZE`` with its NUL); a longer one would be cut
short silently, so install refuses it, and reads the pattern back after setting it.

A re-install over the gate's own pattern (to change the wrapper or the pipe limit) keeps the
pattern the first install replaced: the gate is never recorded as its own previous destination.
A pattern that runs another gate this state file does not know is refused. Uninstall restores the
recorded pattern and pipe limit only if ``core_pattern`` is still the gate's; if something else
has been set since, it says what it found and leaves it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import stat
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from signer._internal.files import write_atomic
from signer.errors import ConfigError, GateError

if TYPE_CHECKING:
    from signer.gate._config import GateConfig

DEFAULT_CONFIG = Path("/etc/signer/dump-gate.toml")
DEFAULT_WRAPPER = Path("/usr/local/sbin/signer-dump-gate")
DEFAULT_PIPE_LIMIT = 16
# CORENAME_MAX_SIZE is 128 with the terminating NUL.
PATTERN_LIMIT = 127
# What the handler is given (gate.md, interface 3): PID TID UID GID SIGNAL TIME CORE_LIMIT HOST EXE.
SPECIFIERS = "%P %i %u %g %s %t %c %h %E"
WRAPPER_TAG = "# signer dump-gate: the kernel's core_pattern runs this for every crash on the host"
STATE_FILE = "state.json"
GATE_LOG = "gate.log"
# How many of the newest decisions status shows.
RECENT = 10


@dataclass(frozen=True)
class Kernel:
    """The two settings the gate changes. Only tests of this module's logic pass other files."""

    core_pattern: Path = Path("/proc/sys/kernel/core_pattern")
    core_pipe_limit: Path = Path("/proc/sys/kernel/core_pipe_limit")

    def pattern(self) -> str:
        return self.core_pattern.read_text().rstrip("\n")

    def pipe_limit(self) -> int:
        return int(self.core_pipe_limit.read_text().strip())

    def set(self, pattern: str, pipe_limit: int) -> None:
        """The pipe limit first: the pattern's first crash already finds it."""
        self.core_pipe_limit.write_text(f"{pipe_limit}\n")
        self.core_pattern.write_text(f"{pattern}\n")
        if self.pattern() != pattern:
            raise GateError(
                f"the kernel kept {self.pattern()!r} of core_pattern {pattern!r}: not set"
            )


KERNEL = Kernel()


@dataclass(frozen=True)
class GateState:
    """``state_dir/state.json``: what install replaced, read by the handler to release."""

    installed: bool
    previous_pattern: str
    previous_pipe_limit: int
    gate_pattern: str
    config: str
    wrapper: str = ""
    python: str = ""
    installed_at: str = ""
    uninstalled_at: str = ""
    uninstall_note: str = ""

    @classmethod
    def read(cls, state_dir: Path) -> GateState | None:
        path = state_dir / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise GateError(f"{path}: cannot read the gate's state: {exc}") from exc
        known = {f for f in cls.__dataclass_fields__}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except TypeError as exc:
            raise GateError(f"{path}: not a state file of the gate: {exc}") from exc

    def write(self, state_dir: Path) -> Path:
        """Atomically (a new file renamed over the old), 0600."""
        path = state_dir / STATE_FILE
        write_atomic(path, json.dumps(asdict(self), indent=2) + "\n", 0o600)
        return path


@dataclass(frozen=True)
class Installed:
    """What install did, in the words it prints."""

    pattern: str
    previous_pattern: str
    previous_pipe_limit: int
    pipe_limit: int
    wrapper: Path
    state_file: Path
    reinstall: bool

    def lines(self) -> list[str]:
        verb = "re-installed" if self.reinstall else "installed"
        kept = " (kept from the first install)" if self.reinstall else ""
        return [
            f"dump gate {verb}: core_pattern is now {self.pattern!r}",
            f"  replaced: {self.previous_pattern!r}{kept}, core_pipe_limit "
            f"{self.previous_pipe_limit} -> {self.pipe_limit}",
            f"  wrapper:  {self.wrapper} (root, 0755)",
            f"  state:    {self.state_file}",
            "  'signer dump-gate uninstall' restores the replaced pattern",
        ]


@dataclass(frozen=True)
class Uninstalled:
    """``restored``: the replaced pattern is back. ``left``: core_pattern was not the gate's
    (something else set it since the install), so nothing was restored."""

    restored: bool
    found_pattern: str
    previous_pattern: str
    previous_pipe_limit: int
    note: str
    left: bool = False

    def lines(self) -> list[str]:
        return [self.note]


# --- install / uninstall -------------------------------------------------------------------------


def gate_pattern(wrapper: Path) -> str:
    """The core_pattern that runs ``wrapper``; refused if the kernel could not take it whole."""
    text = str(wrapper)
    if not wrapper.is_absolute() or any(c.isspace() or c == "%" for c in text):
        raise GateError(
            f"wrapper path {text!r} must be absolute, without spaces or '%' (the kernel splits "
            "core_pattern on spaces and expands '%')"
        )
    pattern = f"|{text} {SPECIFIERS}"
    size = len(pattern.encode())
    if size > PATTERN_LIMIT:
        raise GateError(
            f"core_pattern {pattern!r} is {size} bytes; the kernel keeps {PATTERN_LIMIT}: "
            "choose a shorter wrapper path (--wrapper)"
        )
    return pattern


def wrapper_text(python: str, config: Path) -> str:
    return (
        "#!/bin/sh\n"
        f"{WRAPPER_TAG}\n"
        f"exec {shlex.quote(python)} -I -m signer.gate handle "
        # '--': what the kernel passes is never an option, whatever a crashing process made of
        # its hostname (%h; any user can set it in a user namespace): '-x' or '--config=...'
        # would otherwise end the gate before it read the dump, or choose its config.
        f'--config {shlex.quote(str(config))} -- "$@"\n'
    )


def install(
    config: Path = DEFAULT_CONFIG,
    *,
    pipe_limit: int = DEFAULT_PIPE_LIMIT,
    wrapper: Path = DEFAULT_WRAPPER,
    python: str | None = None,
    kernel: Kernel = KERNEL,
) -> Installed:
    """Installs the gate as the kernel's core_pattern; see the module's docstring."""
    _need_root("install")
    if pipe_limit < 1:
        raise GateError(
            f"--pipe-limit {pipe_limit}: must be 1 or more (0 lets the kernel reap the "
            "crashed process before the gate has read it)"
        )
    config = Path(os.path.abspath(config))
    python = python or sys.executable
    cfg = _load(config)
    pattern = gate_pattern(wrapper)
    _check_trusted(config, python, wrapper, cfg)

    current = kernel.pattern()
    state = GateState.read(cfg.state_dir)
    reinstall = state is not None and state.installed and current == state.gate_pattern
    if state is not None and reinstall:
        previous, previous_limit = state.previous_pattern, state.previous_pipe_limit
    elif is_gate_pattern(current):
        raise GateError(
            f"core_pattern already runs a dump gate ({current!r}) that "
            f"{cfg.state_dir / STATE_FILE} does not record: uninstall it with the config it was "
            "installed with first; not installing over it"
        )
    else:
        previous, previous_limit = current, kernel.pipe_limit()

    for d in (cfg.state_dir, cfg.quarantine_dir):
        _root_dir(d)
    write_atomic(wrapper, wrapper_text(python, config), 0o755)
    new = GateState(
        installed=True,
        previous_pattern=previous,
        previous_pipe_limit=previous_limit,
        gate_pattern=pattern,
        config=str(config),
        wrapper=str(wrapper),
        python=python,
        installed_at=_now(),
    )
    state_file = new.write(cfg.state_dir)
    try:
        kernel.set(pattern, pipe_limit)
    except (OSError, GateError):
        with contextlib.suppress(OSError, GateError):
            kernel.set(previous, previous_limit)
        replace(new, installed=False, uninstall_note="install failed").write(cfg.state_dir)
        raise
    return Installed(
        pattern, previous, previous_limit, pipe_limit, wrapper, state_file, reinstall=reinstall
    )


def uninstall(
    config: Path = DEFAULT_CONFIG, *, state_dir: Path | None = None, kernel: Kernel = KERNEL
) -> Uninstalled:
    """Restores what install replaced, if core_pattern is still the gate's; marks the state
    uninstalled either way. ``state_dir`` is for a config that no longer loads."""
    _need_root("uninstall")
    if state_dir is None:
        state_dir = _load(Path(os.path.abspath(config))).state_dir
    state = GateState.read(state_dir)
    current = kernel.pattern()
    if state is None or not state.installed:
        return Uninstalled(
            False,
            current,
            "" if state is None else state.previous_pattern,
            0 if state is None else state.previous_pipe_limit,
            f"dump gate not installed (by {state_dir / STATE_FILE}); core_pattern is "
            f"{current!r}: left as it is",
        )
    if current == state.gate_pattern:
        kernel.set(state.previous_pattern, state.previous_pipe_limit)
        restored = True
        note = (
            f"dump gate uninstalled: core_pattern restored to {state.previous_pattern!r}, "
            f"core_pipe_limit to {state.previous_pipe_limit}"
        )
        wrapper = Path(state.wrapper)
        with contextlib.suppress(OSError):
            if WRAPPER_TAG in wrapper.read_text(errors="replace"):
                wrapper.unlink()
                note += f"; {wrapper} removed"
    else:
        restored = False
        note = (
            f"core_pattern is {current!r}, not the gate's ({state.gate_pattern!r}): something "
            f"else set it since the install; left as it is (the gate had replaced "
            f"{state.previous_pattern!r}). The state is marked uninstalled"
        )
    replace(state, installed=False, uninstalled_at=_now(), uninstall_note=note).write(state_dir)
    return Uninstalled(
        restored,
        current,
        state.previous_pattern,
        state.previous_pipe_limit,
        note,
        left=not restored,
    )


def is_gate_pattern(pattern: str) -> bool:
    """Whether ``pattern`` pipes to a dump gate's wrapper (by its tag, or its name)."""
    if not pattern.startswith("|"):
        return False
    program = Path(pattern[1:].split()[0]) if pattern[1:].split() else Path()
    if program.name == DEFAULT_WRAPPER.name or "signer.gate" in pattern:
        return True
    try:
        with program.open("rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return WRAPPER_TAG.encode() in head


# --- status --------------------------------------------------------------------------------------


@dataclass
class GateStatus:
    """What ``signer dump-gate status`` reports."""

    installed: bool
    core_pattern: str
    core_pipe_limit: int
    config: str
    state: dict[str, Any] | None = None
    config_error: str = ""
    settings: dict[str, Any] = field(default_factory=dict)
    decisions: dict[str, int] = field(default_factory=dict)  # by decision, from gate.log
    quarantine: list[dict[str, Any]] = field(default_factory=list)  # dumps still held
    quarantine_bytes: int = 0
    recent: list[dict[str, Any]] = field(default_factory=list)  # newest decisions first
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def lines(self) -> list[str]:
        state = self.state or {}
        head = "installed" if self.installed else "NOT installed"
        if self.installed and state.get("installed_at"):
            head += f" since {state['installed_at']}"
        out = [
            f"dump gate: {head}",
            f"  core_pattern:    {self.core_pattern!r} (core_pipe_limit {self.core_pipe_limit})",
        ]
        if state:
            out.append(
                f"  replaced:        {state.get('previous_pattern', '')!r} (core_pipe_limit "
                f"{state.get('previous_pipe_limit', '?')})"
                + ("" if state.get("installed") else ", restored or left at uninstall")
            )
            if state.get("wrapper"):
                out.append(f"  wrapper:         {state['wrapper']}")
        out.append(f"  config:          {self.config}")
        if self.config_error:
            out.append(f"  config ERROR:    {self.config_error}")
        for k, v in self.settings.items():
            out.append(f"    {k + ':':<17}{v}")
        total = sum(self.decisions.values())
        counts = ", ".join(f"{d} {n}" for d, n in sorted(self.decisions.items()))
        out.append(f"decisions (gate.log): {total}" + (f": {counts}" if counts else ""))
        out.append(
            f"in quarantine: {len(self.quarantine)} dumps, {self.quarantine_bytes / 2**20:.1f} MiB"
        )
        for q in self.quarantine:
            out.append(
                f"  {q['dir']}  {q.get('decision', '?')}  pid {q.get('pid', '?')} "
                f"{q.get('exe', '?')} signal {q.get('signal', '?')}: {q.get('reason', '')}"
            )
        if self.recent:
            out.append("newest decisions:")
            for r in self.recent:
                out.append(
                    f"  {r.get('time', '?')}  {r.get('decision', '?')}  pid {r.get('pid', '?')} "
                    f"uid {r.get('uid', '?')} {r.get('exe', '?')} signal {r.get('signal', '?')}"
                    + (f": {r['reason']}" if r.get("reason") else "")
                )
        out += [f"note: {n}" for n in self.notes]
        return out


def status(
    config: Path = DEFAULT_CONFIG, *, state_dir: Path | None = None, kernel: Kernel = KERNEL
) -> GateStatus:
    """Installed or not, what was replaced, the config, and what the gate has decided."""
    config = Path(os.path.abspath(config))
    st = GateStatus(False, kernel.pattern(), kernel.pipe_limit(), str(config))
    cfg: GateConfig | None = None
    try:
        cfg = _load(config)
    except ConfigError as exc:
        st.config_error = exc.message
    else:
        st.settings = _settings(cfg)
        state_dir = state_dir or cfg.state_dir
    if state_dir is None:
        st.notes.append("the config does not load: pass --state-dir to read the gate's state")
        return st
    state = GateState.read(state_dir)
    if state is not None:
        st.state = asdict(state)
        st.installed = state.installed and st.core_pattern == state.gate_pattern
        if state.installed and not st.installed:
            st.notes.append(
                f"the state says installed, but core_pattern is not the gate's "
                f"({state.gate_pattern!r}): something else set it since"
            )
    elif is_gate_pattern(st.core_pattern):
        st.notes.append(f"core_pattern runs a dump gate that {state_dir} does not record")
    log = state_dir / GATE_LOG
    st.decisions, st.recent = _read_log(log)
    if cfg is not None:
        st.quarantine, st.quarantine_bytes = _read_quarantine(cfg.quarantine_dir)
        if not st.decisions:
            # No log (rotated away, or unreadable): the quarantine's own records at least.
            st.decisions = dict(Counter(str(q.get("decision", "?")) for q in st.quarantine))
    return st


def _settings(cfg: GateConfig) -> dict[str, Any]:
    def free(path: Path) -> str:
        try:
            s = os.statvfs(path)
        except OSError:
            return "not there yet"
        return f"{s.f_bavail * s.f_frsize / 2**30:.1f} GiB free"

    return {
        "state_dir": str(cfg.state_dir),
        "quarantine_dir": f"{cfg.quarantine_dir} ({free(cfg.quarantine_dir)})",
        "release": str(cfg.release_dir) if cfg.release_dir else "to the replaced core_pattern",
        "budget": f"{cfg.seconds_per_gib:g} s per GiB (at least {cfg.min_scan_seconds:g} s); "
        f"bigger than {cfg.max_core_bytes / 2**30:g} GiB: the first part kept, quarantined; "
        f"keeps {cfg.min_free_bytes / 2**30:g} GiB free",
        "detect": f"{len(cfg.secrets)} secret files, {len(cfg.public_keys)} public-key sets, "
        f"{len(cfg.service_configs)} service configs, structural "
        f"{'on' if cfg.structural else 'off'}",
        "notify": shlex.join(cfg.notify) if cfg.notify else "(none)",
    }


def _read_log(path: Path) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """Decisions by kind, and the newest ones (newest first), from the gate's JSON lines."""
    counts: Counter[str] = Counter()
    recent: list[dict[str, Any]] = []
    for record in _json_lines(path):
        decision = record.get("decision")
        if not isinstance(decision, str):
            continue
        counts[decision] += 1
        recent.append(
            {
                k: record.get(k)
                for k in ("time", "pid", "uid", "exe", "signal", "size", "decision", "reason")
            }
        )
        del recent[:-RECENT]
    return dict(counts), recent[::-1]


def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
    try:
        fh = path.open(encoding="utf-8", errors="replace")
    except OSError:
        return
    with fh:
        for line in fh:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict):
                    yield record


def _read_quarantine(qdir: Path) -> tuple[list[dict[str, Any]], int]:
    """The dumps the quarantine still holds (a ``core`` in their directory), oldest first."""
    held: list[dict[str, Any]] = []
    total = 0
    try:
        entries = sorted(p for p in qdir.iterdir() if p.is_dir())
    except OSError:
        return held, 0
    for d in entries:
        core = d / "core"
        if not core.exists():
            continue
        try:
            meta = json.loads((d / "meta.json").read_text())
        except (OSError, ValueError):
            meta = {"decision": "?", "reason": "no readable meta.json"}
        size = core.stat().st_size
        total += size
        held.append(
            {
                "dir": d.name,
                **{
                    k: meta.get(k)
                    for k in ("time", "pid", "uid", "exe", "signal", "decision", "reason")
                },
                "size": size,
                "report": str(d / "report.json") if (d / "report.json").exists() else "",
                "sanitised": str(d / "core.sanitised") if (d / "core.sanitised").exists() else "",
            }
        )
    return held, total


# --- helpers -------------------------------------------------------------------------------------


def _load(config: Path) -> GateConfig:
    from signer.gate._config import load_config

    return load_config(config)


def _need_root(what: str) -> None:
    if os.geteuid() != 0:
        raise GateError(f"{what} sets /proc/sys/kernel/core_pattern: run it as root")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def not_root_only(path: Path) -> str | None:
    """Why someone other than root could change what ``path`` names, or None: ``path`` and each
    directory above it must be root's and writable by no one else (a sticky directory such as
    /tmp is fine: no one else may rename root's entries in it). Checked for the path as given and
    for where its symlinks lead."""
    for p in dict.fromkeys((path, Path(os.path.realpath(path)))):
        for q in (p, *p.parents):
            try:
                st = os.stat(q)
            except FileNotFoundError:
                continue  # created by install, as root
            if st.st_uid != 0:
                return f"{q} belongs to uid {st.st_uid}"
            sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
            if st.st_mode & 0o022 and not (sticky and q != p):
                return f"{q} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def _check_trusted(config: Path, python: str, wrapper: Path, cfg: GateConfig) -> None:
    """Everything the kernel runs as root on every crash, root's alone."""
    import signer

    checks = [
        (wrapper, "the wrapper"),
        (config, "the config (its notify command runs as root)"),
        (Path(python), "the interpreter"),
        (Path(signer.__file__).parent, "the signer package"),
    ]
    if cfg.notify and Path(cfg.notify[0]).is_absolute():
        checks.append((Path(cfg.notify[0]), "the notify command"))
    for path, what in checks:
        why = not_root_only(path)
        if why is not None:
            raise GateError(
                f"{what} {path}: {why}; the kernel runs it as root for every crash on the "
                "host, so it must be writable by root alone. Not installed"
            )


def _root_dir(path: Path) -> None:
    """A root-only (0700) directory, created if missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.stat(path)
    if st.st_uid != 0:
        raise GateError(f"{path} belongs to uid {st.st_uid}, not root: not installed")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
