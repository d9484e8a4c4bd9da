"""A root tree for ``systemd-analyze --root``: a copy of the host's unit directory (the targets
and slices the units name), the units under test in /etc/systemd/system, and an executable
stub at every path a unit runs (``verify`` checks that each exists and is executable)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.units import unitfiles

SYSTEM_UNITS = Path("/lib/systemd/system")
ANALYZE = "systemd-analyze"

MakeRoot = Callable[..., Path]


def require_analyze() -> str:
    path = shutil.which(ANALYZE)
    if path is None or not SYSTEM_UNITS.is_dir():
        pytest.skip(
            f"the units' tests need {ANALYZE} and {SYSTEM_UNITS} (Debian package systemd): "
            "run 'make test', which installs it"
        )
    return path


@pytest.fixture(scope="session")
def system_units(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One copy of the host's units for the session (copied: --root resolves links inside)."""
    require_analyze()
    copy = tmp_path_factory.mktemp("system-units") / "system"
    shutil.copytree(SYSTEM_UNITS, copy, symlinks=True)
    return copy


@pytest.fixture
def make_root(tmp_path: Path, system_units: Path) -> MakeRoot:
    """``make_root(metrics=False, replace=None)``: a root tree holding the units (with the
    service's metrics drop-in if asked; ``replace``: {unit name: text} instead of the file)."""

    def make(*, metrics: bool = False, replace: dict[str, str] | None = None) -> Path:
        root = tmp_path / "root"
        shutil.rmtree(root, ignore_errors=True)
        (root / "usr/lib/systemd").mkdir(parents=True)
        (root / "usr/lib/systemd/system").symlink_to(system_units)
        etc = root / "etc/systemd/system"
        etc.mkdir(parents=True)
        for name in unitfiles.UNITS:
            text = (replace or {}).get(name) or (unitfiles.UNITS_DIR / name).read_text()
            (etc / name).write_text(text)
            for exe in unitfiles.executables(unitfiles.parse(etc / name)):
                stub = root / exe.lstrip("/")
                stub.parent.mkdir(parents=True, exist_ok=True)
                stub.write_text("#!/bin/sh\nexit 0\n")
                stub.chmod(0o755)
        if metrics:
            drop_in = etc / f"{unitfiles.SERVICE}.d"
            drop_in.mkdir()
            shutil.copy(unitfiles.METRICS_DROP_IN, drop_in / unitfiles.METRICS_DROP_IN.name)
        return root

    return make
