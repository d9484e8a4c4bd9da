"""signer._internal.config: defaults, TOML, SIGNER_* overrides, coercion, validation."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

from signer._internal import config
from signer._internal.config import (
    DAY,
    P11KIT_CLIENT_MODULE,
    SOFTHSM_MODULE,
    Config,
    KeysConfig,
    ServerConfig,
    StoreConfig,
    TokenConfig,
)
from signer.errors import ConfigError, SignerError


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "signer.toml"
    p.write_text(text)
    return p


# --- defaults ----------------------------------------------------------------------------------


def test_defaults_without_file_or_env() -> None:
    cfg = config.load(None, env={})
    assert cfg == Config()
    assert cfg.server.listen == "unix:var/run/signer.sock"
    assert cfg.server.max_message_bytes == 1024 * 1024
    assert cfg.server.grace_seconds == 10.0
    assert cfg.token.module == P11KIT_CLIENT_MODULE
    assert cfg.token.server_address == ""
    assert cfg.token.uri == "pkcs11:token=signer"
    assert cfg.token.pin_file == ""
    assert cfg.token.sessions == 8
    assert cfg.token.thread_safe == "auto"
    assert cfg.store.path == "var/signer.db"
    assert cfg.keys.destruction_waiting_period_seconds == 7 * DAY
    assert cfg.keys.min_destruction_waiting_period_seconds == DAY
    assert cfg.keys.reaper_interval_seconds == 60.0


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert config.load(write(tmp_path, ""), env={}) == Config()


def test_config_is_frozen() -> None:
    cfg = Config()
    with pytest.raises(AttributeError):
        cfg.server.listen = "0.0.0.0:1"  # type: ignore[misc]  # a frozen field, on purpose


# --- TOML --------------------------------------------------------------------------------------


def test_toml_file_sets_every_section(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[server]
listen = "unix:/run/s6000.sock"
max_message_bytes = 4096
grace_seconds = 3

[token]
module = "/usr/lib/softhsm/libsofthsm2.so"
server_address = "unix:path=/tmp/p11.sock"
uri = "pkcs11:token=other;serial=1234"
pin_file = "/etc/signer/pin"
sessions = 2
thread_safe = "false"
health_interval_seconds = 0.5

[store]
path = "/var/lib/signer/keys.db"

[keys]
destruction_waiting_period_seconds = 172800
min_destruction_waiting_period_seconds = 3600
reaper_interval_seconds = 5
""",
    )
    cfg = config.load(path, env={})
    assert cfg.server == ServerConfig(
        "unix:/run/s6000.sock", max_message_bytes=4096, grace_seconds=3.0
    )
    assert isinstance(cfg.server.grace_seconds, float)
    assert cfg.token == TokenConfig(
        module=SOFTHSM_MODULE,
        server_address="unix:path=/tmp/p11.sock",
        uri="pkcs11:token=other;serial=1234",
        pin_file="/etc/signer/pin",
        sessions=2,
        thread_safe="false",
        health_interval_seconds=0.5,
    )
    assert cfg.store == StoreConfig("/var/lib/signer/keys.db")
    assert cfg.keys == KeysConfig(172800, 3600, 5.0)


def test_partial_file_keeps_other_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "[token]\nsessions = 3\n"), env={})
    assert cfg.token.sessions == 3
    assert cfg.token.module == P11KIT_CLIENT_MODULE
    assert cfg.server == ServerConfig()


def test_missing_file_is_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="not found") as ei:
        config.load(missing, env={})
    assert str(missing) in ei.value.message


def test_invalid_toml_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, "[server\nlisten = "), env={})


def test_config_error_is_a_signer_error() -> None:
    assert issubclass(ConfigError, SignerError)


# --- environment overrides ---------------------------------------------------------------------


def test_env_overrides_win_over_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\nlisten = "unix:/run/s6000.sock"\n[token]\nsessions = 2\n[keys]\n'
        "reaper_interval_seconds = 5\n",
    )
    env = {
        "SIGNER_SERVER_LISTEN": "unix:/run/s7000.sock",
        "SIGNER_TOKEN_SESSIONS": "16",
        "SIGNER_KEYS_REAPER_INTERVAL_SECONDS": "0.25",
    }
    cfg = config.load(path, env=env)
    assert cfg.server.listen == "unix:/run/s7000.sock"
    assert cfg.token.sessions == 16
    assert cfg.keys.reaper_interval_seconds == 0.25


def test_env_override_without_file() -> None:
    cfg = config.load(
        None, env={"SIGNER_STORE_PATH": "/tmp/x.db", "SIGNER_TOKEN_THREAD_SAFE": "true"}
    )
    assert cfg.store.path == "/tmp/x.db"
    assert cfg.token.thread_safe == "true"


def test_unrelated_env_is_ignored() -> None:
    cfg = config.load(None, env={"PATH": "/bin", "SIGNERX_SERVER_LISTEN": "nope", "LISTEN": "x"})
    assert cfg == Config()


def test_env_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SIGNER_SERVER_LISTEN", "unix:/run/s6001.sock")
    assert config.load(None).server.listen == "unix:/run/s6001.sock"
    # An explicit env mapping replaces os.environ entirely.
    assert config.load(None, env={}).server.listen == "unix:var/run/signer.sock"


# --- type errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "setting"),
    [
        ('[token]\nsessions = "many"\n', "token.sessions"),
        ("[token]\nsessions = 2.5\n", "token.sessions"),
        ("[token]\nsessions = true\n", "token.sessions"),
        ("[server]\nlisten = 6000\n", "server.listen"),
        ('[server]\ngrace_seconds = "soon"\n', "server.grace_seconds"),
        ("[server]\ngrace_seconds = false\n", "server.grace_seconds"),
        ("[store]\npath = [1, 2]\n", "store.path"),
    ],
)
def test_file_type_errors_name_the_setting(tmp_path: Path, toml: str, setting: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config.load(write(tmp_path, toml), env={})
    assert f"setting {setting} must be" in ei.value.message


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        ({"SIGNER_TOKEN_SESSIONS": "eight"}, "token.sessions"),
        ({"SIGNER_SERVER_MAX_MESSAGE_BYTES": "1.5"}, "server.max_message_bytes"),
        ({"SIGNER_SERVER_GRACE_SECONDS": "abc"}, "server.grace_seconds"),
    ],
)
def test_env_type_errors_name_the_setting(env: dict[str, str], setting: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config.load(None, env=env)
    assert setting in ei.value.message


def test_coerce_bool() -> None:
    # No setting is a bool today, but the coercion is there for the first one.
    assert config._coerce("s", "n", True, bool) is True
    assert config._coerce("s", "n", "TRUE", bool) is True
    assert config._coerce("s", "n", "0", bool) is False
    with pytest.raises(ConfigError, match=r"s\.n must be bool"):
        config._coerce("s", "n", "yes", bool)


# --- unknown names -----------------------------------------------------------------------------


def test_unknown_section_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown section") as ei:
        config.load(write(tmp_path, "[servre]\nlisten = 'x'\n"), env={})
    assert "servre" in ei.value.message


def test_unknown_setting_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown setting\(s\) in \[token\]") as ei:
        config.load(write(tmp_path, "[token]\nsesions = 2\npin = 'x'\n"), env={})
    assert "sesions" in ei.value.message
    assert "pin" in ei.value.message


def test_section_must_be_a_table(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\[server\].*must be a table"):
        config.load(write(tmp_path, "server = 5\n"), env={})


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"SIGNER_TOKEN_SESSIONS": "0"}, "token.sessions must be at least 1"),
        ({"SIGNER_TOKEN_SESSIONS": "-3"}, "token.sessions must be at least 1"),
        ({"SIGNER_TOKEN_THREAD_SAFE": "yes"}, "token.thread_safe"),
        ({"SIGNER_TOKEN_THREAD_SAFE": "True"}, "token.thread_safe"),
        ({"SIGNER_TOKEN_URI": "token=signer"}, "token.uri"),
        ({"SIGNER_TOKEN_URI": "http://example"}, "token.uri"),
        ({"SIGNER_SERVER_MAX_MESSAGE_BYTES": "0"}, "server.max_message_bytes"),
        (
            {"SIGNER_KEYS_DESTRUCTION_WAITING_PERIOD_SECONDS": str(DAY - 1)},
            "keys.destruction_waiting_period_seconds is shorter",
        ),
        (
            {
                "SIGNER_KEYS_DESTRUCTION_WAITING_PERIOD_SECONDS": "100",
                "SIGNER_KEYS_MIN_DESTRUCTION_WAITING_PERIOD_SECONDS": "101",
            },
            "keys.min_destruction_waiting_period_seconds",
        ),
    ],
)
def test_validation_errors(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config.load(None, env=env)
    assert fragment in ei.value.message


def test_waiting_period_equal_to_minimum_is_fine() -> None:
    cfg = config.load(None, env={"SIGNER_KEYS_DESTRUCTION_WAITING_PERIOD_SECONDS": str(DAY)})
    assert cfg.keys.destruction_waiting_period_seconds == DAY


def test_validation_applies_to_file_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"token\.sessions"):
        config.load(write(tmp_path, "[token]\nsessions = 0\n"), env={})


# --- TokenConfig.concurrent --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "thread_safe", "expected"),
    [
        (P11KIT_CLIENT_MODULE, "auto", True),
        ("/opt/elsewhere/p11-kit-client.so", "auto", True),
        (SOFTHSM_MODULE, "auto", False),
        ("/usr/lib/libsofthsm2.so", "auto", False),
        ("/usr/lib/p11-kit-client.so.0", "auto", False),
        (SOFTHSM_MODULE, "true", True),
        (P11KIT_CLIENT_MODULE, "false", False),
        (P11KIT_CLIENT_MODULE, "true", True),
        (SOFTHSM_MODULE, "false", False),
    ],
)
def test_concurrent(module: str, thread_safe: str, expected: bool) -> None:
    assert TokenConfig(module=module, thread_safe=thread_safe).concurrent is expected


def test_concurrent_from_loaded_config() -> None:
    cfg = config.load(None, env={"SIGNER_TOKEN_MODULE": SOFTHSM_MODULE})
    assert cfg.token.concurrent is False
    assert config.load(None, env={}).token.concurrent is True


@pytest.mark.parametrize("mode", ["0999", "rw-rw----", "01777"])
def test_socket_mode_must_be_octal_permissions(mode: str) -> None:
    with pytest.raises(ConfigError, match=r"server\.socket_mode must be octal permissions"):
        config.load(None, env={"SIGNER_SERVER_SOCKET_MODE": mode})


def test_the_service_does_not_listen_on_a_network() -> None:
    with pytest.raises(ConfigError, match=r"server\.listen must be a Unix socket"):
        config.load(None, env={"SIGNER_SERVER_LISTEN": "0.0.0.0:50051"})


def test_dump_reads_back_as_the_same_configuration(tmp_path: Path) -> None:
    cfg = config.Config(
        server=ServerConfig(listen='unix:/run/a "quoted" dir/s.sock', perturb_freed_memory=False),
        token=TokenConfig(sessions=3, health_interval_seconds=0.25),
    )
    path = tmp_path / "signer.toml"
    path.write_text(config.dump(cfg))
    assert config.load(path, env={}) == cfg


def test_the_readme_shows_every_setting_with_its_default() -> None:
    """The README's signer.toml lists every setting; where it shows a plain value (not a path
    of make run's), it is the default."""
    import dataclasses
    import re
    import tomllib

    from signer._internal import config as config_mod

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = re.search(r"`signer.toml` \(written by.*?```toml\n(.*?)```", readme, re.S)
    assert block is not None
    shown = tomllib.loads(block.group(1))
    defaults = config_mod.Config()
    for section in dataclasses.fields(defaults):
        fields = {f.name: f for f in dataclasses.fields(getattr(defaults, section.name))}
        assert set(shown[section.name]) == set(fields), section.name
        for name, value in shown[section.name].items():
            if isinstance(value, str) and "/abs/path" in value:
                continue  # a path make run writes
            if (section.name, name) in (
                ("metrics", "listen"),
                ("front", "issuers_listen"),
                ("jwt", "issuers"),
            ):
                continue  # make run turns these on (launcher.py); the defaults are off
            assert value == getattr(getattr(defaults, section.name), name), (section.name, name)


def test_import_token_lifetime_setting(tmp_path: Path) -> None:
    assert config.load(env={}).keys.import_token_lifetime_seconds == DAY
    assert KeysConfig().import_token_lifetime_seconds == DAY
    path = tmp_path / "c.toml"
    path.write_text("[keys]\nimport_token_lifetime_seconds = 3600\n")
    assert config.load(path, env={}).keys.import_token_lifetime_seconds == 3600
    assert config.load(env={"SIGNER_KEYS_IMPORT_TOKEN_LIFETIME_SECONDS": "60"}).keys == replace(
        KeysConfig(), import_token_lifetime_seconds=60
    )
    with pytest.raises(ConfigError, match="import_token_lifetime_seconds must be positive"):
        config.load(env={"SIGNER_KEYS_IMPORT_TOKEN_LIFETIME_SECONDS": "0"})


# A database on a socket, its schema named, as the service's URL must give it.
PG_SOCKET = "postgresql:///signer?host=/run/postgresql&options=-csearch_path%3Dsigner"


@pytest.fixture
def passfile(tmp_path: Path) -> Path:
    """An owner-only passfile of this process's user, as libpq wants it."""
    p = tmp_path / "pgpass"
    p.write_text("*:*:*:signer:hunter2\n")
    p.chmod(0o600)
    return p


def test_store_path_is_a_file_or_a_postgresql_url(tmp_path: Path, passfile: Path) -> None:
    """What store.path accepts: a file, a database on a socket (libpq's default one too), one
    over TCP with a verified server certificate, with an owner-only passfile."""
    for location in (
        "var/signer.db",
        PG_SOCKET,
        "postgresql:///signer?options=-c%20search_path%3Dsigner",
        "postgresql://db.example:5432/signer?sslmode=verify-full&options=--search_path%3Ds",
        f"postgres://signer@db/signer?sslmode=verify-ca&passfile={passfile}"
        "&options=-csearch_path%3Dsigner",
    ):
        cfg = config.load(write(tmp_path, f"[store]\npath = {location!r}\n"), env={})
        assert cfg.store.path == location
    cases = [
        ("mysql://db/signer", "must be a file or a postgresql:// URL, got a 'mysql':// URL"),
        ("postgresql://signer:hunter2@db/signer", "must not carry the database's password"),
        ("postgres:///signer?password=hunter2", "must not carry the database's password"),
    ]
    for location, fragment in cases:
        with pytest.raises(ConfigError, match=f"{fragment}.*signer.toml line 3") as err:
            config.load(write(tmp_path, f"[server]\n[store]\npath = {location!r}\n"), env={})
        assert "hunter2" not in str(err.value)


@pytest.mark.parametrize(
    ("location", "fragment"),
    [
        # A libpq key=value string would be taken as an SQLite file named by it, password and all.
        ("host=db dbname=keys password=hunter2", "looks like a libpq key=value string"),
        (f"{PG_SOCKET}&sslpassword=hunter2", "must not carry sslpassword="),
        (f"{PG_SOCKET}&service=hunter2", "must not carry service="),
        # libpq before 18 does not know servicefile at all.
        (f"{PG_SOCKET}&servicefile=/hunter2", "must not carry servicefile=|not a valid"),
        # Over TCP, a server that does not prove itself can be impersonated, or downgraded.
        ("postgresql://db/signer?options=-csearch_path%3Dsigner", "needs sslmode=verify-full"),
        (
            "postgresql://db/signer?sslmode=require&options=-csearch_path%3Dsigner",
            "needs sslmode=verify-full",
        ),
        (
            "postgresql:///signer?hostaddr=10.0.0.1&sslmode=prefer&options=-csearch_path%3Ds",
            "needs sslmode=verify-full",
        ),
        (
            "postgresql:///signer?host=/run/pg,db&options=-csearch_path%3Dsigner",
            "needs sslmode=verify-full",
        ),
        # The schema named, one of them, as current_schema() will return it.
        ("postgresql:///signer?host=/run/pg", "must name the key store's schema"),
        ("postgresql:///signer?options=-csearch_path%3Da,b", "must name the key store's schema"),
        ("postgresql:///signer?options=-csearch_path%3DSigner", "must name the key store's schema"),
        (
            "postgresql:///signer?options=-csearch_path%3Da%20-csearch_path%3Db",
            "must name the key store's schema",
        ),
        ("postgresql://u:hunter2@[db/x", "not a valid PostgreSQL URL"),
    ],
)
def test_store_urls_that_are_refused(location: str, fragment: str) -> None:
    """Each gap of REVIEW.md 7 and 12 is a ConfigError naming the parameter, never the value
    of a secret (before: all but the password ones were accepted)."""
    with pytest.raises(ConfigError, match=fragment) as err:
        config._validate_store(location)
    assert "hunter2" not in str(err.value)
    assert str(err.value).startswith("store.path ")


def test_store_passfile_must_be_owner_only(tmp_path: Path, passfile: Path) -> None:
    """libpq ignores a passfile group or others can read, and the failure shows later as "no
    password supplied": it is refused at start, as a missing one or a directory is."""
    url = f"{PG_SOCKET}&passfile={{}}"
    config._validate_store(url.format(passfile))
    for path, fragment in (
        (tmp_path / "missing", "cannot be read"),
        (tmp_path, "not a regular file"),
    ):
        with pytest.raises(ConfigError, match=fragment):
            config._validate_store(url.format(path))
    for mode in (0o640, 0o604):
        passfile.chmod(mode)
        with pytest.raises(ConfigError, match="open to group or others") as err:
            config._validate_store(url.format(passfile))
        assert "hunter2" not in str(err.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file away needs root")
def test_store_passfile_must_be_the_services(passfile: Path) -> None:
    """A passfile of another user's (one who could rewrite it) is refused."""
    os.chown(passfile, 65534, 65534)
    with pytest.raises(ConfigError, match="not owned by this service's user"):
        config._validate_store(f"{PG_SOCKET}&passfile={passfile}")


def test_redacted_shows_no_secret() -> None:
    """What the CLI and messages show of a location: the URL without its password or secret
    parameters (percent-encoded names too), a key=value string not at all, a file as it is."""
    assert config.redacted("var/signer.db") == "var/signer.db"
    assert config.redacted(PG_SOCKET) == PG_SOCKET
    shown = config.redacted(
        "postgresql://signer:hunter2@db:5432/k?sslpassword=hunter2&pass%77ord=hunter2"
        "&options=-csearch_path%3Ds"
    )
    assert shown == (
        "postgresql://signer:***@db:5432/k?sslpassword=***&pass%77ord=***&options=-csearch_path%3Ds"
    )
    assert "hunter2" not in config.redacted("host=db password=hunter2")
    assert "hunter2" not in config.redacted("postgresql://u:hunter2@[db/x")


def test_audit_path_is_a_file_or_a_url_with_its_files_named_and_its_chain(tmp_path: Path) -> None:
    """Beside a database URL there is no PATH.key.pem nor PATH.archive/: the pin (the trust
    anchor outside the database) and the archives are named. audit.chain (a replica's chain)
    only with a URL, and a name fit for file and lock names."""
    files = "public_key_file = '/etc/signer/audit.pem'\narchive_dir = '/var/lib/signer/archive'\n"
    cfg = config.load(write(tmp_path, f"[audit]\npath = {PG_SOCKET!r}\nchain = 'r1'\n{files}"))
    assert (cfg.audit.path, cfg.audit.chain) == (PG_SOCKET, "r1")
    assert cfg.audit.pinned_key == Path("/etc/signer/audit.pem")
    with pytest.raises(ConfigError, match=r"audit\.public_key_file and audit\.archive_dir must"):
        config.load(write(tmp_path, f"[audit]\npath = {PG_SOCKET!r}\n"), env={})
    with pytest.raises(ConfigError, match=r"audit\.path must not carry") as err:
        config.load(write(tmp_path, f"[audit]\npath = 'postgresql://a:hunter2@/x'\n{files}"))
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match=r"audit\.chain names a chain of a database"):
        config.load(write(tmp_path, "[audit]\nchain = 'r1'\n"), env={})
    for bad in ("R1", "-r1", "r" * 33, "r 1", "r/1"):
        with pytest.raises(ConfigError, match=r"audit\.chain must be 1 to 32"):
            config.load(
                write(tmp_path, f"[audit]\npath = {PG_SOCKET!r}\nchain = {bad!r}\n{files}"),
                env={},
            )
