"""The token PIN: read from an owner-only file into a page of its own, and nowhere else.

How the PIN reaches C_Login without copies being left behind:

* It is read with ``readv(2)`` straight into an anonymous ``mmap`` page that is locked in RAM
  (``mlock``), excluded from core dumps (``MADV_DONTDUMP``) and wiped in any child after fork
  (``MADV_WIPEONFORK``). No ``bytes`` or ``str`` holds it on the way in: validation walks the
  page in place.
* python-pkcs11's ``Token.open(user_pin=...)`` calls ``user_pin.encode('utf-8')`` and passes the
  resulting ``bytes`` to C_Login. We pass an *empty* ``str`` subclass whose ``encode()``
  allocates a fresh ``bytes``, copies the page into it with memmove (no temporaries) and
  remembers it; as soon as ``open()`` returns, that buffer is overwritten with zeros in place,
  before its last reference goes.
* The RPC buffer p11-kit-client allocates to carry the PIN is freed by p11-kit without wiping;
  :func:`perturb_freed_memory` (glibc ``M_PERTURB``) makes every ``free`` overwrite the chunk.
  Except one kind: a small chunk freed into the calling thread's tcache keeps its bytes (past
  its first 16) until that thread allocates the same size again, and glibc perturbs it only when
  the thread exits and its tcache is flushed. So C_Login runs on a thread of its own that ends
  before :meth:`Pin.login` returns (measured here: a 64- or 512-byte chunk freed on a live
  thread kept its contents; the same on a thread that had exited, none). The crash harness
  caught this: the PIN, twice, in a thread arena of a service snapshot under load, once a second
  connection logged in from a pool thread that then seldom allocated those sizes again.

The page lives only for the duration of one login: it is zeroed and unmapped as soon as
C_Login returns; after a lost token host, the next login reads the file again.
The PIN never comes from argv or the environment, and never reaches a log line or an
error message.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any

from signer.errors import ConfigError

MAX_PIN_BYTES = 255
MADV_WIPEONFORK = 18  # Linux 4.14+; not exported by Python 3.11's mmap module
M_PERTURB = -6  # glibc mallopt parameter
_BYTES_DATA_OFFSET = sys.getsizeof(b"") - 1  # offset of PyBytesObject.ob_sval

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_bytes_from = ctypes.pythonapi.PyBytes_FromStringAndSize
_bytes_from.restype = ctypes.py_object
_bytes_from.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)


def perturb_freed_memory(byte: int = 0xA5) -> bool:
    """Makes glibc's free() fill released heap chunks, so C buffers that carried the PIN (and
    request payloads) do not linger. Returns whether glibc accepted it."""
    return bool(_libc.mallopt(M_PERTURB, byte))


def _valid_utf8(view: memoryview) -> bool:
    """UTF-8 validation that reads the page in place (bytes.decode would copy the PIN)."""
    i, n = 0, len(view)
    while i < n:
        b = view[i]
        if b < 0x80:
            i += 1
            continue
        if 0xC2 <= b <= 0xDF:
            extra = 1
        elif 0xE0 <= b <= 0xEF:
            extra = 2
        elif 0xF0 <= b <= 0xF4:
            extra = 3
        else:
            return False
        for k in range(1, extra + 1):
            if i + k >= n or not 0x80 <= view[i + k] <= 0xBF:
                return False
        i += extra + 1
    return True


def _read_into(fd: int, view: memoryview) -> int:
    """Fills ``view`` from ``fd`` (up to MAX_PIN_BYTES + 2, enough to see a PIN is too long)."""
    limit = MAX_PIN_BYTES + 2
    n = 0
    while n < limit:
        got = os.readv(fd, [view[n:limit]])
        if got == 0:
            break
        n += got
    return n


class _LoginPin(str):
    """An empty ``str`` whose ``encode()`` yields the PIN as a ``bytes`` we can wipe later."""

    _page: mmap.mmap
    _length: int
    _handed_out: list[bytes]

    def encode(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        # A fresh object, filled in place: PyBytes_FromStringAndSize(data, 1) would return one of
        # CPython's shared one-byte singletons, which wipe() must never touch.
        pin: bytes = _bytes_from(None, self._length)
        source = ctypes.c_char.from_buffer(self._page)
        ctypes.memmove(id(pin) + _BYTES_DATA_OFFSET, ctypes.addressof(source), self._length)
        del source
        self._handed_out.append(pin)
        return pin

    def wipe(self) -> None:
        for pin in self._handed_out:
            ctypes.memset(id(pin) + _BYTES_DATA_OFFSET, 0, len(pin))
        self._handed_out.clear()


class Pin:
    """A PIN read from ``path`` into locked, dump-excluded memory; its repr shows the path only."""

    def __init__(self, path: str | Path) -> None:
        self._path = Path(path)
        self._page: mmap.mmap | None = None
        self._len = 0
        self._protection = {"dontdump": False, "wipeonfork": False, "mlock": False}

    def __repr__(self) -> str:
        return f"Pin(path={str(self._path)!r})"

    @property
    def protected(self) -> dict[str, bool]:
        """What protection the page got (mlock can fail under a low RLIMIT_MEMLOCK)."""
        return dict(self._protection)

    def load(self) -> Pin:
        """Reads the file; refuses one that anybody but its owner could read."""
        try:
            # O_NONBLOCK: a FIFO must be refused below, not block start-up on open.
            fd = os.open(self._path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            raise ConfigError(f"PIN file not found: {self._path}") from None
        except OSError as exc:
            raise ConfigError(f"cannot open PIN file {self._path}: {exc.strerror}") from None
        page = self._new_page()
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"PIN file {self._path} is not a regular file")
            if st.st_mode & 0o077:
                raise ConfigError(
                    f"PIN file {self._path} is readable by group or others "
                    f"(mode {stat.S_IMODE(st.st_mode):04o}); chmod 600 it"
                )
            with memoryview(page) as view:
                n = _read_into(fd, view)
                # A trailing newline from an editor is not part of the PIN.
                while n and view[n - 1] in (0x0A, 0x0D):
                    n -= 1
                ok_length = 0 < n <= MAX_PIN_BYTES
                # PKCS#11 PINs are UTF-8; say so now rather than fail at login.
                ok_text = ok_length and _valid_utf8(view[:n])
            if not ok_length:
                raise ConfigError(f"PIN file {self._path} must hold 1 to {MAX_PIN_BYTES} bytes")
            if not ok_text:
                raise ConfigError(f"PIN file {self._path} is not UTF-8 text")
        except BaseException:
            _zero(page)
            page.close()
            raise
        finally:
            os.close(fd)
        self.wipe()
        self._page, self._len = page, n
        return self

    def _new_page(self) -> mmap.mmap:
        page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            page.madvise(mmap.MADV_DONTDUMP)
            self._protection["dontdump"] = True
        except OSError:
            pass
        try:
            page.madvise(MADV_WIPEONFORK)
            self._protection["wipeonfork"] = True
        except OSError:
            pass
        buf = ctypes.c_char.from_buffer(page)
        self._protection["mlock"] = _libc.mlock(ctypes.addressof(buf), mmap.PAGESIZE) == 0
        del buf
        return page

    def stamp(self) -> tuple[int, ...] | None:
        """What identifies the file's current contents without reading them (device, inode,
        size, modification and change times); None when it cannot be looked at. A new stamp
        means somebody wrote the file: see :mod:`signer._internal.token._logins`."""
        try:
            st = os.lstat(self._path)
        except OSError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)

    def login(self, token: Any) -> Any:
        """Opens a read-write session on ``token`` logged in as the user; returns the session.

        The PIN is read from its file for this login and wiped right after: between logins it
        is nowhere in memory, not even in the dump-excluded page (``gcore -a`` dumps those too).
        After a lost token host the file is read again, which also picks up a rotated one.
        """
        self.load()
        assert self._page is not None
        handle = _LoginPin("")
        handle._page, handle._length, handle._handed_out = self._page, self._len, []
        outcome: list[Any] = []

        def log_in() -> None:  # on a thread of its own: see the module's docstring (tcache)
            try:
                outcome.append(token.open(rw=True, user_pin=handle))
            except BaseException as exc:
                outcome.append(exc)

        try:
            thread = threading.Thread(target=log_in, name="token-login")
            thread.start()
            thread.join()
        finally:
            handle.wipe()
            self.wipe()
        if isinstance(outcome[0], BaseException):
            raise outcome[0]
        return outcome[0]

    def write_line(self, fd: int) -> None:
        """Writes the PIN and a newline to ``fd`` (a terminal's prompt), straight from the page:
        no ``bytes`` or ``str`` copy of it is made."""
        if self._page is None:
            self.load()
        assert self._page is not None
        with memoryview(self._page) as page:
            done = 0
            while done < self._len:
                with page[done : self._len] as rest:
                    done += os.write(fd, rest)
        os.write(fd, b"\n")

    def wipe(self) -> None:
        if self._page is not None:
            _zero(self._page)
            self._page.close()
            self._page = None
            self._len = 0


def _zero(page: mmap.mmap) -> None:
    page.seek(0)
    page.write(bytes(len(page)))
    page.seek(0)
