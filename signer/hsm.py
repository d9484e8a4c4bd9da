"""The token host: a SoftHSM2 token served by ``p11-kit server`` on an owner-only Unix socket.

It stands in for an HSM appliance. Its directory holds everything the token is::

    DIR/                     0700
      softhsm2.conf          points SoftHSM2 at DIR/tokens
      tokens/                SoftHSM2's object files (private objects encrypted under the PIN)
      so.pin, user.pin       0600, generated at random, never printed
      run/                   0700
        p11-kit.sock         0600, what the service's p11-kit-client.so connects to

``p11-kit server`` starts one ``p11-kit-remote`` per client connection, each loading SoftHSM2.
All of them run in one process group with RLIMIT_CORE 0 (inherited) and are stopped together.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import secrets
import select
import signal
import subprocess
import tempfile
import termios
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization

from signer.config import SOFTHSM_MODULE
from signer.errors import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from signer.token.pin import Pin

log = logging.getLogger(__name__)

DEFAULT_LABEL = "signer"
SOCKET_NAME = "p11-kit.sock"


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
    def run(self) -> Path:
        return self.root / "run"

    @property
    def socket(self) -> Path:
        return self.run / SOCKET_NAME

    @property
    def server_address(self) -> str:
        return f"unix:path={self.socket}"

    def initialised(self) -> bool:
        return self.conf.exists() and self.user_pin.exists() and any(self.tokens.glob("*"))


def _write_secret(path: Path, value: bytes | bytearray) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with memoryview(value) as view:
            done = 0
            while done < len(view):
                done += os.write(fd, view[done:])
    finally:
        os.close(fd)


def init(root: str | Path, label: str = DEFAULT_LABEL, module: str = SOFTHSM_MODULE) -> HsmPaths:
    """Creates a token in ``root`` with random SO and user PINs in owner-only files."""
    from signer.token.admin import init_token

    paths = HsmPaths(Path(root).absolute())
    if paths.initialised():
        raise FailedPrecondition(f"a token already exists in {paths.root}")
    paths.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(paths.root, 0o700)
    paths.tokens.mkdir(mode=0o700, exist_ok=True)
    paths.run.mkdir(mode=0o700, exist_ok=True)
    paths.conf.write_text(
        f"directories.tokendir = {paths.tokens}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    # 32 characters from a 64-symbol alphabet: 192 bits. Built in bytearrays so they can be wiped.
    so_pin = bytearray(secrets.token_urlsafe(24).encode("ascii"))
    user_pin = bytearray(secrets.token_urlsafe(24).encode("ascii"))
    try:
        _write_secret(paths.so_pin, bytes(so_pin))
        _write_secret(paths.user_pin, bytes(user_pin))
        init_token(module, paths.conf, label, so_pin, user_pin)
    finally:
        so_pin[:] = bytes(len(so_pin))
        user_pin[:] = bytes(len(user_pin))
    log.info("token initialised", extra={"dir": str(paths.root), "label": label})
    return paths


# --- provisioning keys at the token host -------------------------------------------------------

SOFTHSM_UTIL = "softhsm2-util"
_PIN_PROMPT = b"PIN: "  # "Please enter user PIN: ", then "Please reenter user PIN: "
_PIN_PROMPTS = 2


def import_command(key_file: Path, label: str, key_id: bytes, token: str) -> list[str]:
    """softhsm2-util's argv for an import. No --pin: without it, it asks on its terminal."""
    return [
        SOFTHSM_UTIL, "--import", str(key_file), "--token", token,
        "--label", label, "--id", key_id.hex(),
    ]  # fmt: skip


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
    :meth:`signer.service.Signer.adopt_key` makes the service use it.
    """
    from signer.token.pin import Pin
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
        status, errors = _run_on_terminal(argv, env, Pin(paths.user_pin), timeout)
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
            argv, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
            start_new_session=True, preexec_fn=disable_core_dumps,
        )  # fmt: skip
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


def disable_core_dumps() -> None:
    """RLIMIT_CORE 0 (inherited by p11-kit server and every p11-kit-remote it starts)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


PR_SET_PDEATHSIG = 1


def _server_preexec() -> None:
    """In the forked child, before exec: no core dumps, and SIGTERM if whoever started the
    token host dies without stopping it (a killed test run or harness leaves no orphan)."""
    disable_core_dumps()
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class TokenHost:
    """Runs ``p11-kit server`` for the token in ``root`` until stopped."""

    def __init__(
        self, root: str | Path, label: str = DEFAULT_LABEL, module: str = SOFTHSM_MODULE
    ) -> None:
        self.paths = HsmPaths(Path(root).absolute())
        self.label = label
        self.module = module
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        if not self.paths.initialised():
            raise FailedPrecondition(f"no token in {self.paths.root}: run 'signer hsm init' first")
        self.paths.run.mkdir(mode=0o700, exist_ok=True)
        os.chmod(self.paths.run, 0o700)
        with contextlib.suppress(FileNotFoundError):
            self.paths.socket.unlink()  # left behind by a host that was killed
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "SOFTHSM2_CONF": str(self.paths.conf),
        }
        self._proc = subprocess.Popen(
            [
                "p11-kit", "server", "--foreground",
                "--name", str(self.paths.socket),
                "--provider", self.module,
                f"pkcs11:token={self.label}",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so stop() reaches p11-kit-remote too
            preexec_fn=_server_preexec,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not self.paths.socket.exists():
            if self._proc.poll() is not None:
                raise FailedPrecondition(
                    f"p11-kit server exited with status {self._proc.returncode}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise FailedPrecondition("p11-kit server did not create its socket in time")
            time.sleep(0.02)
        os.chmod(self.paths.socket, 0o600)
        log.info("token host serving", extra={"socket": str(self.paths.socket), "pid": self.pid})

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def stop(self, timeout: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        # p11-kit-remote children may outlive the server by a moment.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self.paths.socket.unlink()
        log.info("token host stopped")

    def wait(self) -> int:
        assert self._proc is not None
        return self._proc.wait()


def serve_forever(root: str | Path, label: str = DEFAULT_LABEL) -> int:
    """``signer hsm serve``: runs the token host in the foreground; SIGTERM/SIGINT stop it."""
    disable_core_dumps()
    host = TokenHost(root, label)
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        host.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    host.start()
    print(f"token host serving {host.paths.server_address}", flush=True)
    while host.pid is not None:
        try:
            status = host.wait()
        except (AssertionError, ChildProcessError):
            break
        if not stopping:
            raise FailedPrecondition(f"p11-kit server exited unexpectedly with status {status}")
        break
    return 0
