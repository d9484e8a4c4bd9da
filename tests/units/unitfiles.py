"""Reading systemd unit files as systemd does, for the units' tests: sections of keys whose
assignments accumulate (a key may appear several times; an empty assignment resets it), with
backslash line continuations and comments."""

from __future__ import annotations

import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNITS_DIR = REPO / "systemd"
TOKEN_HOST = "signer-token-host.service"
SERVICE = "signer.service"
FRONT = "signer-front.service"
UNITS = (TOKEN_HOST, SERVICE, FRONT)
# The drop-in that turns the service's metrics listener on (signer.service.d/).
METRICS_DROP_IN = UNITS_DIR / "signer.service.d" / "metrics.conf"

Unit = dict[str, dict[str, list[str]]]


def parse(*files: Path) -> Unit:
    """The unit in ``files`` (the unit, then its drop-ins): section -> key -> assignments, in
    order, an empty assignment clearing the ones before it."""
    unit: Unit = {}
    for path in files:
        section = ""
        pending = ""
        for raw in path.read_text().splitlines():
            line = pending + raw.strip() if pending else raw.strip()
            pending = ""
            if not line or line[0] in "#;":
                continue
            if line.endswith("\\"):
                pending = line[:-1] + " "
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1]
                unit.setdefault(section, {})
                continue
            key, sep, value = line.partition("=")
            assert sep, f"{path}: not a key=value line: {line!r}"
            assert section, f"{path}: a setting before any section: {line!r}"
            values = unit[section].setdefault(key.strip(), [])
            if value.strip():
                values.append(value.strip())
            else:
                values.clear()
    return unit


def load(name: str, *, metrics: bool = False) -> Unit:
    files = [UNITS_DIR / name]
    if metrics and name == SERVICE:
        files.append(METRICS_DROP_IN)
    return parse(*files)


# Keys whose assignments add up; any other key set twice in one file is a mistake.
LISTS = frozenset(
    {"ExecStartPre", "ExecStart", "SystemCallFilter", "RestrictAddressFamilies", "ReadWritePaths"}
)


def one(unit: Unit, key: str, section: str = "Service") -> str:
    """The value of a single-valued key (a drop-in's assignment wins, as in systemd)."""
    values = unit.get(section, {}).get(key, [])
    assert values, f"{key}= is not set"
    return values[-1]


def words(unit: Unit, key: str, section: str = "Service") -> list[str]:
    """Every word of every assignment of ``key`` (list-valued settings accumulate)."""
    return [w for value in unit.get(section, {}).get(key, []) for w in value.split()]


def commands(unit: Unit, key: str) -> list[list[str]]:
    """The argv of each ``key`` (ExecStart=, ExecStartPre=, ...), its prefixes (+, -, ...) off."""
    return [shlex.split(value.lstrip("+-@:!")) for value in unit["Service"].get(key, [])]


def executables(unit: Unit) -> set[str]:
    return {
        argv[0]
        for key in ("ExecStartPre", "ExecStart", "ExecStartPost", "ExecReload", "ExecStop")
        for argv in commands(unit, key)
    }


def option(argv: list[str], name: str) -> str:
    """The value after ``name`` in ``argv``."""
    assert argv.count(name) == 1, f"{name} in {argv}"
    return argv[argv.index(name) + 1]
