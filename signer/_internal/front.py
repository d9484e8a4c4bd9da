"""The mTLS front: nginx terminates TLS with the endpoint's private key held in the TLS token.

Why a front process, and why this one:

* gRPC Python (BoringSSL inside grpcio) takes a TLS private key only as PEM bytes, so a service
  that terminated TLS itself would hold the key in its memory, and in its dumps.
* nginx loads the key through OpenSSL's ENGINE API with libp11's ``pkcs11`` engine, which in turn
  loads only ``p11-kit-client.so``: every TLS handshake signature is made in the token, behind
  the token host's TLS socket. nginx speaks HTTP/2 with ALPN on both sides (``grpc_pass``), which
  gRPC requires; stunnel and similar byte relays cannot negotiate ALPN for the backend.
* The key is in a token of its own (``signer-tls``) with its own PIN, so the one PIN this
  internet-facing process holds opens the TLS key and nothing else.

nginx forwards the verified client certificate's subject, issuer and serial as request headers
that it sets itself, replacing any a client sends; a caller without a certificate signed by the
configured CA never reaches the service (UNAUTHENTICATED, answered by nginx in gRPC's own terms).

nginx runs as a single process (``master_process off``): libp11 0.4.12 (Debian 12) hangs a
worker that forked after the engine logged in (its session pool waits forever on a condition
variable; fixed in libp11 0.4.13). One nginx process serves thousands of connections; the service
behind it, not nginx, is the bottleneck. It runs with RLIMIT_CORE 0 like the token host: its
memory holds the TLS token's PIN and TLS session keys.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from signer._internal.children import guarded_preexec, run_in_foreground
from signer._internal.config import P11KIT_CLIENT_MODULE, Config, FrontConfig
from signer._internal.hsm import TLS_KEY_URI, HsmPaths
from signer._internal.pki import DevCA
from signer.errors import ConfigError, FailedPrecondition

log = logging.getLogger("signer.front")  # named for the component: signer._internal.logs

ENGINE_PATH = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"
# Headers the front sets from the verified client certificate. The service believes them only
# from the front (they are overwritten here whatever a client sends).
SUBJECT_HEADER = "x-signer-client-subject"
ISSUER_HEADER = "x-signer-client-issuer"
SERIAL_HEADER = "x-signer-client-serial"
UNAUTHENTICATED_MESSAGE = "a client certificate signed by the configured CA is required"
# How much of the end of nginx's logs a start that failed reads for its last line.
_TAIL_BYTES = 1 << 20
# How the starter opens its files in the workdir: created or truncated, never through a link.
_WRITE_NO_LINK = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
# Characters that would end a PKCS#11 URI attribute or an nginx string.
_PORT = re.compile(r"[1-9][0-9]{0,4}")  # ASCII digits only: str.isdigit() takes '²' too
# What the issuers' server serves: SLUG/jwks.json and SLUG/.well-known/openid-configuration
# (signer._internal.issuers), nothing else (no listing, no temporary file of the publisher).
ISSUER_DOCUMENT = r"[a-z0-9][a-z0-9-]{0,62}/(jwks\.json|\.well-known/openid-configuration)"
_UNSAFE = set(";?&\"'\\ \n\r\t{}$")

# Replicas (README "Replicas"). A call that reached no replica (its socket missing, refused) is
# sent to the next one whatever the RPC: nothing was done. A call whose replica died holding it
# (connection reset or closed before the answer) is never sent again by the front: it fails
# UNAVAILABLE, and the caller may retry it if the RPC is one of these, which may be done twice.
# Reads, and transitions to a fixed target (the same version disabled, enabled, made primary
# again is the same state and the same answer); and signing, which changes no state (another
# valid signature, recorded too; the first was never released).
RETRY_SAFE_RPCS = (
    "GetKey",
    "ListKeys",
    "GetPublicKey",
    "Verify",
    "GetJWKS",
    "SetPrimaryVersion",
    "DisableKeyVersion",
    "EnableKeyVersion",
    "Sign",
    "SignBatch",
    "SignJWT",
)
# Never to be sent twice: CreateKey (a second answers ALREADY_EXISTS for the caller's own key),
# RotateKey (a second version), GetImportParameters (a second wrapping key, the token's slowest
# job, counted against the caller), ImportKeyVersion (its token is single use),
# ScheduleKeyVersionDestruction and CancelKeyVersionDestruction (a second finds the new state
# and answers FAILED_PRECONDITION).
#
# Why the front does not retry even the safe ones: nginx's gRPC proxy streams the request body
# and never resends a request whose body went out, whatever grpc_next_upstream non_idempotent
# says. A mirror subrequest to an internal location makes it read the body first, and then it
# does resend (10 to 15 us of nginx CPU a call, measured), but with nginx 1.22 about one run
# in seven of tests/integration/test_replicas.py's kill left a resent Sign unanswered until
# the caller's deadline (20 s), with no record in any chain: a call that hangs is worse than
# one that fails UNAVAILABLE at once.
# Passive health, per replica: one failed connect or reset takes it out of rotation for 5 s,
# then one call tries it again. nginx ignores both with a single server.
PASSIVE_HEALTH = "max_fails=1 fail_timeout=5s"


def _socket_path(upstream: str) -> str:
    return upstream.removeprefix("unix://").removeprefix("unix:")


def _check(cfg: FrontConfig, *, files: bool = True) -> None:
    for name in ("certificate", "pin_file", "server_address", "client_ca", "upstream"):
        if not getattr(cfg, name):
            raise ConfigError(f"front.{name} must be set")
    for name in ("certificate", "client_ca", "pin_file") if files else ():
        if not Path(getattr(cfg, name)).is_file():
            raise ConfigError(f"front.{name}: no such file: {getattr(cfg, name)}")
    for upstream in cfg.upstream.split(","):
        if not upstream.strip().startswith("unix:"):
            raise ConfigError(
                f"front.upstream must be the service's unix:/path (replicas: several, separated "
                f"by commas), got {upstream.strip()!r}"
            )
    sockets = [_socket_path(u) for u in cfg.upstreams]
    if len(set(sockets)) != len(sockets):
        raise ConfigError("front.upstream names the same socket twice")
    if not cfg.key_uri.startswith("pkcs11:") or "pin-" in cfg.key_uri:
        raise ConfigError("front.key_uri must be a pkcs11: URI without a PIN in it")
    values = {
        name: getattr(cfg, name) for name in ("certificate", "client_ca", "pin_file", "key_uri")
    }
    values |= {"upstream": "".join(cfg.upstreams), "workdir": cfg.workdir}
    unsafe = {
        name
        for name, value in values.items()
        if set(value) & (_UNSAFE - ({";"} if name == "key_uri" else set()))
    }
    if unsafe:
        raise ConfigError(f"front.{', front.'.join(sorted(unsafe))}: unsupported characters")
    ports = {}
    for name in ("listen", "issuers_listen") if cfg.issuers_listen else ("listen",):
        host, _, port = getattr(cfg, name).rpartition(":")
        if not host or not _PORT.fullmatch(port) or set(host) & _UNSAFE:
            raise ConfigError(f"front.{name} must be host:port, got {getattr(cfg, name)!r}")
        ports[name] = int(port)
    if cfg.issuers_listen:
        if ports["issuers_listen"] == ports["listen"]:
            # By port: 0.0.0.0:50051 and 127.0.0.1:50051 are one socket to nginx's eyes.
            raise ConfigError("front.issuers_listen must be another port than front.listen's")
        if not cfg.issuers_dir or set(cfg.issuers_dir) & _UNSAFE:
            raise ConfigError(
                "front.issuers_dir must be set (the service's jwt.issuers_dir), without spaces, "
                "quotes or ;{}$"
            )
        if not 0 <= cfg.issuers_max_age <= 86400:
            raise ConfigError("front.issuers_max_age must be 0 to 86400 seconds")


def front_config(
    paths: HsmPaths,
    ca: DevCA,
    *,
    listen: str,
    upstream: Path | Sequence[Path],
    workdir: Path,
    certificate: Path | None = None,
) -> FrontConfig:
    """The front of the token host in ``paths``: its key in the TLS token, its certificate and
    the client CA from ``ca``, proxying to the service's front socket ``upstream`` (or to each
    replica's, given several)."""
    sockets = [upstream] if isinstance(upstream, Path) else list(upstream)
    return FrontConfig(
        listen=listen,
        certificate=str(certificate or ca.server_cert),
        key_uri=TLS_KEY_URI,
        pin_file=str(paths.tls_pin),
        server_address=paths.tls_server_address,
        client_ca=str(ca.cert),
        upstream=", ".join(f"unix:{s}" for s in sockets),
        workdir=str(workdir),
    )


def openssl_conf() -> str:
    """OpenSSL configuration that makes the ``pkcs11`` engine load p11-kit's client module only
    (libp11's default, p11-kit-proxy.so, would load every registered module, SoftHSM2 included)."""
    return (
        "openssl_conf = openssl_init\n"
        "[openssl_init]\nengines = engine_section\n"
        "[engine_section]\npkcs11 = pkcs11_section\n"
        "[pkcs11_section]\nengine_id = pkcs11\n"
        f"dynamic_path = {ENGINE_PATH}\n"
        f"MODULE_PATH = {P11KIT_CLIENT_MODULE}\n"
    )


def nginx_conf(
    cfg: Config, state: Path, *, error_log: str | None = None, check_files: bool = True
) -> str:
    """nginx.conf of the front; ``state``: the one directory nginx writes (its error log, its
    pid file, its temporary files).

    For a configuration rendered on one machine and used on another (the front's image,
    docker/front/render.py: the certificate, client CA and PIN file arrive only as volumes when
    the container starts), ``check_files=False`` leaves out the check that those files exist,
    and ``error_log="stderr"`` sends nginx's log where the container engine collects it.
    """
    front = cfg.front
    _check(front, files=check_files)
    if error_log is not None and (not error_log or set(error_log) & _UNSAFE):
        raise ConfigError(f"error_log: unsupported value {error_log!r}")
    sockets = [_socket_path(u) for u in front.upstreams]
    health = f" {PASSIVE_HEALTH}" if len(sockets) > 1 else ""
    servers = "".join(f"    server unix:{s}{health};\n" for s in sockets)
    key = f"engine:pkcs11:{front.key_uri}?pin-source=file:{Path(front.pin_file).absolute()}"
    # Room for the largest message the service accepts, plus gRPC framing.
    body = 2 * cfg.server.max_message_bytes + 64 * 1024
    tmp = state / "tmp"
    return f"""# Written by signer._internal.front; regenerated on every start.
daemon off;
master_process off;  # libp11 0.4.12 hangs forked workers; see signer/_internal/front.py
error_log {error_log or state / "error.log"} warn;
pid {state / "nginx.pid"};
env P11_KIT_SERVER_ADDRESS;
env OPENSSL_CONF;
events {{ worker_connections 4096; }}
http {{
  access_log off;  # the service's audit log records every call
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fastcgi;
  uwsgi_temp_path {tmp}/uwsgi;
  scgi_temp_path {tmp}/scgi;
  client_max_body_size {body};
  keepalive_requests 1000000;
  keepalive_timeout 600s;
  http2_max_concurrent_streams 256;
  upstream signer {{
{servers}    keepalive 64;  # reuse HTTP/2 connections to the service
  }}
  server {{
    listen {front.listen} ssl http2;
    ssl_certificate {Path(front.certificate).absolute()};
    ssl_certificate_key "{key}";
    ssl_protocols TLSv1.3;
    ssl_client_certificate {Path(front.client_ca).absolute()};
    ssl_verify_client on;
    ssl_verify_depth 2;
    ssl_session_cache shared:signer:4m;
    # 495: the client certificate did not verify; 496: there was none. Answered in gRPC's terms.
    error_page 495 496 = @unauthenticated;
    grpc_read_timeout 600s;
    grpc_send_timeout 600s;
    grpc_set_header {SUBJECT_HEADER} $ssl_client_s_dn;
    grpc_set_header {ISSUER_HEADER} $ssl_client_i_dn;
    grpc_set_header {SERIAL_HEADER} $ssl_client_serial;
{_retries(len(sockets))}
    location / {{
      grpc_pass grpc://signer;
    }}
    location @unauthenticated {{
      default_type application/grpc;
      add_header grpc-status 16 always;
      add_header grpc-message "{UNAUTHENTICATED_MESSAGE}" always;
      return 200 "";
    }}
  }}
{_issuers_server(front, key)}}}
"""


def _issuers_server(front: FrontConfig, key: str) -> str:
    """The relying parties' server (README "Issuers over HTTPS"), when ``issuers_listen`` is
    set. A server and port of its own, not ``ssl_verify_client optional`` on the gRPC one:
    there, a relying party whose HTTP stack presents a certificate of another CA was answered
    with the gRPC refusal instead of the JWKS (measured), every handshake would advertise the
    client CA, and mTLS would hang on an ``if`` in each location rather than on the handshake.
    Here there is no upstream and no proxying: static files of ``issuers_dir``, two names per
    issuer, everything else 404."""
    if not front.issuers_listen:
        return ""
    age = front.issuers_max_age
    return f"""  # A relying party fetches two small files a few times an hour: bounds per address
  # on requests and connections keep a flood from the internet off the event loop that also
  # carries the signing calls (each new TLS connection is a signature in the TLS token).
  limit_req_zone $binary_remote_addr zone=issuers:1m rate=10r/s;
  limit_conn_zone $binary_remote_addr zone=issuers_conn:1m;
  server {{
    listen {front.issuers_listen} ssl http2;
    ssl_certificate {Path(front.certificate).absolute()};
    ssl_certificate_key "{key}";
    ssl_protocols TLSv1.3;
    ssl_verify_client off;
    server_tokens off;
    root {Path(front.issuers_dir).absolute()};
    disable_symlinks on;
    types {{ }}
    default_type application/json;
    etag on;
    if_modified_since off;  # one validator, the ETag (the publisher keeps it unique per file)
    limit_req zone=issuers burst=20 nodelay;
    limit_conn issuers_conn 8;
    limit_req_status 429;
    limit_conn_status 429;
    location ~ "^/{ISSUER_DOCUMENT}$" {{
      limit_except GET {{ deny all; }}  # and HEAD
      # Not "always": a 404 (an issuer not yet published) must not be cached for max-age.
      add_header Cache-Control "public, max-age={age}";
      add_header Access-Control-Allow-Origin "*" always;  # browsers' JOSE libraries
      add_header X-Content-Type-Options nosniff always;
    }}
    location / {{
      return 404;
    }}
  }}
"""


def _retries(replicas: int) -> str:
    """The retry policy of nginx.conf (README "Replicas"): the next replica only for a call
    that reached none."""
    if replicas < 2:
        return "    # One service: nothing to retry on."
    safe = ", ".join(RETRY_SAFE_RPCS)
    return f"""    # Replicas: a call that reached none (connect failed) goes to the next, whatever
    # the RPC. A call whose replica died holding it fails UNAVAILABLE and is not sent again here
    # (nginx resends a gRPC body only when buffered, and a buffered resend was seen to hang;
    # signer/_internal/front.py). Callers may retry these on UNAVAILABLE: {safe}.
    # Never twice: CreateKey, RotateKey, GetImportParameters, ImportKeyVersion,
    # ScheduleKeyVersionDestruction, CancelKeyVersionDestruction.
    grpc_next_upstream error timeout;
    grpc_next_upstream_tries {replicas};"""


def _require_free(host: str, port: int) -> None:
    """A clear error now, rather than a connection test that reaches someone else's listener."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host.strip("[]"), port))
        except OSError as exc:
            raise FailedPrecondition(f"cannot listen on {host}:{port}: {exc.strerror}") from None


class Front:
    """Runs nginx as the mTLS front until stopped."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.workdir = Path(cfg.front.workdir).absolute()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def state(self) -> Path:
        """What nginx writes: its error log, pid file and temporary files; made afresh at each
        start. The rest of the workdir (nginx.conf, openssl.cnf, nginx.out) is the starter's."""
        return self.workdir / "nginx"

    @property
    def error_log(self) -> Path:
        return self.state / "error.log"

    def render(self) -> str:
        """nginx.conf for this front."""
        return nginx_conf(self.cfg, self.state)

    def _user(self) -> pwd.struct_passwd | None:
        """Whom nginx runs as: ``front.user`` when started by root, else whoever starts it."""
        if not self.cfg.front.user or os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(self.cfg.front.user)
        except KeyError:
            raise ConfigError(f"front.user: no user {self.cfg.front.user!r}") from None

    def _prepare(self, user: pwd.struct_passwd | None) -> None:
        """The workdir, the starter's (its group may pass through when nginx runs as another
        user); in it, nginx.conf and openssl.cnf, written without following a link; and the
        state directory, nginx's own, made afresh (a run of nginx as its own user leaves
        nothing there that the next start, as root, would follow or read as trusted)."""
        gid = user.pw_gid if user is not None else -1
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chown(self.workdir, os.geteuid(), gid)
        os.chmod(self.workdir, 0o710 if user is not None else 0o700)
        readable = 0o640 if user is not None else 0o600
        for name, text in (("nginx.conf", self.render()), ("openssl.cnf", openssl_conf())):
            fd = os.open(self.workdir / name, _WRITE_NO_LINK, readable)
            with os.fdopen(fd, "w") as fh:
                os.fchown(fh.fileno(), os.geteuid(), gid)
                os.fchmod(fh.fileno(), readable)
                fh.write(text)
        if self.state.is_symlink():
            self.state.unlink()
        shutil.rmtree(self.state, ignore_errors=True)  # links inside are removed, not followed
        self.state.mkdir(mode=0o700)
        (self.state / "tmp").mkdir(mode=0o700)
        if user is not None:
            for fresh in (self.state, self.state / "tmp"):
                os.chown(fresh, user.pw_uid, user.pw_gid)

    def start(self, timeout: float = 15.0) -> None:
        user = self._user()
        self._prepare(user)
        conf = self.workdir / "nginx.conf"

        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin"),
            "OPENSSL_CONF": str(self.workdir / "openssl.cnf"),
            "P11_KIT_SERVER_ADDRESS": self.cfg.front.server_address,
        }
        host, _, port = self.cfg.front.listen.rpartition(":")
        _require_free(host, int(port))
        if self.cfg.front.issuers_listen:
            public, _, public_port = self.cfg.front.issuers_listen.rpartition(":")
            _require_free(public, int(public_port))
        log_file = self.workdir / "nginx.out"
        with os.fdopen(os.open(log_file, _WRITE_NO_LINK, 0o600), "wb") as out:
            try:
                self._proc = subprocess.Popen(
                    [
                        self.cfg.front.nginx,
                        "-c",
                        str(conf),
                        "-p",
                        str(self.state),
                        "-e",
                        str(self.error_log),
                    ],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=guarded_preexec,
                    user=user.pw_uid if user else None,
                    group=user.pw_gid if user else None,
                    extra_groups=[] if user else None,
                )
            except FileNotFoundError:
                raise FailedPrecondition(
                    f"{self.cfg.front.nginx} not found: install nginx (make deps does)"
                ) from None
        proc = self._proc
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not proc:
                return  # stopped meanwhile (a signal handler)
            if proc.poll() is not None:
                status = proc.returncode
                self._proc = None
                raise FailedPrecondition(
                    f"nginx exited with status {status}: {self._last_error(log_file)}"
                )
            with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 0.2):
                break
            if time.monotonic() > deadline:
                self.stop()
                raise FailedPrecondition(f"the TLS front did not listen on {host}:{port} in time")
            time.sleep(0.05)
        log.info("TLS front serving", extra={"address": self.cfg.front.listen, "pid": self.pid})

    def _last_error(self, *files: Path) -> str:
        lines: list[str] = []
        for f in (*files, self.error_log):
            with contextlib.suppress(OSError):
                # Never through a link: nginx may run as another user, and the error log is its.
                fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
                with os.fdopen(fd, "rb") as fh:
                    st = os.fstat(fd)
                    if stat.S_ISREG(st.st_mode):
                        fh.seek(max(0, st.st_size - _TAIL_BYTES))  # the newest lines
                        text = fh.read(_TAIL_BYTES).decode(errors="replace")
                        lines += [ln for ln in text.splitlines() if ln.strip()]
        return lines[-1] if lines else "no message"

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGQUIT)  # nginx: graceful shutdown
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        # Workers outlive a master that was killed, still holding the listening socket (a
        # restart would find the port taken): they are in its process group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        log.info("TLS front stopped")

    def poll(self) -> int | None:
        """nginx's exit status once it has exited on its own; None while it runs."""
        proc = self._proc
        return proc.poll() if proc is not None else None

    def wait(self) -> int:
        """Waits until nginx exits (its status) or the front is stopped (0)."""
        while (proc := self._proc) is not None:
            try:
                return proc.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
        return 0


def serve_forever(cfg: Config) -> int:
    """``signer front serve``: runs the front in the foreground; SIGTERM/SIGINT stop it."""
    front = Front(cfg)
    banner = f"TLS front serving mTLS on {cfg.front.listen} for {cfg.front.upstream}"
    return run_in_foreground(front, banner, "nginx")
