"""``signer run`` as root: the TLS front is a process of its own user, which can sign nothing.

Issue 11: nginx ran as root (``master_process off`` never drops privileges), so a process with
nginx's uid read the signing token's PIN file, logged into the signing token and signed outside
the service, and could read the dev CA key and the audit database. Now the front runs as
``signer-front``, reaching only its socket, the TLS token's socket and PIN, and the
certificates; this checks it as that user, with positive controls (what it needs, it reaches).
"""

from __future__ import annotations

import json
import pwd
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from signer import config as config_mod
from signer.client import ClientTLS, SignerClient
from tests.conftest import SIGNER_BIN, free_port, run_as

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


@pytest.fixture
def signer_run(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """``signer run`` until the test ends, its state in a directory no other user may even
    pass through (the front's world is elsewhere)."""
    root, port = tmp_path / "var", free_port()
    proc = subprocess.Popen(
        [str(SIGNER_BIN), "run", "--dir", str(root), "--listen", f"127.0.0.1:{port}"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    ready, lines = threading.Event(), []

    def watch() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("signer serving local callers"):
                ready.set()
        ready.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert ready.wait(120)
        assert proc.poll() is None, "".join(lines)
        yield root, port
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        assert proc.stdout is not None
        proc.stdout.close()


def test_the_front_runs_as_its_own_user_and_reaches_nothing_else(signer_run) -> None:
    root, port = signer_run
    front = pwd.getpwnam("signer-front")
    cfg = config_mod.load(root / "signer.toml")
    world = Path(cfg.front.workdir).parent
    assert not world.is_relative_to(root)  # the front's world is outside the state directory
    assert cfg.front.user == "signer-front"
    nginx = int((Path(cfg.front.workdir) / "nginx.pid").read_text())
    status = Path(f"/proc/{nginx}/status").read_text().splitlines()
    uids = next(line for line in status if line.startswith("Uid:")).split()[1:]
    assert uids == [str(front.pw_uid)] * 4, f"nginx runs as {uids}"
    # It still does its job: an mTLS call through it, the handshake signed in the TLS token.
    tls = ClientTLS(root / "tls" / "ca.pem", *(root / "tls" / "clients" / n
                                               for n in ("dev.pem", "dev.key")))  # fmt: skip
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
