"""Token administration at the token host: C_InitToken and C_InitPIN on SoftHSM2.

This runs in the token host's own short-lived process (``signer hsm init``), never in the
service. python-pkcs11 has no C_InitToken, and softhsm2-util only takes PINs on argv or a
terminal, so the few calls needed are made through ctypes with the PINs in ctypes buffers that
are wiped afterwards.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from signer.errors import FailedPrecondition

CKU_SO = 0
CKF_RW_SESSION = 0x2
CKF_SERIAL_SESSION = 0x4
CKF_TOKEN_INITIALIZED = 0x400
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191

_ULONG = ctypes.c_ulong


class _TokenInfo(ctypes.Structure):
    _fields_ = [
        ("label", ctypes.c_char * 32),
        ("manufacturerID", ctypes.c_char * 32),
        ("model", ctypes.c_char * 16),
        ("serialNumber", ctypes.c_char * 16),
        ("flags", _ULONG),
        ("rest", ctypes.c_byte * 256),
    ]


def _check(rv: int, what: str) -> None:
    if rv != 0:
        raise FailedPrecondition(f"{what} failed: CKR 0x{rv:08x}")


def init_token(
    module: str | Path, conf: Path, label: str, so_pin: bytearray, user_pin: bytearray
) -> None:
    """Initialises the first free slot of ``module`` as token ``label`` and sets the user PIN.

    ``conf`` is the SoftHSM2 configuration naming the token directory; SoftHSM2 reads it from
    SOFTHSM2_CONF in C_Initialize, so the variable is set for the duration of this call only.
    """
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        _init_token(ctypes.CDLL(str(module)), label, so_pin, user_pin)
    finally:
        if previous is None:
            del os.environ["SOFTHSM2_CONF"]
        else:
            os.environ["SOFTHSM2_CONF"] = previous


def _init_token(lib: ctypes.CDLL, label: str, so_pin: bytearray, user_pin: bytearray) -> None:
    so = (ctypes.c_ubyte * len(so_pin)).from_buffer(so_pin)
    user = (ctypes.c_ubyte * len(user_pin)).from_buffer(user_pin)
    rv = lib.C_Initialize(None)
    if rv not in (0, CKR_CRYPTOKI_ALREADY_INITIALIZED):
        _check(rv, "C_Initialize")
    try:
        slot = _free_slot(lib)
        padded = label.encode("utf-8").ljust(32)[:32]
        _check(lib.C_InitToken(_ULONG(slot), so, _ULONG(len(so_pin)), padded), "C_InitToken")
        slot = _slot_with_label(lib, padded)
        session = _ULONG()
        flags = _ULONG(CKF_SERIAL_SESSION | CKF_RW_SESSION)
        _check(
            lib.C_OpenSession(_ULONG(slot), flags, None, None, ctypes.byref(session)),
            "C_OpenSession",
        )
        try:
            _check(lib.C_Login(session, _ULONG(CKU_SO), so, _ULONG(len(so_pin))), "C_Login(SO)")
            _check(lib.C_InitPIN(session, user, _ULONG(len(user_pin))), "C_InitPIN")
            lib.C_Logout(session)
        finally:
            lib.C_CloseSession(session)
    finally:
        lib.C_Finalize(None)
        del so, user  # release the exported buffers so the caller can wipe them


def _slots(lib: ctypes.CDLL) -> list[int]:
    count = _ULONG()
    _check(lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(count)), "C_GetSlotList")
    ids = (_ULONG * count.value)()
    _check(lib.C_GetSlotList(ctypes.c_ubyte(1), ids, ctypes.byref(count)), "C_GetSlotList")
    return list(ids[: count.value])


def _info(lib: ctypes.CDLL, slot: int) -> _TokenInfo:
    info = _TokenInfo()
    _check(lib.C_GetTokenInfo(_ULONG(slot), ctypes.byref(info)), "C_GetTokenInfo")
    return info


def _free_slot(lib: ctypes.CDLL) -> int:
    for slot in _slots(lib):
        if not _info(lib, slot).flags & CKF_TOKEN_INITIALIZED:
            return slot
    raise FailedPrecondition("the token module has no free slot")


def _slot_with_label(lib: ctypes.CDLL, padded: bytes) -> int:
    # SoftHSM2 moves a token to a new slot id once it is initialised.
    for slot in _slots(lib):
        info = _info(lib, slot)
        if info.flags & CKF_TOKEN_INITIALIZED and bytes(info.label).ljust(32) == padded:
            return slot
    raise FailedPrecondition("the new token did not appear")
