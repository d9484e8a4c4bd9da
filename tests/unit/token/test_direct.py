"""signer._internal.token._direct: the probe believes a function list only for python-pkcs11's
own objects of the known layout, and only a list whose entries are code; a signature's retry
and its bounds; return codes become python-pkcs11's exceptions. (The real path, through the
token host: tests/integration/test_direct_sign.py.)"""

from __future__ import annotations

import ctypes
from typing import Any

import pkcs11.exceptions as p11e
import pytest
from pkcs11 import KeyType

from signer._internal.token import _direct
from signer._internal.token._direct import DirectSign
from signer.keys import SignMechanism

POINTER = ctypes.sizeof(ctypes.c_void_p)
ENTRIES = _direct._SIGN + 1


def _table(version: int = 2, entry: int | None = None) -> Any:
    """A CK_FUNCTION_LIST-shaped array in this process: ``version``.40, every entry ``entry``."""
    table = (ctypes.c_void_p * ENTRIES)()
    ctypes.memmove(table, bytes([version, 40]), 2)
    for i in range(1, ENTRIES):
        table[i] = entry
    return table


def test_an_unknown_python_pkcs11_is_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_direct, "layout_known", lambda: False)
    reason = DirectSign.of(object(), object())
    assert reason == "python-pkcs11's object layout is not known for this version"


def test_objects_not_python_pkcs11s_own_are_not_read() -> None:
    class Lookalike:
        handle = 1
        token = None

    reason = DirectSign.of(Lookalike(), object())
    assert isinstance(reason, str)
    assert "own" in reason or "could not finish" in reason


def test_a_probe_that_raises_is_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreadable /proc, a path it cannot parse: python-pkcs11 signs, the connection is
    not lost over it (the review: the probe's exception escaped the connection attempt)."""

    def broken(cls: type, session: Any, lib: Any) -> DirectSign | str:
        raise PermissionError("/proc/self/maps")

    monkeypatch.setattr(DirectSign, "_probe", classmethod(broken))
    assert DirectSign.of(object(), object()) == "the probe could not finish (PermissionError)"


def test_a_list_with_another_version_is_refused() -> None:
    table = _table(version=7)
    assert _direct._entries(ctypes.addressof(table)) == (
        "the function list's version is 7.40, not 2.x or 3.x"
    )


def test_a_list_without_the_three_entries_is_refused() -> None:
    table = _table(entry=None)
    assert _direct._entries(ctypes.addressof(table)) == (
        "the function list lacks C_GetSessionInfo, C_SignInit or C_Sign"
    )


def test_entries_that_are_not_code_are_never_called() -> None:
    """Entries pointing at data (readable, not executable): refused before any call."""
    data = ctypes.create_string_buffer(64)
    table = _table(entry=ctypes.addressof(data))
    assert _direct._entries(ctypes.addressof(table)) == (
        "the function list's C_GetSessionInfo, C_SignInit or C_Sign is not code"
    )


def test_a_list_of_code_is_believed_this_far() -> None:
    strlen = ctypes.cast(ctypes.CDLL(None).strlen, ctypes.c_void_p).value
    assert strlen is not None
    table = _table(entry=strlen)
    assert _direct._entries(ctypes.addressof(table)) == (strlen, strlen, strlen)
    assert _direct._entries(None) == "no function list at the known place"
    assert _direct._entries(8) == "no function list at the known place"  # page zero


def test_mapped_reads_this_process_maps() -> None:
    assert not _direct._mapped(8, POINTER, "r")
    assert _direct._mapped(id(POINTER), POINTER, "r")
    assert not _direct._mapped(id(POINTER), POINTER, "rx")


# --- the signature's two calls, against a module written in Python ---------------------------


class _Module:
    """C_SignInit and C_Sign as plain callables (DirectSign calls them as it would ctypes
    functions): records the calls, answers what it is told."""

    def __init__(self, needs: int, signature: bytes = b"S" * 80) -> None:
        self.needs, self.signature = needs, signature
        self.calls: list[str] = []

    def sign_init(self, session: int, mechanism: Any, key: int) -> int:
        self.calls.append("init")
        return 0

    def sign(self, session: int, data: bytes, n: int, out: Any, length: Any) -> int:
        self.calls.append(f"sign {len(out)}")
        assert data == b"digest"
        assert n == 6
        if length._obj.value < self.needs:
            length._obj.value = self.needs
            return _direct._CKR_BUFFER_TOO_SMALL
        ctypes.memmove(out, self.signature, len(self.signature))
        length._obj.value = len(self.signature)
        return 0


class _Key:
    class session:  # python-pkcs11's attribute name
        handle = 5

    handle = 9
    key_type = KeyType.EC


def test_a_module_that_wants_more_room_gets_it_once() -> None:
    module = _Module(needs=2000, signature=b"S" * 2000)
    direct = DirectSign(module.sign_init, module.sign)
    assert direct.sign(_Key(), SignMechanism.ECDSA, b"digest") == b"S" * 2000
    assert module.calls == ["init", "sign 1024", "sign 2000"]


def test_a_module_that_wants_too_much_room_gets_its_error() -> None:
    """A length past any signature: the module's error (as python-pkcs11's), no allocation."""
    module = _Module(needs=1 << 40)
    direct = DirectSign(module.sign_init, module.sign)
    with pytest.raises(p11e.PKCS11Error, match="0x150"):
        direct.sign(_Key(), SignMechanism.ECDSA, b"digest")
    assert module.calls == ["init", "sign 1024"]


def test_data_that_cannot_be_passed_fails_before_the_operation_starts() -> None:
    """Nothing that can fail in Python comes after C_SignInit (an operation left active would
    answer OperationActive on the session's next signatures)."""
    module = _Module(needs=64)
    direct = DirectSign(module.sign_init, module.sign)
    with pytest.raises(TypeError):
        direct.sign(_Key(), SignMechanism.ECDSA, "not bytes")  # type: ignore[arg-type]
    assert module.calls == []


def test_return_codes_become_python_pkcs11s_exceptions() -> None:
    assert isinstance(_direct._error(0x30), p11e.DeviceError)
    assert isinstance(_direct._error(0x60), p11e.KeyHandleInvalid)
    assert isinstance(_direct._error(0xB3), p11e.SessionHandleInvalid)
    unknown = _direct._error(0x12345)
    assert type(unknown) is p11e.PKCS11Error
    assert "0x12345" in str(unknown)


def test_what_is_signed_directly() -> None:
    """By mechanism and the key's own type (SoftHSM2's p11-kit-remote dies on an EC key asked
    for RSA-PSS with a buffer); EdDSA stays with python-pkcs11."""

    class Rsa:
        key_type = KeyType.RSA

    assert DirectSign.covers(SignMechanism.ECDSA, _Key())
    assert DirectSign.covers(SignMechanism.RSA_PKCS, Rsa())
    assert DirectSign.covers(SignMechanism.RSA_PKCS_PSS, Rsa())
    assert not DirectSign.covers(SignMechanism.RSA_PKCS_PSS, _Key())
    assert not DirectSign.covers(SignMechanism.ECDSA, Rsa())
    assert not DirectSign.covers(SignMechanism.EDDSA, _Key())


def test_the_installed_python_pkcs11_has_the_known_layout() -> None:
    """The pinned python-pkcs11 is the one whose layout the probe knows: an upgrade would
    quietly turn the direct path off (the integration test would then fail too)."""
    assert _direct.layout_known()
