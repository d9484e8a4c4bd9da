"""The gate scenario's pure helpers: per-GiB figures, /proc fields, the suggested budget, the
gate configuration it writes (read back by the gate's own loader) and the handler's argv."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks.gate import (
    CORE_LIMIT,
    GIB,
    blind_covers,
    gate_config,
    handler_argv,
    per_gib,
    round_up,
    status_kib,
    suggest_budget,
    toml_value,
)
from signer.cli import _gate
from signer.gate import Crash, load_config

STATUS = """Name:\tpython3
VmPeak:\t  500000 kB
VmHWM:\t  123456 kB
VmRSS:\t  100000 kB
RssAnon:\t   40960 kB
Threads:\t1
"""


def test_per_gib() -> None:
    assert per_gib(3.0, GIB) == 3.0
    assert per_gib(1.0, GIB // 4) == 4.0
    assert per_gib(1.0, 0) is None


def test_status_kib() -> None:
    assert status_kib(STATUS, "VmHWM") == 123456
    assert status_kib(STATUS, "RssAnon") == 40960
    assert status_kib(STATUS, "RssFile") is None
    assert status_kib(STATUS, "Vm") is None  # a whole field name, not a prefix
    assert status_kib("Threads:\t\n", "Threads") is None


@pytest.mark.parametrize(
    ("value", "want"),
    [(0.0, 0.0), (0.2, 1.0), (3.0, 3.0), (9.5, 10.0), (10.0, 10.0), (25.2, 30.0), (120.0, 120.0)],
)
def test_round_up(value: float, want: float) -> None:
    assert round_up(value) == want


@pytest.mark.parametrize("value", [-1.0, float("inf"), float("nan")])
def test_round_up_refuses(value: float) -> None:
    with pytest.raises(ValueError):
        round_up(value)


def test_suggest_budget_takes_the_slowest_times_the_margin() -> None:
    assert suggest_budget([6.2, 0.5], [5.1, 0.2]) == (30.0, 30.0)
    assert suggest_budget([1.0], [0.3], margin=2.0) == (2.0, 1.0)
    with pytest.raises(ValueError):
        suggest_budget([], [1.0])


def test_blind_covers() -> None:
    # 20 s/GiB fits in half of a 60 s/GiB budget at any size
    assert blind_covers(20.0, 60.0, 30.0, 0.5) is None
    # 1,500 s/GiB: only what half of the 30 s minimum covers, 15 s = 1/100 GiB
    assert blind_covers(1500.0, 60.0, 30.0, 0.5) == pytest.approx(GIB / 100)


def test_toml_values() -> None:
    assert toml_value(True) == "true"
    assert toml_value(1.5) == "1.5"
    assert toml_value(Path('/a "b"\\c')) == '"/a \\"b\\"\\\\c"'
    assert toml_value(["x", 2]) == '["x", 2]'
    with pytest.raises(TypeError):
        toml_value(object())


def test_gate_config_is_what_the_gate_reads(tmp_path: Path) -> None:
    secret = tmp_path / 'odd "name".pin'
    text = gate_config(
        {
            "state_dir": tmp_path / "state",
            "quarantine_dir": tmp_path / "q",
            "release_dir": tmp_path / "released",
            "seconds_per_gib": 1e6,
            "min_scan_seconds": 1.0,
            "min_free_bytes": 0,
        },
        {"secrets": [secret], "public_keys": [tmp_path / "pub"], "structural": False},
    )
    path = tmp_path / "gate.toml"
    path.write_text(text)
    cfg = load_config(path)
    assert cfg.release_dir == tmp_path / "released"
    assert cfg.quarantine_dir == tmp_path / "q"
    assert cfg.seconds_per_gib == 1e6
    assert cfg.min_scan_seconds == 1.0
    assert cfg.min_free_bytes == 0
    assert cfg.secrets == (secret,)
    assert cfg.public_keys == (tmp_path / "pub",)
    assert cfg.structural is False


def test_handler_argv_is_the_kernels_pattern() -> None:
    argv = handler_argv("/venv/bin/python", Path("/etc/g.toml"), 4242, "/usr/bin/my app", 17)
    assert argv[:4] == ["/venv/bin/python", "-I", "-m", "signer.gate"]
    # read back by the handler's own parser: %P %I %u %g %s %t %c %d %h %E
    parser = argparse.ArgumentParser()
    _gate.register_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv[4:])
    assert args.func is _gate.cmd_handle
    assert args.config == "/etc/g.toml"
    crash, problem = Crash.from_kernel(args.kernel)
    assert problem is None
    got = (crash.pid, crash.tid, crash.uid, crash.gid, crash.signal, crash.time, crash.core_limit)
    assert got == (4242, 4242, 0, 0, 11, 17, CORE_LIMIT)
    assert (crash.dump_mode, crash.hostname, crash.exe_escaped) == (1, "bench", "!usr!bin!my app")
