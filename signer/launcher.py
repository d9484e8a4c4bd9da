"""``signer run``: the production shape on one machine, for a laptop or a demo (``make run``).

First use creates, under DIR (default ``var``):

    hsm/          the token host: the signing token and the TLS token (``signer hsm init``,
                  run as a child so SoftHSM2 is never mapped by this process)
    tls/          a development CA, the endpoint's certificate (its key is in the TLS token) and
                  a client certificate ``clients/dev.pem`` for trying mTLS
    signer.toml   the configuration below (regenerated on every start)
    policy.toml   who may do what: this user (uid) and the ``dev`` client certificate may do
                  everything (kept if it exists; edit it, then SIGHUP or restart)
    run/signer.sock        the service's Unix socket, 0660: local callers (identity: their uid)
    run/front/signer.sock  the socket only the TLS front connects to

Then it starts the token host, the service (in this process) on the Unix socket, and the mTLS
front (nginx) on ``--listen``, and makes sure a demo key exists. Ctrl-C stops all three.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signer import config as config_mod
from signer import hsm
from signer.errors import FailedPrecondition, NotFound
from signer.files import private_file, state_dir, write_private
from signer.front import Front, front_config
from signer.pki import DevCA
from signer.policy import grant_everything
from signer.server import Server, harden_process

log = logging.getLogger(__name__)

DEMO_KEY = "demo"
DEMO_ALGORITHM = "ec-p256"
DEV_CLIENT = "dev"


def write_config(root: Path, listen: str) -> Path:
    """The configuration of the service and of its TLS front, for the state in ``root``."""
    root = root.absolute()
    paths = hsm.HsmPaths(root / "hsm")
    front_socket = root / "run" / "front" / "signer.sock"
    cfg = config_mod.Config(
        server=config_mod.ServerConfig(
            listen=f"unix:{root / 'run' / 'signer.sock'}",
            front_socket=str(front_socket),
            policy_file=str(root / "policy.toml"),
        ),
        token=config_mod.TokenConfig(
            server_address=paths.server_address,
            uri=f"pkcs11:token={hsm.DEFAULT_LABEL}",
            pin_file=str(paths.user_pin),
        ),
        store=config_mod.StoreConfig(path=str(root / "signer.db")),
        audit=config_mod.AuditConfig(path=str(root / "audit.db")),
        front=front_config(
            paths, DevCA(root / "tls"), listen=listen, upstream=front_socket,
            workdir=root / "front",
        ),
    )  # fmt: skip
    path = root / "signer.toml"
    write_private(
        path,
        "# Written by 'signer run' at every start. SIGNER_<SECTION>_<NAME> variables override.\n"
        + config_mod.dump(cfg),
    )
    return path


def prepare(root: Path) -> None:
    """Token host, development PKI: whatever is missing."""
    state_dir(root)  # others may pass through to the sockets, not list or read what is here
    paths = hsm.HsmPaths((root / "hsm").absolute())
    if not (paths.initialised() and paths.has_tls_token()):
        done = subprocess.run(
            [sys.executable, "-m", "signer", "hsm", "init", "--dir", str(paths.root)],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise FailedPrecondition(f"signer hsm init failed: {done.stderr.strip()}")
        print(f"created the tokens in {paths.root} (PINs in owner-only files there)", flush=True)
    ca = DevCA.ensure(root / "tls")
    public = paths.tls_public_key.read_bytes()
    if not _certifies(ca.server_cert, public):
        ca.issue_server(public, ["localhost", "127.0.0.1"])
    if not ca.client_files(DEV_CLIENT)[0].exists():
        ca.issue_client(DEV_CLIENT)
    policy = root / "policy.toml"
    if not policy.exists():
        write_private(
            policy,
            "# Written by 'signer run' on first use; yours to edit (SIGHUP reloads it).\n"
            "# See signer/policy.py and the README for the grammar.\n"
            + grant_everything([f"uid:{os.getuid()}", f"x509:CN={DEV_CLIENT}"]),
        )
    private_file(policy)


def _certifies(cert: Path, public_pem: bytes) -> bool:
    if not cert.exists():
        return False
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    certified = x509.load_pem_x509_certificate(cert.read_bytes()).public_key().public_bytes(*der)
    return certified == serialization.load_pem_public_key(public_pem).public_bytes(*der)


async def _run(root: Path, listen: str) -> None:
    prepare(root)
    cfg = config_mod.load(write_config(root, listen))
    harden_process(cfg)
    host = hsm.TokenHost(root / "hsm")
    host.start()
    server = Server(cfg)
    front = Front(cfg)
    try:
        front.start()  # before gRPC's threads exist: forking then is quiet and safe
        await server.start()
        if not server.token.available:
            raise SystemExit("the token host did not answer; see the log above")
        try:
            await server.run_blocking(lambda: server.signer.get_key(DEMO_KEY))
        except NotFound:
            await server.run_blocking(
                lambda: server.signer.create_key(DEMO_KEY, DEMO_ALGORITHM, scope="demo")
            )
        cert, key = DevCA(root / "tls").client_files(DEV_CLIENT)
        print(
            f"signer serving local callers on unix:{root / 'run' / 'signer.sock'}\n"
            f"  and mTLS on {listen} (TLS key in the token; client certificates from "
            f"{root / 'tls' / 'ca.pem'})\n"
            f"  try: {sys.argv[0]} sign {DEMO_KEY} --in README.md --out /tmp/sig.der\n"
            f"  mTLS: {sys.argv[0]} keys list --address {listen} --tls-ca {root / 'tls' / 'ca.pem'}"
            f" --tls-cert {cert} --tls-key {key}\n"
            "  Ctrl-C stops everything.",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server.reload_policy)
        await stop.wait()
        print("stopping", flush=True)
    finally:
        front.stop()
        await server.stop()
        host.stop()


def run(root: str | Path, listen: str = "127.0.0.1:50051") -> int:
    asyncio.run(_run(Path(root), listen))
    return 0
