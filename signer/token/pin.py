"""The token PIN: read from an owner-only file, held only as long as re-login needs it.

The PIN never comes from argv or the environment, and never reaches a log line or an error
message. Locked, dump-excluded memory for it is issue #4; this class is the one place that will
change for that.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from signer.errors import ConfigError

MAX_PIN_BYTES = 255


class Pin:
    """A PIN read from ``path``; its repr shows the path only."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._buf = bytearray()

    def __repr__(self) -> str:
        return f"Pin(path={str(self._path)!r})"

    def load(self) -> Pin:
        """Reads the file; refuses one that anybody but its owner could read."""
        try:
            # O_NONBLOCK: a FIFO must be refused below, not block start-up on open.
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ConfigError(f"PIN file not found: {self._path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot open PIN file {self._path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"PIN file {self._path} is not a regular file")
            if st.st_mode & 0o077:
                raise ConfigError(
                    f"PIN file {self._path} is readable by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
                )
            buf = bytearray(MAX_PIN_BYTES + 2)
            n = os.readv(fd, [buf])
        finally:
            os.close(fd)
        # Trailing newline from editors is not part of the PIN.
        while n and buf[n - 1] in (0x0A, 0x0D):
            n -= 1
        if n == 0 or n > MAX_PIN_BYTES:
            buf[:] = bytes(len(buf))
            raise ConfigError(f"PIN file {self._path} must hold 1 to {MAX_PIN_BYTES} bytes")
        try:
            # PKCS#11 PINs are UTF-8; say so now rather than fail at login with a byte in the text.
            buf[:n].decode("utf-8")
        except UnicodeDecodeError:
            buf[:] = bytes(len(buf))
            raise ConfigError(f"PIN file {self._path} is not UTF-8 text") from None
        self.wipe()
        self._buf = buf
        self._len = n
        return self

    def login(self, token: Any) -> Any:
        """Opens a read-write session on ``token`` logged in as the user; returns the session."""
        if not self._buf:
            self.load()
        return token.open(rw=True, user_pin=self._buf[: self._len].decode("utf-8"))

    def wipe(self) -> None:
        self._buf[:] = bytes(len(self._buf))
        self._buf = bytearray()
