"""The token host: SoftHSM2 tokens served by ``p11-kit server`` on owner-only Unix sockets.

It stands in for an HSM appliance. Its directory holds everything the tokens are::

    DIR/                     0700
      softhsm2.conf          softhsm/softhsm2.conf, pointing SoftHSM2 at DIR/tokens
      tokens/                SoftHSM2's object files (private objects encrypted under the PIN)
      so.pin, user.pin       0600, generated at random, never printed: the signing token
      tls-so.pin, tls.pin    0600, the same for the TLS token
      tls-endpoint.pub.pem   public key of the TLS endpoint's key pair (generated in the TLS token)
      run/                   0700
        p11-kit.sock         0600, the signing token, for the service's p11-kit-client.so
        p11-kit-tls.sock     0600, the TLS token, for the TLS front (nginx + libp11)

Two tokens, two sockets: the TLS front faces the network and needs a PIN to use its key, so that
PIN opens a token holding only the TLS key, never the signing keys. ``p11-kit server`` starts one
``p11-kit-remote`` per client connection, each loading SoftHSM2. All of them run with
RLIMIT_CORE 0 (inherited) and are stopped together.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import select
import signal
import socket as socket_mod
import subprocess
import sys
import tempfile
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization

from signer._internal.children import disable_core_dumps, guarded_preexec, run_in_foreground
from signer._internal.config import SOFTHSM_MODULE
from signer._internal.files import share_with_group
from signer.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from signer._internal.token.pin import Pin

log = logging.getLogger("signer.hsm")  # named for the component: signer._internal.logs

DEFAULT_LABEL = "signer"
SOCKET_NAME = "p11-kit.sock"
TLS_LABEL = "signer-tls"
TLS_SOCKET_NAME = "p11-kit-tls.sock"
# The TLS endpoint's key pair in the TLS token.
TLS_KEY_LABEL = "tls-endpoint"
TLS_KEY_ID = b"tls-endpoint"
TLS_KEY_URI = f"pkcs11:token={TLS_LABEL};object={TLS_KEY_LABEL};type=private"


@dataclass(frozen=True)
class HsmPaths:
    root: Path

    @property
    def conf(self) -> Path:
        return self.root / "softhsm2.conf"

    @property
    def tokens(self) -> Path:
        return self.root / "tokens"

    @property
    def so_pin(self) -> Path:
        return self.root / "so.pin"

    @property
    def user_pin(self) -> Path:
        return self.root / "user.pin"

    @property
    def tls_so_pin(self) -> Path:
        return self.root / "tls-so.pin"

    @property
    def tls_pin(self) -> Path:
        return self.root / "tls.pin"

    @property
    def tls_public_key(self) -> Path:
        return self.root / "tls-endpoint.pub.pem"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return self.run / SOCKET_NAME

    @property
    def server_address(self) -> str:
        return f"unix:path={self.socket}"

    @property
    def tls_socket(self) -> Path:
        return self.run / TLS_SOCKET_NAME

    @property
    def tls_server_address(self) -> str:
        return f"unix:path={self.tls_socket}"

    def initialised(self) -> bool:
        return self.conf.exists() and self.user_pin.exists() and any(self.tokens.glob("*"))

    def has_tls_token(self) -> bool:
        return self.tls_pin.exists()


# softhsm/softhsm2.conf, which the token host's image uses as it is (a link in the package, so
# that the wheel carries the file and make run and the image read the same one).
SOFTHSM_CONF_TEMPLATE = Path(__file__).with_name("softhsm2.conf")
_TOKENDIR = "directories.tokendir"


def softhsm_conf(tokens: Path) -> str:
    """SoftHSM2's configuration for a token host whose tokens are in ``tokens``: the template
    with its token directory replaced, every other setting as it is."""
    lines = SOFTHSM_CONF_TEMPLATE.read_text().splitlines()
    keys = [line.partition("=")[0].strip() for line in lines]
    if keys.count(_TOKENDIR) != 1:
        raise FailedPrecondition(f"{SOFTHSM_CONF_TEMPLATE}: one {_TOKENDIR} line is needed")
    return "".join(
        f"{_TOKENDIR} = {tokens}\n" if key == _TOKENDIR else f"{line}\n"
        for key, line in zip(keys, lines, strict=True)
    )


def _write_secret(path: Path, value: bytes | bytearray) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with memoryview(value) as view:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
    finally:
        os.close(fd)


def init(
    root: str | Path,
    label: str = DEFAULT_LABEL,
    module: str = SOFTHSM_MODULE,
    *,
    tls: bool = True,
    tls_key: bool = True,
) -> HsmPaths:
    """Creates the signing token in ``root`` with random SO and user PINs in owner-only files.

    With ``tls``, also the TLS token (its own PINs), and with ``tls_key`` the TLS endpoint's key
    pair generated inside it (see :func:`generate_tls_key`); without, the caller provisions one.
    """
    paths = HsmPaths(Path(root).absolute())
    if paths.initialised():
        if tls and not paths.has_tls_token():  # a token host from before the TLS token
            _init_tls_token(paths, module)
            if tls_key:
                generate_tls_key(paths.root)
            return paths
        raise FailedPrecondition(f"a token already exists in {paths.root}")
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(paths.root, 0o700)
    paths.tokens.mkdir(mode=0o700, exist_ok=True)
    paths.run.mkdir(mode=0o700, exist_ok=True)
    paths.conf.write_text(softhsm_conf(paths.tokens))
    # 32 characters from a 64-symbol alphabet: 192 bits.
    _new_token(paths, module, label, paths.so_pin, paths.user_pin, 24)
    if tls:
        _init_tls_token(paths, module)
        if tls_key:
            generate_tls_key(paths.root)
    return paths


def _init_tls_token(paths: HsmPaths, module: str) -> None:
    # 24 characters (144 bits): libp11 0.4.12 (Debian 12), which reads the PIN for nginx from
    # ``pin-source=file:``, keeps at most 31 characters of it.
    _new_token(paths, module, TLS_LABEL, paths.tls_so_pin, paths.tls_pin, 18)


def _new_token(
    paths: HsmPaths, module: str, label: str, so_file: Path, pin_file: Path, nbytes: int
) -> None:
    """Initialises token ``label`` with random SO and user PINs (``nbytes`` of entropy each,
    URL-safe base64) written to owner-only files. Built in bytearrays so they can be wiped."""
    from signer._internal.token.admin import init_token

    so_pin = bytearray(secrets.token_urlsafe(nbytes).encode("ascii"))
    pin = bytearray(secrets.token_urlsafe(nbytes).encode("ascii"))
    try:
        _write_secret(so_file, bytes(so_pin))
        _write_secret(pin_file, bytes(pin))
        init_token(module, paths.conf, label, so_pin, pin)
    finally:
        so_pin[:] = bytes(len(so_pin))
        pin[:] = bytes(len(pin))
    log.info("token initialised", extra={"dir": str(paths.root), "label": label})


def generate_tls_key(root: str | Path, algorithm: str = "ec-p256") -> bytes:
    """Generates the TLS endpoint's key pair inside the TLS token; returns the public key PEM.

    SoftHSM2 is loaded for this in a short-lived child process with core dumps off
    (:mod:`signer._internal.token.keygen`), so no process that lives on, least of all the service,
    ever maps it. The public key is also written to ``tls-endpoint.pub.pem``.
    """
    paths = HsmPaths(Path(root).absolute())
    if not paths.has_tls_token():
        raise FailedPrecondition(f"no TLS token in {paths.root}")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SOFTHSM2_CONF": str(paths.conf)}
    argv = [
        sys.executable,
        "-m",
        "signer._internal.token.keygen",
        "--module",
        SOFTHSM_MODULE,
        "--uri",
        f"pkcs11:token={TLS_LABEL}",
        "--pin-file",
        str(paths.tls_pin),
        "--algorithm",
        algorithm,
        "--label",
        TLS_KEY_LABEL,
        "--id",
        TLS_KEY_ID.hex(),
        "--out",
        str(paths.tls_public_key),
    ]
    done = subprocess.run(
        argv,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        preexec_fn=disable_core_dumps,
        check=False,
    )
    if done.returncode != 0:
        raise FailedPrecondition(
            f"generating the TLS key failed (exit status {done.returncode}): "
            f"{done.stderr.strip()[-500:]}"
        )
    log.info("TLS key generated in the token", extra={"label": TLS_KEY_LABEL})
    return paths.tls_public_key.read_bytes()


# --- provisioning keys at the token host -------------------------------------------------------

SOFTHSM_UTIL = "softhsm2-util"
_PIN_PROMPT = b"PIN: "  # "Please enter user PIN: ", then "Please reenter user PIN: "
_PIN_PROMPTS = 2


def import_command(key_file: Path, label: str, key_id: bytes, token: str) -> list[str]:
    """softhsm2-util's argv for an import. No --pin: without it, it asks on its terminal."""
    return [
        SOFTHSM_UTIL,
        "--import",
        str(key_file),
        "--token",
        token,
        "--label",
        label,
        "--id",
        key_id.hex(),
    ]


def provision_key(
    root: str | Path,
    key_pem: bytes,
    label: str,
    key_id: bytes,
    *,
    token: str = DEFAULT_LABEL,
    password: bytes | None = None,
    timeout: float = 60.0,
) -> None:
    """Imports a private key into the token with the token's own tool, as an administrator would.

    ``softhsm2-util --import`` wants an unencrypted PKCS#8 file and the user PIN. The key is
    converted into a 0600 file in a 0700 directory inside the token host's own directory, and
    overwritten and removed afterwards. The PIN goes neither on argv nor into the environment:
    softhsm2-util runs on a pseudo-terminal (echo off) and the PIN, read from ``user.pin``, is
    written to its prompts. The key pair lands with CKA_ID ``key_id`` and CKA_LABEL ``label``;
    :meth:`signer._internal.keyring.Keyring.adopt_key` makes the service use it.
    """
    from signer._internal.token.pin import Pin
    from signer.wrapping import load_private_key_pem

    paths = HsmPaths(Path(root).absolute())
    if not paths.initialised():
        raise FailedPrecondition(f"no token in {paths.root}: run 'signer hsm init' first")
    if not label or len(label) > 255 or not label.isprintable():
        raise InvalidArgument("label must be 1 to 255 printable characters")
    if not 1 <= len(key_id) <= 64:
        raise InvalidArgument(f"key id must be 1 to 64 bytes, got {len(key_id)}")
    key = load_private_key_pem(key_pem, password)
    pkcs8 = bytearray(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SOFTHSM2_CONF": str(paths.conf)}
    workdir = Path(tempfile.mkdtemp(prefix=".provision-", dir=paths.root))  # mode 0700
    key_file = workdir / "key.p8"
    try:
        _write_secret(key_file, pkcs8)
        argv = import_command(key_file, label, key_id, token)
        pin_file = paths.tls_pin if token == TLS_LABEL else paths.user_pin
        status, errors = _run_on_terminal(argv, env, Pin(pin_file), timeout)
    finally:
        _shred(key_file, len(pkcs8))
        pkcs8[:] = bytes(len(pkcs8))
        workdir.rmdir()
    if status != 0:
        raise FailedPrecondition(
            f"{SOFTHSM_UTIL} --import failed (exit status {status})"
            + (f": {errors}" if errors else "")
        )
    log.info("key provisioned", extra={"label": label, "id": key_id.hex()})


def _shred(path: Path, size: int) -> None:
    """Overwrites a file with zeros, to the disk, before removing it."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    try:
        os.write(fd, bytes(size))
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()


def _run_on_terminal(
    argv: list[str], env: dict[str, str], pin: Pin, timeout: float
) -> tuple[int, str]:
    """Runs ``argv`` on a new pseudo-terminal, answering its PIN prompts from ``pin``.

    Returns the exit status and the tool's ERROR lines (which never hold the PIN: echo is off,
    and softhsm2-util prints one '*' per character). Nothing else of the transcript is kept.
    """
    master, slave = os.openpty()
    try:
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~(termios.ECHO | termios.ECHONL)
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        proc = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            close_fds=True,
            start_new_session=True,
            preexec_fn=disable_core_dumps,
        )
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    transcript = bytearray()
    answered = 0
    deadline = time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise FailedPrecondition(f"{argv[0]} did not finish within {timeout:g} s")
            ready, _, _ = select.select([master], [], [], min(remaining, 0.5))
            if not ready:
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child has closed its side of the terminal
                break
            if not chunk:
                break
            transcript += chunk
            while transcript.count(_PIN_PROMPT) > answered:
                if answered == _PIN_PROMPTS:
                    raise FailedPrecondition(f"{argv[0]} asked for the PIN more than twice")
                pin.write_line(master)
                answered += 1
        status = proc.wait(timeout=max(deadline - time.monotonic(), 1.0))
    finally:
        pin.wipe()
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = transcript.decode("utf-8", "replace").splitlines()
    transcript[:] = bytes(len(transcript))
    return status, "; ".join(line.strip() for line in lines if line.startswith("ERROR"))


class TokenHost:
    """Runs one ``p11-kit server`` per token in ``root`` (signing, and TLS if there is one).

    ``tls_socket``, ``tls_group``: where the TLS token is served instead, to that group too
    (0660): the TLS front's own, when it runs as its own user outside ``root``. ``socket``,
    ``group``: the same for the signing token (the service's user's group, when the token host
    runs as a user of its own, as its systemd unit does)."""

    def __init__(
        self,
        root: str | Path,
        label: str = DEFAULT_LABEL,
        module: str = SOFTHSM_MODULE,
        tls_socket: Path | None = None,
        tls_group: int | None = None,
        socket: Path | None = None,
        group: int | None = None,
    ) -> None:
        self.paths = HsmPaths(Path(root).absolute())
        self.label = label
        self.module = module
        self.socket = socket or self.paths.socket
        self.group = group
        self.tls_socket = tls_socket or self.paths.tls_socket
        self.tls_group = tls_group
        self._procs: list[subprocess.Popen[bytes]] = []

    def _exports(self) -> list[tuple[str, Path]]:
        exports = [(self.label, self.socket)]
        if self.paths.has_tls_token():
            exports.append((TLS_LABEL, self.tls_socket))
        return exports

    def start(self, timeout: float = 10.0) -> None:
        if not self.paths.initialised():
            raise FailedPrecondition(f"no token in {self.paths.root}: run 'signer hsm init' first")
        self.paths.run.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.paths.run, 0o700)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SOFTHSM2_CONF": str(self.paths.conf),
        }
        for label, socket in self._exports():
            with contextlib.suppress(FileNotFoundError):
                socket.unlink()  # left behind by a host that was killed
            self._procs.append(
                subprocess.Popen(
                    [
                        "p11-kit",
                        "server",
                        "--foreground",
                        "--name",
                        str(socket),
                        "--provider",
                        self.module,
                        f"pkcs11:token={label}",
                    ],
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    # its own process group, so stop() reaches p11-kit-remote too
                    start_new_session=True,
                    preexec_fn=guarded_preexec,
                )
            )
        deadline = time.monotonic() + timeout
        for proc, (_, socket) in zip(self._procs, self._exports(), strict=True):
            # Until it accepts a connection: the socket file appears before the server listens
            # on it, and a client then saw no token (about one start in twenty).
            while not _accepts(socket):
                if not self._procs:
                    return  # stopped meanwhile (a signal handler)
                if proc.poll() is not None:
                    self.stop()
                    raise FailedPrecondition(f"p11-kit server exited with status {proc.returncode}")
                if time.monotonic() > deadline:
                    self.stop()
                    raise FailedPrecondition("p11-kit server did not create its socket in time")
                time.sleep(0.02)
            with contextlib.suppress(FileNotFoundError):  # stopped meanwhile
                os.chmod(socket, 0o600)
        if self.group is not None:
            _share_socket(self.socket, self.group)
        if self.tls_group is not None and self.paths.has_tls_token():
            _share_socket(self.tls_socket, self.tls_group)
        log.info("token host serving", extra={"socket": str(self.socket), "pid": self.pid})

    @property
    def pid(self) -> int | None:
        """The signing token's p11-kit server."""
        return self._procs[0].pid if self._procs else None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def stop(self, timeout: float = 5.0) -> None:
        procs, self._procs = self._procs, []
        if not procs:
            return
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            # p11-kit-remote children may outlive the server by a moment.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for _, socket in self._exports():
            with contextlib.suppress(FileNotFoundError):
                socket.unlink()
        log.info("token host stopped")

    def poll(self) -> int | None:
        """The exit status of a server that has exited on its own; None while all run."""
        for proc in self._procs:
            status = proc.poll()
            if status is not None:
                return status
        return None

    def wait(self) -> int:
        """Waits until a server exits (its status) or the host is stopped (0)."""
        while self._procs:
            status = self.poll()
            if status is not None:
                return status
            time.sleep(0.2)
        return 0


def _share_socket(path: Path, gid: int) -> None:
    """``path`` 0660 to group ``gid``; chowned only when its directory (setgid, as the systemd
    unit makes it) did not already give it that group: the unit's system call filter refuses
    chown to the token host."""
    with contextlib.suppress(FileNotFoundError):  # stopped meanwhile
        if os.stat(path).st_gid == gid:
            os.chmod(path, 0o660)
        else:
            share_with_group(path, gid, 0o660)


def _accepts(path: Path) -> bool:
    with contextlib.suppress(OSError), socket_mod.socket(socket_mod.AF_UNIX) as s:
        s.connect(str(path))
        return True
    return False


def serve_forever(
    root: str | Path,
    label: str = DEFAULT_LABEL,
    *,
    socket: Path | None = None,
    group: int | None = None,
    tls_socket: Path | None = None,
    tls_group: int | None = None,
) -> int:
    """``signer hsm serve``: runs the token host in the foreground; SIGTERM/SIGINT stop it.
    ``socket``/``tls_socket`` and their groups: as :class:`TokenHost`'s."""
    disable_core_dumps()
    host = TokenHost(
        root, label, socket=socket, group=group, tls_socket=tls_socket, tls_group=tls_group
    )
    lines = [f"token host serving unix:path={host.socket}"]
    if host.paths.has_tls_token():
        lines.append(f"TLS token served on unix:path={host.tls_socket}")
    return run_in_foreground(host, "\n".join(lines), "p11-kit server")
