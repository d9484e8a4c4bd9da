"""The gate in the kernel: ``signer dump-gate install | uninstall | status``.

Installing writes a small wrapper (root's, 0755, in a directory only root can write, by default
``/usr/local/sbin/signer-dump-gate``) that runs ``python -I -m signer.gate handle --config FILE``
with this virtualenv's interpreter, records what it replaces in ``state_dir/state.json`` and only
then points ``/proc/sys/kernel/core_pattern`` at it (and sets ``core_pipe_limit``, so the kernel
keeps ``/proc/PID`` until the handler exits).

Everything the handler runs, reads or writes as root for every crash on the host must be root's
alone (``_files.not_root_only``: the path and everything on the way to it, links included, root's
and writable by no one else; sticky directories only on the way). Install refuses otherwise,
naming the path and why, before it writes anything:

* what runs: the wrapper, ``/bin/sh``, the interpreter and its ``pyvenv.cfg``, every file of
  this package, the config (its ``notify`` command runs) and the notify command (found as the
  handler finds it, by the kernel's PATH) with every argument naming a path (a script); and each
  entry of the interpreter's ``sys.path`` as the wrapper runs it (``python -I``), with everything
  under it, every level (a module, a .pyc or a shared library planted anywhere in it would be
  imported as root: about 70,000 entries, half a second, for this project's venv). The stdlib
  and site-packages are checked first from ``python -I -S`` (no ``.pth`` file runs), then the
  full ``-I`` path, so install never runs a ``.pth`` file it has not checked;
* what the scan reads: ``detect.secrets``, ``detect.public_keys`` (a directory and each file in
  it) and ``detect.service_configs`` (whoever could change one could make the gate release a
  dump with a key in it, or read a file as root through a link);
* where it writes: ``state_dir`` and ``quarantine_dir`` (checked again at each dump by
  ``_files.private_dir``), and ``release_dir``. The release directory alone may be open to
  others if it is root's and sticky (``/var/crash``, 1777): the gate creates each released core
  there as root with ``O_EXCL | O_NOFOLLOW`` (a name planted first, a link included, fails the
  release: the dump stays in quarantine; a name is never followed), and in a sticky directory no
  one else may rename or remove root's file. A release directory that does not exist yet must
  be in one only root can write (else someone could make it first, theirs).

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
from signer.gate._files import not_root_only, private_dir

if TYPE_CHECKING:
    from signer.gate._config import GateConfig

DEFAULT_CONFIG = Path("/etc/signer/dump-gate.toml")
DEFAULT_WRAPPER = Path("/usr/local/sbin/signer-dump-gate")
DEFAULT_PIPE_LIMIT = 16
# CORENAME_MAX_SIZE is 128 with the terminating NUL.
PATTERN_LIMIT = 127
# What the handler is given (gate.md, interface 3): PID TID UID GID SIGNAL TIME CORE_LIMIT
# DUMP_MODE HOST EXE, the pid and tid as the initial pid namespace sees them (%P, %I:
# /proc/PID/task/TID is read there; %i would be the thread's id inside a container), and %d the
# dump mode (0 not dumpable, 1 normal, 2 suid_dumpable: a setuid program's core, root's).
SPECIFIERS = "%P %I %u %g %s %t %c %d %h %E"
# What earlier installs passed: a gate they set is still the gate's (is_gate_pattern, which goes
# by the program, not its arguments); its state file records the exact pattern, which is what
# uninstall, status and a re-install compare core_pattern with.
OLD_SPECIFIERS = ("%P %I %u %g %s %t %c %h %E", "%P %i %u %g %s %t %c %h %E")
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
        private_dir(d)
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
        # Executable names, reasons and directory names come from whoever crashed: shown raw,
        # an escape sequence in one could rewrite or hide what root's terminal shows.
        return [printable(line) for line in out]


def printable(text: str) -> str:
    """``text`` with each character a terminal would act on rather than show (ESC, CR,
    newline, other controls, bidi and other format characters) written as its escape
    (``\\x1b``, ``\\r``, ``\\u202e``), as ``repr`` writes it; the rest as it is."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
        f"{'on' if cfg.structural else 'off'}, blind offsets {cfg.blind_offsets}, "
        f"blind workers {cfg.blind_workers or 'the CPUs, up to 4'}",
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


def _check_trusted(config: Path, python: str, wrapper: Path, cfg: GateConfig) -> None:
    """Everything the handler runs, reads or writes as root on every crash, root's alone
    (:func:`not_root_only`); each refusal names the path and why."""
    import signer

    package = Path(signer.__file__).parent
    runs = [
        (wrapper, "the wrapper"),
        (Path("/bin/sh"), "the wrapper's shell"),
        (config, "the config (its notify command runs as root)"),
        (Path(python), "the interpreter"),
        *((p, "the interpreter's venv configuration") for p in _pyvenv_cfg(Path(python))),
        (package, "the signer package"),
        *((p, "a file of the signer package") for p in _tree(package)),
    ]
    runs += _notify_paths(cfg.notify)
    _refuse_open(runs, "the kernel runs it as root for every crash on the host")
    _refuse_open(
        [(cfg.state_dir, "state_dir"), (cfg.quarantine_dir, "quarantine_dir")],
        "the gate writes its state and every dump there as root (a directory others could "
        "change is one they could swap for a link, or read the dumps from)",
        make=True,  # as the handler makes them: private_dir
    )
    if cfg.release_dir is not None:
        why = not_root_only(cfg.release_dir, sticky=True)
        if why is not None:
            raise GateError(
                f"release_dir {cfg.release_dir}: {why}; the gate creates released dumps in it "
                "as root, so it must be root's and, if others may write it, sticky (as "
                "/var/crash, 1777), and every directory above it root's alone. Not installed"
            )
    read = [
        *((p, "detect.secrets file") for p in cfg.secrets),
        *((p, "detect.public_keys entry") for p in cfg.public_keys),
        *((p, "detect.service_configs file") for p in cfg.service_configs),
    ]
    read += [(f, f"a file in {d}") for d, _ in read if d.is_dir() for f in _listed(d)]
    _refuse_open(
        read,
        "the scan reads it as root for every dump (whoever could change it could make the gate "
        "release a dump with a key in it, or read any file through a link)",
    )
    # The stdlib and site-packages first, before the interpreter runs their .pth files.
    base, site_dirs = _probe(python, _BASE_PROBE, "-S")
    checked: set[str] = set()
    _check_import_path(python, [*base, *site_dirs], checked)
    _check_import_path(python, _probe(python, _PATH_PROBE), checked)


def _notify_paths(notify: tuple[str, ...]) -> list[tuple[Path, str]]:
    """What the notify command runs and reads, as the handler starts it (``run_as_kernel``:
    from /, with the kernel's PATH): the program (a bare name: each place PATH looks for it, up
    to the one it finds; none found is refused) and every argument naming a path (absolute,
    or relative to /, the command's working directory; an absolute one that does not exist
    too, as no one else may make it). An interpreter's script (``python3 page.py``) runs as
    root as much as the interpreter. Devices (``/dev/null``) are open by design: only the way
    to them is checked."""
    from signer.gate._release import KERNEL_ENV

    if not notify:
        return []
    out: list[tuple[Path, str]] = []
    program = notify[0]
    if "/" in program:
        out.append((Path("/", program), "the notify command"))
    else:
        found = None
        for d in KERNEL_ENV["PATH"].split(":"):
            candidate = Path(d, program)
            # Every place looked at before it too: one others could make would come first.
            out.append(
                (candidate, f"the notify command {program!r} (by PATH {KERNEL_ENV['PATH']})")
            )
            if candidate.is_file() and os.access(candidate, os.X_OK):
                found = candidate
                break
        if found is None:
            raise GateError(
                f"the notify command {program!r} is not in the PATH the gate runs it with "
                f"({KERNEL_ENV['PATH']}): give its absolute path. Not installed"
            )
    for arg in notify[1:]:
        if "\0" in arg:  # not a path, and no command is run with it (exec refuses it)
            continue
        path = Path("/", arg)
        if not (arg.startswith("/") or os.path.lexists(path)):
            continue
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            path = path.parent
        out.append((path, "an argument of the notify command"))
    return out


def _refuse_open(checks: list[tuple[Path, str]], because: str, make: bool = False) -> None:
    for path, what in checks:
        why = not_root_only(path, make=make)
        if why is not None:
            raise GateError(
                f"{what} {path}: {why}; {because}, so it must be writable by root alone. "
                "Not installed"
            )


# sys.path as the wrapper's ``python -I`` has it, with the .pth files of site-packages done.
_PATH_PROBE = "import sys, json; print(json.dumps(sys.path))"
# Without site (-S: no .pth file runs): the stdlib's entries and the site-packages directories
# site would add (the venv's, and the base's unless pyvenv.cfg leaves them out).
_BASE_PROBE = """
import json, os, site, sys
exe = os.path.dirname(os.path.abspath(sys.executable))
prefixes = list(site.PREFIXES)
for cfg in (os.path.join(exe, "pyvenv.cfg"), os.path.join(os.path.dirname(exe), "pyvenv.cfg")):
    if os.path.isfile(cfg):
        with open(cfg) as f:
            lines = [line.partition("=") for line in f]
        system = {k.strip().lower(): v.strip().lower() for k, _, v in lines}
        include = system.get("include-system-site-packages") == "true"
        prefixes = [os.path.dirname(exe), *(prefixes if include else [])]
        break
print(json.dumps([sys.path, site.getsitepackages(prefixes)]))
"""
PROBE_SECONDS = 30.0


def _probe(python: str, code: str, *flags: str) -> Any:
    """What ``code`` prints (JSON), run by ``python -I`` (and ``flags``) as the wrapper runs
    it: from /, with no environment."""
    import subprocess

    try:
        done = subprocess.run(
            [python, "-I", *flags, "-c", code],
            capture_output=True,
            cwd="/",
            env={},
            timeout=PROBE_SECONDS,
            check=False,
        )
        if done.returncode != 0:
            raise GateError(f"exit status {done.returncode}: {done.stderr.decode()[-300:]}")
        return json.loads(done.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired, GateError) as exc:
        raise GateError(
            f"the interpreter {python} did not say its import path ({exc}); the gate cannot "
            "check what it would import as root. Not installed"
        ) from None


def _check_import_path(python: str, entries: list[str], seen: set[str] | None = None) -> None:
    """Each entry of the import path and everything under it, root's alone: whoever could
    write one could plant a module the root handler imports. Every level, not the first only:
    ``cryptography/hazmat/...``, an extension's shared libraries (``hyperscan/*.so``,
    ``numpy.libs``) and ``__pycache__`` are imported or loaded as root as much as a top-level
    module. ``seen``: what an earlier call checked (the stdlib and site-packages, checked
    before their .pth files run, are in the full path again)."""
    seen = set() if seen is None else seen
    for entry in dict.fromkeys(e for e in entries if e):
        # A missing entry (python311.zip) too: no one else may make it either.
        why = not_root_only(Path(entry)) or _tree_problem(entry, seen)
        if why is not None:
            raise GateError(
                f"the interpreter's import path entry {entry} ({python} -I): {why}; the "
                "handler imports from it as root for every crash on the host, so it must "
                "be writable by root alone. Not installed"
            )


def _tree_problem(top: str, seen: set[str]) -> str | None:
    """Why something under the directory ``top`` (itself checked by :func:`not_root_only`) is
    not root's alone, or None. Each entry is checked on its own (one ``lstat``): the way to it
    is ``top`` and the directories above it in the tree, each checked in turn, so the walk from
    / that :func:`not_root_only` makes for every path (70,000 of them in this project's venv:
    7 s) is needed only for symbolic links, whose targets lie elsewhere. Links to directories
    are followed (each directory once: a link to one above ends there)."""
    visited: set[tuple[int, int]] = set()
    todo = [top]
    while todo:
        d = todo.pop()
        try:
            st = os.stat(d)
            if not stat.S_ISDIR(st.st_mode) or (st.st_dev, st.st_ino) in visited:
                continue
            visited.add((st.st_dev, st.st_ino))
            listing = list(os.scandir(d))
        except OSError:
            continue  # gone, or not a directory: nothing under it is imported
        for e in listing:
            if e.path in seen:
                continue
            seen.add(e.path)
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                why = not_root_only(Path(e.path))  # the link's owner, and all the way to it
                if why is None:
                    todo.append(e.path)  # a directory's contents, if it leads to one
            elif st.st_uid != 0:
                why = f"{e.path} belongs to uid {st.st_uid}"
            elif st.st_mode & 0o022:
                why = f"{e.path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
            else:
                why = None
                if stat.S_ISDIR(st.st_mode):
                    todo.append(e.path)
            if why is not None:
                return why
    return None


def _pyvenv_cfg(python: Path) -> list[Path]:
    """The pyvenv.cfg the interpreter reads at start (it names its home and site-packages)."""
    exe = Path(os.path.abspath(python)).parent
    return [p for p in (exe / "pyvenv.cfg", exe.parent / "pyvenv.cfg") if p.is_file()]


def _listed(directory: Path) -> list[Path]:
    """The entries directly in ``directory``, sorted ([] when it cannot be listed)."""
    try:
        return sorted(directory.iterdir())
    except OSError:
        return []


def _tree(directory: Path) -> list[Path]:
    """Every file and directory under ``directory`` (``__pycache__`` included: a .pyc others
    could write runs as the module it caches)."""
    out: list[Path] = []
    for top, dirs, files in os.walk(directory):
        out += [Path(top, n) for n in (*dirs, *files)]
    return sorted(out)
