"""The process boundary around the keys, checked from outside the service.

* The service process maps p11-kit's client and never SoftHSM2 (``/proc/PID/maps``).
* Every private key the service creates is sensitive and non-extractable, read back through the
  token over a connection of the test's own, not through the service.
* The token host's files, directories and socket are owner-only.
* Core dumps are off (RLIMIT_CORE 0) for ``p11-kit server`` and every ``p11-kit-remote`` child.
"""

from __future__ import annotations

import os
import stat
from collections import Counter
from pathlib import Path

import pkcs11
import pkcs11.exceptions as p11e
import pytest
from pkcs11 import Attribute, ObjectClass

from signer._internal import hsm
from signer._internal.config import P11KIT_CLIENT_MODULE, SOFTHSM_MODULE
from tests.conftest import (
    RunningService,
    ServiceFactory,
    ServiceProcessFactory,
    TokenHostHandle,
    UniqueName,
)

pytestmark = pytest.mark.integration

SOFTHSM_NAME = Path(SOFTHSM_MODULE).name  # libsofthsm2.so
CLIENT_NAME = Path(P11KIT_CLIENT_MODULE).name  # p11-kit-client.so

# Attributes every private key object of the service must carry, and their required values.
REQUIRED_FLAGS = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.ALWAYS_SENSITIVE: True,
    Attribute.NEVER_EXTRACTABLE: True,
    Attribute.EXTRACTABLE: False,
}
# Key material that must never leave the token, per family.
SECRET_ATTRIBUTES = {
    "ec": [Attribute.VALUE],
    "rsa": [
        Attribute.PRIVATE_EXPONENT,
        Attribute.PRIME_1,
        Attribute.PRIME_2,
        Attribute.EXPONENT_1,
        Attribute.EXPONENT_2,
        Attribute.COEFFICIENT,
    ],
}


# --- helpers ------------------------------------------------------------------------------------


def mapped_files(pid: int) -> set[str]:
    """Paths of every file mapped into ``pid``."""
    paths = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/"):
            paths.add(parts[5].removesuffix(" (deleted)"))
    return paths


def open_files(pid: int) -> set[str]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            out.add(os.readlink(fd))
        except FileNotFoundError:
            continue
    return out


def process_group(pgid: int) -> dict[int, str]:
    """``{pid: comm}`` of every live process whose process group is ``pgid``."""
    members = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        # pid (comm) state ppid pgrp ...; comm may hold spaces or parentheses.
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members[int(entry.name)] = comm
    return members


def core_limit(pid: int) -> tuple[str, str]:
    """(soft, hard) of "Max core file size" in /proc/PID/limits."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max core file size"):
            soft, hard = line[len("Max core file size") :].split()[:2]
            return soft, hard
    raise AssertionError(f"no core limit in /proc/{pid}/limits")


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


# --- the service process never maps SoftHSM2 ----------------------------------------------------


def test_service_process_maps_p11kit_client_and_never_softhsm(
    service_process_factory: ServiceProcessFactory,
    token_host: TokenHostHandle,
    unique_name: UniqueName,
) -> None:
    sp = service_process_factory()
    name = unique_name()
    message = b"mapped by whom?"
    with sp.client() as c:
        c.create_key(name, "ec-p256")
        sig = c.sign(name, message=message)
        assert c.verify(name, sig.signature, message=message)
        # Read while the process is alive, connected and has used the token.
        maps = mapped_files(sp.pid)
        files = open_files(sp.pid)

    assert sp.proc.poll() is None
    names = {Path(p).name for p in maps}
    assert CLIENT_NAME in names, sorted(names)
    assert not [p for p in maps if "softhsm" in p.lower()], "SoftHSM2 is mapped into the service"
    assert SOFTHSM_NAME not in names
    # Nor does it hold any of the token's object files, PIN files or its configuration open.
    root = str(token_host.paths.root)
    assert not [f for f in files if f.startswith(root)], files


# --- key objects: sensitive, never extractable, read through the token --------------------------


@pytest.mark.parametrize("alg", ["ec-p256", "ec-p384", "rsa-2048", "rsa-3072"])
def test_private_key_objects_are_sensitive_and_never_extractable(
    service_factory: ServiceFactory, own_session: pkcs11.Session, unique_name: UniqueName, alg: str
) -> None:
    svc = service_factory()
    c = svc.client()
    name = unique_name()
    c.create_key(name, alg)
    c.rotate(name)  # every version, not just the first
    c.sign(name, message=b"used at least once", version=1)
    key = svc.server.store.get_key(name)
    assert [v.version for v in key.versions] == [1, 2]

    family = "ec" if alg.startswith("ec-") else "rsa"
    for v in key.versions:
        objs = list(own_session.get_objects({Attribute.ID: v.key_id}))
        classes = Counter(o.object_class for o in objs)
        assert classes == Counter([ObjectClass.PUBLIC_KEY, ObjectClass.PRIVATE_KEY])

        priv = own_session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=v.key_id)
        assert priv[Attribute.LABEL] == f"{name}/v{v.version}"
        assert priv[Attribute.SIGN] is True
        got = {a: priv[a] for a in REQUIRED_FLAGS}
        assert got == REQUIRED_FLAGS, f"{name} v{v.version}"

        # The private value cannot be read...
        for attr in SECRET_ATTRIBUTES[family]:
            with pytest.raises(p11e.AttributeSensitive):
                priv[attr]
        # ... CKA_VALUE included (an RSA private key has no CKA_VALUE at all)...
        expected = p11e.AttributeSensitive if family == "ec" else p11e.AttributeTypeInvalid
        with pytest.raises(expected):
            priv[Attribute.VALUE]
        # ... and cannot be made readable later.
        with pytest.raises(p11e.AttributeReadOnly):
            priv[Attribute.EXTRACTABLE] = True
        with pytest.raises(p11e.AttributeReadOnly):
            priv[Attribute.SENSITIVE] = False
        assert {a: priv[a] for a in REQUIRED_FLAGS} == REQUIRED_FLAGS

        # The public half is public, and matches what the service stored.
        pub = own_session.get_key(object_class=ObjectClass.PUBLIC_KEY, id=v.key_id)
        assert pub[Attribute.PRIVATE] is False
        assert pub[Attribute.TOKEN] is True


# --- the token host's files ---------------------------------------------------------------------


def test_token_host_files_and_socket_are_owner_only(token_host: TokenHostHandle) -> None:
    p = token_host.paths
    uid = os.getuid()
    assert p.socket.exists(), "the token host is not serving"
    assert stat.S_ISSOCK(p.socket.lstat().st_mode)
    expected = {
        p.root: 0o700,
        p.run: 0o700,
        p.socket: 0o600,
        p.so_pin: 0o600,
        p.user_pin: 0o600,
    }
    for path, want in expected.items():
        st = path.lstat()
        assert st.st_uid == uid, f"{path} is owned by uid {st.st_uid}"
        assert stat.S_IMODE(st.st_mode) == want, f"{path} has mode {mode(path):04o}"
    for path in (p.so_pin, p.user_pin):
        assert stat.S_ISREG(path.lstat().st_mode)
    # SoftHSM2's object files: nothing for group or others either.
    assert mode(p.tokens) & 0o077 == 0
    for f in p.tokens.rglob("*"):
        assert f.lstat().st_uid == uid
        assert mode(f) & 0o077 == 0, f"{f} has mode {mode(f):04o}"


def test_the_services_state_is_owner_only(
    service_factory: ServiceFactory, unique_name: UniqueName, tmp_path: Path
) -> None:
    """Key names, scopes, import tokens, audit records: none readable by other local users
    (issue 11: signer.db and audit.db were 0644), whatever the umask, with their WAL files."""
    old = os.umask(0o022)
    try:
        svc = service_factory(audit={"checkpoint_every": 1})
        c = svc.client()
        c.create_key(unique_name(), "ec-p256")
        c.get_import_parameters()
        files = [Path(svc.server.cfg.store.path), Path(svc.server.cfg.audit.path)]
        files += [Path(f"{f}{suffix}") for f in files for suffix in ("-wal", "-shm")]
        assert all(f.exists() for f in files), files
        assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
    finally:
        os.umask(old)


def test_signer_run_keeps_its_state_owner_only(tmp_path: Path) -> None:
    """What ``signer run`` prepares under var/: the directory others may pass through (to the
    sockets), never list; the configuration, the policy, the tokens and the CA key owner-only."""
    from signer._internal import launcher

    root = tmp_path / "var"
    root.mkdir(mode=0o755)
    (root / "policy.toml").write_text("# an older, open policy\n")
    (root / "policy.toml").chmod(0o644)
    launcher.prepare(root)
    launcher.write_config(root, "127.0.0.1:50051")
    assert mode(root) == 0o711
    for path in ("policy.toml", "signer.toml", "tls/ca.key", "hsm/user.pin", "hsm/tls.pin"):
        assert mode(root / path) == 0o600, path
    assert mode(root / "hsm") == 0o700
    assert (root / "policy.toml").read_text() == "# an older, open policy\n"  # kept, closed up


# --- no core dumps in the token host ------------------------------------------------------------


def test_token_host_processes_cannot_dump_core(
    token_host: TokenHostHandle,
    service: RunningService,
    own_session: pkcs11.Session,
    unique_name: UniqueName,
) -> None:
    # Two clients are connected now (the service and this test), so p11-kit server has
    # started a p11-kit-remote for each; make the service's do real work first.
    c = service.client()
    name = unique_name()
    c.create_key(name, "ec-p256")
    c.sign(name, message=b"core")
    assert own_session.token.label == hsm.DEFAULT_LABEL

    pgid = token_host.host.pid
    assert pgid is not None
    members = process_group(pgid)
    assert pgid in members, f"p11-kit server {pgid} is not in its own process group"
    remotes = [pid for pid, comm in members.items() if comm == "p11-kit-remote"]
    assert len(remotes) >= 2, members
    for pid in members:
        try:
            limit = core_limit(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue  # a remote whose client just went away
        assert limit == ("0", "0"), f"{members[pid]} ({pid}) may dump core: {limit}"
