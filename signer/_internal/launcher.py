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
front (nginx) on ``--listen``, and makes sure the demo keys exist (``demo``, and ``demo-tokens`` of
the issuer https://localhost:8443/tokens, whose keys sign JWTs only). Its metrics are on
``--metrics-listen`` (127.0.0.1:9464 unless told otherwise: on loopback, they show counts and
timings, never a key name, caller or secret; a newcomer can look at them at once, and a second
``signer run`` beside the first passes another port or ''). A token host or front that
dies is restarted with back-off (:mod:`signer._internal.supervisor`). Ctrl-C stops all three.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from signer._internal import config as config_mod
from signer._internal import hsm
from signer._internal.audit import Event
from signer._internal.files import private_file, share_with_group, state_dir, write_private
from signer._internal.front import Front, front_config
from signer._internal.pki import DevCA
from signer._internal.policy import grant_everything
from signer._internal.server import Server, harden_process
from signer._internal.supervisor import Supervisor
from signer.errors import FailedPrecondition, NotFound, Unavailable

log = logging.getLogger("signer.launcher")  # named for the component: signer._internal.logs

DEMO_KEY = "demo"
DEMO_ALGORITHM = "ec-p256"
DEMO_SCOPE = "demo"
# The demo issuer's scope and key: a key of an issuer's scope signs JWTs only (SignJWT), so the
# demo key, which signs anything, is in a scope of its own.
TOKENS_SCOPE = "tokens"
TOKENS_KEY = "demo-tokens"
DEV_CLIENT = "dev"
FRONT_USER = "signer-front"
# The children 'signer run' restarts when they die (signer/_internal/supervisor.py).
TOKEN_HOST = "token host"  # noqa: S105 (a name, not a password)
TLS_FRONT = "TLS front"


def write_config(
    root: Path,
    listen: str,
    world: FrontWorld | None = None,
    metrics: str = "",
    issuers: str = "",
) -> Path:
    """The configuration of the service and of its TLS front, for the state in ``root``;
    ``world``: the front runs as its own user, with everything it reaches there; ``issuers``:
    host:port of the front's issuers server, where the issuer of the tokens scope is published."""
    root = root.absolute()
    issuers_dir = world.issuers_dir if world else root / "issuers"
    paths = hsm.HsmPaths(root / "hsm")
    front_socket = world.front_socket if world else root / "run" / "front" / "signer.sock"
    front = front_config(
        paths, DevCA(root / "tls"), listen=listen, upstream=front_socket, workdir=root / "front"
    )
    if issuers:
        front = replace(front, issuers_listen=issuers, issuers_dir=str(issuers_dir))
    if world is not None:
        front = replace(
            front,
            user=world.user,
            workdir=str(world.workdir),
            certificate=str(world.certificate),
            client_ca=str(world.client_ca),
            pin_file=str(world.pin_file),
            server_address=f"unix:path={world.tls_socket}",
        )
    cfg = config_mod.Config(
        server=config_mod.ServerConfig(
            listen=f"unix:{root / 'run' / 'signer.sock'}",
            front_socket=str(front_socket),
            front_socket_mode="0660" if world else "0600",
            front_socket_group=world.user if world else "",
            policy_file=str(root / "policy.toml"),
        ),
        token=config_mod.TokenConfig(
            server_address=paths.server_address,
            uri=f"pkcs11:token={hsm.DEFAULT_LABEL}",
            pin_file=str(paths.user_pin),
        ),
        store=config_mod.StoreConfig(path=str(root / "signer.db")),
        audit=config_mod.AuditConfig(path=str(root / "audit.db")),
        front=front,
        metrics=config_mod.MetricsConfig(listen=metrics),
        jwt=config_mod.JwtConfig(
            issuers=f"{TOKENS_SCOPE}={issuer_url(issuers)}" if issuers else "",
            issuers_dir=str(issuers_dir),
        ),
    )
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
    state_dir(root / "run")  # the socket's own mode (server.socket_mode) says who connects
    paths = hsm.HsmPaths((root / "hsm").absolute())
    if not (paths.initialised() and paths.has_tls_token()):
        done = subprocess.run(
            [sys.executable, "-m", "signer", "hsm", "init", "--dir", str(paths.root)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
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
            "# See signer/_internal/policy.py and the README for the grammar.\n"
            + grant_everything([f"uid:{os.getuid()}", f"x509:CN={DEV_CLIENT}"]),
        )
    private_file(policy)


def front_user() -> pwd.struct_passwd | None:
    """As root, the TLS front runs as a system user of its own (created here if missing), so
    the internet-facing process can read no key, PIN or database but its own (issue 11: as
    root, nginx could read the signing token's PIN and sign outside the service). Otherwise it
    runs as whoever runs this."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(FRONT_USER)
    except KeyError:
        pass
    done = subprocess.run(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "signer TLS front",
            FRONT_USER,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise FailedPrecondition(f"cannot create the user {FRONT_USER}: {done.stderr.strip()}")
    print(f"created the system user {FRONT_USER} for the TLS front", flush=True)
    return pwd.getpwnam(FRONT_USER)


@dataclass(frozen=True)
class FrontWorld:
    """Everything the TLS front's own user may reach, in one directory of its group's (0710)
    outside the state directory, which stays closed to it (and which the front could not even
    pass through when it lies under an owner-only home or a test's temporary directory): its
    workdir, copies of the certificates and of the TLS token's PIN, the TLS token's socket and
    the service's front socket. Made at each start, removed at stop."""

    root: Path
    user: str
    gid: int

    @property
    def workdir(self) -> Path:
        return self.root / "nginx"

    @property
    def certificate(self) -> Path:
        return self.root / "server.pem"

    @property
    def client_ca(self) -> Path:
        return self.root / "ca.pem"

    @property
    def pin_file(self) -> Path:
        return self.root / "tls.pin"

    @property
    def issuers_dir(self) -> Path:
        """The issuers' documents: the service writes, the front reads."""
        return self.root / "issuers"

    @property
    def tls_socket(self) -> Path:
        return self.root / "p11-kit-tls.sock"

    @property
    def front_socket(self) -> Path:
        return self.root / "signer.sock"

    @classmethod
    def make(cls, state: Path, user: pwd.struct_passwd) -> FrontWorld:
        # /run is memory (a copy of the TLS PIN is never on disk twice); a temporary directory
        # where /run is not ours to write.
        base = "/run" if os.access("/run", os.W_OK) else None
        world = cls(
            Path(tempfile.mkdtemp(prefix="signer-front-", dir=base)), user.pw_name, user.pw_gid
        )
        share_with_group(world.root, world.gid, 0o710)
        ca = DevCA(state / "tls")
        for source, copy in (
            (ca.server_cert, world.certificate),
            (ca.cert, world.client_ca),
            (hsm.HsmPaths(state / "hsm").tls_pin, world.pin_file),
        ):
            # Copied in the kernel (sendfile): the PIN passes through no buffer of this process.
            shutil.copyfile(source, private_file(copy))
            share_with_group(copy, world.gid, 0o640)
        world.issuers_dir.mkdir()
        share_with_group(world.issuers_dir, world.gid, 0o750)
        return world


def _certifies(cert: Path, public_pem: bytes) -> bool:
    if not cert.exists():
        return False
    der = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    certified = x509.load_pem_x509_certificate(cert.read_bytes()).public_key().public_bytes(*der)
    return certified == serialization.load_pem_public_key(public_pem).public_bytes(*der)


async def _run(root: Path, listen: str, metrics: str, issuers: str) -> None:
    prepare(root)
    user = front_user()
    world = FrontWorld.make(root.absolute(), user) if user is not None else None
    try:
        await _serve(root, listen, world, metrics, issuers)
    finally:
        if world is not None:
            shutil.rmtree(world.root, ignore_errors=True)


async def _serve(
    root: Path, listen: str, world: FrontWorld | None, metrics: str, issuers: str
) -> None:
    cfg = config_mod.load(write_config(root, listen, world, metrics, issuers))
    harden_process(cfg)
    host = hsm.TokenHost(
        root / "hsm",
        tls_socket=world.tls_socket if world else None,
        tls_group=world.gid if world else None,
    )
    host.start()
    server = Server(cfg)
    tls_front = Front(cfg)
    try:
        tls_front.start()  # before gRPC's threads exist: forking then is quiet and safe
        await server.start()
        if not server.token.available:
            raise Unavailable("the token host did not answer; see the log above")
        for name, scope in ((DEMO_KEY, DEMO_SCOPE), (TOKENS_KEY, TOKENS_SCOPE)):
            await _ensure_key(server, name, scope)
        cert, key = DevCA(root / "tls").client_files(DEV_CLIENT)
        print(
            f"signer serving local callers on unix:{root / 'run' / 'signer.sock'}\n"
            f"  and mTLS on {listen} (TLS key in the token; client certificates from "
            f"{root / 'tls' / 'ca.pem'})\n"
            f"  try: {sys.argv[0]} sign {DEMO_KEY} --in README.md --out /tmp/sig.der\n"
            f"  mTLS: {sys.argv[0]} keys list --address {listen} --tls-ca {root / 'tls' / 'ca.pem'}"
            f" --tls-cert {cert} --tls-key {key}\n"
            + (f"  metrics: http://{metrics}/metrics\n" if metrics else "")
            + (
                f"  issuer of scope {TOKENS_SCOPE}: {issuer_url(issuers)}/.well-known/"
                f"openid-configuration (JWTs: {sys.argv[0]} jwt sign {TOKENS_KEY} --set-issuer "
                "--claims FILE)\n"
                if issuers
                else ""
            )
            + "  Ctrl-C stops everything.",
            flush=True,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, server.reload_policy)

        def after_restart(name: str) -> None:
            if name == TOKEN_HOST:
                server.token.wake()  # at once, not at its next back-off
                # nginx's engine holds a session of the old token host for the front's key
                # and does not open another: every handshake failed until it was restarted.
                supervisor.restart_soon(TLS_FRONT)

        supervisor = Supervisor({TOKEN_HOST: host, TLS_FRONT: tls_front}, on_restart=after_restart)
        supervisor.start()
        try:
            await stop.wait()
        finally:
            supervisor.stop()
        print("stopping", flush=True)
    finally:
        tls_front.stop()
        await server.stop()
        host.stop()


def issuer_url(issuers: str) -> str:
    """The tokens scope's issuer on the front's issuers server ``issuers`` (host:port): named
    localhost, which the development certificate covers."""
    return f"https://localhost:{issuers.rpartition(':')[2]}/{TOKENS_SCOPE}"


async def _ensure_key(server: Server, name: str, scope: str) -> None:
    try:
        await server.run_blocking(lambda: server.keyring.get_key(name))
    except NotFound:
        made = await server.run_blocking(
            lambda: server.keyring.create_key(name, DEMO_ALGORITHM, scope=scope)
        )
        # A key made outside any call is on record too.
        await server.audit.record(
            Event(server.keyring.now(), "signer run", "CreateKey", made.name, 1, "", "OK")
        )


def run(
    root: str | Path, listen: str = "127.0.0.1:50051", metrics: str = "", issuers: str = ""
) -> int:
    asyncio.run(_run(Path(root), listen, metrics, issuers))
    return 0
