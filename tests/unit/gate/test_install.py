"""signer.gate._install without the kernel: the two /proc files are plain files here (the real
kernel is tests/integration/test_dump_gate.py). What install records, what it refuses, what
uninstall restores or leaves, and what status reads from the gate's log and quarantine."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

from signer.errors import ConfigError, GateError
from signer.gate._install import (
    PATTERN_LIMIT,
    WRAPPER_TAG,
    GateState,
    Kernel,
    gate_pattern,
    install,
    is_gate_pattern,
    not_root_only,
    status,
    uninstall,
)


@pytest.fixture
def kernel(tmp_path: Path) -> Kernel:
    k = Kernel(tmp_path / "core_pattern", tmp_path / "core_pipe_limit")
    k.core_pattern.write_text("core\n")
    k.core_pipe_limit.write_text("0\n")
    return k


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "gate.toml"
    path.write_text(
        f'[gate]\nstate_dir = "{tmp_path}/state"\nquarantine_dir = "{tmp_path}/q"\n'
        "[detect]\nstructural = true\n"
    )
    return path


@pytest.fixture
def wrapper(tmp_path: Path) -> Path:
    d = tmp_path / "sbin"
    d.mkdir(mode=0o755)
    return d / "signer-dump-gate"


def test_install_records_the_replaced_pattern_then_sets_both(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    done = install(config, pipe_limit=8, wrapper=wrapper, kernel=kernel)
    pattern = f"|{wrapper} %P %i %u %g %s %t %c %h %E"
    assert kernel.pattern() == pattern == done.pattern
    assert kernel.pipe_limit() == 8
    state = json.loads((tmp_path / "state" / "state.json").read_text())
    assert state["installed"] is True
    assert state["previous_pattern"] == "core"
    assert state["previous_pipe_limit"] == 0
    assert state["gate_pattern"] == pattern
    assert state["config"] == str(config)
    assert stat.S_IMODE((tmp_path / "state" / "state.json").stat().st_mode) == 0o600
    for d in ("state", "q"):
        assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o700
    text = wrapper.read_text()
    assert stat.S_IMODE(wrapper.stat().st_mode) == 0o755
    assert text.startswith("#!/bin/sh\n")
    assert WRAPPER_TAG in text
    assert f"exec {sys.executable} -I -m signer.gate handle --config {config} " in text
    assert text.endswith(' -- "$@"\n')
    assert "installed" in done.lines()[0]
    assert "'core'" in done.lines()[1]


def test_reinstall_keeps_the_first_replaced_pattern(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    kernel.core_pattern.write_text("|/usr/lib/systemd/systemd-coredump %P %u %g %s %t %c %h\n")
    install(config, wrapper=wrapper, kernel=kernel)
    again = install(config, pipe_limit=4, wrapper=wrapper, kernel=kernel)
    assert again.reinstall
    state = GateState.read(tmp_path / "state")
    assert state is not None
    assert state.previous_pattern.startswith("|/usr/lib/systemd/systemd-coredump")
    assert state.previous_pipe_limit == 0
    assert kernel.pipe_limit() == 4


def test_refuses_to_install_over_a_gate_it_does_not_record(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    install(config, wrapper=wrapper, kernel=kernel)
    (tmp_path / "state" / "state.json").unlink()
    with pytest.raises(GateError, match="already runs a dump gate"):
        install(config, wrapper=wrapper, kernel=kernel)
    assert not (tmp_path / "state" / "state.json").exists()


def test_refuses_a_pattern_the_kernel_would_cut(
    kernel: Kernel, config: Path, tmp_path: Path
) -> None:
    long_dir = tmp_path / ("d" * 100)
    long_dir.mkdir()
    with pytest.raises(GateError, match=f"the kernel keeps {PATTERN_LIMIT}"):
        install(config, wrapper=long_dir / "signer-dump-gate", kernel=kernel)
    assert kernel.pattern() == "core"
    with pytest.raises(GateError, match="without spaces"):
        gate_pattern(Path("/usr/local/sbin/a gate"))
    with pytest.raises(GateError, match="absolute"):
        gate_pattern(Path("signer-dump-gate"))


def test_refuses_what_others_could_write(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    config.chmod(0o666)
    with pytest.raises(GateError, match=r"the config .* writable by group or others"):
        install(config, wrapper=wrapper, kernel=kernel)
    config.chmod(0o600)
    wrapper.parent.chmod(0o777)
    with pytest.raises(GateError, match=r"the wrapper .* writable by group or others"):
        install(config, wrapper=wrapper, kernel=kernel)
    wrapper.parent.chmod(0o755)
    os.chown(wrapper.parent, 65534, -1)
    with pytest.raises(GateError, match="belongs to uid 65534"):
        install(config, wrapper=wrapper, kernel=kernel)
    assert kernel.pattern() == "core"
    assert not wrapper.exists()


def test_a_sticky_directory_above_is_fine(tmp_path: Path) -> None:
    sticky = tmp_path / "tmp"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "mine").mkdir(mode=0o700)
    assert not_root_only(sticky / "mine" / "x") is None
    assert not_root_only(sticky) is not None  # the sticky directory itself: others write it


def test_refuses_a_pipe_limit_of_zero_and_a_config_that_does_not_load(
    kernel: Kernel, config: Path, wrapper: Path
) -> None:
    with pytest.raises(GateError, match="must be 1 or more"):
        install(config, pipe_limit=0, wrapper=wrapper, kernel=kernel)
    config.write_text("[gate]\nmax_core_bytes = -1\n")
    with pytest.raises(ConfigError, match="max_core_bytes"):
        install(config, wrapper=wrapper, kernel=kernel)
    assert kernel.pattern() == "core"
    assert not wrapper.exists()


def test_uninstall_restores_and_removes_the_wrapper(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    kernel.core_pattern.write_text("/var/crash/core.%p\n")
    kernel.core_pipe_limit.write_text("2\n")
    install(config, wrapper=wrapper, kernel=kernel)
    done = uninstall(config, kernel=kernel)
    assert done.restored
    assert kernel.pattern() == "/var/crash/core.%p"
    assert kernel.pipe_limit() == 2
    assert not wrapper.exists()
    state = GateState.read(tmp_path / "state")
    assert state is not None
    assert not state.installed
    assert state.uninstalled_at
    again = uninstall(config, kernel=kernel)
    assert not again.restored
    assert "not installed" in again.note


def test_uninstall_leaves_a_pattern_someone_else_set(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    install(config, wrapper=wrapper, kernel=kernel)
    kernel.core_pattern.write_text("|/usr/share/apport/apport %p %s %c\n")
    done = uninstall(config, kernel=kernel)
    assert not done.restored
    assert done.left
    assert "apport" in done.note
    assert "left as it is" in done.note
    assert kernel.pattern() == "|/usr/share/apport/apport %p %s %c"
    assert kernel.pipe_limit() == 16
    state = GateState.read(tmp_path / "state")
    assert state is not None
    assert not state.installed


def test_uninstall_with_a_broken_config_needs_the_state_dir(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    install(config, wrapper=wrapper, kernel=kernel)
    config.write_text("not toml [")
    with pytest.raises(ConfigError):
        uninstall(config, kernel=kernel)
    assert uninstall(config, state_dir=tmp_path / "state", kernel=kernel).restored
    assert kernel.pattern() == "core"


def test_is_gate_pattern() -> None:
    assert is_gate_pattern("|/usr/local/sbin/signer-dump-gate %P")
    assert not is_gate_pattern("core")
    assert not is_gate_pattern("|/usr/lib/systemd/systemd-coredump %P")
    assert not is_gate_pattern("|")


def _dump(qdir: Path, name: str, decision: str, reason: str, core: bool = True) -> None:
    d = qdir / name
    d.mkdir(parents=True)
    meta = {"pid": 42, "uid": 0, "exe": "/usr/bin/x", "signal": 11}
    (d / "meta.json").write_text(json.dumps({**meta, "decision": decision, "reason": reason}))
    if core:
        (d / "core").write_bytes(b"\0" * 1000)


def test_status_reads_the_log_and_the_quarantine(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    install(config, wrapper=wrapper, kernel=kernel)
    q = tmp_path / "q"
    _dump(q, "1-42-x", "quarantined:findings", "2 findings: key.pem")
    _dump(q, "2-43-y", "quarantined:budget", "scan budget of 30 s exceeded")
    _dump(q, "3-44-z", "released", "clean", core=False)
    log = tmp_path / "state" / "gate.log"
    lines = [
        {"time": "t1", "pid": 42, "decision": "quarantined:findings", "reason": "2 findings"},
        {"time": "t2", "pid": 43, "decision": "quarantined:budget"},
        {"time": "t3", "pid": 44, "decision": "released"},
        {"time": "t4", "msg": "a line without a decision"},
    ]
    log.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    st = status(config, kernel=kernel)
    assert st.installed
    assert st.core_pattern.startswith(f"|{wrapper}")
    assert st.decisions == {"quarantined:findings": 1, "quarantined:budget": 1, "released": 1}
    assert [x["dir"] for x in st.quarantine] == ["1-42-x", "2-43-y"]
    assert st.quarantine[0]["reason"] == "2 findings: key.pem"
    assert st.quarantine_bytes == 2000
    assert [r["pid"] for r in st.recent] == [44, 43, 42]
    json.dumps(st.to_dict())
    text = "\n".join(st.lines())
    assert "dump gate: installed" in text
    assert "'core'" in text
    assert "1-42-x" in text
    kernel.core_pattern.write_text("core\n")
    st = status(config, kernel=kernel)
    assert not st.installed
    assert any("not the gate's" in n for n in st.notes)


def test_status_without_a_log_counts_the_quarantine(
    kernel: Kernel, config: Path, tmp_path: Path
) -> None:
    _dump(tmp_path / "q", "1-42-x", "quarantined:error", "the scan failed")
    st = status(config, kernel=kernel)
    assert not st.installed
    assert st.state is None
    assert st.decisions == {"quarantined:error": 1}
    config.write_text("[gate]\nbogus = 1\n")
    st = status(config, kernel=kernel)
    assert "bogus" in st.config_error


@pytest.mark.parametrize("hostname", ["--config=/tmp/evil.toml", "-x"])
def test_what_the_kernel_passes_is_never_an_option(hostname: str) -> None:
    """A crashing process chooses its hostname (%h) in a user namespace: after the wrapper's
    '--' it stays the hostname, and neither picks the gate's config nor ends it (review)."""
    import argparse

    from signer.cli import _gate

    parser = argparse.ArgumentParser()
    _gate.register_commands(parser.add_subparsers(dest="gate_command", required=True))
    args = parser.parse_args(
        [
            *("handle", "--config", "/etc/good.toml", "--"),
            *("42", "42", "1000", "1000", "11", "1700000000", "0", hostname, "!usr!bin!victim"),
        ]
    )
    assert (str(args.config), args.hostname, args.exe) == (
        "/etc/good.toml",
        hostname,
        "!usr!bin!victim",
    )
