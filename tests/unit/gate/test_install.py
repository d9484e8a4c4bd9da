"""signer.gate._install without the kernel: the two /proc files are plain files here (the real
kernel is tests/integration/test_dump_gate.py). What install records, what it refuses, what
uninstall restores or leaves, and what status reads from the gate's log and quarantine."""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from signer.errors import ConfigError, GateError
from signer.gate._files import not_root_only
from signer.gate._install import (
    DEFAULT_WRAPPER,
    OLD_SPECIFIERS,
    PATTERN_LIMIT,
    SPECIFIERS,
    WRAPPER_TAG,
    GateState,
    Kernel,
    gate_pattern,
    install,
    is_gate_pattern,
    printable,
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
    pattern = f"|{wrapper} %P %I %u %g %s %t %c %d %h %E"
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


NOBODY = 65534


def _refused(match: str, kernel: Kernel, config: Path, wrapper: Path) -> str:
    """install refuses, with ``match`` and "Not installed", and changes nothing."""
    with pytest.raises(GateError, match=match) as err:
        install(config, wrapper=wrapper, kernel=kernel)
    assert err.value.message.endswith("Not installed")
    assert kernel.pattern() == "core"
    assert not wrapper.exists()
    return err.value.message


def _configure(config: Path, gate: str = "", detect: str = "") -> None:
    base = config.parent
    config.write_text(
        f'[gate]\nstate_dir = "{base}/state"\nquarantine_dir = "{base}/q"\n{gate}\n'
        f"[detect]\nstructural = true\n{detect}\n"
    )


@pytest.mark.parametrize("setting", ["state_dir", "quarantine_dir"])
def test_refuses_a_state_or_quarantine_dir_others_could_change(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path, setting: str
) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    config.write_text(
        config.read_text().replace(
            f"{tmp_path}/{'state' if setting == 'state_dir' else 'q'}", f"{theirs}/d"
        )
    )
    said = _refused(
        f"{setting} {theirs}/d: {theirs} belongs to uid {NOBODY}", kernel, config, wrapper
    )
    assert "as root" in said
    assert not (theirs / "d").exists()
    os.chown(theirs, 0, 0)
    theirs.chmod(0o775)
    _refused(f"{setting} .*writable by group or others \\(mode 775\\)", kernel, config, wrapper)


def test_release_dir_may_be_a_sticky_directory_of_roots_but_nothing_looser(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    crash = tmp_path / "crash"
    crash.mkdir()
    crash.chmod(0o1777)  # as /var/crash
    _configure(config, f'release_dir = "{crash}"')
    install(config, wrapper=wrapper, kernel=kernel)
    uninstall(config, kernel=kernel)
    kernel.core_pattern.write_text("core\n")
    crash.chmod(0o777)  # not sticky: others could rename the gate's files in it
    said = _refused(f"release_dir {crash}: {crash} is writable by group", kernel, config, wrapper)
    assert "sticky" in said
    crash.chmod(0o1777)
    os.chown(crash, NOBODY, NOBODY)
    _refused(f"release_dir {crash}: {crash} belongs to uid {NOBODY}", kernel, config, wrapper)
    os.chown(crash, 0, 0)
    above = tmp_path / "above"
    above.mkdir()
    above.chmod(0o1777)  # sticky above is fine, but a missing release_dir in it is not
    _configure(config, f'release_dir = "{above}/crash"')
    _refused(f"{above}/crash does not exist and {above}", kernel, config, wrapper)
    _configure(config, f'release_dir = "{tmp_path}/g/crash"')
    (tmp_path / "g").mkdir()
    (tmp_path / "g").chmod(0o770)
    _refused(f"release_dir .*{tmp_path}/g is writable by group", kernel, config, wrapper)


def test_refuses_files_the_scan_reads_that_others_could_change(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    key = tmp_path / "key.pem"
    key.write_text("not read at install")
    _configure(config, detect=f'secrets = ["{key}"]')
    install(config, wrapper=wrapper, kernel=kernel)
    uninstall(config, kernel=kernel)
    kernel.core_pattern.write_text("core\n")
    os.chown(key, NOBODY, NOBODY)
    said = _refused(
        f"detect.secrets file {key}: {key} belongs to uid {NOBODY}", kernel, config, wrapper
    )
    assert "release a dump with a key in it" in said
    # A link to a file someone else may rewrite, from a directory of public keys.
    keys = tmp_path / "public-keys"
    keys.mkdir()
    (keys / "a.pem").write_text("x")
    (keys / "b.pem").symlink_to(key)
    _configure(config, detect=f'public_keys = ["{keys}"]')
    _refused(
        f"a file in {keys} {keys}/b.pem: {key} belongs to uid {NOBODY}", kernel, config, wrapper
    )
    service = tmp_path / "svc" / "signer.toml"
    service.parent.mkdir()
    service.write_text("")
    service.parent.chmod(0o777)
    _configure(config, detect=f'service_configs = ["{service}"]')
    _refused(
        f"detect.service_configs file {service}: .* writable by group", kernel, config, wrapper
    )


def _venv(tmp_path: Path) -> Path:
    """A bare virtualenv of this interpreter (no pip): its python and site-packages."""
    import subprocess

    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    (site,) = env.glob("lib/python3*/site-packages")
    return site


def test_refuses_an_import_path_entry_others_could_write(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    """A .pth file puts a directory uid 65534 owns on ``python -I``'s sys.path: the handler
    would import from it as root."""
    site = _venv(tmp_path)
    python = str(site.parents[2] / "bin" / "python")
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    (site / "extra.pth").write_text(f"{theirs}\n")
    with pytest.raises(GateError, match=f"import path entry {theirs} .*belongs to uid {NOBODY}"):
        install(config, wrapper=wrapper, python=python, kernel=kernel)
    assert kernel.pattern() == "core"
    (site / "extra.pth").unlink()
    os.chown(theirs, 0, 0)
    done = install(config, wrapper=wrapper, python=python, kernel=kernel)
    assert done.pattern == kernel.pattern()


def test_a_site_packages_others_could_write_is_refused_before_its_pth_files_run(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    site = _venv(tmp_path)
    python = str(site.parents[2] / "bin" / "python")
    ran = tmp_path / "ran"
    (site / "planted.pth").write_text(f"import pathlib; pathlib.Path({str(ran)!r}).touch()\n")
    os.chown(site / "planted.pth", NOBODY, NOBODY)
    with pytest.raises(GateError, match=f"planted.pth belongs to uid {NOBODY}"):
        install(config, wrapper=wrapper, python=python, kernel=kernel)
    assert not ran.exists()  # install did not run it as root to learn sys.path
    os.chown(site / "planted.pth", 0, 0)
    site.chmod(0o777)
    with pytest.raises(GateError, match=f"import path entry {site} .*writable by group"):
        install(config, wrapper=wrapper, python=python, kernel=kernel)
    assert not ran.exists()
    assert kernel.pattern() == "core"


def test_refuses_a_file_deep_in_site_packages_others_could_write(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    """Two levels down (as cryptography/hazmat/..., hyperscan's .so, a __pycache__): imported
    as root as much as a top-level module (review: only one level was checked)."""
    site = _venv(tmp_path)
    python = str(site.parents[2] / "bin" / "python")
    deep = site / "pkg" / "sub" / "mod.py"
    deep.parent.mkdir(parents=True)
    deep.write_text("")
    os.chown(deep, NOBODY, NOBODY)
    with pytest.raises(GateError, match=f"{site} .*{deep} belongs to uid {NOBODY}"):
        install(config, wrapper=wrapper, python=python, kernel=kernel)
    assert kernel.pattern() == "core"
    os.chown(deep, 0, 0)
    assert install(config, wrapper=wrapper, python=python, kernel=kernel).pattern


def test_refuses_a_notify_script_others_could_write(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    """Every argument naming a path: ``python3 page.py`` runs page.py as root."""
    page = tmp_path / "page.py"
    page.write_text("")
    os.chown(page, NOBODY, NOBODY)
    _configure(config, f'notify = ["/usr/bin/python3", "{page}", "-s", "tmp/x"]')
    said = _refused(
        f"an argument of the notify command {page}: {page} belongs to uid {NOBODY}",
        kernel,
        config,
        wrapper,
    )
    assert "as root" in said
    os.chown(page, 0, 0)
    install(config, wrapper=wrapper, kernel=kernel)
    uninstall(config, kernel=kernel)
    kernel.core_pattern.write_text("core\n")
    # One that does not exist yet, where others could make it first.
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o1777)
    _configure(config, f'notify = ["/usr/bin/python3", "{open_dir}/later.py"]')
    _refused(f"{open_dir}/later.py does not exist and {open_dir}", kernel, config, wrapper)
    # A device is open by design; only the way to it is checked.
    _configure(config, 'notify = ["/usr/bin/logger", "-f", "/dev/null"]')
    install(config, wrapper=wrapper, kernel=kernel)


def test_a_bare_notify_command_is_checked_where_the_kernels_path_finds_it(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    from signer.gate._release import KERNEL_ENV

    _configure(config, 'notify = ["no-such-command-for-the-gate", "x"]')
    said = _refused("is not in the PATH the gate runs it with", kernel, config, wrapper)
    assert KERNEL_ENV["PATH"] in said
    _configure(config, 'notify = ["true"]')  # in /usr/bin (or /bin), root's
    install(config, wrapper=wrapper, kernel=kernel)


def test_refuses_a_file_of_the_signer_package_others_could_write(
    kernel: Kernel, config: Path, wrapper: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import signer

    fake = tmp_path / "pkg" / "signer"
    (fake / "gate").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "gate" / "_handler.py").write_text("")
    os.chown(fake / "gate" / "_handler.py", NOBODY, NOBODY)
    monkeypatch.setattr(signer, "__file__", str(fake / "__init__.py"))
    _refused(f"a file of the signer package {fake}/gate/_handler.py", kernel, config, wrapper)


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


def test_the_default_pattern_passes_the_dump_mode_within_the_kernels_limit() -> None:
    pattern = gate_pattern(DEFAULT_WRAPPER)
    assert pattern == f"|{DEFAULT_WRAPPER} %P %I %u %g %s %t %c %d %h %E"
    assert len(pattern.encode()) <= PATTERN_LIMIT


@pytest.mark.parametrize("specifiers", [SPECIFIERS, *OLD_SPECIFIERS])
def test_a_gate_installed_with_older_specifiers_is_still_the_gates(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path, specifiers: str
) -> None:
    """An install from before %d: still recognised as a gate, and uninstall, status and a
    re-install (which moves it to the new pattern) go by what its state file recorded."""
    old = f"|{wrapper} {specifiers}"
    assert is_gate_pattern(old)
    assert is_gate_pattern(f"|{DEFAULT_WRAPPER} {specifiers}")
    install(config, wrapper=wrapper, kernel=kernel)
    state = GateState.read(tmp_path / "state")
    assert state is not None
    replace(state, gate_pattern=old).write(tmp_path / "state")
    kernel.core_pattern.write_text(old + "\n")
    assert status(config, kernel=kernel).installed
    again = install(config, wrapper=wrapper, kernel=kernel)
    assert again.reinstall
    assert kernel.pattern() == gate_pattern(wrapper)
    assert again.previous_pattern == "core"
    replace(state, gate_pattern=old).write(tmp_path / "state")
    kernel.core_pattern.write_text(old + "\n")
    assert uninstall(config, kernel=kernel).restored
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


def test_status_shows_what_crashed_processes_named_escaped(
    kernel: Kernel, config: Path, wrapper: Path, tmp_path: Path
) -> None:
    """An executable's name, a reason and a directory name are chosen by whoever crashed: an
    ESC or OSC sequence, a carriage return or a bidi override in them, printed raw, would
    rewrite or hide lines on root's terminal."""
    install(config, wrapper=wrapper, kernel=kernel)
    evil = "/tmp/x\x1b[2K\rreleased: all clean\x1b]0;title\x07\u202eexe\nnote: fake"
    q = tmp_path / "q"
    _dump(q, "1-42-x\x1b[1A", "quarantined:findings", f"found in {evil}")
    meta = json.loads((q / "1-42-x\x1b[1A" / "meta.json").read_text())
    (q / "1-42-x\x1b[1A" / "meta.json").write_text(json.dumps({**meta, "exe": evil}))
    (tmp_path / "state" / "gate.log").write_text(
        json.dumps({"time": "t1", "pid": 42, "exe": evil, "decision": "released"}) + "\n"
    )
    st = status(config, kernel=kernel)
    lines = st.lines()
    text = "\n".join(lines)
    assert all(c.isprintable() for line in lines for c in line)
    assert "\\x1b[2K\\rreleased: all clean\\x1b]0;title\\x07\\u202eexe\\nnote: fake" in text
    assert "1-42-x\\x1b[1A" in text
    assert not any(line.startswith("note: fake") for line in lines)
    assert st.to_dict()["recent"][0]["exe"] == evil  # --json: escaped by json, kept whole
    assert printable("plain /usr/bin/é ok") == "plain /usr/bin/é ok"


@pytest.mark.parametrize("hostname", ["--config=/tmp/evil.toml", "-x", "--", "-h"])
def test_what_the_kernel_passes_is_never_an_option(hostname: str) -> None:
    """A crashing process chooses its hostname (%h) in a user namespace: after the wrapper's
    '--' it stays the hostname, and neither picks the gate's config nor ends it (review)."""
    import argparse

    from signer.cli import _gate
    from signer.gate import Crash

    parser = argparse.ArgumentParser()
    _gate.register_commands(parser.add_subparsers(dest="gate_command", required=True))
    args = parser.parse_args(
        [
            *("handle", "--config", "/etc/good.toml", "--"),
            *("42", "42", "1000", "1000", "11", "1700000000", "0", "2", hostname),
            "!usr!bin!victim",
        ]
    )
    crash, problem = Crash.from_kernel(args.kernel)
    assert (str(args.config), crash.hostname, crash.exe_escaped, problem) == (
        "/etc/good.toml",
        hostname,
        "!usr!bin!victim",
        None,
    )
