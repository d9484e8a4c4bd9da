"""The scan of a quarantined core, in a child process the gate can stop at the budget.

The child builds the scanner from the configuration (it reads the secrets and key files, the
services' public keys from their stores), scans the core, writes ``report.json`` and
``report.sarif`` beside it and, when there are findings, the sanitised copy. It tells the gate
how it went in JSON lines on a pipe. The gate waits for it until the budget: past it, the child
is killed and the dump stays in quarantine. A child that dies (the scanner's native code
included) or raises is an error, never a clean result.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sqlite3
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from signer._internal.children import die_with_parent
from signer._internal.files import write_atomic
from signer.errors import ScanError, SignerError
from signer.gate._config import GateConfig

if TYPE_CHECKING:
    from signer.keys import PublicKeyType
    from signer.scan import Scanner, ScanResult

BLIND_SHARE = 0.5
"""Of the scan's budget, what blind mode's own budget gets: the rest is for building the
scanner and the literal pass before it. A blind pass the budget cuts short says so in the
report (and the dump stays quarantined) rather than being killed without one."""


# --- what to search for ------------------------------------------------------------------------


def _files_in(path: Path) -> list[Path]:
    """``path`` itself, or the regular files of a directory (not hidden), sorted."""
    if not path.is_dir():
        return [path]
    return sorted(p for p in path.iterdir() if not p.name.startswith(".") and p.is_file())


def public_keys(cfg: GateConfig) -> dict[str, PublicKeyType]:
    """The public keys of blind mode: each file of ``detect.public_keys`` (a directory: each
    file in it), then the key versions and live import tokens of each service in
    ``detect.service_configs``, read from its store (no PIN, no token).

    A key is named by its file's full path (``#i`` after it for the i-th of several in one
    file), a service's by its config's (``CONFIG:NAME/vN``): unique, and what a reader of the
    report can open. Named by the directory's base name and the file's, two directories both
    called ``keys`` collided, and the keys of one silently replaced the other's, which blind
    mode then never looked for. Two names that still meet (a file listed twice) must hold the
    same key; otherwise the scan fails (closed) rather than drop one."""
    from signer.scan import load_public_keys

    out: dict[str, PublicKeyType] = {}

    def add(name: str, key: PublicKeyType) -> None:
        if name in out and _spki(out[name]) != _spki(key):
            raise ScanError(f"two different public keys are both named {name}")
        out[name] = key

    for entry in cfg.public_keys:
        for path in _files_in(entry):
            for name, key in load_public_keys([path]).items():
                add(str(path.parent / name), key)  # the loader names a key by the file's name
    for service in cfg.service_configs:
        for name, key in service_public_keys(service).items():
            add(name, key)
    return out


def _spki(key: PublicKeyType) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def service_public_keys(config: Path) -> dict[str, PublicKeyType]:
    """A service's public keys, from the store its configuration names, opened read-only: every
    key version (destroyed ones too: an old dump may hold them) and every import token not yet
    destroyed (its wrapping key's private half is in the token). Named ``CONFIG:NAME/vN``."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.serialization import load_der_public_key

    from signer._internal import config as service_config

    cfg = service_config.load(config, env={})
    if "://" in cfg.store.path:
        # Fail closed: the dump stays quarantined. (Issue 16 plans a public-keys snapshot file
        # the service writes, so that the gate stays off the network.)
        raise ScanError(
            f"service configuration {config}: store.path is a database URL; the gate reads "
            "public keys from an SQLite store file only"
        )
    store = Path(cfg.store.path)
    if not store.is_absolute():
        raise ScanError(
            f"service configuration {config}: store.path {store} is relative; the gate cannot "
            "know the service's working directory: give it as an absolute path"
        )
    if not store.is_file():
        raise ScanError(f"service configuration {config}: no key store at {store}")
    rows: list[tuple[str, bytes]] = []
    try:
        db = sqlite3.connect(f"file:{quote(str(store))}?mode=ro", uri=True, timeout=5.0)
        try:
            rows += [
                (f"{name}/v{version}", der)
                for name, version, der in db.execute(
                    "SELECT name, version, public_key FROM versions ORDER BY name, version"
                )
            ]
            rows += [
                (f"import-token/{token}", der)
                for token, der in db.execute(
                    "SELECT token, public_key FROM import_tokens WHERE destroyed = 0"
                )
            ]
        finally:
            db.close()
    except sqlite3.Error as exc:
        raise ScanError(f"key store {store} (of {config}) cannot be read: {exc}") from None
    out: dict[str, PublicKeyType] = {}
    for name, der in rows:
        try:
            key: Any = load_der_public_key(der)
        except (ValueError, UnsupportedAlgorithm):
            raise ScanError(f"key store {store}: the public key of {name} does not load") from None
        out[f"{config}:{name}"] = key
    return out


def build_scanner(cfg: GateConfig, blind_budget_seconds: float = 60.0) -> Scanner:
    """The scanner the configuration asks for, built the way ``signer scan`` builds one (the
    same loaders, the same constructor): known secrets, and blind mode when there are public
    keys or ``detect.structural`` is on.

    Blind mode's structural detectors (PEM, DER, PKCS#8, SEC1, OpenSSH, JWK private keys) are
    how it finds a configured key in an encoded form that the math checks, which read raw
    numbers, cannot see (a PEM block's base64): with public keys they always run. What
    ``detect.structural = false`` turns off is the rest of what they find: a private key that
    matches none of the configured public keys (``unknown:...``, or a structure that does not
    load) is not reported, does not quarantine the dump and is not overwritten in the
    sanitised copy; the scan's notes count them. Before, it turned nothing off when public
    keys were given."""
    from signer.scan import Scanner, load_secrets

    known = load_secrets(cfg.secrets)
    public = public_keys(cfg)
    blind = bool(public) or cfg.structural
    if not blind or cfg.structural:
        return Scanner(
            known,
            public_keys=public if blind else None,
            blind_budget_seconds=blind_budget_seconds,
            blind_offsets=cfg.blind_offsets,
            blind_workers=cfg.blind_workers or None,
        )
    owners = {s.id for s in known} | set(public)

    class ConfiguredOnly(Scanner):
        """A scanner whose every scan (the sanitiser's re-scan of its copy too, which must
        agree with the first) reports only the configured secrets and keys."""

        def scan(
            self,
            path: Path | str,
            maps: Path | str | None = None,
            markers: Mapping[str, bytes] | None = None,
            *,
            deadline: float | None = None,
        ) -> ScanResult:
            result = super().scan(path, maps, markers, deadline=deadline)
            return _configured_only(result, owners)

    return ConfiguredOnly(
        known,
        public_keys=public,
        blind_budget_seconds=blind_budget_seconds,
        blind_offsets=cfg.blind_offsets,
        blind_workers=cfg.blind_workers or None,
    )


def _configured_only(result: ScanResult, owners: set[str]) -> ScanResult:
    """``result`` without the findings of secrets and keys not in ``owners`` (the structural
    detectors' private keys of no configured public key), and a note counting them."""
    kept = [f for f in result.findings if f.secret_id in owners]
    dropped = len(result.findings) - len(kept)
    if not dropped:
        return result
    note = (
        f"detect.structural is off: {dropped} private-key structure{'s' * (dropped != 1)} "
        "matching none of the configured public keys not reported"
    )
    return replace(result, findings=kept, notes=[*result.notes, note])


# --- the child ---------------------------------------------------------------------------------


@dataclass
class ScanOutcome:
    """What the scan child said. ``status``: 'done' (``findings``, ``complete``), 'budget' (killed
    at the deadline), 'error' (``reason``). ``sanitised``: what became of the sanitised copy."""

    status: str
    budget_seconds: float
    seconds: float = 0.0
    findings: int = 0
    complete: bool = False
    incomplete: str | None = None  # why a done scan is not complete
    over_budget: bool = False  # ... because blind mode ran out of its share of the budget
    reason: str | None = None
    sanitised: dict[str, Any] = field(default_factory=lambda: {"state": "not needed"})
    notes: list[str] = field(default_factory=list)


def described(exc: BaseException) -> str:
    """An exception for the log and meta.json: this project's errors by their message (they
    never carry a secret), an OSError by its strerror and file, any other by its type only (its
    message could quote bytes of a key file)."""
    if isinstance(exc, SignerError):
        return exc.message
    if isinstance(exc, ImportError):  # a module's name: the installation is incomplete
        return f"{type(exc).__name__}: {exc.msg}"
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'error'}: {exc.filename or ''}".rstrip(": ")
    return f"{type(exc).__name__} (details withheld: they could quote the input)"


def _child(cfg: GateConfig, core: Path, deadline: float, out: int) -> None:
    """Runs in the child; never returns normally (the caller ``os._exit``-s)."""

    def say(**message: Any) -> None:
        data = (json.dumps(message) + "\n").encode()
        while data:
            data = data[os.write(out, data) :]

    from signer.scan.report import to_json, to_sarif

    began = time.monotonic()
    scanner = build_scanner(cfg, max(0.0, (deadline - began) * BLIND_SHARE))
    result = scanner.scan(core)
    write_atomic(core.with_name("report.json"), to_json([result]))
    write_atomic(core.with_name("report.sarif"), json.dumps(to_sarif([result]), indent=2) + "\n")
    incomplete = None
    lost = result.blind.lost if result.blind is not None else ()
    over_budget = result.blind is not None and not result.blind.complete and not lost
    if lost:  # an error (quarantined:error), not the budget: a worker died or hung
        incomplete = f"blind mode lost part of its memory: {lost[0]}"
    elif over_budget:
        incomplete = "blind mode did not finish within its share of the budget"
    elif not result.complete:
        incomplete = "the scan stopped at its match limit"
    say(
        scan={
            "findings": len(result.findings),
            "complete": incomplete is None,
            "incomplete": incomplete,
            "over_budget": over_budget,
            "notes": result.notes,
            "seconds": time.monotonic() - began,
        }
    )
    if not result.findings:
        return
    try:
        from signer.scan import sanitize  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        say(sanitised={"state": "unavailable: this signer has no signer.scan.sanitize"})
        return
    dst = core.with_name("core.sanitised")
    room = _room_for_copy(core, cfg)
    if room is not None:
        say(sanitised={"state": f"skipped: {room}"})
        return
    try:
        done = sanitize(core, dst, scanner, result=result)
        if not done.verified:  # sanitize raises rather than return one; kept as a guard
            raise ScanError("the re-scan did not prove the copy clean")
    except Exception as exc:
        with contextlib.suppress(OSError):
            dst.unlink()
        say(sanitised={"state": f"failed: {described(exc)}"})
        return
    report = done.to_dict()
    write_atomic(core.with_name("sanitise.json"), json.dumps(report, indent=2) + "\n")
    summary = ("findings_overwritten", "bytes_overwritten", "verified", "seconds", "notes")
    say(sanitised={"state": "verified", **{k: report[k] for k in summary}})


def _room_for_copy(core: Path, cfg: GateConfig) -> str | None:
    """Why the sanitised copy of ``core`` is not to be written (None: it may be): it takes about
    the disk space the core takes (it is written as sparse as the core, with the same data),
    and a 10 GiB core with findings must not take the quarantine's file system below
    ``min_free_bytes``, nor the quarantine past ``max_quarantine_bytes``, which the core itself
    was stored within. The sanitiser's own writes may still meet a full disk (other dumps
    arrive meanwhile): that fails the copy, not the decision."""
    from signer.gate._config import quarantine_room

    st = os.stat(core)
    need = min(st.st_size, st.st_blocks * 512)
    fs = os.statvfs(core.parent)
    free = fs.f_bavail * fs.f_frsize
    later = "the core is kept: sanitise it by hand elsewhere (signer sanitize)"
    if free - need < cfg.min_free_bytes:
        return (
            f"the quarantine file system has {free} bytes free: a copy of about {need} bytes "
            f"would leave less than min_free_bytes ({cfg.min_free_bytes}); {later}"
        )
    room = quarantine_room(cfg)
    if room is not None and need > room:
        return (
            f"a copy of about {need} bytes would take the quarantine past "
            f"max_quarantine_bytes ({cfg.max_quarantine_bytes}); {later}"
        )
    return None


def data_bytes(core: Path) -> int:
    """The bytes of ``core`` the scanner reads: its data, not the holes of a sparse file (the
    gate stores every MiB of zeros as a hole, as the kernel does). From SEEK_DATA/SEEK_HOLE, as
    the scanner finds them, and not from ``st_blocks``, which a compressing file system (ZFS,
    btrfs) makes smaller than the data the scanner reads. The file's length where the file
    system cannot say. (The scanner reads the holes too if a pattern can match zeros, which no
    key, PIN or structure of usable length does; such a scan would run out of budget and stay
    quarantined.)"""
    from signer.scan._scanner import _data_ranges

    fd = os.open(core, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        ranges = _data_ranges(fd, size)
    finally:
        os.close(fd)
    return size if ranges is None else sum(end - start for start, end in ranges)


OOM_SCORE_ADJ = Path("/proc/self/oom_score_adj")


def _first_to_go() -> None:
    """Makes the scan child the OOM killer's first choice (1000, the most): it runs as root,
    whose default score would let a hostile core's memory pressure take the signer service or
    the host's daemons instead. Killed, the scan is an error and the dump stays in quarantine.
    Best effort: a child that cannot say it (no /proc) scans all the same."""
    with contextlib.suppress(OSError):
        OOM_SCORE_ADJ.write_text("1000\n")


class _Child:
    """The scan child: its pid, the read end of its pipe, and whether it has been reaped."""

    def __init__(self, cfg: GateConfig, core: Path, deadline: float) -> None:
        r, w = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 0
            _first_to_go()
            try:
                # A handler killed mid-scan (by the kernel's operator, the OOM killer) must not
                # leave its child scanning on to the deadline: it dies with the handler.
                die_with_parent(signal.SIGKILL)
                if os.getppid() != parent:  # the handler died before the line above
                    os._exit(1)
                os.close(r)
                _child(cfg, core, deadline, w)
            except BaseException as exc:
                code = 1
                with contextlib.suppress(BaseException):
                    os.write(w, (json.dumps({"error": described(exc)}) + "\n").encode())
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self.fd, self.reaped = pid, r, False

    def ended(self) -> str:
        """Waits for the child (its pipe has ended, so it is ending) and says how it ended."""
        _, status = os.waitpid(self.pid, 0)
        self.reaped = True
        if os.WIFSIGNALED(status):
            return f"the scan child died of signal {signal.Signals(os.WTERMSIG(status)).name}"
        return f"the scan child exited with status {os.waitstatus_to_exitcode(status)}"

    def close(self) -> None:
        """Kills the child if it is still there (killed at the deadline), and reaps it."""
        os.close(self.fd)
        if not self.reaped:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            self.reaped = True


def _messages(fd: int, deadline_of: dict[str, float]) -> Iterator[dict[str, Any] | None]:
    """JSON messages from the child as they come; None when the current deadline passed (the
    caller may move it: ``deadline_of['t']``). Ends at the end of the pipe."""
    pending = b""
    while True:
        left = deadline_of["t"] - time.monotonic()
        if left <= 0:
            yield None
            return
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        data = os.read(fd, 1 << 16)
        if not data:
            return
        pending += data
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                message = {"error": "the scan child wrote something unreadable"}
            yield message if isinstance(message, dict) else {"error": "unreadable message"}


def scan(cfg: GateConfig, core: Path) -> ScanOutcome:
    """Scans the quarantined ``core`` within the budget its data gives (:func:`data_bytes`:
    a sparse core's holes are not read, so they buy no time); on findings, waits for the
    sanitised copy as long again twice (a scan, a copy, a re-scan)."""
    budget = cfg.budget_seconds(data_bytes(core))
    began = time.monotonic()
    deadline = {"t": began + budget}
    out = ScanOutcome("error", budget, reason="the scan child ended without a result")
    child = _Child(cfg, core, deadline["t"])
    try:
        for message in _messages(child.fd, deadline):
            if message is None:
                if out.status == "done":
                    out.sanitised = {"state": "stopped: the sanitiser ran past its budget"}
                else:
                    out.status = "budget"
                    out.reason = f"the scan did not finish within its budget of {budget:.1f} s"
                break
            if "error" in message:
                if out.status == "done":
                    out.sanitised = {"state": f"failed: {message['error']}"}
                else:
                    out.reason = f"the scan failed: {message['error']}"
                break
            if "scan" in message:
                s = message["scan"]
                out.status, out.reason = "done", None
                out.seconds = time.monotonic() - began
                out.findings = int(s["findings"])
                out.complete = bool(s["complete"])
                out.incomplete = s["incomplete"]
                out.over_budget = bool(s["over_budget"])
                out.notes = [str(n) for n in s["notes"]]
                if out.findings:
                    out.sanitised = {"state": "started"}
                    deadline["t"] = time.monotonic() + 2 * budget
            if "sanitised" in message:
                out.sanitised = message["sanitised"]
        else:  # the pipe ended: how did the child?
            if out.status != "done":
                out.reason = f"the scan failed: {child.ended()}"
            elif out.sanitised.get("state") == "started":
                out.sanitised = {"state": f"failed: {child.ended()}"}
    finally:
        child.close()
    if out.status != "done":
        out.seconds = time.monotonic() - began
    return out
