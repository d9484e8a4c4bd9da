"""signer._internal.token._direct: the probe believes a function list only where python-pkcs11's
layout is known and the list's entries are code; return codes become python-pkcs11's
exceptions. (The real path, through the token host: tests/integration/test_direct_sign.py.)"""

from __future__ import annotations

import ctypes

import pkcs11.exceptions as p11e
import pytest

from signer._internal.token import _direct
from signer._internal.token._direct import DirectSign
from signer.keys import SignMechanism

POINTER = ctypes.sizeof(ctypes.c_void_p)


class _Holder:
    """An object whose first field after the object header is a pointer we choose: the
    address of ``table``'s object, so the probe reads its "function list" from there."""

    __slots__ = ("table",)

    def __init__(self, table: object) -> None:
        self.table = table


def _table_with(entries: dict[int, int]) -> bytes:
    """Bytes laid out so that, read as pointers from the start of the bytes *object*, entry i
    holds entries.get(i, 0). (The object's first 32 bytes are its header: entries 0 to 3.)"""
    header = 4
    words = [entries.get(i, 0) for i in range(header, _direct._SIGN + 1)]
    return b"".join(w.to_bytes(POINTER, "little") for w in words)


def test_an_unknown_python_pkcs11_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_direct, "layout_known", lambda: False)
    reason = DirectSign.of(object())
    assert reason == "python-pkcs11's object layout is not known for this version"


def test_a_list_without_the_three_entries_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_direct, "layout_known", lambda: True)
    holder = _Holder(_table_with({}))
    assert DirectSign.of(holder) == (
        "the function list lacks C_GetSessionInfo, C_SignInit or C_Sign"
    )


def test_entries_that_are_not_code_are_never_called(monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-zero entries pointing at data (readable, not executable): refused before any call
    (a call would jump into data)."""
    monkeypatch.setattr(_direct, "layout_known", lambda: True)
    data = ctypes.create_string_buffer(64)
    where = ctypes.addressof(data)
    entries = {_direct._GET_SESSION_INFO: where, _direct._SIGN_INIT: where, _direct._SIGN: where}
    holder = _Holder(_table_with(entries))
    assert DirectSign.of(holder) == (
        "the function list's C_GetSessionInfo, C_SignInit or C_Sign is not code"
    )


def test_mapped_reads_this_process_maps() -> None:
    """What the probe asks before reading or calling: page zero is never mapped, an object's
    memory is readable and not executable, a C function is code."""
    assert not _direct._mapped(8, POINTER, "r")
    assert _direct._mapped(id(POINTER), POINTER, "r")
    assert not _direct._mapped(id(POINTER), POINTER, "rx")
    libc = ctypes.CDLL(None)
    strlen = ctypes.cast(libc.strlen, ctypes.c_void_p).value
    assert strlen is not None
    assert _direct._mapped(strlen, 1, "rx")


def test_return_codes_become_python_pkcs11s_exceptions() -> None:
    assert isinstance(_direct._error(0x30), p11e.DeviceError)
    assert isinstance(_direct._error(0x60), p11e.KeyHandleInvalid)
    assert isinstance(_direct._error(0xB3), p11e.SessionHandleInvalid)
    unknown = _direct._error(0x12345)
    assert type(unknown) is p11e.PKCS11Error
    assert "0x12345" in str(unknown)


def test_what_is_signed_directly() -> None:
    """EdDSA stays with python-pkcs11 (p11-kit 0.24 does not carry it)."""
    assert DirectSign.covers(SignMechanism.ECDSA)
    assert DirectSign.covers(SignMechanism.RSA_PKCS)
    assert DirectSign.covers(SignMechanism.RSA_PKCS_PSS)
    assert not DirectSign.covers(SignMechanism.EDDSA)


def test_the_installed_python_pkcs11_has_the_known_layout() -> None:
    """The pinned python-pkcs11 is one whose layout the probe knows: an upgrade that is not
    checked would quietly turn the direct path off (the integration test would then fail)."""
    assert _direct.layout_known()
