"""``signer run`` as root: the TLS front is a process of its own user, which can sign nothing.

Issue 11: nginx ran as root (``master_process off`` never drops privileges), so a process with
nginx's uid read the signing token's PIN file, logged into the signing token and signed outside
the service, and could read the dev CA key and the audit database. Now the front runs as
``signer-front``, reaching only its socket, the TLS token's socket and PIN, and the
certificates; this checks it as that user, with positive controls (what it needs, it reaches).
"""

from __future__ import annotations

import json
import os
import pwd
from pathlib import Path

import pytest

from signer._internal import config as config_mod
from signer.client import ClientTLS, SignerClient
from tests.conftest import free_port, run_as
from tests.integration.conftest import SignerRun

pytestmark = pytest.mark.integration

# What the front's user tries, each answered "ok" or the error's name.
PROBE = r"""
import json, os, socket, sys
root, world = sys.argv[1], sys.argv[2]
out = {}
def attempt(what, fn):
    try:
        fn()
        out[what] = "ok"
    except Exception as exc:
        out[what] = type(exc).__name__
def read(path):
    with open(path, "rb") as fh:
        fh.read(1)
def connect(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
for rel in ("hsm/user.pin", "hsm/so.pin", "hsm/tls.pin", "tls/ca.key", "tls/clients/dev.key",
            "signer.db", "audit.db", "policy.toml", "signer.toml"):
    attempt("read " + rel, lambda rel=rel: read(os.path.join(root, rel)))
for rel in ("run/signer.sock", "hsm/run/p11-kit.sock"):
    attempt("connect " + rel, lambda rel=rel: connect(os.path.join(root, rel)))
for name in ("tls.pin", "server.pem"):
    attempt("read WORLD/" + name, lambda name=name: read(os.path.join(world, name)))
for name in ("signer.sock", "p11-kit-tls.sock"):
    attempt("connect WORLD/" + name, lambda name=name: connect(os.path.join(world, name)))
def signing_token():
    import pkcs11
    os.environ["P11_KIT_SERVER_ADDRESS"] = "unix:path=" + os.path.join(root, "hsm/run/p11-kit.sock")
    lib = pkcs11.lib("/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
    if not lib.get_slots(token_present=True):
        raise LookupError("no token")
attempt("reach the signing token", signing_token)
print(json.dumps(out))
"""

DENIED = "PermissionError"


def test_the_front_runs_as_its_own_user_and_reaches_nothing_else(signer_run: SignerRun) -> None:
    root, port = signer_run.root, signer_run.port
    front = pwd.getpwnam("signer-front")
    cfg = config_mod.load(root / "signer.toml")
    world = Path(cfg.front.workdir).parent
    assert not world.is_relative_to(root)  # the front's world is outside the state directory
    assert cfg.front.user == "signer-front"
    nginx = int((Path(cfg.front.workdir) / "nginx" / "nginx.pid").read_text())
    status = Path(f"/proc/{nginx}/status").read_text().splitlines()
    uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    assert uids == [str(front.pw_uid)] * 4, f"nginx runs as {uids}"
    # It still does its job: an mTLS call through it, the handshake signed in the TLS token.
    tls = ClientTLS(
        root / "tls" / "ca.pem", *(root / "tls" / "clients" / n for n in ("dev.pem", "dev.key"))
    )
    with SignerClient(f"127.0.0.1:{port}", tls=tls, timeout=30) as c:
        assert c.get_key("demo").name == "demo"

    done = run_as(front, PROBE, str(root), str(world))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        # Nothing that signs, nothing of the service's state, no other socket.
        "read hsm/user.pin": DENIED,
        "read hsm/so.pin": DENIED,
        "read hsm/tls.pin": DENIED,
        "read tls/ca.key": DENIED,
        "read tls/clients/dev.key": DENIED,
        "read signer.db": DENIED,
        "read audit.db": DENIED,
        "read policy.toml": DENIED,
        "read signer.toml": DENIED,
        "connect run/signer.sock": DENIED,
        "connect hsm/run/p11-kit.sock": DENIED,
        "reach the signing token": "LookupError",
        # What it needs (the positive controls): its PIN, its certificate, its two sockets.
        "read WORLD/tls.pin": "ok",
        "read WORLD/server.pem": "ok",
        "connect WORLD/signer.sock": "ok",
        "connect WORLD/p11-kit-tls.sock": "ok",
    }


def test_a_front_running_as_its_own_user_cannot_lead_root_through_its_links(tmp_path: Path) -> None:
    """The front's user owns what nginx writes. Links it leaves there (to the signing PIN, say)
    are neither followed nor read by the next start as root: nginx's directory is made afresh,
    and root's own files in the workdir are opened without following links."""
    from dataclasses import replace

    from signer._internal.config import Config, FrontConfig
    from signer._internal.front import Front
    from signer.errors import FailedPrecondition

    secret = tmp_path / "user.pin"
    secret.write_text("not-for-the-front\n")
    secret.chmod(0o600)
    nobody = pwd.getpwnam("nobody")
    workdir = tmp_path / "front"
    state = workdir / "nginx"
    state.mkdir(parents=True)
    (state / "error.log").symlink_to(secret)  # what a compromised nginx could leave
    (state / "tmp").symlink_to(tmp_path)
    for path in (state, state / "error.log", state / "tmp"):
        os.chown(path, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
    for name in ("cert.pem", "ca.pem", "tls.pin"):
        (tmp_path / name).write_text("")
    cfg = Config(
        front=FrontConfig(
            listen=f"127.0.0.1:{free_port()}",
            certificate=str(tmp_path / "cert.pem"),
            pin_file=str(tmp_path / "tls.pin"),
            server_address="unix:path=/nonexistent",
            client_ca=str(tmp_path / "ca.pem"),
            upstream="unix:/nonexistent",
            workdir=str(workdir),
            nginx="/bin/false",
            user="nobody",
        )
    )
    with pytest.raises(FailedPrecondition) as exc:
        Front(replace(cfg)).start()
    assert "not-for-the-front" not in exc.value.message
    assert secret.stat().st_uid == 0
    assert secret.stat().st_mode & 0o777 == 0o600
    assert tmp_path.stat().st_uid == 0
    assert not (state / "error.log").is_symlink()
    assert state.stat().st_uid == nobody.pw_uid  # made afresh, for the front's user
    assert (workdir / "nginx.conf").stat().st_uid == 0
