"""signer.gate.load_config: the keys of the gate's TOML file, their defaults, paths relative to
the file, and every mistake a ConfigError naming the file and the line."""

from __future__ import annotations

from pathlib import Path

import pytest

from signer.errors import ConfigError
from signer.gate import GateConfig, load_config
from signer.gate._config import GIB


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dump-gate.toml"
    path.write_text(text)
    return path


def test_an_empty_file_is_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg == GateConfig(path=tmp_path / "dump-gate.toml")
    assert cfg.state_dir == Path("/var/lib/signer-dump-gate")
    assert cfg.quarantine_dir == Path("/var/lib/signer-dump-gate/quarantine")
    assert cfg.release_dir is None  # chain to the replaced pattern
    assert (cfg.max_core_bytes, cfg.min_free_bytes) == (16 * GIB, GIB)
    assert (cfg.seconds_per_gib, cfg.min_scan_seconds) == (30.0, 30.0)
    assert (cfg.structural, cfg.notify, cfg.max_quarantine_bytes) == (True, (), 0)
    assert (cfg.blind_offsets, cfg.blind_workers) == ("every", 0)


def test_every_key_and_relative_paths_from_the_files_directory(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """
            [gate]
            state_dir = "state"
            quarantine_dir = "/srv/q"
            release_dir = "out"
            max_core_bytes = 1000
            seconds_per_gib = 12
            min_scan_seconds = 0.5
            min_free_bytes = 0
            notify = ["/usr/local/bin/page", "--team", "crypto"]
            [detect]
            secrets = ["keys/a.pem", "/etc/signer/user.pin"]
            public_keys = ["jwks"]
            service_configs = ["/etc/signer/signer.toml"]
            structural = false
            blind_offsets = "likely"
            blind_workers = 2
            """,
        )
    )
    assert cfg.state_dir == tmp_path / "state"
    assert cfg.quarantine_dir == Path("/srv/q")
    assert cfg.release_dir == tmp_path / "out"
    assert (cfg.max_core_bytes, cfg.seconds_per_gib, cfg.min_scan_seconds) == (1000, 12.0, 0.5)
    assert cfg.notify == ("/usr/local/bin/page", "--team", "crypto")
    assert cfg.secrets == (tmp_path / "keys/a.pem", Path("/etc/signer/user.pin"))
    assert cfg.public_keys == (tmp_path / "jwks",)
    assert (cfg.blind_offsets, cfg.blind_workers) == ("likely", 2)
    assert cfg.service_configs == (Path("/etc/signer/signer.toml"),)
    assert cfg.structural is False


def test_the_budget_grows_with_the_dump_from_a_floor() -> None:
    cfg = GateConfig(seconds_per_gib=100.0, min_scan_seconds=5.0)
    assert cfg.budget_seconds(0) == 5.0
    assert cfg.budget_seconds(GIB) == 100.0
    assert cfg.budget_seconds(4 * GIB) == 400.0


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("[gate]\nx = 1\n", "unknown setting gate.x", 2),
        ("[gate]\n[detect]\nsecrets = 'a.pem'\n", "detect.secrets must be a list", 3),
        ("[gate]\nmax_core_bytes = 0\n", "gate.max_core_bytes must be positive", 2),
        ("[gate]\nmax_core_bytes = '1G'\n", "must be an integer number of bytes", 2),
        ("[gate]\nseconds_per_gib = -1\n", "gate.seconds_per_gib must be positive", 2),
        ("[gate]\nmin_free_bytes = -1\n", "must not be negative", 2),
        ("[gate]\nmax_quarantine_bytes = -1\n", "gate.max_quarantine_bytes must not be", 2),
        ("[gate]\nnotify = ['']\n", "gate.notify must be a list of non-empty strings", 2),
        ("[gate]\nquarantine_dir = ''\n", "gate.quarantine_dir must be a path", 2),
        ("[detect]\nstructural = 'yes'\n", "detect.structural must be true or false", 2),
        ("[detect]\nblind_offsets = 'all'\n", 'detect.blind_offsets must be "every" or', 2),
        ("[detect]\nblind_workers = -1\n", "detect.blind_workers must be 0 (the CPUs) to 64", 2),
        ("[detect]\nblind_workers = 65\n", "detect.blind_workers must be 0 (the CPUs) to 64", 2),
        ("\n[detect]\nstructural = false\n", "nothing to search for", 2),
        ("[gates]\n", "unknown table [gates]", 1),
        ("[gate]\nstate_dir = \n", "is not valid TOML", 2),
    ],
)
def test_a_mistake_names_the_file_and_line(
    tmp_path: Path, text: str, message: str, line: int
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message in err.value.message
    assert str(path) in err.value.message
    assert f"line {line}" in err.value.message


def test_a_file_that_cannot_be_read_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
