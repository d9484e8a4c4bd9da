"""The gate's configuration: one TOML file, ``/etc/signer/dump-gate.toml`` by default.

Every problem is a :class:`signer.errors.ConfigError` naming the file and, where the file gives
the setting, its line. Paths may be relative: to the file's directory (the kernel starts the
gate in ``/``, where a relative path would mean something else than the operator read).
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from signer._internal.config import line_of, parse_toml, read_text
from signer.errors import ConfigError, shown

DEFAULT_CONFIG = Path("/etc/signer/dump-gate.toml")
DEFAULT_STATE_DIR = Path("/var/lib/signer-dump-gate")
GIB = 1 << 30


@dataclass(frozen=True)
class GateConfig:
    """``[gate]`` and ``[detect]`` of the file, paths made absolute. ``release_dir`` None: release
    to the pattern the gate replaced (``state_dir/state.json``'s ``previous_pattern``). The
    budget's defaults (``seconds_per_gib`` 30, ``min_scan_seconds`` 30) are the gate
    benchmark's slowest figures four times over: the comments below give them."""

    # [gate]
    state_dir: Path = DEFAULT_STATE_DIR
    quarantine_dir: Path = DEFAULT_STATE_DIR / "quarantine"
    release_dir: Path | None = None
    max_core_bytes: int = 16 * GIB
    # The scan's budget per GiB of data (see budget_seconds). The gate benchmark (2 shared
    # cores, 16 keys and 2 PINs; docs/benchmarks.md) takes 5.7 s per GiB known-secret on a
    # 1 GiB core (7.5 s on a heap-like one), most of it the ~5.5 s of building the scanner that
    # every dump pays, then about 0.5 s per further GiB; 0.8 to 1.7 s structural. 30 is four
    # times the slowest, room for a loaded host, while the crashed process (which the kernel
    # keeps until the gate exits) waits at most 8 minutes for a 16 GiB core; it was 300, 80
    # minutes, and bought blind mode nothing. Blind mode (public keys) runs at 160 to 190 s per
    # GiB of heap on 2 cores (80 to 100 at the likely offsets): its half of any budget a crashed
    # process can wait for clears dumps of about 100 MiB; larger ones stay quarantined for
    # budget (README, "The dump gate").
    seconds_per_gib: float = 30.0
    # Small dumps get at least this: building the scanner alone (compiling the secrets'
    # patterns) takes about 5 to 6 s for 16 keys and 2 PINs.
    min_scan_seconds: float = 30.0
    min_free_bytes: int = GIB
    # What the quarantine may hold on disk, all entries' files together (0: no limit beyond
    # min_free_bytes). A dump that would take it past is read and not kept (dropped:no-space).
    max_quarantine_bytes: int = 0
    notify: tuple[str, ...] = ()
    # [detect]
    secrets: tuple[Path, ...] = ()
    public_keys: tuple[Path, ...] = ()
    service_configs: tuple[Path, ...] = ()
    structural: bool = True
    # Where blind mode's big-endian checks look: at "every" byte offset, or at the "likely"
    # ones (8-aligned addresses and offsets after a length or pad byte), which clears a dump
    # of EC keys about twice as soon but does not look for a key at an unaligned offset that
    # no serialisation frames. "every" by default: the narrower search is an operator's choice
    # (README, "The dump gate").
    blind_offsets: Literal["every", "likely"] = "every"
    # Processes for blind mode's math checks (0: the CPUs the gate may use, at most 4). The
    # kernel holds the crashed process until the gate exits, so the gate uses the CPUs it can.
    blind_workers: int = 0
    # Where it was read from (None: the defaults).
    path: Path | None = None

    def budget_seconds(self, size: int) -> float:
        """The scan's time budget for ``size`` bytes of dump to read. The gate passes the bytes
        of the core that hold data (:func:`signer.gate._scan.data_bytes`), not its length: the
        scanner skips the holes of a sparse core, so a 16 GiB core holding 10 MB of data is
        scanned in the time of 10 MB and gets the budget of 10 MB, not of 16 GiB."""
        return max(self.min_scan_seconds, self.seconds_per_gib * size / GIB)


_GATE = {
    "state_dir": "path",
    "quarantine_dir": "path",
    "release_dir": "path?",
    "max_core_bytes": "size",
    "seconds_per_gib": "seconds",
    "min_scan_seconds": "seconds",
    "min_free_bytes": "size",
    "max_quarantine_bytes": "size",
    "notify": "argv",
}
_DETECT = {
    "secrets": "paths",
    "public_keys": "paths",
    "service_configs": "paths",
    "structural": "bool",
    "blind_offsets": "offsets",
    "blind_workers": "count",
}
_TABLES = {"gate": _GATE, "detect": _DETECT}


class _At(ConfigError):
    def __init__(self, message: str, table: str, key: str | None = None) -> None:
        super().__init__(message)
        self.table, self.key = table, key


def load_config(path: str | Path = DEFAULT_CONFIG) -> GateConfig:
    """Reads and checks the gate's configuration file. Reads no secrets and no key files: those
    are read for each dump, by the scan (a file that cannot be read then fails that dump closed)."""
    path = Path(path)
    text = read_text(path, "dump gate configuration file")
    where = f"dump gate configuration file {path}"
    data = parse_toml(text, where)
    try:
        return _build(data, path.absolute().parent, path)
    except _At as exc:
        line = line_of(text, exc.table, exc.key)
        at = f" (line {line})" if line is not None else ""
        raise ConfigError(f"{where}: {exc.message}{at}") from None


def _build(data: dict[str, Any], base: Path, path: Path) -> GateConfig:
    unknown = sorted(set(data) - set(_TABLES))
    if unknown:
        raise _At(f"unknown table [{unknown[0]}] (known: [gate], [detect])", unknown[0])
    values: dict[str, Any] = {"path": path.absolute()}
    for table, kinds in _TABLES.items():
        section = data.get(table, {})
        if not isinstance(section, dict):
            raise _At(f"{table} must be a table", table)
        for key in sorted(set(section) - set(kinds)):
            raise _At(f"unknown setting {table}.{key}", table, key)
        for key, kind in kinds.items():
            if key in section:
                values[key] = _value(table, key, kind, section[key], base)
    cfg = GateConfig(**values)
    for key in ("min_free_bytes", "max_quarantine_bytes"):
        if getattr(cfg, key) < 0:
            raise _At(f"gate.{key} must not be negative", "gate", key)
    if not 0 <= cfg.blind_workers <= 64:  # signer.scan's MAX_WORKERS (not imported: numpy)
        raise _At("detect.blind_workers must be 0 (the CPUs) to 64", "detect", "blind_workers")
    if cfg.max_core_bytes < 1:
        raise _At("gate.max_core_bytes must be positive", "gate", "max_core_bytes")
    for key in ("seconds_per_gib", "min_scan_seconds"):
        if getattr(cfg, key) <= 0:
            raise _At(f"gate.{key} must be positive", "gate", key)
    if not (cfg.secrets or cfg.public_keys or cfg.service_configs or cfg.structural):
        raise _At(
            "nothing to search for: give detect.secrets, detect.public_keys or "
            "detect.service_configs, or leave detect.structural on",
            "detect",
        )
    return cfg


def _value(table: str, key: str, kind: str, raw: Any, base: Path) -> Any:
    name = f"{table}.{key}"

    def wrong(what: str) -> _At:
        return _At(f"{name} must be {what}, got {shown(raw)}", table, key)

    if kind in ("path", "path?"):
        if not isinstance(raw, str) or (kind == "path" and not raw):
            raise wrong("a path" if kind == "path" else 'a path or ""')
        return (base / raw) if raw else None
    if kind == "size":
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise wrong("an integer number of bytes")
        return raw
    if kind == "count":
        if not isinstance(raw, int) or isinstance(raw, bool):
            raise wrong("an integer")
        return raw
    if kind == "seconds":
        if not isinstance(raw, int | float) or isinstance(raw, bool) or not math.isfinite(raw):
            raise wrong("a number of seconds")
        return float(raw)
    if kind == "bool":
        if not isinstance(raw, bool):
            raise wrong("true or false")
        return raw
    if kind == "offsets":
        if raw not in ("every", "likely"):  # signer.scan's Offsets (not imported: numpy)
            raise wrong('"every" or "likely"')
        return raw
    if not isinstance(raw, list) or not all(isinstance(x, str) and x for x in raw):
        raise wrong("a list of non-empty strings")
    if kind == "argv":
        return tuple(raw)
    return tuple(base / x for x in raw)


def quarantine_bytes(quarantine: Path) -> int:
    """The disk space the quarantine's entries take (their files' allocated blocks). Entries
    that vanish meanwhile (an operator's review) count for nothing."""
    total = 0
    try:
        entries = list(os.scandir(quarantine))
    except FileNotFoundError:
        return 0
    for entry in entries:
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                for f in os.scandir(entry.path):
                    with contextlib.suppress(OSError):
                        if f.is_file(follow_symlinks=False):
                            total += f.stat(follow_symlinks=False).st_blocks * 512
    return total


def quarantine_room(cfg: GateConfig) -> int | None:
    """Bytes the quarantine may still take under max_quarantine_bytes (None: no limit)."""
    if not cfg.max_quarantine_bytes:
        return None
    return max(0, cfg.max_quarantine_bytes - quarantine_bytes(cfg.quarantine_dir))
