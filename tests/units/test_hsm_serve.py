"""``signer hsm serve --socket/--socket-group --tls-socket/--tls-socket-group``, which the token
host's unit runs: each token served where its one client's user reaches it, 0660 to that
user's group, with the group coming from a setgid directory (as the unit makes them; no chown,
which the unit's system call filter refuses) or given by chown where the directory has another.
A member of the group lists the token through the socket; a user outside it cannot connect."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from signer._internal import config, hsm
from tests.conftest import SIGNER_BIN, _require_tools

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_tools()
    return hsm.init(tmp_path_factory.mktemp("units-hsm") / "hsm").root


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory others may pass through (pytest's tmp_path is its owner's alone)."""
    path = Path(tempfile.mkdtemp(prefix="signer-units-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _serve(tokens: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(SIGNER_BIN), "hsm", "serve", "--dir", str(tokens), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(proc: subprocess.Popen[str], *sockets: Path) -> None:
    deadline = time.monotonic() + 20
    while not all(s.exists() and stat.S_IMODE(s.stat().st_mode) == 0o660 for s in sockets):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.monotonic() < deadline, "the sockets were not shared in time"
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    return out


def _list_tokens(socket: Path, user: str, group: str) -> subprocess.CompletedProcess[str]:
    """pkcs11-tool through p11-kit-client.so, as ``user`` with only ``group``."""
    return subprocess.run(
        [
            "setpriv",
            f"--reuid={user}",
            f"--regid={group}",
            "--clear-groups",
            "pkcs11-tool",
            "--module",
            config.P11KIT_CLIENT_MODULE,
            "--list-token-slots",
        ],
        env={"PATH": "/usr/bin:/bin", "P11_KIT_SERVER_ADDRESS": f"unix:path={socket}"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_sockets_shared_with_their_groups(tokens: Path, public_dir: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None or shutil.which("pkcs11-tool") is None:
        pytest.skip("needs root (to act as two other users), setpriv and pkcs11-tool")
    member, outsider = grp.getgrnam("nogroup"), grp.getgrnam("daemon")
    nobody = pwd.getpwnam("nobody")
    # As the unit makes them: the signing socket's directory setgid to its group (no chown
    # is needed), the TLS socket's directory of another group (chowned).
    signing_dir, tls_dir = public_dir / "p11", public_dir / "p11-tls"
    signing_dir.mkdir()
    tls_dir.mkdir()
    os.chown(signing_dir, 0, member.gr_gid)
    signing_dir.chmod(0o2750)
    os.chown(tls_dir, 0, outsider.gr_gid)
    tls_dir.chmod(0o755)
    signing, tls = signing_dir / "p11-kit.sock", tls_dir / "p11-kit-tls.sock"
    proc = _serve(
        tokens,
        "--socket",
        str(signing),
        "--socket-group",
        member.gr_name,
        "--tls-socket",
        str(tls),
        "--tls-socket-group",
        member.gr_name,
    )
    try:
        _wait_for(proc, signing, tls)
        for socket in (signing, tls):
            assert socket.stat().st_gid == member.gr_gid
        assert not (tokens / "run" / hsm.SOCKET_NAME).exists()
        listed = _list_tokens(signing, nobody.pw_name, member.gr_name)
        assert listed.returncode == 0, listed.stderr
        assert f"token label        : {hsm.DEFAULT_LABEL}\n" in listed.stdout
        listed = _list_tokens(tls, nobody.pw_name, member.gr_name)
        assert listed.returncode == 0, listed.stderr
        assert f"token label        : {hsm.TLS_LABEL}\n" in listed.stdout
        # Control: the same user without the group is turned away at the socket.
        refused = _list_tokens(tls, nobody.pw_name, outsider.gr_name)
        assert f"token label        : {hsm.TLS_LABEL}" not in refused.stdout
    finally:
        out = _stop(proc)
    assert f"token host serving unix:path={signing}" in out
    assert not signing.exists()
    assert not tls.exists()


def test_an_unknown_group_is_refused_before_anything_starts(tokens: Path) -> None:
    done = subprocess.run(
        [str(SIGNER_BIN), "hsm", "serve", "--dir", str(tokens), "--socket-group", "no-such-grp"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "no group 'no-such-grp'" in done.stderr


def test_without_the_options_the_sockets_stay_owner_only(tokens: Path) -> None:
    proc = _serve(tokens)
    paths = hsm.HsmPaths(tokens)
    try:
        deadline = time.monotonic() + 20
        while not (
            paths.tls_socket.exists() and stat.S_IMODE(paths.tls_socket.stat().st_mode) == 0o600
        ):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert stat.S_IMODE(paths.socket.stat().st_mode) == 0o600
    finally:
        _stop(proc)
