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
import logging
import os
import resource
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from signer.config import SOFTHSM_MODULE
from signer.errors import FailedPrecondition

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


def _write_secret(path: Path, value: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, value)
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


def disable_core_dumps() -> None:
    """RLIMIT_CORE 0 (inherited by p11-kit server and every p11-kit-remote it starts)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


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
            preexec_fn=disable_core_dumps,
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
