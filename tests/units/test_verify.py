"""``systemd-analyze verify`` and ``security`` on each unit, in a root tree of its own
(tests/units/conftest.py): no systemd as PID 1 is needed.

``verify`` exits 0 on an unknown key (``LimitCore=``) and only warns, so any output at all is
a failure; a control shows that a misspelt key does produce output here."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.units import unitfiles
from tests.units.conftest import ANALYZE, MakeRoot, require_analyze

pytestmark = pytest.mark.integration

# Overall exposure levels (0 safest .. 10) measured with systemd 252 (Debian 12):
# token host 0.4 SAFE, service 0.6 SAFE (1.4 OK with the metrics drop-in), front 1.4 OK. The
# score is a fixed function of the unit for a given systemd, so the thresholds are those levels:
# a change that opens a unit up fails here, and the report printed says which line cost what.
THRESHOLDS = {
    unitfiles.TOKEN_HOST: 0.4,
    unitfiles.SERVICE: 0.6,
    unitfiles.FRONT: 1.4,
}
METRICS_THRESHOLD = 1.4


def _verify(root: Path, name: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_analyze(), "verify", f"--root={root}", str(root / "etc/systemd/system" / name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("name", unitfiles.UNITS)
def test_verify_says_nothing(make_root: MakeRoot, name: str) -> None:
    done = _verify(make_root(), name)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_verify_says_nothing_with_the_metrics_drop_in(make_root: MakeRoot) -> None:
    done = _verify(make_root(metrics=True), unitfiles.SERVICE)
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_control_verify_does_report_a_misspelt_key_though_it_exits_0(
    make_root: MakeRoot,
) -> None:
    text = (unitfiles.UNITS_DIR / unitfiles.TOKEN_HOST).read_text()
    assert "\nLimitCORE=0\n" in text
    root = make_root(replace={unitfiles.TOKEN_HOST: text.replace("LimitCORE=", "LimitCore=")})
    done = _verify(root, unitfiles.TOKEN_HOST)
    assert done.returncode == 0
    assert "Unknown key 'LimitCore'" in done.stdout + done.stderr


def _exposure(root: Path, name: str) -> tuple[float, str]:
    help_text = subprocess.run(
        [require_analyze(), "--help"], capture_output=True, text=True, check=False
    ).stdout
    if "--offline" not in help_text:
        pytest.fail(f"{ANALYZE} has no --offline (systemd older than 252): cannot score units")
    done = subprocess.run(
        [
            require_analyze(),
            "security",
            "--offline=yes",
            f"--root={root}",
            "--no-pager",
            str(root / "etc/systemd/system" / name),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", done.stdout)
    assert found, f"no overall exposure level in: {done.stdout}{done.stderr}"
    return float(found.group(1)), done.stdout


@pytest.mark.parametrize("name", unitfiles.UNITS)
def test_exposure_is_at_most_the_measured_level(make_root: MakeRoot, name: str) -> None:
    level, report = _exposure(make_root(), name)
    assert level <= THRESHOLDS[name], report


def test_exposure_with_the_metrics_drop_in(make_root: MakeRoot) -> None:
    level, report = _exposure(make_root(metrics=True), unitfiles.SERVICE)
    assert level <= METRICS_THRESHOLD, report
    # The drop-in gives the network, nothing else.
    assert "✗ PrivateNetwork=" in report


def test_control_an_unhardened_unit_scores_worse(make_root: MakeRoot) -> None:
    text = (unitfiles.UNITS_DIR / unitfiles.TOKEN_HOST).read_text()
    bare = "\n".join(
        line
        for line in text.splitlines()
        if not line.startswith(("Protect", "Private", "Restrict", "SystemCall", "Capability"))
    )
    level, _ = _exposure(make_root(replace={unitfiles.TOKEN_HOST: bare}), unitfiles.TOKEN_HOST)
    assert level > THRESHOLDS[unitfiles.TOKEN_HOST] + 3
