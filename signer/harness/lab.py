"""The crash lab: a token host, known keys provisioned in it, the mTLS front, and service
processes to crash.

The lab knows the private keys it hunts for because it provisions them itself, as an HSM
administrator would: generated here, imported at the token host with the token's own tool
(``softhsm2-util --import``, via :func:`signer._internal.hsm.provision_key`), and recorded in the
service's
metadata store. The TLS endpoint's key is provisioned the same way into the TLS token, and the
front (nginx) serves mTLS with it. The service never receives plaintext in any of this.

The service listens on a Unix socket; half of the load arrives there directly, half through the
front over mTLS, so the service handles proxied calls while it is crashed.
"""

from __future__ import annotations

import contextlib
import os
import resource
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from signer._internal import config as config_mod
from signer._internal import hsm
from signer._internal.config import P11KIT_CLIENT_MODULE, SOFTHSM_MODULE
from signer._internal.front import Front, front_config
from signer._internal.keyring import adopt_with_config
from signer._internal.pki import DevCA
from signer._internal.policy import grant_everything
from signer.client import ClientTLS, SignerClient
from signer.errors import HarnessError, SignerError
from signer.harness.crash import SIGNALS
from signer.keys import ALGORITHMS
from signer.scan import Secret, secret_from_key, secret_from_pin

# What the p11-kit path offers (ed25519 does not cross Debian's p11-kit 0.24.1).
LAB_ALGORITHMS = ("ec-p256", "ec-p384", "ec-p521", "rsa-2048", "rsa-3072", "rsa-4096")
LAB_CLIENT = "harness"
# Kernel cores carry what a real crash would: anonymous memory, private and shared, and ELF
# headers (the default 0x33). gcore -a covers everything else.
COREDUMP_FILTER = 0x33


def _generate(alg: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    a = ALGORITHMS[alg]
    if a.family.value == "rsa":
        return rsa.generate_private_key(65537, a.bits)
    curve = {"secp256r1": ec.SECP256R1(), "secp384r1": ec.SECP384R1(), "secp521r1": ec.SECP521R1()}
    assert a.curve is not None
    return ec.generate_private_key(curve[a.curve])


@dataclass
class KnownKey:
    name: str
    algorithm: str
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
    key_id: bytes

    @property
    def pem(self) -> bytes:
        return self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def public_der(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )


@dataclass
class ServiceProcess:
    proc: subprocess.Popen[bytes]
    address: str
    cwd: Path
    started: float

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self) -> SignerClient:
        return SignerClient(self.address, timeout=30)


@dataclass(frozen=True)
class Route:
    """One way in: the service's Unix socket, or the mTLS front."""

    address: str
    tls: ClientTLS | None = None

    def client(self, timeout: float = 10) -> SignerClient:
        return SignerClient(self.address, tls=self.tls, timeout=timeout)


def _core_friendly() -> None:
    """preexec for processes the harness will crash: unlimited cores, deliberate filter, and
    the crash signals' default actions. A shell without job control starts a background job
    (``make test &``) with SIGINT and SIGQUIT ignored, and children inherit that: SIGQUIT then
    left the service running and the campaign's SIGQUIT rows failed with no core."""
    resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    Path("/proc/self/coredump_filter").write_text(f"{COREDUMP_FILTER:#x}")
    for crash_signal in SIGNALS.values():
        signal.signal(crash_signal, signal.SIG_DFL)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Lab:
    root: Path
    algorithms: tuple[str, ...] = LAB_ALGORITHMS
    keys: list[KnownKey] = field(default_factory=list)
    # Keys the campaign imports through the BYOK API (wrapped client-side, unwrapped in the token).
    byok: list[KnownKey] = field(default_factory=list)
    # The TLS endpoint's key, provisioned into the TLS token; only the front uses it.
    tls_key: KnownKey | None = None
    host: hsm.TokenHost | None = None
    front: Front | None = None

    @property
    def hsm_dir(self) -> Path:
        return self.root / "hsm"

    @property
    def keys_dir(self) -> Path:
        return self.root / "known-keys"

    @property
    def pin(self) -> bytes:
        return hsm.HsmPaths(self.hsm_dir).user_pin.read_bytes().strip()

    @property
    def tls_pin(self) -> bytes:
        return hsm.HsmPaths(self.hsm_dir).tls_pin.read_bytes().strip()

    @property
    def socket(self) -> Path:
        return self.root / "run" / "signer.sock"

    @property
    def front_socket(self) -> Path:
        return self.root / "run" / "front.sock"

    @property
    def policy(self) -> Path:
        """This user and the harness's client certificate may do everything."""
        path = self.root / "policy.toml"
        if not path.exists():
            path.write_text(grant_everything([f"uid:{os.getuid()}", f"x509:CN={LAB_CLIENT}"]))
        return path

    @property
    def ca(self) -> DevCA:
        return DevCA(self.root / "tls")

    @property
    def tls_key_file(self) -> Path:
        """The TLS key's plaintext, for the control's ordinary TLS server only."""
        return self.root / "tls-endpoint.key"

    def routes(self) -> list[Route]:
        """The service's Unix socket, and the mTLS front when it runs."""
        routes = [Route(f"unix:{self.socket}")]
        if self.front is not None:
            cert, key = self.ca.client_files(LAB_CLIENT)
            routes.append(Route(self.front.cfg.front.listen, ClientTLS(self.ca.cert, cert, key)))
        return routes

    def setup(self) -> None:
        """Token host with a long random PIN, and one known key per algorithm provisioned in it
        and adopted by the service's store, exactly as ``signer hsm import-key`` followed by
        ``signer keys adopt`` would (adoption also switches off decrypt/unwrap on RSA keys)."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        hsm.init(self.hsm_dir, tls_key=False)
        self.keys_dir.mkdir(mode=0o700, exist_ok=True)
        self.host = hsm.TokenHost(self.hsm_dir)
        self.host.start()
        self._provision_tls_key()
        cfg = config_mod.load(self.config(self.root))
        for alg in self.algorithms:
            key = KnownKey(f"known-{alg}", alg, _generate(alg), secrets.token_bytes(16))
            hsm.provision_key(self.hsm_dir, key.pem, f"provisioned-{alg}", key.key_id)
            adopt_with_config(cfg, key.name, alg, key.key_id, scope="harness")
            self._keep(key)
            self.keys.append(key)
        for alg in ("ec-p256", "ec-p384"):
            key = KnownKey(f"byok-{alg}", alg, _generate(alg), b"")
            self._keep(key)
            self.byok.append(key)

    def _provision_tls_key(self) -> None:
        """A known TLS key in the TLS token (so its dumps can be searched for it), a certificate
        over it, a client certificate, and the front serving mTLS with it."""
        key = KnownKey("tls-endpoint", "ec-p256", _generate("ec-p256"), hsm.TLS_KEY_ID)
        paths = hsm.HsmPaths(self.hsm_dir.absolute())
        hsm.provision_key(self.hsm_dir, key.pem, hsm.TLS_KEY_LABEL, key.key_id, token=hsm.TLS_LABEL)
        public = key.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        paths.tls_public_key.write_bytes(public)
        self.tls_key_file.write_bytes(key.pem)
        os.chmod(self.tls_key_file, 0o600)
        self.tls_key = key
        ca = DevCA.ensure(self.root / "tls")
        ca.issue_server(public, ["localhost", "127.0.0.1"])
        ca.issue_client(LAB_CLIENT)
        front = front_config(
            paths,
            ca,
            listen=f"127.0.0.1:{_free_port()}",
            upstream=self.front_socket,
            workdir=self.root / "front",
        )
        self.front = Front(config_mod.Config(front=front))
        self.front.start()

    def _keep(self, key: KnownKey) -> None:
        """The plaintext, for the control process only (0600 in a 0700 directory)."""
        path = self.keys_dir / f"{key.name}.pem"
        path.write_bytes(key.pem)
        os.chmod(path, 0o600)

    def close(self) -> None:
        if self.front is not None:
            self.front.stop()
        if self.host is not None:
            self.host.stop()

    def secrets(self) -> list[Secret]:
        out = [secret_from_key(k.private, k.name) for k in (*self.keys, *self.byok)]
        out.append(secret_from_pin(self.pin, "token-user-pin"))
        if self.tls_key is not None:
            out.append(secret_from_key(self.tls_key.private, "tls-endpoint-key"))
            out.append(secret_from_pin(self.tls_pin, "tls-token-pin"))
        return out

    def config(self, cwd: Path, inprocess: bool = False) -> Path:
        paths = hsm.HsmPaths(self.hsm_dir.absolute())
        listen = f"unix:{self.socket}"
        module = SOFTHSM_MODULE if inprocess else P11KIT_CLIENT_MODULE
        cfg = config_mod.Config(
            server=config_mod.ServerConfig(
                listen=listen,
                grace_seconds=2.0,
                front_socket=str(self.front_socket),
                policy_file=str(self.policy),
            ),
            token=config_mod.TokenConfig(
                module=module,
                server_address="" if inprocess else paths.server_address,
                uri=f"pkcs11:token={hsm.DEFAULT_LABEL}",
                pin_file=str(paths.user_pin),
                health_interval_seconds=0.5,
            ),
            store=config_mod.StoreConfig(path=str((self.root / "signer.db").absolute())),
            audit=config_mod.AuditConfig(path=str((self.root / "audit.db").absolute())),
        )
        path = cwd / "signer.toml"
        path.write_text(config_mod.dump(cfg))
        return path

    def start_service(
        self, cwd: Path, inprocess: bool = False, wait: bool = True
    ) -> ServiceProcess:
        cwd.mkdir(parents=True, exist_ok=True)
        cfg = self.config(cwd, inprocess)
        listen = f"unix:{self.socket}"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        if inprocess:
            env["SOFTHSM2_CONF"] = str(hsm.HsmPaths(self.hsm_dir.absolute()).conf)
        log = open(cwd / "service.log", "wb")  # noqa: SIM115  (owned by the child's lifetime)
        proc = subprocess.Popen(
            [sys.executable, "-m", "signer", "serve", "--config", str(cfg)],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_core_friendly,
        )
        log.close()
        sp = ServiceProcess(proc, listen, cwd, time.time())
        if wait:
            self.wait_serving(sp)
        return sp

    def wait_serving(self, sp: ServiceProcess, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with sp.client() as c:
            while time.monotonic() < deadline:
                if sp.proc.poll() is not None:
                    raise HarnessError(f"service exited with {sp.proc.returncode}")
                try:
                    c.get_key(self.keys[0].name)
                    return
                except SignerError:
                    time.sleep(0.05)
        raise HarnessError("service did not answer in time")

    def start_control(self, cwd: Path, marker: bytes) -> subprocess.Popen[bytes]:
        """The positive control process: the same keys and PIN, held in memory."""
        cwd.mkdir(parents=True, exist_ok=True)
        ready = cwd / "ready"
        (cwd / "marker").write_bytes(marker)
        paths = hsm.HsmPaths(self.hsm_dir)
        tls = []
        if self.tls_key is not None:
            tls = [
                "--tls-key",
                str(self.tls_key_file),
                "--tls-cert",
                str(self.ca.server_cert),
                "--tls-pin-file",
                str(paths.tls_pin),
            ]
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "signer.harness.control",
                "--keys",
                str(self.keys_dir),
                "--pin-file",
                str(paths.user_pin),
                "--ready",
                str(ready),
                "--marker-file",
                str(cwd / "marker"),
                *tls,
            ],
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=_core_friendly,
        )
        deadline = time.monotonic() + 30
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise HarnessError("control process did not start")
            time.sleep(0.05)
        time.sleep(0.3)  # let its signing threads run a while
        return proc


class Load:
    """Concurrent signing with every known key until stopped, the threads spread over the
    routes in (Unix socket, mTLS front); counts what it did."""

    def __init__(self, routes: list[Route], keys: list[KnownKey], threads: int = 8) -> None:
        self.routes = routes
        self.keys = keys
        self.threads = threads
        self.signed = 0
        self.errors = 0
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _run(self, i: int) -> None:
        with self.routes[i % len(self.routes)].client() as c:
            n = 0
            while not self._stop.is_set():
                key = self.keys[(i + n) % len(self.keys)]
                n += 1
                try:
                    c.sign(key.name, message=os.urandom(64), version=1)
                    with self._lock:
                        self.signed += 1
                except SignerError:
                    with self._lock:
                        self.errors += 1
                    if self._stop.wait(0.01):
                        return

    def __enter__(self) -> Load:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, args=(i,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(timeout=15)


@contextlib.contextmanager
def reaped(proc: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    """Makes sure a crash subject is gone afterwards, whatever happened."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
