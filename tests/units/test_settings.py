"""What each unit must say, read from the unit files (tests/units/unitfiles.py), and that the
example configurations (systemd/signer.toml, front.toml) name exactly the sockets,
credentials and directories the units make: a path that differs from one file to the other
passes systemd-analyze and fails only on a real host."""

from __future__ import annotations

from pathlib import Path

import pytest

from signer._internal import config, policy
from tests.units import unitfiles
from tests.units.unitfiles import FRONT, SERVICE, TOKEN_HOST, UNITS, Unit, one, words

USERS = {TOKEN_HOST: "signer-hsm", SERVICE: "signer", FRONT: "signer-front"}
# Sandboxing every unit has, whatever it runs.
COMMON = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "PrivateMounts": "yes",
    "PrivateIPC": "yes",
    "UMask": "0077",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "ProtectProc": "invisible",
    "RestrictNamespaces": "yes",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "SystemCallArchitectures": "native",
    "RemoveIPC": "yes",
    # Checked for each process: python3, p11-kit server and p11-kit-remote with SoftHSM2,
    # nginx with libp11's engine (systemd/README.md).
    "MemoryDenyWriteExecute": "yes",
}
CORE = {TOKEN_HOST: "0", SERVICE: "infinity", FRONT: "0"}
FAMILIES = {
    TOKEN_HOST: ["AF_UNIX"],
    SERVICE: ["AF_UNIX"],
    FRONT: ["AF_UNIX", "AF_INET", "AF_INET6"],
}
SYSTEM_CONFIG = Path("/etc/signer")


def _unit(name: str) -> Unit:
    return unitfiles.load(name)


@pytest.mark.parametrize("name", UNITS)
def test_no_single_valued_key_is_set_twice(name: str) -> None:
    for section, keys in _unit(name).items():
        twice = {k for k, v in keys.items() if len(v) > 1 and k not in unitfiles.LISTS}
        assert not twice, f"[{section}] {sorted(twice)}"


@pytest.mark.parametrize("name", UNITS)
def test_common_sandboxing(name: str) -> None:
    unit = _unit(name)
    assert {key: one(unit, key) for key in COMMON} == COMMON


@pytest.mark.parametrize("name", UNITS)
def test_a_dedicated_user_without_capabilities(name: str) -> None:
    unit = _unit(name)
    assert one(unit, "User") == USERS[name]
    assert one(unit, "Group") == USERS[name]
    assert len(set(USERS.values())) == len(USERS)
    # Empty assignments: no capability in the bounding set, none ambient.
    assert unit["Service"]["CapabilityBoundingSet"] == []
    assert unit["Service"]["AmbientCapabilities"] == []
    assert "DynamicUser" not in unit["Service"]


@pytest.mark.parametrize("name", UNITS)
def test_core_dumps(name: str) -> None:
    """Off for the token host (SoftHSM2, the keys) and the front (the TLS PIN, session keys);
    on for the service, whose dumps the crash harness proves clean and the dump gate scans."""
    assert one(_unit(name), "LimitCORE") == CORE[name]


@pytest.mark.parametrize("name", UNITS)
def test_address_families_and_network(name: str) -> None:
    unit = _unit(name)
    assert words(unit, "RestrictAddressFamilies") == FAMILIES[name]
    if name != FRONT:
        assert one(unit, "PrivateNetwork") == "yes"
        assert one(unit, "IPAddressDeny") == "any"


def test_the_metrics_drop_in_adds_internet_sockets_and_nothing_else() -> None:
    plain, metrics = unitfiles.load(SERVICE), unitfiles.load(SERVICE, metrics=True)
    assert words(metrics, "RestrictAddressFamilies") == ["AF_UNIX", "AF_INET", "AF_INET6"]
    assert one(metrics, "PrivateNetwork") == "no"
    assert one(metrics, "IPAddressDeny") == "any"
    changed = {
        key
        for key in plain["Service"].keys() | metrics["Service"].keys()
        if plain["Service"].get(key) != metrics["Service"].get(key)
    }
    assert changed == {"PrivateNetwork", "RestrictAddressFamilies", "IPAddressAllow"}


@pytest.mark.parametrize("name", UNITS)
def test_system_calls(name: str) -> None:
    unit = _unit(name)
    filters = unit["Service"]["SystemCallFilter"]
    assert filters[0] == "@system-service"
    assert all(f.startswith("~") for f in filters[1:])
    if name == TOKEN_HOST:
        assert filters[1:] == ["~@privileged @resources"]


@pytest.mark.parametrize("name", UNITS)
def test_no_secret_in_the_environment_or_on_argv(name: str) -> None:
    """PINs arrive as systemd credentials (files), never as Environment= or arguments."""
    unit = _unit(name)
    assert not unit["Service"].get("Environment")
    assert not unit["Service"].get("EnvironmentFile")
    assert not unit["Service"].get("SetCredential")
    for argv in unitfiles.commands(unit, "ExecStart"):
        assert not any("pin" in arg.lower() for arg in argv), argv


def test_pins_are_credentials_from_the_token_hosts_files() -> None:
    hsm = "/var/lib/signer/hsm"
    assert _unit(SERVICE)["Service"]["LoadCredential"] == [f"user.pin:{hsm}/user.pin"]
    assert _unit(FRONT)["Service"]["LoadCredential"] == [f"tls.pin:{hsm}/tls.pin"]
    assert "LoadCredential" not in _unit(TOKEN_HOST)["Service"]  # it owns them
    assert one(_unit(TOKEN_HOST), "StateDirectory") == "signer/hsm"
    assert one(_unit(TOKEN_HOST), "StateDirectoryMode") == "0700"


def test_ordering_and_restarts() -> None:
    """The service survives a token host restart (it reconnects): Wants, not Requires. The
    front is bound to the token host: stopped whenever it stops or dies, because nginx's engine
    keeps the dead host's session and must start afresh."""
    host, service, front = _unit(TOKEN_HOST), _unit(SERVICE), _unit(FRONT)
    assert words(service, "Wants", "Unit") == [TOKEN_HOST]
    assert "Requires" not in service["Unit"]
    assert "BindsTo" not in service["Unit"]
    assert TOKEN_HOST in words(service, "After", "Unit")
    assert words(front, "BindsTo", "Unit") == [TOKEN_HOST]
    assert {TOKEN_HOST, SERVICE} <= set(words(front, "After", "Unit"))
    assert {SERVICE, FRONT} <= set(words(host, "Before", "Unit"))
    for unit in (host, service, front):
        assert one(unit, "Restart") == "on-failure"
        assert one(unit, "WantedBy", "Install") == "multi-user.target"


def test_the_token_host_upholds_the_front() -> None:
    """After a crash, systemd 252 puts the token host in "failed" before its automatic restart:
    the bound front is stopped then, and the restart job's try-restart leaves a stopped front
    stopped, so mTLS stayed down. The token host's Upholds= (systemd >= 249; Debian 12 has 252)
    starts the front whenever the token host is active and the front is not; the front keeps
    BindsTo= and After= (stopped with the host, started after it, with a fresh PKCS#11
    session). Upholds= is a [Unit] setting: in [Service] systemd would ignore it, with a
    warning."""
    host, service, front = _unit(TOKEN_HOST), _unit(SERVICE), _unit(FRONT)
    assert words(host, "Upholds", "Unit") == [FRONT]
    assert "Upholds" not in host["Service"]
    assert "Upholds" not in service["Unit"]  # the service reconnects by itself
    assert "Upholds" not in front["Unit"]
    assert FRONT in words(host, "Before", "Unit")
    assert words(front, "BindsTo", "Unit") == [TOKEN_HOST]
    assert TOKEN_HOST in words(front, "After", "Unit")


def _socket_dirs(unit: Unit) -> dict[str, tuple[str, str, str]]:
    """Directories made by ``install -d`` in ExecStartPre=: path -> (owner, group, mode)."""
    made = {}
    for argv in unitfiles.commands(unit, "ExecStartPre"):
        assert argv[:2] == ["/usr/bin/install", "-d"], argv
        made[argv[-1]] = (
            unitfiles.option(argv, "-o"),
            unitfiles.option(argv, "-g"),
            unitfiles.option(argv, "-m"),
        )
    return made


def test_the_configurations_name_what_the_units_make() -> None:
    host, service, front = _unit(TOKEN_HOST), _unit(SERVICE), _unit(FRONT)
    svc = config.load(unitfiles.UNITS_DIR / "signer.toml", env={})
    fr = config.load(unitfiles.UNITS_DIR / "front.toml", env={})
    serve = unitfiles.commands(host, "ExecStart")[0]
    assert serve[1:3] == ["hsm", "serve"]
    assert unitfiles.option(serve, "--dir") == "/var/lib/signer/hsm"

    # The signing token's socket: the token host's, 0660 to a group only the service is in.
    sock, group = unitfiles.option(serve, "--socket"), unitfiles.option(serve, "--socket-group")
    assert svc.token.server_address == f"unix:path={sock}"
    assert _socket_dirs(host)[str(Path(sock).parent)] == ("signer-hsm", group, "2750")
    assert group in words(service, "SupplementaryGroups")
    assert group not in words(front, "SupplementaryGroups")
    # The TLS token's: only the front's.
    tls, tls_group = (
        unitfiles.option(serve, "--tls-socket"),
        unitfiles.option(serve, "--tls-socket-group"),
    )
    assert fr.front.server_address == f"unix:path={tls}"
    assert _socket_dirs(host)[str(Path(tls).parent)] == ("signer-hsm", tls_group, "2750")
    assert tls_group in words(front, "SupplementaryGroups")
    assert tls_group not in words(service, "SupplementaryGroups")
    assert sorted(words(host, "ReadWritePaths")) == sorted(str(Path(p).parent) for p in (sock, tls))

    # The front socket: the service's, 0660 to the group the front is in.
    front_socket = Path(svc.server.front_socket)
    assert fr.front.upstream == f"unix:{front_socket}"
    assert svc.server.front_socket_mode == "0660"
    shared = svc.server.front_socket_group
    assert _socket_dirs(service)[str(front_socket.parent)] == ("signer", shared, "2750")
    assert shared in words(service, "SupplementaryGroups")
    assert shared in words(front, "SupplementaryGroups")
    # The issuers' documents: the service writes them, 0755 for the front to read.
    issuers = svc.jwt.issuers_dir
    assert fr.front.issuers_dir == issuers
    assert _socket_dirs(service)[issuers] == ("signer", "signer", "0755")
    assert words(service, "ReadWritePaths") == [str(front_socket.parent), issuers]

    # The local socket in the service's runtime directory; state in its state directory.
    run = Path("/run") / one(service, "RuntimeDirectory")
    assert svc.server.listen == f"unix:{run / 'signer.sock'}"
    state = Path("/var/lib") / one(service, "StateDirectory")
    assert Path(svc.store.path).parent == state
    assert Path(svc.audit.path).parent == state
    assert one(service, "StateDirectoryMode") == "0700"
    assert svc.metrics.listen == ""  # the unit gives no Internet socket without the drop-in
    assert svc.server.policy_file == str(SYSTEM_CONFIG / "policy.toml")
    policy.load(unitfiles.UNITS_DIR / "policy.toml")

    # The PINs: the credentials the units load, where systemd puts them.
    assert svc.token.pin_file == f"/run/credentials/{SERVICE}/user.pin"
    assert fr.front.pin_file == f"/run/credentials/{FRONT}/tls.pin"

    # The front's workdir is its runtime directory; the two files agree on message sizes.
    assert fr.front.workdir == str(Path("/run") / one(front, "RuntimeDirectory"))
    assert one(front, "RuntimeDirectoryMode") == "0700"
    assert fr.server.max_message_bytes == svc.server.max_message_bytes
    assert fr.front.user == ""  # systemd, not nginx, drops root

    # Each unit reads its own file.
    assert unitfiles.option(unitfiles.commands(service, "ExecStart")[0], "--config") == str(
        SYSTEM_CONFIG / "signer.toml"
    )
    assert unitfiles.option(unitfiles.commands(front, "ExecStart")[0], "--config") == str(
        SYSTEM_CONFIG / "front.toml"
    )
