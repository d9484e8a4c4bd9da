"""signer._internal.token.pin: the PIN file is owner-only, bounded, never followed through a
symlink, and its content never shows up in a repr or an error message."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest

from signer._internal.token.pin import MAX_PIN_BYTES, Pin
from signer.errors import ConfigError

SECRET = "s3cr3t-PIN-9731"


class FakeToken:
    """Does with the PIN what python-pkcs11's Token.open does: ``user_pin.encode('utf-8')``."""

    def __init__(self) -> None:
        self.pins: list[str] = []
        self.passed: list[str] = []
        self.encoded: list[bytes] = []

    def open(self, rw: bool, user_pin: str) -> Any:
        assert rw is True
        self.passed.append(str.__str__(user_pin))
        encoded = user_pin.encode("utf-8")
        self.encoded.append(encoded)
        self.pins.append(encoded.decode("utf-8"))  # a copy, as C_Login would see it
        return "session"


def pin_file(
    tmp_path: Path, content: bytes | str, mode: int = 0o600, name: str = "user.pin"
) -> Path:
    p = tmp_path / name
    p.write_bytes(content.encode() if isinstance(content, str) else content)
    os.chmod(p, mode)
    return p


def pin_value(pin: Pin) -> str:
    token = FakeToken()
    assert pin.login(token) == "session"
    return token.pins[-1]


def assert_no_secret(exc: BaseException, secret: str = SECRET) -> None:
    assert isinstance(exc, ConfigError)
    assert secret not in str(exc)
    assert secret not in exc.message
    assert secret not in repr(exc)
    assert exc.__cause__ is None


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (SECRET, SECRET),
        (SECRET + "\n", SECRET),
        (SECRET + "\r\n", SECRET),
        (SECRET + "\n\n\n", SECRET),
        (" spaced pin ", " spaced pin "),
        ("a\nb\n", "a\nb"),
        ("1", "1"),
    ],
)
def test_owner_only_file_is_read(tmp_path: Path, content: str, expected: str) -> None:
    pin = Pin(pin_file(tmp_path, content)).load()
    assert pin_value(pin) == expected


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700])
def test_owner_only_modes_accepted(tmp_path: Path, mode: int) -> None:
    assert pin_value(Pin(pin_file(tmp_path, SECRET, mode)).load()) == SECRET


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o606, 0o610, 0o601, 0o777])
def test_group_or_world_accessible_refused(tmp_path: Path, mode: int) -> None:
    path = pin_file(tmp_path, SECRET, mode)
    with pytest.raises(ConfigError) as ei:
        Pin(path).load()
    assert f"mode {mode:04o}" in ei.value.message
    assert "readable by group or others" in ei.value.message
    assert str(path) in ei.value.message
    assert_no_secret(ei.value)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="PIN file not found"):
        Pin(tmp_path / "absent.pin").load()


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n\n"])
def test_empty_file_refused(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(ConfigError, match=f"must hold 1 to {MAX_PIN_BYTES} bytes"):
        Pin(pin_file(tmp_path, content)).load()


def test_longest_pin_accepted(tmp_path: Path) -> None:
    assert pin_value(Pin(pin_file(tmp_path, "x" * MAX_PIN_BYTES)).load()) == "x" * MAX_PIN_BYTES
    assert (
        pin_value(Pin(pin_file(tmp_path, "y" * MAX_PIN_BYTES + "\n")).load()) == "y" * MAX_PIN_BYTES
    )


@pytest.mark.parametrize("size", [MAX_PIN_BYTES + 1, MAX_PIN_BYTES + 2, 4096])
def test_too_long_file_refused(tmp_path: Path, size: int) -> None:
    content = (SECRET * (size // len(SECRET) + 1))[:size]
    with pytest.raises(ConfigError, match="must hold 1 to") as ei:
        Pin(pin_file(tmp_path, content)).load()
    assert_no_secret(ei.value)


def test_symlink_refused(tmp_path: Path) -> None:
    target = pin_file(tmp_path, SECRET, name="real.pin")
    link = tmp_path / "link.pin"
    link.symlink_to(target)
    with pytest.raises(ConfigError, match="cannot open PIN file") as ei:
        Pin(link).load()
    assert str(link) in ei.value.message
    assert_no_secret(ei.value)


def test_directory_refused(tmp_path: Path) -> None:
    d = tmp_path / "dir.pin"
    d.mkdir(mode=0o700)
    with pytest.raises(ConfigError, match="not a regular file"):
        Pin(d).load()


def test_fifo_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.pin"
    os.mkfifo(fifo, 0o600)
    errors: list[BaseException] = []

    def load() -> None:
        try:
            Pin(fifo).load()
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(1.0)
    blocked = t.is_alive()
    if blocked:
        # Opening the write end lets the blocked open() return; then load() fails on fstat.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5.0)
    assert not blocked, "Pin.load() blocked opening a FIFO"
    assert len(errors) == 1
    assert isinstance(errors[0], ConfigError)
    assert "not a regular file" in str(errors[0])


def test_repr_shows_path_not_pin(tmp_path: Path) -> None:
    path = pin_file(tmp_path, SECRET)
    pin = Pin(path).load()
    assert repr(pin) == f"Pin(path={str(path)!r})"
    assert SECRET not in repr(pin)
    assert SECRET not in str(pin)


def test_wipe_zeroes_and_unmaps_the_page(tmp_path: Path) -> None:
    pin = Pin(pin_file(tmp_path, SECRET + "\n")).load()
    page = pin._page
    assert page is not None
    assert page[: len(SECRET)] == SECRET.encode()
    pin.wipe()
    assert pin._page is None
    assert page.closed


def test_reload_wipes_previous_page(tmp_path: Path) -> None:
    path = pin_file(tmp_path, SECRET)
    pin = Pin(path).load()
    old = pin._page
    pin.load()
    assert old is not None
    assert old.closed
    assert pin_value(pin) == SECRET


def test_login_hands_python_pkcs11_an_empty_str_and_wipes_the_bytes(tmp_path: Path) -> None:
    pin = Pin(pin_file(tmp_path, SECRET)).load()
    token = FakeToken()
    pin.login(token)
    assert token.pins == [SECRET]  # C_Login got the PIN
    assert token.passed == [""]  # but the str object itself never held it
    assert token.encoded[0] == bytes(len(SECRET))  # and the bytes it used is zeros now


def test_page_is_locked_and_excluded_from_dumps(tmp_path: Path) -> None:
    pin = Pin(pin_file(tmp_path, SECRET)).load()
    assert pin.protected["dontdump"]
    assert pin.protected["wipeonfork"]
    assert pin._page is not None
    import ctypes

    buf = ctypes.c_char.from_buffer(pin._page)
    start = ctypes.addressof(buf)
    del buf
    flags = _vm_flags(start)
    assert "dd" in flags  # VM_DONTDUMP: not in any core dump
    if pin.protected["mlock"]:
        assert "lo" in flags  # VM_LOCKED: never swapped out


def _vm_flags(address: int) -> set[str]:
    current = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            current = lo <= address < hi
        elif current and line.startswith("VmFlags:"):
            return set(line.split()[1:])
    raise AssertionError("mapping not found")


def test_every_login_reads_the_file_and_keeps_nothing(tmp_path: Path) -> None:
    path = pin_file(tmp_path, "first-pin")
    pin = Pin(path)
    assert pin_value(pin) == "first-pin"
    assert pin._page is None  # wiped and unmapped once C_Login returned
    path.write_text("second-pin\n")
    assert pin_value(pin) == "second-pin"  # a re-login picks up a rotated PIN


def test_failed_reload_keeps_no_secret_in_message(tmp_path: Path) -> None:
    path = pin_file(tmp_path, SECRET)
    pin = Pin(path).load()
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError) as ei:
        pin.load()
    assert_no_secret(ei.value)


def test_non_utf8_pin_is_config_error(tmp_path: Path) -> None:
    path = pin_file(tmp_path, b"\xff\xfe" + SECRET.encode())
    with pytest.raises(ConfigError, match="UTF-8") as ei:
        Pin(path).login(FakeToken())
    assert "0xff" not in str(ei.value)
    assert_no_secret(ei.value)


def test_one_character_pin_never_wipes_a_shared_bytes_singleton(tmp_path: Path) -> None:
    # CPython shares one object per single-byte value; wiping it would corrupt every b"7".
    pin = Pin(pin_file(tmp_path, "7"))
    token = FakeToken()
    pin.login(token)
    assert token.pins == ["7"]
    assert b"7"[0] == 0x37
    assert bytes([0x37]) == b"7"


def test_c_login_runs_on_a_thread_that_has_ended_by_the_time_login_returns(
    tmp_path: Path,
) -> None:
    """M_PERTURB does not reach a small chunk freed into a live thread's tcache (the PIN's RPC
    buffer in p11-kit-client): glibc overwrites it only when that thread exits. So the login
    happens on a thread of its own, gone before login() returns; its errors still reach the
    caller."""
    import threading

    seen: list[threading.Thread] = []

    class Recording(FakeToken):
        def open(self, rw: bool, user_pin: str) -> Any:
            seen.append(threading.current_thread())
            return super().open(rw, user_pin)

    pin = Pin(pin_file(tmp_path, SECRET))
    assert pin.login(Recording()) == "session"
    assert seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()

    class Refusing(FakeToken):
        def open(self, rw: bool, user_pin: str) -> Any:
            user_pin.encode("utf-8")
            raise RuntimeError("CKR_PIN_INCORRECT")

    with pytest.raises(RuntimeError, match="CKR_PIN_INCORRECT"):
        pin.login(Refusing())
